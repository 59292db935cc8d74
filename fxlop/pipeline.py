"""The main job: dense model -> prune -> (expand) -> fine-tune (+SP) -> fuse -> verify -> save."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from passes.expand import check_options
from passes.tap import layer_names, match_names
from passes.trace import trace

from . import data as datasets
from . import models
from .core import expand, fuse
from .errors import FxlopError
from .prune import IMPORTANCES, prune
from .reporting import plot_curves, table, write_json
from .train import TrainConfig, evaluate, finetune, init_distributed
from .verify import verify

METHODS = ("auto", "vanilla", "sp", "lop", "lop_sp")
LOP_METHODS = ("lop", "lop_sp")
#: what ``--method auto`` fine-tunes and chooses from on the validation split
AUTO_CANDIDATES = ("vanilla", "sp", "lop_sp")
#: the model ``fxlop run`` uses for each embedded dataset unless ``--model`` says otherwise
DEFAULT_MODELS = {"mnist1d": "cnn1d"}
DEFAULT_MODEL = "resnet20"


@dataclasses.dataclass
class RunSettings:
    """Everything ``fxlop run`` does is decided here (the CLI flags map onto these fields)."""

    model: str | None = None  # None: cnn1d for mnist1d, resnet20 for every other dataset
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    weights: str | None = None  # a saved dense model (whole module or state_dict); trained when None
    ratio: float = 0.8
    importance: str = "l2"
    global_pruning: bool = False
    iterative_steps: int = 1
    method: str = "auto"
    candidates: list[str] = dataclasses.field(default_factory=lambda: list(AUTO_CANDIDATES))
    epochs: int = 10
    dense_epochs: int = 15
    lr: float = 0.05
    dense_lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    factor_weight_decay: float | None = None
    factor_lr_scale: float = 0.5
    factor_lr: str = "uniform"
    gamma: float = 0.3  # relative: SP starts at 0.3 x the cross-entropy (the recovery study's choice)
    sp_weighting: str = "relative"
    taps: list[str] | None = None
    tap_reduction: str = "mean"
    expansion: float = 4
    mode: str = "online"
    depth: int = 3
    init: str = "orthogonal"
    val_fraction: float = 0.2
    seed: int = 0
    workers: int = 0
    bf16: bool = False
    device: str | None = None
    out: str = "runs/latest"
    json: str | None = None

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS.get(self.dataset, DEFAULT_MODEL)

    @property
    def methods(self) -> list[str]:
        """The methods this run fine-tunes: the candidates for ``auto``, else the method and vanilla."""
        listed = self.candidates if self.method == "auto" else [self.method, "vanilla"]
        return list(dict.fromkeys(listed))

    def train_config(self, method: str, epochs: int | None = None) -> TrainConfig:
        """The fine-tuning settings of ``method`` (SP methods distill; the others do not)."""
        return TrainConfig(epochs=self.epochs if epochs is None else epochs, lr=self.lr,
                           weight_decay=self.weight_decay, factor_weight_decay=self.factor_weight_decay,
                           factor_lr_scale=self.factor_lr_scale, factor_lr=self.factor_lr,
                           gamma=self.gamma if method in ("sp", "lop_sp") else 0.0, sp_weighting=self.sp_weighting,
                           taps=self.taps, tap_reduction=self.tap_reduction, bf16=self.bf16, seed=self.seed)

    def check(self) -> None:
        """Validate every setting before any work starts; all problems in one FxlopError."""
        problems = []
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1):
            problems.append(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            problems.append(f"--method must be one of {METHODS}, got {self.method!r}")
        unknown = [c for c in self.candidates if c not in METHODS or c == "auto"]
        if unknown or not self.candidates:
            problems.append(f"--candidates must name methods among {METHODS[1:]}, got {self.candidates}")
        if self.method == "auto" and not self.val_fraction:
            problems.append("--method auto chooses on a validation split: --val-fraction must be > 0")
        for name in ("epochs", "batch_size", "iterative_steps"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("dense_epochs", "workers"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                problems.append(f"--{name.replace('_', '-')} must be an integer >= 0, got {getattr(self, name)}")
        if not (isinstance(self.dense_lr, (int, float)) and math.isfinite(self.dense_lr) and self.dense_lr > 0):
            problems.append(f"--dense-lr must be a finite number > 0, got {self.dense_lr}")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.importance not in IMPORTANCES:
            problems.append(f"--importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.dataset not in datasets.DATASETS:
            problems.append(f"unknown dataset {self.dataset!r}; known: {', '.join(datasets.DATASETS)}")
        elif not models.is_known_model(self.model_name):
            problems.append(models.unknown_model_message(self.model_name))
        elif (self.dataset in datasets.SIGNAL_DATASETS) != models.is_signal_model(self.model_name):
            kind = "1-D signals" if self.dataset in datasets.SIGNAL_DATASETS else "images"
            problems.append(f"dataset {self.dataset!r} holds {kind}; model {self.model_name!r} does not take them "
                            f"(1-D models: {', '.join(models.SIGNAL_MODELS)})")
        for check in (lambda: self.train_config("lop_sp").check(),
                      lambda: check_options(self.expansion, self.mode, self.depth, None, self.init)):
            try:
                check()
            except FxlopError as error:
                problems.append(str(error))
        try:
            resolve_device(self.device)
        except FxlopError as error:
            problems.append(str(error))
        if problems:
            raise FxlopError("; ".join(problems))


def resolve_device(device: str | None) -> torch.device:
    """The device ``fxlop run`` works on: the one asked for (checked), else CUDA when available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise FxlopError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FxlopError(f"--device {device}: CUDA is not available on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise FxlopError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    return resolved


def run(settings: RunSettings, *, progress: bool | None = None, echo=print) -> dict:
    """Run the whole job and return the report (also written to ``settings.out``/report.json).

    Every method of :attr:`RunSettings.methods` is fine-tuned with the same budget; ``vanilla``
    always is one of them.  ``--method auto`` deploys the one with the best validation accuracy
    (ties go to vanilla), so the deployed model is never worse than plain fine-tuning on the
    validation split; an explicit method is deployed as asked, with a warning when vanilla did
    better.  The deployed model is saved (``model.pt``: the pruned architecture with the
    fine-tuned weights, loadable with plain ``torch.load``) only after :func:`fxlop.verify` passed
    against the trained expanded model.
    """
    settings.check()
    began = time.perf_counter()
    rank, world = init_distributed()
    main = rank == 0
    say = echo if main else (lambda *a, **k: None)
    out = Path(settings.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)

    bundle = datasets.load_dataset(
        settings.dataset, data_dir=settings.data_dir, download=settings.download, image_size=settings.image_size,
        channels=3 if models.is_torchvision_model(settings.model_name) else None,
        val_fraction=settings.val_fraction, split_seed=settings.seed)
    loader = lambda dataset, shuffle: datasets.make_loader(  # noqa: E731
        dataset, batch_size=settings.batch_size, shuffle=shuffle, seed=settings.seed, workers=settings.workers,
        distributed=world > 1)
    train_loader, test_loader = loader(bundle.train, True), loader(bundle.test, False)
    val_loader = loader(bundle.val, False) if bundle.val is not None else None
    example = next(iter(test_loader))[0][:8].to(device)
    say(f"data: {bundle.name}, {len(bundle.train)} train / {len(bundle.val) if bundle.val is not None else 0} "
        f"validation / {len(bundle.test)} test inputs of {tuple(bundle.input_shape)}, {bundle.num_classes} classes; "
        f"device {device}")

    in_channels = bundle.input_shape[0]
    if settings.weights:
        dense = models.load_model(settings.weights, arch=settings.model_name, num_classes=bundle.num_classes,
                                  in_channels=in_channels)
    else:
        torch.manual_seed(settings.seed)
        dense = models.build_model(settings.model_name, num_classes=bundle.num_classes, in_channels=in_channels)
    _check_taps(dense, settings.taps)
    dense_history = []
    if not settings.weights and settings.dense_epochs:
        say(f"training the dense {settings.model_name} for {settings.dense_epochs} epochs")
        dense_history = finetune(dense, train_loader, epochs=settings.dense_epochs, lr=settings.dense_lr,
                                 weight_decay=settings.weight_decay, seed=settings.seed, device=device,
                                 progress=progress).history
    dense = dense.to(device).eval()
    dense_accuracy = evaluate(dense, test_loader, device=device)["accuracy"]
    say(f"dense accuracy {100 * dense_accuracy:.2f} %")

    pruned = prune(dense, example, ratio=settings.ratio, importance=settings.importance,
                   global_pruning=settings.global_pruning, iterative_steps=settings.iterative_steps,
                   data=itertools.islice(train_loader, 4))
    post_prune_accuracy = evaluate(pruned.model, test_loader, device=device)["accuracy"]
    say(f"pruned {settings.ratio:.0%}: {pruned.params_before:,} -> {pruned.params_after:,} parameters, "
        f"accuracy {100 * post_prune_accuracy:.2f} %")

    # expanded once, before anything fine-tunes: a refused or failing expansion ends the job here
    expanded = None
    if any(m in LOP_METHODS for m in settings.methods):
        expanded = expand(pruned.model, expansion=settings.expansion, mode=settings.mode, depth=settings.depth,
                          init=settings.init, seed=settings.seed)
        plan = expanded.meta["fxlop"]["expand"]
        say(f"expanded {len(plan['expanded'])} layers: {plan['params_before']:,} -> {plan['params_after']:,} "
            f"parameters for LOP's fine-tuning")
    results = {}
    for method in settings.methods:
        say(f"fine-tuning: {method}, {settings.epochs} epochs")
        student = copy.deepcopy(expanded if method in LOP_METHODS else pruned.model)
        results[method] = _finetune_method(method, settings, dense, pruned.model, student, train_loader,
                                           val_loader, test_loader, example, device, progress, out)
    chosen, why = _choose(settings, results)
    if why:
        say(why)
    deployed = results[chosen].pop("deployed")
    if main:
        torch.save(deployed, out / "model.pt")
    for other in results.values():
        other.pop("deployed", None)
    params_deployed, macs_deployed = _count(deployed, example)
    report = {
        "settings": dataclasses.asdict(settings),
        "model": settings.model_name,
        "device": str(device),
        "data": {"name": bundle.name, "train": len(bundle.train), "test": len(bundle.test),
                 "val": len(bundle.val) if bundle.val is not None else 0, "input_shape": list(bundle.input_shape)},
        "dense_accuracy": dense_accuracy,
        "post_prune_accuracy": post_prune_accuracy,
        "deployed": chosen,
        "selection": why or "as asked",
        "finetuned_accuracy": results[chosen]["accuracy"],
        "vanilla_accuracy": results["vanilla"]["accuracy"] if "vanilla" in results else None,
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
                    title=f"{settings.model_name} on {bundle.name}, {settings.ratio:.0%} pruned")
        say("")
        say(summary_table(report))
        say(f"\nsaved {out / 'model.pt'} ({chosen}), {out / 'report.json'}, {out / 'curves.png'} "
            f"({report['wall_time_s']:.0f} s)")
    return report


def _check_taps(model: nn.Module, taps: list[str] | None) -> None:
    """Refuse SP taps that name no layer of the dense model, before anything trains."""
    if not taps:
        return
    names = layer_names(trace(model))
    missing = [t for t in match_names(taps, names) if t not in names]
    if missing:
        raise FxlopError(f"--taps {missing} name no layer of the model (layers include {names[:8]})")


def _choose(settings: RunSettings, results: dict) -> tuple[str, str]:
    """The method to deploy and, when there is something to say about it, why."""
    def score(method):
        return results[method]["val_accuracy"]

    if settings.method != "auto":
        chosen = settings.method
        if chosen != "vanilla" and score("vanilla") is not None and score("vanilla") > score(chosen):
            return chosen, (f"warning: {chosen} reached {100 * score(chosen):.2f} % on the validation split, below "
                            f"vanilla's {100 * score('vanilla'):.2f} %; deploying {chosen} as asked "
                            f"(--method auto would deploy vanilla)")
        return chosen, ""
    ranked = sorted(results, key=lambda m: (score(m), m == "vanilla"), reverse=True)
    chosen = ranked[0]
    summary = ", ".join(f"{m} {100 * score(m):.2f} %" for m in ranked)
    return chosen, f"auto: deploying {chosen}, the best on the validation split ({summary}; ties go to vanilla)"


def summary_table(report: dict) -> str:
    rows = [["dense", "", f"{100 * report['dense_accuracy']:.2f}", f"{report['params']['dense']:,}",
             f"{report['macs']['dense']:,.0f}"],
            ["pruned", "", f"{100 * report['post_prune_accuracy']:.2f}", f"{report['params']['pruned']:,}",
             f"{report['macs']['pruned']:,.0f}"]]
    for method, result in report["methods"].items():
        mark = " (deployed)" if method == report["deployed"] else ""
        val = "" if result["val_accuracy"] is None else f"{100 * result['val_accuracy']:.2f}"
        rows.append([f"fine-tuned: {method}{mark}", val, f"{100 * result['accuracy']:.2f}",
                     f"{report['params']['fused']:,}", f"{report['macs']['fused']:,.0f}"])
    return table(rows, ["model", "validation %", "test %", "params", "MACs"])


def _finetune_method(method, settings, dense, pruned, student, train_loader, val_loader, test_loader, example,
                     device, progress, out) -> dict:
    lop = method in LOP_METHODS
    began = time.perf_counter()
    result = finetune(student, train_loader, teacher=dense, val_loader=val_loader or test_loader,
                      config=settings.train_config(method), device=device, progress=progress,
                      log_path=out / f"{method}.jsonl")
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
    expanded = student.meta["fxlop"]["expand"] if lop else None
    return {
        "accuracy": evaluate(deployed, test_loader, device=device)["accuracy"],
        "val_accuracy": evaluate(deployed, val_loader, device=device)["accuracy"] if val_loader is not None else None,
        "history": result.history, "taps": result.taps, "train_time_s": seconds,
        "time_per_epoch_s": seconds / settings.epochs, "verify_max_relative_error": verified_error,
        "params_expanded": expanded["params_after"] if expanded else None, "deployed": deployed,
    }


def _count(model: nn.Module, example) -> tuple[int, float]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(params), float(macs)
