"""The ``fxlop`` command line: ``run`` the whole job, or ``expand``/``fuse``/``verify`` saved models."""
from __future__ import annotations

import argparse
import sys

import torch

from .errors import EquivalenceError, FxlopError

_RUN_HELP = ("train or load a dense model, prune it, fine-tune it with plain fine-tuning and with LOP (expand, "
             "SP distillation, fuse), deploy the best on a validation split after verifying it, and report all")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
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
    from passes.expand import MAX_BYTES, MAX_LAYER_PARAMS, MAX_SECONDS

    from .pipeline import DEFAULT_MODEL, DEFAULT_MODELS, METHODS, RunSettings
    from .train import FACTOR_LRS, SP_WEIGHTINGS

    defaults = RunSettings()
    parser = argparse.ArgumentParser(prog="fxlop", description="Linear over-parameterization of pruned networks.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help=_RUN_HELP, description=_RUN_HELP[0].upper() + _RUN_HELP[1:] + ".",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = run.add_argument_group("data and model")
    data.add_argument("--model", default=defaults.model,
                      help=f"resnet20, resnet56, vgg16 (CIFAR-style), cnn1d or resnet1d (1-D signals) or any torchvision "
                           f"classification model name (default: {DEFAULT_MODEL}; "
                           + ", ".join(f"{v} for {k}" for k, v in DEFAULT_MODELS.items()) + ")")
    data.add_argument("--weights", help="a saved dense model (whole module or state_dict) instead of training one")
    data.add_argument("--dataset", default=defaults.dataset, help="digits or mnist1d (embedded), cifar10, cifar100, imagefolder")
    data.add_argument("--data-dir", help="directory holding the dataset (cifar10, cifar100, imagefolder)")
    data.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs internet)")
    data.add_argument("--image-size", type=int, help="input side (digits: 16 or 32; imagefolder: 224)")
    data.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                      help="validation split carved from the training data: chooses what --method auto deploys, "
                           "and draws the per-epoch curves")
    prune = run.add_argument_group("pruning (torch-pruning)")
    prune.add_argument("--ratio", type=float, default=defaults.ratio, help="channel pruning ratio in (0, 1)")
    prune.add_argument("--importance", default=defaults.importance, help="l1, l2, taylor, lamp, fpgm, random")
    prune.add_argument("--global-pruning", action="store_true", help="rank channels across layers")
    prune.add_argument("--iterative-steps", type=int, default=defaults.iterative_steps)
    tune = run.add_argument_group("fine-tuning")
    tune.add_argument("--method", choices=METHODS, default=defaults.method,
                      help="auto: fine-tune every --candidates method and deploy the best on the validation split; "
                           "otherwise that method (vanilla always runs beside it, for comparison)")
    tune.add_argument("--candidates", nargs="+", choices=METHODS[1:], default=defaults.candidates,
                      help="the methods --method auto compares")
    tune.add_argument("--epochs", type=int, default=defaults.epochs)
    tune.add_argument("--lr", type=float, default=defaults.lr)
    tune.add_argument("--batch-size", type=int, default=defaults.batch_size)
    tune.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    tune.add_argument("--factor-weight-decay", type=float, help="weight decay of the LOP factors (default: same)")
    tune.add_argument("--factor-lr-scale", type=float, default=defaults.factor_lr_scale,
                      help="learning rate of the LOP factors relative to --lr (normalized: the outer factors' gain)")
    tune.add_argument("--factor-lr", choices=FACTOR_LRS, default=defaults.factor_lr,
                      help="uniform: every factor at lr * scale; normalized: each divided by its gain in LOP's "
                           "preconditioner")
    tune.add_argument("--gamma", type=float, default=defaults.gamma, help="weight of the SP distillation loss")
    tune.add_argument("--sp-weighting", choices=SP_WEIGHTINGS, default=defaults.sp_weighting,
                      help="relative: --gamma is the SP / cross-entropy ratio on the first batch")
    tune.add_argument("--taps", nargs="+", help="layer names or globs for SP (default: every conv/linear layer)")
    tune.add_argument("--tap-reduction", choices=("sum", "mean"), default=defaults.tap_reduction)
    tune.add_argument("--dense-epochs", type=int, default=defaults.dense_epochs)
    tune.add_argument("--dense-lr", type=float, default=defaults.dense_lr)
    tune.add_argument("--bf16", action="store_true", help="bf16 autocast")
    lop = run.add_argument_group("expansion")
    lop.add_argument("--expansion", type=float, default=defaults.expansion, help="width multiplier r")
    lop.add_argument("--mode", choices=("online", "chain"), default=defaults.mode)
    lop.add_argument("--depth", type=int, default=defaults.depth)
    lop.add_argument("--init", choices=("orthogonal", "balanced"), default=defaults.init,
                     help="factor scales: orthonormal outer factors, or all factors at one spectral norm")
    misc = run.add_argument_group("output")
    misc.add_argument("--seed", type=int, default=defaults.seed)
    misc.add_argument("--workers", type=int, default=defaults.workers, help="data loader workers")
    misc.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    misc.add_argument("--out", default=defaults.out, help="directory for model.pt, report.json, curves.png, logs")
    misc.add_argument("--json", help="also write the final metrics to this file")
    misc.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)

    expand = commands.add_parser("expand", help="expand a saved model (torch.save of an nn.Module)")
    expand.add_argument("input")
    expand.add_argument("output")
    expand.add_argument("--expansion", type=float, default=4)
    expand.add_argument("--mode", choices=("online", "chain"), default="online")
    expand.add_argument("--depth", type=int, default=3)
    expand.add_argument("--include", nargs="+", help="qualified-name globs to expand")
    expand.add_argument("--exclude", nargs="+", help="qualified-name globs to leave alone")
    expand.add_argument("--seed", type=int, default=0)
    expand.add_argument("--max-params", type=int, help="refuse an expansion above this many parameters")
    expand.add_argument("--max-bytes", type=_limit(int), default=MAX_BYTES,
                        help="refuse an expansion estimated above this many bytes (float64 temporaries included; "
                             "'none': no limit)")
    expand.add_argument("--max-seconds", type=_limit(float), default=MAX_SECONDS,
                        help="refuse an expansion estimated to take longer ('none': no limit)")
    expand.add_argument("--max-layer-params", type=_limit(int), default=MAX_LAYER_PARAMS,
                        help="a layer whose factors would hold more is expanded less, or left dense ('none': no limit)")
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


