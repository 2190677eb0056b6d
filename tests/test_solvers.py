import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dslo.refiners import fused
from dslo.refiners.path import gibbs_kernel, relaxed_path_map, sinkhorn_plan, sinkhorn_scalings
from dslo.refiners.velocity import (arrival_velocity, doubly_stochastic, markov_chain,
                                    paper_velocity)

from conftest import random_attention

ot = pytest.importorskip("ot")


def _problem(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, n, generator=g, dtype=torch.float64)
    src = torch.rand(c, n, generator=g, dtype=torch.float64) + 0.05
    src = src / src.sum(1, keepdim=True)
    tgt = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return cost, src, tgt


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps,iters", [(0.1, 50), (0.5, 20), (0.05, 200)])
def test_sinkhorn_plan_matches_pot(seed, eps, iters):
    cost, src, tgt = _problem(24, 3, seed)
    plans = sinkhorn_plan(cost, src, tgt, eps=eps, iters=iters)
    for c in range(3):
        ref = ot.sinkhorn(src[c].numpy(), tgt.numpy(), cost.numpy(), eps, method="sinkhorn_log",
                          numItermax=iters, stopThr=0.0)
        np.testing.assert_allclose(plans[c].numpy(), ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(plans[c].sum(1).numpy(), src[c].numpy(), atol=1e-12)


def test_sinkhorn_plan_marginals_when_converged():
    cost, src, tgt = _problem(30, 4, 7)
    plans = sinkhorn_plan(cost, src, tgt, eps=0.5, iters=500)
    torch.testing.assert_close(plans.sum(2), src, atol=1e-9, rtol=0)
    torch.testing.assert_close(plans.sum(1), tgt.expand(4, -1), atol=1e-6, rtol=0)


BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    not fused.available(), reason="numba not installed (the 'fast' extra)"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_kernel_scalings_equal_reference_plan(backend):
    """The refiner's float32 batched scalings give the same plans as the float64 reference."""
    cost, src, tgt = _problem(40, 5, 3)
    eps = 0.2
    k = gibbs_kernel(cost.float().unsqueeze(0), eps)
    u, v, _ = sinkhorn_scalings(k, src.float().unsqueeze(0), tgt.float(), iters=60, backend=backend)
    fast = u[0].unsqueeze(2) * k[0].unsqueeze(0) * v[0].unsqueeze(1)
    ref = sinkhorn_plan(cost, src, tgt, eps=eps, iters=60)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbalanced_scalings_match_pot(backend):
    cost, src, tgt = _problem(30, 1, 5)
    eps, rho = 0.5, 0.1
    k = gibbs_kernel(cost.float().unsqueeze(0), eps)
    u, v, _ = sinkhorn_scalings(k, src.float().unsqueeze(0), tgt.float(), iters=2000, rho=rho, eps=eps,
                                backend=backend)
    plan = (u[0, 0, :, None] * k[0] * v[0, 0, None, :]).double().numpy()
    # POT's semi-relaxed problem: source exact (reg_m = inf), target KL penalty rho
    ref = ot.unbalanced.sinkhorn_unbalanced(src[0].numpy(), tgt.numpy(), cost.numpy(), eps,
                                            reg_m=(float("inf"), rho), numItermax=2000, stopThr=1e-12)
    np.testing.assert_allclose(plan, ref, atol=1e-5)
    np.testing.assert_allclose(plan.sum(1), src[0].numpy(), atol=1e-5)


def test_sinkhorn_plan_rejects_bad_input():
    cost, src, tgt = _problem(5, 2, 0)
    with pytest.raises(ValueError, match="cost expected"):
        sinkhorn_plan(cost[:3], src, tgt)
    with pytest.raises(ValueError, match="non-finite"):
        sinkhorn_plan(cost * float("nan"), src, tgt)
    with pytest.raises(ValueError, match="source expected"):
        sinkhorn_plan(cost, src[:, :3], tgt)


@pytest.mark.parametrize("n", [16, 100])
def test_ipf_doubly_stochastic(n):
    a = random_attention(2, n, sharp=1.0)
    t = doubly_stochastic(a, 15)
    torch.testing.assert_close(t.sum(-1), torch.ones(2, n), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.sum(-2), torch.ones(2, n), atol=1e-5, rtol=0)
    assert bool((t > 0).all())


def test_ipf_rejects_negative():
    with pytest.raises(ValueError, match="non-negative"):
        doubly_stochastic(-torch.ones(3, 3))


def test_relaxed_map_has_class_mass():
    a = doubly_stochastic(random_attention(1, 36, sharp=2.0))
    k = gibbs_kernel(-torch.log(a + 1e-12), 0.5)
    probs = torch.softmax(torch.randn(1, 3, 36) * 3, 1)
    m = relaxed_path_map(probs, k, rho=0.1, eps=0.5, iters=200, tol=1e-7)
    # plan rows sum to f^c, so the delivered mass of class c totals M_c
    torch.testing.assert_close(m.sum(-1), probs.sum(-1), rtol=1e-4, atol=1e-4)
    assert bool((m >= 0).all())


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 30), c=st.integers(1, 6), steps=st.integers(1, 12),
       tau=st.floats(0.01, 0.9), seed=st.integers(0, 2**16))
