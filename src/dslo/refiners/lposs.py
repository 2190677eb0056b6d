"""LPOSS and LPOSS+: label propagation over patches, then over pixels (Stojnic et al., CVPR 2025).

A training-free rival of the discrepancy solvers: the OVSS model's patch scores are smoothed by
solving a label-propagation system on a graph, once over patches (LPOSS) and once more over
pixels (LPOSS+).

LPOSS, on a grid of N patches with L2-normalised vision features f_i and scores Y (N, C):

    A_ij = max(f_i . f_j, 0)^gamma * exp(-sigma * d_ij^p)  for j among the k most similar to i
                                                           (i itself included), else 0
    W    = A + A^T with the diagonal set to 0               (an edge found from both ends counts twice)
    S    = D^-1/2 W D^-1/2, D = diag(row sums of W)         (a row without edges keeps D = 1)
    (I - alpha S) Z = Y, solved by ``iters`` conjugate-gradient steps from Z = 0, per class column

with d_ij the Euclidean distance between patch centres in input pixels (``patch_size`` pixels
per grid step) and p = 1. Y is the raw cosine similarity of patch and class embeddings: no
softmax, no scale. The system is linear in Y and the CG stopping rule is relative, so a
positive scale of Y, or a constant added to every class, leaves the argmax unchanged.

LPOSS+ propagates LPOSS's output again over the pixels of the image, after bilinear upsampling
to the image size (``align_corners=False``): each pixel is joined to every other pixel of the
``window`` x ``window`` square around it (no kNN) with weight exp(-||lab_p - lab_q|| / tau),
Lab values divided by (100, 128, 128); same normalisation, same alpha and CG.

CG follows SciPy/CuPy's unpreconditioned ``cg`` with ``x0 = 0``: a column stops once its
residual norm is at most ``tol * ||y||`` (``tol = 1e-6``; ten steps rarely get there), and a
zero column stays zero. The public code solves the classes one after the other; here every
class (and every image) is a column of one batched solve.

Sizes: LPOSS's graph is a dense (B, N, N) tensor with the top-k mask (N = 1369 at a 37 x 37
grid is 7.5 MB per image in float32). LPOSS+'s graph is a block-diagonal sparse CSR matrix with
window^2 - 1 = 168 entries per pixel (about 1.3 kB per pixel with 32-bit indices: 230 MB for a
480 x 360 image); one product with 12 classes costs about 0.07 s on one CPU core there.

The public code's default evaluation slides 224 x 224 windows (stride 112) over the image
resized to a short side of 448 and builds one patch graph over the patches of all windows
(centres in image coordinates), averaging the windows' upsampled outputs before LPOSS+. Here
the patch graph is over one grid (its "whole" inference mode); LPOSS+ is the same in both.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Union

import torch
import torch.nn.functional as F

from .records import check_image, check_tensor

__all__ = ["lposs", "lposs_plus", "lposs_patch_graph", "lposs_pixel_graph", "lposs_pixel_weights",
           "rgb_to_lab", "conjugate_gradient"]

#: Scale that maps L (0..100) and a, b (about -128..127) to comparable unit ranges, as LPOSS+.
LAB_SCALE = (100.0, 128.0, 128.0)


# --------------------------------------------------------------------------- solver


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    iters: int,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Solve A x = rhs for many right-hand sides at once by unpreconditioned CG from x = 0.

    Each (b, c) slice ``rhs[b, c]`` is an independent system; ``matvec`` must act on every
    slice separately (a block-diagonal A). A slice stops updating once its residual norm is at
    most ``tol`` times the norm of its right-hand side, as SciPy's and CuPy's ``cg`` do.

    Args:
        matvec: x (B, C, *rest) -> A x, same shape; A symmetric positive definite.
        rhs: (B, C, *rest) float.
        iters: number of CG steps (>= 0).
        tol: relative residual tolerance; 0 runs exactly ``iters`` steps.

    Returns:
        x: (B, C, *rest), same dtype as ``rhs``.
    """
    dims = tuple(range(2, rhs.ndim))
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    rho = (r * r).sum(dims)
    atol = tol * rho.sqrt()
    active = rho > 0  # a zero right-hand side has the solution 0
    p = torch.zeros_like(rhs)
    rho_prev = torch.ones_like(rho)
    shape = rho.shape + (1,) * len(dims)
    for step in range(iters):
        if not bool(active.any()):
            break
        beta = _safe_ratio(rho, rho_prev, active) if step else torch.zeros_like(rho)
        p = r + beta.view(shape) * p
        q = matvec(p)
        step_size = _safe_ratio(rho, (p * q).sum(dims), active).view(shape)
        x = x + step_size * p
        r = r - step_size * q
        rho_prev = rho
        rho = (r * r).sum(dims)
        active = active & (rho.sqrt() > atol)
    return x


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    # stopped (or zero) columns take a zero step instead of 0/0
    ok = active & (den != 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _symmetric_normalise_degrees(degree: torch.Tensor) -> torch.Tensor:
    """D^-1/2 of row sums; a node without edges keeps degree 1 (no division by zero)."""
    return torch.where(degree > 0, degree, torch.ones_like(degree)).rsqrt()


# --------------------------------------------------------------------------- LPOSS


def lposs_patch_graph(
    features: torch.Tensor,
    grid: tuple[int, int],
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    patch_size: Union[float, tuple[float, float]] = 16.0,
    distance_power: float = 1.0,
) -> torch.Tensor:
    """LPOSS's normalised patch graph S = D^-1/2 W D^-1/2 (see the module docstring).

    Args:
        features: (B, N, D) patch features, N = h * w row-major; L2-normalised here.
        grid: (h, w).
        k: neighbours per patch, the patch itself included (min(k, N) when N is smaller).
        gamma: exponent of the clipped cosine similarity.
        sigma: rate of the geometric term exp(-sigma * distance^distance_power).
        patch_size: input pixels per grid step, (vertical, horizontal) or one number; the
            distance is measured between patch centres in pixels.
        distance_power: exponent of the distance (1 in LPOSS's configurations).

    Returns:
        (B, N, N) symmetric, zero diagonal, float32 (float64 for float64 features).
    """
    b, n, _ = features.shape
    h, w = grid
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = F.normalize(features.to(dtype), dim=-1)
    sim = f @ f.transpose(1, 2)
    kk = max(1, min(int(k), n))
    top, idx = sim.topk(kk, dim=-1)
    ph, pw = (float(patch_size), float(patch_size)) if isinstance(patch_size, (int, float)) \
        else (float(patch_size[0]), float(patch_size[1]))
    rows = torch.arange(h, device=f.device, dtype=dtype).repeat_interleave(w) * ph
    cols = torch.arange(w, device=f.device, dtype=dtype).repeat(h) * pw
    centres = torch.stack((rows, cols), 1)
    geometry = torch.exp(-sigma * torch.cdist(centres, centres).pow(distance_power))
    weights = top.clamp_min(0).pow(gamma) * geometry.expand(b, n, n).gather(-1, idx)
    a = torch.zeros_like(sim).scatter_(-1, idx, weights)
    graph = a + a.transpose(1, 2)
    graph.diagonal(dim1=-2, dim2=-1).zero_()
    d = _symmetric_normalise_degrees(graph.sum(-1))
    return d.unsqueeze(-1) * graph * d.unsqueeze(-2)


def lposs(
    logits: torch.Tensor,
    features: torch.Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    alpha: float = 0.95,
    iters: int = 10,
    patch_size: Union[float, tuple[float, float]] = 16.0,
    distance_power: float = 1.0,
    tol: float = 1e-6,
) -> torch.Tensor:
    """LPOSS: label propagation of patch scores over a kNN graph of patch features.

    Solves (I - alpha S) Z = Y with ``lposs_patch_graph``'s S by ``iters`` CG steps, every
    class of every image at once.

    Args:
        logits: (B, C, h, w) raw cosine patch logits (Y; no softmax, no logit scale: the result
            is linear in Y).
        features: (B, N, D) or (1, N, D) patch features on the same grid, N = h * w row-major
            (``Attention.features`` resampled to (h, w)); any scale, L2-normalised here.
        k: neighbours per patch (the patch itself counts, as in LPOSS's exact kNN search).
        gamma: exponent of the clipped cosine similarity.
        sigma: rate of the geometric term, per input pixel.
        alpha: propagation strength in [0, 1).
        iters: CG steps.
        patch_size: input pixels per grid step (LPOSS's DINO ViT-B/16 at its input: 16); sets
            the unit of the geometric term.
        distance_power: exponent of the centre distance (1 in LPOSS's configurations).
        tol: CG relative residual tolerance (LPOSS: 1e-6).

    Returns:
        (B, C, h, w) propagated scores, float32 (float64 for float64 inputs), on the logits'
        device.

    Raises:
        ValueError: on shapes that do not fit, non-finite values or parameters out of range.
    """
    check_tensor(logits, "logits", 4, dims="(B, C, h, w)")
    check_tensor(features, "features", 3, dims="(B, N, D)")
    b, c, h, w = logits.shape
    n = h * w
    if b == 0 or c == 0 or n == 0:
        raise ValueError(f"logits: expected B, C, h, w >= 1, got shape {tuple(logits.shape)}")
    if features.shape[0] not in (1, b) or features.shape[1] != n or features.shape[2] < 1:
        raise ValueError(
            f"features: expected ({b} or 1, N = h*w = {h}*{w} = {n}, D >= 1) on the logits' grid, "
            f"got shape {tuple(features.shape)}; resample the attention to the logits grid first"
        )
    _check_propagation(alpha, iters, tol)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if gamma < 0 or sigma < 0 or distance_power <= 0:
        raise ValueError(f"expected gamma >= 0, sigma >= 0 and distance_power > 0, got {gamma}, {sigma}, {distance_power}")
    sizes = (patch_size,) if isinstance(patch_size, (int, float)) else tuple(patch_size)
    if len(sizes) not in (1, 2) or not all(math.isfinite(float(s)) and float(s) > 0 for s in sizes):
        raise ValueError(f"patch_size: expected a positive number or (ph, pw), got {patch_size!r}")
    dtype = torch.float64 if torch.float64 in (logits.dtype, features.dtype) else torch.float32
    graph = lposs_patch_graph(features.to(device=logits.device, dtype=dtype), (h, w), k=int(k),
                              gamma=gamma, sigma=sigma, patch_size=patch_size,
                              distance_power=distance_power)
    y = logits.to(dtype).reshape(b, c, n)

    def system(x: torch.Tensor) -> torch.Tensor:
        # S is symmetric, so S x for every column at once is x @ S
        return x - alpha * (x @ graph)

    z = conjugate_gradient(system, y, iters=int(iters), tol=tol)
    return z.reshape(b, c, h, w)


# --------------------------------------------------------------------------- LPOSS+


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE L*a*b* (D65 white, 2-degree observer).

    The sRGB transfer curve is undone (linear below 0.04045), linear RGB goes to XYZ with the
    sRGB/D65 matrix, XYZ is divided by the white point and mapped by the CIE cube-root curve
    (linear below 0.008856).

    Args:
        image: (..., 3, H, W) float.

    Returns:
        (..., 3, H, W): L in [0, 100], a and b roughly in [-128, 127]; same dtype.
    """
    linear = torch.where(image > 0.04045, ((image + 0.055) / 1.055).pow(2.4), image / 12.92)
    to_xyz = torch.tensor(
        [[0.412453, 0.357580, 0.180423],
         [0.212671, 0.715160, 0.072169],
         [0.019334, 0.119193, 0.950227]],
        dtype=image.dtype, device=image.device,
    )
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=image.dtype, device=image.device)
    xyz = torch.einsum("ij,...jhw->...ihw", to_xyz, linear) / white.view(3, 1, 1)
    curve = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856).pow(1 / 3), 7.787 * xyz + 4 / 29)
    fx, fy, fz = curve.unbind(-3)
    return torch.stack((116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)), dim=-3)


def _window_offsets(window: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) of the window around a pixel, row-major, the pixel itself excluded."""
    r = window // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy or dx]


def _partner_slices(dy: int, dx: int, h: int, w: int) -> tuple[slice, slice, slice, slice]:
    """Rows and columns of the pixels p whose partner q = p + (dy, dx) is inside an h x w
    image, and of those partners."""
    return (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)),
            slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))