def _limit(kind):
    """An argparse type for a limit: a number, or 'none' for no limit."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _run(args) -> int:
    from .pipeline import RunSettings, run

    fields = RunSettings.__dataclass_fields__
    settings = RunSettings(**{k: v for k, v in vars(args).items() if k in fields})
    run(settings, progress=False if args.quiet else None)
    return 0


def _expand(args) -> int:
    from .core import expand
    from .models import load_model

    gm = expand(load_model(args.input), expansion=args.expansion, mode=args.mode, depth=args.depth,
                include=args.include, exclude=args.exclude, seed=args.seed, max_params=args.max_params,
                max_bytes=args.max_bytes, max_seconds=args.max_seconds, max_layer_params=args.max_layer_params)
    report = gm.meta["fxlop"]["expand"]
    torch.save(gm, args.output)
    print(f"expanded {len(report['expanded'])} layers ({report['params_before']:,} -> {report['params_after']:,} "
          f"parameters), skipped {len(report['skipped'])}; saved {args.output}")
    for skipped in report["skipped"]:
        print(f"  skipped {skipped['name']}: {skipped['reason']}")
    return 0


def _fuse(args) -> int:
    from passes.expanded import ExpandedLayer

    from .core import fuse, report
    from .models import load_model

    model = load_model(args.input)
    if not any(isinstance(m, ExpandedLayer) for m in model.modules()):
        raise FxlopError(f"{args.input} holds no expanded layer: fuse takes a model saved by fxlop expand")
    fused = fuse(model, fold_bn=args.fold_bn)
    done = report(fused)["fuse"]
    torch.save(fused, args.output)
    print(f"fused {len(done['fused'])} layers ({done['params']:,} parameters); saved {args.output}")
    return 0


def _verify(args) -> int:
    from .models import load_model
    from .verify import verify

    try:
        shape = tuple(int(s) for s in args.input_shape.split(","))
    except ValueError:
        raise FxlopError(f"--input-shape takes comma-separated integers such as 2,3,32,32, got {args.input_shape!r}")
    if any(s < 0 for s in shape):
        raise FxlopError(f"--input-shape takes non-negative sizes, got {args.input_shape!r}")
    reference, candidate = load_model(args.reference), load_model(args.candidate)
    floats = [t.dtype for t in (*reference.parameters(), *reference.buffers()) if t.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(dtype)
    error = verify(reference, candidate, x, rtol=args.rtol, atol=args.atol)
    print(f"equivalent: largest relative error {error:.3e}")
    return 0
