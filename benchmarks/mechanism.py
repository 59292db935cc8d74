"""How LOP changes the optimizer, measured per layer on a pruned model, and what that does to training.

For a chain ``W = C B A`` with orthonormal ``C`` (rows) and ``A`` (columns), one SGD step of rate
``lr`` on the factors moves ``W`` by ``-lr (G + G W^T W + W W^T G)`` to first order (``G``: the
gradient plain fine-tuning would apply to ``W``); with per-factor rates ``m_k lr`` the three terms
weigh ``m_B``, ``m_C``, ``m_A``, and with outer factors scaled by ``t`` they weigh ``t^4``,
``1/t^2``, ``1/t^2`` (``passes.dynamics``).  This script measures, on the real pruned models of the
recovery benchmark (R = 0.8) and one real training batch:

- per layer, the gain range of LOP's preconditioner ``P`` relative to plain fine-tuning (its
  smallest and largest eigenvalue, by power iteration on ``P`` built from autograd);
- for the same batch, LOP's actual one-step change of every composed weight against plain
  fine-tuning's ``lr G``: the norm ratio, the cosine, and how far it is from the first-order
  formula at the real step size (the effects beyond first order);
- the training-loss curves of plain fine-tuning and of LOP at several init scales and factor
  learning rates (same lr, seeds, schedule).

    python -m benchmarks.mechanism                       # about 14 min on 2 cores
    python -m benchmarks.mechanism --quick               # seconds

Writes benchmarks/results/mechanism.json, mechanism.md and mechanism.png, which the docs' mechanism
page (docs/results/mechanism.md) includes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlop
from fxlop.data import make_loader
from fxlop.passes import ExpandedLayer, compose, factor_gains, gain_range, preconditioner

from . import common
from . import recovery


@dataclasses.dataclass(frozen=True)
class Config:
    """One way to train the factors: init scale of the outer factors and per-factor learning rates."""

    name: str
    outer_scale: float = 1.0
    factor_lr: str = "uniform"
    factor_lr_scale: float = 1.0


CONFIGS = [
    Config("t=1, factor lr 1"),
    Config("t=1, factor lr 0.5 (default)", factor_lr_scale=0.5),
    Config("t=1, factor lr 0.25", factor_lr_scale=0.25),
    Config("t=0.5, factor lr 1", outer_scale=0.5),
    Config("t=2, factor lr 1", outer_scale=2.0),
    Config("normalized, outer 0.3", factor_lr="normalized", factor_lr_scale=0.3),
]


def _layers(model: nn.Module) -> dict[str, ExpandedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpandedLayer)}


def _multipliers(model: nn.Module, config: Config) -> dict[str, list[float]]:
    """Each factor's learning rate relative to the base rate, as fxlop.param_groups sets it."""
    groups = fxlop.param_groups(model, lr=1.0, weight_decay=0.0, factor_lr_scale=config.factor_lr_scale,
                                factor_lr=config.factor_lr)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {name: [rate[id(f)] for f in layer.factors] for name, layer in _layers(model).items()}


def _loss(model, x, y):
    output = model(x)
    return F.cross_entropy(output[0] if isinstance(output, tuple) else output, y)


