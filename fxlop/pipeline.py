"""The main job: dense model -> prune -> (expand) -> fine-tune (+SP) -> fuse -> verify -> save."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from .passes import ExpandedLayer, ExpandOptions, layer_names, match_names, report_of, trace, warn_caller

from . import data as datasets
from . import models
from .core import expand_with, fuse
from .errors import FxlopError, raises_fxlop_errors
from .io import UMASK, check_directory_writable, check_file, check_writable, same_file, save
from .methods import METHODS, Method
from .prune import IMPORTANCES, prune_steps
from .reporting import plot_curves, table, write_json
from .distributed import init_distributed
from .settings import TrainOptions, renamed, setting
from .train import check_device, evaluate, finetune
from .verify import verify

#: what ``--method`` accepts: ``auto`` and every method
METHOD_NAMES = ("auto", *METHODS)
#: what ``--method auto`` fine-tunes and chooses from on the validation split: vanilla and the recipes that
#: beat it somewhere after 10 epochs on fresh seeds (docs/results/recovery.md)
AUTO_CANDIDATES = ("vanilla", "sp", "lop_sp", "kd_sp")
#: the model ``fxlop run`` uses for each embedded dataset unless ``--model`` says otherwise
DEFAULT_MODELS = {"mnist1d": "cnn1d"}
DEFAULT_MODEL = "resnet20"


def _run_training() -> TrainOptions:
    """The fine-tuning settings of ``fxlop run`` by default: the recovery study's choices."""
    return TrainOptions(epochs=10, lr=0.05, gamma=0.3, sp_weighting="relative", kd_weight=0.5)


