"""The ``fxlop`` command line: ``run`` the whole job, or ``expand``/``fuse``/``verify`` saved models."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing

import torch

from .errors import EquivalenceError, FxlopError, fxlop_errors

#: the most elements ``fxlop verify --input-shape`` allocates (512 MiB of fp32)
MAX_INPUT_ELEMENTS = 2 ** 27

_RUN_HELP = ("train or load a dense model, prune it, fine-tune it with plain fine-tuning and with LOP (expand, "
             "SP distillation, fuse), deploy the best on a validation split after verifying it, and report all")


class _UsageError(Exception):
    """A command line argparse refuses (raised instead of argparse's usage text and exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a refused command line reported like every other error: one ``fxlop: error:``
    line and exit code 1 (``--help`` still prints the usage)."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``.

    Args:
        argv: the arguments after the program name (``["run", "--epochs", "2"]``); ``None``:
            ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success; 1 for any refused input or failure, reported as one
        ``fxlop: error:`` line on stderr (``fxlop: not equivalent:`` when verify finds a difference);
        130 when interrupted.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as error:
        print(f"fxlop: error: {error}", file=sys.stderr)
        return 1
    try:
        with fxlop_errors():  # a subcommand may call the passes directly
            return args.handler(args)
    except EquivalenceError as error:
        print(f"fxlop: not equivalent: {error}", file=sys.stderr)
        return 1
    except (FxlopError, OSError) as error:
        print(f"fxlop: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxlop: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from .passes import ExpandOptions
    from .pipeline import RunOptions

    defaults = RunOptions()
    parser = _Parser(prog="fxlop", description="Linear over-parameterization of pruned networks.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help=_RUN_HELP, description=_RUN_HELP[0].upper() + _RUN_HELP[1:] + ".",
                              formatter_class=_DefaultsHelp)
    for title, names in _RUN_GROUPS:
        group = run.add_argument_group(title)
        for name in names:
            if name == "train":
                _add_settings(group, defaults.train)
            elif name == "expand":
                _add_settings(group, defaults.expand)
            else:
                _add_settings(group, defaults, only=(name,))
    run.add_argument_group("output").add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)

    expand = commands.add_parser("expand", help="expand a saved model (torch.save of an nn.Module)",
                                 formatter_class=_DefaultsHelp)
    expand.add_argument("input")
    expand.add_argument("output")
    _add_settings(expand.add_argument_group("expansion"), ExpandOptions(), with_hidden=("seed",))
    expand.set_defaults(handler=_expand)

    fuse = commands.add_parser("fuse", help="fuse a saved expanded model back to its compact architecture")
    fuse.add_argument("input")
    fuse.add_argument("output")
    fuse.add_argument("--fold-bn", action="store_true", help="also fold BatchNorm for deployment")
    fuse.set_defaults(handler=_fuse)

    verify = commands.add_parser("verify", help="check that two saved models compute the same function")
    verify.add_argument("reference")
    verify.add_argument("candidate")
    verify.add_argument("--input-shape", required=True, help="e.g. 2,3,32,32 (random normal inputs)")
    verify.add_argument("--rtol", type=float)
    verify.add_argument("--atol", type=float)
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(handler=_verify)
    return parser


def _run(args) -> int:
    from .pipeline import RunOptions, run

    defaults = RunOptions()
    values = vars(args)

    def pick(instance):
        return dataclasses.replace(instance, **{f.name: values[f.name] for f in dataclasses.fields(instance)
                                                if f.metadata.get("cli", True) and f.name in values})

    settings = dataclasses.replace(pick(defaults), train=pick(defaults.train), expand=pick(defaults.expand))
    run(settings, progress=False if args.quiet else None)
    return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is None or False (unset, or a switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


#: the groups of ``fxlop run --help``: RunOptions fields by name; "train" and "expand" stand for
#: every field of the TrainOptions and ExpandOptions the run holds
_RUN_GROUPS = (
    ("data and model", ("model", "weights", "dataset", "data_dir", "download", "image_size", "val_fraction")),
    ("pruning (torch-pruning)", ("ratio", "importance", "global_pruning", "iterative_steps", "rounds")),
    ("fine-tuning", ("method", "candidates", "train", "batch_size", "dense_epochs", "dense_lr")),
    ("expansion", ("expand",)),
    ("output", ("seed", "workers", "device", "out", "json")),
)


def _add_settings(group, instance, only=None, with_hidden=()) -> None:
    """One flag per field of a settings dataclass (``--field-name``), with its help, choices and parser
    from the field's metadata (``fxlop.passes.option``; else typed from its annotation) and its value
    in ``instance`` as the default.  ``with_hidden``: fields offered although their metadata says not
    (``fxlop expand --seed``: in ``fxlop run`` the run's own ``--seed`` sets it)."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        if only is not None and field.name not in only:
            continue
        if not field.metadata.get("cli", True) and field.name not in with_hidden:
            continue
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = getattr(instance, field.name)
        options = {"help": field.metadata.get("help"), "default": list(default) if isinstance(default, tuple)
                   else default}
        if field.metadata.get("choices"):
            options["choices"] = field.metadata["choices"]
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif field.metadata.get("parse") is not None:
            options["type"] = field.metadata["parse"]
            if field.metadata.get("many"):
                options["nargs"] = "+"
        elif typing.get_origin(kind) is list:
            options.update(nargs="+", type=typing.get_args(kind)[0])
        else:
            options["type"] = kind
        group.add_argument("--" + field.name.replace("_", "-"), **options)


def _check_output(args) -> None:
    """Refuse, before anything is loaded, an output that is the input or that cannot be written."""
    from .io import check_writable, same_file

    if same_file(args.input, args.output):
        raise FxlopError(f"the output {args.output} is the input: write to another file (the input is kept)")
    check_writable(args.output, "output")


def _expand(args) -> int:
    from .core import expand_with
    from .io import save
    from .models import load_model
    from .passes import ExpandOptions, report_of

    values = vars(args)
    options = ExpandOptions(**{f.name: values[f.name] for f in dataclasses.fields(ExpandOptions)})
    _check_output(args)
    gm = expand_with(load_model(args.input), options)
    report = report_of(gm).expand
    save(gm, args.output)
    print(f"expanded {len(report.expanded)} layers ({report.params_before:,} -> {report.params_after:,} "
          f"parameters), skipped {len(report.skipped)}; saved {args.output}")
    for skipped in report.skipped:
        print(f"  skipped {skipped.name}: {skipped.reason}")
    return 0


def _fuse(args) -> int:
    from .passes import ExpandedLayer

    from .core import fuse, report
    from .io import save
    from .models import load_model

    _check_output(args)
    model = load_model(args.input)
    if not any(isinstance(m, ExpandedLayer) for m in model.modules()):
        raise FxlopError(f"{args.input} holds no expanded layer: fuse takes a model saved by fxlop expand")
    fused = fuse(model, fold_bn=args.fold_bn)
    done = report(fused).fuse
    save(fused, args.output)
    print(f"fused {len(done.fused)} layers ({done.params:,} parameters); saved {args.output}")
    return 0


def _verify(args) -> int:
    from .models import load_model
    from .verify import verify

    try:
        shape = tuple(int(s) for s in args.input_shape.split(","))
    except ValueError:
        raise FxlopError(f"--input-shape takes comma-separated integers such as 2,3,32,32, got {args.input_shape!r}")
    if not shape or any(s < 1 for s in shape):
        raise FxlopError(f"--input-shape takes positive sizes (non-negative sizes and no zero: a batch of at least "
                         f"one input), got {args.input_shape!r}")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise FxlopError(f"--input-shape {args.input_shape} holds {math.prod(shape):,} elements, over the "
                         f"{MAX_INPUT_ELEMENTS:,} verify draws at most: a batch of a few inputs is enough")
    reference, candidate = load_model(args.reference), load_model(args.candidate)
    floats = [t.dtype for t in (*reference.parameters(), *reference.buffers()) if t.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(dtype)
    error = verify(reference, candidate, x, rtol=args.rtol, atol=args.atol)
    print(f"equivalent: largest relative error {error:.3e}")
    return 0
