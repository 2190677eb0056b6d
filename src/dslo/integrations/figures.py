"""Figures (matplotlib, Agg): the stage figure of one image (paper Figure 4 style) and the
results plot of a versatility grid.

The pure helpers (``label_palette``, ``overlay``, ``legend_entries``, ``robust_limits``,
``grid_order``) need only numpy; ``build_stage_figure``, ``stage_figure`` and ``grid_plot``
import matplotlib on call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..refiners import RefinerOutput

__all__ = ["stage_figure", "build_stage_figure", "label_palette", "overlay", "legend_entries",
           "robust_limits", "grid_order", "grid_plot"]

# percentiles of a discrepancy map that bound its colour scale (values outside are clipped)
ROBUST_PERCENTILES = (2.0, 98.0)


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
    """(H, W) int labels -> (H, W, 3) uint8 palette colours (labels clipped to [0, n))."""
    return label_palette(max(n, 1))[np.clip(labels, 0, max(n - 1, 0))]


def _resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) labels -> (H, W) by nearest-neighbour index sampling (no interpolation of ids)."""
    h, w = labels.shape
    if (h, w) == tuple(size):
        return labels
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return labels[rows[:, None], cols[None, :]]


def overlay(image: np.ndarray, labels: np.ndarray, n: int, alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
    """The photo with the label colours blended over it.

    Args:
        image: (H, W, 3) float in [0, 1].
        labels: (h, w) int class ids in [0, n) or ``ignore_index``; resized to (H, W) by
            nearest neighbour when the sizes differ.
        n: number of classes (palette size).
        alpha: weight of the label colour (0: photo only, 1: labels only).
        ignore_index: pixels with this label keep the photo unchanged.

    Returns:
        (H, W, 3) float in [0, 1].
    """
    labels = _resize_nearest(np.asarray(labels), image.shape[:2])
    ignored = labels == ignore_index
    colours = _colour(np.where(ignored, 0, labels), n).astype(np.float64) / 255.0
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    out[ignored] = image[ignored]
    return np.clip(out, 0.0, 1.0)


def legend_entries(label_maps: Sequence[np.ndarray], class_names: Sequence[str],
                   ignore_index: int = 255) -> list[tuple[int, str, tuple[float, float, float]]]:
    """The class key of the label panels: every class present in at least one of them.

    Args:
        label_maps: (H, W) int label arrays (any sizes), e.g. each solver's labels and the
            ground truth.
        class_names: C names; ids outside [0, C) and ``ignore_index`` get no entry.

    Returns:
        ``(class id, name, (r, g, b) in [0, 1])`` by increasing class id, the colour being the
        one the label panels use.
    """
    c = len(class_names)
    present: set[int] = set()
    for m in label_maps:
        ids = np.unique(np.asarray(m))
        present.update(int(k) for k in ids if k != ignore_index and 0 <= k < c)
    pal = label_palette(max(c, 1)).astype(np.float64) / 255.0
    return [(k, class_names[k], tuple(float(v) for v in pal[k])) for k in sorted(present)]


def robust_limits(values: np.ndarray, percentiles: tuple[float, float] = ROBUST_PERCENTILES,
                  ) -> tuple[float, float]:
    """Colour limits of a map that a few outlier patches cannot dictate.

    Args:
        values: array of any shape (e.g. one (h, w) map); non-finite entries are ignored.
        percentiles: (low, high) in [0, 100]; values outside the limits are clipped by the
            colour map (shown at its end colours).

    Returns:
        ``(vmin, vmax)`` with ``vmin < vmax``. The low/high percentiles of the finite values
        (each an actual value of the map, rounded inwards);
        when they coincide (a map flat on more than 96 % of its patches) vmax is lo plus a
        tiny step, so whatever differs from the flat part shows saturated instead of the
        whole scale being stretched to one outlier. (0, 1) when nothing is finite.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    # rounded inward to values of the map ("higher" for the low end, "lower" for the high end):
    # interpolating would let an outlier pull the limit towards it on a small map (a 4 x 5 map
    # has only 20 values, one of them is 5 % of it)
    lo = float(np.percentile(v, percentiles[0], method="higher"))
    hi = float(np.percentile(v, percentiles[1], method="lower"))
    if lo > hi:  # so few values that the two ends crossed: the full range
        lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        hi = lo + max(abs(lo) * 1e-6, 1e-6)
    return lo, hi


def _extend(values: np.ndarray, lo: float, hi: float) -> str:
    """Colorbar ``extend``: arrow ends on the sides where values were clipped."""
    v = values[np.isfinite(values)]
    below = bool(v.size and v.min() < lo)
    above = bool(v.size and v.max() > hi)
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")


def build_stage_figure(
    image: torch.Tensor,
    outputs: Mapping[str, RefinerOutput],
    class_names: Sequence[str],
    ground_truth: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    max_classes: int = 4,
):
    """The stage figure as a matplotlib ``Figure`` (not saved; close it with ``plt.close``).

    Layout (columns: image/key, one per solver, ground truth if given):
        row 0: the photo, each solver's refined labels, the ground truth (ignored pixels white);
        row 1: the class key (a colour patch and name for every class present in the label
            panels, plus "ignored" when the ground truth has ``ignore_index`` pixels), then
            each label panel blended over the photo at 50 % alpha;
        rows 2..: one per active class (at most ``max_classes``): its softmax probabilities
            on a fixed 0..1 scale, then each solver's discrepancy map on a robust scale
            (``robust_limits``: 2nd..98th percentile of that map, clipped outside), each panel
            with its colorbar.

    Args:
        image: (3, H, W) in [0, 1].
        outputs: solver name -> RefinerOutput of one image (batch 1), computed with
            ``return_stages=True``: labels (1, H, W), stages["probabilities"] and
            stages["map"] (1, C, h, w).
        class_names: C names.
        ground_truth: optional (H, W) int64 labels in [0, C) or ``ignore_index``.
        max_classes: how many active classes get a row of maps.

    Returns:
        the ``matplotlib.figure.Figure``; its class key is ``fig.axes[ncols].get_legend()``
        (the first axis of row 1), also stored as ``fig.dslo_key``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not outputs:
        raise ValueError("stage_figure: expected at least one RefinerOutput")
    first = next(iter(outputs.values()))
    if "probabilities" not in first.stages:
        raise ValueError("stage_figure: outputs need stages; build the refiner with return_stages=True")
    c = len(class_names)
    active = first.active[0].nonzero().flatten().tolist()[:max_classes]
    names = list(outputs)
    ncols = 1 + len(names) + (1 if ground_truth is not None else 0)
    nrows = 2 + len(active)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.5 * nrows), squeeze=False)
    img = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=10)
    panels = []  # (column, title, labels)
    for j, name in enumerate(names):
        panels.append((j + 1, f"{name}: labels", outputs[name].labels[0].cpu().numpy()))
    gt = None
    if ground_truth is not None:
        gt = ground_truth.cpu().numpy()
        panels.append((ncols - 1, "ground truth", gt))
    for col, title, lab in panels:
        shown = _colour(np.where(lab == ignore_index, 0, lab), c)
        shown[lab == ignore_index] = 255
        axes[0, col].imshow(shown, interpolation="nearest")
        axes[0, col].set_title(title, fontsize=10)
        axes[1, col].imshow(overlay(img, lab, c, 0.5, ignore_index))
        axes[1, col].set_title(title.replace(": labels", "") + " over image", fontsize=10)
    entries = legend_entries([lab for _, _, lab in panels], class_names, ignore_index)
    handles = [Patch(facecolor=rgb, edgecolor="black", linewidth=0.5, label=f"{name}")
               for _, name, rgb in entries]
    if gt is not None and bool((gt == ignore_index).any()):
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=0.5, label="ignored"))
    key = axes[1, 0].legend(handles=handles, loc="center", title="class key", frameon=False,
                            fontsize=9 if len(handles) <= 10 else 7, title_fontsize=10,
                            ncol=1 if len(handles) <= 10 else 2, handlelength=1.5)
    fig.dslo_key = key
    for i, k in enumerate(active, start=2):
        probs = first.stages["probabilities"][0, k].cpu().numpy()
        im = axes[i, 0].imshow(probs, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        axes[i, 0].set_title(f"{class_names[k]}: softmax", fontsize=9)
        cb = fig.colorbar(im, ax=axes[i, 0], fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=7)
        for j, name in enumerate(names):
            m = outputs[name].stages["map"][0, k].float().cpu().numpy()
            # scaled per map, not per row: the solvers' maps are different quantities (a
            # path discrepancy, a velocity, a rival's probabilities) with unrelated ranges, so
            # a shared scale would flatten all but one; the colorbar gives each map's numbers
            lo, hi = robust_limits(m)
            im = axes[i, j + 1].imshow(m, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            axes[i, j + 1].set_title(f"{class_names[k]}: {name} map (p2-p98)", fontsize=9)
            cb = fig.colorbar(im, ax=axes[i, j + 1], fraction=0.046, pad=0.03, extend=_extend(m, lo, hi))
            cb.ax.tick_params(labelsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def stage_figure(
    image: torch.Tensor,
    outputs: Mapping[str, RefinerOutput],
    class_names: Sequence[str],
    path: str | Path,
    ground_truth: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    max_classes: int = 4,
) -> Path:
    """Write the stage figure (``build_stage_figure``): image, labels with their class key and
    over the photo, per-class probabilities, each solver's discrepancy map, ground truth.

    Args:
        image: (3, H, W) in [0, 1].
        outputs: solver name -> RefinerOutput of one image (batch 1), computed with
            ``return_stages=True`` (maps are taken from ``stages["map"]``, (1, C, h, w)).
        class_names: C names.
        path: PNG to write (written to a temporary file, then renamed).
        ground_truth: optional (H, W) int64 labels in [0, C) or ``ignore_index``.
        max_classes: how many active classes get a row of maps.

    Returns:
        the path written.
    """
    import matplotlib.pyplot as plt

    fig = build_stage_figure(image, outputs, class_names, ground_truth, ignore_index, max_classes)
    from .outputs import temporary_sibling

    path = Path(path)
    tmp = temporary_sibling(path)  # a unique name: a fixed "NAME.tmp.png" may be someone's file
    try:
        fig.savefig(tmp, dpi=90, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def grid_order(rows: Sequence[Mapping]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Group and bar order of ``grid_plot``, the order of the versatility table.

    Args:
        rows: dicts with keys dataset, adapter, attention, solver.

    Returns:
        ``(groups, solvers)``: groups are ``(dataset, adapter, attention)`` ordered by the
        dataset's first appearance in ``rows`` (the table's columns), then by the (adapter,
        attention) pair's first appearance (the table's rows); solvers in first-seen order.
    """
    datasets = {d: i for i, d in enumerate(dict.fromkeys(r["dataset"] for r in rows))}
    pairs = {p: i for i, p in enumerate(dict.fromkeys((r["adapter"], r["attention"]) for r in rows))}
    groups = sorted(dict.fromkeys((r["dataset"], r["adapter"], r["attention"]) for r in rows),
                    key=lambda g: (datasets[g[0]], pairs[g[1:]]))
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    return groups, solvers


def grid_plot(rows: Sequence[Mapping], path: str | Path, metric: str = "miou") -> Path:
    """Bar plot of a versatility grid: one group per (dataset, adapter, attention), one bar per
    solver, in the table's order (``grid_order``), not alphabetical.

    Args:
        rows: dicts with keys adapter, attention, solver, dataset, and ``metric``.
        path: PNG to write (written to a temporary file, then renamed).
        metric: the row key plotted; a missing cell is a gap.

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, solvers = grid_order(rows)
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
    from .outputs import temporary_sibling

    path = Path(path)
    tmp = temporary_sibling(path)  # a unique name: a fixed "NAME.tmp.png" may be someone's file
    try:
        fig.savefig(tmp, dpi=90, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
