"""LPOSS and LPOSS+ against independent re-computations from their equations.

Graphs are rebuilt with plain loops, systems solved exactly with numpy.linalg.solve, and the
ten-step CG compared with SciPy's ``cg`` at the same iteration count and tolerance.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dslo.refiners.lposs import (
    conjugate_gradient,
    lposs,
    lposs_patch_graph,
    lposs_pixel_graph,
    lposs_pixel_weights,
    lposs_plus,
    rgb_to_lab,
)

scipy_linalg = pytest.importorskip("scipy.sparse.linalg")


def _patch_inputs(b=1, c=3, grid=(5, 6), d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    # features with some structure, so that the kNN graph is not uniform noise
    base = torch.randn(3, d, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 3, (b, h * w), generator=g)
    feats = base[pick] + 0.7 * torch.randn(b, h * w, d, generator=g, dtype=torch.float64)
    logits = 0.2 + 0.05 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    return logits, feats


def _loop_patch_graph(feats, grid, k, gamma, sigma, patch_size, power=1.0):
    """The LPOSS graph with loops: kNN (self included) of cosine similarity, clipped, raised to
    gamma, times exp(-sigma * centre distance^power); W = A + A^T; diagonal dropped;
    D^-1/2 W D^-1/2 with empty rows left at degree 1."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    n = f.shape[0]
    h, w = grid
    a = np.zeros((n, n))
    for i in range(n):
        sims = [float(f[i] @ f[j]) for j in range(n)]
        order = sorted(range(n), key=lambda j: -sims[j])[:k]
        for j in order:
            yi, xi, yj, xj = i // w, i % w, j // w, j % w
            dist = math.hypot((yi - yj) * patch_size, (xi - xj) * patch_size)
            a[i, j] = max(sims[j], 0.0) ** gamma * math.exp(-sigma * dist**power)
    wgt = a + a.T
    for i in range(n):
        wgt[i, i] = 0.0
    deg = wgt.sum(1)
    deg[deg == 0] = 1.0
    dm = 1 / np.sqrt(deg)
    return dm[:, None] * wgt * dm[None, :]


# ------------------------------------------------------------------------ patch graph (LPOSS)


@pytest.mark.parametrize("k, gamma, sigma, patch_size", [(7, 3.0, 0.01, 16.0), (30, 1.0, 0.2, 14.0), (1, 3.0, 0.01, 16.0)])
def test_patch_graph_matches_loops(k, gamma, sigma, patch_size):
    _, feats = _patch_inputs()
    got = lposs_patch_graph(feats, (5, 6), k=k, gamma=gamma, sigma=sigma, patch_size=patch_size)
    expected = _loop_patch_graph(feats[0].numpy(), (5, 6), k, gamma, sigma, patch_size)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-12)
    torch.testing.assert_close(got, got.transpose(1, 2), atol=1e-15, rtol=0)


def test_lposs_converges_to_the_exact_solution():
    logits, feats = _patch_inputs(c=4)
    alpha = 0.95
    z = lposs(logits, feats, k=10, alpha=alpha, iters=100, tol=0)
    s = _loop_patch_graph(feats[0].numpy(), (5, 6), 10, 3.0, 0.01, 16.0)
    y = logits[0].reshape(4, 30).numpy().T
    exact = np.linalg.solve(np.eye(30) - alpha * s, y)
    np.testing.assert_allclose(z[0].reshape(4, 30).numpy().T, exact, atol=1e-9)


def test_lposs_ten_steps_match_scipy_cg():
    logits, feats = _patch_inputs(c=3, grid=(6, 7), seed=1)
    z = lposs(logits, feats, k=12, iters=10)
    s = _loop_patch_graph(feats[0].numpy(), (6, 7), 12, 3.0, 0.01, 16.0)
    system = np.eye(42) - 0.95 * s
    for c in range(3):
        ref, _ = scipy_linalg.cg(system, logits[0, c].reshape(-1).numpy(), rtol=1e-6, maxiter=10)
        np.testing.assert_allclose(z[0, c].reshape(-1).numpy(), ref, atol=1e-10)


def test_lposs_float32_close_to_float64():
    logits, feats = _patch_inputs(c=3, seed=2)
    z64 = lposs(logits, feats, k=10)
    z32 = lposs(logits.float(), feats.float(), k=10)
    assert z32.dtype == torch.float32 and z64.dtype == torch.float64
    torch.testing.assert_close(z32.double(), z64, atol=1e-5, rtol=1e-5)


def test_lposs_batches_images_and_broadcasts_features():
    logits, feats = _patch_inputs(b=2, c=3, seed=3)
    both = lposs(logits, feats, k=9)
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], lposs(logits[i : i + 1], feats[i : i + 1], k=9))
    shared = lposs(logits, feats[:1], k=9)
    torch.testing.assert_close(shared[1:], lposs(logits[1:], feats[:1], k=9))