@dataclasses.dataclass
class RunOptions:
    """Everything ``fxlop run`` does is decided here: its own fields, the fine-tuning settings
    (``train``, a :class:`TrainOptions`) and the expansion (``expand``, :class:`ExpandOptions`).
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
                          choices=METHOD_NAMES)
    candidates: list[str] = setting(list(AUTO_CANDIDATES), "the methods --method auto compares",
                                    choices=tuple(METHODS))
    dense_epochs: int = setting(15, "epochs of training the dense model (without --weights)")
    dense_lr: float = setting(0.1, "learning rate of the dense training")
    batch_size: int = setting(128, "batch size")
    train: TrainOptions = dataclasses.field(default_factory=_run_training)
    #: the expansion of the LOP methods (its ``seed`` is the run's)
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

    def train_config(self, method: str, epochs: int | None = None) -> TrainOptions:
        """The fine-tuning settings of ``method`` (its losses, see :meth:`fxlop.methods.Method.train_config`)."""
        return METHODS[method].train_config(self.train, epochs=self.train.epochs if epochs is None else epochs,
                                            seed=self.seed)

    def check(self) -> None:
        """Validate every setting before any work starts.

        Raises:
            FxlopError: every problem found (a value out of range, an unknown name, a device not
                available, a path that cannot be read, written or replaced), in one message.
        """
        problems = []
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1):
            problems.append(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHOD_NAMES:
            problems.append(f"--method must be one of {METHOD_NAMES}, got {self.method!r}")
        unknown = [c for c in self.candidates if c not in METHODS]
        if unknown or not self.candidates:
            problems.append(f"--candidates must name methods among {tuple(METHODS)}, got {self.candidates}")
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
        if not isinstance(self.expand, ExpandOptions):
            problems.append(f"expand must be a fxlop.ExpandOptions, got {type(self.expand).__name__}")
        for check in (self.train.check, lambda: resolve_device(self.device), self._check_paths):
            try:
                check()
            except FxlopError as error:
                problems.append(str(error))
        if problems:
            raise FxlopError("; ".join(problems))


    def _check_paths(self) -> None:
        """The paths a run reads and writes, checked before any work: --weights a file, --out a directory
        that a run may replace (missing, empty, or a run's: holding its marker file) and can be written,
        --json a writable file outside --out."""
        if self.weights is not None:
            check_file(self.weights, "--weights", "a model file saved by torch.save")
        out = out_directory(self.out)
        problem = _unreplaceable(out)
        if problem:
            raise FxlopError(problem)
        incomplete = _incomplete(out)
        check_directory_writable(out.parent, "--out", shown=self.out)
        for flag, path in (("--weights", self.weights), ("--json", self.json)):
            if path is None:
                continue
            parents = Path(path).resolve().parents
            if out in parents:
                raise FxlopError(f"{flag} {path} is inside --out {self.out}, which the run replaces as a whole: "
                                 + ("copy it elsewhere, or give the run another --out" if flag == "--weights" else
                                    f"the report is in {out / 'report.json'} anyway"))
            if incomplete in parents:
                raise FxlopError(f"{flag} {path} is inside {incomplete}, which a failed run replaces: "
                                 f"move it elsewhere")
        if self.json is not None and self.weights is not None and same_file(self.json, self.weights):
            raise FxlopError(f"--json {self.json} is the --weights file: write the report to another file")
        if self.json is not None:
            check_writable(self.json, "--json")


#: the file a run writes into its directory: only a directory holding it is replaced by a later run
RUN_MARKER = ".fxlop-run"


def out_directory(out: str | os.PathLike) -> Path:
    """``--out`` resolved to an absolute path, refused where a run cannot replace it as a whole.

    Args:
        out: the ``--out`` setting.

    Returns:
        The resolved directory.

    Raises:
        FxlopError: an empty name, the file system root, the current directory or one of its parents,
            or a mount point (which cannot be renamed).
    """
    if out is None or not str(out).strip():
        raise FxlopError("--out is empty: name the directory a run writes")
    resolved = Path(out).resolve()
    if resolved == resolved.parent:
        raise FxlopError(f"--out {out} is the file system root: a run replaces its --out as a whole")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FxlopError(f"--out {out} is the current directory or one of its parents, which a run would replace "
                         f"as a whole: give it a new directory")
    if os.path.ismount(resolved):
        raise FxlopError(f"--out {out} is a mount point, which cannot be replaced: give it a directory inside")
    return resolved


def _unreplaceable(out: Path) -> str | None:
    """Why a run may not replace the directory ``out``, or None: it is missing, empty or a run's."""
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir() or out.is_symlink():
        return f"--out {out} is a file, not a directory"
    names = sorted(p.name for p in out.iterdir())
    if not names or RUN_MARKER in names:
        return None
    return (f"--out {out} holds files a run does not write ({', '.join(names[:5])}) and is not a run's directory "
            f"(no {RUN_MARKER}): a run replaces its --out directory as a whole, so give it a new or a run's directory")


def _incomplete(out: Path) -> Path:
    return out.with_name(out.name + ".incomplete")


def _is_run_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / RUN_MARKER).is_file()


