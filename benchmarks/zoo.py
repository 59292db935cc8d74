"""Every torchvision classification model: traced? pruned 50 %? expand -> perturb -> fuse -> verify.

Each model runs in its own process with a time limit (torch-pruning does not finish on some
models, and the largest ones need all the memory), first pruned, and dense when pruning fails or
runs out of time.  ``fxlop.expand`` runs at its default settings, so the table shows what a user
gets: the wide-layer policy (layers reduced or left dense), and every model either within
``BOUND_SECONDS`` for expand + fuse and ``BOUND_BYTES`` of peak resident memory, or refused at once
with the ExpansionError's message.  A refused model is then expanded at the first of expansion 2, 1
that fits the limits (at 1 with the time and memory limits lifted if none does), so that every
traceable model is round-tripped.  Before anything is compared, the randomly initialized model is
made to depend on its input (see ``make_outputs_depend_on_input``); ``input_sensitivity`` records
how much it does, and a row with too little does not count as a pass.  A round trip passes in fp32
within ``fp32_tolerance``; where deep networks round more than that, it is repeated in float64 and
must be exact there (fxlop.verify's fp64 tolerance, 1e-10).  Peak memory is the process's peak
resident set during the default round trip (the model included; the high-water mark is reset after
pruning, see ``reset_peak_rss``); ``rss_before_expand`` is the peak before it, pruning included.

    python -m benchmarks.zoo                 # all models, writes benchmarks/results/zoo.{json,md}, zoo_summary.md
    python -m benchmarks.zoo resnet18 vit_b_16
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from . import common

SIDES = {"inception_v3": 299}
NUM_CLASSES = 10
#: what issue 13 asks of expand + fuse at default settings: this long, this much resident memory at peak
BOUND_SECONDS = 60.0
BOUND_BYTES = 8e9
#: tried in turn when the default expansion is refused, so that the model is still round-tripped
FALLBACKS = ({"expansion": 2}, {"expansion": 1}, {"expansion": 1, "max_bytes": None, "max_seconds": None})


#: ``max |f(x0) - f(x1)| / max |f(x)|``: below this the logits hardly depend on the input (a random
#: AlexNet's are mostly its last bias: 7e-3).  At 1e-3 an error of 1 % in the part that depends on
#: the input still shows as 1e-5 of the logits, the tolerance.
MIN_INPUT_SENSITIVITY = 1e-3


def fp32_floor(model, x) -> float:
    """The model's own fp32 rounding error: its output against that of a float64 copy."""
    import torch

    from fxlop.verify import relative_error

    with torch.no_grad():
        return relative_error(model(x), copy.deepcopy(model).double()(x.double()))


def fp32_tolerance(row: dict) -> float:
    """The largest fp32 relative error a round trip may show: 1e-5, or four times the model's own fp32
    rounding error (``fp32_floor``: the fp32 model against the same model in fp64) in deep networks
    where that is larger.  Two fp32 evaluations of one function each sit about a floor away from the
    exact result, and the composed weights are rounded once more: 2 x 2."""
    return max(1e-5, 4 * (row.get("fp32_floor") or 0.0))


class PruneTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Interrupt the block after ``seconds`` (torch-pruning loops in Python on some models, so an
    alarm gets through)."""
    def interrupt(signum, frame):
        raise PruneTimeout

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_outputs_depend_on_input(model, x) -> None:
    """Randomly initialized, several torchvision models give every input the same logits, so any
    expansion would "verify": ViT's head starts at zero, and in GoogLeNet or ShuffleNet the signal
    fades to nothing through BatchNorm layers whose running statistics are still the identity.  A
    random head and BatchNorm statistics measured on ``x`` (as a trained model would have) fix both."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0, 0.02)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: one batch gives its own statistics
            norm.train()  # only the norms: auxiliary heads, dropout and the like stay as in eval
        model(x)
        model.eval()


