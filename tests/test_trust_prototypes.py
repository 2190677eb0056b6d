"""Prototype files and their cache as untrusted input: a damaged cached file is rebuilt, never
served; a file naming weights with code is refused before anything is loaded and no model load
ever runs or offers to run shipped code; fields are validated (unique names, non-negative
counts, a bounded long side)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from dslo.adapters.prototype import PrototypeAdapter, Prototypes, build_prototypes  # noqa: E402
from dslo.adapters.prototype_record import MAX_LONG_SIDE  # noqa: E402

from test_adapter_prototype import make_examples  # noqa: E402

from conftest import tiny_dinov2  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_dinov2(layers=3)


def _build(examples, tiny, cache, **kw):
    return build_prototypes(examples, layer=2, size=56, model=tiny, cache_dir=cache, **kw)


def test_bit_flips_in_a_cached_prototype_file_are_never_served(tmp_path, tiny, capsys):
    examples = make_examples(tmp_path / "ex")
    cache = tmp_path / "cache"
    good = _build(examples, tiny, cache)
    (entry,) = list(cache.rglob("*.pt"))
    raw = entry.read_bytes()
    rng = random.Random(1)
    served_wrong = 0
    for _ in range(20):
        data = bytearray(raw)
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        entry.write_bytes(bytes(data))
        got = _build(examples, tiny, cache)
        served_wrong += not (torch.equal(got.vectors, good.vectors) and got.class_names == good.class_names
                             and torch.equal(got.counts, good.counts) and got.layer == good.layer)
        entry.write_bytes(raw)
    assert served_wrong == 0
    # a flip inside the vectors is caught by the digest: rebuilt, with one warning naming the file
    data = bytearray(raw)
    start = bytes(data).find(good.vectors.numpy().tobytes()[:32])
    assert start > 0
    data[start + 40] ^= 0x04
    entry.write_bytes(bytes(data))
    capsys.readouterr()
    got = _build(examples, tiny, cache)
    err = capsys.readouterr().err
    assert torch.equal(got.vectors, good.vectors)
    assert err.count("warning") == 1 and str(entry) in err and "rebuilding" in err


def test_a_copied_prototype_entry_of_other_examples_is_not_served(tmp_path, tiny, capsys):
    a = make_examples(tmp_path / "a", seed=0)
    b = make_examples(tmp_path / "b", seed=5)
    cache = tmp_path / "cache"
    pa = _build(a, tiny, cache)
    pb = _build(b, tiny, cache)
    ea, eb = (next(cache.rglob(f"{p.key}.pt")) for p in (pa, pb))
    ea.write_bytes(eb.read_bytes())
    capsys.readouterr()
    again = _build(a, tiny, cache)
    assert torch.equal(again.vectors, pa.vectors) and "another key" in capsys.readouterr().err


def test_unwritable_prototype_cache_is_said_before_the_build(tmp_path, tiny, capsys, monkeypatch):
    examples = make_examples(tmp_path / "ex")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    seen = []

    def progress(items, description, total):
        seen.append(capsys.readouterr().err)  # what was said before the first image
        return items

    out = _build(examples, tiny, blocker / "protos", progress=progress)
    assert out.num_classes == 3
    assert "cannot use" in seen[0] and "building without the cache" in seen[0]
    monkeypatch.setenv("DSLO_CACHE", str(blocker))
    out = build_prototypes(examples, layer=2, size=56, model=tiny)
    assert out.num_classes == 3 and "cannot use" in capsys.readouterr().err


def _protos(**kw):
    args = dict(vectors=F.normalize(torch.rand(3, 32), dim=1), class_names=["sky", "road", "car"],
                counts=torch.tensor([4, 5, 6]), layer=2, size=56, key="", weights=None)
    args.update(kw)
    return Prototypes(**args)


@pytest.mark.parametrize("field,value,match", [
    ("class_names", ["sky", "road", "sky"], "duplicate"),
    ("class_names", ["sky", "Road", "road "], "duplicate"),
    ("counts", torch.tensor([4, -1, 6]), "non-negative"),
    ("counts", torch.tensor([4.5, 1.0, 6.0]), "integers"),
    ("size", 20000, str(MAX_LONG_SIDE)),
    ("layer", -3, "layer"),
    ("min_cover", 1.5, "min_cover"),
    ("class_names", ["sky", "", "car"], "empty"),
])
def test_prototype_file_fields_are_validated(tmp_path, field, value, match):
    good = _protos()
    path = tmp_path / "p.pt"
    # written raw, as a hand-made or hostile file would be (``save`` itself validates first)
    payload = good._payload()
    payload[field] = value
    torch.save(payload, path)
    with pytest.raises(ValueError, match=match) as err:
        Prototypes.load(path)
    assert str(path) in str(err.value)


def test_size_20000_is_refused_in_one_line_before_any_allocation(tmp_path, tiny):
    examples = make_examples(tmp_path / "ex")
    with pytest.raises(ValueError, match=f"1 to {MAX_LONG_SIDE}"):
        build_prototypes(examples, layer=2, size=20000, model=tiny, cache_dir=False)
    with pytest.raises(ValueError, match=f"1 to {MAX_LONG_SIDE}"):
        PrototypeAdapter(_protos(), model=tiny, size=20000)


def _evil_folder(root, marker):
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "evil_vit", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                               "AutoModel": "modeling_evil.EvilModel"}}))
    (root / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return root


def test_prototype_file_naming_a_folder_with_code_is_refused_before_loading(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    evil = _evil_folder(tmp_path / "evil", marker)
    path = tmp_path / "p.pt"
    _protos(weights=str(evil)).save(path)
    loads = []
    monkeypatch.setattr("dslo.adapters.prototype._load", lambda w: loads.append(w))
    with pytest.raises(ValueError, match="refused") as err:
        PrototypeAdapter(path)
    assert str(path) in str(err.value) and not loads and not marker.exists()
    for weights in ("someone/dinov2-small", "../elsewhere/model"):
        _protos(weights=weights).save(path)
        with pytest.raises(ValueError, match="not a known DINOv2 source"):
            PrototypeAdapter(path)
    assert not loads


def test_every_dinov2_load_passes_trust_remote_code_false(tmp_path, monkeypatch):
    from dslo.attention import dinov2

    marker = tmp_path / "ran.txt"
    evil = _evil_folder(tmp_path / "evil", marker)
    seen = {}
    real = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    dinov2._load_cached.cache_clear()
    with pytest.raises(ValueError, match="DINOv2 weights"):
        dinov2.load_dinov2(str(evil))
    assert seen.get("trust_remote_code") is False and seen.get("local_files_only") is True
    assert not marker.exists()


def test_a_plain_dinov2_folder_named_by_a_file_still_loads(tmp_path, tiny):
    folder = tmp_path / "vit"
    tiny.save_pretrained(folder)
    path = tmp_path / "p.pt"
    _protos(weights=str(folder)).save(path)
    adapter = PrototypeAdapter(path)
    assert adapter(torch.rand(1, 3, 56, 56)).logits.shape[:2] == (1, 3)


def test_a_pickled_prototype_file_is_refused_without_advice_to_unpickle(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "p.pt"
    path.write_bytes(pickle.dumps({"format": "dslo-prototypes/1", "vectors": Evil()}))
    with pytest.raises(ValueError, match="cannot read prototype file") as err:
        Prototypes.load(path)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ran").exists()