def resolve_device(device: str | None) -> torch.device:
    """The device ``fxlop run`` works on: the one asked for, checked, else CUDA when available.

    Args:
        device: ``--device`` as typed (``"cpu"``, ``"cuda"``, ``"cuda:1"``), or None.

    Returns:
        The device.

    Raises:
        FxlopError: not a device, or not available here (see :func:`fxlop.train.check_device`).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device, "--device")


@raises_fxlop_errors
def run(settings: RunOptions, *, progress: bool | None = None, echo=print) -> RunReport:
    """Run the whole job and return the report (also written to ``settings.out``/report.json).

    Every method of :attr:`RunOptions.methods` is fine-tuned with the same budget; ``vanilla``
    always is one of them.  ``--method auto`` deploys the one with the best validation accuracy
    (ties go to vanilla), so the deployed model is never worse than plain fine-tuning on the
    validation split; an explicit method is deployed as asked, with a warning when vanilla did
    better.  The deployed model is saved (``model.pt``: the pruned architecture with the
    fine-tuned weights, loadable with plain ``torch.load``) only after :func:`fxlop.verify` passed
    against the trained expanded model.

    Outputs: every file is written atomically (:mod:`fxlop.io`) into a fresh staging directory next to
    ``settings.out``, which replaces ``settings.out`` as a whole once the run is complete, so a used
    ``--out`` never mixes two runs.  A run that fails or is interrupted leaves its files in
    ``<out>.incomplete`` (replacing only an earlier run's: one that is not is left alone, and the files
    stay in the staging directory, with a warning) and ``--out`` as it was.  ``--out`` must be missing,
    empty or a run's directory: one holding the marker file ``.fxlop-run`` that every run writes, so
    that a directory of one's own is never replaced, whatever files it holds.  It may not be the file
    system root, the current directory or one of its parents, or a mount point.  ``--json`` is written
    once ``--out`` is in place.

    Args:
        settings: the run, validated by :meth:`RunOptions.check` before any work.
        progress: progress bars (default: when stderr is a terminal).
        echo: where the progress lines go.

    Returns:
        The :class:`RunReport` (its JSON, :func:`fxlop.passes.as_dict` of it, is report.json).

    Raises:
        FxlopError: a bad setting or path, a --weights model that is not a dense model of --model
            for the data (before any work), or a failure of the job.
        OSError: an output write failed (a full disk); ``--out`` is left as it was.  (Putting the
            results at ``--out`` failing is an FxlopError that says where they are.)
    """
    settings.check()
    rank, world = init_distributed()
    main = rank == 0
    final = out_directory(settings.out)
    if not main:
        return _run(settings, final, rank, world, progress, echo)
    # everything is written into a fresh staging directory next to --out, which replaces --out only
    # once the run is complete; a run that fails or is interrupted leaves it as <out>.incomplete
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-"))
    os.chmod(staging, 0o777 & ~UMASK)  # mkdtemp's 0700 would become --out's
    (staging / RUN_MARKER).write_text("a directory written by fxlop run; a later run may replace it\n")
    try:
        report = _run(settings, final, rank, world, progress, echo, staging=staging)
    except BaseException:
        _keep_incomplete(staging, final)
        raise
    _replace_directory(staging, final)
    if settings.json:
        write_json(settings.json, report)
    echo(f"\nsaved {final / 'model.pt'} ({report.deployed}), {final / 'report.json'}, {final / 'curves.png'} "
         f"({report.wall_time_s:.0f} s)")
    return report


def _keep_incomplete(staging: Path, final: Path) -> None:
    """After a failure: what the run wrote becomes ``<out>.incomplete`` (nothing written: nothing left).
    A cleanup that fails itself leaves ``staging`` and warns, so that the run's own error is raised."""
    try:
        if not any(p.name != RUN_MARKER for p in staging.iterdir()):
            shutil.rmtree(staging)
            return
        incomplete = _incomplete(final)
        if _is_run_directory(incomplete):
            shutil.rmtree(incomplete)
        elif incomplete.exists() or incomplete.is_symlink():  # not a run's: left alone
            warn_caller(f"fxlop run: what the failed run wrote is left in {staging} ({incomplete} exists and is "
                        f"not a run's directory, so it was not replaced)")
            return
        os.replace(staging, incomplete)
    except OSError as error:
        warn_caller(f"fxlop run: what the failed run wrote is left in {staging} ({error})")


