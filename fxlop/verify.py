"""Numerical equivalence of two models on example inputs, layer by layer and at the outputs.

Comparing final outputs alone is not enough for models that select or reorder (detectors: NMS,
top-k, score thresholds): an exact expansion can fail because scores that differ in the seventh
digit swap two boxes, and a wrong one can pass because the boxes hide it.  So :func:`verify` also
compares what is continuous: the output of every conv/linear layer the two models have under the
same qualified name (expanded layers included) and of the modules that contain one.  The two
models run in lockstep (the reference in a helper thread, strictly taking turns with the
candidate): at each such module the candidate's output is compared with the reference's output of
the same call and then replaced by it, so that everything downstream sees the reference's values;
a difference further down can then only come from code that differs, and the first module that
disagrees is the one named.  The reference runs ahead only until it produces the value the
candidate waits for, and the values it holds meanwhile stay under :data:`MAX_PENDING_BYTES`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import EquivalenceError, FxlopError, raises_fxlop_errors
from .passes import ExpandedLayer, layer_sites, linear_layer_names, module_function, report_of, warn_caller

__all__ = ["verify", "relative_error", "default_rtol", "RTOL"]

#: default relative tolerance by dtype: rounding of a deep net's outputs, tens of units of roundoff
#: (a complex dtype takes the tolerance of its real and imaginary parts)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: how far the reference may run ahead of the candidate (values of module calls the candidate has not
#: reached yet, held as copies) before the two are said to call their layers in a different order
MAX_PENDING_BYTES = 512 * 2**20


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance for outputs of ``dtype``; 0 (exact) for integer and bool dtypes."""
    if dtype.is_complex:
        dtype = dtype.to_real()
    return RTOL.get(dtype, 0.0)


@dataclasses.dataclass(frozen=True)
class _Comparison:
    """Elementwise comparison of a candidate tensor with a reference tensor of the same shape.

    ``nonfinite_mismatch``: where the NaN/inf pattern differs (a NaN against a number, an inf against
    a number, NaN or the other inf); for complex elements each of the real and imaginary parts
    counts.  ``deviation``: ``|candidate - reference|`` in float64 (the modulus of the complex
    difference), counting only parts that are finite in both, so 0 where both hold the same NaN or
    inf.  ``scale``: the largest ``|reference|`` over its finite elements (0 if there are none).
    """

    nonfinite_mismatch: torch.Tensor
    deviation: torch.Tensor
    scale: float


