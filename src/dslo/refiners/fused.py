"""Fused CPU Sinkhorn sweeps for a dense kernel shared by all classes of an image (numba).

One Sinkhorn iteration needs K v (for u) and then K^T u (for v). Done as two matrix products,
K is read twice per iteration, and on a CPU the skinny products (N x N times N x C, C small)
run far below the FMA peak. The sweep here reads each group of four kernel rows once per
iteration while they sit in L1: it finishes u for those rows (their K v) and immediately adds
their share of K^T u into a per-thread accumulator. Same iterates as the two-product loop in
``dslo.refiners.path.sinkhorn_scalings`` (float32, summation order differs), one pass over K.

The same sweep with unit marginals is IPF (``velocity.ipf_scalings``), and ``right_products``
(x K in one pass) runs the velocity solver's Markov chain.

numba is optional (the ``fast`` extra). ``available()`` says whether this path can run;
``sinkhorn_scalings(backend="auto")``, ``ipf_scalings`` and ``markov_chain`` use it for dense
float32 CPU tensors outside autograd when it can, and torch otherwise.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

__all__ = ["available", "require", "eligible", "sweeps", "left_products", "right_products"]

try:  # pragma: no cover - exercised by whichever environment the tests run in
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover
    numba = None

# numba's default "workqueue" threading layer aborts the process when two Python threads
# launch parallel kernels at once; a lock makes concurrent callers wait instead.
_LOCK = threading.Lock()
_TINY = float(np.finfo(np.float32).tiny)
_OMP_PID = None  # the process that started numba's GNU OpenMP pool, if any


def available() -> bool:
    """True when numba is importable and this process may launch its parallel kernels.

    False in a fork of a process that already ran them on numba's "omp" threading layer (GNU
    OpenMP is not fork-safe; numba would terminate the child): callers then use torch.
    """
    return numba is not None and (_OMP_PID is None or _OMP_PID == os.getpid())


def require() -> None:
    """Raise the reason ``available()`` is False, if it is."""
    if numba is None:
        raise ImportError("the fused CPU kernels need numba: pip install 'dslo[fast]'")
    if not available():
        raise RuntimeError("the fused CPU kernels cannot run in a fork of a process that already ran "
                           "them with GNU OpenMP (numba's 'omp' threading layer); use backend='torch', "
                           "the 'spawn' start method, or NUMBA_THREADING_LAYER=workqueue (fork-safe, slower)")


def _launch(kernel, *args) -> None:
    """Run a compiled kernel with as many threads as torch uses (one knob for both libraries:
    a torchrun shard or DataLoader worker limited to one thread stays at one)."""
    global _OMP_PID
    require()
    with _LOCK:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        kernel(*args)
        if _OMP_PID is None and numba.threading_layer() == "omp":
            _OMP_PID = os.getpid()


if numba is not None:

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _accumulate(K, weights, a, v, u, acc, solve):  # pragma: no cover - compiled
        """acc[blk] = sum over the rows i of block blk of w[:, i] K[i, :].

        solve=False: w = weights (the product x K). solve=True: w = a / (K v) row by row,
        written to u (one Sinkhorn half-step), so each row is read once for both products.
        """
        nblk, C, N = acc.shape
        tiny = np.float32(_TINY)
        step = (N + nblk - 1) // nblk
        step = (step + 3) // 4 * 4  # blocks start on a multiple of 4 rows
        for blk in prange(nblk):
            lo = blk * step
            hi = min(N, lo + step)
            ab = acc[blk]
            ab[:] = 0.0
            i = lo
            # Four rows at a time: each v element loaded once feeds four FMAs, and the four
            # rows are reused from L1 for their contribution to the accumulator.
            while i + 4 <= hi:
                k0 = K[i]
                k1 = K[i + 1]
                k2 = K[i + 2]
                k3 = K[i + 3]
                for c in range(C):
                    if solve:
                        vc = v[c]
                        s0 = np.float32(0.0)
                        s1 = np.float32(0.0)
                        s2 = np.float32(0.0)
                        s3 = np.float32(0.0)
                        for j in range(N):
                            x = vc[j]
                            s0 += k0[j] * x
                            s1 += k1[j] * x
                            s2 += k2[j] * x
                            s3 += k3[j] * x
                        u[c, i] = a[c, i] / max(s0, tiny)
                        u[c, i + 1] = a[c, i + 1] / max(s1, tiny)
                        u[c, i + 2] = a[c, i + 2] / max(s2, tiny)
                        u[c, i + 3] = a[c, i + 3] / max(s3, tiny)
                    w0 = weights[c, i]
                    w1 = weights[c, i + 1]
                    w2 = weights[c, i + 2]
                    w3 = weights[c, i + 3]
                    ac = ab[c]
                    for j in range(N):
                        ac[j] += w0 * k0[j] + w1 * k1[j] + w2 * k2[j] + w3 * k3[j]
                i += 4
            while i < hi:
                kr = K[i]
                for c in range(C):
                    if solve:
                        vc = v[c]
                        s = np.float32(0.0)
                        for j in range(N):
                            s += kr[j] * vc[j]
                        u[c, i] = a[c, i] / max(s, tiny)
                    wi = weights[c, i]
                    ac = ab[c]
                    for j in range(N):
                        ac[j] += wi * kr[j]
                i += 1

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _sweeps(K, a, b, u, v, iters, power, nblk):  # pragma: no cover - compiled
        C, N = a.shape
        tiny = np.float32(_TINY)
        acc = np.zeros((nblk, C, N), np.float32)
        for _ in range(iters):
            _accumulate(K, u, a, v, u, acc, True)  # u = a / (K v); acc = partial K^T u
            for c in prange(C):
                for j in range(N):
                    t = np.float32(0.0)
                    for blk in range(nblk):
                        t += acc[blk, c, j]
                    x = b[c, j] / max(t, tiny)
                    if power != 1.0:
                        x = x**power
                    v[c, j] = x

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _right(K, x, out, nblk):  # pragma: no cover - compiled
        C, N = x.shape
        acc = np.zeros((nblk, C, N), np.float32)
        _accumulate(K, x, x, x, x, acc, False)
        for c in prange(C):
            for j in range(N):
                t = np.float32(0.0)
                for blk in range(nblk):
                    t += acc[blk, c, j]
                out[c, j] = t

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _left(K, v, out):  # pragma: no cover - compiled
        C, N = v.shape
        for i in prange(N):
            kr = K[i]
            for c in range(C):
                vc = v[c]
                s = np.float32(0.0)
                for j in range(N):
                    s += kr[j] * vc[j]
                out[c, i] = s


def eligible(*tensors: torch.Tensor) -> bool:
    """True when numba is installed and every tensor is a float32 CPU tensor outside autograd,
    i.e. when ``backend="auto"`` callers may take the fused path without changing results."""
    if not available():
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return True


def _blocks() -> int:
    # Two row blocks per thread balance the tail of the last block (measured: 2 threads,
    # N=1024: 4 blocks 10.7 ms, 2 blocks 12.1 ms, 8 blocks 12.6 ms).
    return 2 * max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _plain(t: torch.Tensor, name: str) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"fused sweeps run on the CPU; {name} is on {t.device}")
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


def sweeps(
    kernel: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    v: torch.Tensor,
    *,
    iters: int,
    power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``iters`` Sinkhorn iterations u = a / (K v), v = (b / K^T u)^power for one image.

    Args:
        kernel: (N, N) dense positive kernel on the CPU.
        source: (C, N) marginals a (rows may be all zero).
        target: (C, N) marginals b.
        v: (C, N) starting column scalings.
        iters: iterations (>= 1).
        power: exponent of the v update (1 for balanced OT, rho / (rho + eps) semi-relaxed).

    Returns:
        u: (C, N) from the last iteration; v: (C, N) after it. float32, new tensors.
    """
    require()
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    k = _plain(kernel, "kernel")
    a = _plain(source, "source")
    b = _plain(target, "target")
    vv = np.array(_plain(v, "v"), copy=True)
    n = k.shape[0]
    if k.shape != (n, n) or a.shape != b.shape or a.shape != vv.shape or a.shape[1] != n:
        raise ValueError(
            f"expected kernel (N, N) and source, target, v (C, N); got {tuple(k.shape)}, "
            f"{a.shape}, {b.shape}, {vv.shape}")
    uu = np.zeros_like(a)
    _launch(_sweeps, k, a, b, uu, vv, int(iters), np.float32(power), _blocks())
    return torch.from_numpy(uu), torch.from_numpy(vv)


def left_products(kernel: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K v for every class: (N, N) kernel and (C, N) v -> (C, N), float32, CPU."""
    require()
    k = _plain(kernel, "kernel")
    vv = _plain(v, "v")
    if k.shape != (vv.shape[1], vv.shape[1]):
        raise ValueError(f"expected kernel (N, N) and v (C, N); got {tuple(k.shape)}, {vv.shape}")
    out = np.empty_like(vv)
    _launch(_left, k, vv, out)
    return torch.from_numpy(out)


def right_products(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x K for row vectors: (C, N) x and (N, N) kernel -> (C, N), float32, CPU.

    One pass over K with per-thread accumulators; MKL's (C x N) @ (N x N) with small C ran
    at a fraction of the bandwidth here (results/performance.md).
    """
    require()
    k = _plain(kernel, "kernel")
    xx = _plain(x, "x")
    if xx.ndim != 2 or k.shape != (xx.shape[1], xx.shape[1]):
        raise ValueError(f"expected x (C, N) and kernel (N, N); got {xx.shape}, {tuple(k.shape)}")
    out = np.empty_like(xx)
    _launch(_right, k, xx, out, _blocks())
    return torch.from_numpy(out)
