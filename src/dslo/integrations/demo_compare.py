"""The comparison behind ``dslo demo``, model-free: one image's logits and attention maps in,
every chosen method run on the same inputs, timed, scored against an optional ground truth.

    image = read_photo("street.png")                        # (1, 3, H, W), size-checked
    names = parse_class_names("road, car, sky")             # duplicates refused
    runs = run_methods(logits, {"dinov2": att}, image, ["none", "velocity", "pamr"])
    gt = read_mask("street_mask.png", image.shape[-2:], names)
    table = score_table(runs, gt, len(names))               # mIoU, pixel accuracy per method

Nothing here loads a model or imports gradio; the page (``demo.py``) and the tests call
these functions directly. Bad input raises ``ValueError`` with one line saying what was
expected.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..refiners import DiscrepancyRefiner, RefinerOutput
from ..refiners.records import Attention
from .bench import ConfusionMeter
from .figures import label_palette

__all__ = [
    "MAX_PIXELS",
    "METHODS",
    "MethodRun",
    "available_methods",
    "method_needs",
    "parse_class_names",
    "read_photo",
    "read_mask",
    "run_methods",
    "score_table",
    "per_class_table",
    "palette_image",
]

#: largest photo the page takes (width x height). The refiner's joint bilateral upsampling
#: holds C maps at full resolution per method (11 classes at 4 Mpx: ~180 MB each), and the
#: page keeps every method's output for the stage view; 4 Mpx (e.g. 2048 x 2048) bounds that.
MAX_PIXELS = 4_194_304

#: method -> what it is (the page's choices, in this order)
METHODS: dict[str, str] = {
    "none": "no refinement: the model's softmax, bilinear upsampling, argmax",
    "path": "dslo, optimal-path solver",
    "velocity": "dslo, maximum-velocity solver (the default)",
    "fusion": "dslo, mean of the path and velocity maps",
    "propagate": "control: one step of class probability through the sharpened attention",
    "pamr": "rival: PAMR (SCLIP/NACLIP), uses the image only",
    "densecrf": "rival: fully connected CRF (extra 'crf'), uses the image only",
    "lposs": "rival: LPOSS, needs attention features (dinov2)",
    "lposs+": "rival: LPOSS+, needs attention features (dinov2)",
}

# methods that read the attention matrix, and those that read its patch features
_USES_ATTENTION = ("path", "velocity", "fusion", "propagate", "lposs", "lposs+")
_USES_FEATURES = ("lposs", "lposs+")


def method_needs(method: str) -> str:
    """"features", "attention" or "image": what of the attention a method reads ("image":
    nothing, so it runs once whatever providers are chosen)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    return "features" if method in _USES_FEATURES else "attention" if method in _USES_ATTENTION else "image"


def available_methods() -> tuple[list[str], dict[str, str]]:
    """(methods that run here, {method: one-line reason} for those that do not)."""
    missing: dict[str, str] = {}
    try:
        importlib.import_module("pydensecrf.densecrf")
    except Exception as exc:  # any failure to import (absent, or a broken compiled build)
        missing["densecrf"] = f"pydensecrf2 does not import ({type(exc).__name__}): pip install 'dslo[crf]'"
    return [m for m in METHODS if m not in missing], missing


def parse_class_names(text: str, known: Optional[Sequence[str]] = None) -> list[str]:
    """Comma-separated class names -> list; ValueError on an empty list, an empty name, a
    duplicate (case-insensitive), or, when ``known`` is given, a name not in it."""
    names = [n.strip() for n in str(text or "").split(",")]
    if names == [""]:
        raise ValueError("classes: expected comma-separated class names, got nothing")
    if any(not n for n in names):
        raise ValueError(f"classes: empty class name in {text!r}")
    seen: dict[str, str] = {}
    for n in names:
        if n.lower() in seen:
            raise ValueError(f"classes: duplicate class name {n!r} in {text!r}")
        seen[n.lower()] = n
    if known is not None:
        lower = {k.lower() for k in known}
        unknown = [n for n in names if n.lower() not in lower]
        if unknown:
            raise ValueError(f"classes: {unknown} not among the model's classes {list(known)}")
    return names


def _open_image(path: Union[str, Path], what: str):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: file not found: {path.name}")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:  # PIL refuses headers over ~179 Mpx before we can
        raise ValueError(f"{what}: {path.name} is far larger than the demo's {MAX_PIXELS / 1e6:.1f} Mpx: "
                         "resize it first") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{what}: {path.name} is not an image (expected PNG, JPEG, WebP, BMP or TIFF)") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"{what}: {path.name} is empty ({w} x {h} pixels)")
    if w * h > MAX_PIXELS:
        raise ValueError(f"{what}: {path.name} is {w} x {h} = {w * h / 1e6:.1f} Mpx; the demo takes at most "
                         f"{MAX_PIXELS / 1e6:.1f} Mpx (e.g. 2048 x 2048): resize it first")
    return img


