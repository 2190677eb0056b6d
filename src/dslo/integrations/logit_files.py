"""Patch logits saved from any model, one file each: ``read_logits`` (``dslo refine --logits``)
and ``parse_logits`` (the bytes of such a file, for ``--logits saved:DIR``, which hashes what it
reads). No typer here: the Python side of the benchmark reads these files too.

A file is ``.npy`` (an array) or ``.pt``/``.pth`` (a tensor, or a dict with ``"logits"`` and
optionally ``"kind"``, one of ``dslo.refiners.records.LOGIT_KINDS``), shaped (C, h, w) or
(B, C, h, w).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["read_logits", "parse_logits"]


def read_logits(path: Union[str, Path]) -> torch.Tensor:
    """.pt (a tensor, or a dict with key "logits") or .npy, shaped (C, h, w) or (B, C, h, w)
    -> float tensor (B, C, h, w).

    Raises:
        ValueError: missing file, another suffix, not a tensor file, or another number of
            dimensions, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"logits file not found: {path}")
    _check_suffix(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read logits {path}: {exc.strerror or type(exc).__name__}") from None
    return parse_logits(data, path)[0]


def parse_logits(data: bytes, path: Union[str, Path]) -> tuple[torch.Tensor, Optional[str]]:
    """The contents of a logits file -> (float tensor (B, C, h, w), the stored kind or None).

    ``path`` names the file in errors and its suffix picks the format. The kind is returned as
    stored (None for .npy and bare tensors); callers check it against ``LOGIT_KINDS``.
    """
    import numpy as np

    path = Path(path)
    _check_suffix(path)
    kind = None
    try:
        if path.suffix == ".npy":
            tensor = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        else:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if isinstance(tensor, dict):
                kind = tensor.get("kind")
                tensor = tensor.get("logits")
    except (OSError, RuntimeError, EOFError, ValueError, pickle_error()) as exc:
        raise ValueError(f"cannot read logits {path}: not a tensor file ({type(exc).__name__})") from None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"logits file {path}: expected a tensor (or a dict with 'logits'), got {type(tensor).__name__}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4:
        raise ValueError(f"logits file {path}: expected (C, h, w) or (B, C, h, w), got shape {tuple(tensor.shape)}")
    return tensor.float(), kind


def _check_suffix(path: Path) -> None:
    if path.suffix not in (".npy", ".pt", ".pth"):
        raise ValueError(f"logits file {path}: expected .pt or .npy, got {path.suffix!r}")


def pickle_error():
    import pickle

    return pickle.UnpicklingError
