"""Figures (matplotlib, Agg): the stage figure of one image (paper Figure 4 style) and the
results plot of a versatility grid."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..refiners import RefinerOutput

__all__ = ["stage_figure", "label_palette", "grid_plot"]


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, the Pascal VOC bit-interleaving palette (distinct, deterministic)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[k] = (r, g, b)
    return pal


def _colour(labels: np.ndarray, n: int) -> np.ndarray:
    return label_palette(max(n, 1))[np.clip(labels, 0, max(n - 1, 0))]


def stage_figure(
    image: torch.Tensor,
    outputs: Mapping[str, RefinerOutput],
    class_names: Sequence[str],
    path: str | Path,
    ground_truth: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    max_classes: int = 4,
) -> Path:
    """Image, per-class probabilities, each solver's discrepancy map, predictions, ground truth.

    Args:
        image: (3, H, W) in [0, 1].
        outputs: solver name -> RefinerOutput of one image (batch 1), computed with
            ``return_stages=True`` (maps are taken from ``stages["map"]``).
        class_names: C names.
        path: PNG to write (written to a temporary file, then renamed).
        ground_truth: optional (H, W) int64 labels in [0, C) or ``ignore_index``.
        max_classes: how many active classes get a row of maps.

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not outputs:
        raise ValueError("stage_figure: expected at least one RefinerOutput")
    first = next(iter(outputs.values()))
    if "probabilities" not in first.stages:
        raise ValueError("stage_figure: outputs need stages; build the refiner with return_stages=True")
    c = len(class_names)
    active = first.active[0].nonzero().flatten().tolist()[:max_classes]
    names = list(outputs)
    cols = 1 + len(names)
    rows = 1 + len(active)
    fig, axes = plt.subplots(rows, cols + (1 if ground_truth is not None else 0),
                             figsize=(2.6 * (cols + 1), 2.4 * rows), squeeze=False)
    img = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image")
    for j, name in enumerate(names):
        lab = outputs[name].labels[0].cpu().numpy()
        axes[0, j + 1].imshow(_colour(lab, c))
        axes[0, j + 1].set_title(f"{name}: labels", fontsize=9)
    if ground_truth is not None:
        gt = ground_truth.cpu().numpy().copy()
        shown = _colour(np.where(gt == ignore_index, 0, gt), c)
        shown[gt == ignore_index] = 255
        axes[0, -1].imshow(shown)
        axes[0, -1].set_title("ground truth")
    for i, k in enumerate(active, start=1):
        probs = first.stages["probabilities"][0, k].cpu().numpy()
        axes[i, 0].imshow(probs, cmap="magma", vmin=0, vmax=1)
        axes[i, 0].set_title(f"{class_names[k]}: softmax", fontsize=9)
        for j, name in enumerate(names):
            m = outputs[name].stages["map"][0, k].cpu().numpy()
            axes[i, j + 1].imshow(m, cmap="viridis")
            axes[i, j + 1].set_title(f"{class_names[k]}: {name} map", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path


def grid_plot(rows: Sequence[Mapping], path: str | Path, metric: str = "miou") -> Path:
    """Bar plot of a versatility grid: one group per (adapter, attention), one bar per solver.

    Args:
        rows: dicts with keys adapter, attention, solver, dataset, and ``metric``.
        path: PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dataset"], r["adapter"], r["attention"]) for r in rows})
    solvers = sorted({r["solver"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(groups) * len(solvers) / 2), 3))
    width = 0.8 / max(len(solvers), 1)
    for s, solver in enumerate(solvers):
        vals = [next((r[metric] for r in rows if (r["dataset"], r["adapter"], r["attention"]) == g
                      and r["solver"] == solver), np.nan) for g in groups]
        ax.bar(np.arange(len(groups)) + s * width, vals, width, label=solver)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels(["/".join(g) for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
