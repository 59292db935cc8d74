"""The main job: dense model -> prune -> (expand) -> fine-tune (+SP) -> fuse -> verify -> save."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from . import data as datasets
from . import models
from .core import expand, fuse
from .errors import FxlopError
from .prune import prune
from .reporting import plot_curves, table, write_json
from .train import TrainConfig, evaluate, finetune, init_distributed
from .verify import verify

METHODS = ("vanilla", "sp", "lop", "lop_sp")


@dataclasses.dataclass
class RunSettings:
    """Everything ``fxlop run`` does is decided here (the CLI flags map onto these fields)."""

    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    weights: str | None = None  # a saved dense model (whole module or state_dict); trained when None
    ratio: float = 0.8
    importance: str = "l2"
    global_pruning: bool = False
    iterative_steps: int = 1
    method: str = "lop_sp"
    baseline: bool = False  # also fine-tune the vanilla baseline with the same budget
    epochs: int = 10
    dense_epochs: int = 15
    lr: float = 0.05
    dense_lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    factor_weight_decay: float | None = None
    factor_lr_scale: float = 0.5
    gamma: float = 300.0
    taps: list[str] | None = None
    tap_reduction: str = "mean"
    expansion: float = 4
    mode: str = "online"
    depth: int = 3
    init: str = "orthogonal"
    val_fraction: float = 0.0
    seed: int = 0
    workers: int = 0
    bf16: bool = False
    device: str | None = None
    out: str = "runs/latest"
    json: str | None = None

    def check(self) -> None:
        if not 0 < self.ratio < 1:
            raise FxlopError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise FxlopError(f"--method must be one of {METHODS}, got {self.method!r}")
        for name in ("epochs", "dense_epochs", "batch_size"):
            if getattr(self, name) < (0 if name == "dense_epochs" else 1):
                raise FxlopError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def run(settings: RunSettings, *, progress: bool | None = None, echo=print) -> dict:
    """Run the whole job and return the report (also written to ``settings.out``/report.json).

    The fused model is saved (``model.pt``: the pruned architecture with the fine-tuned weights,
    loadable with plain ``torch.load``) only after :func:`fxlop.verify` passed against the
    trained expanded model.
    """
    settings.check()
    began = time.perf_counter()
    rank, world = init_distributed()
    main = rank == 0
    say = echo if main else (lambda *a, **k: None)
    out = Path(settings.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)

    bundle = datasets.load_dataset(
        settings.dataset, data_dir=settings.data_dir, download=settings.download, image_size=settings.image_size,
        channels=3 if models.is_torchvision_model(settings.model) else None, val_fraction=settings.val_fraction,
        split_seed=settings.seed)
    loader = lambda dataset, shuffle: datasets.make_loader(  # noqa: E731
        dataset, batch_size=settings.batch_size, shuffle=shuffle, seed=settings.seed, workers=settings.workers,
        distributed=world > 1)
    train_loader, test_loader = loader(bundle.train, True), loader(bundle.test, False)
    held_out = loader(bundle.val, False) if bundle.val is not None else test_loader
    device = torch.device(settings.device) if settings.device else None
    example = next(iter(test_loader))[0][:8]
    say(f"data: {bundle.name}, {len(bundle.train)} train / {len(bundle.test)} test images of "
        f"{tuple(bundle.input_shape)}, {bundle.num_classes} classes")

    in_channels = bundle.input_shape[0]
    if settings.weights:
        dense = models.load_model(settings.weights, arch=settings.model, num_classes=bundle.num_classes,
                                  in_channels=in_channels)
        dense_history = []
    else:
        torch.manual_seed(settings.seed)
        dense = models.build_model(settings.model, num_classes=bundle.num_classes, in_channels=in_channels)
        say(f"training the dense {settings.model} for {settings.dense_epochs} epochs")
        dense_history = finetune(dense, train_loader, epochs=settings.dense_epochs, lr=settings.dense_lr,
                                 weight_decay=settings.weight_decay, seed=settings.seed, device=device,
                                 progress=progress).history if settings.dense_epochs else []
    dense = dense.to(device or "cpu").eval()
    dense_accuracy = evaluate(dense, test_loader, device=device)["accuracy"]
    say(f"dense accuracy {100 * dense_accuracy:.2f} %")

    example = example.to(next(dense.parameters()).device)
    pruned = prune(dense, example, ratio=settings.ratio, importance=settings.importance,
                   global_pruning=settings.global_pruning, iterative_steps=settings.iterative_steps,
                   data=itertools.islice(train_loader, 4))
    post_prune_accuracy = evaluate(pruned.model, test_loader, device=device)["accuracy"]
    say(f"pruned {settings.ratio:.0%}: {pruned.params_before:,} -> {pruned.params_after:,} parameters, "
        f"accuracy {100 * post_prune_accuracy:.2f} %")

    methods = [settings.method] + (["vanilla"] if settings.baseline and settings.method != "vanilla" else [])
    results = {}
    for method in methods:
        say(f"fine-tuning: {method}, {settings.epochs} epochs")
        results[method] = _finetune_method(method, settings, dense, pruned.model, train_loader, held_out,
                                           test_loader, example, device, progress, out)
    chosen = results[settings.method]
    if main:
        torch.save(chosen.pop("deployed"), out / "model.pt")
        for other in results.values():
            other.pop("deployed", None)

    params_deployed, macs_deployed = chosen.pop("params_macs")
    for other in results.values():
        other.pop("params_macs", None)
    report = {
        "settings": dataclasses.asdict(settings),
        "data": {"name": bundle.name, "train": len(bundle.train), "test": len(bundle.test),
                 "val": len(bundle.val) if bundle.val is not None else 0, "input_shape": list(bundle.input_shape)},
        "dense_accuracy": dense_accuracy,
        "post_prune_accuracy": post_prune_accuracy,
        "finetuned_accuracy": chosen["accuracy"],
        "params": {"dense": pruned.params_before, "pruned": pruned.params_after, "fused": params_deployed},
        "macs": {"dense": pruned.macs_before, "pruned": pruned.macs_after, "fused": macs_deployed},
        "widths_pruned": pruned.widths_after,
        "unpruned_layers": pruned.unpruned,
        "methods": results,
        "dense_history": dense_history,
        "model_path": str(out / "model.pt"),
        "wall_time_s": time.perf_counter() - began,
    }
    if main:
        write_json(out / "report.json", report)
        if settings.json:
            write_json(settings.json, report)
        plot_curves(out / "curves.png", {m: r["history"] for m, r in results.items()}, dense_accuracy=dense_accuracy,
                    post_prune_accuracy=post_prune_accuracy,
                    title=f"{settings.model} on {bundle.name}, {settings.ratio:.0%} pruned")
        say("")
        say(summary_table(report))
        say(f"\nsaved {out / 'model.pt'}, {out / 'report.json'}, {out / 'curves.png'} "
            f"({report['wall_time_s']:.0f} s)")
    return report


def summary_table(report: dict) -> str:
    rows = [["dense", f"{100 * report['dense_accuracy']:.2f}", f"{report['params']['dense']:,}",
             f"{report['macs']['dense']:,.0f}"],
            ["pruned", f"{100 * report['post_prune_accuracy']:.2f}", f"{report['params']['pruned']:,}",
             f"{report['macs']['pruned']:,.0f}"]]
    for method, result in report["methods"].items():
        rows.append([f"fine-tuned: {method}", f"{100 * result['accuracy']:.2f}", f"{report['params']['fused']:,}",
                     f"{report['macs']['fused']:,.0f}"])
    return table(rows, ["model", "accuracy %", "params", "MACs"])


def _finetune_method(method, settings, dense, pruned, train_loader, held_out, test_loader, example, device,
                     progress, out) -> dict:
    lop = method in ("lop", "lop_sp")
    student = expand(pruned, expansion=settings.expansion, mode=settings.mode, depth=settings.depth,
                     init=settings.init, seed=settings.seed) if lop else copy.deepcopy(pruned)
    config = TrainConfig(epochs=settings.epochs, lr=settings.lr, weight_decay=settings.weight_decay,
                         factor_weight_decay=settings.factor_weight_decay, factor_lr_scale=settings.factor_lr_scale,
                         gamma=settings.gamma if method in ("sp", "lop_sp") else 0.0, taps=settings.taps,
                         tap_reduction=settings.tap_reduction, bf16=settings.bf16, seed=settings.seed)
    began = time.perf_counter()
    result = finetune(student, train_loader, teacher=dense, val_loader=held_out, config=config, device=device,
                      progress=progress, log_path=out / f"{method}.jsonl")
    seconds = time.perf_counter() - began
    deployed = copy.deepcopy(pruned)
    verified_error = None
    if lop:
        fused = fuse(student)
        verified_error = verify(student, fused, example)  # raises before anything is saved
        deployed.load_state_dict(fused.state_dict())
    else:
        deployed.load_state_dict(student.state_dict())
    deployed.eval()
    accuracy = evaluate(deployed, test_loader, device=device)["accuracy"]
    expanded = student.meta["fxlop"]["expand"] if lop else None
    return {
        "accuracy": accuracy, "history": result.history, "taps": result.taps, "train_time_s": seconds,
        "time_per_epoch_s": seconds / settings.epochs, "verify_max_relative_error": verified_error,
        "params_expanded": expanded["params_after"] if expanded else None,
        "deployed": deployed, "params_macs": _count(deployed, example),
    }


def _count(model: nn.Module, example) -> tuple[int, float]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(params), float(macs)
