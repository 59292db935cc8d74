"""The options of an expansion: one frozen, typed description, checked once where it is made.

Every entry point takes an :class:`ExpandOptions` or its fields (the passes' :func:`expand` and
:func:`expand_modules`, ``fxlop.expand``, ``fxlop.overparameterized``, ``fxlop run``), and the
command line builds its flags from the fields' metadata (:func:`option`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from numbers import Integral, Real
from typing import Any

from .errors import ExpansionError
from .expanded import MODES
from .select import Patterns, selector

INITS = ("orthogonal", "balanced")
# The default limits.  Refusing before anything is allocated is the point: an expansion that does not
# fit must fail in a second, not after minutes or with the machine out of memory.
MAX_LAYER_PARAMS = 2 ** 26
"""A layer whose factors would hold more parameters (256 MiB in fp32) is expanded at the largest lower
expansion that fits, in steps of 1/4, or left dense."""
MAX_BYTES = 2 ** 32
"""An expansion estimated to add more memory than this (float64 temporaries included) is refused."""
MAX_SECONDS = 60.0
"""An expansion estimated to take longer than this (expand and the fuse it will need, on the model's
device) is refused."""
#: the largest width multiplier accepted at all (ExpandNets use 4): past it the widths alone are absurd,
#: and refusing costs nothing, where planning a layer at such widths would overflow the estimates
MAX_EXPANSION = 1024
POINTWISE_EXPANSION = 1.0
"""Width multiplier of layers without a spatial kernel (1x1 convs, linears, products) unless told
otherwise: their middle factor is a matrix of ``r^2`` times the weight's entries, while LOP's first-order
update does not depend on the widths (see the theory page)."""


def option(default: Any, help: str, *, choices: tuple | None = None, parse: Callable[[str], Any] | None = None,
           many: bool = False, cli: bool = True):
    """A field of a settings dataclass with what a command line needs to offer it.

    Args:
        default: the field's default (a list is copied for every instance).
        help: one line for ``--help``.
        choices: the values accepted.
        parse: how a command-line word becomes the value (default: from the field's annotation).
        many: the flag takes one or more words (a list).
        cli: whether the command line offers the field at all.

    Returns:
        A ``dataclasses.field`` whose metadata holds the above.
    """
    metadata = {"help": help, "choices": choices, "parse": parse, "many": many, "cli": cli}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def replaced(kind: type, base: Any, fields: dict[str, Any], error: Callable[[str], Exception],
             what: str = "option") -> Any:
    """``base`` (``None``: ``kind``'s defaults) with ``fields`` replaced; the one refusal of unknown names.

    Args:
        kind: a dataclass of settings (:class:`ExpandOptions`, fxlop's ``TrainOptions``).
        base: an instance of ``kind``, or ``None``.
        fields: the fields to replace, by name.
        error: makes the exception to raise from its message (an exception class will do).
        what: how the message names one field (``"expansion option"``).

    Raises:
        error: a name in ``fields`` that is not a field of ``kind``; its message lists the fields.
    """
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = [name for name in fields if name not in known]
    if unknown:
        raise error(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                    f"the options are {', '.join(known)}")
    return dataclasses.replace(base, **fields) if base is not None else kind(**fields)


def limit(kind: type) -> Callable[[str], Any]:
    """A command-line parser for a limit: a number of ``kind``, or ``none`` for no limit."""
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


@dataclasses.dataclass(frozen=True)
class ExpandOptions:
    """How to expand: widths, mode, depth, initialization, seed, selection, tracing and limits.

    Checked when made: a value of the wrong type or out of range raises :class:`ExpansionError`
    naming it, and a bad pattern :class:`SelectionError`.  Patterns given as an iterable are kept as a
    tuple.  ``None`` lifts a limit.

    Attributes:
        expansion: width multiplier ``r`` (``>= 1``) of the hidden widths of layers with a spatial kernel.
        pointwise_expansion: ``r`` of 1x1 convs, linears and products (default 1: square outer
            factors); ``None``: ``expansion``.
        mode: ``"online"`` composes the factors into one kernel in the graph (about the compact model's
            cost); ``"chain"`` runs one op per factor.  Same function, same gradients.
        depth: linear ops per expanded layer, ``>= 2``.
        init: ``"orthogonal"`` (orthonormal outer factors, the kernel factor carries the layer's scale)
            or ``"balanced"`` (every factor at the same spectral norm).
        seed: seed of the random factors; each layer draws from a generator on its weight's device
            seeded by ``seed`` and its name.
        include: qualified-name globs or module types to expand; a functional call matches the module
            type of its functional (``F.conv2d`` ~ ``nn.Conv2d``, products ~ ``nn.Linear``) and the name
            of its weight.
        exclude: globs or module types to leave alone, matched as ``include``.
        leaf_modules: globs or module types not to trace into (data-dependent control flow).
        trace: expand a traced graph (True) or swap the modules of the model itself (False).
        max_params: refuse an expansion whose model would hold more parameters.
        max_bytes: refuse an expansion estimated to add more memory (the factors, a copy of the
            parameters, the largest layer's float64 temporaries).
        max_seconds: refuse an expansion estimated to take longer, expand and a later fuse, at speeds
            measured once per process on the model's device.
        max_layer_params: a layer whose factors would hold more is expanded at the largest lower
            expansion that fits (steps of 1/4) or, if even 1 does not fit, left dense.
    """

    expansion: float = option(4.0, "width multiplier r of the hidden widths of layers with a spatial kernel")
    pointwise_expansion: float | None = option(POINTWISE_EXPANSION, "r of 1x1 convs and linears ('none': "
                                                                    "--expansion); their middle factor grows as r^2",
                                               parse=limit(float))
    mode: str = option("online", "online: factors composed into one kernel in the graph; chain: one op per factor",
                       choices=MODES)
    depth: int = option(3, "linear ops per expanded layer")
    init: str = option("orthogonal", "orthonormal outer factors, or all factors at one spectral norm", choices=INITS)
    seed: int = option(0, "seed of the factors (fxlop run: its --seed)", cli=False)
    include: Patterns = option(None, "qualified-name globs of the layers to expand", parse=str, many=True)
    exclude: Patterns = option(None, "qualified-name globs of the layers to leave alone", parse=str, many=True)
    leaf_modules: Patterns = option(None, "qualified-name globs of modules not to trace into", parse=str, many=True)
    trace: bool = option(True, "expand a traced graph (--no-trace: swap the model's own modules)")
    max_params: int | None = option(None, "refuse an expansion above this many parameters ('none': no limit)",
                                    parse=limit(int))
    max_bytes: int | None = option(MAX_BYTES, "refuse an expansion estimated above this many bytes ('none': no "
                                              "limit)", parse=limit(int))
    max_seconds: float | None = option(MAX_SECONDS, "refuse an expansion estimated to take longer ('none': no "
                                                    "limit)", parse=limit(float))
    max_layer_params: int | None = option(MAX_LAYER_PARAMS, "a layer whose factors would hold more is expanded "
                                                            "less, or left dense ('none': no limit)",
                                          parse=limit(int))

    def __post_init__(self):
        for name in ("include", "exclude", "leaf_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, type)) and isinstance(value, Iterable):
                object.__setattr__(self, name, tuple(value))
            selector(getattr(self, name))  # a bad pattern is refused now
        if not isinstance(self.seed, Integral) or isinstance(self.seed, bool):
            raise ExpansionError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))  # a NumPy integer too; reports stay plain JSON
        if self.init not in INITS:
            raise ExpansionError(f"init must be one of {INITS}, got {self.init!r}")
        if self.mode not in MODES:
            raise ExpansionError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not _multiplier(self.expansion):
            raise ExpansionError(f"expansion must be a finite number >= 1, got {self.expansion!r} "
                                 f"(at most {MAX_EXPANSION})")
        if self.pointwise_expansion is not None and not _multiplier(self.pointwise_expansion):
            raise ExpansionError(f"pointwise_expansion must be a finite number >= 1 or None, got "
                                 f"{self.pointwise_expansion!r} (at most {MAX_EXPANSION})")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 2:
            raise ExpansionError(f"depth must be an integer >= 2, got {self.depth!r}")
        if not isinstance(self.trace, bool):
            raise ExpansionError(f"trace must be True or False, got {self.trace!r}")
        for name in ("max_params", "max_bytes", "max_layer_params"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ExpansionError(f"{name} must be a non-negative integer or None, got {value!r}")
        if self.max_seconds is not None and (not isinstance(self.max_seconds, Real)
                                             or isinstance(self.max_seconds, bool) or not self.max_seconds > 0):
            raise ExpansionError(f"max_seconds must be a positive number or None, got {self.max_seconds!r}")

    @classmethod
    def of(cls, options: ExpandOptions | None = None, /, **fields) -> ExpandOptions:
        """``options`` (default: the defaults) with ``fields`` replaced, checked.

        Raises:
            ExpansionError: ``options`` is not an ExpandOptions, a field name is unknown, or a value bad.
        """
        if options is not None and not isinstance(options, cls):
            raise ExpansionError(f"options must be an ExpandOptions, got {type(options).__name__}")
        return replaced(cls, options, fields, ExpansionError, "expansion option")

    @property
    def limits(self) -> dict[str, int | float | None]:
        """The four limits by name."""
        return {"max_params": self.max_params, "max_bytes": self.max_bytes, "max_seconds": self.max_seconds,
                "max_layer_params": self.max_layer_params}


def _multiplier(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and 1 <= value <= MAX_EXPANSION


__all__ = ["ExpandOptions", "option", "limit", "INITS", "MAX_LAYER_PARAMS", "MAX_BYTES", "MAX_SECONDS",
           "MAX_EXPANSION", "POINTWISE_EXPANSION"]
