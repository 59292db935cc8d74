"""The main job: dense model -> prune -> (expand) -> fine-tune (+SP) -> fuse -> verify -> save."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from .passes.expand import INITS, POINTWISE_EXPANSION, check_options
from .passes.expanded import MODES
from .passes.tap import layer_names, match_names
from .passes.trace import trace

from . import data as datasets
from . import models
from .core import expand, fuse
from .errors import FxlopError
from .io import check_directory_writable, check_writable, same_file, save
from .prune import IMPORTANCES, prune_steps
from .reporting import plot_curves, table, write_json
from .train import TrainConfig, check_device, evaluate, finetune, init_distributed, setting
from .verify import verify

METHODS = ("auto", "vanilla", "sp", "lop", "lop_sp")
LOP_METHODS = ("lop", "lop_sp")
SP_METHODS = ("sp", "lop_sp")
#: what ``--method auto`` fine-tunes and chooses from on the validation split
AUTO_CANDIDATES = ("vanilla", "sp", "lop_sp")
#: the model ``fxlop run`` uses for each embedded dataset unless ``--model`` says otherwise
DEFAULT_MODELS = {"mnist1d": "cnn1d"}
DEFAULT_MODEL = "resnet20"


@dataclasses.dataclass
class ExpandOptions:
    """How a run expands the pruned model for LOP (the options of :func:`fxlop.expand` it sets)."""

    expansion: float = setting(4, "width multiplier r of the hidden widths of layers with a spatial kernel")
    pointwise_expansion: float = setting(POINTWISE_EXPANSION, "r of 1x1 convs and linears (their middle factor grows "
                                                              "as r^2 times the weight)")
    mode: str = setting("online", "online: factors composed into one kernel in the graph; chain: one op per factor",
                        choices=MODES)
    depth: int = setting(3, "linear ops per expanded layer")
    init: str = setting("orthogonal", "orthonormal outer factors, or all factors at one spectral norm", choices=INITS)

    def check(self) -> None:
        check_options(self.expansion, self.mode, self.depth, None, self.init,
                      pointwise_expansion=self.pointwise_expansion)


def _run_training() -> TrainConfig:
    """The fine-tuning settings of ``fxlop run`` by default: the recovery study's choices."""
    return TrainConfig(epochs=10, lr=0.05, gamma=0.3, sp_weighting="relative")


