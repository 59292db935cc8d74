"""fxlop on a CUDA GPU, in one command: expand / fuse / verify in fp32, under bf16 autocast and on a
bf16 model; a short ``fxlop run --device cuda``; the speed benchmark on CUDA.  Writes its figures and
the card's name to ``benchmarks/results/gpu_check.{json,md}``.

    python -m benchmarks.gpu_check                 # on a machine with a CUDA GPU: a few minutes
    python -m benchmarks.gpu_check --device cpu    # a dry run of the same code paths on the CPU, small sizes

Models: CIFAR ResNet-20 (fxlop.models), torchvision ResNet-18 and ViT-B/16, each pruned 50 % by
torch-pruning (on the CPU, then moved to the device).  Per model and precision it checks that every
factor is made on the model's device and dtype, that the same seed gives the same factors there,
that the expanded and fused models compute the pruned model's function (``fxlop.verify``, whose
tolerance follows the output dtype: fp32 1e-5, bf16 5e-2), and that a bf16-autocast training step of
the expanded model gives finite gradients on the device.  Each check is recorded, passed or failed
with its error, and the script exits 1 if any failed, 2 if there is no GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import fxlop
from fxlop import passes
from fxlop.models import build_model
from fxlop.prune import prune
from fxlop.verify import default_rtol, relative_error

from . import common


def models(dry_run: bool) -> dict:
    """name -> (factory, input side): the GPU set, or small stand-ins for a dry run on the CPU."""
    import torchvision
    from torchvision.models.vision_transformer import VisionTransformer

    if dry_run:
        return {"resnet20 (CIFAR)": (lambda: build_model("resnet20", num_classes=10), 32),
                "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
                "ViT (2 x 64, patch 8)": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                                    num_heads=4, hidden_dim=64, mlp_dim=128,
                                                                    num_classes=10), 32)}
    return {"resnet20 (CIFAR)": (lambda: build_model("resnet20", num_classes=10), 32),
            "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 224),
            "vit_b_16": (lambda: torchvision.models.vit_b_16(num_classes=10), 224)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    synchronize(device)
    began = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - began


def pruned(factory, side: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = factory().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prune(model, torch.randn(1, 3, side, side), ratio=0.5).model.eval()
    with torch.no_grad():  # a zero-initialized head (ViT) would make every output equal: verify would mean nothing
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0, 0.02)
    return model.to(device)


def check_model(name: str, model: torch.nn.Module, side: int, device: torch.device, dtype: torch.dtype) -> dict:
    """expand / verify / perturb / fuse / verify of one pruned model in one precision, with the figures."""
    model = copy.deepcopy(model).to(dtype)
    x = torch.randn(4, 3, side, side, device=device, dtype=dtype)
    row = {"model": name, "dtype": str(dtype).replace("torch.", ""), "params": sum(p.numel() for p in model.parameters())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, row["expand_s"] = timed(device, lambda: fxlop.expand(model, max_seconds=None))
        again = fxlop.expand(model, max_seconds=None)
    report = fxlop.report(gm).expand
    row.update(expanded=len(report.expanded), reduced=len(report.reduced), params_expanded=report.params_after,
               estimated_s={"expand": report.estimate.expand_seconds, "fuse": report.estimate.fuse_seconds})
    factors = {n: p for n, p in gm.named_parameters() if ".factors." in n}
    row["factors_on_device"] = all(p.device == x.device and p.dtype == dtype for p in factors.values())
    row["same_seed_same_factors"] = all(torch.equal(p, again.get_parameter(n)) for n, p in factors.items())
    del again
    row["expand_error"] = fxlop.verify(model, gm, x)
    if dtype == torch.float32:
        # the same comparison under bf16 autocast (the fine-tuning setting): tolerance of the bf16 output
        with torch.autocast(device.type, dtype=torch.bfloat16):
            row["expand_error_bf16_autocast"] = fxlop.verify(model, gm, x)
    # layers composed together on the device give the kernels each layer composes on its own
    row["batched_layers"] = sum(len(s.layers) for s in fxlop.report(gm).batch or ())
    with torch.no_grad():
        row["batched_vs_per_layer"] = relative_error(gm(x), passes.unbatch_compositions(gm)(x))
    # a fine-tuning step under bf16 autocast: gradients on the device, finite
    gm.train()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(gm(x).float(), torch.arange(x.shape[0], device=device) % 10)
    loss.backward()
    grads = [p.grad for p in factors.values()]
    row["autocast_step_gradients_ok"] = all(g is not None and g.device == x.device and bool(torch.isfinite(g).all())
                                            for g in grads)
    gm.eval()
    with torch.no_grad():
        for param in factors.values():
            param.add_(torch.randn_like(param) * 0.02 * param.float().std().to(param.dtype))
            param.grad = None
    fused, row["fuse_s"] = timed(device, lambda: fxlop.fuse(gm))
    row["fused_on_device"] = all(p.device == x.device and p.dtype == dtype for p in fused.parameters())
    row["same_state_dict"] = ({k: v.shape for k, v in fused.state_dict().items()}
                              == {k: v.shape for k, v in model.state_dict().items()})
    row["fuse_error"] = fxlop.verify(gm, fused, x)
    with torch.no_grad():
        row["perturbation"] = relative_error(gm(x), model(x))  # the fused model really carries the trained factors
    row["batched_ok"] = row["batched_vs_per_layer"] <= default_rtol(dtype)
    row["ok"] = all(row[k] for k in ("factors_on_device", "same_seed_same_factors", "autocast_step_gradients_ok",
                                     "fused_on_device", "same_state_dict", "batched_ok"))
    return row


def run_pipeline(device: torch.device, out: Path) -> dict:
    """``python -m fxlop run --device ... --epochs 1 --dense-epochs 1``, as a user would."""
    command = [sys.executable, "-m", "fxlop", "run", "--device", str(device), "--epochs", "1", "--dense-epochs", "1",
               "--quiet", "--out", str(out)]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=common.ROOT)
    row = {"command": " ".join(command[1:]), "returncode": done.returncode, "seconds": time.perf_counter() - began,
           "output_tail": (done.stdout + done.stderr).strip().splitlines()[-12:]}
    report = out / "report.json"
    if report.exists():
        data = json.loads(report.read_text())
        row["report"] = {k: data[k] for k in data if not isinstance(data[k], (list, dict)) or k in ("accuracy",)}
    row["ok"] = done.returncode == 0 and (out / "model.pt").exists()
    return row


def run_speed(device: torch.device, quick: bool) -> dict:
    """``python -m benchmarks.speed --device ...`` (its own result file: speed_cuda, or speed_quick on a dry run)."""
    name = "speed_cuda" if device.type == "cuda" else "speed_gpu_check_dry_run"
    command = [sys.executable, "-m", "benchmarks.speed", "--device", str(device), "--name", name,
               "--repeats", "3"] + (["--quick"] if quick else [])
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=common.ROOT)
    row = {"command": " ".join(command[1:]), "returncode": done.returncode, "seconds": time.perf_counter() - began,
           "output_tail": (done.stdout + done.stderr).strip().splitlines()[-30:]}
    result = common.RESULTS / f"{name}.json"
    if done.returncode == 0 and result.exists():
        row["result"] = json.loads(result.read_text())
    row["ok"] = done.returncode == 0
    return row


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [f"GPU check on {machine.get('gpu', 'no GPU')} ({result['device']}), torch {machine['torch']}"
             f"{', CUDA ' + result['cuda'] if result.get('cuda') else ''}, {machine['date']}"
             f"{' (dry run on the CPU, small models)' if result['dry_run'] else ''}: "
             f"{'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'} in {result['seconds']:.0f} s.", "",
             "| model | dtype | params | expanded params | expand s (est.) | fuse s (est.) | expand err | "
             "bf16 autocast err | fuse err | factors on device | same seed, same factors | autocast step | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | | | | | | | | | | | **failed**: {r['error']} |")
            continue
        est = r["estimated_s"]
        lines.append(f"| {r['model']} | {r['dtype']} | {r['params']:,} | {r['params_expanded']:,} | "
                     f"{r['expand_s']:.2f} ({est['expand']:.2f}) | {r['fuse_s']:.2f} ({est['fuse']:.2f}) | "
                     f"{r['expand_error']:.1e} | {r.get('expand_error_bf16_autocast', float('nan')):.1e} | "
                     f"{r['fuse_error']:.1e} | {r['factors_on_device']} | {r['same_seed_same_factors']} | "
                     f"{r['autocast_step_gradients_ok']} | {'yes' if r['ok'] else '**no**'} |")
    run = result["run"]
    lines += ["", f"`{run['command']}`: exit {run['returncode']} in {run['seconds']:.0f} s"
              + (f"; report: {json.dumps(run['report'])[:400]}" if run.get("report") else "")]
    speed = result["speed"]
    lines += ["", f"`{speed['command']}`: exit {speed['returncode']} in {speed['seconds']:.0f} s."]
    if speed.get("result"):
        import speed as speed_module

        lines += ["", speed_module.markdown(speed["result"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for a dry run")
    parser.add_argument("--skip-run", action="store_true", help="leave out the fxlop run step")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the speed benchmark")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}); run it on a machine with one, "
              "or pass --device cpu for a dry run of the same code paths", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"gpu_check: --device must be cuda[:N] or cpu, got {args.device}", file=sys.stderr)
        return 2
    dry_run = device.type != "cuda"
    began = time.perf_counter()
    result = {"machine": common.machine(), "device": str(device), "dry_run": dry_run, "cuda": torch.version.cuda,
              "models": []}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["machine"]["gpu"] = props.name
        result["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gb": props.total_memory / 1e9, "bf16": torch.cuda.is_bf16_supported()}
        print(f"gpu_check on {props.name} ({result['gpu']['memory_gb']:.0f} GB, capability "
              f"{result['gpu']['capability']})", flush=True)
    for name, (factory, side) in models(dry_run).items():
        try:
            model = pruned(factory, side, device)
        except Exception as error:  # recorded: the table says which step failed
            result["models"].append({"model": name, "dtype": "-", "error": f"pruning: {type(error).__name__}: {error}"})
            continue
        for dtype in (torch.float32, torch.bfloat16):
            try:
                row = check_model(name, model, side, device, dtype)
            except Exception as error:  # every failure is a finding: recorded, and the exit code says so
                row = {"model": name, "dtype": str(dtype).replace("torch.", ""),
                       "error": f"{type(error).__name__}: {str(error)[:300]}", "traceback": traceback.format_exc()[-3000:]}
            result["models"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["run"] = ({"command": "skipped", "returncode": 0, "seconds": 0.0, "ok": True} if args.skip_run
                         else run_pipeline(device, Path(tmp) / "run"))
    print(json.dumps({k: v for k, v in result["run"].items() if k != "output_tail"}), flush=True)
    result["speed"] = ({"command": "skipped", "returncode": 0, "seconds": 0.0, "ok": True} if args.skip_speed
                       else run_speed(device, dry_run))
    print(f"speed: exit {result['speed']['returncode']} in {result['speed']['seconds']:.0f} s", flush=True)
    result["ok"] = (all(r.get("ok") for r in result["models"]) and result["run"]["ok"] and result["speed"]["ok"])
    result["seconds"] = time.perf_counter() - began
    name = "gpu_check" if not dry_run else "gpu_check_dry_run"
    table = markdown(result)
    common.write(name, result, table)
    print(table)
    if not result["ok"]:
        print("gpu_check: some checks failed; see benchmarks/results/" + name + ".md", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
