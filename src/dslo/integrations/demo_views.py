"""Pictures of a ``dslo demo`` comparison: each method's mask over the photo, one class key
for all of them, the stage maps of one method, and the whole comparison as one PNG.

Model-free (numpy, PIL, matplotlib on call); colours are ``figures.label_palette``'s, the same
as the stage figures of ``dslo segment --figure`` and the palette masks the page offers.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .demo_compare import MethodRun
from .figures import build_stage_figure, legend_entries, overlay, robust_limits

__all__ = ["mask_overlays", "class_key_html", "StageData", "stage_data", "stage_maps_figure", "comparison_figure"]


def _photo(image: torch.Tensor) -> np.ndarray:
    return image[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy()


def mask_overlays(image: torch.Tensor, runs: Sequence[MethodRun], num_classes: int,
                  ground_truth: Optional[torch.Tensor] = None, ignore_index: int = 255,
                  ) -> list[tuple[np.ndarray, str]]:
    """(picture, caption) per run that has an output (and the ground truth last, if given).

    Args:
        image: (1, 3, H, W) in [0, 1].
        runs: ``demo_compare.run_methods``'s runs; failed ones are left out.
        ground_truth: optional (H, W) labels.

    Returns:
        (H, W, 3) uint8 pictures: label colours at 60 % over the photo.
    """
    photo = _photo(image)
    pictures = []
    for run in runs:
        if run.output is not None:
            labels = run.output.labels[0].cpu().numpy()
            pictures.append((_uint8(overlay(photo, labels, num_classes, 0.6)), f"{run.label} ({run.seconds:.2f} s)"))
    if ground_truth is not None:
        gt = ground_truth.cpu().numpy()
        pictures.append((_uint8(overlay(photo, gt, num_classes, 0.6, ignore_index)), "ground truth"))
    return pictures


def _uint8(picture: np.ndarray) -> np.ndarray:
    return (np.clip(picture, 0, 1) * 255 + 0.5).astype(np.uint8)


def class_key_html(runs: Sequence[MethodRun], class_names: Sequence[str],
                   ground_truth: Optional[torch.Tensor] = None, ignore_index: int = 255) -> str:
    """One class key for every mask: a colour swatch and the name of each class present in
    some run's labels or the ground truth (HTML, names escaped)."""
    maps = [r.output.labels[0].cpu().numpy() for r in runs if r.output is not None]
    if ground_truth is not None:
        maps.append(ground_truth.cpu().numpy())
    items = []
    for k, name, rgb in legend_entries(maps, class_names, ignore_index):
        colour = "#" + "".join(f"{int(round(v * 255)):02x}" for v in rgb)
        items.append(f'<span class="dslo-key" data-class="{k}" style="display:inline-block;margin:2px 10px 2px 0">'
                     f'<span style="display:inline-block;width:14px;height:14px;background:{colour};'
                     f'border:1px solid #444;vertical-align:middle"></span> {k}: {html.escape(str(name))}</span>')
    return "<div><b>class key</b><br>" + "".join(items) + "</div>" if items else ""


@dataclass
class StageData:
    """What the stage view of one run needs, without the run's full output (a method's scores
    at a 4 Mpx photo are C x 16 MB; the page keeps this instead for every run of a session).

    Attributes:
        label, method: the run's label and method.
        labels: (H, W) int labels (uint8 up to 256 classes).
        probabilities: (C, h, w) softmax on the patch grid.
        nms: (h, w) bool, patches kept by NMS, or None (the rivals have no NMS).
        classes: the class ids shown (those winning the most pixels, at most ``max_classes``).
        maps: (k, h', w') the method's map of each shown class (patch grid; a rival's output).
        scores: (k, H, W) the upsampled score of each shown class.
    """

    label: str
    method: str
    labels: torch.Tensor
    probabilities: torch.Tensor
    nms: Optional[torch.Tensor]
    classes: list
    maps: torch.Tensor
    scores: torch.Tensor