def test_velocity_in_unit_interval(n, c, steps, tau, seed):
    g = torch.Generator().manual_seed(seed)
    t = doubly_stochastic(torch.rand(1, n, n, generator=g) + 1e-3)
    probs = torch.softmax(torch.randn(1, c, n, generator=g) * 4, 1)
    probs = probs * (torch.rand(1, 1, n, generator=g) > 0.3)  # NMS-like zeros
    states = markov_chain(probs, t, steps)
    for v in (arrival_velocity(states, tau), paper_velocity(states, tau)):
        assert bool(torch.isfinite(v).all())
        assert bool((v > 0).all()) and bool((v <= 1).all())


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 25), c=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_velocity_equivariant_to_class_permutation(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    t = doubly_stochastic(torch.rand(1, n, n, generator=g) + 1e-3)
    probs = torch.softmax(torch.randn(1, c, n, generator=g) * 4, 1)
    perm = torch.randperm(c, generator=g)
    v = arrival_velocity(markov_chain(probs, t, 8), 0.1)
    vp = arrival_velocity(markov_chain(probs[:, perm], t, 8), 0.1)
    torch.testing.assert_close(vp, v[:, perm], atol=1e-6, rtol=0)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(3, 25), c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_relaxed_path_equivariant_and_finite(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    t = doubly_stochastic(torch.rand(1, n, n, generator=g) + 1e-3)
    k = gibbs_kernel(-torch.log(t + 1e-12), 0.5)
    probs = torch.softmax(torch.randn(1, c, n, generator=g) * 4, 1)
    perm = torch.randperm(c, generator=g)
    m = relaxed_path_map(probs, k, rho=0.1, eps=0.5, iters=50, tol=0)
    mp = relaxed_path_map(probs[:, perm], k, rho=0.1, eps=0.5, iters=50, tol=0)
    assert bool(torch.isfinite(m).all()) and bool((m >= 0).all())
    torch.testing.assert_close(mp, m[:, perm], atol=1e-5, rtol=1e-4)


def test_arrival_time_interpolates():
    # one patch whose probability goes 0 -> 0.05 -> 0.15: reaches 0.1 at t = 1.5
    states = torch.tensor([0.0, 0.05, 0.15]).view(3, 1, 1, 1)
    v = arrival_velocity(states, 0.1)
    assert abs(float(v) - 1 / 2.5) < 1e-3
    # a patch already above tau at l = 0 moves fastest
    assert float(arrival_velocity(torch.tensor([0.5, 0.5]).view(2, 1, 1, 1), 0.1)) > 0.99


def test_compressed_kernel_products_and_ipf():
    from dslo.refiners.sparse import ell_dense, ell_ipf, ell_left, ell_right, topk_rows

    a = random_attention(2, 40, seed=5)
    vals, idx = topk_rows(a, 8)
    dense = ell_dense(vals, idx, 40)
    assert bool((torch.diagonal(dense, dim1=1, dim2=2) > 0).all())  # the diagonal is always kept
    assert int((dense > 0).sum(-1).max()) == 8
    x = torch.rand(2, 3, 40)
    torch.testing.assert_close(ell_left(x, vals, idx), x @ dense)
    torch.testing.assert_close(ell_right(x, vals, idx), x @ dense.transpose(1, 2))
    t = ell_dense(ell_ipf(vals, idx, 15), idx, 40)
    ref = doubly_stochastic(dense, 15) * (dense > 0)
    torch.testing.assert_close(t, ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("solver", ["path", "velocity", "propagate", "fusion"])
def test_full_topk_equals_dense(solver):
    import dslo
    from conftest import blob_problem

    logits, att, image, _ = blob_problem(seed=2)
    dense = dslo.DiscrepancyRefiner(solver=solver, return_stages=True)(logits, att, image)
    full = dslo.DiscrepancyRefiner(solver=solver, kernel_topk=120, return_stages=True)(logits, att, image)
    torch.testing.assert_close(full.stages["map"], dense.stages["map"], atol=1e-5, rtol=1e-4)
    assert torch.equal(full.labels, dense.labels)
