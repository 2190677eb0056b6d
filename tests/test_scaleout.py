"""Data-parallel evaluation (torch.distributed, gloo) and the on-disk attention cache."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dslo.attention.affinity import AffinityAttention
from dslo.integrations.bench import load_dataset, run_quality
from dslo.integrations.cache import AttentionCache, CachedProvider

METHODS = ["raw+bilinear", "propagate:upsample=bilinear"]


def _rank_main(rank, world, init_file, data_root, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = load_dataset(data_root, limit=5)
        res = run_quality(ds, METHODS, AffinityAttention())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.data
def test_two_gloo_ranks_equal_single_process(data_dir, tmp_path):
    root = data_dir / "voc14"
    single = run_quality(load_dataset(root, limit=5), METHODS, AffinityAttention())
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(root), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for m in METHODS:
            assert got[m]["confusion"] == single[m]["confusion"]
            assert got[m]["miou"] == single[m]["miou"]


class Counting:
    def __init__(self, inner):
        self.inner, self.calls, self.source = inner, 0, inner.source

    def __call__(self, image):
        self.calls += 1
        return self.inner(image)


@pytest.mark.data
def test_cache_hits_on_the_second_cell(data_dir, tmp_path):
    ds = load_dataset(data_dir / "voc14", limit=3)
    counting = Counting(AffinityAttention())
    cached = CachedProvider(counting, AttentionCache(tmp_path / "cache"))
    first = run_quality(ds, ["propagate:upsample=bilinear"], cached)
    assert counting.calls == 3
    second = run_quality(ds, ["propagate:upsample=bilinear"], cached)  # the next cell of a grid
    assert counting.calls == 3 and cached.cache.hits == 3
    plain = run_quality(ds, ["propagate:upsample=bilinear"], AffinityAttention())
    assert first["propagate:upsample=bilinear"]["confusion"] == plain["propagate:upsample=bilinear"]["confusion"]
    assert second["propagate:upsample=bilinear"]["confusion"] == plain["propagate:upsample=bilinear"]["confusion"]


def test_cache_keys_size_limit_and_clear(tmp_path):
    cache = AttentionCache(tmp_path, max_bytes=30_000)
    prov = CachedProvider(AffinityAttention(), cache)
    imgs = [torch.rand(1, 3, 70, 70, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    for im in imgs:
        prov(im)
    assert cache.misses == 4 and cache.size() <= 30_000  # 25x25 grid: ~16 KB per entry, LRU evicted
    a = prov(imgs[-1])
    assert cache.hits == 1
    torch.testing.assert_close(a.matrix, AffinityAttention()(imgs[-1]).matrix)
    assert AttentionCache.key("x", imgs[0]) != AttentionCache.key("y", imgs[0])
    assert AttentionCache.key("x", imgs[0]) != AttentionCache.key("x", imgs[1])
    assert cache.clear() >= 1 and cache.size() == 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_truncated_cache_entry_is_recomputed(tmp_path):
    cache = AttentionCache(tmp_path)
    prov = CachedProvider(AffinityAttention(), cache)
    im = torch.rand(1, 3, 42, 42)
    prov(im)
    entry = next(tmp_path.rglob("*.pt"))
    entry.write_bytes(entry.read_bytes()[:100])  # a crash mid-write elsewhere
    again = prov(im)
    assert cache.misses == 2 and again.matrix.shape == (1, 9, 9)
