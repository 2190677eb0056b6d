"""Front end of the refiner: category early rejection, NMS and per-patch normalisation.

All functions are batched: logits (B, C, h, w) or flattened (B, C, N).
"""

from __future__ import annotations

from typing import Optional

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


def nms_mask(scaled: torch.Tensor, threshold: float, floor: float = 0.0, share: Optional[float] = None) -> torch.Tensor:
    """Patches kept as the solvers' evidence: the paper's confidence cut, or a share per class.

    ``share=None``: patches whose top class probability over the full vocabulary reaches
    ``threshold`` (the paper's NMS). It sets low-confidence patches to -inf before the
    softmax; multiplying the probabilities by this mask is the same and never produces NaN.
    ``floor`` guards under-confident models: in an image where the cut keeps less than that
    fraction of the patches, each class keeps at least that fraction of the patches it wins
    (its most confident ones), so no class loses every seed because the model's
    probabilities are flat (an absolute cut of 0.9 kept 23 % of a trained CNN's patches,
    nearly all sky, road and car, and the solvers spread those over the image).

    ``share`` in (0, 1]: in every image, each class keeps its most confident ``share`` of the
    patches it wins, whatever their confidence (``threshold`` and ``floor`` unused): the cut
    is relative, so a thin class loses no more of its patches than a large one, and a model's
    overall confidence does not decide how much of the image is evidence.

    When no patch of an image is kept, every patch is (an all-rejected image would otherwise
    have no label at all).

    Args:
        scaled: (B, C, N) log-domain logits (softmax over C = class probabilities).
        threshold: confidence in [0, 1).
        floor: fraction in [0, 1]; 0 turns the guard off.
        share: fraction in (0, 1] or None.

    Returns:
        (B, N) bool.
    """
    probs = torch.softmax(scaled, dim=1)
    conf, winner = probs.max(1)  # (B, N)
    if share is not None:
        keep = _class_quota(conf, winner, probs.shape[1], float(share))
    else:
        keep = conf >= threshold
        if floor > 0:
            starved = keep.float().mean(1, keepdim=True) < float(floor)  # (B, 1)
            keep = keep | (_class_quota(conf, winner, probs.shape[1], float(floor)) & starved)
    empty = ~keep.any(1, keepdim=True)
    return keep | empty


def _class_quota(conf: torch.Tensor, winner: torch.Tensor, c: int, share: float) -> torch.Tensor:
    """(B, N) bool: each class's ceil(share * its patch count) most confident patches.

    conf, winner: (B, N) top probability and top class of each patch. Batched, no class loop:
    one sort by (class, descending confidence), then each patch's rank inside its class."""
    b, n = conf.shape
    key = winner.to(conf.dtype) * 2.0 - conf  # groups by class, descending confidence inside
    order = key.argsort(1)
    rank_sorted = torch.arange(n, device=conf.device).expand(b, n)
    counts = torch.zeros(b, c, dtype=torch.long, device=conf.device).scatter_add_(1, winner, torch.ones_like(winner))
    starts = counts.cumsum(1) - counts  # first sorted position of each class
    sorted_winner = winner.gather(1, order)
    rank_in_class = rank_sorted - starts.gather(1, sorted_winner)
    quota = (counts.to(conf.dtype) * share).ceil().long().gather(1, sorted_winner)
    return torch.zeros_like(winner, dtype=torch.bool).scatter_(1, order, rank_in_class < quota)


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
