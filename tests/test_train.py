import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import fxlop
from fxlop.train import CHECKPOINT_FORMAT, TrainOptions, finetune, load_checkpoint, save_checkpoint

JOB = Path(__file__).parent / "jobs" / "train_job.py"
sys.path.insert(0, str(JOB.parent))
from train_job import Blobs, Net  # noqa: E402


def _run(args, timeout=240, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kwargs)


def _loader(batch=16):
    return DataLoader(Blobs(), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_short_finetune_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    student = fxlop.expand(Net(4))
    result = finetune(student, _loader(), teacher=Net(12), gamma=5.0, epochs=6, lr=0.05, val_loader=_loader(),
                      log_path=tmp_path / "log.jsonl")
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.history[-1]["val_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert all(r["train_sp"] > 0 for r in result.history)
    assert result.taps == ["conv1", "conv2", "fc"]
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [1, 2, 3, 4, 5, 6] and logged == result.history


def test_odd_batches_bf16_adamw_and_factor_groups():
    student = fxlop.expand(Net(4))
    config = TrainOptions(epochs=1, optimizer="adamw", lr=1e-3, weight_decay=0.1, factor_weight_decay=0.0,
                         factor_lr_scale=2.0, schedule="step", step_size=1, bf16=True, label_smoothing=0.1)
    result = finetune(student, _loader(batch=105), config=config)  # 240 = 105 + 105 + 30
    assert result.history[0]["samples"] == 240 and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    evaluation = fxlop.evaluate(student, _loader(batch=7))
    assert evaluation["samples"] == 240 and 0 <= evaluation["accuracy"] <= 1


def test_factor_parameter_groups():
    from fxlop.optim import make_optimizer as _optimizer

    student = fxlop.expand(Net(4))
    optimizer = _optimizer(student, TrainOptions(lr=0.1, weight_decay=5e-4, factor_weight_decay=0.0, factor_lr_scale=3.0))
    factors, others = optimizer.param_groups
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(".factors." in names[id(p)] for p in factors["params"])
    assert not any(".factors." in names[id(p)] for p in others["params"])
    assert factors["lr"] == pytest.approx(0.3) and others["lr"] == 0.1
    assert (factors["weight_decay"], others["weight_decay"]) == (0.0, 5e-4)


def test_relative_sp_weighting_scales_sp_to_gamma_times_the_first_cross_entropy():
    import copy

    import torch.nn.functional as F
    from fxlop.distill import distiller

    torch.manual_seed(0)
    student, teacher = fxlop.expand(Net(4)), Net(12).eval()
    batches = list(_loader())  # fixed batches: the first one is what the scale is measured on
    probe = distiller(teacher, copy.deepcopy(student))
    with torch.no_grad():
        output = probe.student.train()(batches[0][0])
        ce = F.cross_entropy(output[0], batches[0][1]).item()
        sp = probe.loss(output[1], probe.teacher_taps(batches[0][0])).item()
    result = finetune(student, batches, teacher=teacher, gamma=0.5, sp_weighting="relative", epochs=2, lr=0.01)
    scales = [r["sp_scale"] for r in result.history]
    assert scales[0] == scales[1] == pytest.approx(ce / sp, rel=1e-4)  # fixed once, on the first batch
    absolute = finetune(fxlop.expand(Net(4)), _loader(), teacher=teacher, gamma=0.5, epochs=1, lr=0.01)
    assert absolute.history[0]["sp_scale"] == 1.0


def test_two_runs_can_share_one_schedule():
    straight = finetune(Net(4), _loader(), epochs=6, lr=0.1)
    first = finetune(Net(4), _loader(), epochs=2, lr=0.1, schedule_epochs=6)
    rest = finetune(Net(4), _loader(), epochs=4, lr=0.1, schedule_epochs=6, schedule_start=2)
    rates = [r["lr"] for r in straight.history]
    assert [r["lr"] for r in first.history + rest.history] == pytest.approx(rates, rel=1e-12)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12) and rates[2] == pytest.approx(0.05)  # cosine to zero
    with pytest.raises(fxlop.FxlopError, match=r"schedule_start \+ epochs \(4 \+ 4\) runs past"):
        finetune(Net(4), _loader(), epochs=4, schedule_epochs=6, schedule_start=4)


def test_resume_with_other_settings_is_refused(tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    finetune(Net(4), _loader(), epochs=1, lr=0.1, checkpoint_path=checkpoint)
    with pytest.raises(fxlop.FxlopError, match=r"other settings \(lr: 0.1 -> 0.2, epochs: 1 -> 3\)|"
                                               r"other settings \(epochs: 1 -> 3, lr: 0.1 -> 0.2\)"):
        finetune(Net(4), _loader(), epochs=3, lr=0.2, checkpoint_path=checkpoint, resume=True)
    resumed = finetune(Net(4), _loader(), epochs=1, lr=0.1, checkpoint_path=checkpoint, resume=True)
    assert len(resumed.history) == 1  # the same settings resume (here: nothing left to do)


@pytest.mark.parametrize("bad,match", [({"epochs": 0}, "epochs"), ({"optimizer": "lion"}, "optimizer"),
                                       ({"lr": float("nan")}, "lr"), ({"schedule": "poly"}, "schedule"),
                                       ({"gamma": 1.0}, "teacher")])
def test_bad_settings(bad, match):
    with pytest.raises(fxlop.FxlopError, match=match):
        finetune(Net(4), _loader(), **bad)


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 1})

    def torn_save(payload, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_corrupt_or_foreign_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(fxlop.FxlopError, match="unreadable"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(fxlop.FxlopError, match="not an fxlop checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(fxlop.FxlopError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_kill_9_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    epochs = 6
    straight = _run([JOB, "--out", tmp_path / "straight", "--epochs", epochs])
    killed_dir = tmp_path / "killed"
    job = _run([JOB, "--out", killed_dir, "--epochs", epochs, "--delay", "0.002"])
    checkpoint = killed_dir / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), job.communicate()[0].decode()[-2000:]
    time.sleep(random.uniform(0.0, 1.0))  # anywhere in the following epoch, checkpoint writes included
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    interrupted = load_checkpoint(checkpoint)
    assert 1 <= interrupted["epoch"] < epochs, "the job finished before it could be killed"

    resumed = _run([JOB, "--out", killed_dir, "--epochs", epochs, "--resume"])
    assert resumed.wait(timeout=240) == 0, resumed.communicate()[0].decode()[-2000:]
    assert straight.wait(timeout=240) == 0, straight.communicate()[0].decode()[-2000:]
    final = load_checkpoint(checkpoint)
    assert final["epoch"] == epochs
    assert [r["epoch"] for r in final["history"]] == list(range(1, epochs + 1))
    logged = [json.loads(line)["epoch"] for line in (killed_dir / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, epochs + 1))
    # model, optimizer, scheduler and RNG states all came back: the weights are those of a run never killed
    expected = torch.load(tmp_path / "straight" / "weights_rank0.pt")
    got = torch.load(killed_dir / "weights_rank0.pt")
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-6, atol=1e-7), name


def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    job = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", JOB, "--distributed",
                "--out", tmp_path, "--epochs", 2])
    output = job.communicate(timeout=300)[0].decode()
    assert job.returncode == 0, output[-3000:]
    rank0 = torch.load(tmp_path / "weights_rank0.pt")
    rank1 = torch.load(tmp_path / "weights_rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in records] == [240, 240]  # both ranks' halves, summed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "log.jsonl", "weights_rank0.pt",
                                                          "weights_rank1.pt"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2
