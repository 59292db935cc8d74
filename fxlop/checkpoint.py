"""Checkpoints that survive kill -9: :func:`save_checkpoint` writes atomically, :func:`load_checkpoint`
reads and checks the format, and the RNG states (Python, NumPy, torch, CUDA, the loader's generator) are saved
per rank and restored on resume, so that a resumed run draws what the uninterrupted one would have."""
from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from .errors import FxlopError, raises_fxlop_errors
from .io import check_file, save
from .settings import TrainOptions

CHECKPOINT_FORMAT = "fxlop-checkpoint/2"


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


@raises_fxlop_errors
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


def _restore(path, model, optimizer, scheduler, loader, device, rank, config: TrainOptions):
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
