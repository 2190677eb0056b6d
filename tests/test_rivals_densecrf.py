"""DenseCRF rival: against exact dense mean-field from the equations, the package called
directly, and properties."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dslo.refiners.densecrf import dense_crf


@pytest.fixture
def dcrf():
    return pytest.importorskip("pydensecrf.densecrf", reason="needs pydensecrf2 (pip install 'dslo[crf]')")


def exact_mean_field(probs, img8, iters, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    """Mean-field for a Potts dense CRF with exact (N x N) Gaussian kernels, float64.

    Kernels are normalised symmetrically, D^-1/2 K D^-1/2 with D = diag(K 1), as the
    package does by default; probs (C, H, W), img8 (H, W, 3) uint8.
    """
    c, h, w = probs.shape
    yy, xx = np.mgrid[0:h, 0:w]
    pos = np.stack([xx.ravel(), yy.ravel()], 1).astype(float)
    rgb = img8.reshape(-1, 3).astype(float)

    def gauss(f):
        return np.exp(-((f[:, None] - f[None]) ** 2).sum(-1) / 2)

    kernels = [(gauss(pos / pos_sxy), pos_compat),
               (gauss(np.concatenate([pos / bi_sxy, rgb / bi_srgb], 1)), bi_compat)]
    unary = -np.log(np.clip(probs.reshape(c, -1), 1e-5, 1))

    def softmax(a):
        e = np.exp(a - a.max(0))
        return e / e.sum(0)

    q = softmax(-unary)
    for _ in range(iters):
        energy = -unary.copy()
        for k, weight in kernels:
            n = 1 / np.sqrt(k.sum(1))
            energy += weight * n * ((n * q) @ k.T)  # Potts: agreeing neighbours lower the energy
        q = softmax(energy)
    return q.reshape(c, h, w)


def _problem(b=1, c=3, h=10, w=12, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((b, h, w, 3))
    img[:, :, w // 2:] = 200
    img8 = (img + rng.integers(0, 30, img.shape)).clip(0, 255).astype(np.uint8)
    logits = rng.normal(size=(b, c, h, w))
    logits[:, 0, :, : w // 2] += 1.0
    logits[:, 1, :, w // 2:] += 1.0
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), 1)
    image = torch.tensor(img8).permute(0, 3, 1, 2).float() / 255
    return probs, image, img8


def test_matches_exact_mean_field(dcrf):
    # non-square on purpose: a swapped (W, H) would misplace every pixel
    probs, image, img8 = _problem(h=10, w=12)
    got = dense_crf(probs, image, iters=5)[0].double().numpy()
    want = exact_mean_field(probs[0].double().numpy(), img8[0], 5, 3, 3, 80, 13, 10)
    # the permutohedral lattice approximates the Gaussian filter; with these widths the
    # approximation is ~2e-4 here (narrow widths like sxy=1, srgb=3 are far coarser)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_matches_package_called_directly(dcrf):
    probs, image, img8 = _problem(c=4, h=9, w=13, seed=1)
    crf = dcrf.DenseCRF2D(13, 9, 4)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs[0].numpy(), 1e-5, 1)).reshape(4, -1)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(img8[0]), compat=10)
    want = np.array(crf.inference(10)).reshape(4, 9, 13)
    got = dense_crf(probs, image)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_no_pairwise_or_no_iterations_returns_the_input(dcrf):
    probs, image, _ = _problem(seed=2)
    probs = probs.clone()
    probs[0, 2, 0, 0] = 0.0  # clipped to 1e-5 inside
    want = probs.clamp(1e-5, 1)
    want = want / want.sum(1, keepdim=True)
    torch.testing.assert_close(dense_crf(probs, image, iters=0), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(dense_crf(probs, image, iters=5, pos_compat=0, bi_compat=0),
                               want, atol=1e-6, rtol=0)


def test_marginals_shape_dtype_device(dcrf):
    probs, image, _ = _problem(b=2, c=3, seed=3)
    out = dense_crf(probs.double(), image, iters=3)
    assert out.shape == probs.shape and out.dtype == torch.float32 and out.device == probs.device
    assert float(out.min()) >= 0 and torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(2, 10, 12), atol=1e-5, rtol=0)
    for k in range(2):  # the batch is independent images
        torch.testing.assert_close(out[k:k + 1], dense_crf(probs[k:k + 1], image[k:k + 1], iters=3))


def test_small_probs_are_upsampled(dcrf):
    probs, image, _ = _problem(h=12, w=12, seed=4)
    out = dense_crf(probs[..., ::2, ::2], image, iters=1)
    assert out.shape == (1, 3, 12, 12)


def test_cleans_noise_along_image_regions(dcrf):
    rng = np.random.default_rng(5)
    h, w = 24, 24
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2:] = 1
    img8 = np.where(truth[..., None] == 1, 190, 40) + rng.integers(0, 10, (h, w, 3))
    image = torch.tensor(img8, dtype=torch.float32).permute(2, 0, 1)[None] / 255
    logits = 1.5 * np.eye(2)[truth].transpose(2, 0, 1) + rng.normal(size=(2, h, w))
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), 0)[None]
    before = float((probs.argmax(1)[0].numpy() == truth).mean())
    after = float((dense_crf(probs, image).argmax(1)[0].numpy() == truth).mean())
    assert before < 0.95 and after > 0.99


@pytest.mark.parametrize(
    "probs, image, kwargs, match",
    [
        (torch.rand(3, 8, 8), torch.rand(1, 3, 8, 8), {}, r"probs: expected 4 dimensions"),
        (torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8), {}, r"same batch size"),
        (torch.rand(1, 3, 8, 8) - 0.5, torch.rand(1, 3, 8, 8), {}, r"non-negative"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8), {}, r"3 channels"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), {"iters": -2}, r"iters"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), {"bi_srgb": 0}, r"bi_srgb"),
    ],
)
def test_bad_inputs_raise(probs, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(probs, image, **kwargs)


def test_missing_package_names_the_extra(monkeypatch):
    # a None entry makes `import pydensecrf.densecrf` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match=r"dslo\[crf\]"):
        dense_crf(torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4))
