"""``--logits saved:DIR``: a user's own logits, one file per image, scored by the quality
benchmark; ``save_logits`` writes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dslo.attention.affinity import AffinityAttention
from dslo.integrations.bench import load_dataset, run_quality
from dslo.integrations.cli_segment import read_logits
from dslo.integrations.sources import FormLogits, SavedLogits, build_source, save_logits, saved_folder

H, W = 32, 48
IDS = ("a", "b", "c")


def write_data(root, names=("sky", "road", "car"), ids=IDS, label_offset=0):
    """A tiny data set: sky on top, road below, a car box in it; each region its own colour.
    ``label_offset`` shifts the mask labels (a leading ignored class line)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    colours = np.array([[90, 150, 230], [80, 80, 80], [200, 30, 30]], np.uint8)
    for k, i in enumerate(ids):
        mask = np.zeros((H, W), np.uint8)
        mask[12 + k:] = 1
        mask[18:28, 6 + 8 * k: 22 + 8 * k] = 2
        Image.fromarray(colours[mask]).save(root / "images" / f"{i}.png")
        Image.fromarray(mask + label_offset).save(root / "masks" / f"{i}.png")
    return root


def one_hot(ds, sample_id, classes=3):
    mask = ds.load(sample_id).mask
    return torch.nn.functional.one_hot(mask, classes).permute(2, 0, 1).float()


@pytest.fixture
def data(tmp_path):
    return load_dataset(write_data(tmp_path / "data"))


def score(ds, source, methods=("raw+bilinear",)):
    return run_quality(ds, list(methods), AffinityAttention(), source=source)


def test_ground_truth_scores_100_and_a_wrong_class_what_it_should(data, tmp_path):
    for i in IDS:
        save_logits(tmp_path / "gt", i, one_hot(data, i))
        wrong = one_hot(data, i)
        wrong[1] += wrong[2]  # the car handed to the road
        wrong[2] = 0
        save_logits(tmp_path / "wrong", i, wrong)
    gt = score(data, build_source(f"saved:{tmp_path / 'gt'}"))["raw+bilinear"]
    assert gt["miou"] == 100.0 and gt["acc"] == 100.0
    masks = torch.stack([data.load(i).mask for i in IDS])
    road, car = int((masks == 1).sum()), int((masks == 2).sum())
    got = score(data, build_source(f"saved:{tmp_path / 'wrong'}"))["raw+bilinear"]
    # sky exact, road IoU = road / (road + car), car never predicted: IoU 0
    assert got["miou"] == pytest.approx(100 * (1 + road / (road + car) + 0) / 3)
    assert got["iou"][2] == 0.0 and got["acc"] == pytest.approx(100 * (1 - car / masks.numel()))


def test_probs_form_and_named_classes_in_another_order_change_nothing(data, tmp_path):
    g = torch.Generator().manual_seed(0)
    order = [2, 0, 1]  # car, sky, road
    for i in IDS:
        coarse = torch.randn(3, 4, 6, generator=g) * 2  # a model's raw scores on its own grid
        save_logits(tmp_path / "plain", i, coarse)
        save_logits(tmp_path / "named", i, coarse[order], classes=[data.classes[k] for k in order])
    plain = build_source(f"saved:{tmp_path / 'plain'}")
    probs = build_source(f"saved:{tmp_path / 'plain'}:probs")
    named = build_source(f"saved:{tmp_path / 'named'}")
    assert isinstance(probs, FormLogits) and probs.name.startswith("saved:probs (plain, 3 files, sha256 ")
    sample = data.load("b")
    raw, vocab = plain(sample, data, (9, 9), 0)
    p, v2 = probs(sample, data, (9, 9), 0)
    assert raw.shape == (1, 3, 4, 6) and vocab.tolist() == [0, 1, 2] and torch.equal(v2, vocab)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 4, 6))
    assert torch.equal(p.argmax(1), raw.argmax(1))
    n, nv = named(sample, data, (9, 9), 0)
    assert nv.tolist() == order and torch.equal(nv[n.argmax(1)], raw.argmax(1))
    ref = score(data, plain)["raw+bilinear"]
    # log-probabilities differ from the scores by one value per position: same labels after upsampling
    for other in (probs, named):
        got = score(data, other)["raw+bilinear"]
        assert got["confusion"] == ref["confusion"]
    assert 0 < ref["miou"] < 100


