"""The module that holds one expanded layer's factors, and the shape of its subgraph.

An :class:`ExpandedLayer` sits at the qualified name of the layer it replaces (a conv/linear module,
or the weight parameter of a functional call), so the factors keep that name as their prefix and
``fuse`` can put the original layer back under it.  The graph itself carries the computation:
:func:`chain_plan` lists the steps of one call site, and both the expansion pass (which emits
them) and the fusion pass (which matches them) read that one list.  Other reads of the weight in a
graph (``w.dtype``, ``w.shape``, ``w * mask``) become calls of the layer's :class:`WeightRead`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from . import linalg
from .errors import ExpansionError, FusionError
from .ops import SPATIAL_DIMS, Call, apply, bind, call_of_module, is_hf_conv1d

#: a chain step's weight: the index of a factor, or COMPOSED for the kernel composed in the graph
COMPOSED = "composed"
MODES = ("online", "chain")


@dataclasses.dataclass(frozen=True)
class Step:
    call: Call
    weight: int | str
    has_bias: bool


def chain_plan(call: Call, depth: int, kernel_index: int, mode: str) -> list[Step]:
    """The ops of one call site of an expanded layer, first to last.

    ``chain``: one op per factor; the kernel factor keeps the site's stride, padding and dilation,
    the 1x1 factors run with the same groups and nothing else, only the last op adds the bias
    (so zero padding commutes with the bias-free 1x1 ops before the kernel).
    ``online``: one op with the kernel composed from the factors, exactly like the original.
    """
    if mode == "online":
        return [Step(call, COMPOSED, True)]
    return [Step(call if i == kernel_index else call.pointwise(), i, i == depth - 1) for i in range(depth)]


#: factors above this size (all of one layer's together) are composed on every eval call instead of
#: cached with a copy of themselves
CACHE_MAX_BYTES = 8 * 2**20


class KernelComposer(nn.Module):
    """Composes a chain's factors into one weight inside the graph (the ``online`` mode).

    In eval mode without autograd the composed kernel is cached together with a copy of the factors
    it was composed from, and reused only while every factor is bitwise equal to that copy (same
    dtype, device and shape).  Nothing that changes a factor can serve a stale kernel: optimizer
    steps, ``load_state_dict``, writes through ``p.data`` (which do not bump ``p._version``),
    ``p.data = other`` (even at a recycled address) and ``.to(dtype)`` all show in the comparison.
    The copy holds as much memory as the factors while the cache lives, so only layers whose factors
    take at most :data:`CACHE_MAX_BYTES` are cached (a ViT-B's would double its memory in eval for
    little: a large layer's composition is small next to its own matmuls at usual batch sizes);
    training mode, autograd, ``train()`` and ``.to()``/``.cuda()``/``.half()`` drop it, and so do
    ``copy``/``pickle``.

    The cache pays at small eval batches, where composing dominates; the fused model is faster
    still: deploy that (docs/results/speed.md, "Measurements behind the defaults").
    """

    def __init__(self, groups: int, kernel_index: int, order: str):
        super().__init__()
        self.groups = groups
        self.kernel_index = kernel_index
        self.order = order
        self._cache: tuple[tuple[Tensor, ...], Tensor] | None = None

    def forward(self, *factors: Tensor, composed: Tensor | None = None) -> Tensor:
        """The kernel composed from ``factors``; ``composed``: the kernel as a :class:`BatchComposer`
        composed it together with other layers' (see :mod:`passes.batch`), returned as it is."""
        if composed is not None:
            return composed
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._cache = None
            return self._compose(factors)
        if self._cache is not None and _bitwise_equal(self._cache[0], factors):
            return self._cache[1]
        self._cache = None  # free the old copy before taking a new one
        kernel = self._compose(factors)
        if self._bytes_per_layer(factors) <= CACHE_MAX_BYTES:
            self._cache = (tuple(f.detach().clone() for f in factors), kernel)
        return kernel

    def _compose(self, factors: Sequence[Tensor]):
        return linalg.compose(factors, self.groups, self.kernel_index, self.order)

    def _bytes_per_layer(self, factors: Sequence[Tensor]) -> int:
        return sum(f.numel() * f.element_size() for f in factors)

    def train(self, mode: bool = True) -> KernelComposer:
        if mode:
            self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._cache = None  # .to(), .cuda(), .half(), ...: the factors move or change dtype
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_cache"] = None  # derived data: not saved, not copied
        return state

    def extra_repr(self) -> str:
        return f"groups={self.groups}, kernel_index={self.kernel_index}, order={self.order}"


class BatchComposer(KernelComposer):
    """Composes the kernels of ``layers`` expanded layers whose factors have the same shapes, with one
    set of batched matmuls (:func:`passes.linalg.compose_many`); called with the factors of every
    layer, first layer's first, it returns their kernels as a tuple.  :func:`passes.batch.batch_compositions`
    puts it in a graph; it caches in eval mode like :class:`KernelComposer`, per layer's bytes."""

    def __init__(self, layers: int, groups: int, kernel_index: int, order: str):
        super().__init__(groups, kernel_index, order)
        self.layers = layers

    def _compose(self, factors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        if len(factors) % self.layers:
            raise ExpansionError(f"a BatchComposer of {self.layers} layers got {len(factors)} factors")
        depth = len(factors) // self.layers
        chains = [factors[i * depth:(i + 1) * depth] for i in range(self.layers)]
        return linalg.compose_many(chains, self.groups, self.kernel_index, self.order)

    def _bytes_per_layer(self, factors: Sequence[Tensor]) -> int:
        return super()._bytes_per_layer(factors) // self.layers

    def extra_repr(self) -> str:
        return f"layers={self.layers}, {super().extra_repr()}"


class WeightRead(KernelComposer):
    """The layer's weight as the replaced layer held it, composed from the factors on every call
    (differentiable, never cached: a caller may write into what it reads): graph nodes that read the
    weight other than through the layer's call sites call this module (``<layer>.read``), and
    :attr:`ExpandedLayer.weight` answers with it.  ``transposed``: the weight was stored ``(in, out)``."""

    def __init__(self, groups: int, kernel_index: int, order: str, transposed: bool = False):
        super().__init__(groups, kernel_index, order)
        self.transposed = transposed

    def forward(self, *factors: Tensor) -> Tensor:
        kernel = linalg.compose(factors, self.groups, self.kernel_index, self.order)
        return kernel.t() if self.transposed else kernel

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transposed={self.transposed}"


#: the constructor attributes an expanded layer answers like the module it replaced
CONSTRUCTOR_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                          "padding", "dilation", "groups", "padding_mode", "nf", "nx")


#: integer dtypes of each element size, to compare floating-point tensors bit by bit
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bitwise_equal(saved: Sequence[Tensor], factors: Sequence[Tensor]) -> bool:
    """Whether ``factors`` hold exactly the bits of ``saved`` (NaN payloads and signed zeros included)."""
    if len(saved) != len(factors):
        return False
    for old, new in zip(saved, factors):
        if old.dtype != new.dtype or old.device != new.device or old.shape != new.shape:
            return False
        bits = _BITS.get(old.element_size()) if old.is_floating_point() else None
        if not (torch.equal(old.view(bits), new.detach().view(bits)) if bits else torch.equal(old, new.detach())):
            return False
    return True


class ExpandedLayer(nn.Module):
    """The factors of one linearly over-parameterized layer.

    It still looks like the layer it replaced to code that reads it: ``weight`` is the end-to-end
    weight composed from the factors on each access (differentiable; the original's dtype, device,
    shape and layout: ``(in, out)`` for Hugging Face's ``Conv1D``), ``bias`` is the original bias
    parameter itself, and the replaced module's constructor attributes (``in_features``,
    ``out_features``, ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups``, ``padding_mode``; ``nf``, ``nx`` for ``Conv1D``) are plain attributes.
    ``weight`` cannot be assigned (train or edit the factors, or fuse first).

    ``isinstance(layer, nn.Linear)`` (or ``nn.Conv2d``, ...) is False, on purpose: code that checks
    the type of a layer usually goes on to *write* its weight (weight initialization such as Hugging
    Face's ``_init_weights``, pruning, quantization or weight-norm swaps); through a composed
    ``weight`` such writes would land in a temporary and be lost without a word.  Code that only reads
    the layer (model forwards: ``self.proj.weight.dtype``) needs no type check and works.  Check
    ``isinstance(m, passes.ExpandedLayer)`` and ``m.source`` for the type it replaced.

    Args:
        factors: factor weights applied first to last (see :mod:`passes.linalg`).
        groups: the layer's groups (every factor uses them).
        kernel_index: which factor carries the spatial kernel.
        source: for a layer that was a module, ``(module type, constructor kwargs)``; ``None`` for the
            weight of a functional call.
        bias: the module's bias (kept here so its state_dict key does not change); ``None`` otherwise.
        call: the module's :class:`~passes.ops.Call` (module layers only).
        mode: how :meth:`forward` runs the chain when the layer is used as a module (``online``
            or ``chain``); in a graph the expansion pass emits the subgraph instead.
        in_graph: the layer belongs to a GraphModule whose graph reads its factors; only
            ``passes.fuse`` can fuse it then.
        transposed_weight: the replaced weight was stored ``(in, out)``, the transpose of the
            ``(out, in)`` the factors compose (``Conv1D``; ``x @ W`` products in graphs).
        weight_shape: the replaced weight's shape as stored; :meth:`fused` checks the composed weight
            against it (a module layer is also checked against its constructor's shape).
    """

    def __init__(self, factors: Sequence[Tensor], groups: int, kernel_index: int,
                 source: tuple[type, dict] | None = None, bias: nn.Parameter | None = None,
                 call: Call | None = None, mode: str = "online", in_graph: bool = False,
                 transposed_weight: bool = False, weight_shape: Sequence[int] | None = None):
        super().__init__()
        self.factors = nn.ParameterList([f if isinstance(f, nn.Parameter) else nn.Parameter(f) for f in factors])
        self.bias = bias
        self.groups = groups
        self.kernel_index = kernel_index
        self.source = source
        self.call = call
        self.mode = mode
        self.in_graph = in_graph
        self.transposed_weight = transposed_weight
        #: the replaced weight's shape as it was stored (checked again at fuse); None when not known
        self.weight_shape = None if weight_shape is None else tuple(weight_shape)
        for key, value in (source[1] if source else {}).items():
            if key in CONSTRUCTOR_ATTRIBUTES:
                setattr(self, key, value)
        order = linalg.contraction_order([f.shape for f in factors], groups, kernel_index)
        self.compose = KernelComposer(groups, kernel_index, order)
        self.read = WeightRead(groups, kernel_index, order, transposed_weight)

    def __setstate__(self, state):
        # expanded layers pickled before they answered ``weight`` (torch.save of a whole model)
        super().__setstate__(state)
        self.__dict__.setdefault("transposed_weight", False)
        self.__dict__.setdefault("weight_shape", None)
        if "read" not in self._modules:
            self.read = WeightRead(self.groups, self.kernel_index, self.compose.order, self.transposed_weight)

    @property
    def depth(self) -> int:
        return len(self.factors)

    @property
    def weight(self) -> Tensor:
        """The end-to-end weight in the replaced layer's layout, composed now (differentiable)."""
        return self.read(*self.factors)

    @weight.setter
    def weight(self, value) -> None:
        raise ExpansionError("the weight of an expanded layer is composed from its factors and cannot be assigned: "
                             "change layer.factors, or fuse the model first (passes.fuse, passes.fuse_modules)")

    def fused_weight(self) -> Tensor:
        """The end-to-end weight as the replaced layer stored it, composed in float64 and cast back to
        the factors' dtype."""
        weight = linalg.compose_exact(list(self.factors), self.groups, self.kernel_index)
        return weight.t().contiguous() if self.transposed_weight else weight

    def fused(self, name: str = "") -> nn.Module | nn.Parameter:
        """What this layer replaced, with the composed weight: the module, or the weight parameter.

        Args:
            name: the layer's qualified name, for the error message.

        Returns:
            The replaced module (conv, linear, ...) rebuilt with the composed weight and the layer's
            bias, or, for a layer that replaced a functional weight, the composed ``nn.Parameter``.

        Raises:
            FusionError: the factors (edited since the expansion) do not compose, or compose to a
                weight of another shape than the replaced layer's.
        """
        where = f"expanded layer '{name}'" if name else "an expanded layer"
        try:
            composed = self.fused_weight()
        except RuntimeError as error:
            shapes = ", ".join(str(tuple(f.shape)) for f in self.factors)
            raise FusionError(f"cannot fuse {where}: its factors of shapes {shapes} do not compose ({error}); "
                              f"a factor was replaced by one of another shape after expand") from error
        module = _rebuild(*self.source) if self.source is not None else None
        expected = self.weight_shape
        if module is not None:
            expected = tuple(module.weight.shape) if isinstance(getattr(module, "weight", None), Tensor) \
                else (self.source[1]["nx"], self.source[1]["nf"])  # Conv1D: stored (in, out)
        if expected is not None and tuple(composed.shape) != tuple(expected):
            raise FusionError(f"cannot fuse {where}: its factors compose to a weight of shape "
                              f"{tuple(composed.shape)}, not the {tuple(expected)} of the layer it replaced; a factor "
                              f"was replaced by one of another shape after expand")
        weight = nn.Parameter(composed, self.factors[0].requires_grad)
        if module is None:
            return weight
        module.weight = weight
        module.bias = self.bias
        return module.train(self.training)

    def fuse(self) -> nn.Module:
        """The original module type with the composed weight (``timm.utils.reparameterize_model``
        replaces every child that has ``fuse()`` by its result)."""
        if self.source is None or self.in_graph:
            raise FusionError("this expanded layer is part of a graph (or a functional weight): fuse the whole "
                              "model with passes.fuse(gm)")
        return self.fused()

    def forward(self, x: Tensor) -> Tensor:
        """The chain applied eagerly, step by step as :func:`chain_plan` lists it (module layers)."""
        if self.call is None:
            raise TypeError("an ExpandedLayer that replaced a functional weight is not callable")
        for step in chain_plan(self.call, self.depth, self.kernel_index, self.mode):
            weight = self.compose(*self.factors) if step.weight == COMPOSED else self.factors[step.weight]
            x = apply(step.call, x, weight, self.bias if step.has_bias else None)
        return x

    def extra_repr(self) -> str:
        shapes = ", ".join("x".join(map(str, f.shape)) for f in self.factors)
        origin = self.source[0].__name__ if self.source else "functional weight"
        layout = ", transposed_weight=True" if self.transposed_weight else ""
        return (f"{origin}, factors=[{shapes}], groups={self.groups}, kernel_index={self.kernel_index}, "
                f"mode={self.mode}{layout}")


def _rebuild(module_type: type, kwargs: dict) -> nn.Module:
    """A module of ``module_type`` with the constructor arguments ``kwargs`` and no weight values yet:
    torch's own types are built on the meta device, others (``Conv1D``) without running their
    constructor, which would allocate and initialize a weight."""
    if module_type.__module__.startswith("torch."):
        return module_type(**kwargs, device="meta")
    module = module_type.__new__(module_type)
    nn.Module.__init__(module)
    for key, value in kwargs.items():
        setattr(module, key, value)
    return module


def weight_problem(weight: Tensor) -> str | None:
    """Why a weight cannot be factorized exactly, or None."""
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "its lazy module is not initialized yet (run one forward pass first)"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.numel() == 0:
        return f"weight of shape {tuple(weight.shape)} is empty"
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        return "weight has NaN or Inf entries"
    return None


def module_problem(module: nn.Module) -> str | None:
    """Why a conv/linear module cannot be replaced by an expanded layer, or None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return "the module has forward hooks, which the rewrite would drop"
    return weight_problem(module.weight)


def new_expanded_layer(weight: Tensor, groups: int, shapes, kernel_index: int, generator: torch.Generator | None, *,
                       balanced: bool = False, module: nn.Module | None = None, mode: str = "online",
                       in_graph: bool = False, transposed_weight: bool = False) -> ExpandedLayer:
    """Factorize ``weight`` exactly into an ExpandedLayer on its device and in its dtype (see
    :func:`passes.linalg.factorize`; ``generator`` lives on that device, None on meta); ``module`` when
    it was a module's.  ``transposed_weight``: ``weight`` is stored ``(in, out)`` (the factors then
    compose its transpose); a ``Conv1D`` module is always."""
    transposed_weight = transposed_weight or (module is not None and is_hf_conv1d(module))
    with torch.no_grad():
        factors = linalg.factorize(weight.t() if transposed_weight else weight, groups, shapes, kernel_index,
                                   generator, balanced)
    factors = [nn.Parameter(f, requires_grad=weight.requires_grad) for f in factors]
    if module is None:
        return ExpandedLayer(factors, groups, kernel_index, mode=mode, in_graph=in_graph,
                             transposed_weight=transposed_weight, weight_shape=weight.shape)
    return ExpandedLayer(factors, groups, kernel_index, source=source_of(module), bias=module.bias,
                         call=call_of_module(module), mode=mode, in_graph=in_graph,
                         transposed_weight=transposed_weight, weight_shape=weight.shape)


def layer_nodes(graph: fx.Graph, name: str) -> list[fx.Node]:
    """The nodes that read the layer at ``name``: get_attr of its factors or bias, its composer call."""
    prefix = name + "."
    return [n for n in graph.nodes if n.op in ("get_attr", "call_module") and n.target.startswith(prefix)]


def site_ends(own: list[fx.Node], name: str, layer: ExpandedLayer) -> list[fx.Node]:
    """The last op of every call site of the layer at ``name``, given its :func:`layer_nodes`: an op
    whose weight is the composed kernel or the last factor."""
    weights = {f"{name}.factors.{layer.depth - 1}", f"{name}.compose"}
    ends = []
    for source in own:
        if source.target not in weights:
            continue
        for user in source.users:
            if user.op == "call_function" and user.target in SPATIAL_DIMS and bind(user).get("weight") is source:
                ends.append(user)
    return ends


def source_of(module: nn.Module) -> tuple[type, dict]:
    """``(type, constructor kwargs)`` that rebuild ``module`` (an expandable conv/linear) without weights."""
    if is_hf_conv1d(module):
        return type(module), {"nf": module.nf, "nx": module.nx}
    if isinstance(module, nn.Linear):
        return type(module), {"in_features": module.in_features, "out_features": module.out_features,
                              "bias": module.bias is not None, "dtype": module.weight.dtype}
    return type(module), {
        "in_channels": module.in_channels, "out_channels": module.out_channels,
        "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
        "dilation": module.dilation, "groups": module.groups, "bias": module.bias is not None,
        "padding_mode": module.padding_mode, "dtype": module.weight.dtype,
    }


def parameter_count(module: nn.Module) -> int:
    """Parameters of ``module``; those of lazy modules that are not initialized yet count 0."""
    return sum(p.numel() for p in module.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))


__all__ = ["COMPOSED", "MODES", "Step", "chain_plan", "KernelComposer", "BatchComposer", "WeightRead", "ExpandedLayer",
           "weight_problem", "module_problem", "new_expanded_layer", "layer_nodes", "site_ends", "source_of",
           "parameter_count"]
