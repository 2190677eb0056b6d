"""DiscrepancyRefiner: early rejection -> NMS -> normalise -> solve -> upsample -> argmax."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import RefinerConfig
from .grid import resample_attention
from .jbu import joint_bilateral_upsample
from .kl import kl_uniform_map
from .logit_forms import AUTO_CONFIDENCE, auto_temperature, kind_scale, log_domain_logits
from .path import joint_path_map, paper_path_map, relaxed_path_map
from .products import KERNEL_DTYPES, row_matmul
from .records import Attention, RefinerOutput, check_image, check_tensor
from .rivals import RIVALS, rival_scores
from .selection import class_probabilities, early_rejection, nms_mask
from .sparse import ell_ipf, ell_left, topk_rows
from .velocity import _ipf, arrival_velocity, markov_chain, paper_velocity

__all__ = ["DiscrepancyRefiner", "discrepancy_map"]

_TINY = torch.finfo(torch.float32).tiny


def _over_patches(scaled: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Paper's Norm.(NMS(f)) read as a softmax over patches per class, rejected patches at -inf.

    scaled (B, C, N), keep (B, N) bool -> (B, C, N), each class summing to 1 over N.
    """
    masked = scaled.masked_fill(~keep.unsqueeze(1), float("-inf"))
    return torch.softmax(masked, dim=-1)


def _per_patch(maps: torch.Tensor) -> torch.Tensor:
    """Divide each patch's scores by their sum over classes (for fusing maps of other scales)."""
    return maps / maps.sum(1, keepdim=True).clamp_min(_TINY)


def discrepancy_map(
    scaled: torch.Tensor,
    probs: torch.Tensor,
    keep: torch.Tensor,
    attention: torch.Tensor,
    config: RefinerConfig,
) -> torch.Tensor:
    """The solver step on the patch grid, for the classes given.

    Args:
        scaled: (B, K, N) scaled logits of the classes to solve for.
        probs: (B, K, N) per-patch class probabilities (softmax over active classes).
        keep: (B, N) bool NMS mask.
        attention: (B, N, N) row-stochastic (float32).
        config: the refiner configuration.

    Returns:
        (B, K, N) non-negative map, higher = more likely; comparable across classes at a patch.
    """
    solver = config.solver
    nmsd = probs * keep.unsqueeze(1).to(probs.dtype) if config.nms else probs
    if solver == "none":
        return probs
    if solver == "kl":
        return kl_uniform_map(_over_patches(scaled, keep if config.nms else torch.ones_like(keep)))
    if solver == "fusion":
        path = discrepancy_map(scaled, probs, keep, attention, config.replace(solver="path"))
        vel = discrepancy_map(scaled, probs, keep, attention, config.replace(solver="velocity"))
        return 0.5 * (_per_patch(path) + _per_patch(vel))

    if config.kernel_topk is not None and solver in ("path", "velocity", "propagate"):
        return _compressed_map(nmsd, attention, config)

    if solver == "path" and config.path_reading == "paper":
        f = _over_patches(scaled, keep if config.nms else torch.ones_like(keep))
        return paper_path_map(f, attention, eps=config.path_eps, iters=config.path_iters)

    if solver in ("propagate", "velocity"):
        literal = solver == "velocity" and config.velocity_reading == "paper"
        base = attention.square() if (config.sharpen and not literal) else attention
        chain = _ipf(base, config.ipf_iters)
        if not literal:
            chain = chain.to(KERNEL_DTYPES[config.kernel_dtype])
        if solver == "propagate":
            return row_matmul(nmsd, chain)
        if config.velocity_reading == "paper":
            f = _over_patches(scaled, keep if config.nms else torch.ones_like(keep))
            return paper_velocity(markov_chain(f, chain, config.velocity_steps), config.velocity_tau)
        return arrival_velocity(markov_chain(nmsd, chain, config.velocity_steps), config.velocity_tau,
                                config.velocity_ties)
    # path, "relaxed" / "joint": cost C = -log T on the doubly stochastic attention T = IPF(A);
    # exp(-(C - min_j C)/eps) = (T / max_j T)^(1/eps): eps = 0.5 squares T, which is the
    # sharpening, so ``sharpen`` does not apply here
    kernel = _power_kernel(_ipf(attention, config.ipf_iters), config.path_eps)
    kernel = kernel.to(KERNEL_DTYPES[config.kernel_dtype])
    if config.path_reading == "joint":
        return joint_path_map(nmsd, kernel, iters=config.path_iters, tol=config.path_tol)
    return relaxed_path_map(nmsd, kernel, rho=config.path_rho, eps=config.path_eps,
                            iters=config.path_iters, tol=config.path_tol)