def test_channels_without_classes_txt_follow_the_folder_lines_dropping_the_ignored_class(tmp_path):
    root = write_data(tmp_path / "data", names=("other", "sky", "road", "car"), label_offset=1)
    ds = load_dataset(root, ignore_label=0)
    assert ds.classes == ["sky", "road", "car"]
    sample = ds.load("a")
    probs = torch.softmax(torch.randn(4, 4, 6, generator=torch.Generator().manual_seed(1)), 0)
    save_logits(tmp_path / "lines", "a", probs)  # one channel per classes.txt line, "other" first
    save_logits(tmp_path / "scored", "a", probs[1:] / probs[1:].sum(0))  # one per scored class
    save_logits(tmp_path / "named", "a", probs, classes=["other", "sky", "road", "car"])
    results = [build_source(f"saved:{tmp_path / d}")(sample, ds, (1, 1), 0) for d in ("lines", "scored", "named")]
    for logits, vocab in results:
        assert vocab.tolist() == [0, 1, 2] and logits.shape == (1, 3, 4, 6)
        # still probabilities over the scored classes, so the refiner reads them as such
        torch.testing.assert_close(logits, results[0][0])
        torch.testing.assert_close(logits.sum(1), torch.ones(1, 4, 6))


def test_errors_name_what_was_expected(data, tmp_path):
    save_logits(tmp_path / "part", "a", one_hot(data, "a"))
    save_logits(tmp_path / "part", "b", one_hot(data, "b"))
    part = build_source(f"saved:{tmp_path / 'part'}")
    with pytest.raises(ValueError, match=r"no file for image 'c': expected .*part/c\.pt or .*part/c\.npy \(2 logit files"):
        part(data.load("c"), data, (1, 1), 0)

    (tmp_path / "five").mkdir()
    torch.save(torch.zeros(5, 4, 6), tmp_path / "five" / "a.pt")
    with pytest.raises(ValueError, match=r"5 channels, but data has 3 classes.txt lines; add .*five/classes\.txt"):
        build_source(f"saved:{tmp_path / 'five'}")(data.load("a"), data, (1, 1), 0)

    save_logits(tmp_path / "foreign", "a", torch.zeros(2, 4, 6), classes=["sky", "boat"])
    foreign = build_source(f"saved:{tmp_path / 'foreign'}")
    with pytest.raises(ValueError, match=r"classes \['boat'\] are not classes of data \(\['sky', 'road', 'car'\]\)"):
        foreign(data.load("a"), data, (1, 1), 0)
    assert "boat" in foreign.mismatch(data) and part.mismatch(data) is None

    (tmp_path / "nan").mkdir()
    bad = torch.zeros(3, 4, 6)
    bad[1, 2, 3] = float("nan")
    np.save(tmp_path / "nan" / "a.npy", bad.numpy())
    with pytest.raises(ValueError, match="1 non-finite values"):
        build_source(f"saved:{tmp_path / 'nan'}")(data.load("a"), data, (1, 1), 0)
    with pytest.raises(ValueError, match="non-finite"):
        save_logits(tmp_path / "nan2", "a", bad)

    (tmp_path / "flat").mkdir()
    torch.save(torch.zeros(4, 6), tmp_path / "flat" / "a.pt")
    with pytest.raises(ValueError, match=r"expected \(C, h, w\) or \(B, C, h, w\), got shape \(4, 6\)"):
        build_source(f"saved:{tmp_path / 'flat'}")(data.load("a"), data, (1, 1), 0)
    with pytest.raises(ValueError, match="not a folder"):
        build_source(f"saved:{tmp_path / 'none'}")
    with pytest.raises(ValueError, match="no logit files"):
        build_source(f"saved:{tmp_path / 'data' / 'masks'}")


def test_name_follows_the_content_and_a_changed_file_is_refused(data, tmp_path):
    for i in IDS:
        save_logits(tmp_path / "run", i, one_hot(data, i))
    first = build_source(f"saved:{tmp_path / 'run'}")
    assert first.name == build_source(f"saved:{tmp_path / 'run'}").name
    assert first.name.startswith("saved (run, 3 files, sha256 ") and len(first.name.split("sha256 ")[1]) == 13
    save_logits(tmp_path / "run", "b", one_hot(data, "b") * 0.5)
    second = build_source(f"saved:{tmp_path / 'run'}")
    assert second.name != first.name
    with pytest.raises(ValueError, match="changed since the run started"):
        first(data.load("b"), data, (1, 1), 0)
    second(data.load("b"), data, (1, 1), 0)
    (tmp_path / "run" / "classes.txt").write_text("sky\nroad\ncar\n")
    assert build_source(f"saved:{tmp_path / 'run'}").name != second.name