def _round_trip(traced, gm, x):
    """expand error, then perturb every factor of ``gm`` in place, fuse, fuse error; fused, errors, fuse s."""
    import torch

    import fxlop
    from fxlop.verify import relative_error

    with torch.no_grad():
        expand_error = relative_error(gm(x), traced(x))
        for param_name, param in gm.named_parameters():
            if ".factors." in param_name:
                param.add_(torch.randn_like(param) * 0.02 * param.std())
    began = time.perf_counter()
    fused = fxlop.fuse(gm)
    fuse_s = time.perf_counter() - began
    with torch.no_grad():
        fuse_error = relative_error(fused(x), gm(x))
    return fused, expand_error, fuse_error, fuse_s


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes: since :func:`reset_peak_rss` where Linux lets
    it be reset (``VmHWM``), otherwise since the process started (``ru_maxrss``, which Linux reports in KiB)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start :func:`peak_rss` again from the present resident set (Linux: ``clear_refs`` 5), so that
    what pruning held before, and freed (torch-pruning that runs out of time holds gigabytes on Swin),
    does not count as the round trip's; where that is not allowed, the peak stays since the start."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def within_bound(row: dict) -> bool:
    """Expanded and fused at default settings within BOUND_SECONDS and BOUND_BYTES."""
    return ("refused_s" not in row and "peak_rss" in row and row["expand_s"] + row["fuse_s"] <= BOUND_SECONDS
            and row["peak_rss"] <= BOUND_BYTES)


