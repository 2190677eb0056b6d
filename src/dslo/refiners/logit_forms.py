"""Logits in the forms users have: tell them apart and turn them into log-domain scores.

The refiner's front end (early rejection, NMS, class probabilities) works on ``z`` with
``softmax(z)`` over classes = the model's class probabilities. What ``z`` is depends on what
the model hands over:

- "cosine": CLIP-style similarities in [-1, 1]; ``z = logit_scale * x`` (CLIP's 100 by default);
- "scores": a trained classifier's raw outputs (already log-odds); ``z = x`` (x ``logit_scale``
  when it is given);
- "log_probs": ``z = x``;
- "probs": ``z = log(x)`` (clamped away from 0).

"auto" decides from the values of each batch (``detect_logit_kind``). It is only a guess where
the forms overlap (a classifier's scores can all lie in [-1, 1]): adapters and ``wrap`` say
what they hand over (``PatchLogits.kind``) and ``RefinerConfig.logits`` overrides.
"""

from __future__ import annotations

from typing import Optional

import torch

from .records import LOGIT_KINDS

__all__ = ["detect_logit_kind", "log_domain_logits", "kind_scale", "auto_temperature", "COSINE_SCALE", "AUTO_CONFIDENCE"]

#: CLIP's learned temperature, the scale of cosine logits when none is given
COSINE_SCALE = 100.0
#: the class probability ``logit_scale="auto"`` makes a share of the patches reach (the paper's NMS threshold)
AUTO_CONFIDENCE = 0.9
_TOL = 1e-3


def detect_logit_kind(logits: torch.Tensor) -> str:
    """What a batch of logits most likely is.

    Args:
        logits: (B, C, ...) float, classes on dim 1.

    Returns:
        "probs" (in [0, 1], summing to 1 over classes at every position), "log_probs" (<= 0,
        log-sum-exp over classes 0 everywhere), "cosine" (in [-1, 1]) or "scores" (anything else).
    """
    x = logits.detach().float()
    lo, hi = float(x.min()), float(x.max())
    if x.shape[1] > 1 and lo >= -_TOL and hi <= 1 + _TOL and float((x.sum(1) - 1).abs().max()) <= _TOL:
        return "probs"
    if x.shape[1] > 1 and hi <= _TOL and float(torch.logsumexp(x, 1).abs().max()) <= _TOL:
        return "log_probs"
    if lo >= -1 - _TOL and hi <= 1 + _TOL:
        return "cosine"
    return "scores"


def log_domain_logits(logits: torch.Tensor, kind: str = "auto", scale: Optional[float] = None) -> tuple[torch.Tensor, str]:
    """Logits as log-domain scores ``z`` whose softmax over classes is the model's belief.

    Args:
        logits: (B, C, ...) float.
        kind: one of ``LOGIT_KINDS``; "auto" calls ``detect_logit_kind``.
        scale: multiplies the result; None: ``COSINE_SCALE`` for cosines, 1 otherwise.

    Returns:
        (z (B, C, ...) float32, the kind used).

    Raises:
        ValueError: unknown kind, or probabilities / log-probabilities out of their range.
    """
    if kind not in LOGIT_KINDS:
        raise ValueError(f"logits kind: expected one of {LOGIT_KINDS}, got {kind!r}")
    x = logits.float()
    if kind == "auto":
        kind = detect_logit_kind(x)
    if kind == "probs":
        if float(x.min()) < -_TOL or float(x.max()) > 1 + _TOL:
            raise ValueError(f"logits kind 'probs': expected values in [0, 1], got [{float(x.min()):.3g}, "
                             f"{float(x.max()):.3g}]")
        z = x.clamp_min(1e-12).log()
    elif kind == "log_probs":
        if float(x.max()) > _TOL:
            raise ValueError(f"logits kind 'log_probs': expected values <= 0, got a maximum of {float(x.max()):.3g}")
        z = x
    else:
        z = x
    return z * float(kind_scale(kind) if scale is None else scale), kind


def kind_scale(kind: str) -> float:
    """A kind's own scale: CLIP's 100 for cosines, 1 for scores, log-probabilities and
    probabilities (a trained model's own calibration)."""
    return COSINE_SCALE if kind == "cosine" else 1.0


def auto_temperature(z: torch.Tensor, threshold: float = 0.9, share: float = 0.9, iters: int = 48) -> torch.Tensor:
    """Per image, the scale at which a ``share`` of the patches reach class probability ``threshold``.

    ``softmax(s * z)`` grows more confident with s at every patch (d/ds of the top probability
    is p_top (z_top - E_p[z]) >= 0), so each patch has a least scale s_i at which its top
    probability reaches ``threshold``; the image's scale is the ``share``-quantile of the s_i.
    It depends only on differences between classes at a patch: multiplying the logits by a
    constant divides it by that constant, and log-softmax or log-probabilities leave it
    unchanged, so every form of one model's logits gives the same ``s * z``.

    Args:
        z: (B, C, ...) log-domain logits (classes on dim 1).
        threshold: confidence in (0, 1).
        share: fraction of the patches in (0, 1].
        iters: bisection steps on log10(s) over [1e-4, 1e8] (48 give ~6 significant digits).

    Returns:
        (B,) float32 scales; 1 for an image with one class (any scale gives probability 1). A
        patch whose two best classes tie never reaches ``threshold``: it counts as needing the
        largest scale, 1e8.
    """
    if not 0.0 < float(threshold) < 1.0 or not 0.0 < float(share) <= 1.0:
        raise ValueError(f"auto_temperature: expected threshold in (0, 1) and share in (0, 1], got "
                         f"{threshold!r}, {share!r}")
    b, c = z.shape[:2]
    if c == 1:
        return torch.ones(b, device=z.device)
    gaps = (z.amax(1, keepdim=True) - z).flatten(2).float()  # (B, C, N) >= 0, 0 at the top class
    lo = torch.full((b, gaps.shape[-1]), -4.0, device=z.device)
    hi = torch.full_like(lo, 8.0)
    target = 1.0 / float(threshold)  # top probability >= threshold  <=>  sum_c exp(-s gap_c) <= 1/threshold
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        reached = torch.exp(-(10.0 ** mid).unsqueeze(1) * gaps).sum(1) <= target
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, mid)
    return torch.quantile(10.0 ** hi, float(share), dim=1)
