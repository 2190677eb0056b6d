"""Small helpers shared by the weight loaders of ``attention/`` and ``adapters/`` (kept out of
both folders so neither imports the other)."""

from __future__ import annotations

import os
import re

__all__ = ["hub_offline", "looks_like_path", "pair", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_WEIGHT_SUFFIXES = (".onnx", ".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / DIFFUSERS_OFFLINE is set.

    Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import, so a user who
    sets it later would otherwise still wait for network retries.
    """
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    )


def looks_like_path(text: str) -> bool:
    """A weights string that names a file or folder rather than a hub id ("org/name")."""
    return (
        text.startswith(("/", "./", "../", "~", "\\", "."))
        or text.count("/") > 1
        or "\\" in text
        or bool(re.match(r"[A-Za-z]:[\\/]", text))
        or text.endswith(_WEIGHT_SUFFIXES)
    )


def pair(value) -> tuple[int, int]:
    """int or (a, b) -> (a, b)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)