def _compare(candidate: torch.Tensor, reference: torch.Tensor) -> _Comparison:
    if candidate.shape != reference.shape:
        raise EquivalenceError(f"cannot compare a tensor of shape {tuple(candidate.shape)} with one of shape "
                               f"{tuple(reference.shape)}")
    is_complex = candidate.is_complex() or reference.is_complex()
    wide = torch.complex128 if is_complex else torch.float64
    expected = reference.detach().to(wide)
    got = candidate.detach().to(device=expected.device, dtype=wide)
    # real components: (..., 2) for complex tensors, so that each part's NaN/inf is checked on its own
    exp_parts = torch.view_as_real(expected) if is_complex else expected
    got_parts = torch.view_as_real(got) if is_complex else got
    both_finite = torch.isfinite(exp_parts) & torch.isfinite(got_parts)
    same = (exp_parts == got_parts) | (torch.isnan(exp_parts) & torch.isnan(got_parts))  # inf == inf, same sign
    mismatch = ~both_finite & ~same
    delta = torch.where(both_finite, got_parts - exp_parts, torch.zeros((), dtype=torch.float64))
    if is_complex:
        mismatch = mismatch.any(-1)
        deviation = torch.view_as_complex(delta.contiguous()).abs()
    else:
        deviation = delta.abs()
    finite_reference = expected[torch.isfinite(expected)]
    scale = finite_reference.abs().max().item() if finite_reference.numel() else 0.0
    return _Comparison(mismatch, deviation, scale)


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |candidate - reference| / max |reference|`` computed in float64 (complex128 for complex
    tensors: the modulus of the complex difference, not of the real parts alone).

    Normalizing by the reference's largest magnitude, not elementwise, keeps the measure meaningful
    for activations that cross zero.  Non-finite values must match exactly: a NaN where the other
    holds a number, an inf against a number or NaN, or infs of opposite sign make the error inf;
    NaNs and infs that match count as equal, and both maxima run over the finite elements only.
    0 when both are equal (all zero included), inf when only the finite part of the reference is
    all zero.  The shapes must be equal (no broadcasting), else :class:`~fxlop.EquivalenceError`.
    """
    return _relative(_compare(candidate, reference))


def _relative(comparison: _Comparison) -> float:
    if bool(comparison.nonfinite_mismatch.any()):
        return float("inf")
    if comparison.deviation.numel() == 0:
        return 0.0
    worst = comparison.deviation.max().item()
    if worst == 0:
        return 0.0
    return worst / comparison.scale if comparison.scale > 0 else float("inf")


@raises_fxlop_errors
def verify(reference: nn.Module, candidate: nn.Module, example_inputs, *, rtol: float | None = None,
           atol: float | None = None, layers: bool = True) -> float:
    """Check that ``candidate`` computes what ``reference`` computes on ``example_inputs``.

    Both models run in eval mode under ``no_grad`` (their train/eval flags are restored after), so
    BatchNorm statistics are not touched, and each gets its own copy of the inputs (a model that
    writes into its input, such as ``nn.ReLU(inplace=True)``, changes neither the caller's tensors
    nor what the other model sees).  ``example_inputs`` is one tensor, a tuple of positional
    arguments, or a dict of keyword arguments.  Outputs may be tensors or nested tuples, lists,
    dicts and named tuples of them; other leaves must be equal, integer and bool tensors exactly.
    A floating-point or complex tensor passes when

    - its NaNs and infs sit exactly where the reference's do, with the same signs (for complex
      tensors, part by part), and
    - on the other elements ``max |candidate - reference| <= atol + rtol * max |reference|``, the
      maximum of ``|reference|`` taken over its finite elements and ``|.|`` the modulus of the
      complex difference for complex outputs (the whole number, not only its real part).

    ``rtol`` defaults by the reference's dtype (fp32 and complex64 ``1e-5``, fp64 and complex128
    ``1e-10``, fp16 ``1e-2``, bf16 ``5e-2``), ``atol`` to 0.

    Layers (``layers=True``): the same test applies, call by call, to the output of every
    conv/linear layer that both models have under one qualified name (an expanded layer of either,
    as a module or as a subgraph of a traced or ``torch.export`` graph) and of every module of both
    that contains one (a layer that BatchNorm was folded into, which computes both, is not one).  The
    models run in lockstep; each such output of the candidate is compared
    with the reference's and then replaced by it, so the first module that differs is named, and
    ops downstream that select or reorder (NMS, top-k, sorting, score thresholds) can neither hide a
    wrong layer nor make an exact one fail.  The final outputs are compared twice: in that run (any
    difference there comes from code outside the compared modules, and fails) and with the
    candidate running on its own.  When only the second differs while every compared module
    agreed and the candidate ran ops that select or reorder by floating-point values (top-k, sort,
    argmax, NMS, comparisons with a threshold), the difference is within-tolerance rounding made
    discrete by such ops: it is reported with a ``UserWarning`` and does not fail (nor does it enter
    the returned error).  Without such ops it fails: error that grew through layers each within
    tolerance is still error.

    Nothing is counted as agreement unless it is: an output or layer value that is empty, all NaN
    or inf, or all zero compares nothing, and when no comparison compared anything ``verify``
    raises rather than pass.

    Args:
        reference: the model whose outputs are taken as right.
        candidate: the model checked against it.
        example_inputs: one tensor, a tuple of positional arguments or a dict of keyword arguments.
        rtol: relative tolerance (``>= 0``); default by dtype as above.
        atol: absolute tolerance (``>= 0``), default 0.
        layers: ``True`` (default) compares the layers and the modules containing them as above;
            ``False`` compares the final outputs only.

    Returns:
        The largest relative error (see :func:`relative_error`) over the compared tensors: each
        compared module's output, the final outputs of the lockstep run and, when they agree, the
        final outputs of the candidate on its own.  Values that compare nothing (see above) do not
        count.

    Raises:
        FxlopError: ``rtol`` or ``atol`` is negative or not finite, ``layers`` is not a bool, a model
            or an input tensor is on the meta device (checked before anything runs), or a model
            fails on the inputs.
        EquivalenceError: naming the first module whose output differs (and the call), or the output
            path, the worst element (or the first whose NaN/inf pattern differs), its expected and
            actual values and the deviation that fails; or saying that nothing finite, nonzero and
            nonempty was compared.
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise FxlopError(f"verify: {name} must be a finite number >= 0, got {value!r}")
    if not isinstance(layers, bool):
        raise FxlopError(f"verify: layers must be True or False, got {layers!r}")
    for role, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, nn.Module):
            raise FxlopError(f"verify: the {role} must be an nn.Module, got {type(model).__name__}")
        _refuse_meta(model, role)
    args, kwargs = _split_inputs(example_inputs)
    _refuse_meta_inputs((args, kwargs))
    tolerance = _Tolerance(rtol, atol)

    with torch.no_grad(), _eval_mode(reference), _eval_mode(candidate):
        plan = _Plan(reference, candidate) if layers else None
        if plan is None or not plan.names:
            expected = _call(reference, "reference", *_copy_inputs(args, kwargs))
            got = _call(candidate, "candidate", *_copy_inputs(args, kwargs))
            tally = _Tally()
            _compare_tree(expected, got, "output", tolerance, tally)
            return tally.result(layers_compared=0)
        tally = _Tally()
        expected, got = _Lockstep(plan, tolerance, tally).run(args, kwargs)
        _compare_tree(expected, got, "output", tolerance, tally,
                      context="with every compared module's output taken from the reference (so the difference "
                              "comes from code outside the compared modules)")
        # the candidate on its own: the end-to-end deviation, when selection does not make it discrete
        with _SelectionOps() as selections:
            alone = _call(candidate, "candidate", *_copy_inputs(args, kwargs))
        free = _Tally()
        try:
            _compare_tree(expected, alone, "output", tolerance, free)
        except EquivalenceError as error:
            # only ops that select or reorder by floating-point values explain an end-to-end difference
            # when every module agreed; without them it is error that grew through the layers (a layer
            # within tolerance of its own largest value can still be wrong on a small channel)
            if not tally.layers or not selections.seen:
                raise
            warn_caller(
                f"verify: every compared module agreed ({tally.layers} module outputs), and so did the outputs "
                f"with the modules' outputs taken from the reference, but the candidate on its own gives different "
                f"outputs: {error}.  The candidate runs ops that select or reorder by floating-point values "
                f"({', '.join(sorted(selections.seen))}), which turns within-tolerance rounding into different "
                f"selections; this is not counted as a difference.")
        else:
            tally.worst = max(tally.worst, free.worst)
            tally.meaningful += free.meaningful
        return tally.result(layers_compared=tally.layers)


