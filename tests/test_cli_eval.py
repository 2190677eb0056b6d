"""The `dslo segment`, `dslo eval` and `dslo versatility` commands, in process (typer's CliRunner).

Adapters are tiny random-initialised open_clip ViTs (a model-config JSON plus a checkpoint,
exactly how a user points the commands at local weights); data sets are written here in
mmseg's ADE20K layout, with ../shared/data's voc14 standing in for VOC when present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from dslo.integrations import experiments  # noqa: E402
from dslo.integrations.cli import app  # noqa: E402

TINY = dict(embed_dim=32, vision_cfg=dict(layers=5, width=64, head_width=16, patch_size=8, image_size=32),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
from conftest import DATA as SHARED  # noqa: E402
SIZES = [(40, 56), (48, 64), (56, 40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """CLI arguments selecting a tiny random CLIP from local files."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = d / "dslo-tiny-cli.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    ckpt = d / "tiny.pt"
    torch.save(open_clip.create_model("dslo-tiny-cli").state_dict(), ckpt)
    return ["--model", str(cfg), "--pretrained", str(ckpt), "--size", "32"]


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    """Three image/label pairs in mmseg's ADE20K layout (labels 0..150, 0 ignored)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for sub in ("images/validation", "annotations/validation"):
        (base / sub).mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(
            base / "images/validation" / f"ADE_val_{i:08d}.jpg")
        Image.fromarray(rng.integers(0, 8, (h, w)).astype(np.uint8)).save(
            base / "annotations/validation" / f"ADE_val_{i:08d}.png")
    return root


@pytest.fixture
def photo(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)).save(path)
    return path


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(res, match: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dslo: error:"), res.output
    assert match in lines[0], lines[0]


# ----------------------------------------------------------------------------- segment


def test_segment_writes_mask_and_figure(tmp_path, tiny, photo):
    from PIL import Image

    res = invoke(["segment", photo, "--classes", "cat,couch,remote", "--attention", "affinity", *tiny,
                  "--out", tmp_path / "mask.png", "--figure", tmp_path / "stages.png"])
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (40, 56) and mask.max() < 3
    assert (tmp_path / "stages.png").stat().st_size > 1000
    # a benchmark name as the vocabulary (synonyms from the class file)
    res = invoke(["segment", photo, "--classes", "voc21", "--attention", "affinity", "--solver", "path", *tiny,
                  "--out", tmp_path / "voc.png"])
    assert res.exit_code == 0, res.output
    assert np.asarray(Image.open(tmp_path / "voc.png")).max() < 21


SEGMENT_ERRORS = [
    ("unknown adapter", ["--adapter", "lseg"], "unknown adapter 'lseg'"),
    ("unknown attention", ["--attention", "dino"], "unknown attention provider"),
    ("unknown solver", ["--solver", "fast"], "unknown solver"),
    ("duplicate classes", ["--classes", "cat,cat"], "duplicate"),
    ("missing checkpoint", ["--pretrained", "/nonexistent/tiny.pt"], "missing weights"),
]


@pytest.mark.parametrize("name,extra,match", SEGMENT_ERRORS, ids=[c[0] for c in SEGMENT_ERRORS])
def test_segment_bad_arguments_fail_in_one_line_and_keep_outputs(tmp_path, tiny, photo, name, extra, match):
    out = tmp_path / "mask.png"
    out.write_bytes(b"a good mask from before")
    args = ["segment", photo, "--classes", "cat,dog", "--attention", "affinity", *tiny, "--out", out,
            "--figure", tmp_path / "fig.png"]
    for i in range(0, len(extra), 2):  # later options win in click: append the override
        args += extra[i:i + 2]
    assert_one_line_error(invoke(args), match)
    assert out.read_bytes() == b"a good mask from before"
    assert not (tmp_path / "fig.png").exists()
    assert not list(tmp_path.glob("*.tmp*"))


def test_segment_missing_image_and_missing_weights_offline(tmp_path, photo, monkeypatch):
    out = tmp_path / "mask.png"
    assert_one_line_error(invoke(["segment", tmp_path / "nope.jpg", "--classes", "a,b", "--out", out]),
                          "image not found")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "weights"
    empty.mkdir()
    # an empty default cache too, so the test means the same on a machine that has the weights
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(empty))
    res = invoke(["segment", photo, "--classes", "a,b", "--attention", "affinity", "--weights-dir", empty,
                  "--out", out])
    assert_one_line_error(res, "missing weights: open_clip ViT-B-16 'openai'")
    assert "huggingface-cli download" in res.output and not out.exists()


def test_weights_found_offline_in_weights_dir_and_hub_cache(tmp_path, tiny, monkeypatch):
    """A pretrained tag resolved offline from a file in --weights-dir, or from a Hugging Face
    cache folder used as --weights-dir (a fake tag of the tiny model, same lookup as ViT-B-16)."""
    from open_clip import pretrained as registry

    from dslo.integrations.experiments import load_clip_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setitem(registry._PRETRAINED, "dslo-tiny-cli", {"fake": registry._pcfg(hf_hub="dslo/tiny-fake/")})
    state = torch.load(tiny[3], weights_only=True)
    files = tmp_path / "files"
    files.mkdir()
    torch.save(state, files / "dslo-tiny-cli-fake.bin")
    model = load_clip_model("dslo-tiny-cli", "fake", weights_dir=files)
    assert torch.equal(model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])
    snapshot = tmp_path / "hub" / "models--dslo--tiny-fake" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--dslo--tiny-fake" / "refs").mkdir()
    (tmp_path / "hub" / "models--dslo--tiny-fake" / "refs" / "main").write_text("abc123")
    torch.save(state, snapshot / "open_clip_pytorch_model.bin")
    model = load_clip_model("dslo-tiny-cli", "fake", weights_dir=tmp_path / "hub")
    assert torch.equal(model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing weights: open_clip dslo-tiny-cli 'fake' from Hugging Face "
                                         "dslo/tiny-fake"):
        load_clip_model("dslo-tiny-cli", "fake", weights_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        load_clip_model("dslo-tiny-cli", "nope")


def test_refine_logits_class_count_mismatch(tmp_path, photo):
    logits = tmp_path / "logits.pt"
    torch.save(torch.rand(3, 5, 7) * 0.05 + 0.2, logits)
    out = tmp_path / "mask.png"
    res = invoke(["refine", "--logits", logits, "--image", photo, "--attention", "affinity", "--classes", "a,b",
                  "--out", out])
    assert_one_line_error(res, "C = 3")
    assert not out.exists()


# ----------------------------------------------------------------------------- eval


def test_eval_through_mmseg_and_without_it_agree(tmp_path, tiny, ade_root):
    pytest.importorskip("mmseg")
    common = ["eval", "--dataset", "ade20k", "--data-root", ade_root, "--attention", "affinity", *tiny,
              "--adapter-option", "templates=a photo of a {}."]
    res = invoke(common + ["--engine", "mmseg", "--json", tmp_path / "mm.json", "--out-dir", tmp_path / "mm"])
    assert res.exit_code == 0, res.output
    assert "ade20k: mIoU" in res.output and "engine mmseg" in res.output
    res = invoke(common + ["--engine", "dslo", "--json", tmp_path / "ds.json", "--out-dir", tmp_path / "ds"])
    assert res.exit_code == 0, res.output
    mm, ds = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("mm", "ds"))
    assert mm["images"] == ds["images"] == 3
    for key in ("mIoU", "aAcc", "mAcc"):
        assert mm[key] == pytest.approx(ds[key], abs=0.011)
    assert mm["command"].startswith("dslo eval --dataset ade20k")
    for png in sorted((tmp_path / "mm").glob("*.png")):  # same predictions, ADE convention (1..150)
        assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(png)),
                              np.asarray(__import__("PIL.Image").Image.open(tmp_path / "ds" / png.name)))


def test_eval_bad_arguments(tmp_path, tiny, ade_root):
    out = tmp_path / "r.json"
    base = ["--attention", "affinity", *tiny, "--json", out]
    assert_one_line_error(invoke(["eval", "--dataset", "pascal-part", "--data-root", ade_root, *base]),
                          "unknown dataset")
    assert_one_line_error(invoke(["eval", "--dataset", "voc21", "--data-root", ade_root, "--engine", "dslo", *base]),
                          "no data at")
    # checked before the model is built, whichever engine runs it
    assert_one_line_error(invoke(["eval", "--dataset", "voc21", "--data-root", ade_root, "--engine", "auto", *base]),
                          "cannot start: 1 problem(s): dataset voc21: no data at")
    assert_one_line_error(invoke(["eval", "--dataset", "ade20k", "--data-root", tmp_path / "none", *base]),
                          "is not a directory")
    assert_one_line_error(invoke(["eval", "--dataset", "ade20k", "--data-root", ade_root, "--adapter", "x", *base]),
                          "unknown adapter")
    assert not out.exists()


# ----------------------------------------------------------------------------- versatility


def test_versatility_grid_writes_the_table_and_resumes(tmp_path, tiny, ade_root, monkeypatch):
    calls = []
    original = experiments._run_group

    def counting(*args, **kwargs):
        calls.append(args[2])  # adapter name
        return original(*args, **kwargs)

    monkeypatch.setattr(experiments, "_run_group", counting)
    datasets = "ade20k,voc21" if (SHARED / "voc14" / "images").is_dir() else "ade20k"
    results, cache = tmp_path / "results", tmp_path / "cache"
    args = ["versatility", "--adapters", "clip,sc-clip", "--solvers", "none,velocity", "--attention", "affinity",
            "--datasets", datasets, "--data-root", ade_root, "--stand-in-root", SHARED, "--limit", "1", *tiny,
            "--adapter-option", "sc-clip.pre_adjust_idx=3", "--adapter-option", "sc-clip.post_adjust_idx=1",
            "--adapter-option", "sc-clip.multi_start_idx=1", "--adapter-option", "sc-clip.multi_end_idx=3",
            "--adapter-option", "templates=a photo of a {}.",  # one prompt, not 80: ADE has 150 classes
            "--results-dir", results, "--cache-dir", cache, "--no-plot"]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    n_sets = len(datasets.split(","))
    assert len(calls) == 2 * n_sets  # one pass per (dataset, adapter)
    table = (results / "versatility.md").read_text()
    assert "| clip | - | none |" in table and "| sc-clip | affinity | velocity |" in table
    rows = (results / "versatility.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 * n_sets  # header + (2 adapters x {none, affinity/velocity}) per dataset
    if n_sets == 2:
        assert "voc21*" in table and "stand-in data" in table
    # attention computed once per image and provider, shared by both adapters
    from dslo.integrations.cache import AttentionCache

    groups = AttentionCache(cache).groups()
    assert [g["entries"] for g in groups] == [n_sets]  # --limit 1; one group: one provider identity
    assert groups[0]["about"]["provider"] == "affinity"
    # the encoded vocabulary of each (dataset, model) is kept beside the attention (both adapters share CLIP)
    assert len(list((cache / "text").glob("*/*.pt"))) == n_sets
    cells = sorted((results / "versatility").glob("*/*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cells}

    calls.clear()
    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert calls == [] and "skip ade20k clip - none" in res.output
    assert {p: p.stat().st_mtime_ns for p in cells} == stamps
    assert (results / "versatility.md").read_text() == table

    # a new solver: only its cells are computed, the others are read back
    res = invoke([a if a != "none,velocity" else "none,velocity,kl" for a in args])
    assert res.exit_code == 0, res.output
    assert len(calls) == 2 * n_sets
    assert {p: p.stat().st_mtime_ns for p in cells} == stamps
    assert len(list((results / "versatility").glob("*/*.json"))) == len(cells) + 2 * n_sets


def test_versatility_bad_arguments_leave_no_table(tmp_path, tiny, ade_root):
    base = ["versatility", "--data-root", ade_root, "--datasets", "ade20k", "--attention", "affinity",
            "--results-dir", tmp_path, *tiny]
    assert_one_line_error(invoke(base + ["--adapters", "clip,lseg"]), "unknown adapter 'lseg'")
    assert_one_line_error(invoke(base + ["--solvers", "velocity,turbo"]), "unknown solver")
    assert_one_line_error(invoke(base + ["--adapters", "clip", "--datasets", "nowhere"]), "unknown dataset")
    assert not list(tmp_path.glob("versatility*"))
