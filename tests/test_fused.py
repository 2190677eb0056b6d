"""The fused numba Sinkhorn computes the torch loop's iterates (dslo.refiners.fused)."""

import threading

import numpy as np
import pytest
import torch

from dslo.refiners import fused
from dslo.refiners.path import gibbs_kernel, sinkhorn_scalings
from dslo.refiners.sparse import topk_rows

from conftest import random_attention

numba = pytest.importorskip("numba", reason="numba not installed (the 'fast' extra)")


def _problem(b, c, n, seed):
    g = torch.Generator().manual_seed(seed)
    kernel = gibbs_kernel(-torch.log(random_attention(b, n, seed) + 1e-12), 0.5)
    src = torch.softmax(torch.randn(b, c, n, generator=g) * 2, -1)
    return kernel, src, torch.full((n,), 1.0 / n)


def _plans(u, v, kernel):
    return u.unsqueeze(-1) * kernel.unsqueeze(1) * v.unsqueeze(-2)


# N = 1, 5 and 67 leave rows outside the four-row groups; a zero-mass class must give a zero plan.
@pytest.mark.parametrize("n", [1, 5, 67, 128])
@pytest.mark.parametrize("rho,tol", [(None, 0.0), (0.1, 0.0), (0.1, 1e-6), (None, 1e-4)])
def test_fused_equals_torch_backend(n, rho, tol):
    kernel, src, tgt = _problem(2, 4, n, seed=n)
    src[1, 2] = 0.0
    args = dict(iters=45, rho=rho, eps=0.5, tol=tol, check_every=10)
    u_t, v_t, it_t = sinkhorn_scalings(kernel, src, tgt, backend="torch", **args)
    u_f, v_f, it_f = sinkhorn_scalings(kernel, src, tgt, backend="numba", **args)
    p_t, p_f = _plans(u_t, v_t, kernel), _plans(u_f, v_f, kernel)
    assert torch.isfinite(p_f).all()
    torch.testing.assert_close(p_f, p_t, atol=1e-6 * float(p_t.max()), rtol=0)
    assert float(p_f[1, 2].abs().max()) == 0.0
    # images stop independently in the fused loop; the torch loop stops on the worst image
    assert it_f <= it_t
    if tol == 0.0:
        assert it_f == it_t == 45


def test_fused_early_stop_reports_iterations():
    kernel, src, tgt = _problem(1, 3, 64, seed=1)
    _, _, ran = sinkhorn_scalings(kernel, src, tgt, iters=500, tol=1e-5, backend="numba")
    assert ran % 10 == 0 and 10 <= ran < 500


def test_auto_uses_fused_and_falls_back(monkeypatch):
    kernel, src, tgt = _problem(1, 3, 32, seed=2)
    calls = []
    original = fused.sweeps

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(fused, "sweeps", counting)
    sinkhorn_scalings(kernel, src, tgt, iters=5)  # dense, CPU, no autograd: fused
    assert calls
    calls.clear()
    sinkhorn_scalings(topk_rows(kernel, 8), src, tgt, iters=5)  # compressed: torch
    k_grad = kernel.clone().requires_grad_(True)
    u, _, _ = sinkhorn_scalings(k_grad, src, tgt, iters=5)  # autograd: torch keeps the graph
    assert u.requires_grad
    assert not calls


def test_backend_errors():
    kernel, src, tgt = _problem(1, 2, 16, seed=3)
    with pytest.raises(ValueError, match="backend must be"):
        sinkhorn_scalings(kernel, src, tgt, iters=3, backend="cuda")
    with pytest.raises(ValueError, match="dense kernel"):
        sinkhorn_scalings(topk_rows(kernel, 4), src, tgt, iters=3, backend="numba")
    with pytest.raises(ValueError, match=r"\(N, N\)"):
        fused.left_products(kernel[0, :, :8], src[0])
    with pytest.raises(ValueError, match="iters must be >= 1"):
        fused.sweeps(kernel[0], src[0], src[0], src[0], iters=0)