# ---------------------------------------------------------------------------------------------------
# comparing trees of outputs


@dataclasses.dataclass
class _Tolerance:
    rtol: float | None
    atol: float | None

    def allowed(self, dtype: torch.dtype, scale: float) -> tuple[float, float]:
        rel = default_rtol(dtype) if self.rtol is None else self.rtol
        return (0.0 if self.atol is None else self.atol) + rel * scale, rel


@dataclasses.dataclass
class _Tally:
    worst: float = 0.0
    meaningful: int = 0  # comparisons of something: a tensor with a finite nonzero element, a nonempty integer tensor
    seen: int = 0  # tensors compared, meaningful or not
    layers: int = 0  # module outputs compared that held something

    def result(self, layers_compared: int) -> float:
        if not self.meaningful:
            raise EquivalenceError(
                f"nothing to compare: every output{' and compared module output' if layers_compared else ''} "
                f"({self.seen} tensor{'s' if self.seen != 1 else ''}) is empty, all NaN/inf or all zero, so "
                f"agreement would mean nothing; choose inputs for which the model computes something (a detector "
                f"with a low score_thresh, a nonempty batch)")
        return self.worst


def _compare_tree(expected: Any, got: Any, path: str, tolerance: _Tolerance, tally: _Tally, *,
                  context: str = "") -> None:
    """Compare every leaf of ``got`` with ``expected``; raise EquivalenceError at the first that fails."""
    suffix = f" ({context})" if context else ""
    for leaf_path, exp, out in _paired_leaves(expected, got, path):
        if not isinstance(exp, torch.Tensor):
            if exp != out:
                raise EquivalenceError(f"{leaf_path} differs: expected {exp!r}, got {out!r}{suffix}")
            continue
        if not isinstance(out, torch.Tensor) or out.shape != exp.shape:
            raise EquivalenceError(f"{leaf_path}: expected a tensor of shape {tuple(exp.shape)}, got "
                                   f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                                   f"{suffix}")
        tally.seen += 1
        if not exp.is_floating_point() and not exp.is_complex():
            if not torch.equal(exp, out.to(exp.device)):
                raise EquivalenceError(f"{leaf_path}: {exp.dtype} outputs differ{suffix}")
            tally.meaningful += exp.numel() > 0
            continue
        comparison = _compare(out, exp)
        if bool(comparison.nonfinite_mismatch.any()):
            index = _index(comparison.nonfinite_mismatch.nonzero()[0], exp.shape)
            count = int(comparison.nonfinite_mismatch.sum())
            raise EquivalenceError(
                f"{leaf_path}{list(index)}: expected {_value(exp, index)}, got {_value(out, index)}; NaN/inf "
                f"positions or signs differ at {count} of {exp.numel()} elements (dtype {exp.dtype}){suffix}")
        allowed, tolerance_rel = tolerance.allowed(exp.dtype, comparison.scale)
        deviation = comparison.deviation
        if deviation.numel() and not deviation.max().item() <= allowed:
            error = _relative(comparison)
            index = _index(deviation.argmax(), deviation.shape)
            over = int((deviation > allowed).sum())
            raise EquivalenceError(
                f"{leaf_path}{list(index)}: expected {_value(exp, index)}, got {_value(out, index)}; "
                f"max abs deviation {deviation.max().item():.3g} > allowed {allowed:.3g} at {over} of "
                f"{exp.numel()} elements (relative {error:.3g}, rtol {tolerance_rel:g}, atol {tolerance.atol or 0:g}, "
                f"dtype {exp.dtype}){suffix}")
        if comparison.scale > 0:  # something finite and nonzero was compared: it counts
            tally.meaningful += 1
            tally.worst = max(tally.worst, _relative(comparison))


