"""Reading image and label files as untrusted input, with PIL.

``read_rgb`` turns any image file into (H, W, 3) float32 in [0, 1]. Greyscale images of 16 bits
per pixel (PNG ``I;16``, and PNG ``I``) are scaled by 65535, not clipped: PIL's own
``convert("RGB")`` clips them to 255, which turns a 16-bit photograph 99 % white. Images whose
pixels are 32-bit integers or floats (TIFF, some scientific formats) have no defined range and
are refused with a message; so are images with a zero side and decompression bombs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["read_rgb", "read_label_map"]

_SIXTEEN = ("I;16", "I;16B", "I;16L", "I;16N")


def _open(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {' '.join(str(exc).split())[:160]}") from None
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{what} {path}: {img.width}x{img.height} pixels; expected at least 1x1")
    return img


def read_rgb(path: Union[str, Path], what: str = "image") -> np.ndarray:
    """An image file -> (H, W, 3) float32 in [0, 1].

    8-bit images of any mode (RGB, RGBA, palette, greyscale, CMYK) go through PIL's RGB
    conversion; 16-bit greyscale is scaled by 65535 and repeated on three channels.

    Raises:
        ValueError: missing or unreadable file, a zero side, or pixels of undefined range
            (32-bit integer or float), naming the file.
    """
    path = Path(path).expanduser()
    img = _open(path, what)
    fmt = img.format
    if img.mode in _SIXTEEN or (img.mode == "I" and fmt == "PNG"):
        grey = np.asarray(img).astype(np.float32)
        if grey.min(initial=0) < 0 or grey.max(initial=0) > 65535:
            raise ValueError(f"{what} {path}: 16-bit pixels outside 0..65535")
        return np.repeat((grey / 65535.0)[..., None], 3, axis=2)
    if img.mode in ("I", "F"):
        raise ValueError(f"{what} {path}: {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels "
                         f"({fmt}) have no defined range; expected an 8-bit or 16-bit image (PNG, JPEG)")
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def read_label_map(path: Union[str, Path], what: str = "mask") -> np.ndarray:
    """A label file (one integer label per pixel, 8 or 16 bits) -> (H, W) int64.

    Raises:
        ValueError: missing or unreadable file, a zero side, more than one channel, or
            non-integer or negative values, naming the file.
    """
    path = Path(path).expanduser()
    img = _open(path, what)
    arr = np.asarray(img)  # a palette image's indices are its labels
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"{what} {path}: has shape {arr.shape}; expected a single-channel label map")
    if arr.dtype.kind not in "ui" or arr.min(initial=0) < 0:
        raise ValueError(f"{what} {path}: holds values of type {arr.dtype}; expected integer labels 0..65535")
    return arr.astype(np.int64)
