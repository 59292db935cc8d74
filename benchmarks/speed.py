"""Speed and memory of fxlop, as ratios measured side by side in one run.

1. Fine-tuning step (forward + backward + SGD step, the optimizer ``fxlop.finetune`` builds) of the
   expanded model, ``online`` (the default), ``online per layer`` (each layer composing its own kernel:
   the default before same-shape layers were composed together, ``passes.batch``), ``online`` with
   every layer at ``r = 4`` (the default before 1x1 convs and linears got ``pointwise_expansion = 1``)
   and ``chain``, divided by the same step of the compact pruned model; training memory ratio; and
   where the time of one step goes (forward, backward, optimizer; the composition of the kernels
   timed on its own).
2. The fused model against the pruned model it came from: parameters, MACs, inference latency.
3. ``expand`` + ``fuse`` wall time divided by ``torch.fx.symbolic_trace`` + ``copy.deepcopy``.

    python -m benchmarks.speed                 # CPU, writes benchmarks/results/speed.{json,md}
    python -m benchmarks.speed --device cuda --bf16
    python -m benchmarks.speed --quick         # a smoke run with tiny models (seconds)
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import fxlop
from fxlop import passes
from fxlop.models import build_model
from fxlop.prune import prune
from fxlop.optim import make_optimizer as _optimizer
from fxlop.passes import BatchComposer, ExpandedLayer, KernelComposer

from . import common

#: the training configurations of part 1: name -> the model trained, built from the pruned one
STEP_MODES = {
    "compact": copy.deepcopy,
    "online": fxlop.expand,
    "online per layer": lambda m: passes.unbatch_compositions(fxlop.expand(m)),  # no layers composed together
    "online r=4": lambda m: fxlop.expand(m, pointwise_expansion=None),
    "chain": lambda m: fxlop.expand(m, mode="chain"),
}
#: the configurations whose step part 1 also splits into its parts
SPLIT_MODES = ("compact", "online", "online per layer")


def _vit(depth, dim, heads, image=32, patch=4):
    return VisionTransformer(image_size=image, patch_size=patch, num_layers=depth, num_heads=heads, hidden_dim=dim,
                             mlp_dim=4 * dim, num_classes=10)


def step_models(quick: bool):
    """name -> (model factory, batch, input side)."""
    if quick:
        return {"resnet20 (CIFAR), 50 %": (lambda: build_model("resnet20", num_classes=10), 16, 32)}
    return {
        "resnet56 (CIFAR), 50 %": (lambda: build_model("resnet56", num_classes=10), 128, 32),
        "mobilenet_v2, 50 %": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 64, 32),
        "ViT (6 x 192, patch 4), 50 %": (lambda: _vit(6, 192, 3), 64, 32),
    }


def pass_models(quick: bool):
    if quick:
        return {"resnet18, 50 %": (lambda: torchvision.models.resnet18(num_classes=10), 64)}
    return {"resnet50, 50 %": (lambda: torchvision.models.resnet50(), 224),
            "vit_b_16, 50 %": (lambda: torchvision.models.vit_b_16(), 224)}


def pruned_half(factory, side, device):
    torch.manual_seed(0)
    model = factory().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune(model, torch.randn(1, 3, side, side), ratio=0.5)
    return result.model.to(device)


def training_step(model, x, y, bf16):
    optimizer = _optimizer(model, fxlop.TrainOptions(lr=1e-3))  # exactly what fxlop.finetune steps with

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def step_split(model, x, y, bf16, sync, rounds: int = 5) -> dict[str, float]:
    """Milliseconds (the minimum over ``rounds``) of each part of one training step, each part
    synchronized and timed on its own: ``forward`` (loss included), ``backward``, ``optimizer``
    (zero_grad + step); and, for an expanded model, ``compose`` and ``compose_backward``: composing
    every expanded layer's kernel from its factors as the model does (:func:`compositions`) and
    back-propagating a gradient through it, alone (the part of forward and backward that the compact
    model does not have)."""
    optimizer = _optimizer(model, fxlop.TrainOptions(lr=1e-3))
    composers = compositions(model)
    best: dict[str, float] = {}

    def clock(key, function):
        sync()
        began = time.perf_counter()
        result = function()
        sync()
        best[key] = min(best.get(key, float("inf")), 1000 * (time.perf_counter() - began))
        return result

    def loss_of_model():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return F.cross_entropy(model(x).float(), y)

    def kernels():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            composed = [composer(*factors) for composer, factors in composers]
        return [k for kernel in composed for k in (kernel if isinstance(kernel, tuple) else (kernel,))]

    grads = [torch.randn_like(k) for k in kernels()]
    for index in range(rounds + 2):  # two rounds of warm-up
        if index == 2:
            best.clear()
        loss = clock("forward", loss_of_model)
        clock("backward", loss.backward)
        clock("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        if composers:
            composed = clock("compose", kernels)
            clock("compose_backward", lambda: torch.autograd.backward(composed, grads))
            optimizer.zero_grad(set_to_none=True)
    return best


def compositions(model) -> list[tuple]:
    """``(composer, factors)`` of every composition ``model``'s forward makes: in a graph, each call of
    a batch of layers or of one layer's composer (see ``passes.batch``); in an eager model, each layer's."""
    if not isinstance(model, fx.GraphModule):
        return [(m.compose, list(m.factors)) for m in model.modules() if isinstance(m, ExpandedLayer)]
    modules = dict(model.named_modules())
    return [(modules[n.target], [model.get_parameter(a.target) for a in n.args])
            for n in model.graph.find_nodes(op="call_module")
            if type(modules[n.target]) in (KernelComposer, BatchComposer) and "composed" not in n.kwargs]


def training_bytes(model, x, y, bf16) -> int:
    """Peak bytes of one training step: parameters, gradients and momentum, plus every tensor
    autograd saves for the backward pass (deduplicated by storage).  On CUDA the allocator's peak."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        training_step(model, x, y, bf16)()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * weights + sum(saved.values())


