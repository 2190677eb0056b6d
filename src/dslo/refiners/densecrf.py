"""Fully connected CRF (Krähenbühl & Koltun, NeurIPS 2011), a rival post-processor.

A thin wrapper around ``pydensecrf`` (the ``pydensecrf2`` distribution, the maintained
packaging of Lucas Beyer's binding of the authors' C++ code): mean-field inference with a
Potts model, a spatial Gaussian kernel and a bilateral (position + colour) kernel, both
evaluated with the permutohedral lattice. Install with ``pip install 'dslo[crf]'``; PyPI has
no wheel for it, pip compiles its sdist (about 40 s, needs a C++ compiler), and the build
fails on Python >= 3.13 (its pinned Cython 0.29), where the extra installs nothing.

The package works on one image at a time on the CPU, so the batch is a loop over images
(not over classes) with a round trip through numpy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .records import check_maps_and_image

__all__ = ["dense_crf"]

#: Probabilities are clipped to [PROB_CLIP, 1] before the log, as ``unary_from_softmax`` in
#: pydensecrf.utils does by default, so a zero probability gives a large finite energy.
PROB_CLIP = 1e-5


def _import_dcrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:  # the extra is optional: say how to get it
        raise ImportError(
            "dense_crf needs the pydensecrf2 package: pip install 'dslo[crf]' "
            "(or pip install pydensecrf2)"
        ) from exc
    return dcrf


def dense_crf(
    probs: torch.Tensor,
    image: torch.Tensor,
    iters: int = 10,
    pos_sxy: float = 3,
    pos_compat: float = 3,
    bi_sxy: float = 80,
    bi_srgb: float = 13,
    bi_compat: float = 10,
) -> torch.Tensor:
    """Mean-field marginals of a dense CRF whose unary is ``-log(probs)``.

    The energy is ``E(x) = sum_i -log p_i(x_i) + sum_{i<j} [x_i != x_j] k(f_i, f_j)`` with
    ``k = pos_compat * exp(-|p_i - p_j|^2 / (2 pos_sxy^2))
    + bi_compat * exp(-|p_i - p_j|^2 / (2 bi_sxy^2) - |I_i - I_j|^2 / (2 bi_srgb^2))``,
    positions ``p`` in pixels and colours ``I`` on the 0..255 scale; kernels are diagonal with
    symmetric normalisation (the package's defaults).

    The defaults are the example of pydensecrf's README (the values of the original paper's
    code). Other well-known settings: DeepLab-v2 (ResNet-101) as packaged by
    kazuto1011/deeplab-pytorch, reused by many CLIP-based weakly supervised segmentation
    codes, uses ``iters=10, pos_sxy=1, pos_compat=3, bi_sxy=67, bi_srgb=3, bi_compat=4``.

    Args:
        probs: (B, C, H, W) float class probabilities (non-negative; each pixel is clipped to
            [1e-5, 1] before the log and need not sum exactly to 1). Maps of another size
            (B, C, h, w) are first bilinearly upsampled to the image size.
        image: (B, 3, H, W) float in [0, 1], RGB; rounded to 8 bits for the bilateral kernel.
        iters: mean-field iterations (0 returns the normalised, clipped input).
        pos_sxy: spatial standard deviation of the Gaussian kernel, in pixels.
        pos_compat: weight of the Gaussian (smoothness) kernel.
        bi_sxy: spatial standard deviation of the bilateral kernel, in pixels.
        bi_srgb: colour standard deviation of the bilateral kernel, on the 0..255 scale.
        bi_compat: weight of the bilateral (appearance) kernel.

    Returns:
        (B, C, H, W) float32 marginals on the device of ``probs``; non-negative, summing to 1
        over C.

    Raises:
        ValueError: on wrong shapes, dtypes, non-finite or negative probabilities, an image
            outside [0, 1], batch mismatch, negative ``iters`` or non-positive widths.
        ImportError: when pydensecrf2 is not installed (``pip install 'dslo[crf]'``).
    """
    check_maps_and_image(probs, image, "probs")
    if probs.numel() and float(probs.min()) < 0:
        raise ValueError(f"probs: expected non-negative probabilities, min is {float(probs.min()):.3g}")
    if isinstance(iters, bool) or int(iters) != iters or iters < 0:
        raise ValueError(f"iters: expected a non-negative int, got {iters!r}")
    for name, value in (("pos_sxy", pos_sxy), ("bi_sxy", bi_sxy), ("bi_srgb", bi_srgb)):
        if not value > 0:
            raise ValueError(f"{name}: expected a positive width, got {value!r}")
    dcrf = _import_dcrf()
    import numpy as np

    b, c = probs.shape[:2]
    h, w = image.shape[-2:]
    p = probs.detach().float()
    if tuple(p.shape[-2:]) != (h, w):
        p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
    unary = (-torch.log(p.clamp(PROB_CLIP, 1.0))).cpu().numpy().reshape(b, c, h * w)
    # the bilateral kernel takes 8-bit RGB, row-major (H, W, 3), contiguous
    rgb = (image.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    rgb = rgb.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    out = np.empty((b, c, h * w), dtype=np.float32)
    for k in range(b):
        crf = dcrf.DenseCRF2D(w, h, c)
        crf.setUnaryEnergy(np.ascontiguousarray(unary[k], dtype=np.float32))
        crf.addPairwiseGaussian(sxy=float(pos_sxy), compat=float(pos_compat))
        crf.addPairwiseBilateral(sxy=float(bi_sxy), srgb=float(bi_srgb),
                                 rgbim=np.ascontiguousarray(rgb[k]), compat=float(bi_compat))
        out[k] = np.asarray(crf.inference(int(iters)), dtype=np.float32)
    return torch.from_numpy(out).view(b, c, h, w).to(probs.device)
