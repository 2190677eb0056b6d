"""Resampling a row-stochastic attention matrix from one patch grid to another."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .records import Attention

__all__ = ["resample_attention"]


def resample_attention(attention: Attention, grid: tuple[int, int]) -> Attention:
    """Resample an attention matrix to another patch grid, keeping it row-stochastic.

    Columns (where attention goes) and rows (who attends) are both treated as images on the
    source grid and bilinearly resized (``align_corners=False``) to the target grid; every
    resized row is then divided by its sum. Bilinear weights are non-negative, so a resized row
    is a convex combination of source rows and stays a distribution after renormalisation.

    Args:
        attention: matrix (B, N', N') on grid (h', w').
        grid: target (h, w).

    Returns:
        Attention with matrix (B, N, N), N = h * w, float32, rows summing to 1.
    """
    h, w = (int(g) for g in grid)
    if h < 1 or w < 1:
        raise ValueError(f"resample_attention: expected a target grid (h, w) >= 1, got {grid}")
    if attention.grid == (h, w):
        return attention
    hs, ws = attention.grid
    m = attention.matrix.float()
    b = m.shape[0]
    # columns: each row is an (hs, ws) image of where the patch attends
    cols = F.interpolate(m.reshape(b * hs * ws, 1, hs, ws), size=(h, w), mode="bilinear",
                         align_corners=False)
    cols = cols.reshape(b, hs, ws, h * w).permute(0, 3, 1, 2)  # (B, N, hs, ws)
    rows = F.interpolate(cols, size=(h, w), mode="bilinear", align_corners=False)
    out = rows.reshape(b, h * w, h * w).transpose(1, 2).clamp_min(0)
    out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return Attention._trusted(out.contiguous(), (h, w), attention.source)
