"""A model-free attention: patch affinity from colour and position (the floor any learned
provider must beat, and the provider that works with no weights at all)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..refiners.records import Attention
from .base import check_image

__all__ = ["AffinityAttention"]


class AffinityAttention:
    """A_ij proportional to exp(-|c_i - c_j|^2 / sigma_colour2 - |p_i - p_j|^2 / sigma_position2).

    c is the mean RGB colour of the patch (image area-averaged onto the grid), p the patch
    position in patch units. Rows are normalised to sum to 1.

    Args:
        patch_size: image pixels per patch when ``grid`` is None (14 matches ViT-S/14).
        grid: a fixed (h, w) grid instead (e.g. the logits grid).
        sigma_colour2: colour bandwidth on RGB in [0, 1] (squared).
        sigma_position2: spatial bandwidth in patches (squared).

    Call: image (B, 3, H, W) in [0, 1] -> Attention (B, N, N), grid (h, w).
    """

    def __init__(self, patch_size: int = 14, grid: Optional[tuple[int, int]] = None,
                 sigma_colour2: float = 0.02, sigma_position2: float = 16.0) -> None:
        if patch_size < 1:
            raise ValueError(f"AffinityAttention: patch_size must be >= 1, got {patch_size}")
        if not sigma_colour2 > 0 or not sigma_position2 > 0:
            raise ValueError("AffinityAttention: bandwidths must be > 0")
        if grid is not None and (len(grid) != 2 or min(grid) < 1):
            raise ValueError(f"AffinityAttention: grid expected (h, w) >= 1, got {grid}")
        self.patch_size = int(patch_size)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.sigma_colour2 = float(sigma_colour2)
        self.sigma_position2 = float(sigma_position2)
        self.source = (f"affinity patch_size={self.patch_size} grid={self.grid} "
                       f"sigma_colour2={self.sigma_colour2} sigma_position2={self.sigma_position2}")

    def __call__(self, image: torch.Tensor) -> Attention:
        x = check_image(image).float()
        hh, ww = x.shape[-2:]
        h, w = self.grid or (max(1, round(hh / self.patch_size)), max(1, round(ww / self.patch_size)))
        colour = F.adaptive_avg_pool2d(x, (h, w)).flatten(2).transpose(1, 2)  # (B, N, 3)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()], -1).to(x.device)  # (N, 2)
        logits = -torch.cdist(colour, colour).square() / self.sigma_colour2
        logits = logits - torch.cdist(pos, pos).square().unsqueeze(0) / self.sigma_position2
        return Attention(torch.softmax(logits, -1), (h, w), self.source)