def one(name: str, prune_it: bool, prune_timeout: int) -> dict:
    """The round trip of one model, in this process."""
    import torch
    import torch.fx as fx
    import torchvision

    import fxlop
    from fxlop.prune import prune
    from fxlop.verify import default_rtol, relative_error

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "2")))
    row = {"model": name, "threads": torch.get_num_threads()}
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES).eval()
    side = SIDES.get(name, 224)
    x = torch.randn(2, 3, side, side)
    row["params_dense"] = sum(p.numel() for p in model.parameters())
    try:  # on a shallow copy: torch.fx adds the forward's tensor constants to the root it traces
        fx.symbolic_trace(copy.copy(model))
    except Exception as error:  # every tracing failure is a finding to report
        row["traced"] = False
        row["reason"] = f"symbolic_trace: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return row
    row["traced"] = True
    if prune_it:
        began = time.perf_counter()
        try:
            with warnings.catch_warnings(), _time_limit(prune_timeout):
                warnings.simplefilter("ignore")
                model = prune(model, x[:1], ratio=0.5).model.eval()
            row["pruned"] = True
        except PruneTimeout:
            row["pruned"] = False
            row["prune_timeout"] = prune_timeout  # prune() works on a copy: `model` is still the dense one
        except Exception as error:  # torch-pruning's own failures: the model is used dense
            row["pruned"] = False
            row["prune_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__
        row["prune_s"] = time.perf_counter() - began
    else:
        row["pruned"] = False
    row["params"] = sum(p.numel() for p in model.parameters())
    make_outputs_depend_on_input(model, x)
    with torch.no_grad():
        logits = model(x)
        try:
            row["fp32_floor"] = fp32_floor(model, x)
        except Exception as error:  # a forward that cannot run in float64: 1e-5 stays the tolerance
            row["fp32_floor_error"] = f"{type(error).__name__}: {str(error)[:160]}"
    row["input_sensitivity"] = relative_error(logits[1], logits[0])
    traced = fx.symbolic_trace(copy.copy(model))
    row["rss_before_expand"] = peak_rss()
    reset_peak_rss()
    settings = {}
    for attempt in ({},) + FALLBACKS:
        began = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the wide-layer policy warns; the report says it
                gm = fxlop.expand(model, **attempt)
            row["expand_s"] = time.perf_counter() - began
            settings = attempt
            break
        except fxlop.ExpansionError as error:
            if attempt == FALLBACKS[-1]:
                raise
            if not attempt:
                row["refused_s"] = time.perf_counter() - began
                row["refusal"] = str(error)
    if settings:
        row["fallback"] = settings
    report = fxlop.report(gm).expand
    e = report.estimate
    row.update(expansion=report.options.expansion, expanded=len(report.expanded),
               skipped=fxlop.passes.as_dict(report.skipped), reduced=fxlop.passes.as_dict(report.reduced),
               estimate={"params": e.params, "bytes": e.bytes,
                         "seconds": {"expand": e.expand_seconds, "fuse": e.fuse_seconds}, "device": e.device},
               params_expanded=report.params_after)
    fused, row["expand_error"], row["fuse_error"], row["fuse_s"] = _round_trip(traced, gm, x)
    row["peak_rss"] = peak_rss()  # the default round trip's, before any float64 check below
    row["same_state_dict"] = ({k: tuple(v.shape) for k, v in fused.state_dict().items()}
                              == {k: tuple(v.shape) for k, v in traced.state_dict().items()})
    del gm, fused
    exact = max(row["expand_error"], row["fuse_error"]) <= fp32_tolerance(row)
    if not exact:  # fp32 rounding, or a wrong expansion?  In float64 the round trip must be exact
        model64 = copy.deepcopy(model).double()
        traced64 = fx.symbolic_trace(copy.copy(model64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm64 = fxlop.expand(model64, **{**settings, "max_bytes": None, "max_seconds": None})
        _, expand64, fuse64, _ = _round_trip(traced64, gm64, x.double())
        row["fp64_errors"] = [expand64, fuse64]
        exact = max(expand64, fuse64) <= default_rtol(torch.float64)
    row["ok"] = row["same_state_dict"] and exact and row["input_sensitivity"] >= MIN_INPUT_SENSITIVITY
    if not row["ok"]:
        row["reason"] = ("state_dict keys or shapes differ from the traced model" if not row["same_state_dict"]
                         else f"logits hardly depend on the input ({row['input_sensitivity']:.1e})"
                         if row["input_sensitivity"] < MIN_INPUT_SENSITIVITY
                         else f"fp32 error above {fp32_tolerance(row):.1e} and not exact in float64")
    return row


def run_isolated(name: str, prune_it: bool, timeout: int, prune_timeout: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, "-m", "benchmarks.zoo", "--one", name, "--out", out, "--prune-timeout", str(prune_timeout)]
    if not prune_it:
        command.append("--dense")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=common.ROOT)
    except subprocess.TimeoutExpired:
        return {"model": name, "timeout": True}
    try:
        return json.loads(Path(out).read_text())
    except (OSError, json.JSONDecodeError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"model": name, "crashed": True, "reason": tail[0][:200]}
    finally:
        Path(out).unlink(missing_ok=True)


def _default_cell(r: dict) -> str:
    """What expand did at default settings: within the bound (with the estimate), over it, or refused."""
    if "refused_s" in r:
        estimate = re.search(r"In all: ([\d,]+) parameters, ([\d.]+ [MG]B), ([\d.]+ s)\. ", r["refusal"])
        why = re.search(r"over (max_\w+)", r["refusal"])
        return (f"refused in {r['refused_s']:.1f} s ({why.group(1) if why else '?'}; est. "
                f"{estimate.group(2)}, {estimate.group(3)})" if estimate else f"refused in {r['refused_s']:.1f} s")
    if "peak_rss" not in r:
        return ""
    est = r.get("estimate", {}).get("seconds", {})
    return (f"{'yes' if within_bound(r) else '**no**'} (est. {sum(est.values()):.0f} s)" if est
            else "yes" if within_bound(r) else "**no**")


def _layers_cell(r: dict) -> str:
    dense = [s for s in r.get("skipped", []) if "max_layer_params" in s["reason"]]
    return (f"{r.get('expanded', '')}{' / ' + str(len(r['skipped'])) if 'skipped' in r else ''}"
            + (f" ({len(r['reduced'])} reduced)" if r.get("reduced") else "")
            + (f" ({len(dense)} dense: wide)" if dense else ""))


def markdown(rows: list[dict], machine: dict) -> str:
    ok = sum(bool(r.get("ok")) for r in rows)
    traced = sum(bool(r.get("traced")) for r in rows)
    lines = [f"{len(rows)} torchvision classification models, {traced} traced by symbolic_trace, {ok} round-trip "
             f"(expand -> perturb the factors -> fuse; the exact state_dict; fp32 relative errors within "
             f"max(1e-5, 4 x fp32 floor), the floor being the model's own fp32 error against float64). Input "
             f"sensitivity is `max|f(x0) - f(x1)| / max|f(x)|` of the model compared (a pass needs "
             f">= {MIN_INPUT_SENSITIVITY:g}). 'default' is fxlop.expand at its default settings: within "
             f"{BOUND_SECONDS:.0f} s for expand + fuse and {BOUND_BYTES / 1e9:.0f} GB peak resident memory (with the "
             f"estimate it made first), or refused at once (then r is the fallback that fits). Layers: expanded / "
             f"skipped, reduced or left dense by the wide-layer policy. Measured {machine['date']} on "
             f"{machine['cpu']}, {machine.get('torch_threads', '?')} threads.", "",
             "| model | traced | pruned 50 % | params | default | r | layers | expand s | fuse s | peak RSS GB | "
             "input sensitivity | fp32 floor | expand err | fuse err | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("reason") or r.get("prune_error") or ""
        if r.get("prune_timeout"):
            note = f"torch-pruning gave no result in {r['prune_timeout']} s; dense model used"
        if r.get("fp64_errors"):
            note = (f"{note} fp32 error above {fp32_tolerance(r):.1e}; in float64 expand "
                    f"{r['fp64_errors'][0]:.1e}, fuse {r['fp64_errors'][1]:.1e}").strip()
        if r.get("fallback", {}).get("max_seconds", 0) is None:
            note = f"{note} over the limits even at r=1: round trip with the time and memory limits lifted".strip()
        rss = f"{r['peak_rss'] / 1e9:.1f}" if "peak_rss" in r else ""
        lines.append(
            f"| {r['model']} | {'yes' if r.get('traced') else 'no'} | {'yes' if r.get('pruned') else 'no'} | "
            f"{r.get('params', r.get('params_dense', 0)):,} | {_default_cell(r)} | {r.get('expansion', '')} | "
            f"{_layers_cell(r)} | {r['expand_s']:.1f} | {r['fuse_s']:.1f} | {rss} | "
            f"{r['input_sensitivity']:.2f} | {r.get('fp32_floor', float('nan')):.1e} | {r['expand_error']:.1e} | "
            f"{r['fuse_error']:.1e} | {note} |"
            if "fuse_error" in r else
            f"| {r['model']} | {'yes' if r.get('traced') else 'no'} | | {r.get('params_dense', 0):,} | | | | | | | | | | | "
            f"{note} |")
    return "\n".join(lines)


def summary(rows: list[dict], machine: dict) -> str:
    """The summary the docs' zoo page includes (zoo_summary.md): counts, the bound at default
    settings, and every model that did not round-trip, or did with a caveat, and why."""
    ok = [r for r in rows if r.get("ok")]
    worst = max(ok, key=lambda r: max(r["expand_error"], r["fuse_error"]), default=None)
    worst_text = (f"; largest {max(worst['expand_error'], worst['fuse_error']):.1e} ({worst['model']}, whose own "
                  f"fp32 error is {worst.get('fp32_floor', float('nan')):.1e})" if worst else "")
    measured = [r for r in rows if r.get("traced") and ("peak_rss" in r or "refused_s" in r)]
    within = [r for r in measured if within_bound(r)]
    refused = [r for r in measured if "refused_s" in r]
    slowest = sorted(within, key=lambda r: r["expand_s"] + r["fuse_s"], reverse=True)[:3]
    bound_text = (f" At default settings {len(within)} expand and fuse within {BOUND_SECONDS:.0f} s and "
                  f"{BOUND_BYTES / 1e9:.0f} GB here (slowest: "
                  + ", ".join(f"{r['model']} {r['expand_s'] + r['fuse_s']:.0f} s, {r['peak_rss'] / 1e9:.1f} GB"
                              for r in slowest)
                  + f"), {len(refused)} are refused at once (at most "
                  f"{max((r['refused_s'] for r in refused), default=0):.1f} s) with the estimate and the options that "
                  f"fit, and {len(measured) - len(within) - len(refused)} exceed the bound."
                  if measured else " The rows predate the time and memory bound: rerun to measure it.")
    lines = [f"Of {len(rows)} torchvision classification models, {sum(bool(r.get('traced')) for r in rows)} are "
             f"traced by `symbolic_trace` and {len(ok)} round-trip: pruned 50 % where torch-pruning can, expand, "
             f"perturb every factor, fuse, verify; identical state_dict keys and shapes; fp32 relative error at "
             f"most 1e-5 or four times the model's own fp32 error against float64{worst_text}, or, where deep "
             f"networks round more, exact in float64. {sum(bool(r.get('pruned')) for r in ok)} of them were "
             f"pruned.{bound_text} Full table: [below](#full-table) "
             f"({machine['date']}).", "",
             "| not round-tripped, refused at default settings, or with a caveat | why |", "|---|---|"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['model']} | {r.get('reason') or 'round trip failed'} |")
            continue
        if "refused_s" in r:
            lines.append(f"| {r['model']} (refused; round-trips at r = {r['expansion']:g}) | {_default_cell(r)} |")
        elif "peak_rss" in r and not within_bound(r):
            lines.append(f"| {r['model']} (over the bound) | {r['expand_s'] + r['fuse_s']:.0f} s, "
                         f"{r['peak_rss'] / 1e9:.1f} GB |")
        dense = [s["name"] for s in r.get("skipped", []) if "max_layer_params" in s["reason"]]
        if dense:
            lines.append(f"| {r['model']} (layers left dense) | wider than max_layer_params: {', '.join(dense)} |")
        if r.get("excluded"):  # rows from before the wide-layer policy
            lines.append(f"| {r['model']} (round-trips; layers left dense) | wider than 8192: "
                         f"{', '.join(r['excluded'])} |")
        if not r.get("pruned"):
            why = (f"torch-pruning gave no result within {r['prune_timeout']} s" if r.get("prune_timeout")
                   else f"torch-pruning: {r.get('prune_error', '')}")
            lines.append(f"| {r['model']} (round-trips dense) | {why} |")
        if r.get("fp64_errors"):
            lines.append(f"| {r['model']} (round-trips in float64) | fp32 error {max(r['expand_error'], r['fuse_error']):.1e}"
                         f" is above {fp32_tolerance(r):.1e}; in float64 {max(r['fp64_errors']):.1e} |")
        if r.get("fallback", {}).get("max_seconds", 0) is None:
            lines.append(f"| {r['model']} (round-trips at r = 1, limits lifted) | over the limits even at r = 1 |")
        if r.get("max_params_lifted"):  # rows from before the time and memory limits
            lines.append(f"| {r['model']} (round-trips at r = 1) | over max_params={r['max_params_lifted']:,} "
                         f"even at r = 1: expanded without the guard |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model and attempt")
    parser.add_argument("--prune-timeout", type=int, default=120,
                        help="seconds torch-pruning may take before the model is used dense")
    parser.add_argument("--resume", type=Path, help="reuse the rows of an earlier run's output (JSON lines)")
    parser.add_argument("--render", action="store_true", help="only re-render zoo.md and zoo_summary.md from zoo.json")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((common.RESULTS / "zoo.json").read_text())
        common.write("zoo", result, markdown(result["rows"], result["machine"]))
        (common.RESULTS / "zoo_summary.md").write_text(summary(result["rows"], result["machine"]) + "\n")
        return result
    if args.one:
        try:
            row = one(args.one, not args.dense, args.prune_timeout)
        except Exception as error:  # recorded, so that the table names what failed
            row = {"model": args.one, "crashed": True,
                   "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}",
                   "traceback": traceback.format_exc()[-2000:]}
        Path(args.out).write_text(json.dumps(row))
        return row
    import torchvision

    names = args.models or sorted(torchvision.models.list_models(module=torchvision.models))
    done = {}
    if args.resume:
        for line in args.resume.read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                done[row["model"]] = row
    rows = []
    for name in names:
        if name in done:
            rows.append(done[name])
            continue
        row = run_isolated(name, True, args.timeout, args.prune_timeout)
        if row.get("timeout"):
            row = run_isolated(name, False, args.timeout, args.prune_timeout)
            if row.get("timeout"):
                row["reason"] = f"no result within {args.timeout} s, pruned or dense, on this machine"
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("skipped", "traceback", "refusal")}), flush=True)
    result = {"machine": common.machine(), "rows": rows}
    table = markdown(rows, result["machine"])
    common.write("zoo" if not args.models else "zoo_partial", result, table)
    if not args.models:
        (common.RESULTS / "zoo_summary.md").write_text(summary(rows, result["machine"]) + "\n")
    print(table)


if __name__ == "__main__":
    main()