def stage_data(run: MethodRun, num_classes: int, max_classes: int = 3) -> StageData:
    """``StageData`` of a run computed with stages (``demo_compare.run_methods``)."""
    out = run.output
    if out is None or "probabilities" not in out.stages:
        raise ValueError(f"stage maps: {run.label} has no stages ({run.error or 'not run'})")
    labels = out.labels[0].cpu()
    counts = torch.bincount(labels.flatten(), minlength=num_classes)
    shown = [int(k) for k in counts.argsort(descending=True)[:max_classes] if counts[k] > 0]
    nms = out.stages.get("nms") if run.method != "none" else None  # "none" computes it, never applies it
    return StageData(run.label, run.method, labels.to(torch.uint8) if num_classes <= 256 else labels,
                     out.stages["probabilities"][0].float().cpu(), None if nms is None else nms[0].cpu(),
                     shown, out.stages["map"][0, shown].float().cpu().clone(), out.scores[0, shown].float().cpu().clone())


def stage_maps_figure(image: torch.Tensor, data: StageData, class_names: Sequence[str]):
    """The stages of one method as a matplotlib ``Figure`` (close it with ``plt.close``).

    Row 0: the photo, the labels over it, the NMS mask (patches whose top probability passes
    the threshold: white = kept; dslo's solvers only). One row per shown class (``data.classes``,
    those winning the most pixels): its softmax on the patch grid (0..1), the method's map
    (dslo: the solver's discrepancy map on the patch grid; a rival: its output scores), and
    the score after upsampling (JBU for dslo, at the photo's size), each on its own robust
    scale (``figures.robust_limits``).

    Args:
        image: (1, 3, H, W) in [0, 1].
        data: ``stage_data`` of the run.
        class_names: C names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1 + len(data.classes), 3, figsize=(10.5, 3.0 * (1 + len(data.classes))), squeeze=False)
    photo = _photo(image)
    axes[0, 0].imshow(photo)
    axes[0, 0].set_title("photo", fontsize=10)
    axes[0, 1].imshow(overlay(photo, data.labels.long().numpy(), len(class_names), 0.6))
    axes[0, 1].set_title(f"{data.label}: labels", fontsize=10)
    if data.nms is not None:
        axes[0, 2].imshow(data.nms.float().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0, 2].set_title("NMS: patches kept (white)", fontsize=10)
    else:
        axes[0, 2].text(0.5, 0.5, f"{data.method}: no NMS stage", ha="center", va="center", fontsize=10)
    for i, k in enumerate(data.classes, start=1):
        name = class_names[k]
        panels = [(data.probabilities[k], f"{name}: softmax", (0.0, 1.0), "magma"),
                  (data.maps[i - 1], f"{name}: {data.method} map", None, "viridis"),
                  (data.scores[i - 1], f"{name}: upsampled score", None, "viridis")]
        for j, (values, title, limits, cmap) in enumerate(panels):
            v = values.numpy()
            lo, hi = limits if limits is not None else robust_limits(v)
            im = axes[i, j].imshow(v, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            axes[i, j].set_title(title, fontsize=9)
            cb = fig.colorbar(im, ax=axes[i, j], fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def comparison_figure(image: torch.Tensor, runs: Sequence[MethodRun], class_names: Sequence[str],
                      path: Union[str, Path], ground_truth: Optional[torch.Tensor] = None,
                      ignore_index: int = 255, max_classes: int = 2) -> Path:
    """Write the comparison as one PNG: ``figures.build_stage_figure`` with a column per run
    (labels, over the photo, each method's map for the ``max_classes`` first active classes),
    one class key, and the ground truth if given. Written to a temporary name, then renamed.

    Raises:
        ValueError: no run has an output.
    """
    import matplotlib.pyplot as plt

    outputs = {r.label: r.output for r in runs if r.output is not None}
    if not outputs:
        raise ValueError("comparison figure: no method ran")
    fig = build_stage_figure(image[0], outputs, class_names, ground_truth, ignore_index, max_classes)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path
