"""Figures: the stage figure's class key, overlay and robust map scale; grid_plot's order."""

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import dslo  # noqa: E402
from conftest import blob_problem  # noqa: E402
from dslo.integrations.figures import (  # noqa: E402
    build_stage_figure, grid_order, grid_plot, label_palette, legend_entries, overlay,
    robust_limits, stage_figure,
)
from dslo.refiners import RefinerOutput  # noqa: E402


def test_label_palette_unchanged():
    pal = label_palette(6)
    assert pal.dtype == np.uint8 and pal.shape == (6, 3)
    assert pal.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]]
    assert label_palette(21)[20].tolist() == [0, 64, 128]
    assert len({tuple(c) for c in label_palette(64)}) == 64


def test_legend_entries_are_the_classes_present():
    names = ["sky", "road", "car", "tree", "person"]
    pred = np.array([[0, 0, 2], [2, 2, 0]])
    gt = np.array([[0, 255, 4], [4, 4, 0]])
    entries = legend_entries([pred, gt], names)
    assert [k for k, _, _ in entries] == [0, 2, 4]
    assert [n for _, n, _ in entries] == ["sky", "car", "person"]
    # the patch colour is the colour the label panel draws for that class
    for k, _, rgb in entries:
        assert np.allclose(np.array(rgb) * 255, label_palette(5)[k])
    # ids out of range get no entry (the panel clips them, the key must not invent a name)
    assert [k for k, _, _ in legend_entries([np.array([[1, 7, -1]])], names)] == [1]


def _output(labels, c, seed=0, outlier=False):
    """A batch-1 RefinerOutput with stages, labels (H, W) given, maps (1, C, 4, 5)."""
    g = torch.Generator().manual_seed(seed)
    h, w = labels.shape
    probs = torch.softmax(torch.randn(1, c, 4, 5, generator=g), 1)
    maps = torch.rand(1, c, 4, 5, generator=g)
    if outlier:
        maps[0, :, 1, 2] = 1e6
    active = torch.ones(1, c, dtype=torch.bool)
    return RefinerOutput(labels=labels[None], scores=torch.zeros(1, c, h, w), active=active,
                         stages={"probabilities": probs, "map": maps})


def test_stage_figure_key_names_exactly_the_classes_in_the_label_panels(tmp_path):
    import matplotlib.pyplot as plt

    names = ["a", "b", "c", "d", "e"]
    image = torch.rand(3, 8, 10, generator=torch.Generator().manual_seed(0))
    lab = torch.zeros(8, 10, dtype=torch.int64)
    lab[:, 5:] = 3
    other = torch.full((8, 10), 3, dtype=torch.int64)
    gt = torch.full((8, 10), 1, dtype=torch.int64)
    gt[0, 0] = 255
    outs = {"path": _output(lab, 5), "velocity": _output(other, 5, 1)}
    fig = build_stage_figure(image, outs, names, ground_truth=gt)
    try:
        key = fig.dslo_key
        assert key is fig.axes[4].get_legend()  # first axis of row 1 (4 columns)
        assert [t.get_text() for t in key.get_texts()] == ["a", "b", "d", "ignored"]
        # class 2 ("c") and 4 ("e") appear in no label panel
        assert "c" not in [t.get_text() for t in key.get_texts()]
        rows = 2 + 4  # image/labels, key/overlays, 4 active classes (max_classes)
        panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
        assert len(panels) == rows * 4
        # a colorbar beside each softmax and each map panel: 4 classes x (1 + 2 solvers)
        assert len(fig.axes) - len(panels) == 4 * 3
    finally:
        plt.close(fig)
    # without ignored pixels there is no "ignored" entry; stage_figure writes the PNG atomically
    gt[0, 0] = 1
    path = stage_figure(image, outs, names, tmp_path / "f.png", ground_truth=gt)
    assert path.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))
    fig = build_stage_figure(image, outs, names, ground_truth=gt)
    try:
        assert [t.get_text() for t in fig.dslo_key.get_texts()] == ["a", "b", "d"]
    finally:
        plt.close(fig)


def test_stage_figure_map_panels_use_robust_limits_softmax_fixed():
    import matplotlib.pyplot as plt

    names = ["a", "b"]
    lab = torch.zeros(8, 10, dtype=torch.int64)
    out = _output(lab, 2, outlier=True)
    fig = build_stage_figure(torch.rand(3, 8, 10), {"path": out}, names)
    try:
        grid = fig.axes[:2 * 4]  # (2 + 2 classes) rows x 2 columns, colorbars come after
        for i, k in enumerate([0, 1]):
            soft = grid[(2 + i) * 2].get_images()[0]
            assert soft.get_clim() == (0, 1)
            lo, hi = grid[(2 + i) * 2 + 1].get_images()[0].get_clim()
            assert hi < 1.0 and (lo, hi) == robust_limits(out.stages["map"][0, k].numpy())
    finally:
        plt.close(fig)


