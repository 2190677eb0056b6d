"""The eight benchmarks of the paper in mmseg's standard folder layouts, read here without
mmseg, and one benchmark evaluated without mmseg (same numbers as mmseg's ``IoUMetric``).

    opened = open_dataset("ade20k", "DATA")    # or a folder in the images/ masks/ classes.txt layout
    metrics = evaluate(pipeline, opened)       # {"aAcc", "mIoU", "mAcc", "images", "iou"}

``BENCHMARK_DATA`` names each benchmark's ``DataLayout``; the small development sets (voc14, ade20k4)
stand in for a benchmark whose folder is absent (``stand_in_root``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Union

import numpy as np
import torch

from .bench import ConfusionMeter, Sample, _dist_rank_world, load_dataset

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = [
    "BENCHMARK_DATA",
    "DataLayout",
    "FolderDataset",
    "OpenedDataset",
    "canonical_dataset",
    "evaluate",
    "open_dataset",
]


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
        stand_in: the name of a small development set with the same label set, used when ``root`` is
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
        from ..adapters.image_files import read_label_map, read_rgb

        img_path = self.root / self.layout.img_dir / f"{sample_id}{self.layout.img_suffix}"
        seg_path = self.root / self.layout.ann_dir / f"{sample_id}{self.layout.seg_suffix}"
        if not img_path.is_file() or not seg_path.is_file():
            raise ValueError(f"{self.name}/{sample_id}: missing {img_path if not img_path.is_file() else seg_path}")
        img = read_rgb(img_path)  # 16-bit greyscale at its range, unreadable files in one line
        seg = read_label_map(seg_path, "label map")
        if seg.shape != img.shape[:2]:
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
    """Open a benchmark (mmseg layout under ``data_root``), or a folder in the images/ masks/ classes.txt layout.

    Args:
        name: a ``BENCHMARK_DATA`` key, or a folder name under ``data_root`` / a path with
            images/, masks/, classes.txt.
        data_root: where the benchmark folders are (``VOCdevkit/``, ``ADEChallengeData2016/``, ...).
        stand_in_root: a folder of small sets in the images/ masks/ classes.txt layout (voc14, ade20k4); a benchmark whose folder is absent is
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
