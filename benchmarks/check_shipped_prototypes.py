"""Quality of the shipped prototypes (every third camvid367 frame) against prototypes built from
all 367 frames, on camvid101's first frame (the README's example photo) and on every 24th
camvid367 frame left out of the shipped subset.

    python -m dslo.adapters.prototype_shipped --examples DATA/camvid367 --every 1 --out /tmp/full.pt
    python benchmarks/check_shipped_prototypes.py --data DATA --full /tmp/full.pt

Pixel accuracy and mIoU (classes present in the ground truth; label 11 ignored) of the raw
prototype logits (bilinear upsampling, argmax: ``--solver none``) and of dslo's default
(velocity) with the adapter's own attention, as ``dslo segment --adapter prototype`` runs it.
The left-out camvid367 frames are among the full build's examples: that comparison favours it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dslo
from dslo.adapters.prototype import PrototypeAdapter
from dslo.adapters.prototype_record import Prototypes
from dslo.adapters.prototype_shipped import load_shipped_prototypes


def _load(folder: Path, sample: str):
    image_path = next((folder / "images").glob(f"{sample}.*"))
    arr = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255
    mask = np.asarray(Image.open(folder / "masks" / f"{sample}.png")).astype(np.int64)
    return torch.from_numpy(arr).permute(2, 0, 1)[None], mask


def _confusion(pred: np.ndarray, gt: np.ndarray, c: int = 11) -> np.ndarray:
    keep = gt < c
    return np.bincount(gt[keep] * c + pred[keep], minlength=c * c).reshape(c, c)


def _score(cm: np.ndarray) -> tuple[float, float]:
    inter = np.diag(cm)
    iou = inter / np.maximum(cm.sum(0) + cm.sum(1) - inter, 1)
    return 100 * inter.sum() / cm.sum(), 100 * iou[cm.sum(1) > 0].mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding camvid367/ and camvid101/")
    parser.add_argument("--full", type=Path, required=True, help="prototypes built from all camvid367 frames")
    args = parser.parse_args()
    adapters = {"shipped (every 3rd, 123 frames)": PrototypeAdapter(load_shipped_prototypes()),
                "all 367 frames": PrototypeAdapter(Prototypes.load(args.full))}
    ids = sorted(p.stem for p in (args.data / "camvid367" / "masks").glob("*.png"))
    left_out = [s for k, s in enumerate(ids) if k % 3 != 0][::24]
    frames = [("camvid101", "0016E5_07959")] + [("camvid367", s) for s in left_out]
    totals: dict = {}
    for folder, sample in frames:
        image, gt = _load(args.data / folder, sample)
        for name, adapter in adapters.items():
            patch, att = adapter.logits_and_attention(image)
            for solver in ("none", "velocity"):
                refiner = dslo.DiscrepancyRefiner(solver="none", upsample="bilinear") if solver == "none" \
                    else dslo.DiscrepancyRefiner(solver=solver)
                pred = refiner(patch.per_class(), att, image).labels[0].numpy()
                key = (folder, name, solver)
                totals[key] = totals.get(key, 0) + _confusion(pred, gt)
    print(f"| frames | prototypes | solver | pixel acc | mIoU |\n|---|---|---|---:|---:|")
    for (folder, name, solver), cm in sorted(totals.items()):
        what = "camvid101 0016E5_07959" if folder == "camvid101" else f"camvid367, {len(left_out)} left out"
        acc, miou = _score(cm)
        print(f"| {what} | {name} | {solver} | {acc:.1f} | {miou:.1f} |")


if __name__ == "__main__":
    main()