def bench_training(quick, device, bf16, repeats, steps):
    """Part 1, one row per model of :func:`step_models`."""
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, (factory, batch, side) in step_models(quick).items():
        pruned = pruned_half(factory, side, device)
        x = torch.randn(batch, 3, side, side, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        models = {k: build(pruned).train() for k, build in STEP_MODES.items()}
        step_fns = {k: training_step(m, x, y, bf16) for k, m in models.items()}
        # the first few steps of a model are several times slower (oneDNN sets up its kernels): warm up
        times = common.interleaved({k: (lambda f=f: [f() for _ in range(steps)]) for k, f in step_fns.items()},
                                   repeats=repeats, warmup=5, sync=sync)
        memory = {k: training_bytes(m, x, y, bf16) for k, m in models.items()}
        split = {k: step_split(models[k], x, y, bf16, sync, rounds=2 if quick else 5) for k in SPLIT_MODES}
        rows.append({
            "model": name, "batch": batch, "input": side,
            "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
            "step_ms": {k: 1000 * min(v) / steps for k, v in times.items()},
            "step_ratio": {k: common.ratio_stats(times, k, "compact") for k in models if k != "compact"},
            "memory_bytes": memory,
            "memory_ratio": {k: memory[k] / memory["compact"] for k in models if k != "compact"},
            "split_ms": split,
        })
        print(f"training step {name}: " + ", ".join(f"{k} {common.fmt(v)}" for k, v in rows[-1]["step_ratio"].items())
              + ", memory " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1]["memory_ratio"].items())
              + f"; split {split}", flush=True)
    return rows


def bench_deployment(quick, device, repeats, calls):
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, (factory, batch, side) in step_models(quick).items():
        pruned = pruned_half(factory, side, device).eval()
        expanded = fxlop.expand(pruned)
        with torch.no_grad():
            for p in expanded.parameters():  # as if fine-tuned: the fused weights differ from the pruned ones
                p.add_(torch.randn_like(p) * 0.01 * p.std())
        fused = fxlop.fuse(expanded).eval()
        x = torch.randn(batch, 3, side, side, device=device)
        macs_pruned, params_pruned = tp.utils.count_ops_and_params(pruned, x[:1])
        macs_fused, params_fused = tp.utils.count_ops_and_params(fused, x[:1])

        def infer(model):
            def run():
                with torch.no_grad():
                    for _ in range(calls):
                        model(x)
            return run
        # control: the pruned model traced by FX, untouched by fxlop; its ratio is this machine's noise
        traced = fx.symbolic_trace(pruned).eval()
        times = common.interleaved({"pruned": infer(pruned), "fused": infer(fused), "traced": infer(traced)},
                                   repeats=repeats, warmup=3, sync=sync)
        rows.append({"model": name, "params_pruned": int(params_pruned), "params_fused": int(params_fused),
                     "macs_pruned": float(macs_pruned), "macs_fused": float(macs_fused),
                     "latency_ms": {k: 1000 * min(v) / calls for k, v in times.items()},
                     "latency_ratio": common.ratio_stats(times, "fused", "pruned"),
                     "latency_ratio_control": common.ratio_stats(times, "traced", "pruned")})
        print(f"deployment {name}: params {params_fused == params_pruned}, MACs {macs_fused == macs_pruned}, "
              f"latency {common.fmt(rows[-1]['latency_ratio'], 3)}", flush=True)
    return rows