def _replace_directory(staging: Path, final: Path) -> None:
    """Put the complete ``staging`` directory at ``final``; an old ``final`` is removed only after.

    Raises:
        FxlopError: ``final`` changed since the check into something a run may not replace, or the
            renames failed; the message says where the results are.
    """
    problem = _unreplaceable(final)
    if problem:
        raise FxlopError(f"{problem} (it changed during the run); the results are in {staging}")
    old = None
    try:
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
            os.replace(final, old)
        os.replace(staging, final)
    except OSError as error:
        if old is not None and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)
        raise FxlopError(f"the results could not be put at {final} ({error.strerror or error}): they are in "
                         f"{staging}") from error
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    incomplete = _incomplete(final)
    if _is_run_directory(incomplete):
        shutil.rmtree(incomplete, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class DataSummary:
    """The data a run used."""
    name: str
    train: int
    test: int
    val: int
    input_shape: tuple[int, ...]


@dataclasses.dataclass
class MethodResult:
    """One fine-tuned method of a run: its scores, curves and costs; ``deployed`` is the fine-tuned
    model in the pruned architecture (not part of the JSON report)."""
    accuracy: float  #: test accuracy of the deployed model
    val_accuracy: float | None  #: on the validation split (None without one)
    history: list[dict]  #: the per-epoch records of :func:`fxlop.finetune`
    taps: list[str]  #: the SP taps
    train_time_s: float
    time_per_epoch_s: float
    verify_max_relative_error: float | None  #: LOP methods: expanded against fused
    params_expanded: int | None  #: LOP methods: parameters trained
    deployed: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False, metadata={"json": False})


@dataclasses.dataclass(frozen=True)
class RoundScore:
    val_accuracy: float | None
    accuracy: float


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One round of prune -> fine-tune."""
    round: int
    epochs: int
    params: int
    macs: float
    widths: dict[str, int]
    post_prune_accuracy: float
    deployed: str
    methods: dict[str, RoundScore]


@dataclasses.dataclass(frozen=True)
class Counts:
    dense: int | float
    pruned: int | float
    fused: int | float


@dataclasses.dataclass
class RunReport:
    """What :func:`run` did; ``report.json`` is :func:`fxlop.passes.as_dict` of it."""
    settings: RunOptions
    model: str
    device: str
    data: DataSummary
    dense_accuracy: float
    post_prune_accuracy: float
    rounds: list[RoundRecord]
    deployed: str  #: the method deployed
    selection: str  #: why
    finetuned_accuracy: float
    vanilla_accuracy: float | None
    params: Counts
    macs: Counts
    widths_pruned: dict[str, int]
    unpruned_layers: list[str]
    methods: dict[str, MethodResult]
    dense_history: list[dict]
    model_path: str
    wall_time_s: float


@dataclasses.dataclass
class _Job:
    """The state a run's steps pass on: each step reads what earlier ones set."""
    settings: RunOptions
    device: torch.device
    world: int
    progress: bool | None
    say: object
    out: Path
    began: float
    saved: object = None  # the --weights file's content
    bundle: object = None
    train_loader: object = None
    val_loader: object = None
    test_loader: object = None
    example: torch.Tensor | None = None
    dense: nn.Module | None = None
    dense_history: list = dataclasses.field(default_factory=list)
    dense_accuracy: float | None = None
    rounds: list[RoundRecord] = dataclasses.field(default_factory=list)
    pruned: object = None  # the last PruneResult
    post_prune_accuracy: float | None = None
    results: dict[str, MethodResult] = dataclasses.field(default_factory=dict)
    chosen: str = ""
    why: str = ""


def _run(settings: RunOptions, final: Path, rank: int, world: int, progress, echo,
         staging: Path | None = None) -> RunReport:
    """The job of :func:`run`, step by step; rank 0 writes into ``staging``, the report names ``final``."""
    main = rank == 0
    job = _Job(settings, resolve_device(settings.device), world, progress, echo if main else (lambda *a, **k: None),
               staging if staging is not None else final, time.perf_counter())
    torch.manual_seed(settings.seed)
    _read_weights(job)
    _load_data(job)
    _dense_model(job)
    _prune_and_finetune(job)
    if main:
        save(job.results[job.chosen].deployed, job.out / "model.pt")
    report = _report(job, final)
    if main:
        write_json(job.out / "report.json", report)
        plot_curves(job.out / "curves.png", {m: r.history for m, r in report.methods.items()},
                    dense_accuracy=report.dense_accuracy, post_prune_accuracy=report.post_prune_accuracy,
                    title=f"{settings.model_name} on {job.bundle.name}, {settings.ratio:.0%} pruned")
        job.say("")
        job.say(summary_table(report))
    return report