def _index(flat_or_full: torch.Tensor, shape: torch.Size) -> tuple[int, ...]:
    """An element's index as a tuple: from a flat index (``argmax``) or a row of ``nonzero``."""
    if flat_or_full.dim() == 0:
        return tuple(int(i) for i in torch.unravel_index(flat_or_full, shape))
    return tuple(int(i) for i in flat_or_full)


def _value(tensor: torch.Tensor, index: tuple[int, ...]) -> str:
    return f"{tensor[index].item():.7g}"


class _Stop(BaseException):
    """Unwinds the reference's run when the candidate has finished or failed."""


def _call(model, role: str, args, kwargs):
    try:
        return model(*args, **kwargs)
    except (EquivalenceError, _Stop):
        raise
    except Exception as error:  # the inputs do not fit the model: say so, not as an equivalence failure
        raise FxlopError(f"verify: the {role} model ({type(model).__name__}) fails on example_inputs: "
                         f"{type(error).__name__}: {error}") from error


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _copy_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A copy of the inputs for one model run: every tensor in them (in nested tuples, lists, dicts)
    is a new tensor, so a model that writes into its inputs changes neither the caller's nor the other
    model's; a tensor that appears twice stays one tensor."""
    memo: dict[int, Any] = {}

    def copy_of(value):
        if id(value) in memo:
            return memo[id(value)]
        if isinstance(value, torch.Tensor):
            result = value.detach().clone().requires_grad_(value.requires_grad) if value.is_leaf else value.clone()
        elif isinstance(value, tuple) and hasattr(value, "_fields"):
            result = type(value)(*(copy_of(v) for v in value))
        elif isinstance(value, (tuple, list)):
            result = type(value)(copy_of(v) for v in value)
        elif isinstance(value, dict):
            result = copy.copy(value)
            for key in value:
                result[key] = copy_of(value[key])
        elif isinstance(value, (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)):
            return value
        else:
            try:
                result = copy.deepcopy(value)
            except Exception:  # an object that cannot be copied is passed as it is
                result = value
        memo[id(value)] = result
        return result

    return tuple(copy_of(a) for a in args), {key: copy_of(v) for key, v in kwargs.items()}


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (tuple, list)):
        for value in tree:
            yield from _tensors(value)


