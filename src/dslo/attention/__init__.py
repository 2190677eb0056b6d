"""Attention providers: image (B, 3, H, W) in [0, 1] -> ``Attention`` (B, N, N) on a patch grid.

``build_attention(name, **options)`` builds a provider by name. Provider modules import their
heavy dependencies (transformers, onnx, ...) only when built, so importing ``dslo.attention``
costs torch alone.
"""

from __future__ import annotations

import importlib

from .base import Attention, AttentionProvider, check_image, resample_attention

__all__ = ["Attention", "AttentionProvider", "resample_attention", "check_image", "build_attention"]

#: provider name -> (module under dslo.attention, factory function in it)
_PROVIDERS: dict[str, tuple[str, str]] = {
    "dinov2": ("dinov2", "build_dinov2"),
}


def build_attention(name: str, **options) -> AttentionProvider:
    """Build an attention provider by name.

    Args:
        name: "dinov2" (options: ``weights``, ``layers``, ``mode``, ``size``,
            ``local_files_only``; see ``dslo.attention.dinov2.build_dinov2``).
        **options: passed to the provider's factory.

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
    module_name, factory = entry
    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, factory)(**options)