def measure_layers(pruned: nn.Module, batch, config: Config, lr: float, seed: int = 0) -> list[dict]:
    """Per expanded layer: the preconditioner's gain range and the measured one-step update on ``batch``."""
    x, y = batch
    compact = copy.deepcopy(pruned).train()
    _loss(compact, x, y).backward()
    vanilla = {n: m.weight.grad.detach().double() for n, m in compact.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    expanded = fxlop.expand(pruned, seed=seed).train()
    recovery.rescale_factors(expanded, config.outer_scale)
    _loss(expanded, x, y).backward()
    multipliers = _multipliers(expanded, config)
    rows = []
    for name, layer in _layers(expanded).items():
        factors = [f.detach().double() for f in layer.factors]
        args = (layer.groups, layer.kernel_index)
        weight = compose(factors, *args)
        gradient = vanilla[name]
        apply = preconditioner(factors, multipliers[name], *args)
        low, high = gain_range(apply, weight.shape, iterations=60, seed=seed)
        # LOP's real SGD step on the factors (its own gradients, the real rate), composed in float64
        stepped = [f - lr * m * p.grad.double() for f, m, p in zip(factors, multipliers[name], layer.factors)]
        actual = compose(stepped, *args) - weight
        first_order = -lr * apply(gradient)
        plain = -lr * gradient
        rows.append({
            "layer": name, "shape": list(weight.shape),
            "gains": factor_gains(factors, *args), "multipliers": multipliers[name],
            "gain_min": low, "gain_max": high,
            "update_ratio": float(actual.norm() / plain.norm()),
            "cosine": float((actual * plain).sum() / (actual.norm() * plain.norm())),
            "beyond_first_order": float((actual - first_order).norm() / first_order.norm()),
        })
    return rows


def curves(setup, ratio: float, config: Config, lr: float, seeds, epochs: int, workers: int) -> dict:
    """Training cross-entropy per epoch and accuracies, mean over seeds, of LOP trained with ``config``."""
    method = recovery.Variant(config.name, fxlop.METHODS["lop"], lr=lr, outer_scale=config.outer_scale,
                             factor_lr=config.factor_lr, factor_lr_scale=config.factor_lr_scale)
    return _curves(setup, ratio, method, seeds, epochs, workers)


def _curves(setup, ratio, method, seeds, epochs, workers) -> dict:
    runs = recovery.run_all([(setup, ratio, method, s, epochs) for s in seeds], workers)
    return {"train_ce": [statistics.mean(r["train_ce"][e] for r in runs) for e in range(epochs)],
            "val": recovery.summarize(runs, "val_accuracy"), "test": recovery.summarize(runs, "test_accuracy")}


def run(args) -> dict:
    began = time.perf_counter()
    datasets = []
    for dataset in args.datasets:
        setup = recovery.Setup(model=recovery.DEFAULT_MODELS[dataset], dataset=dataset, dense_epochs=args.dense_epochs)
        ctx = recovery.context(setup)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned, _ = recovery.pruned_model(setup, args.ratio)
        loader = make_loader(ctx["bundle"].train, batch_size=128, shuffle=True, seed=0)
        batch = next(iter(loader))
        torch.manual_seed(0)
        layers = {c.name: measure_layers(pruned.model, batch, c, args.lr) for c in CONFIGS}
        seeds = list(range(args.seeds))
        training = {"vanilla": _curves(setup, args.ratio, recovery.Variant("vanilla", lr=args.lr), seeds, args.epochs,
                                       args.workers)}
        for config in CONFIGS:
            training[config.name] = curves(setup, args.ratio, config, args.lr, seeds, args.epochs, args.workers)
            print(f"{dataset} {config.name}: train CE {training[config.name]['train_ce'][-1]:.3f}", flush=True)
        datasets.append({"dataset": dataset, "model": setup.model, "params": pruned.params_after,
                         "layers": layers, "training": training})
    return {"ratio": args.ratio, "lr": args.lr, "epochs": args.epochs, "seeds": args.seeds, "datasets": datasets,
            "machine": common.machine(), "wall_time_s": time.perf_counter() - began}


def markdown(result: dict) -> str:
    lines = [f"Pruned R = {result['ratio']}, one training batch of 128, lr {result['lr']:g} (plain fine-tuning's "
             f"best at R = 0.8 on both datasets); gains relative to plain fine-tuning's step `lr G`. Training: "
             f"{result['epochs']} epochs at that lr, {result['seeds']} seeds (mean). Measured "
             f"{result['machine']['date']}, {result['wall_time_s'] / 60:.0f} min.", "",
             "| model | factor training | layers | preconditioner gain: smallest (median over layers) | "
             "largest (median / max over layers) | measured update / plain (median) | cosine (median) | "
             "beyond first order (median) | train CE after 1 / last epoch | validation % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for data in result["datasets"]:
        plain = data["training"]["vanilla"]
        lines.append(f"| {data['model']} on {data['dataset']} | plain fine-tuning | | 1 | 1 / 1 | 1 | 1 | 0 | "
                     f"{plain['train_ce'][0]:.3f} / {plain['train_ce'][-1]:.3f} | "
                     f"{plain['val']['mean']:.1f} ± {plain['val']['std']:.1f} |")
        for name, rows in data["layers"].items():
            med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
            train = data["training"][name]
            lines.append(f"| | {name} | {len(rows)} | {med('gain_min'):.2f} | {med('gain_max'):.2f} / "
                         f"{max(r['gain_max'] for r in rows):.2f} | {med('update_ratio'):.2f} | {med('cosine'):.2f} | "
                         f"{med('beyond_first_order'):.3f} | {train['train_ce'][0]:.3f} / {train['train_ce'][-1]:.3f} | "
                         f"{train['val']['mean']:.1f} ± {train['val']['std']:.1f} |")
    default = CONFIGS[0].name
    for data in result["datasets"]:
        lines += ["", f"Per layer, {data['model']} on {data['dataset']}, {default}:", "",
                  "| layer | weight | factor gains `‖L_k‖²‖R_k‖²` | preconditioner gain range | update / plain | cosine |",
                  "|---|---|---|---|---|---|"]
        for r in data["layers"][default]:
            lines.append(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | "
                         f"{' / '.join(f'{g:.2f}' for g in r['gains'])} | {r['gain_min']:.2f} - {r['gain_max']:.2f} | "
                         f"{r['update_ratio']:.2f} | {r['cosine']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = result["datasets"]
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for axis, data in zip(axes[0], datasets):
        for name, train in data["training"].items():
            axis.plot(range(1, len(train["train_ce"]) + 1), train["train_ce"], marker="o", markersize=3,
                      label=name, linewidth=2.5 if name == "vanilla" else 1.2)
        axis.set(xlabel="epoch", ylabel="training cross-entropy", yscale="log",
                 title=f"{data['model']} on {data['dataset']}, R={result['ratio']}, lr {result['lr']:g}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"], choices=["digits", "mnist1d"])
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    name = "mechanism"
    if args.quick:
        args.epochs, args.seeds, args.dense_epochs, name = 1, 1, 1, "mechanism_quick"
    result = run(args)
    table = markdown(result)
    common.write(name, result, table)
    plot(result, common.RESULTS / f"{name}.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