def lposs_pixel_weights(image: torch.Tensor, *, window: int = 13, tau: float = 0.01) -> torch.Tensor:
    """LPOSS+'s pixel affinities exp(-||lab_p - lab_q|| / tau) to every pixel q of the window.

    Args:
        image: (B, 3, H, W) in [0, 1].
        window: odd side of the square neighbourhood (13: 168 neighbours per pixel).
        tau: temperature of the colour distance (Lab divided by (100, 128, 128)).

    Returns:
        (B, K, H, W), K = window^2 - 1: entry [b, k, y, x] is the weight of the edge from pixel
        (y, x) to (y + dy_k, x + dx_k), offsets in row-major order over the window without its
        centre; 0 where the partner falls outside the image. Float32 (float64 for a float64
        image).
    """
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    lab = rgb_to_lab(image.to(dtype)) / torch.tensor(LAB_SCALE, dtype=dtype, device=image.device).view(1, 3, 1, 1)
    b, _, h, w = lab.shape
    offsets = _window_offsets(window)
    k = len(offsets)
    weights = lab.new_zeros(b, k, h, w)
    # the offsets are listed symmetrically (entry k-1-i is minus entry i), and an edge has the
    # same weight seen from either end: compute each edge once, store it for both ends
    for i, (dy, dx) in enumerate(offsets[: k // 2]):
        py, px, qy, qx = _partner_slices(dy, dx, h, w)
        # channel by channel: a strided 3-channel difference or vector_norm is ~10x slower
        sq = lab[:, 0, py, px] - lab[:, 0, qy, qx]
        sq.mul_(sq)
        for c in (1, 2):
            diff = lab[:, c, py, px] - lab[:, c, qy, qx]
            sq.addcmul_(diff, diff)
        edge = sq.sqrt_().mul_(-1.0 / tau).exp_()
        weights[:, i, py, px] = edge
        weights[:, k - 1 - i, qy, qx] = edge
    return weights


def lposs_pixel_graph(image: torch.Tensor, *, window: int = 13, tau: float = 0.01) -> torch.Tensor:
    """LPOSS+'s normalised pixel graph S = D^-1/2 W D^-1/2 as one block-diagonal sparse matrix.

    Args:
        image: (B, 3, H, W) in [0, 1].
        window: odd side of the neighbourhood.
        tau: colour temperature.

    Returns:
        sparse CSR (B*H*W, B*H*W) with 32-bit indices, pixels of image b at rows
        b*H*W + y*W + x, exactly window^2 - 1 stored entries per row (neighbours outside the
        image are stored as zeros, so every row has the same layout), float32 (float64 for a
        float64 image).
    """
    check_image(image)
    if isinstance(window, bool) or int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected an odd positive integer, got {window!r}")
    b, _, h, w = image.shape
    n, k = h * w, window * window - 1
    if b * n * k >= 2**31 - 1:
        raise ValueError(
            f"lposs_pixel_graph: {b} images of {h}x{w} pixels with {k} neighbours each exceed "
            "the 2^31 entries of one sparse matrix; pass fewer images at a time"
        )
    weights = lposs_pixel_weights(image, window=window, tau=tau)
    device = weights.device
    # W is symmetric (the window is), so row sums are the degrees
    d = _symmetric_normalise_degrees(weights.sum(1))  # (B, H, W)
    for i, (dy, dx) in enumerate(_window_offsets(window)):
        # in the offset-major layout D^-1/2 on both ends is two shifted products, far cheaper
        # than gathering d at 168 columns per pixel
        py, px, qy, qx = _partner_slices(dy, dx, h, w)
        weights[:, i, py, px] *= d[:, py, px] * d[:, qy, qx]
    offsets = torch.tensor(_window_offsets(window), device=device, dtype=torch.int32).view(k, 2)
    # a neighbour outside the image has weight 0, so any column inside the block will do:
    # clamping the flat index keeps it there without a mask
    step = offsets[:, 0] * w + offsets[:, 1]
    cols = (torch.arange(n, device=device, dtype=torch.int32).view(n, 1) + step).clamp_(0, n - 1)
    if b > 1:  # block diagonal: image i's pixels are rows and columns i*n .. (i+1)*n - 1
        cols = (cols.view(1, n, k) + (torch.arange(b, device=device, dtype=torch.int32) * n).view(b, 1, 1))
        cols = cols.reshape(b * n, k)
    values = weights.permute(0, 2, 3, 1).reshape(b * n, k)
    # 32-bit indices halve the index memory and run about 2.5x faster on CPU than 64-bit ones
    crow = torch.arange(b * n + 1, device=device, dtype=torch.int32) * k
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), values.reshape(-1),
                                       size=(b * n, b * n), check_invariants=False)


