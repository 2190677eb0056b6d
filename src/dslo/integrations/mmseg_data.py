"""The benchmarks as mmseg datasets: ``PascalVOC20Dataset`` and ``COCOObjectDataset`` (the two
mmseg lacks, same definitions as SCLIP and its successors; registered in mmseg's ``DATASETS``
when this module is imported), the mmseg dataset config of each of the eight benchmarks, and
the shipped config folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .mmseg_compat import import_mmseg

import_mmseg()  # the mmcv.ops stand-in before the first mmseg import

from mmseg.datasets import BaseSegDataset  # noqa: E402
from mmseg.registry import DATASETS  # noqa: E402

from .experiments import BENCHMARK_DATA, canonical_dataset  # noqa: E402

__all__ = ["PascalVOC20Dataset", "COCOObjectDataset", "config_path", "dataset_config", "default_pipeline"]


@DATASETS.register_module(force=True)
class PascalVOC20Dataset(BaseSegDataset):
    """Pascal VOC 2012 without background: label 0 (background) ignored, 20 classes
    (``reduce_zero_label=True``), as in SCLIP and its successors."""

    METAINFO = dict(
        classes=("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                 "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                 "tvmonitor"),
        palette=[[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
                 [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0], [64, 0, 128],
                 [192, 0, 128], [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0], [0, 192, 0],
                 [128, 192, 0], [0, 64, 128]])

    def __init__(self, ann_file: str = "", img_suffix: str = ".jpg", seg_map_suffix: str = ".png",
                 reduce_zero_label: bool = True, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, ann_file=ann_file, **kwargs)


_COCO_OBJECTS = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush")


@DATASETS.register_module(force=True)
class COCOObjectDataset(BaseSegDataset):
    """COCO-Object: background + the 80 COCO object classes, label maps
    ``annotations/val2017/*_instanceTrainIds.png`` made from the COCO instance annotations
    (GroupViT / TCL / SCLIP convention)."""

    METAINFO = dict(classes=_COCO_OBJECTS,
                    palette=[[(37 * k) % 256, (91 * k) % 256, (151 * k) % 256] for k in range(len(_COCO_OBJECTS))])

    def __init__(self, img_suffix: str = ".jpg", seg_map_suffix: str = "_instanceTrainIds.png", **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)


def config_path(name: str = "") -> Path:
    """The shipped config folder (or a file in it, e.g. ``"eval/ade20k.py"``)."""
    return Path(__file__).with_name("configs") / name


def dataset_config(name: str, data_root: Union[str, Path] = "data", *, limit: Optional[int] = None,
                   pipeline: Optional[list] = None) -> dict:
    """The mmseg dataset config of a benchmark (standard mmseg layout under ``data_root``).

    Args:
        name: "voc21", "voc20", "context60", "context59", "coco-object", "coco-stuff",
            "cityscapes", "ade20k".
        data_root: the folder holding ``VOCdevkit/``, ``coco_stuff164k/``, ``cityscapes/``,
            ``ADEChallengeData2016/``.
        limit: evaluate the first ``limit`` images only (mmengine's ``indices``).
        pipeline: default: load image, load annotations, pack (no resize: the adapter resizes
            internally and the refiner answers at the original resolution).
    """
    key = canonical_dataset(name)
    if key not in BENCHMARK_DATA:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BENCHMARK_DATA)}")
    lay = BENCHMARK_DATA[key]
    cfg = dict(type=lay.mmseg_type, data_root=str(Path(data_root) / lay.root),
               data_prefix=dict(img_path=lay.img_dir, seg_map_path=lay.ann_dir),
               img_suffix=lay.img_suffix, seg_map_suffix=lay.seg_suffix, reduce_zero_label=lay.reduce_zero_label,
               pipeline=pipeline if pipeline is not None else default_pipeline())
    if lay.split is not None:
        cfg["ann_file"] = lay.split
    if limit is not None:
        cfg["indices"] = int(limit)
    return cfg


def default_pipeline() -> list:
    """Load image, load annotations, pack: no resize (the adapter resizes internally and the
    refiner answers at the original resolution, where IoUMetric compares)."""
    return [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
