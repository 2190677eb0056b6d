"""Caches that cannot serve wrong data: every attention entry carries its key and a digest of
its payload; a damaged, foreign or misplaced entry is recomputed with one warning line naming
it; an unusable cache folder degrades to no cache, said once, before the work; ``cache info`` /
``cache clear`` cover every cache and touch only dslo's entries."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dslo.attention.affinity import AffinityAttention
from dslo.integrations.cache import AttentionCache, CachedProvider
from dslo.integrations.cli import app


class _Counting:
    def __init__(self):
        self.inner = AffinityAttention()
        self.calls = 0
        self.source = "affinity"

    def __call__(self, image):
        self.calls += 1
        return self.inner(image)


def _setup(tmp_path):
    logs = []
    cache = AttentionCache(tmp_path / "c", log=logs.append)
    prov = _Counting()
    cached = CachedProvider(prov, cache, "affinity-test", log=logs.append)
    image = torch.rand(1, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    fresh = cached(image)
    (entry,) = list((tmp_path / "c").rglob("*.pt"))
    return cache, cached, prov, image, fresh, entry, logs


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dslo-pwned-by-cache",))


@pytest.mark.parametrize("damage", ["random bytes", "pickle", "truncated", "empty", "json"])
def test_damaged_attention_entry_is_recomputed_with_one_warning(tmp_path, damage):
    cache, cached, prov, image, fresh, entry, logs = _setup(tmp_path)
    good = entry.read_bytes()
    if damage == "random bytes":
        entry.write_bytes(os.urandom(len(good)))
    elif damage == "pickle":
        entry.write_bytes(pickle.dumps({"matrix": _Evil()}))
    elif damage == "truncated":
        entry.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        entry.write_text(json.dumps({"matrix": [[1.0]]}))
    again = cached(image)
    assert prov.calls == 2
    torch.testing.assert_close(again.matrix, fresh.matrix)
    assert len(logs) == 1 and str(entry) in logs[0] and "recomputing" in logs[0], logs
    assert not os.path.exists("/tmp/dslo-pwned-by-cache")
    # the recomputed entry replaced the damaged one: the next call is a silent hit
    cached(image)
    assert prov.calls == 2 and len(logs) == 1


def test_single_bit_flips_are_never_served(tmp_path):
    cache, cached, prov, image, fresh, entry, logs = _setup(tmp_path)
    good = entry.read_bytes()
    rng = random.Random(0)
    for trial in range(20):
        data = bytearray(good)
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        entry.write_bytes(bytes(data))
        logs.clear()
        got = cached(image)  # never a traceback
        assert torch.equal(got.matrix, fresh.matrix), f"flip at byte {pos} served wrong attention"
        assert got.grid == fresh.grid
        entry.write_bytes(good)
    # the matrix's own bytes: a flip there must be caught by the digest
    data = bytearray(good)
    raw = fresh.matrix.contiguous().numpy().tobytes()
    start = bytes(data).find(raw[:64])
    assert start > 0
    data[start + 100] ^= 0x01
    entry.write_bytes(bytes(data))
    logs.clear()
    calls = prov.calls
    got = cached(image)
    assert prov.calls == calls + 1 and torch.equal(got.matrix, fresh.matrix)
    assert len(logs) == 1 and "digest" in logs[0] and str(entry) in logs[0]


def test_another_images_entry_copied_over_is_not_served(tmp_path):
    cache, cached, prov, image, fresh, entry, logs = _setup(tmp_path)
    other = torch.rand(1, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    cached(other)
    other_entry = next(p for p in (tmp_path / "c").rglob("*.pt") if p != entry)
    entry.write_bytes(other_entry.read_bytes())
    got = cached(image)
    torch.testing.assert_close(got.matrix, fresh.matrix)
    assert len(logs) == 1 and "another key" in logs[0]


def _dataset(root, n=2):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray((rng.random((28, 28, 3)) * 255).astype("uint8")).save(root / "images" / f"i{k}.png")
        mask = np.zeros((28, 28), np.uint8)
        mask[14:] = 1
        Image.fromarray(mask).save(root / "masks" / f"i{k}.png")
    (root / "classes.txt").write_text("road\nsky\n")
    return root


def _bench(data, cache_dir, extra=()):
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--attention", "affinity",
                                   "--methods", "raw+bilinear,velocity", "--cache-dir", str(cache_dir), *extra])
    return res


@pytest.mark.parametrize("damage", ["random bytes", "pickle"])
def test_bench_quality_with_damaged_cache_entries_recomputes_and_matches(tmp_path, damage):
    data = _dataset(tmp_path / "set")
    cache_dir = tmp_path / "cache"
    first = _bench(data, cache_dir)
    assert first.exit_code == 0, first.output
    entries = [p for p in cache_dir.rglob("*.pt")]
    assert len(entries) == 2
    for p in entries:
        p.write_bytes(os.urandom(4000) if damage == "random bytes" else pickle.dumps({"matrix": _Evil()}))
    again = _bench(data, cache_dir)
    assert again.exit_code == 0, again.output
    warnings = [ln for ln in again.output.splitlines() if "attention cache: entry" in ln]
    assert len(warnings) == 2 and all("recomputing" in w for w in warnings)
    # the scores, without the seconds per image
    table = lambda out: [ln.rsplit("|", 2)[0] for ln in out.splitlines() if ln.startswith("| `")]  # noqa: E731
    assert table(again.output) == [ln for ln in table(first.output)], (first.output, again.output)
    assert not os.path.exists("/tmp/dslo-pwned-by-cache")


def test_cache_folder_that_is_a_file_runs_without_cache_after_one_warning(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "set")
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    res = _bench(data, blocker)
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "running without the cache" in warnings[0] and str(blocker) in warnings[0]
    assert blocker.read_text() == "mine"
    # DSLO_CACHE naming a file: the same, for the default location
    blocker = tmp_path / "another-file"
    blocker.write_text("mine")
    monkeypatch.setenv("DSLO_CACHE", str(blocker))
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--attention", "affinity",
                                   "--methods", "raw+bilinear"])
    assert res.exit_code == 0, res.output
    assert sum("running without the cache" in ln for ln in res.output.splitlines()) == 1


def test_unusable_cache_is_said_before_any_attention_is_computed(tmp_path):
    logs = []
    blocker = tmp_path / "f"
    blocker.write_text("x")
    prov = _Counting()
    cached = CachedProvider(prov, AttentionCache(blocker / "sub", log=logs.append), "x")
    assert prov.calls == 0 and len(logs) == 1 and "cannot use" in logs[0]
    out = cached(torch.rand(1, 3, 28, 28))
    assert out.matrix.shape[-1] == out.grid[0] * out.grid[1] and len(logs) == 1


def test_cache_clear_keeps_a_users_own_files(tmp_path):
    cache_dir = tmp_path / "cache"
    cache, cached, prov, image, fresh, entry, logs = _setup(tmp_path)
    cache_dir = tmp_path / "c"
    # files that look like entries by place or name but are not dslo's
    name = "cd" + "0" * 62
    mine = [cache_dir / "notes.pt", cache_dir / "ab" / "my-model.pt", cache_dir / "cd" / f"{name}.pt",
            cache_dir / "text" / "cd" / f"{name}.pt", cache_dir / "prototypes" / "cd" / f"{name}.pt"]
    for p in mine:
        p.parent.mkdir(parents=True, exist_ok=True)
    mine[0].write_bytes(b"my notes")
    torch.save({"weights": torch.ones(3)}, mine[1])
    mine[2].write_bytes(b"precious bytes under a hex name")
    torch.save({"anything": 1}, mine[3])
    torch.save([1, 2, 3], mine[4])
    res = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(cache_dir)])
    assert res.exit_code == 0, res.output
    assert not entry.exists()
    assert all(p.exists() for p in mine), [p for p in mine if not p.exists()]
    assert mine[2].read_bytes() == b"precious bytes under a hex name"


@pytest.mark.parametrize("about", ["{not json", "[1, 2]", '{"weights": "x", "options": 3, "format": "f"}',
                                   '{"weights": {"files": "nope"}}', '{"weights": {"files": [1, {"path": 2}]}}'])
def test_cache_info_survives_malformed_about(tmp_path, about):
    cache, cached, prov, image, fresh, entry, logs = _setup(tmp_path)
    (entry.parent.parent / "about.json").write_text(about)
    res = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "1 entries" in res.output


def test_cache_info_and_clear_cover_the_prototype_cache(tmp_path, monkeypatch):
    from dslo.adapters.prototype_build import _cache_path
    from dslo.adapters.prototype_record import Prototypes

    cache_dir = tmp_path / "cache"
    protos = Prototypes(torch.nn.functional.normalize(torch.rand(2, 8), dim=1), ["a", "b"], torch.tensor([3, 4]),
                        2, 518, "ab" * 32, None)
    protos.save(_cache_path(cache_dir / "prototypes", protos.key))
    res = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(cache_dir)])
    assert res.exit_code == 0, res.output
    assert "1 prototype sets" in res.output and "2 classes" in res.output
    res = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(cache_dir)])
    assert "removed 1 prototype sets" in res.output
    assert not list((cache_dir / "prototypes").rglob("*.pt"))


@pytest.mark.parametrize("damage", ["edited number", "a list", "not json"])
def test_a_damaged_versatility_cell_is_recomputed_not_reused(tmp_path, damage):
    from test_provenance import _ade, _invoke, _tiny_clip, _versatility_args

    cfg, ckpt = _tiny_clip(tmp_path, 0)
    data = _ade(tmp_path / "data")
    results = tmp_path / "results"
    args = _versatility_args(tmp_path, cfg, ckpt, data, results)
    assert _invoke(args).exit_code == 0
    cell = results / "versatility" / "ade20k" / "clip__-__none.json"
    good = json.loads(cell.read_text())
    if damage == "edited number":
        cell.write_text(json.dumps({**good, "miou": 99.99}))
    elif damage == "a list":
        cell.write_text("[1, 2]")
    else:
        cell.write_text("{ half a cell")
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    assert "recompute ade20k clip - none" in res.output and "damaged" in res.output
    again = json.loads(cell.read_text())
    assert again["miou"] == good["miou"] and "99.99" not in (results / "versatility.md").read_text()


def test_text_cache_never_serves_a_damaged_or_misplaced_entry(tmp_path, capsys):
    from dslo.adapters.text_cache import TextFeatureCache, resolve_text_cache

    cache = TextFeatureCache(tmp_path / "text")
    names, temps = [["cat"], ["dog"]], ["a {}."]
    feats = F_normalize(torch.rand(2, 16))
    key_a = TextFeatureCache.key(weights="w", model_class="M", tokenizer="t", class_names=names, templates=temps)
    key_b = TextFeatureCache.key(weights="w2", model_class="M", tokenizer="t", class_names=names, templates=temps)
    path_a = cache.put(key_a, feats, class_names=names, templates=temps)
    path_b = cache.put(key_b, feats.flip(0), class_names=names, templates=temps)
    assert torch.equal(cache.get(key_a).features, feats)
    raw = path_a.read_bytes()
    start = raw.find(feats.numpy().tobytes()[:16])
    flipped = bytearray(raw)
    flipped[start + 20] ^= 0x10
    path_a.write_bytes(bytes(flipped))
    capsys.readouterr()
    assert cache.get(key_a) is None
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "digest" in err and str(path_a) in err
    path_a.write_bytes(path_b.read_bytes())  # another vocabulary's entry copied over
    assert cache.get(key_a) is None and "another key" in capsys.readouterr().err
    # a folder that cannot be used: one warning, no cache, no traceback
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert resolve_text_cache(blocker / "text") is None
    assert capsys.readouterr().err.count("cannot use") == 1


def F_normalize(x):
    return torch.nn.functional.normalize(x, dim=1)


def test_cache_info_and_clear_cover_the_hash_memo(tmp_path, monkeypatch):
    from dslo.integrations import provenance

    monkeypatch.setenv("DSLO_CACHE", str(tmp_path))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"w" * 100)
    provenance.file_record(weights)
    res = CliRunner().invoke(app, ["cache", "info"])
    assert res.exit_code == 0 and "sha256 of 1 weight files" in res.output, res.output
    res = CliRunner().invoke(app, ["cache", "clear"])
    assert res.exit_code == 0 and not (tmp_path / "file-hashes.json").exists() and weights.exists()


def test_a_write_failure_mid_run_turns_the_cache_off_with_one_warning(tmp_path, monkeypatch):
    from dslo.integrations import cache as cache_module

    logs = []
    cached = CachedProvider(_Counting(), AttentionCache(tmp_path / "c", log=logs.append), "x", log=logs.append)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "save_entry", full)
    for seed in range(3):
        out = cached(torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(seed)))
        assert out.matrix.shape[-1] == out.grid[0] * out.grid[1]
    assert len(logs) == 1 and "No space left" in logs[0] and "without the cache" in logs[0]
