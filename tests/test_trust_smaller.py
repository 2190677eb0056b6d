"""Evaluation integrity by content, and the smaller cases: each ends in a correct result or
one clear line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from dslo.adapters.prototype_record import Prototypes  # noqa: E402
from dslo.integrations.bench import drop_examples, load_dataset  # noqa: E402
from dslo.integrations.cli import app  # noqa: E402
from dslo.integrations.sources import build_source  # noqa: E402

from test_adapter_prototype import make_examples  # noqa: E402

from conftest import tiny_dinov2  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_dinov2(layers=3)


def _scene(tmp_path, tiny):
    examples = make_examples(tmp_path / "examples")
    source = build_source("prototype", examples=examples, layer=2, size=56, model=tiny)
    data = make_examples(tmp_path / "test", seed=9)  # three images of their own
    # a byte copy of example img0 under another name, and a re-encoded copy of img2 (same pixels)
    shutil.copy(examples / "images" / "img0.png", data / "images" / "copy0.png")
    shutil.copy(examples / "masks" / "img0.png", data / "masks" / "copy0.png")
    Image.open(examples / "images" / "img2.png").save(data / "images" / "copy2.png", compress_level=0)
    shutil.copy(examples / "masks" / "img2.png", data / "masks" / "copy2.png")
    assert (data / "images" / "copy2.png").read_bytes() != (examples / "images" / "img2.png").read_bytes()
    return examples, source, data


def test_copies_of_the_examples_are_excluded_by_content(tmp_path, tiny):
    examples, source, data = _scene(tmp_path, tiny)
    ds = load_dataset(data, ignore_label=255)
    kept, dropped = drop_examples(ds, source)
    assert dropped == 2 and sorted(kept.ids) == ["img0", "img1", "img2"]
    assert drop_examples(ds, build_source("simulated"))[1] == 0


def test_bench_table_names_the_prototypes_key_examples_digest_and_the_exclusions(tmp_path, tiny, monkeypatch):
    examples, source, data = _scene(tmp_path, tiny)
    monkeypatch.setattr("dslo.integrations.sources.build_source", lambda *a, **k: source)
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--logits", "prototype",
                                   "--examples", str(examples), "--attention", "affinity",
                                   "--methods", "raw+bilinear", "--no-cache"])
    assert res.exit_code == 0, res.output
    key = source.adapter.prototypes.key[:12]
    assert f"prototypes key {key}" in res.output and f"examples sha256 {source.fingerprints.digest[:12]}" in res.output
    assert "2 image(s) identical to a prototype example (bytes or pixels) excluded, 3 scored" in res.output


def _one_line(res):
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("dslo: error:"), res.output
    return lines[0]


@pytest.fixture
def files(tmp_path):
    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(img)
    protos = tmp_path / "p.pt"
    Prototypes(F.normalize(torch.rand(2, 384), dim=1), ["a", "b"], torch.tensor([1, 2]), 8).save(protos)
    return tmp_path, img, protos


def test_layer_other_than_the_prototype_files_is_one_line(files):
    d, img, protos = files
    res = CliRunner().invoke(app, ["segment", str(img), "--adapter", "prototype", "--prototypes", str(protos),
                                   "--layer", "4", "--attention", "affinity", "--out", str(d / "m.png")])
    line = _one_line(res)
    assert "--layer 4" in line and "layer 8" in line


def test_typo_in_adapter_names_prototype_among_the_known(files):
    d, img, _ = files
    res = CliRunner().invoke(app, ["segment", str(img), "--adapter", "protoype", "--classes", "a,b",
                                   "--attention", "affinity", "--out", str(d / "m.png")])
    line = _one_line(res)
    assert "'prototype'" in line and "did you mean" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_segment_device_cuda_without_gpu_is_one_line(files):
    d, img, protos = files
    res = CliRunner().invoke(app, ["segment", str(img), "--adapter", "prototype", "--prototypes", str(protos),
                                   "--attention", "affinity", "--device", "cuda", "--out", str(d / "m.png")])
    assert "CUDA is not available" in _one_line(res)


@pytest.mark.parametrize("solver", ["pamr", "densecrf", "velocity", "path", "none"])
def test_zero_size_image_is_one_line_in_every_refiner(solver):
    import dslo

    from conftest import blob_problem

    logits, attention, _, _ = blob_problem()
    with pytest.raises(ValueError, match="H, W >= 1"):
        dslo.DiscrepancyRefiner(solver=solver)(logits, attention, torch.rand(1, 3, 0, 0))