def test_concurrent_calls_from_threads():
    """numba's workqueue layer aborts on concurrent parallel launches; the lock serialises them."""
    kernel, src, tgt = _problem(1, 3, 96, seed=4)
    expected = sinkhorn_scalings(kernel, src, tgt, iters=20, backend="numba")[0]
    results, errors = [], []

    def work():
        try:
            results.append(sinkhorn_scalings(kernel, src, tgt, iters=20, backend="numba")[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4
    for r in results:
        np.testing.assert_array_equal(r.numpy(), expected.numpy())


@pytest.mark.parametrize("n", [3, 66])
def test_right_products_equal_matmul(n):
    g = torch.Generator().manual_seed(n)
    x, k = torch.rand(4, n, generator=g), torch.rand(n, n, generator=g)
    torch.testing.assert_close(fused.right_products(x, k), x @ k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.left_products(k, x), x @ k.T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"x \(C, N\)"):
        fused.right_products(x[:, :2], k)


def test_ipf_and_chain_fused_equal_torch(monkeypatch):
    """IPF (Sinkhorn with unit marginals) and the Markov chain take the fused path when they
    can; both must reproduce the torch products, batch broadcasting included."""
    from dslo.refiners.velocity import _ipf, ipf_scalings, markov_chain

    att = random_attention(2, 70, seed=5)
    att[1, 3] = 0.0  # an empty row: the clamp keeps IPF defined on both paths
    start = torch.softmax(torch.randn(2, 3, 70, generator=torch.Generator().manual_seed(0)), -1)
    calls = []
    sweeps, right = fused.sweeps, fused.right_products
    monkeypatch.setattr(fused, "sweeps", lambda *a, **k: calls.append("s") or sweeps(*a, **k))
    monkeypatch.setattr(fused, "right_products", lambda *a, **k: calls.append("r") or right(*a, **k))
    got_rc = ipf_scalings(att, 15)
    got_ds = _ipf(att, 15)
    got_chain = markov_chain(start, got_ds[:1], 6)  # (1, N, N) transition shared by both images
    assert "s" in calls and "r" in calls
    monkeypatch.setattr(fused, "eligible", lambda *t: False)
    calls.clear()
    ref_rc = ipf_scalings(att, 15)
    ref_ds = _ipf(att, 15)
    ref_chain = markov_chain(start, ref_ds[:1], 6)
    assert not calls
    for got, ref in zip(got_rc, ref_rc):
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(got_ds, ref_ds, rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(got_chain, ref_chain, rtol=2e-5, atol=1e-8)
    # the in-place scaling must not touch the caller's matrix
    assert float(att[1, 3].abs().max()) == 0.0


def test_ipf_keeps_autograd():
    from dslo.refiners.velocity import _ipf

    att = random_attention(1, 12, seed=6).requires_grad_(True)
    _ipf(att, 5).sum().backward()
    assert att.grad is not None and torch.isfinite(att.grad).all()


def _child_scalings(kernel, src, tgt, queue):
    # as DataLoader workers do: torch's own OpenMP pool does not survive fork either (a
    # multi-threaded product in the child hangs with this torch build, numba or not)
    torch.set_num_threads(1)
    try:
        u, v, _ = sinkhorn_scalings(kernel, src, tgt, iters=20)  # auto
        # numpy, not tensors: torch would share tensors through a socket that closes with the child
        queue.put(("ok", u.numpy(), v.numpy(), fused.available()))
    except Exception as exc:  # pragma: no cover - reported by the parent
        queue.put(("error", repr(exc), None, None))


def test_forked_child_falls_back_to_torch():
    """GNU OpenMP (numba's usual layer) is not fork-safe: a child forked after the parent ran
    the fused kernels must take the torch path instead of being terminated by numba."""
    import multiprocessing as mp

    kernel, src, tgt = _problem(1, 3, 40, seed=7)
    u, v, _ = sinkhorn_scalings(kernel, src, tgt, iters=20, backend="numba")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_scalings, args=(kernel, src, tgt, queue))
    child.start()
    status, cu, cv, child_available = queue.get(timeout=60)  # before join: a full pipe blocks the child
    child.join(60)
    assert child.exitcode == 0
    assert status == "ok", cu
    cu, cv = torch.from_numpy(cu), torch.from_numpy(cv)
    if numba.threading_layer() == "omp":
        assert child_available is False
    torch.testing.assert_close(_plans(cu, cv, kernel), _plans(u, v, kernel), rtol=1e-4, atol=1e-9)


def test_threads_follow_torch(monkeypatch):
    """numba uses as many threads as torch (a one-thread shard stays at one thread)."""
    kernel, src, tgt = _problem(1, 2, 32, seed=8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sinkhorn_scalings(kernel, src, tgt, iters=3, backend="numba")
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    sinkhorn_scalings(kernel, src, tgt, iters=3, backend="numba")
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)


def test_one_kernel_shared_by_a_batch():
    kernel, src, tgt = _problem(1, 3, 20, seed=9)
    src2 = torch.cat([src, src.flip(-1)])
    u_t, v_t, _ = sinkhorn_scalings(kernel, src2, tgt, iters=15, backend="torch")
    u_f, v_f, _ = sinkhorn_scalings(kernel, src2, tgt, iters=15, backend="numba")
    torch.testing.assert_close(_plans(u_f, v_f, kernel), _plans(u_t, v_t, kernel), rtol=1e-4, atol=1e-9)
