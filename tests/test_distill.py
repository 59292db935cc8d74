import warnings

import pytest
import torch
import torch.nn as nn

import fxlop
from fxlop.distill import distiller, similarity_loss


def _reference_sp(f_student, f_teacher):
    """Tung & Mori's loss written out element by element."""
    b = f_student.shape[0]
    qs, qt = f_student.reshape(b, -1).double(), f_teacher.reshape(b, -1).double()
    gs = [[float(qs[i] @ qs[j]) for j in range(b)] for i in range(b)]
    gt = [[float(qt[i] @ qt[j]) for j in range(b)] for i in range(b)]
    total = 0.0
    for i in range(b):
        norm_s = sum(v * v for v in gs[i]) ** 0.5
        norm_t = sum(v * v for v in gt[i]) ** 0.5
        total += sum((gt[i][j] / norm_t - gs[i][j] / norm_s) ** 2 for j in range(b))
    return total / b**2


@pytest.mark.parametrize("b", [1, 2, 7])
@pytest.mark.parametrize("student_shape,teacher_shape", [((3, 4, 4), (8, 4, 4)), ((5,), (11,)), ((2, 3), (2, 3))])
def test_similarity_loss_matches_the_definition(b, student_shape, teacher_shape):
    fs, ft = torch.randn(b, *student_shape), torch.randn(b, *teacher_shape)
    assert similarity_loss(fs, ft).item() == pytest.approx(_reference_sp(fs, ft), rel=1e-5, abs=1e-7)


def test_similarity_loss_is_zero_for_one_sample_and_for_proportional_features():
    f = torch.randn(1, 4, 3, 3)
    assert similarity_loss(f, torch.randn(1, 9)).item() == pytest.approx(0.0, abs=1e-7)  # 1x1 Grams are 1
    fs = torch.randn(6, 10)
    assert similarity_loss(fs, 3 * fs).item() == pytest.approx(0.0, abs=1e-7)
    assert similarity_loss(fs, torch.randn(6, 10)).item() > 1e-3


def test_similarity_loss_gradient():
    fs = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: similarity_loss(s, ft), (fs,))
    b2 = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: similarity_loss(s, t2), (b2,))


def test_similarity_loss_batch_mismatch():
    with pytest.raises(fxlop.FxlopError, match="batch sizes"):
        similarity_loss(torch.randn(2, 3), torch.randn(3, 3))


class Teacher(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.extra = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(self.extra(self.conv(x)).mean((2, 3)))


class Shallow(nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _hooked_outputs(model, names, *args, **kwargs):
    """Outputs of the named modules of ``model`` on the inputs, by forward hooks (in eval mode, no grad)."""
    values = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: values.__setitem__(name, output)) for name in names]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*args, **kwargs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return values


