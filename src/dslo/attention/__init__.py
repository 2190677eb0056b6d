"""Attention providers: image (B, 3, H, W) in [0, 1] -> ``Attention`` (B, N, N) on a patch grid.

``build_attention(name, **options)`` builds a provider by name. Provider modules import their
heavy dependencies (transformers, onnx, ...) only when built, so importing ``dslo.attention``
costs torch alone.
"""

from __future__ import annotations

import importlib

from .base import Attention, AttentionProvider, check_image, resample_attention, resolve_device

__all__ = ["Attention", "AttentionProvider", "resample_attention", "check_image", "build_attention"]

#: provider name -> (module under dslo.attention, factory function in it)
_PROVIDERS: dict[str, tuple[str, str]] = {
    "dinov2": ("dinov2", "build_dinov2"),
    "affinity": ("affinity", "AffinityAttention"),
    "sd2": ("sd2", "build_sd2"),
    "clip": ("clip", "build_clip"),
}


def build_attention(name: str, device: object = None, **options) -> AttentionProvider:
    """Build an attention provider by name.

    Args:
        name: "dinov2" (``weights``, ``layers``, ``mode``, ``size``, ``local_files_only``; see
            ``dslo.attention.dinov2.build_dinov2``), "sd2" (``dslo.attention.sd2.build_sd2``),
            "clip" (``dslo.attention.clip.build_clip``), "affinity" (no model).
        device: optional "cpu"/"cuda[:N]"; checked to exist (``ValueError`` otherwise) and the
            provider's model moved there. Default: where the factory put it (CPU).
        **options: passed to the provider's factory. "affinity": ``patch_size``, ``grid``,
            ``sigma_colour2``, ``sigma_position2`` (no weights).

    Returns:
        provider: image (B, 3, H, W) float in [0, 1] -> ``Attention`` with matrix (B, N, N),
        N = h * w on the provider's patch grid (h, w).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    entry = _PROVIDERS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(
            f"build_attention: unknown attention provider {name!r}; known: {sorted(_PROVIDERS)}"
        )
    dev = resolve_device(device) if device is not None else None
    module_name, factory = entry
    module = importlib.import_module(f".{module_name}", __name__)
    provider = getattr(module, factory)(**options)
    if dev is not None and hasattr(provider, "to"):
        provider = provider.to(dev)
    return provider