def test_folder_and_form_are_told_apart(tmp_path):
    folder = tmp_path / "a:b"
    save_logits(folder, "x", torch.zeros(2, 3, 3))
    assert isinstance(build_source(f"saved:{folder}"), SavedLogits)
    scaled = build_source(f"saved:{folder}:x0.25")
    assert isinstance(scaled, FormLogits) and scaled.form == "x0.25" and scaled.source.root == folder
    assert saved_folder(f"saved:{folder}:log_probs") == folder and saved_folder("cnn:probs") is None
    with pytest.raises(ValueError, match="a trailing :probs, :log_probs or :xS"):
        build_source(f"saved:{folder}:x0")  # not a form, so part of the path


def test_save_logits_round_trip(tmp_path):
    out = tmp_path / "out"
    logits = torch.randn(1, 3, 4, 6).half()
    path = save_logits(out, "img_1", logits, classes=["sky", "road", "car"], kind="scores")
    assert path == out / "img_1.pt"
    stored = torch.load(path, weights_only=True)
    assert stored["kind"] == "scores" and stored["logits"].shape == (3, 4, 6) and stored["logits"].dtype == torch.float16
    torch.testing.assert_close(read_logits(path), logits.float())
    assert (out / "classes.txt").read_text() == "sky\nroad\ncar\n"
    save_logits(out, "img_2", np.zeros((3, 4, 6), np.float32), classes=["sky", "road", "car"])
    assert "kind" not in torch.load(out / "img_2.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"classes \['road', 'sky', 'car'\] differ from .*classes\.txt"):
        save_logits(out, "img_3", logits, classes=["road", "sky", "car"])
    with pytest.raises(ValueError, match="names 3 classes"):
        save_logits(out, "img_3", torch.zeros(4, 4, 6))
    with pytest.raises(ValueError, match="kind 'softmax'"):
        save_logits(out, "img_3", logits, kind="softmax")
    with pytest.raises(ValueError, match="image id"):
        save_logits(out, "../img_3", logits)
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "img_1.pt", "img_2.pt"]  # no temporary left


def test_a_stored_kind_detection_reads_otherwise_is_said_once(data, tmp_path, capsys):
    for i in IDS:
        save_logits(tmp_path / "k", i, torch.rand(3, 4, 6) * 0.5, kind="scores")
    source = build_source(f"saved:{tmp_path / 'k'}")
    for i in IDS:
        source(data.load(i), data, (1, 1), 0)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "stored kind 'scores'" in err and "velocity:logits=scores" in err


def test_bench_quality_command_on_saved_logits(data, tmp_path):
    from typer.testing import CliRunner

    from dslo.integrations.cli import app

    for i in IDS:
        save_logits(tmp_path / "mine", i, one_hot(data, i)[:, ::8, ::8])
    other = write_data(tmp_path / "other", ids=("z",))
    out = tmp_path / "table.md"
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data.root), "--data", str(other),
                                   "--logits", f"saved:{tmp_path / 'mine'}", "--methods", "raw+bilinear,raw+jbu",
                                   "--attention", "affinity", "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "| `raw+jbu` |" in text and "Logits: saved (mine, 3 files, sha256 " in text
    assert "data mIoU" in text and "other mIoU" not in text
    assert "saved other: not scored (no logits in" in text
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data.root), "--logits", f"saved:{tmp_path / 'mine'}",
                                   "--attention", "affinity", "--no-cache",
                                   "--json-dir", str(tmp_path / "mine" / "runs")])
    assert res.exit_code == 2 and "inside the input folder" in res.output
    save_logits(tmp_path / "foreign", "a", torch.zeros(2, 4, 6), classes=["sky", "boat"])
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data.root), "--logits", f"saved:{tmp_path / 'foreign'}",
                                   "--attention", "affinity", "--no-cache"])
    assert res.exit_code == 2 and "classes ['boat'] are not classes of data" in res.output
