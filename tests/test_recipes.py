"""The retraining recipes of fine-tuning: logit distillation, its teacher-logit cache, onecycle and
multistep schedules, and the methods that combine them."""
import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxlop
from fxlop.methods import METHODS, method
from fxlop.train import TeacherLogits, TrainOptions, finetune, fixed_inputs

sys.path.insert(0, str(Path(__file__).parent / "jobs"))
from train_job import Blobs, Net  # noqa: E402


def _tensor_loader(batch=16, seed=0):
    blobs = Blobs()
    return DataLoader(TensorDataset(blobs.x, blobs.y), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def test_kd_loss_is_hintons_softened_kl_times_t_squared():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    t = 3.0
    p = torch.softmax(teacher.double() / t, 1)
    expected = t * t * (p * (p.log() - torch.log_softmax(student.double() / t, 1))).sum(1).mean()
    # float32 softmax and logs of 7 classes against float64: a few ulps
    assert fxlop.kd_loss(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert fxlop.kd_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    # a class per position: the mean over inputs and positions of the per-position loss
    dense_s, dense_t = torch.randn(2, 7, 3, generator=generator), torch.randn(2, 7, 3, generator=generator)
    flat = fxlop.kd_loss(dense_s.permute(0, 2, 1).reshape(6, 7), dense_t.permute(0, 2, 1).reshape(6, 7), t)
    assert fxlop.kd_loss(dense_s, dense_t, t).item() == pytest.approx(flat.item(), rel=1e-6)


def test_kd_loss_gradient_matches_the_closed_form():
    """d/ds of T^2 KL(p_t || softmax(s/T)) is T (softmax(s/T) - p_t) / N."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    t = 2.0
    fxlop.kd_loss(student, teacher, t).backward()
    expected = t * (torch.softmax(student.detach() / t, 1) - torch.softmax(teacher / t, 1)) / 4
    torch.testing.assert_close(student.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad,match", [((torch.zeros(2, 3), torch.zeros(2, 4), 1.0), "differ in shape"),
                                       ((torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature")])
def test_kd_loss_refuses(bad, match):
    with pytest.raises(fxlop.FxlopError, match=match):
        fxlop.kd_loss(*bad)


def test_fixed_inputs_knows_datasets_without_augmentation():
    from fxlop.data import load_dataset

    digits = load_dataset("digits", val_fraction=0.2)
    assert fixed_inputs(TensorDataset(torch.zeros(2)))
    assert fixed_inputs(torch.utils.data.Subset(TensorDataset(torch.zeros(2)), [0]))
    assert fixed_inputs(digits.val) and fixed_inputs(digits.test) and not fixed_inputs(digits.train)  # shifts
    assert not fixed_inputs(Blobs()) and not fixed_inputs(None)


def test_cached_teacher_logits_run_the_teacher_once_and_keep_the_loaders_batches():
    teacher = Net(12).eval()
    reference_teacher = copy.deepcopy(teacher)
    calls = []
    teacher.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    cache = TeacherLogits(teacher, cache=True)
    loader = _tensor_loader()
    for epoch in range(3):
        reference = list(_tensor_loader_at_epoch(epoch))
        batches = list(cache.batches(loader))
        assert len(batches) == len(reference) == 15
        for ((x, y), indices), (rx, ry) in zip(batches, reference):
            assert torch.equal(x, rx) and torch.equal(y, ry)  # the loader's own order, with indices
            logits = cache.logits(x, indices)
            with torch.no_grad():
                torch.testing.assert_close(logits, reference_teacher(x), rtol=1e-5, atol=1e-6)  # fp32, same batch
        assert sum(calls) == 240  # every input once, in the first epoch


def _tensor_loader_at_epoch(epoch):
    """The batches ``_tensor_loader()`` gives in its ``epoch``-th pass (the generator advances per pass)."""
    loader = _tensor_loader()
    for _ in range(epoch):
        for _ in loader:
            pass
    return loader


def test_finetune_with_kd_caches_without_augmentation_and_matches_the_uncached_run(monkeypatch):
    torch.manual_seed(0)
    teacher, student = Net(12).eval(), Net(4)
    cached = finetune(copy.deepcopy(student), _tensor_loader(), teacher=teacher, kd_weight=0.7, kd_temperature=2.0, epochs=3, lr=0.05,
                      seed=0)
    monkeypatch.setattr("fxlop.train.fixed_inputs", lambda dataset: False)
    live = finetune(copy.deepcopy(student), _tensor_loader(), teacher=teacher, kd_weight=0.7, kd_temperature=2.0, epochs=3, lr=0.05,
                    seed=0)
    first, second = (torch.tensor([r["train_kd"] for r in result.history]) for result in (cached, live))
    assert (first > 0).all()
    # the same batches in the same order (here bit for bit); a kept logit was computed in another batch of
    # the first epoch, which some kernels round differently at fp32 (1e-7), carried through 45 steps
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-7)
    for a, b in zip(cached.model.parameters(), live.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kd_weight_mixes_cross_entropy_and_distillation():
    torch.manual_seed(0)
    teacher, student = Net(12).eval(), Net(4)
    loader = _tensor_loader(batch=240)
    x, y = next(iter(loader))
    with torch.no_grad():
        ce = F.cross_entropy(student(x), y).item()
        kd = fxlop.kd_loss(student(x), teacher(x), 4.0).item()
    result = finetune(student, loader, teacher=teacher, kd_weight=0.25, epochs=1, lr=0.0, momentum=0.0)
    record = result.history[0]
    assert record["train_ce"] == pytest.approx(ce, rel=1e-5) and record["train_kd"] == pytest.approx(kd, rel=1e-5)
    assert record["train_loss"] == pytest.approx(0.75 * ce + 0.25 * kd, rel=1e-5)


def test_onecycle_is_torchs_one_cycle_per_batch():
    result = finetune(Net(4), _tensor_loader(), schedule="onecycle", lr=0.2, epochs=4, warmup_fraction=0.25)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=4 * 15, pct_start=0.25,
                                                    cycle_momentum=False)
    expected = []
    for _ in range(4):
        for _ in range(15):
            optimizer.step()
            reference.step()
        expected.append(optimizer.param_groups[0]["lr"])
    assert [r["lr"] for r in result.history] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(0.2, rel=1e-2)  # the peak at the end of the warm-up (15 of 60 steps)


@pytest.mark.parametrize("schedule", ["onecycle", "multistep", "cosine"])
def test_two_runs_share_one_schedule(schedule):
    straight = finetune(Net(4), _tensor_loader(), epochs=5, lr=0.1, schedule=schedule)
    first = finetune(Net(4), _tensor_loader(), epochs=2, lr=0.1, schedule=schedule, schedule_epochs=5)
    rest = finetune(Net(4), _tensor_loader(), epochs=3, lr=0.1, schedule=schedule, schedule_epochs=5,
                    schedule_start=2)
    assert [r["lr"] for r in first.history + rest.history] == pytest.approx([r["lr"] for r in straight.history],
                                                                            rel=1e-12)


def test_multistep_decays_at_its_shares_of_the_schedule():
    result = finetune(Net(4), _tensor_loader(), schedule="multistep", lr=0.01, epochs=10, step_gamma=0.1)
    rates = [r["lr"] for r in result.history]  # the rate after each epoch: the next epoch's
    assert rates == pytest.approx([0.01] * 5 + [1e-3] * 2 + [1e-4] * 3, rel=1e-12)  # x0.1 at epochs 6 and 8


@pytest.mark.parametrize("bad,match", [({"kd_weight": 0.5}, "needs a teacher"),
                                       ({"kd_weight": 1.5, "teacher": "net"}, "kd_weight must be in"),
                                       ({"kd_temperature": 0.0}, "kd_temperature"),
                                       ({"warmup_fraction": 1.0}, "warmup_fraction"),
                                       ({"milestones": [0.8, 0.6]}, "milestones")])
def test_bad_recipe_settings(bad, match):
    if bad.get("teacher") == "net":
        bad = {**bad, "teacher": Net(12)}
    with pytest.raises(fxlop.FxlopError, match=match):
        finetune(Net(4), _tensor_loader(), **bad)


def test_onecycle_needs_a_loader_with_a_length():
    def batches():
        yield from _tensor_loader()

    with pytest.raises(fxlop.FxlopError, match="onecycle.*length"):
        finetune(Net(4), batches(), schedule="onecycle")


def test_methods_set_their_losses_only():
    base = TrainOptions(gamma=0.3, kd_weight=0.5)
    assert {n: (m.train_config(base).gamma, m.train_config(base).kd_weight) for n, m in METHODS.items()} == {
        "vanilla": (0, 0), "sp": (0.3, 0), "lop": (0, 0), "lop_sp": (0.3, 0), "kd": (0, 0.5), "kd_sp": (0.3, 0.5),
        "kd_lop": (0, 0.5)}
    assert [n for n, m in METHODS.items() if m.lop] == ["lop", "lop_sp", "kd_lop"]
    assert method("kd").distills and not method("lop").distills
    with pytest.raises(fxlop.FxlopError, match="unknown method 'lopp'"):
        method("lopp")
    assert math.isclose(method("kd").train_config(base, epochs=3).epochs, 3)
