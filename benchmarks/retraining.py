"""Retraining recipes after pruning, compared pairwise with plain fine-tuning on fresh seeds.

Every method fine-tunes the same pruned models (digits with a CIFAR-style ResNet-20, MNIST-1D with a
1-D CNN; R = 0.8 and 0.9; 10 epochs) with the same seeds, so each method is reported as its paired
difference to vanilla: the mean over seeds and a 95 % t interval.

- Recipes at their best learning rate (a sweep on seeds that are never reported, scored on the
  validation split): vanilla (cosine), large-rate retraining (torch's OneCycleLR), SP, LOP, LOP+SP,
  Hinton's logit distillation (KD), KD+SP and KD+LOP.
- FT, the literature's small fixed rate: vanilla at a constant 0.01 (the paper protocol's vanilla).
- The paper's protocol: every parameter, the LOP factors included, at 0.01 (SGD momentum 0.9, weight
  decay 5e-4), with a constant rate and with a step schedule (x0.1 at 60 % and 80 %); and its
  control, vanilla at 0.01 times LOP's median gain along the gradient (passes.dynamics), which
  shows how much of a gain is the larger effective rate.
- Equal compute: each recipe for as many epochs as fit into vanilla's 30-epoch wall time.

    python -m benchmarks.retraining             # about an hour on 2 cores
    python -m benchmarks.retraining --resume    # continue an interrupted run
    python -m benchmarks.retraining --quick     # a smoke run

Every run is appended to benchmarks/results/retraining_runs.jsonl as it finishes; ``--resume`` skips
the runs found there. Writes retraining.json and retraining.md (the tables the recovery page shows).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import fxlop
from fxlop.data import make_loader
from fxlop.passes import ExpandedLayer, preconditioner

from . import common
from . import recovery
from .recovery import Setup, Variant

#: the recipes, each at its swept learning rate (the main job's settings for SP and LOP)
RECIPES = {
    "vanilla": Variant("vanilla"),
    "onecycle": Variant("onecycle", schedule="onecycle"),
    "sp": recovery.BASELINES["sp"],
    "lop": recovery.BASELINES["lop"],
    "lop_sp": recovery.BASELINES["lop_sp"],
    "kd": Variant("kd", fxlop.METHODS["kd"]),
    "kd_sp": Variant("kd_sp", fxlop.METHODS["kd_sp"], sp_weighting="relative", gamma=0.3),
    "kd_lop": Variant("kd_lop", fxlop.METHODS["kd_lop"], factor_lr_scale=0.5),
}
#: the learning rates each recipe is swept over (onecycle's is its peak)
SWEEP_LRS = {"onecycle": (0.05, 0.1, 0.2)}
DEFAULT_LRS = (0.02, 0.05, 0.1)
#: the paper's protocol: one rate for every parameter, factors included
PAPER_LR = 0.01
PAPER_SCHEDULES = ("constant", "multistep")
#: the seeds that choose the learning rates, and those reported (never the same)
SWEEP_SEEDS = (100, 101)
REPORTED_SEEDS = tuple(range(1000, 1010))
RUNS = "retraining_runs.jsonl"


def paper_methods(control_lr: float) -> dict[str, Variant]:
    """vanilla and LOP at the paper's rate, and the control at ``control_lr``, for both schedules."""
    methods = {}
    for schedule in PAPER_SCHEDULES:
        methods[f"vanilla@{schedule}"] = Variant(f"vanilla@{schedule}", lr=PAPER_LR, schedule=schedule)
        methods[f"lop@{schedule}"] = Variant(f"lop@{schedule}", fxlop.METHODS["lop"], lr=PAPER_LR, schedule=schedule,
                                            factor_lr_scale=1.0)
        methods[f"control@{schedule}"] = Variant(f"control@{schedule}", lr=control_lr, schedule=schedule)
    return methods


def median_gain(setup: Setup, ratio: float, seed: int = 0) -> float:
    """LOP's median gain over the expanded layers, along the gradient: ``<G, P(G)> / <G, G>`` for the
    preconditioner ``P`` of every factor at the same rate (:func:`passes.dynamics.preconditioner`),
    ``G`` the gradient of the compact weight on one training batch."""
    ctx = recovery.context(setup)
    pruned = recovery.pruned_model(setup, ratio)[0].model
    x, y = next(iter(make_loader(ctx["bundle"].train, batch_size=setup.batch_size, shuffle=True, seed=seed)))
    compact = copy.deepcopy(pruned).train()
    F.cross_entropy(compact(x), y).backward()
    gradients = {n: m.weight.grad.detach().double() for n, m in compact.named_modules() if hasattr(m, "weight")
                 and m.weight is not None and m.weight.grad is not None and m.weight.dim() >= 2}
    expanded = fxlop.expand(pruned, seed=seed)
    gains = []
    for name, layer in expanded.named_modules():
        if isinstance(layer, ExpandedLayer) and name in gradients:
            apply = preconditioner(list(layer.factors), [1.0] * len(layer.factors), layer.groups, layer.kernel_index)
            g = gradients[name]
            gains.append(float((g * apply(g)).sum() / (g * g).sum()))
    return statistics.median(gains)


