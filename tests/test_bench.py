import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dslo.integrations.bench import (ConfusionMeter, CorruptionModel, load_dataset, parse_method,
                                     simulate_logits)
from dslo.integrations.cli import app, write_section


def test_confusion_meter_matches_direct_iou():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (9, 11), generator=g) for _ in range(3)]
    gts = [torch.randint(0, 4, (9, 11), generator=g) for _ in range(3)]
    gts[0][0, :5] = 255
    m = ConfusionMeter(5)
    for p, t in zip(preds, gts):
        m.update(p, t)
    p = torch.cat([x.flatten() for x in preds])
    t = torch.cat([x.flatten() for x in gts])
    keep = t != 255
    p, t = p[keep], t[keep]
    ious = []
    for c in range(5):
        inter = int(((p == c) & (t == c)).sum())
        union = int(((p == c) | (t == c)).sum())
        if union:
            ious.append(inter / union)
    assert len(ious) == 4  # class 4 never appears: dropped, not counted as 0
    assert abs(m.miou() - 100 * np.mean(ious)) < 1e-9
    assert abs(m.accuracy() - 100 * float((p == t).double().mean())) < 1e-9


def test_simulated_logits_seeded_and_faithful():
    mask = torch.zeros(56, 70, dtype=torch.long)
    mask[:, 35:] = 2
    mask[:5] = 255
    a, va = simulate_logits(mask, 10, (4, 5), seed=3)
    b, vb = simulate_logits(mask, 10, (4, 5), seed=3)
    c, _ = simulate_logits(mask, 10, (4, 5), seed=4)
    assert torch.equal(a, b) and torch.equal(va, vb) and not torch.equal(a, c)
    assert a.shape == (1, 7, 4, 5) and set(va.tolist()) >= {0, 2}  # 2 present + 5 distractors
    clean = CorruptionModel(smooth=0, bias_std=0, outlier_rate=0)
    lg, v = simulate_logits(mask, 6, (4, 5), seed=0, model=clean)
    pred = v[lg[0].argmax(0)]
    assert bool((pred[:, :2] == 0).all()) and bool((pred[:, 3:] == 2).all())


def test_parse_method():
    label, r = parse_method("path:path_reading=joint,path_eps=0.25,nms=false")
    assert label.startswith("path") and r.config.path_reading == "joint"
    assert r.config.path_eps == 0.25 and r.config.nms is False
    assert parse_method("raw+jbu")[1].config.solver == "none"
    with pytest.raises(ValueError, match="RefinerConfig field"):
        parse_method("path:nope=1")


def test_write_section_replaces_only_its_block(tmp_path):
    f = tmp_path / "r.md"
    f.write_text("# head\n\nkept text\n")
    write_section(f, "a", "table A1")
    write_section(f, "b", "table B")
    write_section(f, "a", "table A2")
    text = f.read_text()
    assert "kept text" in text and "table B" in text and "table A2" in text and "A1" not in text


@pytest.mark.data
def test_real_dataset_layout(data_dir):
    ds = load_dataset(data_dir / "ade20k4")
    assert len(ds) == 4 and len(ds.classes) == 150 and ds.classes[0] == "wall"
    s = ds.load(ds.ids[0])
    assert s.image.shape[0] == 3 and s.image.shape[1:] == s.mask.shape
    vals = set(s.mask.unique().tolist())
    assert vals <= set(range(150)) | {255} and 255 in vals  # ADE "other" (0) became ignore


@pytest.mark.data
def test_quality_command_on_real_images(data_dir, tmp_path):
    out = tmp_path / "q.md"
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data_dir / "coco1"), "--attention", "affinity",
                                   "--methods", "raw+bilinear,propagate:upsample=bilinear", "--out", str(out),
                                   "--json-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "| `raw+bilinear` |" in text and "Command: `dslo bench quality" in text
    row = json.loads(next((tmp_path / "runs" / "coco1").glob("*.json")).read_text())
    assert set(row["methods"]) == {"raw+bilinear", "propagate:upsample=bilinear"}
    assert 0 <= row["methods"]["raw+bilinear"]["miou"] <= 100
