"""Logit sources of the quality benchmark: region errors, prototype logits, dataset views, table."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from dslo.integrations.bench import Sample, load_dataset, quality_table
from dslo.integrations.simulate import CorruptionModel, RegionModel, region_logits, simulate_logits, superpixels
from dslo.integrations.sources import PrototypeLogits, RegionLogits, build_source

QUIET = CorruptionModel(smooth=0.0, bias_std=0.0, outlier_rate=0.0, distractors=1)


def two_colour_scene():
    """A 3-class mask whose classes are flat-coloured rectangles (each one superpixel)."""
    mask = torch.zeros(60, 90, dtype=torch.long)
    mask[:, 30:60] = 1
    mask[:, 60:] = 2
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    image = colours[mask].permute(2, 0, 1).contiguous()
    return mask, image


def test_region_logits_seeded_and_confuse_whole_superpixels():
    mask, image = two_colour_scene()
    seg = superpixels(image)
    # superpixels follow the image: none straddles two flat rectangles (thin strips at their
    # edges may be regions of their own)
    for r in seg.unique():
        labels = mask[seg == r]
        assert float((labels == labels.mode().values).float().mean()) > 0.9
    every = RegionModel(rate=1.0, noise=QUIET)
    none = RegionModel(rate=0.0, noise=QUIET)
    lg, vocab = region_logits(mask, image, 4, (6, 9), seed=1, model=every)
    lg2, vocab2 = region_logits(mask, image, 4, (6, 9), seed=1, model=every)
    assert torch.equal(lg, lg2) and torch.equal(vocab, vocab2)
    clean, v0 = region_logits(mask, image, 4, (6, 9), seed=1, model=none)
    truth = torch.nn.functional.interpolate(mask[None, None].float(), size=(6, 9), mode="nearest")[0, 0].long()
    assert torch.equal(v0[clean[0].argmax(0)], truth)  # no confusion: the clean argmax is the truth
    pred = vocab[lg[0].argmax(0)]
    # every region confused: each rectangle's interior patches (column 1 of its 3) are wrong,
    # and all the same wrong class (one superpixel, one confusion)
    for cls in range(3):
        inside = pred[:, 3 * cls + 1]
        assert bool((inside != cls).all()) and len(inside.unique()) == 1


def test_region_logits_bad_input():
    mask, image = two_colour_scene()
    with pytest.raises(ValueError, match="matching mask"):
        region_logits(mask, image[:, :10], 4, (6, 9), seed=0)
    with pytest.raises(ValueError, match="no labelled pixel"):
        region_logits(torch.full_like(mask, 255), image, 4, (6, 9), seed=0)


def test_simulated_logits_unchanged_by_refactor():
    # the seeded contract of the image-blind model: a fixed value from before the split
    mask = torch.zeros(28, 28, dtype=torch.long)
    mask[:, 14:] = 1
    a, vocab = simulate_logits(mask, 8, (2, 2), seed=0)
    b, _ = simulate_logits(mask, 8, (2, 2), seed=0, model=CorruptionModel())
    assert torch.equal(a, b) and a.shape == (1, 7, 2, 2)
    assert torch.isfinite(a).all() and sorted(vocab.tolist())[:2] == [0, 1]


def write_set(root, ids, size=(28, 42), distinct=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nroad\n")
    for i in ids:
        # distinct: one grey level per id, so no image is a copy of another
        grey = hashlib.sha256(i.encode()).digest()[0] if distinct else 0
        Image.fromarray(np.full(size + (3,), grey, np.uint8)).save(root / "images" / f"{i}.png")
        m = np.zeros(size, np.uint8)
        m[size[0] // 2:] = 1
        Image.fromarray(m).save(root / "masks" / f"{i}.png")


def test_load_dataset_match_and_stride(tmp_path):
    ids = [f"A_{k:02d}" for k in range(6)] + [f"B_{k:02d}" for k in range(4)]
    write_set(tmp_path / "set", ids)
    assert load_dataset(tmp_path / "set", match=["B"]).ids == ["B_00", "B_01", "B_02", "B_03"]
    assert load_dataset(tmp_path / "set", match=["A"], stride=4).ids == ["A_00", "A_04"]
    with pytest.raises(ValueError, match="starting"):
        load_dataset(tmp_path / "set", match=["C"])
    with pytest.raises(ValueError, match="stride"):
        load_dataset(tmp_path / "set", stride=0)


class FakeAdapter:
    class_names = ["road", "sky"]

    def __call__(self, image):
        from dslo.refiners.records import PatchLogits

        return PatchLogits(torch.stack([torch.full((2, 3), 0.3), torch.full((2, 3), 0.1)])[None])


def test_prototype_logits_map_classes_and_refuse_examples(tmp_path):
    write_set(tmp_path / "set", ["A_00", "A_01"])
    ds = load_dataset(tmp_path / "set")
    sample = ds.load("A_01")
    src = PrototypeLogits(FakeAdapter(), examples=tmp_path / "set", exclude={"A_00"})
    logits, vocab = src(sample, ds, (2, 3), 0)
    assert vocab.tolist() == [1, 0] and logits.shape == (1, 2, 2, 3)  # road is class 1 of the set
    with pytest.raises(ValueError, match="used to build the prototypes"):
        src(ds.load("A_00"), ds, (2, 3), 0)
    other = FakeAdapter()
    other.class_names = ["road", "cat"]
    with pytest.raises(ValueError, match="cat"):
        PrototypeLogits(other)(sample, ds, (2, 3), 0)


def test_build_source_errors():
    with pytest.raises(ValueError, match="simulated"):
        build_source("clip")
    with pytest.raises(ValueError, match="--examples"):
        build_source("prototype")
    assert isinstance(build_source("regions"), RegionLogits)


def test_quality_table_layouts():
    row = {"miou": 41.234, "acc": 80.0, "seconds": 2.0}
    one = quality_table({("simulated", "voc14"): {"raw": row}}, ["raw"], {"voc14": 4}, command="dslo x")
    assert "| voc14 mIoU | voc14 acc |" in one and "| `raw` | 41.2 | 80.0 | 0.50 |" in one and "dslo x" in one
    two = quality_table({("simulated", "voc14"): {"raw": row}, ("regions", "voc14"): {"raw": row}},
                        ["raw"], {"voc14": 4})
    assert "| simulated voc14 | regions voc14 |" in two and "| `raw` | 41.2 | 41.2 | 0.50 |" in two


def test_sample_record_used_by_sources():
    mask, image = two_colour_scene()
    s = Sample("x", image, mask)
    ds = type("D", (), {"classes": ["a", "b", "c", "d"], "ignore_index": 255, "name": "toy"})()
    lg, vocab = RegionLogits(RegionModel(rate=0.0, noise=QUIET))(s, ds, (6, 9), 0)
    assert lg.shape[1] == vocab.numel() == 4


def test_quality_command_with_two_sources_and_per_set_views(tmp_path):
    from typer.testing import CliRunner

    from dslo.integrations.cli import app

    write_set(tmp_path / "street", [f"A_{k:02d}" for k in range(4)] + [f"B_{k:02d}" for k in range(4)])
    write_set(tmp_path / "other", ["X_00", "X_01"])
    out = tmp_path / "r.md"
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(tmp_path / "street"), "--data", str(tmp_path / "other"),
                                   "--attention", "affinity", "--no-cache", "--logits", "simulated,regions",
                                   "--methods", "raw+bilinear,pamr", "--match", "street=B", "--stride", "street=2",
                                   "--json-dir", str(tmp_path / "runs"), "--out", str(out), "--logits-grid", "3"])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "| simulated street | simulated other | regions street | regions other |" in text
    assert "| `pamr` |" in text and "Logits: simulated; regions." in text
    # the per-set view: street scored on B_00 and B_02 only, other on both of its images
    assert sorted(p.stem for p in (tmp_path / "runs" / "regions" / "street").glob("*.json")) == ["B_00", "B_02"]
    assert len(list((tmp_path / "runs" / "simulated" / "other").glob("*.json"))) == 2
    bad = CliRunner().invoke(app, ["bench", "quality", "--data", str(tmp_path / "street"), "--attention", "affinity",
                                   "--no-cache", "--stride", "street=two"])
    assert bad.exit_code == 2 and "--stride" in bad.output


@pytest.mark.data
def test_region_model_calibration_on_voc14(data_dir):
    """The documented calibration: raw argmax + bilinear ~40 dataset-level mIoU on voc14
    (39.8 measured, seed 0, long side 37 patches), and no confusion gives much more."""
    import torch.nn.functional as F

    from dslo.integrations.bench import ConfusionMeter, _seed, patch_grid

    ds = load_dataset(data_dir / "voc14")
    scores = {}
    for rate in (0.1, 0.0):
        meter = ConfusionMeter(len(ds.classes))
        for i in ds.ids:
            s = ds.load(i)
            grid = patch_grid(*s.image.shape[-2:], 37)
            lg, vocab = region_logits(s.mask, s.image, len(ds.classes), grid, seed=_seed(0, ds.name, i),
                                      model=RegionModel(rate=rate))
            up = F.interpolate(lg, size=s.mask.shape, mode="bilinear", align_corners=False)
            meter.update(vocab[up[0].argmax(0)], s.mask)
        scores[rate] = meter.miou()
    assert abs(scores[0.1] - 39.8) < 0.5 and scores[0.0] > scores[0.1] + 8


def test_quality_command_prototype_source_wiring(tmp_path, monkeypatch):
    """--logits prototype: examples picked by --examples-match/--examples-stride, progress called
    as build_prototypes calls it, only sets holding the prototype classes scored."""
    from typer.testing import CliRunner

    import dslo.adapters.prototype as proto
    from dslo.integrations.cli import app

    write_set(tmp_path / "street", [f"A_{k:02d}" for k in range(4)] + [f"B_{k:02d}" for k in range(2)], distinct=True)
    other = tmp_path / "other"
    write_set(other, ["X_00"])
    (other / "classes.txt").write_text("cat\ndog\n")
    seen = {}

    def fake_build(root, *, layer, size, ids, progress, model):
        seen["ids"], seen["layer"] = list(ids), layer
        seen["looped"] = list(progress(iter(ids), "prototypes", len(ids)))
        return "protos"

    monkeypatch.setattr(proto, "build_prototypes", fake_build)
    monkeypatch.setattr(proto, "PrototypeAdapter", lambda protos, model=None, size=518: FakeAdapter())
    out = tmp_path / "r.md"
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(tmp_path / "street"), "--data", str(other),
                                   "--attention", "affinity", "--no-cache", "--logits", "prototype",
                                   "--examples", str(tmp_path / "street"), "--examples-match", "A",
                                   "--examples-stride", "2", "--match", "street=B", "--methods", "raw+bilinear",
                                   "--out", str(out), "--logits-grid", "3"])
    assert res.exit_code == 0, res.output
    assert seen == {"ids": ["A_00", "A_02"], "layer": 8, "looped": ["A_00", "A_02"]}
    text = out.read_text()
    assert "| street mIoU | street acc |" in text and "other" not in text.split("Logits:")[0]
    assert "prototype (layer 8, 2 examples of street, examples sha256 " in text
    # the examples themselves are excluded from scoring (by content), and the table says so
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(tmp_path / "street"), "--attention", "affinity",
                                   "--no-cache", "--logits", "prototype", "--examples", str(tmp_path / "street"),
                                   "--examples-match", "A", "--methods", "raw+bilinear", "--logits-grid", "3"])
    assert res.exit_code == 0, res.output
    assert "prototype street: 4 image(s) identical to a prototype example (bytes or pixels) excluded, 2 scored" \
        in res.output
    # nothing left to score: one line
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(tmp_path / "street"), "--match", "A",
                                   "--attention", "affinity", "--no-cache", "--logits", "prototype", "--examples",
                                   str(tmp_path / "street"), "--examples-match", "A", "--methods", "raw+bilinear"])
    assert res.exit_code == 2 and "is one of the prototypes' examples" in res.output