def _compressed_map(nmsd: torch.Tensor, attention: torch.Tensor, config: RefinerConfig) -> torch.Tensor:
    """The working readings on a top-k sparse kernel (``kernel_topk``).

    IPF runs dense (30 mat-vec products), then the *sharpened* kernel is truncated: truncating
    the raw attention before IPF lost 10-25 mIoU on voc14 (its rows are diffuse, ~700 of 1369
    patches carry their mass), truncating after sharpening keeps most of it (results/
    performance.md). The chain gets 3 sparse IPF rounds to be stochastic again on its pattern.
    """
    k = config.kernel_topk
    if config.solver == "path":
        kernel = _power_kernel(_ipf(attention, config.ipf_iters), config.path_eps)
        return relaxed_path_map(nmsd, topk_rows(kernel, k), rho=config.path_rho, eps=config.path_eps,
                                iters=config.path_iters, tol=config.path_tol)
    base = attention.square() if config.sharpen else attention
    vals, idx = topk_rows(_ipf(base, config.ipf_iters), k)
    vals = ell_ipf(vals, idx, 3)
    if config.solver == "propagate":
        return ell_left(nmsd, vals, idx)
    states = [nmsd]
    for _ in range(config.velocity_steps):
        states.append(ell_left(states[-1], vals, idx))
    return arrival_velocity(torch.stack(states), config.velocity_tau, config.velocity_ties)


def _power_kernel(t: torch.Tensor, eps: float) -> torch.Tensor:
    """gibbs_kernel(-log(T + 1e-12), eps) without the log and exp passes: (T' / max_j T')^(1/eps)."""
    t = t + 1e-12
    t = t / t.amax(-1, keepdim=True)
    return t.square_() if eps == 0.5 else t.pow_(1.0 / eps)


