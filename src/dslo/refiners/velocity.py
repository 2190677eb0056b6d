"""Maximum-velocity solver: IPF to a doubly stochastic chain, then how fast each class's
probability travels along it (paper eq. 10-12).

One function per reading, plain tensors in and out, batched over images and classes.
"""

from __future__ import annotations

import torch

from . import fused
from .products import row_matmul

__all__ = ["doubly_stochastic", "ipf_scalings", "markov_chain", "arrival_velocity",
           "paper_velocity"]

_TINY = 1e-30


def ipf_scalings(matrix: torch.Tensor, iters: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column scalings r, c with diag(r) A diag(c) close to doubly stochastic.

    Iterates on the scaling vectors (two mat-vec products per round) instead of rewriting the
    N x N matrix 2 * iters times: the same IPF rounds (rows, then columns), a fraction of the
    memory traffic. A float32 CPU matrix outside autograd goes through the fused numba sweeps
    when numba is installed (Sinkhorn with unit marginals: one pass over A per round).

    Args:
        matrix: (..., N, N) non-negative; entries are clamped at 1e-30 so that IPF is defined.
        iters: rounds of (normalise rows, normalise columns).

    Returns:
        r, c: (..., N) float, same dtype as ``matrix``.
    """
    return _scalings(matrix.clamp_min(_TINY), iters)


def _scalings(a: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipf_scalings`` of an already clamped matrix."""
    if iters >= 1 and a.ndim in (2, 3) and a.shape[-1] > 0 and fused.eligible(a):
        ones = torch.ones(1, a.shape[-1])
        pairs = [fused.sweeps(m, ones, ones, ones, iters=iters) for m in a.reshape(-1, *a.shape[-2:])]
        r = torch.stack([p[0][0] for p in pairs]).reshape(a.shape[:-1])
        c = torch.stack([p[1][0] for p in pairs]).reshape(a.shape[:-1])
        return r, c
    c = torch.ones(a.shape[:-1], dtype=a.dtype, device=a.device)
    r = c
    for _ in range(iters):
        r = 1.0 / (a @ c.unsqueeze(-1)).squeeze(-1)
        c = 1.0 / (r.unsqueeze(-2) @ a).squeeze(-2)
    return r, c


def doubly_stochastic(matrix: torch.Tensor, iters: int = 15) -> torch.Tensor:
    """IPF (Sinkhorn-Knopp): alternately normalise rows and columns ``iters`` times.

    Args:
        matrix: (..., N, N) non-negative, finite.
        iters: rounds (paper: 15). The result's columns sum to 1 exactly; rows converge.

    Returns:
        (..., N, N) same dtype, rows and columns summing to ~1.
    """
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"doubly_stochastic: expected (..., N, N), got {tuple(matrix.shape)}")
    if matrix.numel() and (not bool(torch.isfinite(matrix.sum())) or float(matrix.min()) < 0):
        raise ValueError("doubly_stochastic: expected finite, non-negative entries")
    return _ipf(matrix, iters)


def _ipf(matrix: torch.Tensor, iters: int) -> torch.Tensor:
    """``doubly_stochastic`` without the input checks (for matrices the refiner validated)."""
    a = matrix.clamp_min(_TINY)  # a new tensor: scaled in place below (no N x N temporaries)
    r, c = _scalings(a, iters)
    if a.requires_grad:
        return r.unsqueeze(-1) * a * c.unsqueeze(-2)
    return a.mul_(r.unsqueeze(-1)).mul_(c.unsqueeze(-2))


