"""Attention providers: image -> ``Attention`` (row-stochastic N x N on a patch grid)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..refiners.grid import resample_attention
from ..refiners.records import Attention, check_image, check_tensor  # noqa: F401  (re-exported)

__all__ = ["Attention", "AttentionProvider", "resample_attention", "check_image", "resolve_device"]


@runtime_checkable
class AttentionProvider(Protocol):
    """Anything that maps an image batch to an ``Attention``.

    ``provider(image)``: image (B, 3, H, W) float in [0, 1] -> Attention with matrix (B, N, N).
    """

    def __call__(self, image: torch.Tensor) -> Attention: ...


def resolve_device(device: object) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a torch.device -> torch.device, checking
    that it exists here.

    Raises:
        ValueError: for an unknown name, or an accelerator torch cannot use on this machine
            (rather than an error from deep inside the first kernel launch).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here (torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available here")
    return dev