def lposs_plus(
    scores: torch.Tensor,
    image: torch.Tensor,
    *,
    window: int = 13,
    tau: float = 0.01,
    alpha: float = 0.95,
    iters: int = 10,
    tol: float = 1e-6,
) -> torch.Tensor:
    """LPOSS+: label propagation of pixel scores over a colour-affinity window graph.

    Solves (I - alpha S) Z = scores per class with S = D^-1/2 W D^-1/2 of the window graph of
    ``lposs_pixel_weights`` (every pixel of the ``window`` x ``window`` square, no kNN, no
    spatial term) by ``iters`` CG steps.

    Args:
        scores: (B, C, H, W) what LPOSS+ propagates: LPOSS's output (``lposs``) bilinearly
            upsampled to (H, W) with ``align_corners=False``, no softmax.
        image: (B, 3, H, W) in [0, 1] (RGB), at the same size.
        window: odd side of the neighbourhood (LPOSS+: 13).
        tau: colour temperature (LPOSS+: 0.01).
        alpha: propagation strength in [0, 1) (LPOSS+ uses LPOSS's 0.95).
        iters: CG steps (10).
        tol: CG relative residual tolerance (1e-6).

    Returns:
        (B, C, H, W) float32 (float64 for float64 scores), on the scores' device.

    Raises:
        ValueError: on shapes that do not fit, non-finite values or parameters out of range.
    """
    check_tensor(scores, "scores", 4, dims="(B, C, H, W)")
    check_image(image)
    b, c, h, w = scores.shape
    if c == 0 or h == 0 or w == 0:
        raise ValueError(f"scores: expected C, H, W >= 1, got shape {tuple(scores.shape)}")
    if tuple(image.shape) != (b, 3, h, w):
        raise ValueError(
            f"image: expected ({b}, 3, {h}, {w}) to match the scores (upsample the scores to the "
            f"image first), got {tuple(image.shape)}"
        )
    if isinstance(window, bool) or int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected an odd positive integer, got {window!r}")
    if not tau > 0:
        raise ValueError(f"tau: expected > 0, got {tau!r}")
    _check_propagation(alpha, iters, tol)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    graph = lposs_pixel_graph(image.to(device=scores.device, dtype=dtype), window=int(window), tau=tau)
    y = scores.to(dtype).reshape(b, c, h * w)

    def system(x: torch.Tensor) -> torch.Tensor:
        # the sparse product wants pixels as rows and all images' classes side by side
        rows = x.transpose(1, 2).reshape(b * h * w, c)
        return x - alpha * (graph @ rows).reshape(b, h * w, c).transpose(1, 2)

    return conjugate_gradient(system, y, iters=int(iters), tol=tol).reshape(b, c, h, w)


def _check_propagation(alpha: float, iters: int, tol: float) -> None:
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha: expected 0 <= alpha < 1 (I - alpha S must stay positive definite), got {alpha!r}")
    if isinstance(iters, bool) or int(iters) != iters or iters < 0:
        raise ValueError(f"iters: expected a non-negative integer, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol: expected >= 0, got {tol!r}")