def read_photo(path: Union[str, Path]) -> torch.Tensor:
    """An image file -> (1, 3, H, W) float in [0, 1] (RGB; alpha dropped).

    Raises:
        ValueError: not a file, not an image, or more than ``MAX_PIXELS`` pixels (checked
            from the header, before decoding).
    """
    img = _open_image(path, "photo")
    try:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise ValueError(f"photo: cannot decode {Path(path).name} ({type(exc).__name__})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def read_mask(path: Union[str, Path], size: Sequence[int], class_names: Sequence[str],
              mask_classes: Optional[Sequence[str]] = None, ignore_index: int = 255) -> torch.Tensor:
    """A ground-truth mask file -> (H, W) int64 in [0, C) or ``ignore_index``.

    Args:
        path: a palette PNG (pixel values are the indices), a greyscale index PNG, or an RGB
            PNG coloured with dslo's palette (``figures.label_palette``, what the page's mask
            download writes).
        size: (H, W) of the photo; the mask must match it exactly.
        class_names: the C classes being compared (the methods' label order).
        mask_classes: the classes the mask's indices refer to (default ``class_names``); a
            mask class that is not compared becomes ``ignore_index``.
        ignore_index: label of pixels that count for nothing. Index ``len(mask_classes)``
            is ignored too (the ``classes.txt`` convention of the examples folders).

    Raises:
        ValueError: not an image, another size than the photo, an index that is neither a
            class nor ignored, or an RGB colour that is not in the palette.
    """
    img = _open_image(path, "mask")
    name = Path(path).name
    if tuple(img.size[::-1]) != tuple(int(s) for s in size):
        raise ValueError(f"mask: {name} is {img.size[0]} x {img.size[1]} pixels but the photo is "
                         f"{size[1]} x {size[0]}: expected the same size")
    mask_classes = list(class_names if mask_classes is None else mask_classes)
    c = len(mask_classes)
    if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        idx = np.asarray(img).astype(np.int64)
    elif img.mode in ("RGB", "RGBA"):
        idx = _colours_to_index(np.asarray(img.convert("RGB")), max(c, 256), name)
    else:
        raise ValueError(f"mask: {name} has image mode {img.mode}; expected a palette, greyscale or RGB PNG")
    bad = np.setdiff1d(np.unique(idx), np.r_[np.arange(c), [c, ignore_index]])
    if bad.size:
        raise ValueError(f"mask: {name} holds label {int(bad[0])}, which is neither a class (0..{c - 1}) "
                         f"nor ignored ({c} or {ignore_index})")
    lookup = {k.lower(): j for j, k in enumerate(class_names)}
    table = np.full(max(int(idx.max(initial=0)) + 1, c + 1, ignore_index + 1), ignore_index, dtype=np.int64)
    for i, k in enumerate(mask_classes):
        table[i] = lookup.get(k.lower(), ignore_index)
    return torch.from_numpy(table[idx])


def _colours_to_index(rgb: np.ndarray, n: int, name: str) -> np.ndarray:
    pal = label_palette(n).astype(np.int64)
    codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    pixel = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    order = np.argsort(codes, kind="stable")
    pos = np.clip(np.searchsorted(codes[order], pixel), 0, n - 1)
    found = codes[order][pos] == pixel
    if not found.all():
        r, g, b = rgb[~found][0]
        raise ValueError(f"mask: {name} is RGB and colour ({r}, {g}, {b}) is not in dslo's label palette; "
                         "expected a palette or index PNG")
    return order[pos]


@dataclass
class MethodRun:
    """One method on one attention.

    Attributes:
        label: "velocity @ dinov2", or the method alone when it reads no attention.
        method: a key of ``METHODS``; provider: the attention's name or None.
        output: ``RefinerOutput`` with stages (labels (1, H, W)), or None when it failed.
        seconds: wall time of the refiner call (the model and attention are not included).
        error: one line saying why it did not run, else None.
    """

    label: str
    method: str
    provider: Optional[str]
    output: Optional[RefinerOutput]
    seconds: float
    error: Optional[str] = None


def _refiner(method: str) -> DiscrepancyRefiner:
    if method == "none":  # what the pipeline calls "none": the adapter's own prediction
        return DiscrepancyRefiner(solver="none", upsample="bilinear", return_stages=True)
    return DiscrepancyRefiner(solver=method, return_stages=True)


