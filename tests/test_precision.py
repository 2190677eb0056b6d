"""Half-precision kernels (RefinerConfig.kernel_dtype, dslo.refiners.products)."""

import pytest
import torch

from dslo import DiscrepancyRefiner, RefinerConfig
from dslo.refiners import fused
from dslo.refiners.path import gibbs_kernel, sinkhorn_scalings
from dslo.refiners.products import row_matmul

from conftest import blob_problem, random_attention


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_row_matmul_half_kernels(dtype, tol):
    g = torch.Generator().manual_seed(0)
    k = torch.rand(2, 64, 64, generator=g)
    x = torch.rand(2, 3, 64, generator=g)
    x[0, 0] *= 1e30  # Sinkhorn scalings span far beyond float16's range
    x[1, 2] = 0.0
    got = row_matmul(x, k.to(dtype))
    ref = x @ k
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=tol, atol=0)
    assert float(got[1, 2].abs().max()) == 0.0
    # float32 and float64 kernels are a plain matmul, dtype preserved
    assert torch.equal(row_matmul(x, k), ref)
    assert row_matmul(x.double(), k.double()).dtype == torch.float64


def test_half_kernel_sinkhorn_close_to_float32():
    kernel = gibbs_kernel(-torch.log(random_attention(1, 48, seed=2) + 1e-12), 0.5)
    src = torch.softmax(torch.randn(1, 4, 48, generator=torch.Generator().manual_seed(1)), -1)
    tgt = torch.full((48,), 1.0 / 48)
    u, v, _ = sinkhorn_scalings(kernel, src, tgt, iters=40, rho=0.1, eps=0.5, backend="torch")
    ref = u.unsqueeze(-1) * kernel.unsqueeze(1) * v.unsqueeze(-2)
    for dtype in (torch.bfloat16, torch.float16):
        uh, vh, _ = sinkhorn_scalings(kernel.to(dtype), src, tgt, iters=40, rho=0.1, eps=0.5)  # auto -> torch
        plan = uh.unsqueeze(-1) * kernel.unsqueeze(1) * vh.unsqueeze(-2)
        assert torch.isfinite(plan).all()
        # L1 distance between plans of mass ~1
        assert float((plan - ref).abs().sum((-1, -2)).max()) < 0.05
    if fused.available():
        with pytest.raises(ValueError, match="float32 kernels"):
            sinkhorn_scalings(kernel.half(), src, tgt, iters=3, backend="numba")


@pytest.mark.parametrize("solver", ["path", "velocity", "propagate"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_refiner_half_kernel_agrees(solver, dtype):
    logits, att, image, _ = blob_problem(b=2)
    ref = DiscrepancyRefiner(solver=solver)(logits, att, image)
    out = DiscrepancyRefiner(solver=solver, kernel_dtype=dtype)(logits, att, image)
    assert out.scores.dtype == torch.float32
    assert float((out.labels == ref.labels).float().mean()) > 0.99


def test_kernel_dtype_validation():
    with pytest.raises(ValueError, match="kernel_dtype: expected one of"):
        RefinerConfig(kernel_dtype="int8")
    with pytest.raises(ValueError, match="dense only"):
        RefinerConfig(kernel_dtype="bfloat16", kernel_topk=8)
