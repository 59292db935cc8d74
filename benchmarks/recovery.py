"""Accuracy recovered after pruning: vanilla fine-tuning, SP-only, LOP, LOP+SP and LOP variants, same budget.

Protocol (one command, everything in one run): for each dataset (digits with a CIFAR-style ResNet-20,
MNIST-1D with a 1-D CNN by default) a dense model is trained once on the training split (cached); it
is pruned at each ratio with torch-pruning (l2 group magnitude, classifier kept). Every method gets
its own learning rate from a small sweep scored on a validation split carved from the training data,
never on the test split; then every (ratio, budget, method) is fine-tuned with that rate over several
seeds, on the same split, schedule (SGD momentum 0.9, cosine) and budget, and scored once on the test
split. The paper protocol runs every method again at one fixed rate (0.01), as pruning papers
fine-tune, to show how much of a difference is a learning-rate effect. Runs go to worker processes
of one thread each; every setting is checked before the first run.

    python -m benchmarks.recovery                     # both datasets, about 80 min on 2 cores
    python -m benchmarks.recovery --study             # the lever study at R=0.8 (validation split)
    python -m benchmarks.recovery --rounds-study      # one prune -> fine-tune round against three, R=0.9
    python -m benchmarks.recovery --quick             # a smoke run (a minute)
    python -m benchmarks.recovery --datasets cifar10 --data-dir ~/data --model resnet56 --device cuda \\
        --dense-epochs 160 --budgets 20 80 --workers 1

Writes benchmarks/results/recovery.json (every experiment with its settings), recovery.md (the
tables the docs' recovery page includes), recovery.png and recovery_time.png; the study and the rounds study write recovery_study.* and
recovery_rounds.*.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

import fxlop
from fxlop.data import MNIST1D_REFERENCE, load_dataset, make_loader
from fxlop.models import build_model
from fxlop.prune import prune, prune_steps
from fxlop.passes import POINTWISE_EXPANSION, ExpandedLayer

from . import common

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One variant of the study: a fine-tuning method of the library (:class:`fxlop.Method`, which says
    which of LOP, SP and logit distillation it uses, as the pipeline and the CLI use it) and the levers
    the study turns.  :meth:`train_config` makes the one :class:`fxlop.TrainOptions` the library validates
    and trains with; :meth:`settings` is the flat record the results store."""

    name: str
    method: fxlop.Method = fxlop.METHODS["vanilla"]
    lr: float = 0.05
    schedule: str = "cosine"
    expansion: float = 4
    pointwise_expansion: float | None = POINTWISE_EXPANSION  # r of 1x1 convs and linears (None: expansion)
    depth: int = 3
    init: str = "orthogonal"
    outer_scale: float = 1.0  # outer factors times this, kernel factor divided by it (depth - 1) times
    layers: str = "all"  # "all" or "kxk" (only convolutions with a spatial kernel)
    factor_weight_decay: float | None = None
    factor_lr_scale: float = 1.0
    factor_lr: str = "uniform"
    gamma: float = 3000.0  # SP's weight, used only where the method distils with SP
    taps: str = "layers"  # "layers": every conv/linear; "stages": the residual stage outputs
    tap_reduction: str = "mean"
    sp_weighting: str = "absolute"  # "relative": gamma is the SP / cross-entropy ratio on the first batch
    kd_weight: float = 0.5  # logit distillation's weight, used only where the method uses it
    kd_temperature: float = 4.0
    weight_decay: float = 5e-4
    fuse_at: float | None = None  # LOP: fuse after this share of the epochs, finish the schedule fused
    rounds: int = 1  # prune -> fine-tune cycles to reach the ratio, the epochs split over them

    def train_config(self, **extra) -> fxlop.TrainOptions:
        """The fine-tuning settings of this variant (``extra``: seed, epochs, schedule), checked; the
        method decides which losses stay on (:meth:`fxlop.Method.train_config`)."""
        base = fxlop.TrainOptions(lr=self.lr, weight_decay=self.weight_decay, schedule=self.schedule,
                                 kd_weight=self.kd_weight, kd_temperature=self.kd_temperature,
                                 factor_weight_decay=self.factor_weight_decay, factor_lr_scale=self.factor_lr_scale,
                                 factor_lr=self.factor_lr, gamma=self.gamma, taps=_taps(self),
                                 tap_reduction=self.tap_reduction, sp_weighting=self.sp_weighting)
        config = self.method.train_config(base, **extra)
        config.check()
        return config

    def settings(self) -> dict:
        """The variant as flat JSON data: the method by its three switches, then every lever."""
        fields = dataclasses.asdict(self)
        del fields["method"]
        return {"name": fields.pop("name"), "lop": self.method.lop, "sp": self.method.sp, "kd": self.method.kd,
                **fields}