def _key(stage: str, setup: Setup, ratio: float, method: Variant, seed: int, epochs: int) -> str:
    return json.dumps([stage, setup.dataset, setup.model, ratio, method.name, method.lr, seed, epochs])


def _run(item):
    key, job = item
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return key, recovery.run_one(job)


class Runs:
    """The runs done so far, by key, appended to a JSON-lines file as each finishes."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.done: dict[str, dict] = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.done[record["key"]] = record["result"]
        elif path.exists():
            path.unlink()

    def run(self, jobs: dict[str, tuple], workers: int) -> dict[str, dict]:
        """Results of ``jobs`` (key -> run_one job), running only those not done."""
        todo = [(k, j) for k, j in jobs.items() if k not in self.done]
        if todo:
            print(f"{len(todo)} runs ({len(jobs) - len(todo)} done before)", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle, contextlib.ExitStack() as stack:
            if workers <= 1 or len(todo) <= 1:
                results = map(_run, todo)
            else:
                pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(min(workers, len(todo))))
                results = pool.imap_unordered(_run, todo)
            for key, result in results:
                self.done[key] = result
                handle.write(json.dumps({"key": key, "result": result}) + "\n")
                handle.flush()
        return {k: self.done[k] for k in jobs}


def paired(values: list[float], reference: list[float]) -> dict:
    """Mean of the per-seed differences ``values - reference`` (points) and its 95 % t interval."""
    from scipy import stats

    differences = [a - b for a, b in zip(values, reference)]
    n = len(differences)
    mean = statistics.mean(differences)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(differences) / math.sqrt(n) if n > 1 else math.inf
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def _accuracies(runs: list[dict], key: str = "test_accuracy") -> list[float]:
    return [100 * r[key] for r in sorted(runs, key=lambda r: r["seed"])]


def compare(args, setup: Setup, runs: Runs) -> dict:
    """Every recipe and the paper protocol on one dataset, at each ratio; see the module docstring."""
    began = time.perf_counter()
    recovery.context(setup)  # trains and caches the dense model before the workers start
    recipes = {n: RECIPES[n] for n in args.recipes}
    rows = []
    for ratio in args.ratios:
        # 1. learning rates from the sweep seeds, on the validation split
        jobs = {}
        for name, method in recipes.items():
            for lr in (args.lrs or SWEEP_LRS.get(name, DEFAULT_LRS)):
                swept = dataclasses.replace(method, lr=lr)
                for seed in args.sweep_seeds:
                    jobs[_key("sweep", setup, ratio, swept, seed, args.epochs)] = (setup, ratio, swept, seed,
                                                                                  args.epochs)
        sweep = runs.run(jobs, args.workers)
        best = {}
        for name in recipes:
            by_lr = {}
            for result in sweep.values():
                if result["method"]["name"] == name and result["ratio"] == ratio:
                    by_lr.setdefault(result["method"]["lr"], []).append(100 * result["val_accuracy"])
            best[name] = max(by_lr, key=lambda lr: statistics.mean(by_lr[lr]))
        # 2. every recipe at its rate, FT and the paper protocol with its control, on the reported seeds
        gain = median_gain(setup, ratio)
        control_lr = round(PAPER_LR * gain, 5)
        methods = {n: dataclasses.replace(m, lr=best[n]) for n, m in recipes.items()}
        methods.update(paper_methods(control_lr))
        jobs = {}
        for name, method in methods.items():
            for seed in args.seeds:
                jobs[_key("report", setup, ratio, method, seed, args.epochs)] = (setup, ratio, method, seed,
                                                                                args.epochs)
        reported = runs.run(jobs, args.workers)
        by_method = {name: [r for r in reported.values() if r["method"]["name"] == name and r["ratio"] == ratio]
                     for name in methods}
        # 3. equal compute: as many epochs as fit into vanilla's 30-epoch wall time (per-epoch times above)
        seconds = {n: statistics.median(r["seconds_per_epoch"] for r in by_method[n]) for n in recipes}
        budget = args.equal_epochs * seconds["vanilla"]
        equal_epochs = {n: max(1, round(budget / seconds[n])) for n in recipes}
        jobs = {}
        for name, method in methods.items():
            if name in recipes:
                for seed in args.seeds[:args.equal_seeds]:
                    jobs[_key("equal", setup, ratio, method, seed, equal_epochs[name])] = (
                        setup, ratio, method, seed, equal_epochs[name])
        equal = runs.run(jobs, args.workers)
        by_equal = {name: [r for r in equal.values() if r["method"]["name"] == name and r["ratio"] == ratio]
                    for name in recipes}
        vanilla = _accuracies(by_method["vanilla"])
        row = {"ratio": ratio, "epochs": args.epochs, "post_prune_test": 100 * recovery.pruned_model(setup, ratio)[1][
            "test"], "params": by_method["vanilla"][0]["params_deployed"], "median_gain": gain,
            "control_lr": control_lr, "methods": {}, "equal": {}, "equal_seconds": budget,
            "equal_epochs": args.equal_epochs}
        for name, method in methods.items():
            values = _accuracies(by_method[name])
            row["methods"][name] = {
                "lr": method.lr, "schedule": method.schedule, "test": recovery.summarize(by_method[name], "test_accuracy"),
                "val": recovery.summarize(by_method[name], "val_accuracy"),
                "to_vanilla": None if name == "vanilla" else paired(values, vanilla),
                "seconds": statistics.median(r["seconds_per_epoch"] * r["epochs"] for r in by_method[name]),
                "settings": method.settings()}
        for schedule in PAPER_SCHEDULES:
            lop, plain, control = (_accuracies(by_method[f"{m}@{schedule}"]) for m in ("lop", "vanilla", "control"))
            row["methods"][f"lop@{schedule}"]["to_same_protocol"] = paired(lop, plain)
            row["methods"][f"lop@{schedule}"]["to_control"] = paired(lop, control)
        vanilla30 = _accuracies(by_equal["vanilla"])
        for name in recipes:
            values = _accuracies(by_equal[name])
            row["equal"][name] = {"epochs": equal_epochs[name], "test": recovery.summarize(by_equal[name],
                                                                                            "test_accuracy"),
                                  "to_vanilla": None if name == "vanilla" else paired(values, vanilla30)}
        rows.append(row)
        print(markdown_rows(setup.dataset, [row]), flush=True)
    return {"setup": dataclasses.asdict(setup), "seeds": list(args.seeds), "sweep_seeds": list(args.sweep_seeds),
            "recipes": list(recipes), "rows": rows, "machine": common.machine(), "workers": args.workers,
            "wall_time_s": time.perf_counter() - began}


def _interval(d: dict | None) -> str:
    if d is None:
        return ""
    mark = "**" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{mark}{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]{mark}"


#: the paper protocol's rows shown among the recipes, under the literature's name
SHOWN_AS = {"vanilla@constant": "FT (vanilla at a constant 0.01)"}


def markdown_rows(dataset: str, rows: list[dict]) -> str:
    lines = ["| R | method | lr | schedule | test % | paired difference to vanilla [95 % CI] | s per run |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, m in row["methods"].items():
            if "@" in name and name not in SHOWN_AS:
                continue
            lines.append(f"| {row['ratio']} | {SHOWN_AS.get(name, name)} | {m['lr']:g} | {m['schedule']} | "
                         f"{m['test']['mean']:.1f} ± {m['test']['std']:.1f} | {_interval(m['to_vanilla'])} | "
                         f"{m['seconds']:.1f} |")
    return "\n".join(lines)


def paper_rows(rows: list[dict]) -> str:
    lines = ["| R | schedule | vanilla @0.01 | LOP @0.01 | control (lr) | LOP - vanilla @0.01 | LOP - control | "
             "LOP - vanilla (swept) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for schedule in PAPER_SCHEDULES:
            plain, lop, control = (row["methods"][f"{m}@{schedule}"] for m in ("vanilla", "lop", "control"))
            lines.append(f"| {row['ratio']} | {schedule} | {plain['test']['mean']:.1f} ± {plain['test']['std']:.1f} | "
                         f"{lop['test']['mean']:.1f} ± {lop['test']['std']:.1f} | {control['test']['mean']:.1f} ± "
                         f"{control['test']['std']:.1f} ({control['lr']:g}) | {_interval(lop['to_same_protocol'])} | "
                         f"{_interval(lop['to_control'])} | {_interval(lop['to_vanilla'])} |")
    return "\n".join(lines)


def equal_rows(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"| R | method | {first['epochs']} epochs: test % in s | epochs in vanilla's {first['equal_epochs']}-epoch "
             f"time | test % | paired difference to vanilla at {first['equal_epochs']} epochs [95 % CI] |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for name, e in row["equal"].items():
            m = row["methods"][name]
            lines.append(f"| {row['ratio']} | {name} | {m['test']['mean']:.1f} in {m['seconds']:.1f} s | "
                         f"{e['epochs']} | {e['test']['mean']:.1f} ± {e['test']['std']:.1f} | "
                         f"{_interval(e['to_vanilla'])} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    parts = []
    for data in result["results"]:
        setup, rows = data["setup"], data["rows"]
        first = rows[0]
        equal_n = next(iter(first["equal"].values()))["test"]["n"]
        parts.append(
            f"**{setup['model']} on {setup['dataset']}**, {first['epochs']} epochs, test accuracy % (mean ± std over "
            f"{len(data['seeds'])} seeds {data['seeds'][0]}-{data['seeds'][-1]}) and the paired difference to vanilla "
            f"in points, its 95 % t interval in brackets, bold where the interval excludes 0. Learning rates from a "
            f"sweep on seeds {', '.join(map(str, data['sweep_seeds']))}, scored on the validation split. Measured "
            f"{data['machine']['date']} on {data['machine']['cpu']} ({data['workers']} worker processes of 1 thread), "
            f"{data['wall_time_s'] / 60:.0f} min.")
        parts.append(markdown_rows(setup["dataset"], rows))
        parts.append(f"Paper protocol on {setup['dataset']}: every parameter at 0.01, LOP's factors included; the "
                     f"control is vanilla at 0.01 times LOP's median gain along the gradient ("
                     + ", ".join(f"R {r['ratio']}: {r['median_gain']:.2f}" for r in rows) + ").")
        parts.append(paper_rows(rows))
        parts.append(f"Equal compute on {setup['dataset']}: each recipe for the epochs that fit into vanilla's "
                     f"{first['equal_epochs']}-epoch wall time (" + ", ".join(f"R {r['ratio']}: {r['equal_seconds']:.0f} s" for r in rows)
                     + f"), at its rate from the sweep, {equal_n} seeds.")
        parts.append(equal_rows(rows))
    return "\n\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"], choices=list(recovery.DEFAULT_MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--equal-epochs", type=int, default=30, help="vanilla's budget for the equal-compute runs")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--lrs", type=float, nargs="+", help="one sweep for every recipe (default: per recipe)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(REPORTED_SEEDS))
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=list(SWEEP_SEEDS))
    parser.add_argument("--equal-seeds", type=int, default=5, help="how many of --seeds the equal-compute runs use")
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the runs file")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, two seeds")
    args = parser.parse_args(argv)
    if args.quick:
        args.ratios, args.epochs, args.equal_epochs, args.dense_epochs = [0.8], 1, 2, 1
        args.seeds, args.sweep_seeds, args.equal_seeds, args.lrs = [0, 1], [100], 2, [0.05]
    if set(args.seeds) & set(args.sweep_seeds):
        parser.error(f"--seeds and --sweep-seeds share {sorted(set(args.seeds) & set(args.sweep_seeds))}: the "
                     f"seeds that choose the rates are never reported")
    if "vanilla" not in args.recipes:
        parser.error("--recipes must include vanilla, the reference of every difference")
    if len(args.seeds) < 2:
        parser.error("--seeds: an interval needs at least two seeds")
    name = "retraining_quick" if args.quick else "retraining"
    for method in (*RECIPES.values(), *paper_methods(PAPER_LR).values()):  # every setting checked first
        for lr in (args.lrs or SWEEP_LRS.get(method.name, DEFAULT_LRS)):
            dataclasses.replace(method, lr=lr).train_config(epochs=args.epochs)
    runs = Runs(common.RESULTS / (f"{name}_runs.jsonl"), args.resume)
    began = time.perf_counter()
    results = []
    for dataset in args.datasets:
        setup = Setup(model=recovery.DEFAULT_MODELS[dataset], dataset=dataset, dense_epochs=args.dense_epochs)
        results.append(compare(args, setup, runs))
    combined = {"results": results, "machine": common.machine(), "wall_time_s": time.perf_counter() - began}
    table = markdown(combined)
    common.write(name, combined, table)
    print(table)
    return combined


if __name__ == "__main__":
    main()
