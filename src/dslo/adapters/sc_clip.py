"""SC-CLIP (Bai et al., "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation"),
re-implemented from the paper and the public code (``SuleBai/SC-CLIP``: ``clip/model.py``,
``VisionTransformer.forward`` / ``custom_attn`` / ``lof_pytorch`` / ``mean_interpolation``;
``scclip_segmentor.py``; ``configs/``).

With X^l the output of block l (0-based, CLS first), L blocks, p the patch tokens:

1. Anomaly tokens. On the patch tokens of X^{L-2} (the input of the last block), local
   outlier factor with k = 30 neighbours on squared Euclidean distances; the 5 % largest
   scores (``> quantile(LOF, 0.95)``) are anomalies. Each anomaly is replaced by the mean of
   its non-anomalous 3 x 3 neighbours on the patch grid (kept if it has none).
2. Self-adjusting. S_mid = cos(X^{a}_p) with a = ``pre_adjust_idx`` (8), anomalies resolved the
   same way; S_b = S_mid with entries < beta (0.4) set to 0; Agg(Z, S) = (S / (S 1 + 1e-6)) Z.
   Z = Agg(resolved X^{L-2}_p, S_b).
   Last block, patches only, no residual, no MLP:
       A = (softmax(M) + softmax(k k^T / sqrt(d))) / 2,  M = 3 (S_mid - mean S_mid), M < 0 -> -inf
       Y = out_proj(A v) + r * X^{L-2}_cls                  (k, v from ln_1(Z); r = res_cls = 0.3)
   S_a = cos(X^{b}_p) with b = ``post_adjust_idx`` (3), entries < beta set to 0;  Y = Agg(Y, S_a).
3. Multi-level fusion. R = sum_{l = s}^{e - 1} X^l (s, e = 3, 10), the same attention step on
   ln_1(R_p) with the residual class token r R_cls, then Agg(., S_a); Y = Y + that.
4. f = ln_post(Y) @ proj; logits = cos(f_p, t_q) on CLIP's patch grid.

Defaults follow the public configs: short side 336, sliding windows 224 / 112.
Differences to the public code: LOF distances use ||a||^2 + ||b||^2 - 2ab (the public code
materialises all pairwise differences); the anomaly (row, col) uses the true grid width (the
public code divides the flat index by the grid height, the same only for square crops); the
means in M are per image (the public code runs one image at a time).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.records import Attention
from .base import check_image, cosine_logits
from .clip import CLIPDenseBase
from .vocab import BENCHMARKS

__all__ = ["SCCLIPAdapter", "local_outlier_factor", "lof_outliers", "resolve_anomalies", "aggregate"]

_SIZES = {"cityscapes": 560}


def local_outlier_factor(x: torch.Tensor, k: int) -> torch.Tensor:
    """LOF scores as SC-CLIP computes them: (B, N, D) -> (B, N).

    Squared Euclidean distances; reach(p, o) = max(d(p, o), k-dist(p)) with p's own k-distance
    (the public code's variant); lrd(p) = k / mean_o reach(p, o); LOF(p) = mean_o lrd(o) / lrd(p)
    over p's k nearest neighbours o (self excluded).
    """
    x = x.float()
    sq = x.pow(2).sum(-1)
    d = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * x @ x.transpose(-1, -2)).clamp_min(0)
    d.diagonal(dim1=-2, dim2=-1).zero_()
    dist, idx = torch.topk(d, k + 1, dim=-1, largest=False)
    dist, idx = dist[..., 1:], idx[..., 1:]
    reach = torch.maximum(dist, dist[..., -1:])
    lrd = k / reach.mean(-1).clamp_min(1e-12)
    neighbours = torch.gather(lrd.unsqueeze(1).expand(-1, idx.shape[1], -1), 2, idx)
    return (neighbours / lrd.unsqueeze(-1)).mean(-1)


def lof_outliers(x: torch.Tensor, k: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """(B, N, D) -> (B, N) bool: LOF above the (1 - contamination) quantile of each image."""
    k = max(1, min(int(k), x.shape[1] - 1))
    scores = local_outlier_factor(x, k)
    threshold = torch.quantile(scores, 1 - contamination, dim=-1, keepdim=True)
    return scores > threshold


def resolve_anomalies(tokens: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Replace anomalous patch tokens by the mean of their normal 3 x 3 neighbours.

    tokens (B, N, D) in row-major grid order, outliers (B, N) bool -> (B, N, D). An anomaly
    without a normal neighbour keeps its value.
    """
    b, n, d = tokens.shape
    h, w = grid
    fmap = tokens.transpose(1, 2).reshape(b, d, h, w)
    keep = (~outliers).to(fmap.dtype).view(b, 1, h, w)
    kernel = torch.ones(1, 1, 3, 3, dtype=fmap.dtype, device=fmap.device)
    kernel[..., 1, 1] = 0
    total = F.conv2d((fmap * keep).reshape(b * d, 1, h, w), kernel, padding=1).view(b, d, h, w)
    count = F.conv2d(keep, kernel, padding=1)
    mean = total / count.clamp_min(1)
    update = outliers.view(b, 1, h, w) & (count > 0)
    out = torch.where(update, mean, fmap)
    return out.reshape(b, d, n).transpose(1, 2)


def aggregate(tokens: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
    """Row-normalised affinity aggregation: (S / (S 1 + 1e-6)) Z; corr (B, N, N), tokens (B, N, D)."""
    weights = corr / (corr.sum(-1, keepdim=True) + 1e-6)
    return weights.to(tokens.dtype) @ tokens


class SCCLIPAdapter(CLIPDenseBase):
    """SC-CLIP patch logits on an open_clip ViT (see the module docstring for the equations).

    Args:
        model, pretrained: as ``CLIPAdapter`` (default ViT-B-16, openai).
        pre_adjust_idx, post_adjust_idx: block outputs (0-based) whose patch similarities build
            the attention prior and the pre-/post-aggregation (8 and 3 for ViT-B/16).
        multi_start_idx, multi_end_idx: the block outputs summed for multi-level fusion,
            ``range(multi_start_idx, multi_end_idx)`` (3..9).
        res_cls: weight of the class-token residual (0.3).
        beta: affinity threshold of the aggregation (0.4).
        attn_scale: the factor on the centred similarity prior (3.0).
        lof_neighbors, lof_contamination: anomaly detection (30, 0.05).
        preset: a benchmark name; sets ``size`` to the public config's short side (336;
            560 for cityscapes) unless ``size`` is given.
        size, slide: input short side and sliding windows (336 and (224, 112), as published).

    Also ``adapter.attention(image) -> Attention``: the head-averaged self-adjusting attention
    A of the last block (main branch) on the whole resized image, CLIP's patch grid.
    """

    method = "sc-clip"

    def __init__(self, model: Union[str, nn.Module] = "ViT-B-16", pretrained: Optional[str] = "openai", *,
                 pre_adjust_idx: int = 8, post_adjust_idx: int = 3, multi_start_idx: int = 3,
                 multi_end_idx: int = 10, res_cls: float = 0.3, beta: float = 0.4,
                 attn_scale: float = 3.0, lof_neighbors: int = 30, lof_contamination: float = 0.05,
                 preset: Optional[str] = None, **options) -> None:
        if preset is not None and preset not in BENCHMARKS:
            raise ValueError(f"preset: expected a benchmark name {sorted(BENCHMARKS)}, got {preset!r}")
        if "size" not in options:
            options["size"] = _SIZES.get(preset or "", 336)
        options.setdefault("slide", (224, 112))
        super().__init__(model, pretrained, **options)
        depth = len(self.vit.blocks)
        stored = depth - 1  # outputs of blocks 0 .. L-2 are available
        for name, value in (("pre_adjust_idx", pre_adjust_idx), ("post_adjust_idx", post_adjust_idx)):
            if not 0 <= value < stored:
                raise ValueError(f"{name}: expected a block index in [0, {stored - 1}] for a {depth}-block ViT, got {value}")
        if not 0 <= multi_start_idx < multi_end_idx <= stored:
            raise ValueError(
                f"multi_start_idx, multi_end_idx: expected 0 <= start < end <= {stored} for a {depth}-block "
                f"ViT, got ({multi_start_idx}, {multi_end_idx})"
            )
        if not 0 < lof_contamination < 1:
            raise ValueError(f"lof_contamination: expected a value in (0, 1), got {lof_contamination}")
        self.pre_adjust_idx, self.post_adjust_idx = int(pre_adjust_idx), int(post_adjust_idx)
        self.multi_start_idx, self.multi_end_idx = int(multi_start_idx), int(multi_end_idx)
        self.res_cls, self.beta, self.attn_scale = float(res_cls), float(beta), float(attn_scale)
        self.lof_neighbors, self.lof_contamination = int(lof_neighbors), float(lof_contamination)

    def _attention(self, y: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-adjusting attention of the last block on layer-normed patch tokens y (B, N, D).

        Returns (A (B, heads, N, N), v (B, heads, N, d)).
        """
        last = len(self.vit.blocks) - 1
        _, k, v = self.vit.qkv(last, y)
        scale = k.shape[-1] ** -0.5
        m = (prior - prior.mean(dim=(-1, -2), keepdim=True)) * self.attn_scale
        m = m.masked_fill(m < 0, float("-inf"))
        a = torch.softmax(m.float(), dim=-1).unsqueeze(1) + torch.softmax((k @ k.transpose(-1, -2)).float() * scale, dim=-1)
        return a / 2, v

    def _branch(self, tokens: torch.Tensor, cls: torch.Tensor, prior: torch.Tensor):
        last = len(self.vit.blocks) - 1
        y = self.vit.blocks[last].ln_1(tokens)
        a, v = self._attention(y, prior)
        out = self.vit.out_proj(last, a.to(v.dtype) @ v) + self.res_cls * cls
        return out, a

    def _forward_tokens(self, image01: torch.Tensor):
        vit = self.vit
        x, grid = vit.embed(self.clip_pixels(image01))
        outs = vit.run(x, len(vit.blocks) - 1)
        penult = outs[-1]
        cls, patches = penult[:, :1], penult[:, 1:]
        outliers = lof_outliers(patches, self.lof_neighbors, self.lof_contamination)
        patches = resolve_anomalies(patches, outliers, grid)
        pre = F.normalize(resolve_anomalies(outs[self.pre_adjust_idx][:, 1:], outliers, grid).float(), dim=-1)
        prior = pre @ pre.transpose(-1, -2)
        z = aggregate(patches, prior.masked_fill(prior < self.beta, 0))
        y, attn = self._branch(z, cls, prior)
        post = F.normalize(outs[self.post_adjust_idx][:, 1:].float(), dim=-1)
        after = post @ post.transpose(-1, -2)
        after = after.masked_fill(after < self.beta, 0)
        y = aggregate(y, after)
        fused = torch.stack(outs[self.multi_start_idx:self.multi_end_idx]).sum(0)
        extra, _ = self._branch(fused[:, 1:], fused[:, :1], prior)
        y = y + aggregate(extra, after)
        return vit.head(y), grid, attn

    def dense_features(self, image01: torch.Tensor) -> torch.Tensor:
        f, grid, _ = self._forward_tokens(image01)
        return f.reshape(f.shape[0], grid[0], grid[1], -1)

    def _window_logits(self, image01, text, context):
        return cosine_logits(self.dense_features(image01), text.features)

    @torch.no_grad()
    def attention(self, image: torch.Tensor) -> Attention:
        """Head-averaged self-adjusting attention of the last block, on the whole resized image."""
        x = self.resize(check_image(image))
        _, grid, attn = self._forward_tokens(x)
        return Attention.from_scores(attn.float().mean(1), grid, source="sc-clip last-block attention")