#: the four methods of the paper's comparison, with the main job's defaults (chosen by the study below):
#: SP weighted relative to the cross-entropy (gamma 0.3), LOP factors at half the base rate
BASELINES = {
    "vanilla": Variant("vanilla"),
    "sp": Variant("sp", fxlop.METHODS["sp"], sp_weighting="relative", gamma=0.3),
    "lop": Variant("lop", fxlop.METHODS["lop"], factor_lr_scale=0.5),
    "lop_sp": Variant("lop_sp", fxlop.METHODS["lop_sp"], sp_weighting="relative", gamma=0.3, factor_lr_scale=0.5),
}
#: the settings the study started from (SP as in Tung & Mori's CIFAR runs, LOP factors at the base rate),
#: and the absolute SP weight the first study chose
UNTUNED = {
    "sp_abs300": Variant("sp_abs300", fxlop.METHODS["sp"], gamma=300.0),
    "lop_sp_abs300": Variant("lop_sp_abs300", fxlop.METHODS["lop_sp"], gamma=300.0, factor_lr_scale=0.5),
    "sp_gamma3000": Variant("sp_gamma3000", fxlop.METHODS["sp"]),
    "lop_factor_lr1": Variant("lop_factor_lr1", fxlop.METHODS["lop"]),
    "lop_sp_gamma3000": Variant("lop_sp_gamma3000", fxlop.METHODS["lop_sp"]),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    val_fraction: float = 0.2
    dense_epochs: int = 30
    dense_lr: float = 0.1
    batch_size: int = 128
    device: str = "cpu"


_CONTEXT: dict = {}


def context(setup: Setup) -> dict:
    """Data, loaders and the dense model of a setup (per process, built once)."""
    if setup in _CONTEXT:
        return _CONTEXT[setup]
    bundle = load_dataset(setup.dataset, data_dir=setup.data_dir, image_size=setup.image_size,
                          val_fraction=setup.val_fraction, split_seed=0)
    loaders = {"val": make_loader(bundle.val, batch_size=512, shuffle=False),
               "test": make_loader(bundle.test, batch_size=512, shuffle=False)}
    dense = dense_model(setup, bundle)
    example = next(iter(loaders["test"]))[0][:2].to(setup.device)
    _CONTEXT[setup] = {"bundle": bundle, "loaders": loaders, "dense": dense, "example": example, "pruned": {}}
    return _CONTEXT[setup]


def dense_model(setup: Setup, bundle) -> nn.Module:
    path = CACHE / f"dense_{setup.model}_{setup.dataset}_{setup.image_size}_{setup.dense_epochs}.pt"
    model = build_model(setup.model, num_classes=bundle.num_classes, in_channels=bundle.input_shape[0])
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.to(setup.device).eval()
    torch.manual_seed(0)
    loader = make_loader(bundle.train, batch_size=setup.batch_size, shuffle=True, seed=0)
    fxlop.finetune(model, loader, epochs=setup.dense_epochs, lr=setup.dense_lr, seed=0, device=setup.device,
                   progress=False)
    CACHE.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def pruned_model(setup: Setup, ratio: float):
    ctx = context(setup)
    if ratio not in ctx["pruned"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = prune(ctx["dense"], ctx["example"], ratio=ratio)
        accuracy = {split: fxlop.evaluate(result.model, loader)["accuracy"] for split, loader in ctx["loaders"].items()}
        ctx["pruned"][ratio] = (result, accuracy)
    return ctx["pruned"][ratio]


@torch.no_grad()
def rescale_factors(model: nn.Module, scale: float) -> None:
    """Multiply the outer factors of every expanded layer by ``scale`` and divide the kernel factor by
    ``scale ** (depth - 1)``: the product, and so the model's function, does not change."""
    if scale == 1:
        return
    for module in model.modules():
        if isinstance(module, ExpandedLayer):
            for index, factor in enumerate(module.factors):
                factor.mul_(scale ** (1 - module.depth) if index == module.kernel_index else scale)


def _include(model: nn.Module, layers: str):
    if layers == "all":
        return None
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and max(m.kernel_size) > 1]


def _taps(method: Variant):
    return None if method.taps == "layers" else ["layer1", "layer2", "layer3"]


def run_one(job: tuple) -> dict:
    """Fine-tune one pruned model with one method and seed; returns its scores.

    With ``method.rounds`` > 1 the dense model is pruned in that many steps of torch-pruning's
    iterative schedule (:func:`fxlop.prune.prune_steps`) to the same final widths, the epochs split
    over the rounds, each round fine-tuned (and fused) before the next step ranks its channels.
    """
    setup, ratio, method, seed, epochs = job
    torch.set_num_threads(1)
    ctx = context(setup)
    torch.manual_seed(seed)
    loader = make_loader(ctx["bundle"].train, batch_size=setup.batch_size, shuffle=True, seed=seed)
    began = time.perf_counter()
    if method.rounds == 1:
        deployed, history, params_trained = _finetune_pruned(pruned_model(setup, ratio)[0].model, method, setup, seed,
                                                             loader, epochs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps = prune_steps(ctx["dense"], ctx["example"], ratio=ratio, steps=method.rounds)
            share, extra = divmod(epochs, method.rounds)
            history = []
            for index in range(method.rounds):
                step = next(steps)
                deployed, part, params_trained = _finetune_pruned(
                    step.model, method, setup, seed, loader, share + (extra if index == method.rounds - 1 else 0))
                step.model.load_state_dict(deployed.state_dict())
                history += part
    seconds = time.perf_counter() - began
    scores = {split: fxlop.evaluate(deployed, loader)["accuracy"] for split, loader in ctx["loaders"].items()}
    return {"ratio": ratio, "method": method.settings(), "seed": seed, "epochs": epochs,
            "val_accuracy": scores["val"], "test_accuracy": scores["test"], "seconds_per_epoch": seconds / epochs,
            "params_trained": params_trained, "params_deployed": sum(p.numel() for p in deployed.parameters()),
            "train_ce": [r["train_ce"] for r in history]}


def _finetune_pruned(pruned: nn.Module, method: Variant, setup: Setup, seed: int, loader, epochs: int):
    """``(deployed model, history, parameters trained)`` of one fine-tuning of ``pruned`` (not changed)."""
    dense = context(setup)["dense"]
    if method.method.lop:
        student = fxlop.expand(pruned, expansion=method.expansion, pointwise_expansion=method.pointwise_expansion,
                               depth=method.depth, init=method.init,
                               include=_include(pruned, method.layers), seed=seed)
        rescale_factors(student, method.outer_scale)
    else:
        student = copy.deepcopy(pruned)
    params_trained = sum(p.numel() for p in student.parameters())
    expanded_epochs = epochs if method.fuse_at is None else max(1, min(epochs - 1, round(epochs * method.fuse_at)))
    history = _train(student, loader, method, setup, seed, dense, epochs=expanded_epochs, schedule_epochs=epochs)
    deployed = fxlop.fuse(student) if method.method.lop else student
    if expanded_epochs < epochs:
        history += _train(deployed, loader, method, setup, seed, dense, epochs=epochs - expanded_epochs,
                          schedule_epochs=epochs, schedule_start=expanded_epochs)
    return deployed, history, params_trained


def _train(model, loader, method: Variant, setup: Setup, seed: int, dense, **schedule) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxlop.finetune(model, loader, teacher=dense if method.method.distills else None,
                              config=method.train_config(seed=seed, **schedule), device=setup.device,
                              progress=False).history


#: the methods the grid runs by default
GRID_DEFAULT = ("vanilla", "sp", "lop", "lop_sp", "lop_norm0.3", "lop_r1")


def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [run_one(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(run_one, jobs, chunksize=1)


def summarize(results: list[dict], key: str) -> dict:
    values = [100 * r[key] for r in results]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def sweep(setup: Setup, ratios, methods: dict[str, Variant], lrs, seeds, epochs, workers) -> tuple[dict, list]:
    """Best learning rate per (ratio, method) by mean validation accuracy."""
    jobs = [(setup, r, dataclasses.replace(m, lr=lr), s, epochs) for r in ratios for m in methods.values()
            for lr in lrs for s in seeds]
    results = run_all(jobs, workers)
    best = {}
    for ratio in ratios:
        for name in methods:
            by_lr = {lr: summarize([x for x in results if x["ratio"] == ratio and x["method"]["name"] == name
                                    and x["method"]["lr"] == lr], "val_accuracy")["mean"] for lr in lrs}
            best[(ratio, name)] = max(by_lr, key=by_lr.get)
    return best, results


def grid(args, setup: Setup) -> dict:
    """Every (ratio, budget, method) at its swept learning rate, and at the paper protocol's fixed rate."""
    began = time.perf_counter()
    context(setup)  # trains and caches the dense model before the workers start
    ratios, budgets, seeds = args.ratios, args.budgets, list(range(args.seeds))
    methods = {name: GRID[name] for name in args.methods}
    best, sweep_results = sweep(setup, ratios, methods, args.lrs, [100 + s for s in range(args.sweep_seeds)],
                                min(budgets), args.workers)
    jobs = [(setup, r, dataclasses.replace(methods[m], lr=best[(r, m)]), s, b)
            for r in ratios for b in budgets for m in methods for s in seeds]
    if args.paper_lr:
        jobs += [(setup, r, dataclasses.replace(methods[m], lr=args.paper_lr, name=f"{m}@paper"), s, b)
                 for r in ratios for b in (args.paper_budgets or [min(budgets)]) for m in methods for s in seeds]
    results = run_all(jobs, args.workers)
    rows = []
    for ratio in ratios:
        pruned, post = pruned_model(setup, ratio)
        macs, params = tp.utils.count_ops_and_params(pruned.model, context(setup)["example"])
        for budget in budgets:
            row = {"ratio": ratio, "epochs": budget, "post_prune_test": 100 * post["test"], "params": int(params),
                   "macs": float(macs), "widths": _widths(pruned.widths_after), "methods": {}, "paper": {}}
            for name in methods:
                for key, label, lr in (("methods", name, best[(ratio, name)]),
                                       ("paper", f"{name}@paper", args.paper_lr)):
                    runs = [x for x in results if x["ratio"] == ratio and x["epochs"] == budget
                            and x["method"]["name"] == label]
                    if runs:
                        row[key][name] = {"lr": lr, "test": summarize(runs, "test_accuracy"),
                                          "val": summarize(runs, "val_accuracy"),
                                          "seconds_per_epoch": statistics.median(x["seconds_per_epoch"] for x in runs),
                                          "params_trained": runs[0]["params_trained"]}
            rows.append(row)
    dense = context(setup)["dense"]
    return {"setup": dataclasses.asdict(setup), "machine": common.machine(), "seeds": seeds, "lrs": args.lrs,
            "paper_lr": args.paper_lr, "paper_budgets": args.paper_budgets or [min(budgets)], "workers": args.workers,
            "methods": {n: m.settings() for n, m in methods.items()},
            "dense_test": 100 * fxlop.evaluate(dense, context(setup)["loaders"]["test"])["accuracy"],
            "rows": rows, "runs": results, "sweep": sweep_results, "wall_time_s": time.perf_counter() - began}


def _widths(widths: dict) -> list[int]:
    """The distinct widths of the pruned model's conv/linear layers, in order (its stage widths),
    without the classifier."""
    return list(dict.fromkeys(list(widths.values())[:-1]))


def grid_markdown(combined: dict) -> str:
    """One table per dataset: each method at its swept rate, then all at the paper protocol's rate."""
    parts = []
    for result in combined["results"]:
        setup = result["setup"]
        names = list(result["rows"][0]["methods"])
        reference = ("" if setup["dataset"] != "mnist1d" else " (published references, Greydanus 2020: " +
                     ", ".join(f"{k} {v:g} %" for k, v in MNIST1D_REFERENCE.items()) + ")")
        parts.append(
            f"**{setup['model']} on {setup['dataset']}**, dense {result['dense_test']:.1f} % test accuracy"
            f"{reference}; test accuracy % after fine-tuning, mean ± std over {len(result['seeds'])} seeds, each "
            f"method at its best "
            f"learning rate (in brackets) from a sweep over {result['lrs']} ({_count(result['sweep'], 'seed')} "
            f"seed(s), {min(r['epochs'] for r in result['sweep'])} epochs) scored on a validation split. "
            f"Measured {result['machine']['date']} on {result['machine']['cpu']} ({result['workers']} worker "
            f"processes of 1 thread), {result['wall_time_s'] / 60:.0f} min. " + _widths_sentence(result["methods"]))
        parts.append(_rows_markdown(result["rows"], "methods", names, show_lr=True))
        if len({row["epochs"] for row in result["rows"]}) > 1:
            parts.append("Accuracy against wall time on this machine: test % (mean) after each budget, and the "
                         "seconds the fine-tuning took (median over seeds; expansion and fusion included; one "
                         "thread per run):")
            parts.append(_time_markdown(result["rows"], names))
        if result.get("paper_lr"):
            parts.append(f"Paper protocol: every method at one fixed learning rate of {result['paper_lr']:g} "
                         f"(as pruning papers fine-tune), same seeds.")
            parts.append(_rows_markdown([r for r in result["rows"] if r["paper"]], "paper", names, show_lr=False))
    return "\n\n".join(parts)


def _time_markdown(rows: list[dict], names: list[str]) -> str:
    lines = ["| R | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for ratio in dict.fromkeys(row["ratio"] for row in rows):
        budgets = sorted((row for row in rows if row["ratio"] == ratio), key=lambda row: row["epochs"])
        cells = [" → ".join(f"{row['methods'][n]['test']['mean']:.1f} in {_seconds(row, n):.0f} s" for row in budgets)
                 for n in names]
        lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seconds(row: dict, name: str) -> float:
    """Wall seconds of one fine-tuning of ``name`` at the row's budget."""
    return row["methods"][name]["seconds_per_epoch"] * row["epochs"]


def time_plot(combined: dict, path: Path) -> None:
    """Test accuracy against the wall time of the fine-tuning, one panel per dataset and ratio, one line per
    method through its budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = combined["results"]
    ratios = list(dict.fromkeys(row["ratio"] for row in results[0]["rows"]))
    figure, axes = plt.subplots(len(results), len(ratios), figsize=(4.2 * len(ratios), 3.6 * len(results)),
                                squeeze=False)
    for axes_row, result in zip(axes, results):
        names = list(result["rows"][0]["methods"])
        for axis, ratio in zip(axes_row, ratios):
            rows = sorted((r for r in result["rows"] if r["ratio"] == ratio), key=lambda r: r["epochs"])
            for name in names:
                axis.errorbar([_seconds(r, name) for r in rows], [r["methods"][name]["test"]["mean"] for r in rows],
                              yerr=[r["methods"][name]["test"]["std"] for r in rows], marker="o", capsize=2,
                              label=name)
            axis.set_xlabel("fine-tuning wall time (s, one thread)")
            axis.set_ylabel("test accuracy (%)")
            axis.set_title(f"{result['setup']['dataset']}, R={ratio} ({', '.join(str(r['epochs']) for r in rows)} ep)",
                           fontsize=9)
            axis.grid(alpha=0.3)
        axes_row[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _widths_sentence(methods: dict[str, dict]) -> str:
    """How wide each LOP method's factors were (runs recorded before ``pointwise_expansion`` existed
    expanded 1x1 convs and linears at ``expansion`` too)."""
    widths: dict[tuple, list[str]] = {}
    for name, method in methods.items():
        if method["lop"]:
            pointwise = method.get("pointwise_expansion") or method["expansion"]
            widths.setdefault((method["expansion"], pointwise), []).append(name)
    return " ".join(f"{', '.join(names)}: hidden widths r = {r:g}, on 1x1 convs and linears r = {p:g}."
                    for (r, p), names in widths.items())


def _count(runs: list[dict], key: str) -> int:
    return len({run[key] for run in runs})


def _rows_markdown(rows: list[dict], key: str, names: list[str], show_lr: bool) -> str:
    lines = ["| R | widths | epochs | after pruning | " + " | ".join(names) + " | params | MACs | s/epoch (" +
             "/".join(names) + ") |", "|" + "---|" * (7 + len(names))]
    for row in rows:
        scores = row[key]
        cells = [f"{scores[n]['test']['mean']:.1f} ± {scores[n]['test']['std']:.1f}"
                 + (f" ({scores[n]['lr']:g})" if show_lr else "") for n in names]
        best = max(names, key=lambda n: scores[n]["test"]["mean"])
        cells[names.index(best)] = f"**{cells[names.index(best)]}**"
        times = "/".join(f"{scores[n]['seconds_per_epoch']:.2f}" for n in names)
        lines.append(f"| {row['ratio']} | {'/'.join(map(str, row['widths']))} | {row['epochs']} | "
                     f"{row['post_prune_test']:.1f} | " + " | ".join(cells) +
                     f" | {row['params']:,} | {row['macs']:,.0f} | {times} |")
    return "\n".join(lines)


def grid_plot(combined: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = combined["results"]
    figure, axes = plt.subplots(len(results), 1, figsize=(max(7, 2.2 * len(results[0]["rows"])), 4 * len(results)),
                                squeeze=False)
    for axis, result in zip(axes[:, 0], results):
        rows = result["rows"]
        names = list(rows[0]["methods"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            means = [r["methods"][name]["test"]["mean"] for r in rows]
            stds = [r["methods"][name]["test"]["std"] for r in rows]
            axis.bar([j + i * width for j in range(len(rows))], means, width, yerr=stds, capsize=2, label=name)
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))],
                        [f"R={r['ratio']}\n{r['epochs']} ep" for r in rows])
        low = min(r["methods"][n]["test"]["mean"] - r["methods"][n]["test"]["std"] for r in rows for n in names)
        axis.set_ylim(max(0, low - 5), 100)
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"{result['setup']['model']} on {result['setup']['dataset']}: recovery after pruning "
                       f"(each method at its best lr)")
        axis.legend(ncol=min(len(names), 4), fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


#: variants the mechanism suggests (README, "How LOP changes the optimizer")
VARIANTS = {
    # every factor's rate divided by its gain: the kernel factor moves the product like plain
    # fine-tuning, each outer factor adds at most factor_lr_scale of that along the top direction
    "lop_norm0.1": Variant("lop_norm0.1", fxlop.METHODS["lop"], factor_lr="normalized", factor_lr_scale=0.1),
    "lop_norm0.3": Variant("lop_norm0.3", fxlop.METHODS["lop"], factor_lr="normalized", factor_lr_scale=0.3),
    "lop_norm1": Variant("lop_norm1", fxlop.METHODS["lop"], factor_lr="normalized", factor_lr_scale=1.0),
    "lop_fuse_half": Variant("lop_fuse_half", fxlop.METHODS["lop"], factor_lr_scale=0.5, fuse_at=0.5),
    # every hidden width equal to the layer's own (r = 1): LOP's first-order update map does not
    # depend on the widths (README, "How LOP changes the optimizer"); this measures what the rest is worth
    "lop_r1": Variant("lop_r1", fxlop.METHODS["lop"], factor_lr_scale=0.5, expansion=1, pointwise_expansion=1),
    "sp_rel0.1": Variant("sp_rel0.1", fxlop.METHODS["sp"], sp_weighting="relative", gamma=0.1),
    "sp_rel0.3": Variant("sp_rel0.3", fxlop.METHODS["sp"], sp_weighting="relative", gamma=0.3),
    "sp_rel1": Variant("sp_rel1", fxlop.METHODS["sp"], sp_weighting="relative", gamma=1.0),
    "lop_sp_rel0.3": Variant("lop_sp_rel0.3", fxlop.METHODS["lop_sp"], factor_lr_scale=0.5, sp_weighting="relative",
                            gamma=0.3),
}
#: what the grid can compare (``--methods``)
GRID = {**BASELINES, **VARIANTS}

#: the levers of the study, each a variant of a baseline (DESIGN.md: "known levers when LOP underperforms")
STUDY = {
    **BASELINES,
    **UNTUNED,
    **VARIANTS,
    "lop_balanced": Variant("lop_balanced", fxlop.METHODS["lop"], init="balanced"),
    "lop_factor_wd0": Variant("lop_factor_wd0", fxlop.METHODS["lop"], factor_weight_decay=0.0),
    "lop_r2": Variant("lop_r2", fxlop.METHODS["lop"], expansion=2),
    "lop_depth2": Variant("lop_depth2", fxlop.METHODS["lop"], depth=2),
    "lop_kxk": Variant("lop_kxk", fxlop.METHODS["lop"], layers="kxk"),
    "sp_stages": Variant("sp_stages", fxlop.METHODS["sp"], taps="stages", tap_reduction="sum"),
    "sp_gamma10000": Variant("sp_gamma10000", fxlop.METHODS["sp"], gamma=10000.0),
    "lop_factor_lr0.25": Variant("lop_factor_lr0.25", fxlop.METHODS["lop"], factor_lr_scale=0.25),
    "lop_factor_lr0.5_wd0": Variant("lop_factor_lr0.5_wd0", fxlop.METHODS["lop"], factor_lr_scale=0.5,
                                    factor_weight_decay=0.0),
    "lop_sp_gamma300": Variant("lop_sp_gamma300", fxlop.METHODS["lop_sp"], gamma=300.0),
}


def study(args, setups: list[Setup], names: list[str]) -> dict:
    """Each lever at one ratio and budget, scored on the validation split at its best learning rate,
    on every dataset; results accumulate in recovery_study.json by dataset and variant."""
    path = common.RESULTS / "recovery_study.json"
    previous = json.loads(path.read_text()) if path.exists() else {"datasets": {}}
    if "variants" in previous:  # the first study, digits only
        previous = {"datasets": {"digits": {"variants": previous["variants"]}}}
    seeds = list(range(args.seeds))
    ratio, epochs = args.ratios[0], args.budgets[0]
    for setup in setups:
        context(setup)
        record = previous["datasets"].setdefault(setup.dataset, {"variants": {}})
        record["setup"] = dataclasses.asdict(setup)
        for name in names:
            began = time.perf_counter()
            method = STUDY[name]
            jobs = [(setup, ratio, dataclasses.replace(method, lr=lr), s, epochs) for lr in args.lrs for s in seeds]
            results = run_all(jobs, args.workers)
            by_lr = {lr: summarize([r for r in results if r["method"]["lr"] == lr], "val_accuracy") for lr in args.lrs}
            best = max(by_lr, key=lambda lr: by_lr[lr]["mean"])
            chosen = [r for r in results if r["method"]["lr"] == best]
            test = summarize(chosen, "test_accuracy")
            record["variants"][name] = {
                "settings": method.settings(), "model": setup.model, "ratio": ratio, "epochs": epochs,
                "seeds": seeds, "val_by_lr": {str(lr): v for lr, v in by_lr.items()}, "best_lr": best,
                "val": by_lr[best], "test": test,
                "train_ce": [statistics.mean(r["train_ce"][e] for r in chosen) for e in range(epochs)],
                "seconds": time.perf_counter() - began, "machine": common.machine()}
            print(f"{setup.dataset:8s} {name:20s} best lr {best:<5g} val {by_lr[best]['mean']:.1f} ± "
                  f"{by_lr[best]['std']:.1f}  (test {test['mean']:.1f} ± {test['std']:.1f})  "
                  + "  ".join(f"{lr:g}: {v['mean']:.1f}" for lr, v in by_lr.items()), flush=True)
            common.RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(previous, indent=2) + "\n")
            (common.RESULTS / "recovery_study.md").write_text(study_markdown(previous) + "\n")
    return previous


def study_markdown(study_result: dict) -> str:
    """The lever study as one table, datasets side by side; best mean validation accuracy first."""
    datasets = study_result["datasets"]
    names = list(dict.fromkeys(n for d in datasets.values() for n in d["variants"]))

    def order(name):
        vals = [d["variants"][name]["val"]["mean"] for d in datasets.values() if name in d["variants"]]
        return (-len(vals), -statistics.mean(vals))

    defaults = Variant("x").settings()
    firsts = {ds: next(iter(d["variants"].values())) for ds, d in datasets.items()}
    lines = ["Every variant at its best learning rate by validation accuracy (test accuracy for reference, not used "
             "to choose); " + "; ".join(f"{ds}: {d.get('setup', {}).get('model', 'resnet20')}, R={f['ratio']}, "
                                        f"{f['epochs']} epochs, {len(f['seeds'])} seeds" for ds, (d, f) in
                                        ((ds, (datasets[ds], firsts[ds])) for ds in datasets)) + ".", "",
             "| variant | what changes | " + " | ".join(f"{ds}: best lr | {ds}: validation % | {ds}: test %"
                                                       for ds in datasets) + " |",
             "|---|---|" + "---|---|---|" * len(datasets)]
    for name in sorted(names, key=order):
        settings = next(d["variants"][name]["settings"] for d in datasets.values() if name in d["variants"])
        changed = {k: v for k, v in settings.items() if k not in ("name", "lr") and v != defaults.get(k)}
        cells = []
        for d in datasets.values():
            v = d["variants"].get(name)
            cells += (["", "", ""] if v is None else
                      [f"{v['best_lr']:g}", f"{v['val']['mean']:.1f} ± {v['val']['std']:.1f}",
                       f"{v['test']['mean']:.1f} ± {v['test']['std']:.1f}"])
        lines.append(f"| {name} | {', '.join(f'{k}={v}' for k, v in changed.items()) or 'plain fine-tuning'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def rounds_study(args, setups: list[Setup]) -> dict:
    """One prune -> fine-tune round against several with the same budget, at one ratio (R = 0.9):
    vanilla and LOP+SP, each at the learning rate the grid chose for it at that ratio (recovery.json),
    every seed on the same split."""
    grid_result = json.loads((common.RESULTS / "recovery.json").read_text()) if (
        common.RESULTS / "recovery.json").exists() else {"results": []}
    ratio, epochs, seeds = args.ratios[-1], max(args.budgets), list(range(args.seeds))
    rows = []
    for setup in setups:
        context(setup)
        chosen = {n: m["lr"] for r in grid_result.get("results", []) if r["setup"]["dataset"] == setup.dataset
                  for row in r["rows"] if row["ratio"] == ratio and row["epochs"] == min(args.budgets)
                  for n, m in row["methods"].items()}
        for name in ("vanilla", "lop_sp"):
            for rounds in (1, *args.rounds):
                method = dataclasses.replace(GRID[name], lr=chosen.get(name, 0.05), rounds=rounds)
                runs = run_all([(setup, ratio, method, s, epochs) for s in seeds], args.workers)
                rows.append({"dataset": setup.dataset, "model": setup.model, "method": name, "rounds": rounds,
                             "lr": method.lr, "ratio": ratio, "epochs": epochs, "params": runs[0]["params_deployed"],
                             "test": summarize(runs, "test_accuracy"), "val": summarize(runs, "val_accuracy"),
                             "runs": runs})
                print(f"{setup.dataset} {name} rounds {rounds}: test {rows[-1]['test']['mean']:.1f} ± "
                      f"{rows[-1]['test']['std']:.1f}", flush=True)
    return {"rows": rows, "seeds": seeds, "machine": common.machine()}


def rounds_markdown(result: dict) -> str:
    first = result["rows"][0]
    lines = [f"One round of prune -> fine-tune against several, same final widths and the same {first['epochs']} "
             f"epochs split over the rounds, R = {first['ratio']}; test accuracy %, mean ± std over "
             f"{len(result['seeds'])} seeds, each method at the rate the grid chose for it "
             f"(`python -m benchmarks.recovery --rounds-study`, {result['machine']['date']}).", "",
             "| model | method | rounds | lr | params | validation % | test % |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} on {row['dataset']} | {row['method']} | {row['rounds']} | {row['lr']:g} | "
                     f"{row['params']:,} | {row['val']['mean']:.1f} ± {row['val']['std']:.1f} | "
                     f"{row['test']['mean']:.1f} ± {row['test']['std']:.1f} |")
    return "\n".join(lines)


#: the model each embedded dataset is benchmarked with unless --model says otherwise
DEFAULT_MODELS = {"digits": "resnet20", "mnist1d": "cnn1d", "cifar10": "resnet56", "cifar100": "resnet56"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--model", default=None,
                        help="default: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items()))
    parser.add_argument("--data-dir")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--methods", nargs="+", default=list(GRID_DEFAULT), choices=list(GRID))
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--paper-lr", type=float, default=0.01,
                        help="also run every method at this one learning rate (0 to skip)")
    parser.add_argument("--paper-budgets", type=int, nargs="+", default=None,
                        help="budgets (epochs) the paper protocol runs at, among --budgets (default: the smallest)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sweep-seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny grid: checks that the script runs")
    parser.add_argument("--study", nargs="*", metavar="VARIANT",
                        help=f"run the lever study (at the first ratio and budget) instead of the grid; "
                             f"variants: {', '.join(STUDY)} (default all)")
    parser.add_argument("--rounds-study", action="store_true",
                        help="compare one prune -> fine-tune round with several (--rounds) at the last --ratios "
                             "value and the largest budget, instead of the grid")
    parser.add_argument("--rounds", type=int, nargs="+", default=[3], help="round counts for --rounds-study")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.ratios, args.budgets, args.seeds, args.sweep_seeds, args.lrs = [0.8], [1], 1, 1, [0.05, 0.1]
        args.dense_epochs = 1
        args.rounds, args.budgets = ([2], [2]) if args.rounds_study else (args.rounds, args.budgets)
    if args.rounds_study and max(args.budgets) < max(args.rounds):
        parser.error(f"--rounds-study: the budget of {max(args.budgets)} epochs cannot give {max(args.rounds)} rounds "
                     f"an epoch each")
    if args.paper_budgets and not set(args.paper_budgets) <= set(args.budgets):
        parser.error(f"--paper-budgets {args.paper_budgets} must be among --budgets {args.budgets}")
    unknown = [d for d in args.datasets if args.model is None and d not in DEFAULT_MODELS]
    if unknown:
        parser.error(f"no default model for {unknown}: pass --model")
    setups = [Setup(model=args.model or DEFAULT_MODELS[d], dataset=d, data_dir=args.data_dir,
                    image_size=args.image_size, dense_epochs=args.dense_epochs, device=args.device)
              for d in args.datasets]
    for method in (*(STUDY[n] for n in (args.study or STUDY)), *(GRID[n] for n in args.methods)):
        for lr in (*args.lrs, *([args.paper_lr] if args.paper_lr else [])):  # every setting checked before any run
            dataclasses.replace(method, lr=lr).train_config(epochs=max(args.budgets))
    if args.rounds_study:
        result = rounds_study(args, setups)
        table = rounds_markdown(result)
        common.write("recovery_rounds_quick" if args.quick else "recovery_rounds", result, table)
        print(table)
        return result
    if args.study is not None:
        if args.ratios == parser.get_default("ratios"):
            args.ratios = [0.8]
        return study(args, setups, args.study or list(STUDY))
    began = time.perf_counter()
    combined = {"results": [grid(args, setup) for setup in setups], "machine": common.machine()}
    combined["wall_time_s"] = time.perf_counter() - began
    name = args.name or ("recovery_quick" if args.quick else "recovery")
    table = grid_markdown(combined)
    common.write(name, combined, table)
    grid_plot(combined, common.RESULTS / f"{name}.png")
    time_plot(combined, common.RESULTS / f"{name}_time.png")
    print(table)
    return combined


if __name__ == "__main__":
    main()
