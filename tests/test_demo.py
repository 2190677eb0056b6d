"""``dslo demo`` without a browser: the comparison logic (same inputs for every method, timing,
scores against a ground truth), input checks, the page's work (``DemoApp.compare``) on a
tiny random ViT, and the command line. The browser test is tests/test_demo_browser.py.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import dslo
from dslo.integrations.demo_compare import (MAX_PIXELS, per_class_table, palette_image, parse_class_names,
                                            read_mask, read_photo, run_methods, score_table)
from dslo.refiners.records import Attention

from conftest import blob_problem, tiny_dinov2

transformers = pytest.importorskip("transformers")

CLASSES = ["sky", "road", "car"]


# ----------------------------------------------------------------------------- inputs


def test_class_names_refuse_duplicates_empties_and_unknown_names():
    assert parse_class_names(" sky, road ,car") == CLASSES
    with pytest.raises(ValueError, match="duplicate class name 'Sky'"):
        parse_class_names("sky, road, Sky")
    with pytest.raises(ValueError, match="empty class name"):
        parse_class_names("sky,,road")
    with pytest.raises(ValueError, match="got nothing"):
        parse_class_names("  ")
    with pytest.raises(ValueError, match=r"\['tree'\] not among the model's classes"):
        parse_class_names("sky, tree", known=CLASSES)


def test_photo_checks_say_what_was_expected(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not an image"):
        read_photo(text)
    side = int(MAX_PIXELS ** 0.5) + 1  # one row and column over the limit
    Image.new("L", (side, side)).save(tmp_path / "huge.png")
    with pytest.raises(ValueError, match=f"huge.png is {side} x {side} .* at most 4.2 Mpx"):
        read_photo(tmp_path / "huge.png")
    # a header claiming 20000 x 20000 pixels: PIL itself refuses it at open
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="bomb.png is far larger than the demo's 4.2 Mpx"):
        read_photo(tmp_path / "bomb.png")
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "red.png")
    photo = read_photo(tmp_path / "red.png")
    assert photo.shape == (1, 3, 5, 7) and float(photo[0, 0].min()) == 1.0 and float(photo[0, 1:].max()) == 0.0


def test_masks_palette_index_and_rgb_read_alike(tmp_path):
    labels = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2], [2, 0, 0, 1]])
    palette_image(labels, 3).save(tmp_path / "p.png")
    Image.fromarray(labels.numpy().astype(np.uint8), "L").save(tmp_path / "l.png")
    palette_image(labels, 3).convert("RGB").save(tmp_path / "rgb.png")
    for name in ("p.png", "l.png", "rgb.png"):
        assert torch.equal(read_mask(tmp_path / name, (3, 4), CLASSES), labels), name
    assert Image.open(tmp_path / "p.png").mode == "P"


def test_mask_checks_and_class_remapping(tmp_path):
    labels = np.array([[0, 1, 2, 3], [255, 1, 0, 2]], np.uint8)  # 3 = len(classes): ignored
    Image.fromarray(labels, "L").save(tmp_path / "m.png")
    with pytest.raises(ValueError, match="m.png is 4 x 2 pixels but the photo is 5 x 2"):
        read_mask(tmp_path / "m.png", (2, 5), CLASSES)
    gt = read_mask(tmp_path / "m.png", (2, 4), CLASSES)
    assert gt.tolist() == [[0, 1, 2, 255], [255, 1, 0, 2]]
    # compared classes in another order, "sky" not compared: its pixels are ignored
    gt = read_mask(tmp_path / "m.png", (2, 4), ["car", "road"], mask_classes=CLASSES)
    assert gt.tolist() == [[255, 1, 0, 255], [255, 1, 255, 0]]
    Image.fromarray(np.array([[0, 7]], np.uint8), "L").save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"holds label 7, which is neither a class \(0..2\) nor ignored"):
        read_mask(tmp_path / "bad.png", (1, 2), CLASSES)
    Image.fromarray(np.array([[[1, 2, 3]]], np.uint8), "RGB").save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"colour \(1, 2, 3\) is not in dslo's label palette"):
        read_mask(tmp_path / "rgb.png", (1, 1), CLASSES)
    (tmp_path / "txt.png").write_text("x")
    with pytest.raises(ValueError, match="txt.png is not an image"):
        read_mask(tmp_path / "txt.png", (1, 1), CLASSES)


# ----------------------------------------------------------------------------- comparison


def _features(att: torch.Tensor, dim: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(att.shape[0], att.shape[1], dim, generator=g)


def test_every_method_sees_the_same_inputs_and_is_timed():
    logits, att, image, truth = blob_problem(h=10, w=12)
    grid = (10, 12)
    plain = Attention.from_scores(att, grid)
    featured = Attention.from_scores(att, grid, features=_features(att))
    runs = run_methods(logits, {"plain": plain, "feat": featured}, image, ["none", "velocity", "pamr", "lposs"])
    labels = [r.label for r in runs]
    # attention-free methods run once, the others once per provider
    assert labels == ["none", "velocity @ plain", "velocity @ feat", "pamr", "lposs @ plain", "lposs @ feat"]
    by = {r.label: r for r in runs}
    assert by["lposs @ plain"].output is None and "needs attention features" in by["lposs @ plain"].error
    for r in runs:
        if r.output is None:
            continue
        assert r.seconds > 0 and r.error is None and "probabilities" in r.output.stages
    for label, solver, att_ in (("velocity @ feat", "velocity", featured), ("lposs @ feat", "lposs", featured),
                                ("pamr", "pamr", plain)):
        direct = dslo.DiscrepancyRefiner(solver=solver)(logits, att_, image)
        assert torch.equal(by[label].output.labels, direct.labels), label
    raw = dslo.DiscrepancyRefiner(solver="none", upsample="bilinear")(logits, plain, image)
    assert torch.equal(by["none"].output.labels, raw.labels)
    with pytest.raises(ValueError, match="need an attention provider"):
        run_methods(logits, {}, image, ["velocity"])
    with pytest.raises(ValueError, match="unknown method 'crf'"):
        run_methods(logits, {"plain": plain}, image, ["crf"])


def test_scores_match_a_hand_count():
    logits, att, image, _ = blob_problem(h=2, w=2)
    runs = run_methods(logits, {}, image, ["none"])
    pred = runs[0].output.labels[0]
    gt = pred.clone()
    h, w = gt.shape
    gt[: h // 2, : w // 4] = 2          # these pixels turn wrong: predicted class != 2
    gt[-1, -1] = 255                   # ignored
    assert not bool((pred == 2).any())
    rows = score_table(runs, gt, 3)
    keep = gt != 255
    acc = float((pred[keep] == gt[keep]).float().mean() * 100)
    ious = []
    for k in range(3):
        inter = int(((pred == k) & (gt == k) & keep).sum())
        union = int((((pred == k) | (gt == k)) & keep).sum())
        if union:
            ious.append(inter / union)
    assert rows[0]["pixel accuracy"] == pytest.approx(acc, abs=0.01)
    assert rows[0]["mIoU"] == pytest.approx(100 * sum(ious) / len(ious), abs=0.01)
    table = per_class_table(runs, gt, CLASSES)
    assert [r["class"] for r in table] == [CLASSES[k] for k in range(3) if bool(((pred == k) | (gt == k)).any())]
    assert next(r for r in table if r["class"] == "car")["none"] == 0.0
    assert score_table(runs, None, 3)[0]["mIoU"] is None
    with pytest.raises(ValueError, match="every pixel is ignored"):
        score_table(runs, torch.full_like(gt, 255), 3)


# ----------------------------------------------------------------------------- the page's work


@pytest.fixture(scope="module")
def tiny():
    return tiny_dinov2(layers=2)


class _Counting:
    """Wraps a callable and counts the calls (the model and attention must run once per photo)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


