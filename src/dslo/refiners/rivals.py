"""The post-processors users run today, behind ``DiscrepancyRefiner``'s call.

``DiscrepancyRefiner(solver="pamr" | "densecrf" | "lposs" | "lposs+")`` runs one of them on the
same inputs as dslo's solvers and returns the same ``RefinerOutput``, so a table can put them
side by side. Each follows its public code's pipeline, not dslo's front end: no early
rejection, no NMS, no JBU (``active`` is all True).

- "pamr" (SCLIP, NACLIP, SC-CLIP's default): raw cosine logits bilinearly upsampled to the
  image, then PAMR (``pamr.py``).
- "densecrf": softmax of the scaled logits, bilinearly upsampled, then the fully connected CRF
  (``densecrf.py``; needs the ``crf`` extra).
- "lposs": label propagation of the raw patch logits over a kNN graph of the attention
  provider's patch features (``Attention.features``), then bilinear upsampling.
- "lposs+": LPOSS, upsampled, then a second propagation over a pixel colour graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import RefinerConfig
from .records import Attention

__all__ = ["RIVALS", "rival_scores"]

RIVALS = ("pamr", "densecrf", "lposs", "lposs+")


def rival_scores(logits: torch.Tensor, attention, image: torch.Tensor, config: RefinerConfig) -> torch.Tensor:
    """Per-class scores of a rival post-processor at image resolution.

    Args:
        logits: (B, C, h, w) raw cosine logits.
        attention: ``Attention`` resampled to (h, w) (LPOSS reads its ``features``), or None
            for rivals that need no model ("pamr", "densecrf").
        image: (B, 3, H, W) in [0, 1].
        config: ``config.solver`` names the rival; its ``pamr_*``, ``crf_*``, ``lposs_*``
            fields set it.

    Returns:
        (B, C, H, W) float32 scores, higher wins.

    Raises:
        ValueError: LPOSS with an attention that carries no features.
    """
    solver = config.solver
    size = tuple(image.shape[-2:])
    x = logits.float()
    if solver == "pamr":
        from .pamr import pamr

        up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return pamr(up, image, iters=config.pamr_iters, dilations=config.pamr_dilations)
    if solver == "densecrf":
        from .densecrf import dense_crf

        probs = torch.softmax(x * config.logit_scale, dim=1)
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return dense_crf(probs, image, iters=config.crf_iters)
    if solver in ("lposs", "lposs+"):
        from .lposs import lposs, lposs_plus

        features = getattr(attention, "features", None) if isinstance(attention, Attention) else None
        if features is None:
            source = getattr(attention, "source", "") or type(attention).__name__
            raise ValueError(
                f"solver={solver!r} needs the vision model's patch features (Attention.features, "
                f"(B, N, D)), and this attention has none ({source}); use a provider that returns "
                "them (dinov2: the last block's value projections) or pass "
                "Attention(matrix, grid, features=...)"
            )
        h, w = x.shape[-2:]
        # LPOSS measures patch distances in pixels of its input, short side 448
        patch = config.lposs_patch_size if config.lposs_patch_size is not None else 448.0 / min(h, w)
        z = lposs(x, features.to(x.device), k=config.lposs_k, gamma=config.lposs_gamma,
                  sigma=config.lposs_sigma, alpha=config.lposs_alpha, iters=config.lposs_iters,
                  patch_size=patch)
        up = F.interpolate(z.float(), size=size, mode="bilinear", align_corners=False)
        if solver == "lposs":
            return up
        return lposs_plus(up, image.to(up.device), window=config.lposs_window, tau=config.lposs_tau,
                          alpha=config.lposs_alpha, iters=config.lposs_iters).float()
    raise ValueError(f"rival_scores: expected a solver in {RIVALS}, got {solver!r}")
