"""The adapter protocol, the text-feature record and the input geometry shared by adapters.

An adapter maps an image batch and a vocabulary to ``PatchLogits``: raw cosine similarities
on the model's own patch grid, before any upsampling, one channel per text query (synonyms
are separate queries tied to their class by ``query_to_class``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F

from ..refiners.records import Attention, PatchLogits, check_tensor

__all__ = [
    "Attention",
    "PatchLogits",
    "TextFeatures",
    "OVSSAdapter",
    "check_image",
    "input_size",
    "resize_image",
    "slide_windows",
    "cosine_logits",
]


def check_image(image: object, name: str = "image") -> torch.Tensor:
    """Check an image batch (B, 3, H, W), floating, finite, values in [0, 1]."""
    x = check_tensor(image, name, 4, dims="(B, 3, H, W) in [0, 1]")
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 channels (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{name}: expected values in [0, 1], got [{lo:.3g}, {hi:.3g}] (divide 0..255 images "
            "by 255; adapters normalise with the model's own mean/std)"
        )
    return x


@dataclass(frozen=True)
class TextFeatures:
    """Text embeddings of a vocabulary, one row per query (class name or synonym).

    Attributes:
        features: (Q, D) float, each row L2-normalised (prompt-ensembled: the mean of the
            normalised embeddings of every template, normalised again).
        query_to_class: (Q,) int64 in [0, C): the class of each query.
        class_names: C tuples of names; ``class_names[c]`` lists the queries of class c in
            order, so the queries are ``[n for names in class_names for n in names]``.
        templates: the prompt templates used (``"{}"`` marks the name); informative.
    """

    features: torch.Tensor
    query_to_class: torch.Tensor
    class_names: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        f = check_tensor(self.features, "TextFeatures.features", 2, dims="(Q, D)")
        qc = check_tensor(self.query_to_class, "TextFeatures.query_to_class", 1, floating=False, dims="(Q,)")
        names = tuple(tuple(n) for n in self.class_names)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "templates", tuple(self.templates))
        if qc.shape[0] != f.shape[0]:
            raise ValueError(
                f"TextFeatures: {f.shape[0]} feature rows but {qc.shape[0]} query_to_class entries"
            )
        q = sum(len(n) for n in names)
        if names and q != f.shape[0]:
            raise ValueError(f"TextFeatures: class_names hold {q} queries, features have {f.shape[0]} rows")
        expected = torch.tensor([c for c, n in enumerate(names) for _ in n], dtype=torch.long)
        if names and not torch.equal(qc.long().cpu(), expected):
            raise ValueError("TextFeatures: query_to_class does not follow class_names (queries in class order)")
        norms = f.float().norm(dim=-1)
        if f.shape[0] and float((norms - 1).abs().max()) > 1e-3:
            raise ValueError("TextFeatures.features: expected L2-normalised rows")
        object.__setattr__(self, "query_to_class", qc.long().to(f.device))

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.query_to_class.max()) + 1

    @property
    def queries(self) -> list[str]:
        return [n for names in self.class_names for n in names]

    @classmethod
    def from_features(cls, features: torch.Tensor, query_to_class: Optional[torch.Tensor] = None) -> "TextFeatures":
        """Wrap precomputed (Q, D) embeddings (normalised here); names become ``"query{i}"``."""
        f = F.normalize(check_tensor(features, "features", 2, dims="(Q, D)").float(), dim=-1)
        qc = torch.arange(f.shape[0]) if query_to_class is None else query_to_class.long().cpu()
        c = int(qc.max()) + 1
        names = tuple(tuple(f"query{i}" for i in range(f.shape[0]) if int(qc[i]) == k) for k in range(c))
        if any(not n for n in names):
            raise ValueError("TextFeatures.from_features: every class needs at least one query")
        order = torch.argsort(qc, stable=True)
        return cls(f[order.to(f.device)], qc[order], names)

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "TextFeatures":
        return TextFeatures(self.features.to(device=device, dtype=dtype), self.query_to_class.to(device),
                            self.class_names, self.templates)


@runtime_checkable
class OVSSAdapter(Protocol):
    """An open-vocabulary segmentation model seen as a patch-logit producer.

    - ``encode_text(class_names)``: ``list[str]`` (one name per class) or ``list[list[str]]``
      (synonyms per class), or a benchmark name such as ``"voc21"`` -> ``TextFeatures``.
    - ``adapter(image, text)``: image (B, 3, H, W) float in [0, 1] and ``TextFeatures`` (or
      class names) -> ``PatchLogits`` with logits (B, Q, h, w) raw cosine similarities on the
      model's own patch grid, before any upsampling.
    - optional ``adapter.attention(image) -> Attention`` when the method has its own internal
      patch-to-patch attention (check with ``hasattr``).
    """

    def encode_text(self, class_names) -> TextFeatures: ...

    def __call__(self, image: torch.Tensor, text) -> PatchLogits: ...


# ----------------------------------------------------------------------------- geometry


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def input_size(height: int, width: int, size: Union[int, Sequence[int], None], multiple: Union[int, Sequence[int]]) -> tuple[int, int]:
    """The (H', W') an image is resized to before a ViT.

    Args:
        height, width: the image size.
        size: ``int``: the short side becomes ``size`` (aspect kept, like mmseg's
            ``Resize(scale=(2048, size), keep_ratio=True)`` for ordinary images); ``(H, W)``: a
            fixed size; ``None``: the image's own size.
        multiple: each side is rounded to the nearest multiple of this (the patch size of the
            output grid), at least one multiple; halves round up.
    """
    mh, mw = _pair(multiple, "multiple")
    if size is None:
        th, tw = float(height), float(width)
    elif isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"size: expected a positive short side, got {size}")
        scale = size / min(height, width)
        th, tw = height * scale, width * scale
    else:
        th, tw = (float(v) for v in _pair(size, "size"))
    return (max(mh, int(math.floor(th / mh + 0.5)) * mh), max(mw, int(math.floor(tw / mw + 0.5)) * mw))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) of a (B, 3, H, W) batch; float32, clamped to [0, 1]."""
    x = image.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return x.clamp(0, 1)


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes (y0, y1, x0, x1) as in mmseg's ``slide_inference``.

    Windows start every ``stride``; the last one in each direction is moved back to end at the
    border; a crop larger than the image is clipped to it.
    """
    ch, cw = min(crop, height), min(crop, width)
    rows = max(height - ch + stride - 1, 0) // stride + 1
    cols = max(width - cw + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y1 = min(i * stride + ch, height)
            x1 = min(j * stride + cw, width)
            boxes.append((y1 - ch, y1, x1 - cw, x1))
    return boxes


def cosine_logits(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, h, w, D) dense features and (B or 1, Q, D) or (Q, D) text -> (B, Q, h, w) cosines."""
    f = F.normalize(features.float(), dim=-1)
    t = F.normalize(text.float().to(f.device), dim=-1)
    if t.ndim == 2:
        return torch.einsum("bhwd,qd->bqhw", f, t)
    return torch.einsum("bhwd,bqd->bqhw", f, t.expand(f.shape[0], -1, -1))
