"""Compressed kernels: keep the k largest entries of each attention row (plus the diagonal),
stored as (values, column indices) of shape (B, N, k) — the ELLPACK layout, which batches
natively with gather and scatter_add. Every product then costs O(C N k) instead of O(C N^2),
and no N x N matrix is read again after the top-k selection.
"""

from __future__ import annotations

import torch

__all__ = ["topk_rows", "ell_left", "ell_right", "ell_ipf", "ell_dense"]

_TINY = 1e-30


def topk_rows(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row and the diagonal entry.

    The diagonal is always kept so the pattern has a positive diagonal: IPF then converges on
    the sparse pattern (a matrix with total support), and a patch never loses itself.

    Args:
        matrix: (B, N, N) non-negative.
        k: entries per row, 1 <= k (clipped to N).

    Returns:
        values (B, N, k'), indices (B, N, k') int64 with k' = min(k, N) (+1 when the diagonal
        was not among the top k: its slot then replaces the smallest kept entry).
    """
    b, n, _ = matrix.shape
    k = max(1, min(int(k), n))
    vals, idx = matrix.topk(k, dim=-1)
    diag = torch.arange(n, device=matrix.device).view(1, n, 1)
    has_diag = (idx == diag).any(-1, keepdim=True)  # (B, N, 1)
    # where the diagonal is missing, overwrite the smallest kept entry with it
    last = torch.where(has_diag, idx[..., -1:], diag.expand(b, n, 1))
    idx = torch.cat([idx[..., :-1], last], -1)
    vals = matrix.gather(-1, idx)
    return vals, idx


def ell_right(x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x @ M^T for row vectors x, i.e. (M x_c)_i = sum_k M[i, idx_ik] x_c[idx_ik].

    Args:
        x: (B, C, N); vals, idx: (B, N, k).

    Returns:
        (B, C, N).
    """
    b, c, n = x.shape
    gathered = x.gather(2, idx.reshape(b, 1, -1).expand(b, c, -1)).view(b, c, n, -1)
    return (gathered * vals.unsqueeze(1)).sum(-1)


def ell_left(x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x @ M for row vectors x: (x_c M)_j = sum_i x_c[i] M[i, j] (a scatter_add over columns).

    Args:
        x: (B, C, N); vals, idx: (B, N, k).

    Returns:
        (B, C, N).
    """
    b, c, n = x.shape
    contrib = (x.unsqueeze(-1) * vals.unsqueeze(1)).reshape(b, c, -1)
    out = torch.zeros_like(x)
    return out.scatter_add_(2, idx.reshape(b, 1, -1).expand(b, c, -1), contrib)


def ell_ipf(vals: torch.Tensor, idx: torch.Tensor, iters: int = 15) -> torch.Tensor:
    """IPF (rows, then columns, ``iters`` times) on the sparse pattern.

    Args:
        vals, idx: (B, N, k).

    Returns:
        values (B, N, k) of the scaled matrix diag(r) M diag(c).
    """
    v = vals.clamp_min(_TINY)
    b, n, _ = v.shape
    c = torch.ones(b, 1, n, dtype=v.dtype, device=v.device)
    r = c
    for _ in range(iters):
        r = 1.0 / ell_right(c, v, idx)  # (M c)_i
        c = 1.0 / ell_left(r, v, idx)  # (r M)_j
    return r.squeeze(1).unsqueeze(-1) * v * c.squeeze(1).gather(1, idx.reshape(b, -1)).view(b, n, -1)


def ell_dense(vals: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, N) dense copy (tests and small N only)."""
    out = torch.zeros(vals.shape[0], vals.shape[1], n, dtype=vals.dtype, device=vals.device)
    return out.scatter_(2, idx, vals)
