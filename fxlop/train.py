"""Fine-tuning: cross-entropy + gamma * SP loss (and logit distillation), the loop of :func:`finetune` with its
batch and device checks, and :func:`evaluate`.  The settings, the optimizer and schedule, checkpoints and the
distributed setup are in :mod:`fxlop.settings`, :mod:`fxlop.optim`, :mod:`fxlop.checkpoint` and
:mod:`fxlop.distributed`; their public names are re-exported here for callers."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
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

from .checkpoint import CHECKPOINT_FORMAT, _gather_rng, _restore, _seed_everything, load_checkpoint, save_checkpoint
from .distill import Distiller, distiller, kd_loss
from .distributed import _average_buffers, _require_distributed_sampler, init_distributed
from .errors import FxlopError, raises_fxlop_errors
from .io import check_writable, write_text
from .optim import _steps_per_epoch, make_optimizer, make_scheduler, param_groups
from .passes import replaced
from .settings import FACTOR_LRS, OPTIMIZERS, SCHEDULES, SP_WEIGHTINGS, TrainOptions, renamed, setting

__all__ = ["finetune", "FinetuneResult", "evaluate", "check_device", "TeacherLogits", "fixed_inputs", "TrainOptions",
           "setting", "param_groups", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "init_distributed",
           "OPTIMIZERS", "SCHEDULES", "FACTOR_LRS", "SP_WEIGHTINGS"]


@dataclasses.dataclass
class FinetuneResult:
    model: nn.Module
    history: list[dict]
    taps: list[str]


@raises_fxlop_errors
def finetune(model: nn.Module, train_loader: DataLoader, *, teacher: nn.Module | None = None,
             val_loader: DataLoader | None = None, config: TrainOptions | None = None,
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
        config: a :class:`TrainOptions`; keyword ``options`` override its fields
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
    if config is not None and not isinstance(config, TrainOptions):
        raise FxlopError(f"finetune: config must be a fxlop.TrainOptions, got {type(config).__name__}")
    config = replaced(TrainOptions, config, options, lambda message: FxlopError(f"finetune: {message} (and "
                                                                               f"finetune's own arguments)"))
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
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
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


def _write_log(path, history: list[dict]) -> None:
    """Start the log over from the (restored) history, so it always matches the checkpoint."""
    write_text(path, "".join(json.dumps(record) + "\n" for record in history))


def _disable(show: bool | None) -> bool | None:
    return None if show is None else not show


def _device(device, world: int) -> torch.device:
    if device is not None:
        return check_device(device)
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


__getattr__ = renamed(globals(), {"TrainConfig": "TrainOptions"})
