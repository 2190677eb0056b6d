"""Front end of the refiner: category early rejection, NMS and per-patch normalisation.

All functions are batched: logits (B, C, h, w) or flattened (B, C, N).
"""

from __future__ import annotations

import torch

__all__ = ["early_rejection", "nms_mask", "class_probabilities"]


def early_rejection(logits: torch.Tensor) -> torch.Tensor:
    """Classes that win the argmax at one patch or more.

    Args:
        logits: (B, C, N) or (B, C, h, w).

    Returns:
        (B, C) bool.
    """
    flat = logits.flatten(2)
    winners = flat.argmax(1)  # (B, N)
    active = torch.zeros(flat.shape[:2], dtype=torch.bool, device=flat.device)
    active.scatter_(1, winners, True)
    return active


def nms_mask(scaled: torch.Tensor, threshold: float) -> torch.Tensor:
    """Patches whose top class probability over the full vocabulary reaches ``threshold``.

    The paper sets low-confidence patches to -inf before the softmax; multiplying the
    probabilities by this mask is the same and never produces NaN. When no patch of an image
    passes, every patch is kept (an all-rejected image would otherwise have no label at all).

    Args:
        scaled: (B, C, N) logits already multiplied by logit_scale.
        threshold: confidence in [0, 1).

    Returns:
        (B, N) bool.
    """
    conf = torch.softmax(scaled, dim=1).amax(1)
    keep = conf >= threshold
    empty = ~keep.any(1, keepdim=True)
    return keep | empty


def class_probabilities(scaled: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Softmax over the active classes at each patch; inactive classes get probability 0.

    Args:
        scaled: (B, C, N) scaled logits.
        active: (B, C) bool, at least one True per image.

    Returns:
        (B, C, N) float, sums to 1 over C at each patch.
    """
    masked = scaled.masked_fill(~active.unsqueeze(-1), float("-inf"))
    return torch.softmax(masked, dim=1)
