"""Full refiner per image (early rejection, NMS, solver, JBU, argmax) on a 512x512 image.

    python benchmarks/bench_refiner.py [--grids 32,64] [--classes 2,5,8,21,171] [--solvers velocity,path]

Each configuration's peak memory is measured in a fresh subprocess (ru_maxrss minus the RSS
of the same process after importing torch, building the inputs and loading numba's compiled
kernels), so one configuration's allocations do not hide another's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, machine, timeit  # noqa: E402


def inputs(grid: int, classes: int, size: int = 512, seed: int = 0):
    """Logits where 3-5 classes win somewhere (the rest are rejected early), a softmax
    attention with local structure, and an image."""
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).float()
    att = torch.softmax(-torch.cdist(pos, pos) ** 2 / 8.0 + 0.5 * torch.randn(n, n, generator=g), -1)[None]
    logits = 0.2 + 0.01 * torch.randn(1, classes, grid, grid, generator=g)
    winners = min(classes, 5)
    for k in range(winners):
        logits[0, k, :, k * grid // winners:(k + 1) * grid // winners] += 0.08
    image = torch.rand(1, 3, size, size, generator=g)
    return logits, att, image


def run_one(grid: int, classes: int, solver: str, repeats: int, extra: dict) -> dict:
    import dslo

    from dslo.refiners import fused

    logits, att, image = inputs(grid, classes)
    refiner = dslo.DiscrepancyRefiner(solver=solver, **extra)
    if fused.available():
        # load numba's compiled kernels (~60 MiB of LLVM code, once per process) before the
        # baseline, so that the peak is what one image costs
        tiny = torch.full((1, 8), 0.125)
        fused.sweeps(torch.eye(8), tiny, tiny, tiny, iters=1)
        fused.left_products(torch.eye(8), tiny)
        fused.right_products(tiny, torch.eye(8))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = timeit(lambda: refiner(logits, att, image), repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t["peak_mib"] = (peak - base) / 1024
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", default="32,64")
    ap.add_argument("--classes", default="2,5,8,21,171")
    ap.add_argument("--solvers", default="velocity,path")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--options", default="{}", help="JSON RefinerConfig overrides")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        grid, classes, solver = args.one.split(":")
        print(json.dumps(run_one(int(grid), int(classes), solver, args.repeats, json.loads(args.options))))
        return
    print(f"machine: {machine()}")
    print(f"512x512 image, options {args.options}; time = median (min, max) of {args.repeats} runs after one warm-up")
    print("| solver | N (grid) | C before rejection | time | peak extra memory |")
    print("|---|---|---:|---|---:|")
    for solver in args.solvers.split(","):
        for grid in map(int, args.grids.split(",")):
            for classes in map(int, args.classes.split(",")):
                cmd = [sys.executable, __file__, "--one", f"{grid}:{classes}:{solver}",
                       "--repeats", str(args.repeats), "--options", args.options]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                t = json.loads(out.strip().splitlines()[-1])
                print(f"| {solver} | {grid * grid} ({grid}x{grid}) | {classes} | {fmt(t)} | {t['peak_mib']:.0f} MiB |",
                      flush=True)


if __name__ == "__main__":
    main()