def make_catalogue(tiny):
    """A catalogue on the tiny ViT: the prototype model (3 classes) and two providers."""
    from dslo.adapters.prototype import PrototypeAdapter, Prototypes
    from dslo.attention import build_attention
    from dslo.attention.dinov2 import DINOv2Attention
    from dslo.integrations.demo_models import Catalogue

    vectors = torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)), dim=1)
    protos = Prototypes(vectors, CLASSES, torch.tensor([5, 5, 5]), layer=1, size=56, weights=None)
    adapter = _Counting(PrototypeAdapter(protos, model=tiny))
    dinov2 = _Counting(DINOv2Attention(tiny, size=56))

    def broken():
        raise OSError("weights file truncated\nsecond line of a long loader message")

    catalogue = Catalogue(builders={"prototype": lambda: adapter},
                          provider_builders={"affinity": lambda: build_attention("affinity"), "dinov2": lambda: dinov2,
                                             "sd2": broken})
    return catalogue, adapter, dinov2


def _photo(tmp_path, name="photo.png", size=(42, 56)):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size + (3,)).astype(np.uint8)
    arr[: size[0] // 2] = (120, 160, 230)
    Image.fromarray(arr).save(tmp_path / name)
    return tmp_path / name


def test_compare_runs_model_and_attention_once_and_writes_only_in_its_folder(tiny, tmp_path):
    from dslo.integrations.demo import DemoApp

    catalogue, adapter, dinov2 = make_catalogue(tiny)
    (tmp_path / "work").mkdir()
    app = DemoApp(catalogue, workdir=tmp_path / "work")
    try:
        photo = _photo(tmp_path)
        gt = np.zeros((42, 56), np.uint8)
        gt[21:] = 1
        gt[30:, 30:] = 2
        palette_image(torch.from_numpy(gt.astype(np.int64)), 3).save(tmp_path / "gt.png")
        before = set(p for p in tmp_path.rglob("*") if "work" not in p.parts)
        result = app.compare(photo, tmp_path / "gt.png", "prototype", "", ["affinity", "dinov2"],
                             ["none", "velocity", "lposs+"])
        assert result.class_names == CLASSES  # empty class text: the model's classes
        assert adapter.calls == 1 and dinov2.calls == 1
        labels = [r.label for r in result.runs]
        assert labels == ["none", "velocity @ affinity", "velocity @ dinov2", "lposs+ @ affinity", "lposs+ @ dinov2"]
        assert "needs attention features" in next(r for r in result.runs if r.label == "lposs+ @ affinity").error
        assert "lposs+ @ dinov2" in result.ran and "lposs+ @ affinity" not in result.ran
        assert all(r.output is None for r in result.runs)  # dropped: the session keeps labels and stage data
        assert [t.split(":")[0] for t in result.timings] == ["model prototype", "attention affinity", "attention dinov2"]
        rows = {(r["method"], r["attention"]): r for r in result.table}
        assert 0 <= rows[("velocity", "dinov2")]["mIoU"] <= 100 and rows[("none", "-")]["pixel accuracy"] is not None
        assert {r["class"] for r in result.per_class} <= set(CLASSES) and result.per_class
        # the downloads: a palette PNG holding the labels, one comparison figure
        path = result.mask_file("velocity @ dinov2")
        saved = Image.open(path)
        assert saved.mode == "P"
        assert np.array_equal(np.asarray(saved), result.labels["velocity @ dinov2"].numpy())
        assert len(result.overlays) == 5 and result.overlays[-1][1] == "ground truth"  # 4 that ran + the truth
        with pytest.raises(ValueError, match="did not run: lposs\\+ needs attention features"):
            result.mask_file("lposs+ @ affinity")
        assert Image.open(result.figure).size[0] > 300
        assert result.stages_picture("velocity @ dinov2").shape[-1] == 3
        # a second comparison on the same photo reuses the model and attention
        again = app.compare(photo, None, "prototype", "car, sky", ["dinov2"], ["path"])
        assert adapter.calls == 2 and dinov2.calls == 1  # other classes: the model reruns, attention reused
        assert "reused" in again.timings[1] and again.class_names == ["car", "sky"]
        assert all(r["mIoU"] is None for r in again.table)
        written = set(p for p in tmp_path.rglob("*") if "work" not in p.parts) - before
        assert written == set() and result.figure.is_relative_to(app.folder)
    finally:
        app.close()
    assert not app.folder.exists()


def test_compare_turns_bad_input_into_one_line(tiny, tmp_path):
    from dslo.integrations.demo import DemoApp

    catalogue, _, _ = make_catalogue(tiny)
    app = DemoApp(catalogue, workdir=tmp_path)
    photo = _photo(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(tmp_path / "small_mask.png")
    (tmp_path / "doc.jpg").write_text("hello")
    cases = [
        ((None, None, "prototype", "", ["affinity"], ["velocity"]), "upload a photo"),
        ((tmp_path / "doc.jpg", None, "prototype", "", ["affinity"], ["velocity"]), "doc.jpg is not an image"),
        ((photo, tmp_path / "small_mask.png", "prototype", "", ["affinity"], ["none"]), "expected the same size"),
        ((photo, None, "prototype", "sky, road, sky", ["affinity"], ["none"]), "duplicate class name 'sky'"),
        ((photo, None, "prototype", "", ["affinity"], []), "choose at least one method"),
        ((photo, None, "prototype", "", [], ["velocity"]), "need at least one attention provider"),
        ((photo, None, "prototype", "", ["sd2"], ["velocity"]), "attention sd2 is unavailable: weights file truncated$"),
        ((photo, None, "clip", "cat", ["affinity"], ["none"]), "unknown model 'clip'"),
        ((photo, None, "prototype", "", ["affinity"], ["crf"]), r"methods \['crf'\] cannot run here"),
    ]
    try:
        for args, message in cases:
            with pytest.raises(ValueError, match=message):
                app.compare(*args)
        assert catalogue.unavailable["attention sd2"].startswith("weights file truncated")
        assert "attention sd2: weights file truncated" in "\n".join(app.unavailable_lines())
        # the methods that need no attention still run without a provider
        assert app.compare(photo, None, "prototype", "", [], ["none", "pamr"]).ran == ["none", "pamr"]
    finally:
        app.close()


def test_catalogue_lists_what_is_missing_without_loading(monkeypatch):
    from dslo.integrations import demo_models

    monkeypatch.setattr(demo_models.Catalogue, "_shipped_prototype", staticmethod(lambda: None))
    catalogue = demo_models.Catalogue(weights_dir="/nonexistent-weights")
    reasons = catalogue.unavailable
    assert "--examples DIR or --prototypes FILE" in reasons["model prototype"]
    assert "affinity" in catalogue.providers
    for name in ("sd2", "clip"):
        assert name in catalogue.providers or f"attention {name}" in reasons
    assert all("\n" not in r and "Traceback" not in r for r in reasons.values())
    with pytest.raises(ValueError, match="model prototype is unavailable: no prototypes ship"):
        catalogue.adapter("prototype")
    with pytest.raises(ValueError, match="not both"):
        demo_models.Catalogue(examples="a", prototypes="b")


# ----------------------------------------------------------------------------- command and page


def test_demo_command_defaults_to_loopback_and_fails_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from dslo.integrations.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["demo", "--help"], terminal_width=200).output
    assert "--host" in help_text and "127.0.0.1" in help_text and "--port" in help_text
    result = runner.invoke(app, ["demo", "--prototypes", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "--prototypes: not found" in result.output
    assert "Traceback" not in result.output


def test_page_builds_with_its_controls(tiny, tmp_path):
    pytest.importorskip("gradio")
    from dslo.integrations.demo import DemoApp, build_page

    catalogue, _, _ = make_catalogue(tiny)
    app = DemoApp(catalogue, workdir=tmp_path)
    try:
        page = build_page(app)
        ids = {c.elem_id for c in page.blocks.values() if getattr(c, "elem_id", None)}
        assert {"photo", "mask", "model", "classes", "providers", "methods", "compare", "results", "masks",
                "per-class", "stages", "mask-download", "figure-download"} <= ids
        methods = next(c for c in page.blocks.values() if getattr(c, "elem_id", None) == "methods")
        assert [v for _, v in methods.choices][:2] == ["none", "path"]
    finally:
        app.close()
