"""Similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019) over FX feature taps."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import passes
from .passes import layer_names, linear_layer_names, match_names, tap, tapped_node, warn_caller

from .errors import FxlopError, TraceError, raises_fxlop_errors


def similarity_loss(f_student: Tensor, f_teacher: Tensor) -> Tensor:
    """The SP loss of one pair of feature maps of shape ``(b, ...)``.

    ``G = Q Q^T`` with ``Q = F.reshape(b, -1)``, rows of ``G`` L2-normalized, and the loss is
    ``||G_teacher - G_student||_F^2 / b^2``.  The ``b x b`` Gram matrices let a narrow student and
    its wide teacher compare without adapters.  Computed in float32 at least (under bf16 autocast
    the Gram products would lose the small differences the loss is made of).
    """
    if f_student.shape[0] != f_teacher.shape[0]:
        raise FxlopError(f"similarity_loss: batch sizes differ ({f_student.shape[0]} vs {f_teacher.shape[0]})")
    b = f_student.shape[0]
    dtype = torch.promote_types(f_student.dtype, torch.float32)
    with torch.autocast(device_type=f_student.device.type, enabled=False):
        g_student = _normalized_gram(f_student.to(dtype))
        g_teacher = _normalized_gram(f_teacher.to(dtype))
        return (g_teacher - g_student).pow(2).sum() / (b * b)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton's logit distillation (Hinton, Vinyals and Dean, 2015): ``T^2 KL(p_teacher || p_student)``
    with both distributions softened by the temperature ``T``, averaged over the inputs (and, for
    outputs ``(N, C, d...)`` with a class per position, over the positions).

    The ``T^2`` keeps the gradient's scale independent of ``T``.  Computed in float32 at least.

    Args:
        student_logits: ``(N, C)`` or ``(N, C, d...)`` logits of the student.
        teacher_logits: the teacher's, of the same shape (no gradient flows into them).
        temperature: ``T > 0``.

    Returns:
        The loss, a scalar.

    Raises:
        FxlopError: shapes that differ, or a temperature that is not > 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise FxlopError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if not temperature > 0:
        raise FxlopError(f"kd_loss: temperature must be > 0, got {temperature!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
        teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
        per_position = (teacher.exp() * (teacher - student)).sum(1)  # KL over the classes
        return temperature ** 2 * per_position.mean()


def _normalized_gram(features: Tensor) -> Tensor:
    q = features.reshape(features.shape[0], -1)
    return F.normalize(q @ q.T, p=2, dim=1)


@dataclasses.dataclass
class Distiller:
    """A frozen, tapped teacher and a tapped student whose taps pair up by name.

    ``student`` shares its parameters with the model it was built from; ``teacher`` is a frozen
    copy in eval mode (the caller's teacher is not touched).
    """

    teacher: fx.GraphModule
    student: fx.GraphModule
    names: list[str]
    only_in_teacher: list[str]
    only_in_student: list[str]
    reduction: str = "mean"
    #: multiplier of the SP loss in the training objective: 1 for absolute weighting, fixed on the
    #: first batch for relative weighting (None until then); kept in checkpoints
    scale: float | None = 1.0

    def loss(self, student_taps: Mapping[str, Tensor], teacher_taps: Mapping[str, Tensor]) -> Tensor:
        """Mean (or sum, with ``reduction="sum"``, Tung & Mori's form) of :func:`similarity_loss` over the taps."""
        losses = [similarity_loss(student_taps[n], teacher_taps[n]) for n in self.names]
        total = torch.stack(losses).sum()
        return total / len(losses) if self.reduction == "mean" else total

    def teacher_taps(self, *args, **kwargs) -> dict[str, Tensor]:
        """The teacher's taps on the inputs the models take (positional and keyword, e.g. a Hugging
        Face model's ``input_ids=``, ``attention_mask=``), without autograd."""
        with torch.no_grad():
            return self.teacher(*args, **kwargs)[1]

    def __call__(self, *args, **kwargs) -> tuple[Any, Tensor]:
        """Run the student and the frozen teacher on the same inputs (positional and keyword);
        ``(the student's output, the SP loss)``, the loss as :meth:`loss` gives it (``scale`` is not
        applied).  For a training loop of your own: ``logits, sp_loss = sp(x)``, then
        ``loss = F.cross_entropy(logits, y) + gamma * sp_loss``."""
        output, student_taps = self.student(*args, **kwargs)
        return output, self.loss(student_taps, self.teacher_taps(*args, **kwargs))


@raises_fxlop_errors
def distiller(teacher: nn.Module, student: nn.Module, taps: Iterable[str] | str | None = None, *,
              reduction: str = "mean", leaf_modules=None) -> Distiller:
    """Pair feature taps of ``teacher`` and ``student`` by qualified name.

    ``taps``: layer names or globs (``"layer*.2"``); by default every conv/linear layer of the
    student (for an expanded student: every expanded layer and any conv/linear it left alone),
    paired with the same-named layer of the teacher (torch-pruning keeps module names).  Names that
    exist in only one of the two models are reported in ``only_in_teacher``/``only_in_student`` and
    with a warning, not silently dropped; no common name at all is an error.

    Both models are used as graphs: a GraphModule as it is (``fxlop.expand``'s result, or the
    ``torch.export.export(...).module()`` of a model, expanded or not), any other module traced with
    ``torch.fx`` (a model expanded with ``trace=False`` traces with its expanded layers as leaves).
    Models that ``torch.fx`` cannot trace (Hugging Face's) are passed as their ``torch.export``
    modules, which share the model's parameters (training ``student`` trains the expanded model); the
    default taps then pair an expanded layer of the student's graph with the same-named layer of the
    dense teacher's graph.  The distiller takes the inputs the models take, keyword ones included
    (``sp.teacher_taps(**batch)``, ``sp(**batch)``).

    Raises:
        FxlopError: unknown taps, no common tap, a bad ``reduction``.
        TraceError: a model that is neither a GraphModule nor traceable (says how to export it).
    """
    if reduction not in ("sum", "mean"):
        raise FxlopError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    teacher, student = (m.module() if isinstance(m, torch.export.ExportedProgram) else m for m in (teacher, student))
    teacher_gm = _as_graph(copy.deepcopy(teacher), leaf_modules)
    for param in teacher_gm.parameters():
        param.requires_grad_(False)
    student_gm = _as_graph(student, leaf_modules)
    if isinstance(taps, str):
        taps = [taps]
    student_names, teacher_names = layer_names(student_gm), layer_names(teacher_gm)
    wanted = linear_layer_names(student_gm) if taps is None else match_names(taps, student_names + teacher_names)
    in_student = {n for n in wanted if tapped_node(student_gm, n) is not None}
    in_teacher = {n for n in wanted if tapped_node(teacher_gm, n) is not None}
    names = [n for n in wanted if n in in_student and n in in_teacher]
    only_teacher = [n for n in wanted if n in in_teacher and n not in in_student]
    only_student = [n for n in wanted if n in in_student and n not in in_teacher]
    unknown = [n for n in wanted if n not in in_student and n not in in_teacher]
    if unknown:
        raise FxlopError(f"taps {unknown} name no layer of the teacher or the student")
    if not names:
        raise FxlopError(f"no tap is common to teacher and student (student only: {only_student[:5]}, "
                         f"teacher only: {only_teacher[:5]})")
    if only_teacher or only_student:
        warn_caller(f"SP taps without a partner are not used: only in the teacher {only_teacher}, "
                    f"only in the student {only_student}")
    tapped_teacher = tap(teacher_gm, names).eval()
    return Distiller(tapped_teacher, tap(student_gm, names), names, only_teacher, only_student, reduction)


def _as_graph(model: nn.Module, leaf_modules) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise FxlopError(f"distiller takes nn.Modules (or torch.export programs), got {type(model).__name__}")
    try:
        return passes.trace(model, leaf_modules=leaf_modules)
    except passes.TraceError as error:
        raise TraceError(
            f"SP taps need a graph of the teacher and of the student: {error} For the distiller, pass "
            f"torch.export.export(model, args, kwargs).module() of both (the student's export shares the "
            f"expanded model's parameters, so training it trains the model; export with a dynamic batch "
            f"dimension, dynamic_shapes=..., if the last batch is smaller).") from error
