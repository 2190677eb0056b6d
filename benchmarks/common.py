"""Shared helpers of the benchmark scripts: timing with medians, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def timeit(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> dict:
    """Median, min and max wall time in seconds of ``fn()`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": repeats}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def fmt(t: dict) -> str:
    return f"{t['median'] * 1e3:.1f} ms (min {t['min'] * 1e3:.1f}, max {t['max'] * 1e3:.1f}, n={t['n']})"