def _read_weights(job: _Job) -> None:
    """--weights, read and checked before the data are loaded."""
    if job.settings.weights:
        job.saved = models.read_model_file(job.settings.weights)
        if isinstance(job.saved, nn.Module):
            _check_weights_module(job.saved, job.settings)


def _load_data(job: _Job) -> None:
    settings = job.settings
    bundle = datasets.load_dataset(
        settings.dataset, data_dir=settings.data_dir, download=settings.download, image_size=settings.image_size,
        channels=3 if models.is_torchvision_model(settings.model_name) else None,
        val_fraction=settings.val_fraction, split_seed=settings.seed)

    def loader(dataset, shuffle):
        return datasets.make_loader(dataset, batch_size=settings.batch_size, shuffle=shuffle, seed=settings.seed,
                                    workers=settings.workers, distributed=job.world > 1)

    job.bundle = bundle
    job.train_loader, job.test_loader = loader(bundle.train, True), loader(bundle.test, False)
    job.val_loader = loader(bundle.val, False) if bundle.val is not None else None
    job.example = next(iter(job.test_loader))[0][:8].to(job.device)
    job.say(f"data: {bundle.name}, {len(bundle.train)} train / {len(bundle.val) if bundle.val is not None else 0} "
            f"validation / {len(bundle.test)} test inputs of {tuple(bundle.input_shape)}, {bundle.num_classes} "
            f"classes; device {job.device}")


def _dense_model(job: _Job) -> None:
    """The dense model: --weights, or built and trained; its test accuracy."""
    settings, bundle = job.settings, job.bundle
    in_channels = bundle.input_shape[0]
    if settings.weights:
        dense = models.model_from_saved(job.saved, settings.weights, arch=settings.model_name,
                                        num_classes=bundle.num_classes, in_channels=in_channels)
        _check_weights_data(dense, settings, bundle, job.example)
    else:
        torch.manual_seed(settings.seed)
        dense = models.build_model(settings.model_name, num_classes=bundle.num_classes, in_channels=in_channels)
    _check_taps(dense, settings.train.taps)
    if not settings.weights and settings.dense_epochs:
        job.say(f"training the dense {settings.model_name} for {settings.dense_epochs} epochs")
        job.dense_history = finetune(dense, job.train_loader, epochs=settings.dense_epochs, lr=settings.dense_lr,
                                     weight_decay=settings.train.weight_decay, seed=settings.seed, device=job.device,
                                     progress=job.progress).history
    job.dense = dense.to(job.device).eval()
    job.dense_accuracy = evaluate(job.dense, job.test_loader, device=job.device)["accuracy"]
    job.say(f"dense accuracy {100 * job.dense_accuracy:.2f} %")


def _prune_and_finetune(job: _Job) -> None:
    """Rounds of prune -> fine-tune (-> fuse): torch-pruning's iterative schedule, the deployed weights
    loaded back into its model between the steps, so that each step ranks channels by them."""
    settings = job.settings
    steps = prune_steps(job.dense, job.example, ratio=settings.ratio, steps=settings.rounds * settings.iterative_steps,
                        importance=settings.importance, global_pruning=settings.global_pruning,
                        data=itertools.islice(job.train_loader, 4))
    for index, epochs in enumerate(settings.round_epochs()):
        for _ in range(settings.iterative_steps):
            job.pruned = next(steps)
        pruned = job.pruned
        job.post_prune_accuracy = evaluate(pruned.model, job.test_loader, device=job.device)["accuracy"]
        where = f"round {index + 1}/{settings.rounds}: " if settings.rounds > 1 else ""
        job.say(f"{where}pruned {1 - pruned.params_after / pruned.params_before:.0%} of the parameters: "
                f"{pruned.params_before:,} -> {pruned.params_after:,}, accuracy {100 * job.post_prune_accuracy:.2f} %")
        job.results = _finetune_methods(job, pruned.model, epochs, suffix=f"_round{index + 1}" if index else "")
        job.chosen, job.why = _choose(settings, job.results)
        if job.why:
            job.say(job.why)
        pruned.model.load_state_dict(job.results[job.chosen].deployed.state_dict())
        job.rounds.append(RoundRecord(index + 1, epochs, pruned.params_after, pruned.macs_after, pruned.widths_after,
                                      job.post_prune_accuracy, job.chosen,
                                      {m: RoundScore(r.val_accuracy, r.accuracy) for m, r in job.results.items()}))


