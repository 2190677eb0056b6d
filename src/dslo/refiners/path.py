"""Optimal-path solver: entropic optimal transport from each class distribution to the
degenerate (uniform) one, with the self-attention as cost (paper eq. 1-3, supplement 13-22).

``sinkhorn_plan`` is the reference (log domain, materialises the plan, for tests and small N).
The refiner uses ``sinkhorn_scalings``: one Gibbs kernel shared by every class of an image, never
a C x N x N tensor; one batched matmul per half-iteration (torch backend, any device) or one
fused pass over the kernel per iteration (numba backend, ``dslo.refiners.fused``, CPU).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import fused
from .products import row_matmul

__all__ = ["sinkhorn_plan", "gibbs_kernel", "sinkhorn_scalings", "relaxed_path_map",
           "joint_path_map", "paper_path_map"]


def sinkhorn_plan(
    cost: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    eps: float = 0.1,
    iters: int = 50,
) -> torch.Tensor:
    """Balanced entropic OT plans pi^c = diag(mu^c) K diag(nu^c), K = exp(-cost / eps).

    Log-domain updates (as ``ot.sinkhorn(..., method="sinkhorn_log")``), starting from
    v = 1 and updating u then v each iteration, so ``iters`` equals POT's ``numItermax`` with
    ``stopThr=0``: row sums match ``source`` exactly, column sums converge to ``target``.

    Args:
        cost: (N, N) finite.
        source: (C, N) non-negative, each row summing to 1.
        target: (N,) non-negative, summing to 1.
        eps: regularisation > 0.
        iters: Sinkhorn iterations.

    Returns:
        (C, N, N) plans in float64 (float32 inputs are promoted: this is the reference).
    """
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"sinkhorn_plan: cost expected (N, N), got {tuple(cost.shape)}")
    n = cost.shape[0]
    if source.ndim != 2 or source.shape[1] != n:
        raise ValueError(f"sinkhorn_plan: source expected (C, {n}), got {tuple(source.shape)}")
    if target.shape != (n,):
        raise ValueError(f"sinkhorn_plan: target expected ({n},), got {tuple(target.shape)}")
    if not eps > 0 or iters < 1:
        raise ValueError(f"sinkhorn_plan: expected eps > 0 and iters >= 1, got {eps}, {iters}")
    for name, t in (("cost", cost), ("source", source), ("target", target)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"sinkhorn_plan: {name} has non-finite entries")
    if bool((source < 0).any()) or bool((target < 0).any()):
        raise ValueError("sinkhorn_plan: marginals must be non-negative")
    dt = torch.float64
    log_k = (-cost.to(dt) / eps).unsqueeze(0)  # (1, N, N)
    log_a = torch.log(source.to(dt))
    log_b = torch.log(target.to(dt)).unsqueeze(0)
    log_v = torch.zeros_like(log_a)
    log_u = torch.zeros_like(log_a)
    for _ in range(iters):
        log_u = log_a - torch.logsumexp(log_k + log_v.unsqueeze(1), dim=2)
        log_v = log_b - torch.logsumexp(log_k + log_u.unsqueeze(2), dim=1)
    plan = torch.exp(log_u.unsqueeze(2) + log_k + log_v.unsqueeze(1))
    return torch.nan_to_num(plan, nan=0.0)


def gibbs_kernel(cost: torch.Tensor, eps: float) -> torch.Tensor:
    """exp(-cost / eps) with each row shifted by its minimum cost.

    A row scaling of K is absorbed by the source scaling u (balanced or not), so the plans are
    unchanged while every row keeps a largest entry of 1: nothing underflows to an all-zero
    row in float32, which is what breaks a plain float32 Sinkhorn at small eps.

    Args:
        cost: (B, N, N).
        eps: > 0.

    Returns:
        (B, N, N) float32 in (0, 1].
    """
    c = cost.float()
    return torch.exp(-(c - c.amin(-1, keepdim=True)) / eps)


def sinkhorn_scalings(
    kernel: "torch.Tensor | tuple[torch.Tensor, torch.Tensor]",
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    iters: int,
    rho: Optional[float] = None,
    eps: float = 1.0,
    tol: float = 0.0,
    check_every: int = 10,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sinkhorn scalings for many sources sharing one kernel per image.

    Source marginals are enforced exactly; the target is enforced exactly (``rho=None``) or
    penalised by rho * KL(column sums || target) (unbalanced OT, the update
    v = (target / K^T u)^(rho / (rho + eps))).

    Args:
        kernel: (B, N, N) positive Gibbs kernel (float32; bfloat16/float16 run the products in
            that precision, torch backend only), or a compressed one as (values, indices), each
            (B, N, k) (see ``dslo.refiners.sparse``).
        source: (B, C, N) non-negative; rows may sum to 0 (that class gets u = 0).
        target: (B, N) or (N,) positive.
        iters: maximum iterations.
        rho: None for balanced OT, else the KL penalty.
        eps: the regularisation that built ``kernel`` (only used with ``rho``).
        tol: stop when the source L1 error and the largest change of log v are both below it
            (checked every ``check_every`` iterations; 0 disables early stopping).
        backend: "torch" (two batched matrix products per iteration, any device), "numba"
            (``dslo.refiners.fused``: one fused pass over a dense CPU kernel per iteration,
            3-4x faster on a CPU; needs numba), or "auto" (numba when it is installed and the
            kernel is dense, on the CPU and not tracked by autograd; else torch).

    Returns:
        u, v: (B, C, N) scalings (plan^c = diag(u^c) K diag(v^c)); the number of iterations run
        (with the numba backend images stop independently; the largest count is returned).
    """
    tiny = torch.finfo(torch.float32).tiny
    a = source.float()
    b = target.float()
    if b.ndim == 1:
        b = b.expand(a.shape[0], -1)
    b = b.unsqueeze(1)  # (B, 1, N)
    power = 1.0 if rho is None else rho / (rho + eps)
    if _use_fused(kernel, source, backend):
        return _fused_scalings(kernel, a, b, iters=iters, power=power, tol=tol, check_every=check_every)
    k_times, kt_times = kernel_products(kernel)
    v = torch.ones_like(a)
    u = torch.zeros_like(a)
    done = 0
    for it in range(1, iters + 1):
        kv = k_times(v)  # (B, C, N): (K v)_i for every class at once
        u = a / kv.clamp_min(tiny)
        ktu = kt_times(u)  # (B, C, N): (K^T u)_j
        v_new = b / ktu.clamp_min(tiny)
        if power != 1.0:
            v_new = v_new.pow_(power)
        done = it
        if tol > 0 and it % check_every == 0:
            change = (v_new.clamp_min(tiny).log() - v.clamp_min(tiny).log()).abs().amax()
            src_err = ((u * k_times(v_new)) - a).abs().sum(-1).amax()
            v = v_new
            if float(change) < tol and float(src_err) < tol:
                break
        else:
            v = v_new
    u = a / k_times(v).clamp_min(tiny)
    return u, v, done