def test_geometric_term_is_in_pixels():
    # exp(-sigma * patch_size * grid distance): only the product matters (distance power 1)
    logits, feats = _patch_inputs(seed=4)
    a = lposs(logits, feats, k=12, sigma=0.02, patch_size=16.0)
    b = lposs(logits, feats, k=12, sigma=0.04, patch_size=8.0)
    torch.testing.assert_close(a, b)
    c = lposs(logits, feats, k=12, sigma=0.02, patch_size=(16.0, 16.0))
    torch.testing.assert_close(a, c)


def test_isolated_patches_keep_their_scores_without_nan():
    logits, feats = _patch_inputs(seed=5)
    # k = 1: every patch's only neighbour is itself, dropped with the diagonal
    torch.testing.assert_close(lposs(logits, feats, k=1), logits)
    # a zero feature vector has no positive similarity to anything
    feats = feats.clone()
    feats[0, 4] = 0
    z = lposs(logits, feats, k=8)
    assert torch.isfinite(z).all()


def test_zero_class_stays_zero_and_scale_does_not_change_argmax():
    logits, feats = _patch_inputs(c=3, seed=6)
    logits = logits.clone()
    logits[:, 1] = 0
    z = lposs(logits, feats, k=10)
    assert torch.isfinite(z).all() and bool((z[:, 1] == 0).all())
    z2 = lposs(100 * logits + 0.5, feats, k=10)
    assert torch.equal(z.argmax(1), z2.argmax(1))