def _report(job: _Job, final: Path) -> RunReport:
    settings, bundle, pruned, results = job.settings, job.bundle, job.pruned, job.results
    params_deployed, macs_deployed = _count(results[job.chosen].deployed, job.example)
    return RunReport(
        settings=settings, model=settings.model_name, device=str(job.device),
        data=DataSummary(bundle.name, len(bundle.train), len(bundle.test),
                         len(bundle.val) if bundle.val is not None else 0, tuple(bundle.input_shape)),
        dense_accuracy=job.dense_accuracy, post_prune_accuracy=job.post_prune_accuracy, rounds=job.rounds,
        deployed=job.chosen, selection=job.why or "as asked", finetuned_accuracy=results[job.chosen].accuracy,
        vanilla_accuracy=results["vanilla"].accuracy if "vanilla" in results else None,
        params=Counts(pruned.params_before, pruned.params_after, params_deployed),
        macs=Counts(pruned.macs_before, pruned.macs_after, macs_deployed),
        widths_pruned=pruned.widths_after, unpruned_layers=pruned.unpruned, methods=results,
        dense_history=job.dense_history, model_path=str(final / "model.pt"),
        wall_time_s=time.perf_counter() - job.began)


def _check_weights_module(dense: nn.Module, settings: RunOptions) -> None:
    """Refuse a --weights module that is not a dense model of --model, before the data are loaded:
    an expanded model (fuse it first), or another architecture than --model (a whole module would
    otherwise override it silently)."""
    expanded = [n for n, m in dense.named_modules() if isinstance(m, ExpandedLayer)]
    if expanded:
        raise FxlopError(f"--weights {settings.weights} holds an expanded model ({len(expanded)} expanded layers, "
                         f"e.g. {expanded[0]}): pass the dense model, or fuse it first (fxlop fuse)")
    reference_type, reference_keys = _reference(settings.model_name)
    same_keys = set(dense.state_dict()) == reference_keys
    if not same_keys or not (isinstance(dense, torch.fx.GraphModule) or type(dense) is reference_type):
        flag = "--model" if settings.model else f"--model (default {settings.model_name})"
        raise FxlopError(f"--weights {settings.weights} holds a {type(dense).__name__}, not a {settings.model_name} "
                         f"({reference_type.__name__}): pass the {flag} it is"
                         + ("" if same_keys else " (its parameter names differ)"))


def _reference(name: str) -> tuple[type, set[str]]:
    """The class and the state_dict key names of the model ``name`` (neither depends on the classes
    or the input channels): built on the meta device, or on the CPU where the model cannot be built
    there (torchvision's RegNets copy tensors in their constructor)."""
    in_channels = 1 if models.is_signal_model(name) else 3
    try:
        with torch.device("meta"):
            reference = models.build_model(name, num_classes=10, in_channels=in_channels)
    except FxlopError:
        raise
    except Exception:  # noqa: BLE001 - a constructor can fail on meta in any way; the CPU build tells
        try:
            reference = models.build_model(name, num_classes=10, in_channels=in_channels)
        except FxlopError:
            raise
        except Exception as error:
            raise FxlopError(f"--model {name} cannot be built to compare --weights with: "
                             f"{type(error).__name__}: {error}") from error
    return type(reference), set(reference.state_dict())


def _check_weights_data(dense: nn.Module, settings: RunOptions, bundle, example: torch.Tensor) -> None:
    """Refuse a --weights model that fails on the data or has the wrong output width, before any work."""
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