@dataclasses.dataclass
class RunSettings:
    """Everything ``fxlop run`` does is decided here: its own fields, the fine-tuning settings
    (``train``, a :class:`TrainConfig`) and the expansion (``expand``, :class:`ExpandOptions`).
    The command line is built from these fields; :meth:`check` validates all of them before any work.

    ``train.epochs`` is the whole fine-tuning budget; with ``rounds`` > 1 it is split evenly over the
    rounds of prune -> fine-tune.  ``train.gamma`` applies to the SP methods only; ``seed`` seeds
    everything (data split, dense model, expansion, fine-tuning).
    """

    model: str | None = setting(None, f"resnet20, resnet56, vgg16 (CIFAR-style), cnn1d or resnet1d (1-D signals) or "
                                      f"any torchvision classification model name (default: {DEFAULT_MODEL}; "
                                      + ", ".join(f"{v} for {k}" for k, v in DEFAULT_MODELS.items()) + ")")
    weights: str | None = setting(None, "a saved dense model (whole module or state_dict) instead of training one")
    dataset: str = setting("digits", "digits or mnist1d (embedded), cifar10, cifar100, imagefolder")
    data_dir: str | None = setting(None, "directory holding the dataset (cifar10, cifar100, imagefolder)")
    download: bool = setting(False, "let torchvision download CIFAR (needs internet)")
    image_size: int | None = setting(None, "input side (digits: 16 or 32; imagefolder: 224)")
    val_fraction: float = setting(0.2, "validation split carved from the training data: chooses what --method auto "
                                       "deploys, and draws the per-epoch curves")
    ratio: float = setting(0.8, "channel pruning ratio in (0, 1)")
    importance: str = setting("l2", "channel importance", choices=IMPORTANCES)
    global_pruning: bool = setting(False, "rank channels across layers")
    iterative_steps: int = setting(1, "torch-pruning steps within one pruning")
    rounds: int = setting(1, "rounds of prune -> fine-tune -> fuse to reach --ratio, the budget split over them")
    method: str = setting("auto", "auto: fine-tune every --candidates method and deploy the best on the validation "
                                  "split; otherwise that method (vanilla always runs beside it, for comparison)",
                          choices=METHODS)
    candidates: list[str] = setting(list(AUTO_CANDIDATES), "the methods --method auto compares",
                                    choices=METHODS[1:])
    dense_epochs: int = setting(15, "epochs of training the dense model (without --weights)")
    dense_lr: float = setting(0.1, "learning rate of the dense training")
    batch_size: int = setting(128, "batch size")
    train: TrainConfig = dataclasses.field(default_factory=_run_training)
    expand: ExpandOptions = dataclasses.field(default_factory=ExpandOptions)
    seed: int = setting(0, "seed of everything: data split, dense model, expansion, fine-tuning")
    workers: int = setting(0, "data loader workers")
    device: str | None = setting(None, "cpu, cuda, cuda:1 (default: cuda when available)")
    out: str = setting("runs/latest", "directory for model.pt, report.json, curves.png, logs")
    json: str | None = setting(None, "also write the report to this file")

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS.get(self.dataset, DEFAULT_MODEL)

    @property
    def methods(self) -> list[str]:
        """The methods this run fine-tunes: the candidates for ``auto``, else the method and vanilla."""
        listed = self.candidates if self.method == "auto" else [self.method, "vanilla"]
        return list(dict.fromkeys(listed))

    def round_epochs(self) -> list[int]:
        """The fine-tuning epochs of each round: ``train.epochs`` split evenly, the remainder last."""
        share, extra = divmod(self.train.epochs, self.rounds)
        return [share] * (self.rounds - 1) + [share + extra]

    def train_config(self, method: str, epochs: int | None = None) -> TrainConfig:
        """The fine-tuning settings of ``method`` (SP methods distill; the others do not)."""
        return dataclasses.replace(self.train, epochs=self.train.epochs if epochs is None else epochs,
                                   gamma=self.train.gamma if method in SP_METHODS else 0.0, seed=self.seed)

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
        for name in ("batch_size", "iterative_steps", "rounds"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("dense_epochs", "workers"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                problems.append(f"--{name.replace('_', '-')} must be an integer >= 0, got {getattr(self, name)}")
        if isinstance(self.rounds, int) and isinstance(self.train.epochs, int) and self.train.epochs < self.rounds:
            problems.append(f"--epochs ({self.train.epochs}) must give every one of the {self.rounds} rounds an epoch")
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
        for check in (self.train.check, self.expand.check, lambda: resolve_device(self.device), self._check_paths):
            try:
                check()
            except FxlopError as error:
                problems.append(str(error))
        if problems:
            raise FxlopError("; ".join(problems))


    def _check_paths(self) -> None:
        """The paths a run reads and writes, checked before any work: --weights a file, --out a directory
        that a run may replace (missing, empty, or holding only a run's files) and can be written, --json
        a writable file outside --out."""
        if self.weights is not None:
            weights = Path(self.weights)
            if weights.is_dir():
                raise FxlopError(f"--weights {weights} is a directory, not a model file saved by torch.save")
            if not weights.is_file():
                raise FxlopError(f"--weights {weights} does not exist")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise FxlopError(f"--out {out} is a file, not a directory")
        if out.is_dir():
            foreign = [p.name for p in out.iterdir() if not _is_run_file(p)]
            if foreign:
                raise FxlopError(f"--out {out} holds files a run does not write ({', '.join(sorted(foreign)[:5])}): a "
                                 f"run replaces its --out directory as a whole, so give it a new or a run's directory")
        check_directory_writable(out.parent, "--out", shown=out)
        if self.weights is not None and out.resolve() in Path(self.weights).resolve().parents:
            raise FxlopError(f"--weights {self.weights} is inside --out {out}, which the run replaces as a whole: "
                             f"copy it elsewhere, or give the run another --out")
        if self.json is not None and self.weights is not None and same_file(self.json, self.weights):
            raise FxlopError(f"--json {self.json} is the --weights file: write the report to another file")
        if self.json is not None:
            check_writable(self.json, "--json")
            if out.resolve() in Path(self.json).resolve().parents:
                raise FxlopError(f"--json {self.json} is inside --out {out}, which the run replaces: the report is "
                                 f"in {out / 'report.json'} anyway")


def _is_run_file(path: Path) -> bool:
    """A file ``fxlop run`` writes into its --out directory."""
    return path.is_file() and (path.name in RUN_FILES or path.suffix == ".jsonl")


#: the files of a run's --out directory besides the per-method ``*.jsonl`` logs
RUN_FILES = ("model.pt", "report.json", "curves.png")


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
    return check_device(device, "--device")


def run(settings: RunSettings, *, progress: bool | None = None, echo=print) -> dict:
    """Run the whole job and return the report (also written to ``settings.out``/report.json).

    Every method of :attr:`RunSettings.methods` is fine-tuned with the same budget; ``vanilla``
    always is one of them.  ``--method auto`` deploys the one with the best validation accuracy
    (ties go to vanilla), so the deployed model is never worse than plain fine-tuning on the
    validation split; an explicit method is deployed as asked, with a warning when vanilla did
    better.  The deployed model is saved (``model.pt``: the pruned architecture with the
    fine-tuned weights, loadable with plain ``torch.load``) only after :func:`fxlop.verify` passed
    against the trained expanded model.

    Outputs: every file is written atomically (:mod:`fxlop.io`) into a fresh staging directory next to
    ``settings.out``, which replaces ``settings.out`` as a whole once the run is complete, so a used
    ``--out`` never mixes two runs.  A run that fails or is interrupted leaves its files in
    ``<out>.incomplete`` and ``--out`` as it was.  ``--out`` must be missing, empty or a run's
    directory (only ``model.pt``, ``report.json``, ``curves.png``, ``*.jsonl``).

    Args:
        settings: the run, validated by :meth:`RunSettings.check` before any work.
        progress: progress bars (default: when stderr is a terminal).
        echo: where the progress lines go.

    Returns:
        The report.

    Raises:
        FxlopError: a bad setting or path, a --weights model that is not a dense model of --model
            for the data (before any work), or a failure of the job.
        OSError: an output write failed (a full disk); ``--out`` is left as it was.
    """
    settings.check()
    rank, world = init_distributed()
    main = rank == 0
    final = Path(settings.out)
    if not main:
        return _run(settings, final, rank, world, progress, echo)
    # everything is written into a fresh staging directory next to --out, which replaces --out only
    # once the run is complete; a run that fails or is interrupted leaves it as <out>.incomplete
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-"))
    try:
        report = _run(settings, final, rank, world, progress, echo, staging=staging)
    except BaseException:
        if any(staging.iterdir()):  # what the run wrote, apart and marked; nothing written: nothing left
            incomplete = final.with_name(final.name + ".incomplete")
            shutil.rmtree(incomplete, ignore_errors=True)
            os.replace(staging, incomplete)
        else:
            staging.rmdir()
        raise
    _replace_directory(staging, final)
    return report


def _replace_directory(staging: Path, final: Path) -> None:
    """Put the complete ``staging`` directory at ``final``; an old ``final`` is removed only after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(final.with_name(final.name + ".incomplete"), ignore_errors=True)


def _run(settings: RunSettings, final: Path, rank: int, world: int, progress, echo, staging: Path | None = None):
    """The job of :func:`run`; rank 0 writes into ``staging``, the report names ``final``."""
    began = time.perf_counter()
    main = rank == 0
    say = echo if main else (lambda *a, **k: None)
    out = staging if staging is not None else final
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
        _check_weights(dense, settings, bundle, example)
    else:
        torch.manual_seed(settings.seed)
        dense = models.build_model(settings.model_name, num_classes=bundle.num_classes, in_channels=in_channels)
    _check_taps(dense, settings.train.taps)
    dense_history = []
    if not settings.weights and settings.dense_epochs:
        say(f"training the dense {settings.model_name} for {settings.dense_epochs} epochs")
        dense_history = finetune(dense, train_loader, epochs=settings.dense_epochs, lr=settings.dense_lr,
                                 weight_decay=settings.train.weight_decay, seed=settings.seed, device=device,
                                 progress=progress).history
    dense = dense.to(device).eval()
    dense_accuracy = evaluate(dense, test_loader, device=device)["accuracy"]
    say(f"dense accuracy {100 * dense_accuracy:.2f} %")

    # rounds of prune -> fine-tune (-> fuse): torch-pruning's iterative schedule, the fine-tuned weights
    # loaded back into its model between the steps, so that each step ranks channels by them
    steps = prune_steps(dense, example, ratio=settings.ratio, steps=settings.rounds * settings.iterative_steps,
                        importance=settings.importance, global_pruning=settings.global_pruning,
                        data=itertools.islice(train_loader, 4))
    rounds = []
    for index, epochs in enumerate(settings.round_epochs()):
        for _ in range(settings.iterative_steps):
            pruned = next(steps)
        post_prune_accuracy = evaluate(pruned.model, test_loader, device=device)["accuracy"]
        where = f"round {index + 1}/{settings.rounds}: " if settings.rounds > 1 else ""
        say(f"{where}pruned {1 - pruned.params_after / pruned.params_before:.0%} of the parameters: "
            f"{pruned.params_before:,} -> {pruned.params_after:,}, accuracy {100 * post_prune_accuracy:.2f} %")
        results = _finetune_methods(settings, epochs, dense, pruned.model, train_loader, val_loader, test_loader,
                                    example, device, progress, out, say, suffix=f"_round{index + 1}" if index else "")
        chosen, why = _choose(settings, results)
        if why:
            say(why)
        deployed = results[chosen]["deployed"]
        pruned.model.load_state_dict(deployed.state_dict())
        rounds.append({"round": index + 1, "epochs": epochs, "params": pruned.params_after,
                       "macs": pruned.macs_after, "widths": pruned.widths_after,
                       "post_prune_accuracy": post_prune_accuracy, "deployed": chosen,
                       "methods": {m: {"val_accuracy": r["val_accuracy"], "accuracy": r["accuracy"]}
                                   for m, r in results.items()}})
    if main:
        save(deployed, out / "model.pt")
    for result in results.values():
        result.pop("deployed", None)
    params_deployed, macs_deployed = _count(deployed, example)
    report = {
        "settings": dataclasses.asdict(settings),
        "model": settings.model_name,
        "device": str(device),
        "data": {"name": bundle.name, "train": len(bundle.train), "test": len(bundle.test),
                 "val": len(bundle.val) if bundle.val is not None else 0, "input_shape": list(bundle.input_shape)},
        "dense_accuracy": dense_accuracy,
        "post_prune_accuracy": post_prune_accuracy,
        "rounds": rounds,
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
        "model_path": str(final / "model.pt"),
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
        say(f"\nsaved {final / 'model.pt'} ({chosen}), {final / 'report.json'}, {final / 'curves.png'} "
            f"({report['wall_time_s']:.0f} s)")
    return report


def _check_weights(dense: nn.Module, settings: RunSettings, bundle, example: torch.Tensor) -> None:
    """Refuse a --weights model that is not a dense model of --model for this data, before any work:
    an expanded model (fuse it first), another architecture than --model (a whole module would
    otherwise override it silently), or a model that fails on the data or has the wrong output width."""
    from .passes.expanded import ExpandedLayer

    expanded = [n for n, m in dense.named_modules() if isinstance(m, ExpandedLayer)]
    if expanded:
        raise FxlopError(f"--weights {settings.weights} holds an expanded model ({len(expanded)} expanded layers, "
                         f"e.g. {expanded[0]}): pass the dense model, or fuse it first (fxlop fuse)")
    with torch.device("meta"):
        reference = models.build_model(settings.model_name, num_classes=bundle.num_classes,
                                       in_channels=bundle.input_shape[0])
    same_keys = set(dense.state_dict()) == set(reference.state_dict())
    if not same_keys or not (isinstance(dense, torch.fx.GraphModule) or type(dense) is type(reference)):
        flag = "--model" if settings.model else f"--model (default {settings.model_name})"
        raise FxlopError(f"--weights {settings.weights} holds a {type(dense).__name__}, not a {settings.model_name} "
                         f"({type(reference).__name__}): pass the {flag} it is"
                         + ("" if same_keys else " (its parameter names differ)"))
    try:
        with torch.no_grad():
            was_training = dense.training
            outputs = dense.eval()(example[:2].cpu())
            dense.train(was_training)
    except Exception as error:  # a model can fail in any way on inputs it does not take
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FxlopError(f"--weights {settings.weights} does not take {bundle.name}'s inputs of shape "
                         f"{tuple(bundle.input_shape)}: {type(error).__name__}: {detail[:300]}") from None
    if not (isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and outputs.shape[1] == bundle.num_classes):
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise FxlopError(f"--weights {settings.weights} gives outputs of shape {shape} for {bundle.name}, which has "
                         f"{bundle.num_classes} classes: expected (batch, {bundle.num_classes})")


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


def _finetune_methods(settings, epochs, dense, pruned, train_loader, val_loader, test_loader, example, device,
                      progress, out, say, suffix="") -> dict:
    """Every method of the run fine-tuned from ``pruned`` for ``epochs``; LOP methods start from one
    expansion, made before anything trains so that a refused expansion costs nothing."""
    expanded = None
    if any(m in LOP_METHODS for m in settings.methods):
        expanded = expand(pruned, **dataclasses.asdict(settings.expand), seed=settings.seed)
        plan = expanded.meta["fxlop"]["expand"]
        say(f"expanded {len(plan['expanded'])} layers: {plan['params_before']:,} -> {plan['params_after']:,} "
            f"parameters for LOP's fine-tuning")
    results = {}
    for method in settings.methods:
        say(f"fine-tuning: {method}, {epochs} epochs")
        student = copy.deepcopy(expanded if method in LOP_METHODS else pruned)
        results[method] = _finetune_method(method, settings, epochs, dense, pruned, student, train_loader,
                                           val_loader, test_loader, example, device, progress,
                                           out / f"{method}{suffix}.jsonl")
    return results


def _finetune_method(method, settings, epochs, dense, pruned, student, train_loader, val_loader, test_loader,
                     example, device, progress, log_path) -> dict:
    lop = method in LOP_METHODS
    began = time.perf_counter()
    result = finetune(student, train_loader, teacher=dense, val_loader=val_loader or test_loader,
                      config=settings.train_config(method, epochs), device=device, progress=progress,
                      log_path=log_path)
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
        "time_per_epoch_s": seconds / epochs, "verify_max_relative_error": verified_error,
        "params_expanded": expanded["params_after"] if expanded else None, "deployed": deployed,
    }


def _count(model: nn.Module, example) -> tuple[int, float]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(params), float(macs)