def test_conjugate_gradient_stops_columns_like_scipy():
    g = torch.Generator().manual_seed(7)
    m = torch.randn(25, 25, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(25, dtype=torch.float64)
    rhs = torch.randn(1, 4, 25, generator=g, dtype=torch.float64)
    rhs[0, 2] = a @ torch.ones(25, dtype=torch.float64)  # a different convergence history
    got = conjugate_gradient(lambda x: x @ a, rhs, iters=40, tol=0.05)
    for c in range(4):
        ref, _ = scipy_linalg.cg(a.numpy(), rhs[0, c].numpy(), rtol=0.05, maxiter=40)
        np.testing.assert_allclose(got[0, c].numpy(), ref, atol=1e-10)


# ------------------------------------------------------------------------ Lab colour


def _colour_samples():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    # the corners of the cube and values at both thresholds
    special = torch.tensor([0.0, 1.0, 0.04045, 0.0405, 0.5, 0.002, 0.999], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(special, special, special, indexing="ij")).reshape(1, 3, 7, 49)
    return x, grid


def test_rgb_to_lab_matches_kornia():
    kornia = pytest.importorskip("kornia")
    for x in _colour_samples():
        torch.testing.assert_close(rgb_to_lab(x), kornia.color.rgb_to_lab(x), atol=1e-9, rtol=0)
        torch.testing.assert_close(rgb_to_lab(x.float()), kornia.color.rgb_to_lab(x.float()),
                                   atol=2e-4, rtol=0)


def test_rgb_to_lab_matches_skimage():
    color = pytest.importorskip("skimage.color")
    for x in _colour_samples():
        ref = color.rgb2lab(x.permute(0, 2, 3, 1).numpy())
        # skimage differs only in rounding of its white point and linear-segment constants
        np.testing.assert_allclose(rgb_to_lab(x).permute(0, 2, 3, 1).numpy(), ref, atol=0.02)


# ------------------------------------------------------------------------ pixel graph (LPOSS+)


def _loop_pixel_graph(image, window, tau):
    """Dense LPOSS+ graph with loops: all pixels of the window but the centre, weight
    exp(-|Lab_p - Lab_q| / tau) on Lab / (100, 128, 128); D^-1/2 W D^-1/2."""
    kornia = pytest.importorskip("kornia")
    lab = kornia.color.rgb_to_lab(image)[0].permute(1, 2, 0).numpy() / np.array([100.0, 128.0, 128.0])
    h, w, _ = lab.shape
    r = window // 2
    wgt = np.zeros((h * w, h * w))
    for y, x in itertools.product(range(h), range(w)):
        for dy, dx in itertools.product(range(-r, r + 1), range(-r, r + 1)):
            qy, qx = y + dy, x + dx
            if (dy, dx) == (0, 0) or not (0 <= qy < h and 0 <= qx < w):
                continue
            wgt[y * w + x, qy * w + qx] = math.exp(-np.linalg.norm(lab[y, x] - lab[qy, qx]) / tau)
    deg = wgt.sum(1)
    deg[deg == 0] = 1.0
    dm = 1 / np.sqrt(deg)
    return wgt, dm[:, None] * wgt * dm[None, :]


def _pixel_inputs(b=1, c=3, hw=(6, 7), seed=9):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    # two flat colour regions plus noise, so that the colour term matters
    image = torch.rand(b, 3, 1, 1, generator=g, dtype=torch.float64).expand(b, 3, h, w).clone()
    image[..., : h // 2, :] = torch.rand(b, 3, 1, 1, generator=g, dtype=torch.float64)
    image = (image + 0.02 * torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    scores = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    return scores, image


@pytest.mark.parametrize("window, tau", [(5, 0.01), (3, 0.5), (13, 0.1)])
def test_pixel_weights_and_graph_match_loops(window, tau):
    _, image = _pixel_inputs()
    wgt, s = _loop_pixel_graph(image, window, tau)
    r = window // 2
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    weights = lposs_pixel_weights(image, window=window, tau=tau)[0]
    h, w = image.shape[-2:]
    for i, (dy, dx) in enumerate(offsets):
        for y, x in itertools.product(range(h), range(w)):
            inside = 0 <= y + dy < h and 0 <= x + dx < w
            expected = wgt[y * w + x, (y + dy) * w + x + dx] if inside else 0.0
            assert abs(float(weights[i, y, x]) - expected) < 1e-12
    dense = lposs_pixel_graph(image, window=window, tau=tau).to_dense().numpy()
    np.testing.assert_allclose(dense, s, atol=1e-12)


def test_lposs_plus_converges_to_the_exact_solution():
    scores, image = _pixel_inputs(c=2)
    _, s = _loop_pixel_graph(image, 5, 0.05)
    z = lposs_plus(scores, image, window=5, tau=0.05, alpha=0.9, iters=200, tol=0)
    y = scores[0].reshape(2, 42).numpy().T
    exact = np.linalg.solve(np.eye(42) - 0.9 * s, y)
    np.testing.assert_allclose(z[0].reshape(2, 42).numpy().T, exact, atol=1e-9)


def test_lposs_plus_ten_steps_match_scipy_cg():
    scores, image = _pixel_inputs(c=3, hw=(7, 8), seed=10)
    _, s = _loop_pixel_graph(image, 13, 0.01)
    z = lposs_plus(scores, image)
    system = np.eye(56) - 0.95 * s
    for c in range(3):
        ref, _ = scipy_linalg.cg(system, scores[0, c].reshape(-1).numpy(), rtol=1e-6, maxiter=10)
        np.testing.assert_allclose(z[0, c].reshape(-1).numpy(), ref, atol=1e-10)


def test_lposs_plus_batches_images():
    scores, image = _pixel_inputs(b=2, c=3, hw=(9, 11), seed=11)
    both = lposs_plus(scores, image, window=5)
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], lposs_plus(scores[i : i + 1], image[i : i + 1], window=5))
    assert both.dtype == torch.float64
    assert lposs_plus(scores.float(), image.float(), window=5).dtype == torch.float32


def test_lposs_plus_window_of_one_is_identity():
    scores, image = _pixel_inputs(seed=12)
    torch.testing.assert_close(lposs_plus(scores, image, window=1), scores)


# ------------------------------------------------------------------------ validation


def test_lposs_rejects_bad_inputs():
    logits, feats = _patch_inputs(b=2)
    with pytest.raises(ValueError, match=r"features: expected \(2 or 1, N = h\*w = 5\*6 = 30"):
        lposs(logits, feats[:, :29])
    with pytest.raises(ValueError, match="features: expected"):
        lposs(logits, torch.cat([feats, feats[:1]]))
    bad = logits.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits: expected finite"):
        lposs(bad, feats)
    with pytest.raises(ValueError, match="features: expected 3 dimensions"):
        lposs(logits, feats[0])
    with pytest.raises(ValueError, match="alpha"):
        lposs(logits, feats, alpha=1.0)
    with pytest.raises(ValueError, match="k:"):
        lposs(logits, feats, k=0)
    with pytest.raises(ValueError, match="patch_size"):
        lposs(logits, feats, patch_size=0)


def test_lposs_plus_rejects_bad_inputs():
    scores, image = _pixel_inputs(b=2)
    with pytest.raises(ValueError, match=r"image: expected \(2, 3, 6, 7\)"):
        lposs_plus(scores, image[..., :5, :])
    with pytest.raises(ValueError, match="window"):
        lposs_plus(scores, image, window=4)
    with pytest.raises(ValueError, match="tau"):
        lposs_plus(scores, image, tau=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lposs_plus(scores, image * 255)
    with pytest.raises(ValueError, match="iters"):
        lposs_plus(scores, image, iters=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - no GPU on the CI machines
    logits, feats = _patch_inputs(c=3)
    torch.testing.assert_close(lposs(logits.cuda(), feats.cuda(), k=9).cpu(), lposs(logits, feats, k=9))
    scores, image = _pixel_inputs()
    torch.testing.assert_close(lposs_plus(scores.cuda(), image.cuda(), window=5).cpu(),
                               lposs_plus(scores, image, window=5))