def _choose(settings: RunOptions, results: dict) -> tuple[str, str]:
    """The method to deploy and, when there is something to say about it, why."""
    def score(method):
        return results[method].val_accuracy

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


def summary_table(report: RunReport) -> str:
    """The terminal table of a run: dense, pruned and every fine-tuned method."""
    params, macs = report.params, report.macs
    rows = [["dense", "", f"{100 * report.dense_accuracy:.2f}", f"{params.dense:,}", f"{macs.dense:,.0f}"],
            ["pruned", "", f"{100 * report.post_prune_accuracy:.2f}", f"{params.pruned:,}", f"{macs.pruned:,.0f}"]]
    for method, result in report.methods.items():
        mark = " (deployed)" if method == report.deployed else ""
        val = "" if result.val_accuracy is None else f"{100 * result.val_accuracy:.2f}"
        rows.append([f"fine-tuned: {method}{mark}", val, f"{100 * result.accuracy:.2f}", f"{params.fused:,}",
                     f"{macs.fused:,.0f}"])
    return table(rows, ["model", "validation %", "test %", "params", "MACs"])


def _finetune_methods(job: _Job, pruned: nn.Module, epochs: int, suffix: str = "") -> dict[str, MethodResult]:
    """Every method of the run fine-tuned from ``pruned`` for ``epochs``; LOP methods start from one
    expansion, made before anything trains so that a refused expansion costs nothing."""
    settings = job.settings
    methods = [METHODS[name] for name in settings.methods]
    expanded = None
    if any(method.lop for method in methods):
        expanded = expand_with(pruned, dataclasses.replace(settings.expand, seed=settings.seed))
        plan = report_of(expanded).expand
        job.say(f"expanded {len(plan.expanded)} layers: {plan.params_before:,} -> {plan.params_after:,} "
                f"parameters for LOP's fine-tuning")
    results = {}
    for method in methods:
        job.say(f"fine-tuning: {method.name}, {epochs} epochs")
        student = copy.deepcopy(expanded if method.lop else pruned)
        results[method.name] = _finetune_method(job, method, pruned, student, epochs,
                                                job.out / f"{method.name}{suffix}.jsonl")
    return results


def _finetune_method(job: _Job, method: Method, pruned: nn.Module, student: nn.Module, epochs: int,
                     log_path: Path) -> MethodResult:
    """Fine-tune ``student`` (a copy of ``pruned``, expanded for LOP) by ``method``; the result's deployed
    model has ``pruned``'s architecture, fused and verified for LOP."""
    val_loader, test_loader, device = job.val_loader, job.test_loader, job.device
    began = time.perf_counter()
    result = finetune(student, job.train_loader, teacher=job.dense, val_loader=val_loader or test_loader,
                      config=job.settings.train_config(method.name, epochs), device=device, progress=job.progress,
                      log_path=log_path)
    seconds = time.perf_counter() - began
    deployed = copy.deepcopy(pruned)
    verified_error = None
    if method.lop:
        fused = fuse(student)
        verified_error = verify(student, fused, job.example)  # raises before anything is saved
        deployed.load_state_dict(fused.state_dict())
    else:
        deployed.load_state_dict(student.state_dict())
    deployed.eval()
    expanded = report_of(student).expand if method.lop else None
    return MethodResult(
        accuracy=evaluate(deployed, test_loader, device=device)["accuracy"],
        val_accuracy=evaluate(deployed, val_loader, device=device)["accuracy"] if val_loader is not None else None,
        history=result.history, taps=result.taps, train_time_s=seconds, time_per_epoch_s=seconds / epochs,
        verify_max_relative_error=verified_error, params_expanded=expanded.params_after if expanded else None,
        deployed=deployed)


def _count(model: nn.Module, example) -> tuple[int, float]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(params), float(macs)


__getattr__ = renamed(globals(), {"RunSettings": "RunOptions"})