def test_distiller_pairs_by_name_and_reports_the_rest():
    teacher, student = Teacher(8), Shallow(3)
    with pytest.warns(UserWarning, match=r"only in the teacher \['extra'\]"):
        kd = distiller(teacher, fxlop.expand(student), ["conv", "extra", "fc"])
    assert kd.names == ["conv", "fc"] and kd.only_in_teacher == ["extra"] and kd.only_in_student == []
    x = torch.randn(4, 3, 5, 5)
    logits, student_taps = kd.student(x)
    loss = kd.loss(student_taps, kd.teacher_taps(x))
    # the teacher's features taken independently, by forward hooks on the caller's teacher
    hooked = _hooked_outputs(teacher, ["conv", "fc"], x)
    expected = sum(_reference_sp(student_taps[n].detach(), hooked[n]) for n in ["conv", "fc"]) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(student_taps["fc"], logits)  # the student's last tap is its output
    loss.backward()
    assert all(p.grad is None for p in kd.teacher.parameters())
    assert all(not p.requires_grad for p in kd.teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's teacher is untouched
    assert not kd.teacher.training


def test_default_taps_are_the_students_linear_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd = distiller(Teacher(8), fxlop.expand(Teacher(3)))
    assert kd.names == ["conv", "extra", "fc"]
    teacher = Teacher(8)
    kd_mean = distiller(teacher, Teacher(3))  # the mean over taps is the default
    x = torch.randn(4, 3, 5, 5)
    _, taps = kd_mean.student(x)
    hooked = _hooked_outputs(teacher, ["conv", "extra", "fc"], x)
    total = sum(_reference_sp(taps[n].detach(), hooked[n]) for n in ["conv", "extra", "fc"])
    assert distiller(teacher, Teacher(3), reduction="sum").loss(taps, kd_mean.teacher_taps(x)).item() == \
        pytest.approx(total, rel=1e-5)
    assert kd_mean.loss(taps, kd_mean.teacher_taps(x)).item() == pytest.approx(total / 3, rel=1e-5)


def test_globs_and_errors():
    kd = distiller(Teacher(8), Teacher(3), "c*")
    assert kd.names == ["conv"]
    with pytest.raises(fxlop.FxlopError, match="name no layer"):
        distiller(Teacher(8), Teacher(3), ["nope"])
    with pytest.raises(fxlop.FxlopError, match="reduction"):
        distiller(Teacher(8), Teacher(3), reduction="max")


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_default_taps_pair_a_student_expanded_without_tracing(mode):
    """A student expanded with trace=False traces with its expanded layers as leaves; by default they
    pair with the teacher's layers of the same names, and the loss is Tung & Mori's on their outputs."""
    teacher = Teacher(8)
    student = Teacher(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd = distiller(teacher, fxlop.expand(student, trace=False, mode=mode))
    assert kd.names == ["conv", "extra", "fc"]
    x = torch.randn(4, 3, 5, 5)
    logits, sp_loss = kd(x)
    hooked_student = _hooked_outputs(student, kd.names, x)  # the expansion is exact: the compact layers' outputs
    hooked_teacher = _hooked_outputs(teacher, kd.names, x)
    expected = sum(_reference_sp(hooked_student[n], hooked_teacher[n]) for n in kd.names) / 3
    assert sp_loss.item() == pytest.approx(expected, rel=1e-4)
    assert (logits - student(x)).abs().max() <= 1e-5 * student(x).abs().max()
    sp_loss.backward()
    assert all(p.grad is not None for p in kd.student.parameters())


class KeywordTeacher(Teacher):
    """A model called with keyword inputs only (as Hugging Face models are)."""

    def forward(self, *, pixels, gain):
        return super().forward(pixels * gain)


class KeywordStudent(Shallow):
    def forward(self, *, pixels, gain):
        return super().forward(pixels * gain)


def test_the_distiller_takes_keyword_inputs():
    teacher, student = KeywordTeacher(8), KeywordStudent(3)
    kd = distiller(teacher, fxlop.expand(student), ["conv", "fc"])
    batch = {"pixels": torch.randn(4, 3, 5, 5), "gain": torch.rand(4, 1, 1, 1) + 0.5}
    hooked = _hooked_outputs(teacher, ["conv", "fc"], **batch)
    taps = kd.teacher_taps(**batch)
    for name in ["conv", "fc"]:
        assert torch.equal(taps[name], hooked[name]), name
    logits, sp_loss = kd(**batch)
    _, student_taps = kd.student(**batch)
    assert torch.equal(logits, student_taps["fc"])
    assert sp_loss.item() == pytest.approx(kd.loss(student_taps, taps).item(), rel=1e-6)
    assert sp_loss.item() > 1e-4  # narrow random student vs wide random teacher: not trivially zero


def test_an_untraceable_model_is_refused_with_the_export_way_out():
    class Untraceable(Shallow):
        def forward(self, x):
            if x.dim() == 4:  # control flow on a property: torch.fx cannot trace it, torch.export can
                x = -x
            return super().forward(x)

    with pytest.raises(fxlop.TraceError, match=r"SP taps need a graph.*torch\.export\.export"):
        distiller(Shallow(), Untraceable())
    exported = torch.export.export(Untraceable(), (torch.randn(2, 3, 5, 5),))
    kd = distiller(torch.export.export(Shallow(), (torch.randn(2, 3, 5, 5),)), exported)
    assert kd.names == ["conv.weight", "fc.weight"]
