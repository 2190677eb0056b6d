"""Joint bilateral upsampling: ours against kornia's ``joint_bilateral_blur`` after bilinear
upsampling (the nearest maintained equivalent) and against a naive per-pixel reference.

    python benchmarks/bench_jbu.py [--low 32] [--size 512] [--classes 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, machine, timeit  # noqa: E402

from dslo.refiners.jbu import joint_bilateral_upsample  # noqa: E402


def naive(maps, image, s2=1.0, r2=0.1, radius=2):
    """Straight from eq. 23 with a Python loop over output pixels (reference only)."""
    import math

    b, c, h, w = maps.shape
    hh, ww = image.shape[-2:]
    guide = F.interpolate(image, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = torch.zeros(b, c, hh, ww)
    for y in range(hh):
        py = (y + 0.5) * h / hh - 0.5
        cy = min(max(math.floor(py + 0.5), 0), h - 1)
        for x in range(ww):
            px = (x + 0.5) * w / ww - 0.5
            cx = min(max(math.floor(px + 0.5), 0), w - 1)
            y0, y1, x0, x1 = max(cy - radius, 0), min(cy + radius, h - 1), max(cx - radius, 0), min(cx + radius, w - 1)
            qy = torch.arange(y0, y1 + 1, dtype=torch.float32)[:, None]
            qx = torch.arange(x0, x1 + 1, dtype=torch.float32)[None, :]
            fs = torch.exp(-((py - qy) ** 2 + (px - qx) ** 2) / s2)
            d2 = ((image[:, :, y, x][:, :, None, None] - guide[:, :, y0:y1 + 1, x0:x1 + 1]) ** 2).sum(1)
            wgt = fs * torch.exp(-d2 / r2)  # (B, ny, nx)
            out[:, :, y, x] = (wgt[:, None] * maps[:, :, y0:y1 + 1, x0:x1 + 1]).sum((2, 3)) / wgt.sum((1, 2))[:, None]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--low", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import kornia

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(1, args.classes, args.low, args.low, generator=g)
    image = torch.rand(1, 3, args.size, args.size, generator=g)
    print(f"machine: {machine()}")
    print(f"maps (1, {args.classes}, {args.low}, {args.low}) -> {args.size}x{args.size}, sigma_s^2 = 1, sigma_r^2 = 0.1, 5x5 low-res window")

    def kornia_jbu():
        up = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)
        # same Gaussians at high resolution: sigma_s in high-res pixels = scale / sqrt(2)
        scale = args.size / args.low
        sigma_s = scale / 2**0.5
        k = int(2 * round(2 * scale) + 1)
        return kornia.filters.joint_bilateral_blur(up, image, (k, k), 0.1**0.5 / 2**0.5, (sigma_s, sigma_s))

    t_ours = timeit(lambda: joint_bilateral_upsample(maps, image), args.repeats)
    t_bil = timeit(lambda: F.interpolate(maps, size=image.shape[-2:], mode="bilinear"), args.repeats)
    t_kor = timeit(kornia_jbu, max(2, args.repeats // 3))
    small_maps, small_img = maps[:, :, :8, :8], image[:, :, :128, :128]
    t_naive = timeit(lambda: naive(small_maps, small_img), 1, warmup=0)
    t_ours_small = timeit(lambda: joint_bilateral_upsample(small_maps, small_img), args.repeats)
    err = float((naive(small_maps, small_img) - joint_bilateral_upsample(small_maps, small_img)).abs().max())
    print("| method | time | ours is faster by |")
    print("|---|---|---:|")
    print(f"| dslo joint_bilateral_upsample | {fmt(t_ours)} | 1.0x |")
    print(f"| kornia bilinear + joint_bilateral_blur ({args.size}px, window 2*2*scale+1) | {fmt(t_kor)} | {t_kor['median'] / t_ours['median']:.1f}x |")
    print(f"| bilinear only (no edges; lower bound) | {fmt(t_bil)} | {t_bil['median'] / t_ours['median']:.2f}x |")
    print(f"| naive per-pixel loop, 8x8 -> 128x128 | {fmt(t_naive)} | {t_naive['median'] / t_ours_small['median']:.0f}x (ours at that size: {fmt(t_ours_small)}) |")
    print(f"max |ours - naive| at 8x8 -> 128x128: {err:.1e}")


if __name__ == "__main__":
    main()