def test_robust_limits_ignore_an_outlier():
    m = np.zeros((20, 20))
    m[3, 4] = 1e6
    lo, hi = robust_limits(m)
    assert lo == 0.0 and 0.0 < hi < 1.0
    # noise in [0, 1) with one huge patch: the scale is the noise's, not the outlier's
    rng = np.random.default_rng(0)
    m = rng.random((30, 30))
    m[0, 0] = 1e6
    lo, hi = robust_limits(m)
    assert 0.0 <= lo < 0.05 and 0.95 < hi < 1.0
    # a dark outlier is clipped at the other end, non-finite entries are ignored
    m[1, 1] = -1e6
    m[2, 2] = np.inf
    m[2, 3] = np.nan
    lo2, hi2 = robust_limits(m)
    assert lo2 > -1.0 and hi2 < 1.0
    assert robust_limits(np.full(4, np.nan)) == (0.0, 1.0)
    # a small map: one outlier among 20 values is 5 %, still not the scale
    m = np.linspace(0.0, 1.0, 20)
    m[7] = 1e6
    assert robust_limits(m)[1] <= 1.0
    # two values: the ends would cross, the full range is used
    assert robust_limits(np.array([1.0, 3.0])) == (1.0, 3.0)
    # a constant map still gets vmin < vmax
    lo, hi = robust_limits(np.full((3, 3), 5.0))
    assert lo == 5.0 and hi > lo


def test_overlay_blends_half_and_keeps_ignored_pixels():
    img = np.full((4, 6, 3), 0.2)
    lab = np.array([[1, 255], [0, 1]])  # (2, 2), resized to (4, 6) by nearest neighbour
    out = overlay(img, lab, 3, alpha=0.5)
    assert out.shape == (4, 6, 3)
    red = label_palette(3)[1] / 255.0
    assert np.allclose(out[0, 0], 0.5 * 0.2 + 0.5 * red)
    assert np.allclose(out[0, 5], 0.2)          # ignored: the photo unchanged
    assert np.allclose(out[3, 0], 0.1)          # class 0 is black: photo at half brightness


ROWS = [  # table order: not alphabetical in any key
    {"dataset": "voc", "adapter": "sc-clip", "attention": "sd2", "solver": "path", "miou": 40.0},
    {"dataset": "voc", "adapter": "sc-clip", "attention": "sd2", "solver": "none", "miou": 35.0},
    {"dataset": "voc", "adapter": "clip", "attention": "dinov2", "solver": "path", "miou": 30.0},
    {"dataset": "ade", "adapter": "sc-clip", "attention": "sd2", "solver": "path", "miou": 20.0},
    {"dataset": "voc", "adapter": "clip", "attention": "dinov2", "solver": "velocity", "miou": 31.0},
    {"dataset": "ade", "adapter": "clip", "attention": "dinov2", "solver": "none", "miou": 15.0},
]


def test_grid_order_is_first_seen_not_alphabetical():
    groups, solvers = grid_order(ROWS)
    assert solvers == ["path", "none", "velocity"]
    assert groups == [("voc", "sc-clip", "sd2"), ("voc", "clip", "dinov2"),
                      ("ade", "sc-clip", "sd2"), ("ade", "clip", "dinov2")]
    # a pair first seen on the second dataset still sorts by the table's row order
    rows = [{"dataset": "b", "adapter": "z", "attention": "-", "solver": "s"},
            {"dataset": "a", "adapter": "y", "attention": "-", "solver": "s"},
            {"dataset": "b", "adapter": "y", "attention": "-", "solver": "s"}]
    assert grid_order(rows)[0] == [("b", "z", "-"), ("b", "y", "-"), ("a", "y", "-")]


def test_grid_plot_ticks_and_bars_follow_the_rows(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = {}
    close = plt.close

    def keep(fig):
        ax = fig.axes[0]
        seen["ticks"] = [t.get_text() for t in ax.get_xticklabels()]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["heights"] = [[p.get_height() for p in c] for c in ax.containers]
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    path = grid_plot(ROWS, tmp_path / "grid.png")
    assert path.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))
    assert seen["ticks"] == ["voc/sc-clip/sd2", "voc/clip/dinov2", "ade/sc-clip/sd2", "ade/clip/dinov2"]
    assert seen["legend"] == ["path", "none", "velocity"]
    path_bars = seen["heights"][0]
    assert path_bars[:3] == [40.0, 30.0, 20.0] and np.isnan(path_bars[3])


def test_stage_figure_from_a_real_refiner(tmp_path):
    import matplotlib.pyplot as plt

    logits, att, image, truth = blob_problem()
    out = dslo.DiscrepancyRefiner(return_stages=True)(logits, att, image)
    gt = truth.repeat_interleave(8, 0).repeat_interleave(8, 1)
    names = ["left", "right", "never"]
    a = stage_figure(image[0], {"path": out}, names, tmp_path / "a.png", ground_truth=gt)
    b = stage_figure(image[0], {"path": out}, names, tmp_path / "b.png", ground_truth=gt)
    assert a.read_bytes() == b.read_bytes()  # deterministic
    fig = build_stage_figure(image[0], {"path": out}, names, ground_truth=gt)
    try:
        present = sorted(set(out.labels.unique().tolist()) | {0, 1})
        assert [t.get_text() for t in fig.dslo_key.get_texts()] == [names[k] for k in present]
    finally:
        plt.close(fig)
