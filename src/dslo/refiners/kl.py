"""KL-to-uniform baseline (paper Table 2, row II)."""

from __future__ import annotations

import torch

__all__ = ["kl_uniform_map"]


def kl_uniform_map(probs_over_patches: torch.Tensor) -> torch.Tensor:
    """Per-patch term of KL(f^c || 1/N): f^c_i * log(N f^c_i), 0 where f^c_i = 0.

    Args:
        probs_over_patches: (B, C, N), each class a distribution over the N patches (or 0).

    Returns:
        (B, C, N) float.
    """
    n = probs_over_patches.shape[-1]
    f = probs_over_patches.float()
    return torch.where(f > 0, f * torch.log((f * n).clamp_min(1e-30)), torch.zeros_like(f))
