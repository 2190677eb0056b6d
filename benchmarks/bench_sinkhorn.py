"""Our batched Sinkhorn (all classes of an image, one shared kernel) against POT's
``ot.sinkhorn`` called once per class, on the same cost, eps and iteration count; both of our
dense backends (fused numba sweeps, two torch products per iteration), the compressed kernel
and half-precision kernels. ``--device cuda`` runs ours on a GPU (POT stays on the CPU).

    python benchmarks/bench_sinkhorn.py [--n 1024] [--classes 5] [--iters 50] [--device cpu]
"""

from __future__ import annotations

import argparse

import numpy as np
import ot
import torch

from common import fmt, machine, timeit
from dslo.refiners import fused
from dslo.refiners.path import gibbs_kernel, sinkhorn_scalings
from dslo.refiners.sparse import ell_dense, topk_rows
from dslo.refiners.velocity import doubly_stochastic


def problem(n: int, c: int, seed: int = 0):
    """An attention-like cost: -log of a doubly stochastic softmax attention; class marginals
    from softmax logits (the refiner's "relaxed"/"joint" cost)."""
    g = torch.Generator().manual_seed(seed)
    att = torch.softmax(torch.randn(1, n, n, generator=g, dtype=torch.float64) * 2, -1)
    cost = -torch.log(doubly_stochastic(att, 15)[0] + 1e-12)
    src = torch.softmax(torch.randn(c, n, generator=g, dtype=torch.float64) * 2, -1)
    tgt = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return cost, src, tgt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--eps", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--topk", type=int, default=64, help="compressed kernel: entries kept per row")
    ap.add_argument("--device", default="cpu", help="where our solver runs (POT always runs on the CPU)")
    args = ap.parse_args()
    cost, src, tgt = problem(args.n, args.classes)
    dev = torch.device(args.device)
    default_backend = "numba" if fused.available() and dev.type == "cpu" else "torch"

    def synced(fn):
        # CUDA launches are asynchronous: time until the device is done
        if dev.type != "cuda":
            return fn
        return lambda: (fn(), torch.cuda.synchronize())[0]
    eps, iters = args.eps, args.iters
    print(f"machine: {machine()}")
    print(f"N={args.n}, C={args.classes}, eps={eps}, iterations={iters} (no early stop on either side)")

    c_np, s_np, t_np = cost.numpy(), src.numpy(), tgt.numpy()
    c32, s32, t32 = c_np.astype(np.float32), s_np.astype(np.float32), t_np.astype(np.float32)

    def pot(cost_, src_, tgt_):
        return [ot.sinkhorn(src_[k], tgt_, cost_, eps, numItermax=iters, stopThr=0.0, warn=False)
                for k in range(args.classes)]

    kern = gibbs_kernel(cost.float().unsqueeze(0).to(dev), eps)
    s_t, t_t = src.float().unsqueeze(0).to(dev), tgt.float().to(dev)

    def ours(backend=default_backend):
        return sinkhorn_scalings(kern, s_t, t_t, iters=iters, backend=backend)

    def ours_torch():
        return ours("torch")

    def ours_with_kernel():
        k = gibbs_kernel(cost.float().unsqueeze(0).to(dev), eps)
        return sinkhorn_scalings(k, s_t, t_t, iters=iters, backend=default_backend)

    half = {dt: kern.to(dt) for dt in (torch.bfloat16, torch.float16)}

    def ours_half(dt):
        return lambda: sinkhorn_scalings(half[dt], s_t, t_t, iters=iters, backend="torch")

    sparse_kernel = topk_rows(kern, args.topk)

    def ours_compressed():
        return sinkhorn_scalings(sparse_kernel, s_t, t_t, iters=iters)

    t_pot64 = timeit(lambda: pot(c_np, s_np, t_np), args.repeats)
    t_pot32 = timeit(lambda: pot(c32, s32, t32), args.repeats)
    ours(), ours_torch()  # numba compiles (or loads its cache) on the first call
    t_ours = timeit(synced(ours), args.repeats)
    t_torch = timeit(synced(ours_torch), args.repeats)
    t_ours_k = timeit(synced(ours_with_kernel), args.repeats)
    t_sparse = timeit(synced(ours_compressed), args.repeats)
    t_half = {dt: timeit(synced(ours_half(dt)), args.repeats) for dt in half}

    ref = np.stack(pot(c_np, s_np, t_np))

    def plan(scalings):
        u, v, _ = scalings
        return (u[0].unsqueeze(2) * kern[0].unsqueeze(0) * v[0].unsqueeze(1)).double().cpu().numpy()

    def plan_error(scalings):
        return float(np.abs(plan(scalings) - ref).max())
    us, vs, _ = ours_compressed()
    approx = (us[0].unsqueeze(2) * ell_dense(*sparse_kernel, args.n)[0].unsqueeze(0)
              * vs[0].unsqueeze(1)).double().cpu().numpy()
    sparse_err = float(np.abs(approx - ref).sum(axis=(1, 2)).max())
    rows = [
        ("POT ot.sinkhorn per class, float64", t_pot64),
        ("POT ot.sinkhorn per class, float32", t_pot32),
        (f"dslo sinkhorn_scalings, all classes, float32 ({default_backend} backend, the CPU default)", t_ours),
        ("dslo sinkhorn_scalings, all classes, float32 (torch backend: two batched products)", t_torch),
        (f"dslo {default_backend}, including building the Gibbs kernel", t_ours_k),
        (f"dslo compressed kernel (top-{args.topk} per row), all classes", t_sparse),
    ] + [(f"dslo torch backend, {str(dt).split('.')[-1]} kernel (kernel_dtype)", t) for dt, t in t_half.items()]
    print("| solver | time (median, min, max) | speed-up vs POT float64 |")
    print("|---|---|---:|")
    for name, t in rows:
        print(f"| {name} | {fmt(t)} | {t_pot64['median'] / t['median']:.1f}x |")
    print("compressed kernel is a different (truncated) problem: largest L1 distance between its plan "
          f"and POT's, per class = {sparse_err:.3f} (plans have mass 1)")
    for dt in half:
        l1 = float(np.abs(plan(ours_half(dt)()) - ref).sum(axis=(1, 2)).max())
        print(f"{str(dt).split('.')[-1]} kernel: largest L1 distance between its plan and POT's, per class = {l1:.2e}")
    for name, fn in ((default_backend, ours), ("torch", ours_torch)):
        err = plan_error(fn())
        print(f"plans ({name} backend): max |ours - POT float64| = {err:.2e} "
              f"(largest plan entry {ref.max():.2e}, relative {err / ref.max():.2e})")


if __name__ == "__main__":
    main()