class DiscrepancyRefiner(nn.Module):
    """Training-free refinement of OVSS patch logits with a self-attention matrix.

    ``DiscrepancyRefiner(solver="velocity")`` or ``DiscrepancyRefiner(config)``; any
    ``RefinerConfig`` field can be given by keyword.

    Call: ``refiner(logits, attention, image, kind=None) -> RefinerOutput``
        logits: (B, C, h, w) any float dtype (computed in float32): cosine similarities, a
            classifier's raw scores, log-probabilities or probabilities.
        kind: what ``logits`` are ("cosine", "scores", "log_probs", "probs"); None or "auto":
            ``RefinerConfig.logits`` (default "auto": told apart from the values).
        attention: ``Attention`` (matrix (B or 1, N', N') on any grid, resampled to (h, w)) or
            a tensor (B or 1, N, N) with N = h * w (rows are renormalised).
        image: (B, 3, H, W) float in [0, 1]; the output has its size.
    """

    def __init__(self, config: Union[RefinerConfig, None] = None, **options) -> None:
        super().__init__()
        base = config if config is not None else RefinerConfig()
        if not isinstance(base, RefinerConfig):
            raise ValueError(f"DiscrepancyRefiner: expected a RefinerConfig, got {type(base).__name__}")
        self.config = base.replace(**options) if options else base

    def extra_repr(self) -> str:
        c = self.config
        return f"solver={c.solver!r}, path_reading={c.path_reading!r}, velocity_reading={c.velocity_reading!r}"

    def _attention(self, attention: Union[Attention, torch.Tensor], b: int, grid: tuple[int, int]) -> torch.Tensor:
        if isinstance(attention, torch.Tensor):
            check_tensor(attention, "attention", 3, dims="(B, N, N)")
            n = grid[0] * grid[1]
            if attention.shape[1:] != (n, n):
                raise ValueError(
                    f"attention: expected (B, N, N) with N = h*w = {n} for logits grid {grid}, got "
                    f"{tuple(attention.shape)}; pass a dslo.Attention with its own grid to resample"
                )
            attention = Attention.from_scores(attention, grid)
        elif not isinstance(attention, Attention):
            raise ValueError(f"attention: expected dslo.Attention or a (B, N, N) tensor, got {type(attention).__name__}")
        if attention.batch not in (1, b):
            raise ValueError(f"attention: batch size {attention.batch} does not match logits batch {b} (expected {b} or 1)")
        n = grid[0] * grid[1]
        limit = self.config.max_matrix_bytes
        if limit is not None and self.config.solver not in ("none", "kl", "pamr", "densecrf") and 4 * n * n * 4 > limit:
            raise ValueError(
                f"attention: N = {n} patches needs ~{4 * n * n * 4 / 2**30:.1f} GiB of N x N work "
                f"buffers per image, above max_matrix_bytes = {limit / 2**30:.1f} GiB; use a coarser "
                "logits grid or raise RefinerConfig.max_matrix_bytes"
            )
        att = resample_attention(attention, grid)
        if self.config.solver in RIVALS:
            return att
        m = att.matrix.float()
        return m.expand(b, -1, -1) if m.shape[0] != b else m

    def forward(self, logits: torch.Tensor, attention: Union[Attention, torch.Tensor], image: torch.Tensor,
                kind: Optional[str] = None) -> RefinerOutput:
        cfg = self.config
        check_tensor(logits, "logits", 4, dims="(B, C, h, w)")
        b, c, h, w = logits.shape
        if b == 0 or c == 0:
            raise ValueError(f"logits: expected B >= 1 images and C >= 1 classes, got shape {tuple(logits.shape)}")
        check_image(image)
        if image.shape[0] != b:
            raise ValueError(f"image: expected ({b}, 3, H, W) to match logits, got {tuple(image.shape)}")
        out_size = tuple(image.shape[-2:])
        device = logits.device
        # the call's kind (what an adapter says it hands over) wins over the configured one
        auto = cfg.logit_scale == "auto"
        z, used = log_domain_logits(logits, cfg.logits if kind in (None, "auto") else kind,
                                    None if auto else cfg.logit_scale)
        if cfg.solver in RIVALS:
            scale = kind_scale(used) if cfg.logit_scale in (None, "auto") else cfg.logit_scale
            return self._rival(z / scale, scale, attention, image)
        if auto and cfg.solver != "none":
            z = z * auto_temperature(z, AUTO_CONFIDENCE, cfg.temperature_share).view(b, 1, 1, 1)
        att = self._attention(attention, b, (h, w)).to(device) if cfg.solver not in ("none", "kl") else None

        scaled = z.flatten(2)  # (B, C, N)
        active = early_rejection(scaled) if cfg.early_rejection else torch.ones(b, c, dtype=torch.bool, device=device)
        keep = (nms_mask(scaled, cfg.nms_threshold, cfg.nms_floor, cfg.nms_share) if cfg.nms
                else torch.ones(b, h * w, dtype=torch.bool, device=device))
        # solve only for classes active in some image of the batch: early rejection is what
        # makes 150- or 171-class vocabularies cheap
        cols = active.any(0).nonzero().squeeze(1)
        sub_scaled = scaled[:, cols]
        sub_active = active[:, cols]
        probs = class_probabilities(sub_scaled, sub_active)
        maps = discrepancy_map(sub_scaled, probs, keep, att, cfg) if att is not None or cfg.solver in ("none", "kl") else None
        maps = maps * sub_active.unsqueeze(-1).to(maps.dtype)
        if cfg.map_power != 1.0 and cfg.solver not in ("none",):
            # per-patch contrast of the map before JBU averages neighbours (tried against the
            # erosion of thin classes; it did not remove it: docs/solvers.md)
            maps = maps / maps.amax(1, keepdim=True).clamp_min(_TINY)
            maps = maps.pow(cfg.map_power)
        if cfg.protect is not None and cfg.solver not in ("none",):
            # where the model is sure, its own belief stands; the solver decides elsewhere
            sure = (probs.amax(1) >= cfg.protect).unsqueeze(1)
            maps = torch.where(sure, probs, _per_patch(maps))
        maps = maps.reshape(b, -1, h, w)
        if cfg.upsample == "jbu":
            up = joint_bilateral_upsample(maps, image.to(device), cfg.jbu_sigma_spatial2,
                                          cfg.jbu_sigma_range2, cfg.jbu_radius)
        else:
            up = F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)
        up = up.masked_fill(~sub_active.view(b, -1, 1, 1), float("-inf"))
        scores = torch.full((b, c) + out_size, float("-inf"), device=device)
        scores[:, cols] = up
        # max(1) gives the first maximal index like argmax(1), in one pass; argmax over a
        # non-last dim took 27 ms at 5 x 512 x 512 here, a third of the refiner (max: 2.7 ms)
        best, winner = up.max(1)
        if not bool(torch.isfinite(best).all()):
            raise ValueError("DiscrepancyRefiner: non-finite scores at some pixel (a solver diverged)")
        labels = cols[winner]
        stages = {}
        if cfg.return_stages:
            full = torch.zeros(b, c, h * w, device=device)
            full[:, cols] = probs
            stages = {"probabilities": full.view(b, c, h, w), "nms": keep.view(b, h, w),
                      "map": torch.zeros(b, c, h, w, device=device).index_copy_(1, cols, maps)}
        return RefinerOutput(labels=labels, scores=scores, active=active, stages=stages)

    def _rival(self, x: torch.Tensor, scale: float, attention, image: torch.Tensor) -> RefinerOutput:
        """A rival post-processor (``rivals.py``) on logits x (B, C, h, w) as its public code
        takes them (cosines stay cosines; other kinds in the log domain) with softmax(scale * x)
        the class probabilities; every class stays active."""
        b, c, h, w = x.shape
        needs_features = self.config.solver in ("lposs", "lposs+")
        att = self._attention(attention, b, (h, w)) if needs_features else None
        scores = rival_scores(x, att, image.to(x.device), self.config.replace(logit_scale=scale))
        best, labels = scores.max(1)
        if not bool(torch.isfinite(best).all()):
            raise ValueError(f"DiscrepancyRefiner({self.config.solver!r}): non-finite scores at some pixel")
        active = torch.ones(b, c, dtype=torch.bool, device=x.device)
        stages = {}
        if self.config.return_stages:
            # the rival's own output stands in for the discrepancy map (at image resolution)
            stages = {"probabilities": torch.softmax(x * scale, dim=1), "map": scores}
        return RefinerOutput(labels=labels, scores=scores, active=active, stages=stages)
