"""Shared pieces of the benchmarks: machine facts, interleaved timing, JSON/markdown output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def interleaved(configs: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each config, ``repeats`` times, the configs interleaved in every round
    (rotating their order) so that a noisy neighbour slows all of them alike."""
    names = list(configs)
    for name in names:
        for _ in range(warmup):
            configs[name]()
    sync()
    times = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            began = time.perf_counter()
            configs[name]()
            sync()
            times[name].append(time.perf_counter() - began)
    return times


def ratio_stats(times: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, float]:
    """min/median/max over rounds of ``time[numerator] / time[denominator]`` measured in the same round."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def write(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")


def fmt(stats: dict[str, float], digits: int = 2) -> str:
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"
