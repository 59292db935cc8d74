"""Fine-tuning: cross-entropy + gamma * SP loss, checkpoints that survive kill -9, DDP."""
from __future__ import annotations

import atexit
import copy
import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .passes.dynamics import factor_gains
from .passes.expanded import ExpandedLayer

from .distill import Distiller, distiller, kd_loss
from .errors import FxlopError
from .io import check_file, check_writable, save, write_text

CHECKPOINT_FORMAT = "fxlop-checkpoint/2"
OPTIMIZERS = ("sgd", "adamw")
#: per-epoch schedules (closed forms over the schedule's length) and torch's OneCycleLR, stepped per batch
SCHEDULES = ("cosine", "step", "multistep", "constant", "onecycle")
FACTOR_LRS = ("uniform", "normalized")
SP_WEIGHTINGS = ("absolute", "relative")


def setting(default, help: str, *, choices=None, cli: bool = True):
    """A dataclass field of a settings class, with what a command line needs to offer it
    (``fxlop.cli`` builds its flags from these)."""
    metadata = {"help": help, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Settings of :func:`finetune` (also stored in checkpoints).

    ``factor_weight_decay``/``factor_lr_scale``/``factor_lr`` apply to the factors of expanded layers
    (found by identity, see :func:`param_groups`): ``factor_weight_decay=0`` leaves them out of
    weight decay (decay on factors biases the product towards low rank); ``None`` means the same as
    ``weight_decay``.  ``factor_lr="uniform"`` trains every factor at ``lr * factor_lr_scale``;
    ``"normalized"`` divides each factor's rate further by the largest gain of its term in LOP's
    preconditioner (:func:`passes.dynamics.factor_gains`), so that the update of the product no
    longer depends on the arbitrary scale of the layer's weight.  The factors train at half the
    base rate by default: a chain of factors moves its product faster than one weight at the same
    rate (docs/theory.md, "How LOP changes the optimizer").
    ``gamma`` weighs the SP loss over ``taps`` (names or globs, default every conv/linear layer),
    averaged (or summed) over taps by ``tap_reduction``.  ``sp_weighting="relative"`` makes
    ``gamma`` a ratio: the SP term is scaled once, on the first training batch, to ``gamma`` times
    the cross-entropy there, so one value means the same on any model and dataset.

    ``kd_weight`` > 0 adds Hinton's logit distillation from the teacher
    (:func:`fxlop.distill.kd_loss` at ``kd_temperature``): the loss is ``(1 - kd_weight) * CE +
    kd_weight * KD (+ gamma * SP)``.  Without SP, the teacher's logits are computed once, in the first
    epoch, when the loader's dataset draws no augmentation (:func:`fixed_inputs`).

    Schedules: ``cosine`` (to 0), ``step`` (times ``step_gamma`` every ``step_size`` epochs),
    ``multistep`` (times ``step_gamma`` at each of the ``milestones``, shares of the schedule: the
    pruning papers' 60 % and 80 %), ``constant``, and ``onecycle``, torch's ``OneCycleLR`` stepped
    every batch: a warm-up over ``warmup_fraction`` of the schedule from ``lr / 25`` to ``lr`` (each
    parameter group to its own rate), then a cosine anneal to ``lr / 25e4``; momentum stays fixed.

    ``schedule_epochs`` (default ``epochs``) is the length of the learning-rate schedule and
    ``schedule_start`` the epoch of it this run begins at, so that two runs can share one schedule
    (fine-tune an expanded model for the first part, fuse it, finish the schedule on the fused model).
    """

    epochs: int = setting(10, "epochs of fine-tuning")
    optimizer: str = setting("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = setting(0.01, "base learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "weight decay")
    factor_weight_decay: float | None = setting(None, "weight decay of the LOP factors (default: --weight-decay)")
    factor_lr_scale: float = setting(0.5, "learning rate of the LOP factors relative to --lr (normalized: the "
                                          "outer factors' largest gain)")
    factor_lr: str = setting("uniform", "uniform: every factor at lr * scale; normalized: each divided by its gain in "
                                        "LOP's preconditioner", choices=FACTOR_LRS)
    schedule: str = setting("cosine", "learning-rate schedule", choices=SCHEDULES)
    schedule_epochs: int | None = setting(None, "length of the schedule (default: epochs)", cli=False)
    schedule_start: int = setting(0, "epoch of the schedule this run starts at", cli=False)
    step_size: int = setting(30, "epochs between the step schedule's decays")
    step_gamma: float = setting(0.1, "the decay factor of the step and multistep schedules")
    milestones: list[float] = setting([0.6, 0.8], "multistep: the shares of the schedule at which the rate decays "
                                                  "by --step-gamma")
    warmup_fraction: float = setting(0.3, "onecycle: the share of the schedule spent warming up to --lr")
    kd_weight: float = setting(0.0, "weight of Hinton's logit distillation from the teacher (the cross-entropy "
                                    "gets 1 - weight; 0: none)")
    kd_temperature: float = setting(4.0, "temperature of the logit distillation")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    gamma: float = setting(0.0, "weight of the SP distillation loss")
    taps: list[str] | None = setting(None, "layer names or globs for SP (default: every conv/linear layer)")
    tap_reduction: str = setting("mean", "how the SP losses of the taps combine", choices=("sum", "mean"))
    sp_weighting: str = setting("absolute", "relative: gamma is the SP / cross-entropy ratio on the first batch",
                                choices=SP_WEIGHTINGS)
    bf16: bool = setting(False, "bf16 autocast")
    seed: int = setting(0, "seed of the run", cli=False)

    def check(self) -> None:
        problems = []
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            problems.append(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.factor_lr not in FACTOR_LRS:
            problems.append(f"factor_lr must be one of {FACTOR_LRS}, got {self.factor_lr!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule_epochs is not None and not (isinstance(self.schedule_epochs, int) and self.schedule_epochs >= 1):
            problems.append(f"schedule_epochs must be a positive integer or None, got {self.schedule_epochs!r}")
        if not (isinstance(self.schedule_start, int) and self.schedule_start >= 0):
            problems.append(f"schedule_start must be an integer >= 0, got {self.schedule_start!r}")
        elif isinstance(self.epochs, int) and self.schedule_start + self.epochs > self.total_schedule_epochs:
            problems.append(f"schedule_start + epochs ({self.schedule_start} + {self.epochs}) runs past the end of the "
                            f"schedule ({self.total_schedule_epochs} epochs)")
        if self.sp_weighting not in SP_WEIGHTINGS:
            problems.append(f"sp_weighting must be one of {SP_WEIGHTINGS}, got {self.sp_weighting!r}")
        if not (isinstance(self.kd_weight, (int, float)) and 0 <= self.kd_weight <= 1):
            problems.append(f"kd_weight must be in [0, 1], got {self.kd_weight!r}")
        if not (isinstance(self.kd_temperature, (int, float)) and math.isfinite(self.kd_temperature)
                and self.kd_temperature > 0):
            problems.append(f"kd_temperature must be a finite number > 0, got {self.kd_temperature!r}")
        if not (isinstance(self.warmup_fraction, (int, float)) and 0 < self.warmup_fraction < 1):
            problems.append(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction!r}")
        if not (isinstance(self.milestones, (list, tuple)) and all(
                isinstance(m, (int, float)) and 0 < m < 1 for m in self.milestones)
                and list(self.milestones) == sorted(self.milestones)):
            problems.append(f"milestones must be increasing shares of the schedule in (0, 1), got {self.milestones!r}")
        for name in ("lr", "weight_decay", "gamma", "factor_lr_scale", "momentum"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.tap_reduction not in ("sum", "mean"):
            problems.append(f"tap_reduction must be 'sum' or 'mean', got {self.tap_reduction!r}")
        if problems:
            raise FxlopError("; ".join(problems))

    @property
    def total_schedule_epochs(self) -> int:
        return self.epochs if self.schedule_epochs is None else self.schedule_epochs


@dataclasses.dataclass
class FinetuneResult:
    model: nn.Module
    history: list[dict]
    taps: list[str]


def finetune(model: nn.Module, train_loader: DataLoader, *, teacher: nn.Module | None = None,
             val_loader: DataLoader | None = None, config: TrainConfig | None = None,
             log_path: str | os.PathLike | None = None, checkpoint_path: str | os.PathLike | None = None,
             resume: bool = False, device: str | torch.device | None = None, progress: bool | None = None,
             **options) -> FinetuneResult:
    """Fine-tune ``model`` in place with cross-entropy + ``gamma`` * SP loss against ``teacher``.

    The teacher is copied, frozen and run in eval mode under ``no_grad``.  ``teacher`` may also be a
    :class:`~fxlop.distill.Distiller` built by :func:`fxlop.distiller` whose student holds ``model``'s
    parameters: the way to distill into models ``torch.fx`` cannot trace (Hugging Face's), from their
    ``torch.export`` modules; ``config.taps``/``tap_reduction`` are then the distiller's own.  Under ``torchrun`` (the
    ``WORLD_SIZE`` environment variable above 1) the student runs in ``DistributedDataParallel``
    (nccl on CUDA, gloo on CPU), the loaders must use a ``DistributedSampler``, metrics are reduced
    across ranks and only rank 0 writes the log and checkpoints.

    Batches are ``(inputs, labels)``: ``inputs`` a tensor, or a mapping of keyword inputs (a Hugging
    Face batch such as ``{"input_ids": ..., "attention_mask": ...}``, passed as ``model(**inputs)``);
    the logits are the model's output, the first element of a tuple, or a mapping's ``"logits"``.

    Args:
        config: a :class:`TrainConfig`; keyword ``options`` override its fields
            (``finetune(m, loader, epochs=5, lr=0.05)``).
        log_path: JSON-lines file, one record of metrics per epoch.
        checkpoint_path: written atomically after every epoch (model with its graph, optimizer,
            scheduler, epoch, RNG states); a process killed at any moment leaves the last one whole.
        resume: continue from ``checkpoint_path`` if it exists (``model`` must have its structure).
        progress: tqdm bars per epoch and per batch; default: only when stderr is a terminal.

    Every batch is checked before its step: ``(inputs, labels)`` with integer class labels, as many as
    inputs, within the model's output width (one comparison per batch, so no step is ever taken on a
    bad batch; the steps of earlier, good batches stay taken).

    Returns:
        The trained ``model``, the per-epoch history and the SP taps used.

    Raises:
        FxlopError: an unknown option or a bad setting, a device that is not available (or ``meta``), an
            empty loader, a batch that is not ``(inputs, labels)`` with integer labels in range, an
            unwritable ``log_path``/``checkpoint_path``, a loss that is not finite; all but the last two
            kinds before any step.
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise FxlopError(f"finetune: config must be a fxlop.TrainConfig, got {type(config).__name__}")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise FxlopError(f"finetune: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"the options are finetune's arguments and the fields of TrainConfig: {', '.join(fields)}")
    config = dataclasses.replace(config or TrainConfig(), **options)
    config.check()
    if config.gamma > 0 and teacher is None:
        raise FxlopError("gamma > 0 needs a teacher for the SP loss")
    if config.kd_weight > 0 and teacher is None:
        raise FxlopError("kd_weight > 0 needs a teacher for the logit distillation")
    _check_loader(train_loader, "train_loader")
    steps_per_epoch = _steps_per_epoch(train_loader) if config.schedule == "onecycle" else None
    if val_loader is not None:
        _check_loader(val_loader, "val_loader")
    for name, path in (("log_path", log_path), ("checkpoint_path", checkpoint_path)):
        if path is not None:
            check_writable(path, name)
    rank, world = init_distributed()
    device = _device(device, world)
    _seed_everything(config.seed + rank)
    model.to(device)
    kd: Distiller | None = None
    forward_model: nn.Module = model
    if config.gamma > 0:
        kd = _own_distiller(teacher, model) if isinstance(teacher, Distiller) else distiller(
            teacher, model, config.taps, reduction=config.tap_reduction)
        kd.scale = None if config.sp_weighting == "relative" else 1.0
        kd.teacher.to(device)
        forward_model = kd.student
    logit_teacher = None
    if config.kd_weight > 0:
        logit_teacher = TeacherLogits(kd.teacher if kd is not None else _frozen(teacher, device),
                                      cache=kd is None and fixed_inputs(getattr(train_loader, "dataset", None)))
    if world > 1:
        _require_distributed_sampler(train_loader, "train_loader")
        forward_model = DistributedDataParallel(forward_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, steps_per_epoch)
    history: list[dict] = []
    start = 0
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        start, history, sp_scale = _restore(checkpoint_path, model, optimizer, scheduler, train_loader, device, rank,
                                            config)
        if kd is not None:
            kd.scale = sp_scale
    is_main = rank == 0
    if is_main and log_path is not None:
        _write_log(log_path, history)
    show = progress if is_main else False
    epochs = tqdm(range(start, config.epochs), desc="fine-tune", unit="epoch", disable=_disable(show),
                  initial=start, total=config.epochs)
    for epoch in epochs:
        began = time.perf_counter()
        metrics = _train_epoch(forward_model, kd, logit_teacher, train_loader, optimizer,
                               scheduler if steps_per_epoch else None, config, device, epoch, show)
        if world > 1:
            _average_buffers(model, world)
        if not steps_per_epoch:
            scheduler.step()
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"], **metrics}
        if kd is not None:
            record["sp_scale"] = kd.scale
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate(model, val_loader, device=device, bf16=config.bf16).items()})
        record["time_s"] = time.perf_counter() - began
        history.append(record)
        epochs.set_postfix(loss=f"{record['train_loss']:.3f}",
                           **({"val_acc": f"{record['val_accuracy']:.3f}"} if val_loader is not None else {}))
        rng = _gather_rng(train_loader, world) if checkpoint_path is not None else None
        if is_main:
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "format": CHECKPOINT_FORMAT, "model": model, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "config": dataclasses.asdict(config),
                    "history": history, "rng": rng, "taps": kd.names if kd else [],
                    "sp_scale": kd.scale if kd else None,
                })
            if log_path is not None:  # rewritten whole, atomically: a failed write leaves the last epoch's log
                _write_log(log_path, history)
    return FinetuneResult(model, history, kd.names if kd else [])