def bench_passes(quick, repeats, device=torch.device("cpu")):
    """expand + fuse at expansion 4 (the time and memory limits lifted: this measures them, on ``device``)
    against trace + deepcopy, with the estimate expand made first."""
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    unbounded = dict(max_bytes=None, max_seconds=None, max_layer_params=None)
    for name, (factory, side) in pass_models(quick).items():
        pruned = pruned_half(factory, side, device)

        def baseline():
            copy.deepcopy(fx.symbolic_trace(pruned))

        def passes():
            fxlop.fuse(fxlop.expand(pruned, **unbounded))

        expanded = fxlop.expand(pruned, **unbounded)
        shapes = [p.shape for p in expanded.parameters()]
        found = fxlop.report(expanded).expand.estimate
        estimate = {"seconds": {"expand": found.expand_seconds, "fuse": found.fuse_seconds}}
        del expanded

        def floor():
            # what any expansion must at least do: fill the expanded parameters with random numbers
            [torch.randn(shape, device=device) for shape in shapes]
        times = common.interleaved({"trace+deepcopy": baseline, "expand+fuse": passes, "randn(expanded)": floor},
                                   repeats=repeats, warmup=0, sync=sync)
        params = sum(p.numel() for p in pruned.parameters())
        rows.append({"model": name, "params": params, "seconds": {k: min(v) for k, v in times.items()},
                     "params_expanded": sum(shape.numel() for shape in shapes),
                     "estimated_seconds": estimate["seconds"],
                     "ratio": common.ratio_stats(times, "expand+fuse", "trace+deepcopy"),
                     "floor_ratio": common.ratio_stats(times, "randn(expanded)", "trace+deepcopy")})
        print(f"passes {name}: {rows[-1]['seconds']}, estimated {estimate['seconds']}, "
              f"ratio {common.fmt(rows[-1]['ratio'], 1)}", flush=True)
    return rows


def markdown(result) -> str:
    lines = [f"Measured {result['machine']['date']} on {result['machine']['cpu']} "
             f"({result['machine']['torch_threads']} threads, torch {result['machine']['torch']}, "
             f"device {result['device']}{', bf16 autocast' if result['bf16'] else ''}). Ratios: median (min-max) "
             f"over {result['repeats']} interleaved rounds.", ""]
    modes = [k for k in STEP_MODES if k != "compact"]
    lines += ["| model (pruned) | batch | compact step ms | " + " | ".join(f"{k} / compact" for k in modes) + " | "
              + " | ".join(f"memory {k} / compact" for k in modes) + " | params " + " / ".join(STEP_MODES) + " |",
              "|---|---|---|" + "---|" * (2 * len(modes) + 1)]
    for r in result["training"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['step_ms']['compact']:.1f} | "
                     + " | ".join(common.fmt(r["step_ratio"][k]) for k in modes) + " | "
                     + " | ".join(f"{r['memory_ratio'][k]:.2f}" for k in modes) + " | "
                     + " / ".join(f"{r['params'][k] / 1e6:.2f}M" for k in STEP_MODES) + " |")
    lines += ["", "Where one training step's time goes (ms, each part timed on its own, the minimum over rounds): "
              "forward and backward include the composition of the kernels, which is also timed alone.", "",
              "| model (pruned) | model | forward | of it composing | backward | of it composing | optimizer | sum |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        for k, split in r["split_ms"].items():
            compose = (f"{split['compose']:.1f}", f"{split['compose_backward']:.1f}") if "compose" in split else ("-", "-")
            lines.append(f"| {r['model']} | {k} | {split['forward']:.1f} | {compose[0]} | {split['backward']:.1f} | "
                         f"{compose[1]} | {split['optimizer']:.1f} | "
                         f"{split['forward'] + split['backward'] + split['optimizer']:.1f} |")
    lines += ["", "| model | params pruned = fused | MACs pruned = fused | inference fused / pruned | "
              "control: FX-traced pruned / pruned |", "|---|---|---|---|---|"]
    for r in result["deployment"]:
        lines.append(f"| {r['model']} | {r['params_pruned']:,} = {r['params_fused']:,} | "
                     f"{r['macs_pruned']:,.0f} = {r['macs_fused']:,.0f} | {common.fmt(r['latency_ratio'], 3)} | "
                     f"{common.fmt(r['latency_ratio_control'], 3)} |")
    lines += ["", "| model | params | expanded params | trace + deepcopy s | expand + fuse s | ratio | "
              "floor: randn of the expanded params / trace + deepcopy |", "|---|---|---|---|---|---|---|"]
    for r in result["passes"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['params_expanded']:,} | "
                     f"{r['seconds']['trace+deepcopy']:.3f} | {r['seconds']['expand+fuse']:.2f} | "
                     f"{common.fmt(r['ratio'], 1)} | {common.fmt(r['floor_ratio'], 1)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny models, few repeats: checks the script runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default=None, help="result file name (default speed, speed_cuda, speed_quick)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    repeats = 2 if args.quick else args.repeats
    result = {"machine": common.machine(), "device": str(device), "bf16": args.bf16, "repeats": repeats,
              "training": bench_training(args.quick, device, args.bf16, repeats, steps=1 if args.quick else 3),
              "deployment": bench_deployment(args.quick, device, repeats, calls=2 if args.quick else 10),
              "passes": bench_passes(args.quick, 1 if args.quick else 3, device)}
    name = args.name or ("speed_quick" if args.quick else "speed" if device.type == "cpu" else "speed_cuda")
    table = markdown(result)
    common.write(name, result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
