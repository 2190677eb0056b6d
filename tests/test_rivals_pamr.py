"""PAMR rival: against a per-pixel loop written from the equations, plus properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dslo.refiners.pamr import pamr, pamr_affinity

MEAN = np.array([122.771, 116.746, 104.094])
STD = np.array([68.501, 66.632, 70.323])


def loop_pamr(scores: np.ndarray, image: np.ndarray, iters: int, dilations) -> np.ndarray:
    """The oracle: one pixel and one neighbour at a time, float64.

    scores (C, H, W), image (3, H, W) in [0, 1]; borders clamp to the nearest pixel.
    """
    c, h, w = scores.shape
    x = (image * 255 - MEAN[:, None, None]) / STD[:, None, None]

    def at(a, i, j):
        return a[:, min(max(i, 0), h - 1), min(max(j, 0), w - 1)]

    stencil = [(dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d)]
    offsets = [o for o in stencil if o != (0, 0)]
    weights = np.zeros((h, w, len(offsets)))
    for i in range(h):
        for j in range(w):
            samples = np.stack([at(x, i + dy, j + dx) for dy, dx in stencil])  # (9*nd, 3)
            sigma = samples.std(axis=0, ddof=1)
            a = np.array([-np.mean(np.abs(x[:, i, j] - at(x, i + dy, j + dx)) / (1e-8 + 0.1 * sigma))
                          for dy, dx in offsets])
            e = np.exp(a - a.max())
            weights[i, j] = e / e.sum()
    m = scores.astype(np.float64)
    for _ in range(iters):
        new = np.zeros_like(m)
        for i in range(h):
            for j in range(w):
                for p, (dy, dx) in enumerate(offsets):
                    new[:, i, j] += weights[i, j, p] * at(m, i + dy, j + dx)
        m = new
    return m


def _inputs(b=1, c=2, h=12, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = 0.2 + 0.05 * torch.randn(b, c, h, w, generator=g)
    # a blocky image with texture: flat patches (zero local std) and edges both occur
    image = torch.rand(b, 3, 3, 3, generator=g).repeat_interleave(4, -2).repeat_interleave(4, -1)
    image = image[..., :h, :w].clone()
    image[..., ::3, ::2] = torch.rand(b, 3, len(range(0, h, 3)), len(range(0, w, 2)), generator=g)
    return scores, image


@pytest.mark.parametrize("dilations", [(1,), (1, 2), (2, 5)])
def test_pamr_matches_pixel_loop(dilations):
    scores, image = _inputs()
    got = pamr(scores, image, iters=3, dilations=dilations)
    want = loop_pamr(scores[0].double().numpy(), image[0].double().numpy(), 3, dilations)
    np.testing.assert_allclose(got[0].double().numpy(), want, atol=2e-6, rtol=0)


def test_pamr_batch_is_per_image():
    scores, image = _inputs(b=2, c=3, h=10, w=9, seed=1)
    both = pamr(scores, image, iters=4, dilations=(1, 3))
    for k in range(2):
        one = pamr(scores[k:k + 1], image[k:k + 1], iters=4, dilations=(1, 3))
        torch.testing.assert_close(both[k:k + 1], one, atol=1e-7, rtol=0)


def test_constant_image_is_plain_local_average():
    scores, _ = _inputs(c=3, seed=2)
    image = torch.full((1, 3, 12, 12), 0.4)
    weights = pamr_affinity(image, (1, 2))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 16))
    got = pamr(scores, image, iters=1, dilations=(1, 2))
    s = np.pad(scores[0].numpy(), ((0, 0), (2, 2), (2, 2)), mode="edge")
    want = np.zeros((3, 12, 12))
    for d in (1, 2):
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    want += s[:, 2 + dy:14 + dy, 2 + dx:14 + dx] / 16
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-6)


def test_uniform_scores_stay_uniform():
    _, image = _inputs(b=1, c=4, seed=3)
    scores = torch.tensor([0.1, 0.25, -0.3, 0.5]).view(1, 4, 1, 1).expand(1, 4, 12, 12).contiguous()
    out = pamr(scores, image, iters=10, dilations=(1, 2))
    # float32 rounding of 10 x 16 weighted sums; unnormalised weights would miss by far more
    torch.testing.assert_close(out, scores, atol=1e-5, rtol=0)


def test_edges_stop_diffusion():
    # class 0 holds the left half; the image has a step edge at the same place
    h, w = 16, 16
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    scores = torch.stack([left, 1 - left])[None]
    edge = left.expand(1, 3, h, w).clone() * 0.8 + 0.1
    flat = torch.full((1, 3, h, w), 0.5)
    kept = pamr(scores, edge, iters=10, dilations=(1, 2))
    blurred = pamr(scores, flat, iters=10, dilations=(1, 2))
    leak_edge = float((kept[0, 0] - left).abs().max())
    leak_flat = float((blurred[0, 0] - left).abs().max())
    assert leak_edge < 1e-3 < 0.2 < leak_flat


def test_output_shape_dtype_device_and_range():
    scores, image = _inputs(b=2, c=3, seed=4)
    out = pamr(scores.double(), image, iters=2, dilations=(1, 2))
    assert out.shape == scores.shape and out.dtype == torch.float64 and out.device == scores.device
    assert float(out.min()) >= float(scores.min()) - 1e-6
    assert float(out.max()) <= float(scores.max()) + 1e-6
    half = pamr(scores.half(), image.half(), iters=1, dilations=(1,))
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_small_scores_are_upsampled_to_the_image():
    scores, image = _inputs(c=2, h=12, w=12, seed=5)
    small = scores[..., ::3, ::3].contiguous()
    out = pamr(small, image, iters=0)
    ref = torch.nn.functional.interpolate(small, size=(12, 12), mode="bilinear", align_corners=False)
    assert out.shape == (1, 2, 12, 12)
    torch.testing.assert_close(out, ref)


def test_dilation_larger_than_image_and_no_nan():
    # flat image (zero local std everywhere but one pixel), 1/255 steps, dilations past the border
    image = torch.full((1, 3, 5, 7), 0.5)
    image[0, :, 2, 3] += 1 / 255
    scores = torch.randn(1, 4, 5, 7)
    out = pamr(scores, image)  # default dilations (8, 16) > H, W
    assert torch.isfinite(out).all()
    assert out.shape == (1, 4, 5, 7)


def test_iters_zero_is_identity():
    scores, image = _inputs(seed=6)
    torch.testing.assert_close(pamr(scores, image, iters=0), scores, atol=0, rtol=0)


@pytest.mark.parametrize(
    "scores, image, kwargs, match",
    [
        (torch.zeros(2, 12, 12), torch.rand(1, 3, 12, 12), {}, r"scores: expected 4 dimensions"),
        (torch.zeros(1, 2, 12, 12), torch.rand(1, 4, 12, 12), {}, r"image: expected 3 channels"),
        (torch.zeros(1, 2, 12, 12), torch.rand(2, 3, 12, 12), {}, r"same batch size"),
        (torch.zeros(1, 2, 12, 12), 255 * torch.rand(1, 3, 12, 12), {}, r"\[0, 1\]"),
        (torch.zeros(1, 2, 12, 12, dtype=torch.long), torch.rand(1, 3, 12, 12), {}, r"floating"),
        (torch.full((1, 2, 12, 12), float("nan")), torch.rand(1, 3, 12, 12), {}, r"finite"),
        (torch.zeros(1, 0, 12, 12), torch.rand(1, 3, 12, 12), {}, r"C, H, W >= 1"),
        (torch.zeros(1, 2, 12, 12), torch.rand(1, 3, 12, 12), {"iters": -1}, r"iters"),
        (torch.zeros(1, 2, 12, 12), torch.rand(1, 3, 12, 12), {"dilations": ()}, r"dilations"),
        (torch.zeros(1, 2, 12, 12), torch.rand(1, 3, 12, 12), {"dilations": (0, 2)}, r"dilations"),
        (torch.zeros(1, 2, 12, 12), torch.rand(1, 3, 12, 12), {"dilations": (1.5,)}, r"dilations"),
    ],
)
def test_bad_inputs_raise(scores, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pamr(scores, image, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    scores, image = _inputs(b=2, c=3, seed=7)
    cpu = pamr(scores, image, iters=3, dilations=(1, 2))
    gpu = pamr(scores.cuda(), image.cuda(), iters=3, dilations=(1, 2))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