def _refuse_meta(model: nn.Module, role: str) -> None:
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.device.type == "meta":
                raise FxlopError(
                    f"verify: the {role} model's {kind} {name!r} is on the meta device: it has no values, so nothing "
                    f"can be computed or compared; materialize the model first (model.to_empty(device='cpu') and "
                    f"load its weights)")


def _refuse_meta_inputs(inputs) -> None:
    if any(t.device.type == "meta" for t in _tensors(inputs)):
        raise FxlopError("verify: example_inputs hold a tensor on the meta device: it has no values to compute with")


def _paired_leaves(expected: Any, got: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping) or set(expected) != set(got):
            raise EquivalenceError(f"{path}: expected a mapping with keys {sorted(map(str, expected))}, "
                                   f"got {type(got).__name__}")
        for key in expected:
            yield from _paired_leaves(expected[key], got[key], f"{path}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise EquivalenceError(f"{path}: expected a sequence of {len(expected)}, got {type(got).__name__}")
        for i, (exp, out) in enumerate(zip(expected, got)):
            yield from _paired_leaves(exp, out, f"{path}[{i}]")
    else:
        yield path, expected, got


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
    except NotImplementedError:  # torch.export's modules keep the mode they were exported in
        pass
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


# ---------------------------------------------------------------------------------------------------
# which modules are compared, and how each model reports them


def _layer_key(name: str) -> str:
    """The name two models share for one layer: a graph names a functional layer by its weight."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


class _Side:
    """How one model reports the values of its layers: forward hooks on modules it calls, and probes
    in a copy of its graph for layers that are a stretch of a graph (expanded traced layers, layers of
    a ``torch.export`` module)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.hookable: dict[str, nn.Module] = {}  # key -> module called as a module
        self.graph_layers: dict[str, str] = {}  # key -> the layer's name in the graph
        self.containers: dict[str, nn.Module] = {}
        if isinstance(model, fx.GraphModule):
            called = {n.target for n in model.graph.nodes if n.op == "call_module"}
            for name in linear_layer_names(model):
                module = _get(model, name)
                if name in called and isinstance(module, nn.Module):
                    self.hookable[_layer_key(name)] = module
                else:
                    self.graph_layers[_layer_key(name)] = name
            self.modules = {name: _get(model, name) for name in called}
        else:
            for name, module in model.named_modules():
                if name and (module_function(module) is not None
                             or (isinstance(module, ExpandedLayer) and module.call is not None and not module.in_graph)):
                    self.hookable[name] = module
            self.modules = dict(model.named_modules())

    @property
    def layer_keys(self) -> set[str]:
        return set(self.hookable) | set(self.graph_layers)


class _Plan:
    """The modules both models are compared at: their shared layers and the called modules of both
    that contain one (not the models themselves)."""

    def __init__(self, reference: nn.Module, candidate: nn.Module):
        self.sides = (_Side(reference), _Side(candidate))
        # a layer BatchNorm was folded into computes conv + BatchNorm under the conv's name: not compared
        folded = {_layer_key(pair["name"]) for model in (reference, candidate) for pair in _folded(model)}
        shared = (self.sides[0].layer_keys & self.sides[1].layer_keys) - folded
        containers = set()
        for name in set(self.sides[0].modules) & set(self.sides[1].modules):
            if name and name not in shared and any(layer.startswith(name + ".") for layer in shared):
                containers.add(name)
        self.names = shared | containers
        self.layers = shared
        self.containers = containers


def _folded(model: nn.Module) -> list[dict]:
    """The ``{"name", "batchnorm"}`` pairs ``fxlop.fuse(fold_bn=True)`` folded in ``model`` (its report)."""
    section = report_of(model).fold_bn
    return [{"name": pair.name, "batchnorm": pair.batchnorm} for pair in (section.folded if section else ())]


def _graph_sites(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    """The output nodes of the layer ``name``, one per call site (:func:`fxlop.passes.layer_sites`)."""
    return layer_sites(gm, name)


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _probed_graph(gm: fx.GraphModule, layers: dict[str, str]) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its modules) in which each site of the layers ``{key: name}`` passes its
    value through :func:`_graph_probe`."""
    sites = {key: [node.name for node in _graph_sites(gm, name)] for key, name in layers.items()}
    # the copy holds only the modules its graph reads (an expanded layer's parts, not the layer): the
    # sites are found in gm and taken over by node name
    probed = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    probed.meta = dict(getattr(gm, "meta", {}))
    graph = probed.graph
    by_name = {node.name: node for node in graph.nodes}
    for key, names in sites.items():
        for node in (by_name[n] for n in names):
            with graph.inserting_after(node):
                probe = graph.call_function(_graph_probe, (node, key))
            node.replace_all_uses_with(probe, delete_user_cb=lambda user, probe=probe: user is not probe)
    probed.recompile()
    return probed


_local = threading.local()


def _thread_modes() -> list:
    """The caller's thread-local modes that a new thread does not inherit, as context managers to
    enter there: inference mode, autocast per device type, the current CUDA device and stream."""
    modes = []
    if torch.is_inference_mode_enabled():
        modes.append(torch.inference_mode())
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            modes.append(torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type)))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        modes.append(torch.cuda.device(torch.cuda.current_device()))
        modes.append(torch.cuda.stream(torch.cuda.current_stream()))
    return modes


@contextlib.contextmanager
def _entered(modes: list):
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield


#: ops that select or reorder by value: what they return jumps when a value crosses another or a
#: threshold, so within-tolerance rounding before them can change their result
_SELECTING = {"topk", "sort", "argsort", "argmax", "argmin", "kthvalue", "mode", "nms", "gt", "lt", "ge", "le"}
#: these select only in their overload with a dimension (max.dim returns indices; max() is continuous)
_SELECTING_WITH_DIM = {"max", "min", "median", "nanmedian"}


class _SelectionOps(TorchDispatchMode):
    """Records which ops that select or reorder by floating-point values run inside it."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, overload = func.overloadpacket.__name__, func._overloadname
        if name in _SELECTING or (name in _SELECTING_WITH_DIM and overload.startswith("dim")):
            if any(t.is_floating_point() for t in _tensors((args, kwargs or {}))):
                self.seen.add(name)
        return func(*args, **(kwargs or {}))


def _graph_probe(value, key):
    run = getattr(_local, "run", None)
    return value if run is None else run.probe(key, value)


class _Run:
    """One model's run in the lockstep: counts the calls of each compared module."""

    def __init__(self, lockstep: "_Lockstep", role: str):
        self.lockstep = lockstep
        self.role = role
        self.calls: dict[str, int] = {}

    def probe(self, key: str, output, inputs=None):
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        if self.role == "reference":
            self.lockstep.offer((key, call), output, inputs)
            return output
        return self.lockstep.take((key, call), output, inputs)


class _Lockstep:
    """Runs the reference (in a helper thread) and the candidate (in the caller's) taking turns: the
    reference runs until it has produced the value the candidate waits for, then waits itself."""

    def __init__(self, plan: _Plan, tolerance: _Tolerance, tally: _Tally):
        self.plan = plan
        self.tolerance = tolerance
        self.tally = tally
        self.cv = threading.Condition()
        self.turn = "candidate"
        self.pending: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.pending_bytes = 0
        self.wanted: tuple[str, int] | None = None
        self.reference_done = False
        self.reference_result: Any = None
        self.reference_error: BaseException | None = None
        self.stopped = False
        self.draining = False
        self.last_agreed: str | None = None

    # -- the reference's side
    def offer(self, key, output, inputs) -> None:
        if self.draining:  # the candidate has failed: the reference only runs to its end
            return
        snapshot = (_snapshot(output), _snapshot(inputs))
        with self.cv:
            if self.stopped:
                raise _Stop
            self.pending[key] = snapshot
            self.pending_bytes += sum(t.numel() * t.element_size() for t in _tensors(snapshot))
            if key == self.wanted or self.pending_bytes > MAX_PENDING_BYTES:
                self._hand_to("candidate")
                self.cv.wait_for(lambda: self.turn == "reference" or self.stopped)
                if self.stopped:
                    raise _Stop

    def _reference_thread(self, model, args, kwargs, modes) -> None:
        _local.run = _Run(self, "reference")
        try:
            with self.cv:
                self.cv.wait_for(lambda: self.turn == "reference" or self.stopped)
                if self.stopped:
                    return
            with torch.no_grad(), _entered(modes):
                self.reference_result = _call(model, "reference", args, kwargs)
        except _Stop:
            pass
        except BaseException as error:  # handed to the caller's thread
            self.reference_error = error
        finally:
            _local.run = None
            with self.cv:
                self.reference_done = True
                self._hand_to("candidate")

    def _hand_to(self, role: str) -> None:
        self.turn = role
        self.cv.notify_all()

    # -- the candidate's side
    def take(self, key, output, inputs):
        with self.cv:
            self.wanted = key
            while key not in self.pending and not self.reference_done and self.pending_bytes <= MAX_PENDING_BYTES:
                self._hand_to("reference")
                self.cv.wait_for(lambda: self.turn == "candidate")
            self.wanted = None
            if self.reference_error is not None:
                raise self.reference_error
            item = self.pending.pop(key, None)
            if item is not None:
                self.pending_bytes -= sum(t.numel() * t.element_size() for t in _tensors(item))
        name, call = key
        if item is None:
            if self.pending_bytes > MAX_PENDING_BYTES:
                raise EquivalenceError(
                    f"{name!r}: the candidate calls it (call {call + 1}) where the reference, more than "
                    f"{MAX_PENDING_BYTES >> 20} MiB of module outputs ahead, has not: the two models call their "
                    f"layers in a different order")
            return output  # the reference never makes this call: nothing to compare it with
        expected, expected_inputs = item
        kind = "layer" if name in self.plan.layers else "module"
        where = f"{kind} {name!r}" + (f" (call {call + 1})" if call else "")
        after = f"; every compared module before it agreed (last: {self.last_agreed!r})" if self.last_agreed else (
            "; it is the first compared module")
        if inputs is not None and expected_inputs is not None:
            try:
                _compare_tree(expected_inputs, inputs, "input", self.tolerance, _Tally())
            except EquivalenceError as error:
                raise EquivalenceError(f"the models diverge before {where}: its {error}{after}") from None
        if (isinstance(expected, torch.Tensor) and isinstance(output, torch.Tensor) and expected.shape != output.shape
                and expected.numel() == output.numel()):
            # a graph's layer value can be the flat product that the module reshapes on return (Hugging
            # Face's Conv1D: addmm on (batch * tokens, features)): the same elements in the same order
            expected = expected.reshape(output.shape)
        counted = _Tally()
        try:
            _compare_tree(expected, output, "output", self.tolerance, counted)
        except EquivalenceError as error:
            raise EquivalenceError(f"the models diverge at {where}: its {error}{after}") from None
        self.tally.worst = max(self.tally.worst, counted.worst)
        self.tally.meaningful += counted.meaningful
        self.tally.seen += counted.seen
        self.tally.layers += counted.meaningful > 0
        self.last_agreed = name
        return _substitute(output, expected)

    def run(self, args, kwargs):
        reference, candidate = (side.model for side in self.plan.sides)
        handles, runnable = [], []
        try:
            for side, role in zip(self.plan.sides, ("reference", "candidate")):
                runnable.append(self._instrument(side, role, handles))
            thread = threading.Thread(target=self._reference_thread,
                                      args=(runnable[0], *_copy_inputs(args, kwargs), _thread_modes()),
                                      name="fxlop-verify-reference", daemon=True)
            thread.start()
            outer_run = getattr(_local, "run", None)
            _local.run = _Run(self, "candidate")
            try:
                try:
                    got = _call(runnable[1], "candidate", *_copy_inputs(args, kwargs))
                except FxlopError as error:
                    if isinstance(error, EquivalenceError):
                        raise
                    self.draining = True  # if the reference fails on the inputs too, that is the error to report
                    self._finish_reference()
                    raise (self.reference_error or error) from None
                # nothing takes the reference's values any more: it only runs to its end
                self.draining = True
                self._finish_reference()
            finally:
                _local.run = outer_run
                with self.cv:
                    self.stopped = True
                    self._hand_to("reference")
                thread.join()
            if self.reference_error is not None:
                raise self.reference_error
            return self.reference_result, got
        finally:
            for handle in handles:
                handle.remove()
            self.pending.clear()

    def _finish_reference(self) -> None:
        with self.cv:
            while not self.reference_done:
                self._hand_to("reference")
                self.cv.wait_for(lambda: self.turn == "candidate")

    def _instrument(self, side: _Side, role: str, handles: list) -> nn.Module:
        """Hooks on the modules ``side`` calls, a probed copy of its graph for its graph layers; returns
        what to run."""
        for key in sorted(self.plan.names):
            module = side.hookable.get(key) if key in self.plan.layers else side.modules.get(key)
            if module is None:
                continue
            handles.append(module.register_forward_hook(_module_hook(key, role, with_inputs=key in self.plan.layers)))
        graph_layers = {key: name for key, name in side.graph_layers.items() if key in self.plan.layers}
        return _probed_graph(side.model, graph_layers) if graph_layers else side.model


def _module_hook(key: str, role: str, with_inputs: bool):
    def hook(module, args, output):
        run = getattr(_local, "run", None)
        if run is None or run.role != role:  # a module both models share, or a run outside verify
            return None
        inputs = args[0] if with_inputs and len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        return run.probe(key, output, inputs)
    return hook


def _snapshot(tree):
    """A copy of the tensors of ``tree`` (the reference goes on and may write into them)."""
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {key: _snapshot(value) for key, value in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_snapshot(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_snapshot(v) for v in tree)
    return tree


def _substitute(got, expected):
    """``got`` with each tensor replaced by (a copy of) the reference's, on ``got``'s device and dtype."""
    if isinstance(got, torch.Tensor):
        if isinstance(expected, torch.Tensor) and expected.shape == got.shape:
            return expected.to(device=got.device, dtype=got.dtype, copy=True)
        return got
    try:
        if isinstance(got, Mapping):
            result = copy.copy(got)
            for key in got:
                result[key] = _substitute(got[key], expected[key])
            return result
        if isinstance(got, tuple) and hasattr(got, "_fields"):
            return type(got)(*(_substitute(g, e) for g, e in zip(got, expected)))
        if isinstance(got, (tuple, list)):
            return type(got)(_substitute(g, e) for g, e in zip(got, expected))
    except Exception:  # a container that cannot be rebuilt: the candidate's own values (they agreed)
        return got
    return got