def run_methods(logits: torch.Tensor, attentions: Mapping[str, Optional[Attention]], image: torch.Tensor,
                methods: Sequence[str]) -> list[MethodRun]:
    """Every method on the same logits, attentions and image, each timed on its own.

    Args:
        logits: (1, C, h, w) raw cosine logits of the model.
        attentions: provider name -> ``Attention`` (matrix (1, N, N) on its grid, resampled
            to (h, w) by the refiner); methods that read attention run once per provider,
            the others once. A provider whose attention failed maps to None.
        image: (1, 3, H, W) in [0, 1]; the labels come out at (H, W).
        methods: keys of ``METHODS``.

    Returns:
        ``MethodRun`` per (method, provider), in the order of ``methods`` then providers. A
        method that cannot run (LPOSS on attention without features, a solver's ValueError)
        gets ``error`` instead of an output; the others still run.
    """
    if logits.ndim != 4 or logits.shape[0] != 1:
        raise ValueError(f"logits: expected (1, C, h, w), got {tuple(logits.shape)}")
    if not methods:
        raise ValueError("methods: choose at least one method")
    needs_attention = [m for m in methods if method_needs(m) != "image"]
    if needs_attention and not attentions:
        raise ValueError(f"methods {needs_attention} need an attention provider; choose at least one")
    runs: list[MethodRun] = []
    for method in methods:
        targets = [(None, None)] if method_needs(method) == "image" else list(attentions.items())
        for provider, att in targets:
            label = method if provider is None else f"{method} @ {provider}"
            if provider is not None and att is None:
                runs.append(MethodRun(label, method, provider, None, 0.0, f"attention {provider} failed"))
                continue
            if method_needs(method) == "features" and att.features is None:
                runs.append(MethodRun(label, method, provider, None, 0.0,
                                      f"{method} needs attention features; {provider} has none (dinov2 has)"))
                continue
            refiner = _refiner(method)
            # "image" methods ignore the attention argument; the refiner still wants one
            given = att if att is not None else Attention(torch.ones(1, 1, 1), (1, 1))
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    out = refiner(logits, given, image)
            except (ValueError, RuntimeError, ImportError) as exc:
                first = " ".join(str(exc).strip().splitlines()[:1])
                runs.append(MethodRun(label, method, provider, None, time.perf_counter() - start, first))
                continue
            runs.append(MethodRun(label, method, provider, out, time.perf_counter() - start))
    return runs


def _scores(labels: torch.Tensor, gt: torch.Tensor, c: int, ignore_index: int) -> ConfusionMeter:
    meter = ConfusionMeter(c, ignore_index)
    meter.update(labels.cpu().long(), gt.cpu().long())
    return meter


def score_table(runs: Sequence[MethodRun], ground_truth: Optional[torch.Tensor], num_classes: int,
                ignore_index: int = 255) -> list[dict]:
    """One row per run: method, attention, seconds, and with a ground truth mIoU and pixel
    accuracy (percent; mIoU over classes present in the prediction or the truth, as mmseg's
    ``IoUMetric`` per image); ``note`` holds a run's error.

    Args:
        ground_truth: (H, W) int64 in [0, C) or ``ignore_index``, or None (no scores).

    Raises:
        ValueError: ground truth of another size than the labels, or with no labelled pixel.
    """
    rows = []
    for run in runs:
        row = {"method": run.method, "attention": run.provider or "-", "seconds": round(run.seconds, 3),
               "mIoU": None, "pixel accuracy": None, "note": run.error or ""}
        if run.output is not None and ground_truth is not None:
            labels = run.output.labels[0]
            if tuple(labels.shape) != tuple(ground_truth.shape):
                raise ValueError(f"ground truth: expected {tuple(labels.shape)}, got {tuple(ground_truth.shape)}")
            if not bool((ground_truth != ignore_index).any()):
                raise ValueError("ground truth: every pixel is ignored; nothing to score")
            meter = _scores(labels, ground_truth, num_classes, ignore_index)
            row["mIoU"], row["pixel accuracy"] = round(meter.miou(), 2), round(meter.accuracy(), 2)
        rows.append(row)
    return rows


def per_class_table(runs: Sequence[MethodRun], ground_truth: torch.Tensor, class_names: Sequence[str],
                    ignore_index: int = 255) -> list[dict]:
    """IoU (percent) of each class under each run: one row per class present in the truth or
    in some run's prediction, a column per run label (None where the class is in neither)."""
    c = len(class_names)
    ious = {}
    for run in runs:
        if run.output is not None:
            ious[run.label] = _scores(run.output.labels[0], ground_truth, c, ignore_index).iou()
    rows = []
    for k, name in enumerate(class_names):
        values = {label: (None if torch.isnan(iou[k]) else round(float(iou[k]) * 100, 2)) for label, iou in ious.items()}
        if any(v is not None for v in values.values()):
            rows.append({"class": name, **values})
    return rows


def palette_image(labels: torch.Tensor, num_classes: int):
    """(H, W) int labels in [0, C) -> a PIL palette ("P") image: pixel values are the class
    indices, coloured with ``figures.label_palette`` (C <= 256)."""
    from PIL import Image

    if num_classes > 256:
        raise ValueError(f"palette image: at most 256 classes, got {num_classes}")
    arr = labels.cpu().numpy()
    if arr.ndim != 2 or (arr.size and (arr.min() < 0 or arr.max() >= num_classes)):
        raise ValueError(f"palette image: expected (H, W) labels in [0, {num_classes}), got shape {arr.shape}")
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette(label_palette(256).flatten().tolist())
    return img
