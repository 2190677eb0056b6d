"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), a rival post-processor.

SCLIP, NACLIP and SC-CLIP share the same PAMR code and call it the same way: NACLIP turns it
on by default (10 iterations, dilations (8, 16)); SCLIP and SC-CLIP ship it as an option
(``pamr_steps=0`` in their released segmentors, dilations (8, 16) when on). This module
reproduces that use so the rival can be measured side by side with the discrepancy solvers.

The reading of the public SCLIP pipeline that this function follows:

* Input: the raw cosine logits (patch-text similarities), bilinearly upsampled to the image
  size (``align_corners=False``) *before* the logit scale and the softmax; PAMR's output is
  then scaled and softmaxed by the caller.
* Guide: the image as the segmentor's data preprocessor delivers it, i.e. normalised with
  the CLIP mean/std on the 0..255 scale, resized to the output size; 10 iterations,
  dilations (8, 16).
* Affinity: for a pixel ``i`` and each dilation ``d``, its 8 neighbours ``j`` at offsets
  ``{-d, 0, d}^2 \\ {(0, 0)}`` (out-of-image neighbours take the nearest border pixel). Per
  channel ``k``, ``sigma_k(i)`` is the unbiased standard deviation of the ``9 * len(dilations)``
  samples (each dilation's 3x3 stencil, so the centre counts once per dilation). Then
  ``a_ij = -mean_k |I_k(i) - I_k(j)| / (1e-8 + 0.1 * sigma_k(i))`` and
  ``w_ij = softmax_j(a_ij)`` over the ``8 * len(dilations)`` neighbours (not the pixel
  itself).
* Iteration: ``m(i) <- sum_j w_ij m(j)``, the same weights for every class.
* Channels: those codes refine every text query's map (synonyms separately) and only then
  take the per-class maximum over synonyms after the softmax.

Dividing by the local standard deviation makes the affinity invariant to a positive
affine change of each channel, except through the ``1e-8`` guard; the CLIP normalisation is
therefore applied here too, so the guard acts on the same scale as in SCLIP and the results
agree to float32 rounding.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .records import check_image, check_maps_and_image

__all__ = ["pamr", "pamr_affinity"]

# The preprocessor constants of SCLIP's segmentor (CLIP's mean/std on the 0..255 scale,
# applied after the BGR->RGB flip, so in RGB order).
CLIP_MEAN_255 = (122.771, 116.746, 104.094)
CLIP_STD_255 = (68.501, 66.632, 70.323)

#: Guard and temperature of the affinity, as in the PAMR paper's code.
STD_EPS = 1e-8
STD_SCALE = 0.1


def _shifted(x: torch.Tensor, dilations: Sequence[int], centre: bool) -> Iterator[torch.Tensor]:
    """Yield ``x`` (..., H, W) seen from each stencil offset, borders replicated.

    The order (dilation, then row, then column) is fixed so that the affinity weights and the
    masks are paired the same way in every call.
    """
    h, w = x.shape[-2:]
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0 and not centre:
                    continue
                yield padded[..., d + dy:d + dy + h, d + dx:d + dx + w]


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    try:
        dil = tuple(int(d) for d in dilations)
    except TypeError:
        raise ValueError(f"dilations: expected a sequence of positive ints, got {dilations!r}") from None
    if not dil or min(dil) < 1 or any(d != float(x) for d, x in zip(dil, dilations)):
        raise ValueError(f"dilations: expected a non-empty sequence of positive ints, got {dilations!r}")
    return dil


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """Neighbour weights of PAMR from the image.

    Args:
        image: (B, 3, H, W) float in [0, 1], RGB.
        dilations: the stencil dilations (each gives 8 neighbours).

    Returns:
        (B, 8 * len(dilations), H, W) float32, non-negative, summing to 1 over dim 1; the
        neighbour order is dilation-major, then row offset, then column offset.
    """
    check_image(image)
    dil = _check_dilations(dilations)
    x = image.float() * 255.0
    mean = x.new_tensor(CLIP_MEAN_255).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD_255).view(1, 3, 1, 1)
    x = (x - mean) / std

    # two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2: flat image
    # regions have tiny deviations that cancellation in float32 would swamp
    n = 9 * len(dil)
    total = torch.zeros_like(x)
    for s in _shifted(x, dil, centre=True):
        total += s
    local_mean = total / n
    sq = torch.zeros_like(x)
    for s in _shifted(x, dil, centre=True):
        sq += (s - local_mean) ** 2
    scale = STD_EPS + STD_SCALE * torch.sqrt(sq / (n - 1))

    logits = torch.stack(
        [-((x - s).abs() / scale).mean(1) for s in _shifted(x, dil, centre=False)], dim=1
    )
    return torch.softmax(logits, dim=1)


def pamr(
    scores: torch.Tensor,
    image: torch.Tensor,
    iters: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """Refine per-class score maps by repeated image-adaptive local averaging (PAMR).

    Args:
        scores: (B, C, H, W) float, the raw cosine logits upsampled to the image size (SCLIP
            applies PAMR before its logit scale and softmax). Maps of another size (B, C, h, w)
            are first bilinearly upsampled to (H, W) with ``align_corners=False``, as SCLIP
            does before calling PAMR.
        image: (B, 3, H, W) float in [0, 1], RGB; normalised here with CLIP's mean/std as in
            SCLIP (see the module docstring).
        iters: number of averaging steps (SCLIP: 10).
        dilations: stencil dilations (SCLIP: (8, 16)).

    Returns:
        (B, C, H, W) with the dtype and device of ``scores``; computed in float32. Each step is
        a convex combination of neighbours, so values stay within the input's range.

    Raises:
        ValueError: on wrong shapes, dtypes, non-finite values, an image outside [0, 1],
            batch mismatch, negative ``iters`` or bad dilations.
    """
    check_maps_and_image(scores, image, "scores")
    if isinstance(iters, bool) or int(iters) != iters or iters < 0:
        raise ValueError(f"iters: expected a non-negative int, got {iters!r}")
    dil = _check_dilations(dilations)

    size = tuple(image.shape[-2:])
    image = image.to(scores.device)
    masks = scores.float()
    if tuple(masks.shape[-2:]) != size:
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)

    weights = pamr_affinity(image, dil)
    # one weight map per neighbour, shared by all classes: broadcast over C instead of
    # materialising (B, C, P, H, W)
    weights = weights.unsqueeze(2)
    for _ in range(int(iters)):
        out = torch.zeros_like(masks)
        for p, s in enumerate(_shifted(masks, dil, centre=False)):
            out += weights[:, p] * s
        masks = out
    return masks.to(scores.dtype)
