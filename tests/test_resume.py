"""Checkpoints from a training loop of one's own: the state_dict of an expanded model (and of its
optimizer, built with fxlop.param_groups) saved mid-training loads into fxlop.expand(pruned, <same
options>) in a new process, and training continues exactly as it would have without the break.

The factors' names and shapes follow from the pruned model and the options alone; their values from the
seed and each layer's name (passes.linalg.generator), not from the process, the global RNG or Python's
hash seed, which the two processes set differently here.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from fxlop.prune import prune
from resume_worker import VARIANTS

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(phase, directory, hash_seed, torch_seed):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(WORKER), phase, str(directory), str(torch_seed)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _relative_difference(a: dict, b: dict) -> float:
    return max(((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)).item()
               for k in b if b[k].is_floating_point())


def test_a_checkpoint_continues_exactly_in_a_new_process(tmp_path, measured):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    pruned = prune(dense, torch.randn(2, 3, 8, 8), ratio=0.5).model
    torch.save(pruned, tmp_path / "pruned.pt")

    _run("first", tmp_path, hash_seed=1, torch_seed=0)
    _run("resume", tmp_path, hash_seed=2, torch_seed=12345)

    for way, kind in VARIANTS:
        name = f"{way}-{kind}"
        checkpoint = torch.load(tmp_path / f"{name}.ckpt")["model"]
        uninterrupted = torch.load(tmp_path / f"{name}.uninterrupted")
        resumed = torch.load(tmp_path / f"{name}.resumed")
        assert list(resumed["continued"]) == list(uninterrupted), name
        assert any(".factors." in key for key in checkpoint), name
        difference = _relative_difference(resumed["continued"], uninterrupted)
        measured(f"resume across processes ({name})", difference)
        # fp32 and the same operations in the same order: the same bits are expected; 1e-6 relative
        # leaves room for nothing but summation order
        assert difference <= 1e-6, (name, difference)
        # what was loaded mattered: the fresh expansion is far from the checkpoint, training moved on from
        # it, and continuing from the model's state with a new optimizer ends elsewhere
        assert _relative_difference(resumed["fresh"], checkpoint) > 1e-3, name
        assert _relative_difference(checkpoint, uninterrupted) > 1e-3, name
        control = _relative_difference(resumed["without_optimizer"], uninterrupted)
        measured(f"resume without the optimizer state ({name})", control)
        assert control > 1e-4, (name, control)