def _own_distiller(kd: Distiller, model: nn.Module) -> Distiller:
    """A distiller the caller built (e.g. from ``torch.export`` graphs of a Hugging Face model, which
    ``torch.fx`` cannot trace), checked to train ``model``: its student must hold ``model``'s parameters."""
    student = {id(p) for p in kd.student.parameters()}
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in student]
    if missing:
        raise FxlopError(f"the distiller passed as teacher does not train this model: its student lacks "
                         f"{len(missing)} of the model's parameters (e.g. {missing[:3]}); build it with "
                         f"fxlop.distiller(teacher, <the model or its torch.export module>)")
    return dataclasses.replace(kd)  # finetune sets its scale; the caller's distiller keeps its own


def evaluate(model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None,
             bf16: bool = False) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``loader``, in eval mode, without grad.

    With a ``DistributedSampler`` the counts are summed over ranks.  The model's train/eval
    flag is restored afterwards.

    Raises:
        FxlopError: ``device`` is not available, a batch is not ``(inputs, integer labels)`` or its
            labels are outside the model's outputs, or the loader yields no samples.
    """
    device = check_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for index, batch in enumerate(loader):
                where = f"evaluate, batch {index + 1}"
                x, loaded = _batch(batch, where)
                x, y = _to_device(x, device), loaded.to(device)
                logits = _logits(_call(model, x)).float()
                _check_labels(logits, y, where, loaded)
                n = len(y)  # dense outputs (a class per position) count each input once, its positions averaged
                totals += torch.stack([F.cross_entropy(logits, y, reduction="none").double().reshape(n, -1).mean(1).sum(),
                                       _correct(logits, y), torch.tensor(n, device=device).double()])
    finally:
        model.train(was_training)
    if isinstance(getattr(loader, "sampler", None), DistributedSampler) and dist.is_initialized():
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    if count == 0:
        raise FxlopError("evaluate: the loader yielded no samples")
    return {"accuracy": correct / count, "loss": loss / count, "samples": int(count)}


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Save a checkpoint atomically: ``torch.save`` through :func:`fxlop.io.atomic_write`.

    A temporary file in the same directory is fsynced and renamed over ``path``: readers (and a
    resume after kill -9) see the old checkpoint or the new one, never a torn file.

    Args:
        path: the checkpoint file.
        payload: what :func:`finetune` checkpoints (``format``, model and optimizer states, epoch, ...).

    Raises:
        OSError: the write failed (a full disk); the previous checkpoint is untouched.
    """
    save(payload, path)


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read a checkpoint written by :func:`finetune`.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded to, as for ``torch.load``.

    Returns:
        The checkpoint's payload.

    Raises:
        FxlopError: the file is missing, a directory, unreadable, not an fxlop checkpoint, or one of
            another format version.
    """
    path = check_file(path, "checkpoint", "a checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch.load raises many types on a corrupt file
        raise FxlopError(f"checkpoint {path} is unreadable: {type(error).__name__}: {error}") from error
    found = payload.get("format") if isinstance(payload, dict) else None
    if isinstance(found, str) and found.startswith("fxlop-checkpoint/") and found != CHECKPOINT_FORMAT:
        raise FxlopError(f"checkpoint {path} has format {found!r}, written by another version of fxlop; this "
                         f"version reads {CHECKPOINT_FORMAT!r}: start a new checkpoint")
    if found != CHECKPOINT_FORMAT:
        raise FxlopError(f"{path} is not an fxlop checkpoint")
    return payload


def _train_epoch(forward_model, kd, logit_teacher, loader, optimizer, batch_scheduler, config, device, epoch,
                 show) -> dict[str, float]:
    forward_model.train()
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    totals = torch.zeros(6, dtype=torch.float64, device=device)  # loss, ce, sp, kd, correct, count (sums)
    source = logit_teacher.batches(loader) if logit_teacher is not None else ((b, None) for b in loader)
    batches = tqdm(source, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=_disable(show),
                   total=_length(loader))
    for index, (batch, indices) in enumerate(batches):
        where = f"train_loader, epoch {epoch + 1}, batch {index + 1}"
        x, loaded = _batch(batch, where)
        x, y = _to_device(x, device, non_blocking=True), loaded.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            output = _call(forward_model, x)
            logits = _logits(output).float()
            _check_labels(logits, y, where, loaded)
            ce = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            sp = torch.zeros((), device=device)
            distilled = torch.zeros((), device=device)
            teacher_output = None
            if kd is not None:
                teacher_output = _call(kd.teacher, x)
                sp = kd.loss(output[1], teacher_output[1])
                if kd.scale is None:  # relative weighting: fixed on the first batch
                    kd.scale = _relative_sp_scale(ce, sp)
            if logit_teacher is not None:
                teacher_logits = logit_teacher.logits(x, indices, teacher_output)
                distilled = kd_loss(logits, teacher_logits, config.kd_temperature)
            loss = ((1 - config.kd_weight) * ce + config.kd_weight * distilled
                    + config.gamma * (kd.scale if kd is not None else 1.0) * sp)
        if not torch.isfinite(loss):
            raise FxlopError(f"the loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate or gamma")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        n = len(y)
        totals += torch.stack([loss.detach().double() * n, ce.detach().double() * n, sp.detach().double() * n,
                               distilled.detach().double() * n, _correct(logits, y),
                               torch.tensor(n, device=device).double()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, ce, sp, distilled, correct, count = totals.tolist()
    if count == 0:
        raise FxlopError(f"train_loader yielded no samples in epoch {epoch + 1}")
    return {"train_loss": loss / count, "train_ce": ce / count, "train_sp": sp / count, "train_kd": distilled / count,
            "train_accuracy": correct / count, "samples": int(count)}


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def fixed_inputs(dataset) -> bool:
    """Whether ``dataset`` gives the same inputs every time an index is read (draws no augmentation):
    a ``TensorDataset``, a dataset whose ``fixed_inputs`` attribute is true (fxlop's embedded data
    without augmentation), or a ``Subset`` of one.

    Args:
        dataset: a loader's dataset (or None).

    Returns:
        True where the teacher's outputs for an index can be computed once and kept.
    """
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset) or getattr(dataset, "fixed_inputs", False) is True


class TeacherLogits:
    """The teacher's logits for logit distillation, computed on every batch or, with ``cache``, once per
    input: in the first epoch, kept (float32, on the training device) by dataset index for the next.

    The cached run reads the same batches in the same order: the loader is re-made around a dataset
    that also returns each input's index, with the loader's own batch sampler, collate function,
    workers and generator (so its RNG draws are the loader's).
    """

    #: the most elements of teacher outputs kept (1 GiB of float32): above, logits are computed every batch
    MAX_CACHED = 2 ** 28

    def __init__(self, teacher: nn.Module, *, cache: bool):
        self.teacher, self.cache = teacher, cache
        self.size = 0
        self.store: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None

    def batches(self, loader):
        """``(batch, indices)`` pairs of one epoch of ``loader`` (indices None when nothing is cached)."""
        if not (self.cache and isinstance(loader, DataLoader) and loader.batch_sampler is not None):
            yield from ((b, None) for b in loader)
            return
        collate, self.size = loader.collate_fn, len(loader.dataset)
        indexed = DataLoader(_Indexed(loader.dataset), batch_sampler=loader.batch_sampler,
                             num_workers=loader.num_workers, collate_fn=lambda items: (
                                 collate([item for item, _ in items]), torch.tensor([i for _, i in items])),
                             pin_memory=loader.pin_memory, timeout=loader.timeout,
                             worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                             prefetch_factor=loader.prefetch_factor, persistent_workers=False)
        yield from indexed

    def logits(self, x, indices: torch.Tensor | None, teacher_output=None) -> torch.Tensor:
        """The teacher's float32 logits for the inputs ``x`` (of dataset ``indices``)."""
        if teacher_output is not None:
            return _logits(teacher_output).float()
        if indices is None or not self.cache:
            return self._run(x)
        if self.store is not None and bool(self.filled[indices.to(self.filled.device)].all()):
            return self.store[indices.to(self.store.device)]
        values = self._run(x)
        if self.store is None:
            if self.size * values[0].numel() > self.MAX_CACHED:
                self.cache = False
                return values
            self.store = values.new_zeros((self.size, *values.shape[1:]))
            self.filled = torch.zeros(self.size, dtype=torch.bool, device=values.device)
        where = indices.to(values.device)
        self.store[where] = values
        self.filled[where] = True
        return values

    def _run(self, x) -> torch.Tensor:
        with torch.no_grad():
            return _logits(_call(self.teacher, x)).float()  # a tapped teacher's (output, taps) included


class _Indexed(Dataset):
    """A dataset's items with their indices: ``(dataset[i], i)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index], index


def _frozen(teacher, device) -> nn.Module:
    """The teacher whose logits are distilled: a distiller's tapped teacher as it is, else a frozen copy
    in eval mode (the caller's teacher is not touched)."""
    if isinstance(teacher, Distiller):
        return teacher.teacher.to(device)
    frozen = copy.deepcopy(teacher).eval().to(device)
    for param in frozen.parameters():
        param.requires_grad_(False)
    return frozen


def _steps_per_epoch(loader) -> int:
    """The batches of one epoch, which a per-batch schedule (onecycle) needs in advance."""
    steps = _length(loader)
    if not steps:
        raise FxlopError("schedule 'onecycle' steps every batch and needs a train_loader with a length "
                         "(len(loader)); use another schedule for an iterable without one")
    return steps
def _correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The inputs classified right; with a class per position, each input's fraction of right positions."""
    return (logits.argmax(1) == y).double().reshape(len(y), -1).mean(1).sum()


def _relative_sp_scale(ce: torch.Tensor, sp: torch.Tensor) -> float:
    """The factor that makes the SP term equal the cross-entropy on this batch (averaged over ranks)."""
    values = torch.stack([ce.detach().float(), sp.detach().float()])
    if dist.is_initialized():
        dist.all_reduce(values)
    ce_value, sp_value = values.tolist()
    return ce_value / sp_value if sp_value > 0 else 1.0


def _average_buffers(model: nn.Module, world: int) -> None:
    """Give every rank the same buffers (BatchNorm statistics): DDP keeps parameters in step, but
    each rank updates its statistics on its own shard; floating buffers are averaged over ranks."""
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)
        else:
            dist.broadcast(buffer, src=0)


def _logits(output):
    """The logits in a model's output: the first of a tuple (a tapped student's ``(output, taps)``), the
    ``logits`` of a mapping (a Hugging Face ``ModelOutput``)."""
    output = output[0] if isinstance(output, tuple) else output
    return output["logits"] if isinstance(output, Mapping) else output


def _to_device(inputs, device, non_blocking: bool = False):
    """A batch's inputs on ``device``: a tensor, or a mapping of keyword inputs (``input_ids=``, ...)."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}
    return inputs.to(device, non_blocking=non_blocking)


def _check_loader(loader, name: str) -> None:
    """Refuse a loader that cannot give batches: not iterable, or of length 0."""
    if isinstance(loader, (torch.Tensor, np.ndarray, Mapping, str)) or not isinstance(loader, Iterable):
        raise FxlopError(f"{name} must be an iterable of (inputs, labels) batches such as a DataLoader, "
                         f"got {type(loader).__name__}")
    try:
        empty = len(loader) == 0
    except TypeError:  # an iterable without a length: an empty one is found at the end of the first epoch
        empty = False
    if empty:
        raise FxlopError(f"{name} is empty: it yields no batches")


def _batch(batch, where: str):
    """``(inputs, labels)`` of one batch, or FxlopError saying what the batch is instead."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise FxlopError(f"{where}: a batch must be a pair (inputs, labels), got {kind} (a dataset of bare tensors "
                         f"needs labels: TensorDataset(inputs, labels))")
    x, y = batch
    if not isinstance(x, (torch.Tensor, Mapping)):
        raise FxlopError(f"{where}: inputs must be a tensor or a mapping of keyword tensors, got {type(x).__name__}"
                         + (" (torch.from_numpy converts it)" if isinstance(x, np.ndarray) else ""))
    if not isinstance(y, torch.Tensor):
        raise FxlopError(f"{where}: labels must be a tensor of class indices, got {type(y).__name__}"
                         + (" (torch.from_numpy converts it)" if isinstance(y, np.ndarray) else ""))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise FxlopError(f"{where}: labels must be integer class indices, got dtype {y.dtype}")
    return x, y.long()


def _check_labels(logits: torch.Tensor, y: torch.Tensor, where: str, loaded: torch.Tensor | None = None) -> None:
    """Labels of the shape cross-entropy takes (``(N,)`` for outputs ``(N, C)``, ``(N, d...)`` for
    ``(N, C, d...)``) and within the output width, before any step.  The range is checked on
    ``loaded``, the labels as the loader gave them, where that is on the CPU (no device sync)."""
    expected = logits.shape[:1] + logits.shape[2:]
    if logits.dim() < 2 or y.shape != expected:
        raise FxlopError(f"{where}: {tuple(y.shape)} labels for model outputs of shape {tuple(logits.shape)}; "
                         f"expected one class index per input, labels of shape {tuple(expected)}")
    classes = logits.shape[1]
    labels = loaded if loaded is not None and loaded.device.type == "cpu" else y
    if bool(((labels < 0) | (labels >= classes)).any()):
        raise FxlopError(f"{where}: labels range over [{int(labels.min())}, {int(labels.max())}], outside the "
                         f"model's {classes} outputs (classes 0..{classes - 1})")


def check_device(device, what: str = "device") -> torch.device:
    """Check that ``device`` names a device that can run training here, without allocating on it.

    Args:
        device: a device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or a ``torch.device``.
        what: how the message names it (``"--device"``).

    Returns:
        ``device`` as a ``torch.device``.

    Raises:
        FxlopError: not a device, ``meta`` (where nothing can be trained), an index on the CPU, or not
            available (no CUDA, an index past the last GPU, a backend not built in).
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise FxlopError(f"{what} {device!r} is not a device (cpu, cuda, cuda:1, ...)") from error
    if resolved.type == "meta":
        raise FxlopError(f"{what} {device!r}: the meta device holds no data, nothing can be trained on it")
    if resolved.type == "cpu":
        if resolved.index not in (None, 0):
            raise FxlopError(f"{what} {device!r}: there is one CPU device, cpu (no index)")
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise FxlopError(f"{what} {device!r} is not available on this machine: CUDA is not available")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise FxlopError(f"{what} {device!r} is not available on this machine: it has {count} CUDA "
                             f"device{'s' if count != 1 else ''}")
        return resolved
    available = next((getattr(module, "is_available") for module in (getattr(torch, resolved.type, None),
                                                                     getattr(torch.backends, resolved.type, None))
                      if callable(getattr(module, "is_available", None))), None)
    if available is not None:
        if not available():
            raise FxlopError(f"{what} {device!r} is not available on this machine")
        return resolved
    try:  # a backend without is_available: one empty tensor tells
        torch.empty(0, device=resolved)
    except Exception as error:  # no driver, no such device, not compiled in: the backends raise many types
        raise FxlopError(f"{what} {device!r} is not available on this machine: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    return resolved


def _call(function, inputs):
    """``function(**inputs)`` for a mapping of keyword inputs, else ``function(inputs)``."""
    return function(**inputs) if isinstance(inputs, Mapping) else function(inputs)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, factor_lr_scale: float = 0.5,
                 factor_weight_decay: float | None = None, factor_lr: str = "uniform") -> list[dict]:
    """Optimizer parameter groups for a model that may hold expanded layers (any ``torch.optim`` optimizer).

    The factors of :class:`passes.ExpandedLayer` modules are found by identity (a parameter of your
    own named ``...factors...`` is not one); they train at ``lr * factor_lr_scale`` with
    ``factor_weight_decay`` (``None``: ``weight_decay``).  ``factor_lr="normalized"`` gives every
    factor a group of its own whose rate is further divided by its gain
    (:func:`passes.dynamics.factor_gains`, measured now on the current factors).  Every other
    trainable parameter gets ``lr`` and ``weight_decay``.  Empty groups are left out; each group
    carries a ``"name"`` (``"factors"``, ``"others"`` or ``"<layer>.factors.<k>"``).

    Example::

        optimizer = torch.optim.SGD(fxlop.param_groups(expanded, lr=0.05, weight_decay=5e-4), momentum=0.9)
    """
    if factor_lr not in FACTOR_LRS:
        raise FxlopError(f"factor_lr must be one of {FACTOR_LRS}, got {factor_lr!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("factor_lr_scale", factor_lr_scale),
                        ("factor_weight_decay", 0.0 if factor_weight_decay is None else factor_weight_decay)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise FxlopError(f"{name} must be a finite number >= 0, got {value!r}")
    factor_decay = weight_decay if factor_weight_decay is None else factor_weight_decay
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpandedLayer) and id(module) not in layers:
            layers[id(module)] = (name, module)
    factor_ids = {id(p) for _, layer in layers.values() for p in layer.factors}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
    groups = []
    if factor_lr == "uniform":
        factors = [p for _, layer in layers.values() for p in layer.factors if p.requires_grad]
        groups.append({"params": factors, "lr": lr * factor_lr_scale, "weight_decay": factor_decay, "name": "factors"})
    else:
        for name, layer in layers.values():
            gains = factor_gains(list(layer.factors), layer.groups, layer.kernel_index)
            for index, (param, gain) in enumerate(zip(layer.factors, gains)):
                if param.requires_grad:
                    scale = 1.0 if index == layer.kernel_index else factor_lr_scale
                    groups.append({"params": [param], "lr": lr * scale / max(gain, 1e-12),
                                   "weight_decay": factor_decay, "name": f"{name}.factors.{index}"})
    groups.append({"params": others, "lr": lr, "weight_decay": weight_decay, "name": "others"})
    return [g for g in groups if g["params"]]


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, lr=config.lr, weight_decay=config.weight_decay,
                          factor_lr_scale=config.factor_lr_scale, factor_weight_decay=config.factor_weight_decay,
                          factor_lr=config.factor_lr)
    if not groups:
        raise FxlopError("the model has no trainable parameters")
    fused = _fused_supported(p for group in groups for p in group["params"])
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused)


#: devices with torch's fused SGD/AdamW kernels
_FUSED_DEVICES = ("cpu", "cuda")


def _fused_supported(params) -> bool | None:
    """``True`` where torch's fused SGD/AdamW step can update ``params`` (one kernel per parameter; the
    default on a CPU loops over the update's ops tensor by tensor), else ``None`` (torch's own choice).
    An expanded model holds several times the pruned model's parameters: over the 16 M factors of an
    expanded MobileNetV2 the loop took 45 ms a step, the fused kernel 19 ms (one CPU thread)."""
    params = list(params)
    if params and all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params):
        return True
    return None


def _scheduler(optimizer, config: TrainConfig, steps_per_epoch: int | None = None):
    """The learning-rate schedule from epoch ``schedule_start`` of it on: torch's ``OneCycleLR`` stepped
    every batch (``steps_per_epoch`` of them), else per-epoch factors (``LambdaLR``) in closed form,
    so that a run can start part-way through a schedule."""
    total, start = config.total_schedule_epochs, config.schedule_start
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total * steps_per_epoch,
            pct_start=config.warmup_fraction, cycle_momentum=False)
        with warnings.catch_warnings():  # stepping before any optimizer step is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start * steps_per_epoch):
                scheduler.step()
        return scheduler
    milestones = [round(m * total) for m in config.milestones]

    def factor(epoch: int) -> float:
        at = epoch + start
        if config.schedule == "cosine":  # CosineAnnealingLR's closed form, eta_min = 0
            return 0.5 * (1 + math.cos(math.pi * min(at, total) / total))
        if config.schedule == "step":
            return config.step_gamma ** (at // config.step_size)
        if config.schedule == "multistep":  # MultiStepLR's closed form, milestones as shares of the schedule
            return config.step_gamma ** sum(at >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _restore(path, model, optimizer, scheduler, loader, device, rank, config: TrainConfig):
    """Load a checkpoint into the run; returns ``(epoch, history, sp_scale)``.  A checkpoint written
    with other settings is refused: resuming would keep its optimizer and schedule silently."""
    checkpoint = load_checkpoint(path, map_location=device)
    saved = checkpoint.get("config", {})
    changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(config).items() if saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise FxlopError(f"checkpoint {path} was written with other settings ({listed}); resume with the same "
                         f"settings, or start over with another checkpoint_path (or resume=False)")
    try:
        model.load_state_dict(checkpoint["model"].state_dict())
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise FxlopError(f"checkpoint {path} does not fit this model or optimizer: {error}") from error
    scheduler.load_state_dict(checkpoint["scheduler"])
    states = checkpoint.get("rng") or []
    if rank < len(states):
        _set_rng(states[rank], loader)
    return checkpoint["epoch"], list(checkpoint["history"]), checkpoint.get("sp_scale")


def _rng_state(loader) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _set_rng(state: dict, loader) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator = getattr(loader, "generator", None)
    if "loader" in state and generator is not None:
        generator.set_state(state["loader"].cpu())


def _gather_rng(loader, world: int) -> list[dict]:
    state = _rng_state(loader)
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_log(path, history: list[dict]) -> None:
    """Start the log over from the (restored) history, so it always matches the checkpoint."""
    write_text(path, "".join(json.dumps(record) + "\n" for record in history))


def _disable(show: bool | None) -> bool | None:
    return None if show is None else not show


def init_distributed() -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` this first joins the process group (nccl on CUDA,
    gloo on CPU), which is left again at exit.  Call it before building a ``DistributedSampler``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(_leave_group)
    return dist.get_rank(), dist.get_world_size()


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _device(device, world: int) -> torch.device:
    if device is not None:
        return check_device(device)
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _require_distributed_sampler(loader, name: str) -> None:
    if not isinstance(getattr(loader, "sampler", None), DistributedSampler):
        raise FxlopError(f"under torchrun, {name} must use a DistributedSampler "
                         f"(fxlop.data.make_loader(..., distributed=True))")