def markov_chain(start: torch.Tensor, transition: torch.Tensor, steps: int) -> torch.Tensor:
    """States X^(l) = X^(l-1) T for l = 0..steps, all classes of an image in one matmul.

    Args:
        start: (B, C, N) row vectors X^(0).
        transition: (B, N, N) or (1, N, N); float32, or bfloat16/float16 for half-precision
            products (``RefinerConfig.kernel_dtype``).
        steps: L.

    Returns:
        (L + 1, B, C, N).
    """
    states = [start]
    x = start
    if fused.eligible(start, transition) and start.ndim == 3 and transition.ndim == 3 and start.shape[1] > 0:
        # one pass over T per step through numba; MKL's skinny (C x N) @ (N x N) product is
        # 2-3x slower on the CPU (results/performance.md)
        mats = [transition[min(i, transition.shape[0] - 1)] for i in range(start.shape[0])]
        for _ in range(steps):
            x = torch.stack([fused.right_products(x[i], mats[i]) for i in range(start.shape[0])])
            states.append(x)
        return torch.stack(states)
    for _ in range(steps):
        x = row_matmul(x, transition)
        states.append(x)
    return torch.stack(states)


def arrival_velocity(states: torch.Tensor, tau: float, ties: str = "start+end") -> torch.Tensor:
    """Velocity 1 / (1 + t) with t the continuous time the chain first reaches ``tau``.

    t = 0 when X^(0) >= tau; otherwise t = (l* - 1) + (tau - X^(l*-1)) / (X^(l*) - X^(l*-1))
    for the first l* with X^(l*) >= tau. A patch never reached within L steps gets the
    linear extrapolation t = L * tau / X^(L) (capped at 1e6), so velocities stay in (0, 1]
    and far patches still rank by how much mass arrived. Remaining exact ties (common: 40-70%
    of patches reach tau at the same step) are broken by 1e-4 * (mean of the start and the
    normalised end state), and the result is rescaled into (0, 1].

    Args:
        states: (L + 1, B, C, N) from ``markov_chain``.
        tau: threshold, > 0.
        ties: what breaks exact ties: "start+end" (the start state and the normalised end
            state: favours classes with mass around) or "start" (the model's own belief only).

    Returns:
        (B, C, N) float in (0, 1].
    """
    steps = states.shape[0] - 1
    reached = states >= tau  # (L+1, B, C, N)
    ever = reached.any(0)
    first = torch.where(ever, reached.float().argmax(0), torch.zeros_like(ever, dtype=torch.long))
    idx = first.unsqueeze(0)
    at = states.gather(0, idx).squeeze(0)
    before = states.gather(0, (idx - 1).clamp_min(0)).squeeze(0)
    frac = ((tau - before) / (at - before).clamp_min(1e-12)).clamp(0.0, 1.0)
    t_reached = torch.where(first == 0, torch.zeros_like(frac), (first - 1).to(frac.dtype) + frac)
    end = states[-1]
    t_never = (steps * tau / end.clamp_min(1e-12)).clamp(max=1e6)
    t = torch.where(ever, t_reached, t_never)
    v = 1.0 / (1.0 + t)
    scale = end.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    tie = 0.5 * states[0].clamp(0, 1) + 0.5 * end / scale if ties == "start+end" else states[0].clamp(0, 1)
    return (v + 1e-4 * tie) / (1.0 + 1e-4)


def paper_velocity(states: torch.Tensor, tau: float) -> torch.Tensor:
    """The literal rule of eq. 12: v_i = max{1/l : |f_i^(l) - f_i^(l-1)| <= tau}, l = 1..L.

    With f a distribution over N patches every step moves each entry by far less than tau,
    so l = 1 everywhere and every patch ties; kept as ``velocity_reading="paper"`` for the
    record. Patches that never satisfy the rule get 1 / (L + 1).

    Args:
        states: (L + 1, B, C, N).
        tau: threshold.

    Returns:
        (B, C, N) in (0, 1].
    """
    steps = states.shape[0] - 1
    ok = (states[1:] - states[:-1]).abs() <= tau  # (L, B, C, N), step l = index + 1
    first = ok.float().argmax(0) + 1
    v = 1.0 / first.to(states.dtype)
    return torch.where(ok.any(0), v, torch.full_like(v, 1.0 / (steps + 1)))