def _use_fused(kernel, source: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    if backend == "torch":
        return False
    dense_cpu = (isinstance(kernel, torch.Tensor) and kernel.device.type == "cpu"
                 and source.device.type == "cpu")
    low_precision = dense_cpu and kernel.dtype in (torch.bfloat16, torch.float16)
    if backend == "numba":
        if not dense_cpu:
            raise ValueError("backend='numba' needs a dense kernel and marginals on the CPU")
        if low_precision:
            raise ValueError(f"backend='numba' runs float32 kernels; got {kernel.dtype} (use backend='torch')")
        fused.require()
        return True
    if not dense_cpu or low_precision or not fused.available():
        return False
    # numba breaks the autograd graph: keep torch when someone differentiates through the plan
    return not (torch.is_grad_enabled() and (kernel.requires_grad or source.requires_grad))


def _fused_scalings(kernel, a, b, *, iters, power, tol, check_every):
    """``sinkhorn_scalings`` through the fused CPU sweeps, image by image (same iterates)."""
    tiny = torch.finfo(torch.float32).tiny
    bsz, c, n = a.shape
    us, vs, done = [], [], 0
    for i in range(bsz):
        # a (1, N, N) kernel is shared by every image, as broadcasting does in the torch loop
        k, src, tgt = kernel[min(i, kernel.shape[0] - 1)], a[i], b[i].expand(c, n)
        v = torch.ones(c, n)
        u = torch.zeros(c, n)
        ran = 0
        while c and ran < iters:
            # Sweep up to the next checkpoint; the last iteration before it runs alone so
            # that the change of log v can be measured exactly as the torch loop does.
            stop = min(iters, (ran // check_every + 1) * check_every) if tol > 0 else iters
            if stop - ran > 1 and tol > 0 and stop % check_every == 0:
                u, v = fused.sweeps(k, src, tgt, v, iters=stop - ran - 1, power=power)
                ran = stop - 1
            v_old = v
            u, v = fused.sweeps(k, src, tgt, v, iters=stop - ran, power=power)
            ran = stop
            if tol > 0 and ran % check_every == 0:
                change = (v.clamp_min(tiny).log() - v_old.clamp_min(tiny).log()).abs().amax()
                src_err = (u * fused.left_products(k, v) - src).abs().sum(-1).amax()
                if float(change) < tol and float(src_err) < tol:
                    break
        if c:
            u = src / fused.left_products(k, v).clamp_min(tiny)
        us.append(u)
        vs.append(v)
        done = max(done, ran)
    return torch.stack(us), torch.stack(vs), done


def kernel_products(kernel):
    """(x -> x K^T, x -> x K) for row vectors x (B, C, N), for a dense (B, N, N) kernel or a
    compressed (values, indices) one."""
    if isinstance(kernel, tuple):
        from .sparse import ell_left, ell_right

        vals, idx = kernel[0].float(), kernel[1]
        return (lambda x: ell_right(x, vals, idx)), (lambda x: ell_left(x, vals, idx))
    k = kernel if kernel.dtype in (torch.bfloat16, torch.float16) else kernel.float()
    kt = k.transpose(1, 2)
    return (lambda x: row_matmul(x, kt)), (lambda x: row_matmul(x, k))


def relaxed_path_map(
    probs: torch.Tensor,
    kernel: torch.Tensor,
    *,
    rho: float,
    eps: float,
    iters: int,
    tol: float,
) -> torch.Tensor:
    """Class mass the optimal path delivers to each patch (reading "relaxed").

    For each class c: f^c = P_c / M_c with M_c = sum_i P_ci, target 1/N penalised by
    rho * KL; map m^c_j = M_c * v_j * (K^T u)_j = M_c * (column sums of the plan). Scaling by
    the class mass keeps classes comparable at a patch, which per-class normalisation destroys.

    Args:
        probs: (B, C, N) per-patch class probabilities after NMS.
        kernel: (B, N, N) Gibbs kernel from ``gibbs_kernel``, or compressed (values, indices).

    Returns:
        (B, C, N) non-negative map.
    """
    n = probs.shape[-1]
    mass = probs.sum(-1, keepdim=True)
    f = probs / mass.clamp_min(torch.finfo(torch.float32).tiny)
    target = torch.full((n,), 1.0 / n, device=probs.device)
    u, v, _ = sinkhorn_scalings(kernel, f, target, iters=iters, rho=rho, eps=eps, tol=tol)
    return mass * v * kernel_products(kernel)[1](u)


def joint_path_map(probs: torch.Tensor, kernel: torch.Tensor, *, iters: int, tol: float) -> torch.Tensor:
    """Share of each class in the mass one balanced plan delivers (reading "joint").

    One plan per image from a = normalised sum_c P_c to the uniform target; the map is
    sum_i u_i K_ij P_ci / sum_i u_i K_ij.

    Args:
        probs: (B, C, N); kernel: (B, N, N).

    Returns:
        (B, C, N) in [0, 1].
    """
    n = probs.shape[-1]
    total = probs.sum(1, keepdim=True)  # (B, 1, N)
    a = total / total.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    target = torch.full((n,), 1.0 / n, device=probs.device)
    u, _, _ = sinkhorn_scalings(kernel, a, target, iters=iters, tol=tol)
    times_k = kernel_products(kernel)[1]
    arriving = times_k(u * probs)  # (B, C, N)
    return arriving / times_k(u).clamp_min(torch.finfo(torch.float32).tiny)


def paper_path_map(probs_over_patches: torch.Tensor, cost: torch.Tensor, *, eps: float, iters: int) -> torch.Tensor:
    """The literal reading of eq. 3: p^c_i = Norm(sum_j pi^c_ij C_ij).

    f^c is a distribution over patches, the cost is the attention itself, the plan balanced
    (50 iterations, eps 0.1); Norm divides each class map by its maximum. Measured to fall
    below the raw logits: kept as ``path_reading="paper"`` for the record.

    Args:
        probs_over_patches: (B, C, N), each class summing to 1 over N (or 0).
        cost: (B, N, N).

    Returns:
        (B, C, N) in [0, 1].
    """
    n = cost.shape[-1]
    c = cost.float()
    k = gibbs_kernel(c, eps)
    target = torch.full((n,), 1.0 / n, device=cost.device)
    u, v, _ = sinkhorn_scalings(k, probs_over_patches, target, iters=iters)
    # sum_j u_i K_ij C_ij v_j for every class with one matmul: ((K * C) v)_i
    row_cost = u * (v @ (k * c).transpose(1, 2))
    return row_cost / row_cost.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
