"""Resampling a row-stochastic attention matrix (and its patch features) from one patch grid
to another."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .records import Attention

__all__ = ["resample_attention", "resample_features"]


def resample_attention(attention: Attention, grid: tuple[int, int]) -> Attention:
    """Resample an attention matrix to another patch grid, keeping it row-stochastic.

    Columns (where attention goes) and rows (who attends) are both treated as images on the
    source grid and bilinearly resized (``align_corners=False``) to the target grid; every
    resized row is then divided by its sum. Bilinear weights are non-negative, so a resized row
    is a convex combination of source rows and stays a distribution after renormalisation.

    Patch features, when the record has them, are carried along the same way: the (h', w')
    feature map of each channel is bilinearly resized (``align_corners=False``) to (h, w),
    without renormalising (consumers such as LPOSS L2-normalise features themselves).

    Args:
        attention: matrix (B, N', N') on grid (h', w') [, features (B, N', D)].
        grid: target (h, w).

    Returns:
        Attention with matrix (B, N, N), N = h * w, float32, rows summing to 1, and features
        (B, N, D) in the features' own floating dtype, or None if the record had none.
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
    return Attention._trusted(out.contiguous(), (h, w), attention.source,
                              resample_features(attention.features, (hs, ws), (h, w)))


def resample_features(features: Optional[torch.Tensor], source: tuple[int, int],
                      grid: tuple[int, int]) -> Optional[torch.Tensor]:
    """Bilinearly resize patch features from one patch grid to another.

    Args:
        features: (B, N', D) on grid ``source`` = (h', w'), row-major, or None.
        source: (h', w').
        grid: target (h, w).

    Returns:
        (B, N, D), N = h * w, same dtype (``align_corners=False``, as for the matrix), or None.
    """
    if features is None:
        return None
    hs, ws = (int(g) for g in source)
    h, w = (int(g) for g in grid)
    if features.ndim != 3 or features.shape[1] != hs * ws:
        raise ValueError(f"resample_features: expected (B, {hs * ws}, D) for grid {(hs, ws)}, "
                         f"got {tuple(features.shape)}")
    if (hs, ws) == (h, w):
        return features
    b, _, d = features.shape
    fmap = features.transpose(1, 2).reshape(b, d, hs, ws)
    # half-precision bilinear is missing on some CPU builds: resample those in float32
    work = fmap if fmap.dtype in (torch.float32, torch.float64) else fmap.float()
    out = F.interpolate(work, size=(h, w), mode="bilinear", align_corners=False)
    return out.reshape(b, d, h * w).transpose(1, 2).contiguous().to(features.dtype)
