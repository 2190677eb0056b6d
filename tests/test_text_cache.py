"""On-disk text feature cache of the CLIP adapters (``dslo.adapters.text_cache``).

Tiny random open_clip models; the text tower's runs are counted with a forward hook on its
transformer, so "hit" means "the tower did not run", not merely "same numbers".
"""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from test_adapters import tiny_clip  # noqa: E402

from dslo.adapters import TextFeatureCache, build_adapter, default_text_cache_dir  # noqa: E402
from dslo.adapters.clip import CLIPAdapter  # noqa: E402
from dslo.adapters.text_cache import TEXT_CACHE_FORMAT, text_weights_fingerprint  # noqa: E402

TEMPLATES = ["a photo of a {}.", "a sketch of the {}."]
VOCAB = [["cat", "kitty"], "dog", "road"]


class TowerRuns:
    """Counts forward calls of a model's text transformer (one per prompt batch)."""

    def __init__(self, model) -> None:
        self.count = 0
        model.transformer.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


@pytest.fixture
def model():
    # function scope: each test hooks its own model
    return tiny_clip(seed=11, layers=2)


def entries(root):
    return sorted(root.glob("*/*.pt"))


def test_second_call_hits_and_returns_the_same_bits(model, tmp_path):
    runs = TowerRuns(model)
    adapter = CLIPAdapter(model, size=None, text_cache=tmp_path)
    first = adapter.encode_text(VOCAB, TEMPLATES)
    assert runs.count == 1 and len(entries(tmp_path)) == 1
    second = adapter.encode_text(VOCAB, TEMPLATES)
    assert runs.count == 1, "a cache hit must not run the text tower"
    assert adapter.text_cache.hits == 1 and adapter.text_cache.misses == 1
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.query_to_class, first.query_to_class)
    assert second.class_names == first.class_names and second.templates == tuple(TEMPLATES)
    # a new adapter on the same weights hits too, and matches today's uncached computation bit for bit
    other = CLIPAdapter(model, size=None)
    assert torch.equal(other.encode_text(VOCAB, TEMPLATES, cache=tmp_path).features, first.features)
    assert runs.count == 1
    assert torch.equal(other.encode_text(VOCAB, TEMPLATES).features, first.features)
    assert runs.count == 2


def test_other_weights_under_the_same_name_miss(tmp_path):
    """Two checkpoints of one architecture registered under one open_clip name."""
    config = dict(embed_dim=32, vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
                  text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    (tmp_path / "dslo-tiny-text.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"seed{seed}.pt")
        torch.save(tiny_clip(seed=seed, layers=2).state_dict(), paths[-1])
    cache = tmp_path / "cache"
    a = build_adapter("clip", model="dslo-tiny-text", pretrained=str(paths[0]), size=None, text_cache=cache)
    b = build_adapter("clip", model="dslo-tiny-text", pretrained=str(paths[1]), size=None, text_cache=cache)
    assert a.model_name == b.model_name
    runs = TowerRuns(b.clip)
    fa = a.encode_text(VOCAB, TEMPLATES).features
    fb = b.encode_text(VOCAB, TEMPLATES).features
    assert runs.count == 1, "other weights must miss"
    assert not torch.allclose(fa, fb)
    assert len(entries(cache)) == 2


def test_weights_changed_in_place_miss(model, tmp_path):
    """The fingerprint is remembered per model object but not across in-place writes."""
    runs = TowerRuns(model)
    adapter = CLIPAdapter(model, size=None, text_cache=tmp_path)
    before = adapter.encode_text(VOCAB, TEMPLATES).features
    print_before = text_weights_fingerprint(model)
    with torch.no_grad():
        model.ln_final.bias.add_(0.5)
    assert text_weights_fingerprint(model) != print_before
    after = adapter.encode_text(VOCAB, TEMPLATES).features
    assert runs.count == 2 and not torch.allclose(before, after)
    # vision weights are not part of the text key
    with torch.no_grad():
        model.visual.ln_post.bias.add_(0.5)
    adapter.encode_text(VOCAB, TEMPLATES)
    assert runs.count == 2


@pytest.mark.parametrize("vocab, templates", [
    (VOCAB, TEMPLATES[:1]),                              # fewer templates
    (VOCAB, TEMPLATES[::-1]),                            # same templates, other order
    (VOCAB, ["a photo of a {}!", TEMPLATES[1]]),         # one template edited
    ([["cat", "kitty"], "road", "dog"], TEMPLATES),      # classes reordered
    ([["cat", "kitty"], "dog"], TEMPLATES),              # a class dropped
    ([["cat", "kitty", "kitten"], "dog", "road"], TEMPLATES),  # a synonym added
    (["cat", "kitty", "dog", "road"], TEMPLATES),        # same queries, synonyms split into classes
])
def test_other_vocabulary_or_templates_miss(model, tmp_path, vocab, templates):
    runs = TowerRuns(model)
    adapter = CLIPAdapter(model, size=None, text_cache=tmp_path)
    adapter.encode_text(VOCAB, TEMPLATES)
    text = adapter.encode_text(vocab, templates)
    assert runs.count == 2, "a different vocabulary or template list must miss"
    assert len(entries(tmp_path)) == 2
    fresh = CLIPAdapter(model, size=None).encode_text(vocab, templates)
    assert torch.equal(text.features, fresh.features) and text.class_names == fresh.class_names
    adapter.encode_text(VOCAB, TEMPLATES)
    assert runs.count == 3  # 3 = the uncached reference above; the original entry still hits


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_damaged_entry_is_recomputed(model, tmp_path, damage):
    runs = TowerRuns(model)
    adapter = CLIPAdapter(model, size=None, text_cache=tmp_path)
    good = adapter.encode_text(VOCAB, TEMPLATES).features
    (path,) = entries(tmp_path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"something": torch.zeros(3)}, path)
    again = adapter.encode_text(VOCAB, TEMPLATES).features
    assert runs.count == 2 and torch.equal(again, good)
    # the entry was rewritten whole: the next call hits
    adapter.encode_text(VOCAB, TEMPLATES)
    assert runs.count == 2 and torch.load(path, weights_only=True)["format"] == TEXT_CACHE_FORMAT


def test_progress_gets_the_batch_count(model, tmp_path):
    calls = []

    def progress(items, description, total):
        calls.append([description, total, 0])
        for item in items:
            calls[-1][2] += 1
            yield item

    runs = TowerRuns(model)
    # 4 queries x 2 templates = 8 prompts in batches of 3 -> 3 batches
    adapter = CLIPAdapter(model, size=None, text_cache=tmp_path, text_batch_size=3)
    text = adapter.encode_text(VOCAB, TEMPLATES, progress=progress)
    assert len(calls) == 1
    description, total, advanced = calls[0]
    assert total == 3 and advanced == 3 and runs.count == 3
    assert "4 queries" in description and "2 templates" in description
    # batching does not change the features beyond float rounding
    whole = CLIPAdapter(model, size=None).encode_text(VOCAB, TEMPLATES)
    torch.testing.assert_close(text.features, whole.features)
    adapter.encode_text(VOCAB, TEMPLATES, progress=progress)
    assert len(calls) == 1, "a hit has nothing to show progress for"


def test_cached_features_come_back_float32_on_the_adapter_device(model, tmp_path):
    """An entry written elsewhere (here: float64, as another machine or device might) is
    returned as a fresh computation would be: float32 on the adapter's device."""
    adapter = CLIPAdapter(model, size=None)
    store = TextFeatureCache(tmp_path)
    reference = adapter.encode_text(VOCAB, TEMPLATES)
    names = reference.class_names
    key = store.key(class_names=names, templates=TEMPLATES, **adapter.text_identity())
    planted = torch.nn.functional.normalize(torch.randn(4, 32, dtype=torch.float64), dim=-1)
    store.put(key, planted, class_names=names, templates=TEMPLATES)
    text = adapter.encode_text(VOCAB, TEMPLATES, cache=store)
    assert text.features.dtype == torch.float32 and text.features.device == adapter.vit.device
    assert text.query_to_class.device == adapter.vit.device
    assert torch.equal(text.features, planted.float())  # the planted entry was used, not recomputed
    # the store moves entries to any device asked for (meta exists on CPU-only builds)
    moved = store.get(key, device="meta")
    assert moved.features.device.type == "meta"


def test_off_unless_asked_and_default_folder(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DSLO_CACHE", str(tmp_path))
    assert default_text_cache_dir() == tmp_path / "text"
    plain = CLIPAdapter(model, size=None)
    assert plain.text_cache is None
    plain.encode_text(VOCAB, TEMPLATES)
    plain(torch.rand(1, 3, 16, 16), VOCAB)  # class names given to forward are encoded too
    assert not any(tmp_path.rglob("*.pt")), "the library default must not write to disk"
    on = CLIPAdapter(model, size=None, text_cache=True)
    on.encode_text(VOCAB, TEMPLATES, cache=None)  # an explicit None overrides the adapter
    on.encode_text(VOCAB, TEMPLATES, cache=False)
    assert not any(tmp_path.rglob("*.pt"))
    on.encode_text(VOCAB, TEMPLATES)
    (path,) = entries(tmp_path / "text")
    # two levels below $DSLO_CACHE: invisible to the attention cache's "$DSLO_CACHE/*/*.pt"
    assert path.parent.parent == tmp_path / "text" and not list(tmp_path.glob("*/*.pt"))
    with pytest.raises(ValueError, match="text cache"):
        CLIPAdapter(model, size=None, text_cache=3)


def test_entry_describes_what_produced_it(model, tmp_path):
    adapter = CLIPAdapter(model, size=None, text_cache=tmp_path)
    text = adapter.encode_text(VOCAB, TEMPLATES)
    (entry,) = adapter.text_cache.entries()
    info = entry.info
    assert info["weights"] == text_weights_fingerprint(model)
    assert info["templates"] == 2 and info["queries"] == 4 and info["classes"] == 3 and info["dim"] == 32
    assert info["model_class"] == "open_clip.model.CLIP"
    assert "context_length=16" in info["tokenizer"]
    assert entry.class_names == text.class_names and entry.templates == tuple(TEMPLATES)
    assert adapter.text_cache.size() > 0
    assert adapter.text_cache.clear() == 1 and adapter.text_cache.entries() == []


class OffsetTokenizer:
    """One class, many vocabularies: the open_clip BPE with every token id shifted."""

    context_length = 16

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.base = open_clip.tokenizer.SimpleTokenizer(context_length=16)

    def __call__(self, texts):
        tokens = self.base(texts)
        return torch.where(tokens > 0, (tokens + self.offset) % 49408, tokens)


def test_tokenizer_is_part_of_the_key(model, tmp_path):
    runs = TowerRuns(model)
    CLIPAdapter(model, size=None, text_cache=tmp_path).encode_text(VOCAB, TEMPLATES)
    CLIPAdapter(model, size=None, text_cache=tmp_path, tokenizer=OffsetTokenizer(0)).encode_text(VOCAB, TEMPLATES)
    assert runs.count == 2, "another tokenizer class must miss"
    # same class and context length, other vocabulary: told apart by the probe tokens
    shifted = CLIPAdapter(model, size=None, text_cache=tmp_path, tokenizer=OffsetTokenizer(7))
    shifted.encode_text(VOCAB, TEMPLATES)
    assert runs.count == 3 and len(entries(tmp_path)) == 3
    shifted.encode_text(VOCAB, TEMPLATES)
    assert runs.count == 3


def test_method_adapters_take_the_cache(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from dslo.adapters.cass import CASSAdapter
    from dslo.adapters.proxyclip import ProxyCLIPAdapter
    from dslo.adapters.sc_clip import SCCLIPAdapter

    torch.manual_seed(4)
    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, patch_size=4, image_size=16)
    dino = transformers.Dinov2Model(cfg).eval()
    runs = TowerRuns(model)
    first = CLIPAdapter(model, size=None, text_cache=tmp_path).encode_text(VOCAB, TEMPLATES)
    image = torch.rand(1, 3, 16, 24)
    for adapter in (SCCLIPAdapter(model, size=None, slide=None, pre_adjust_idx=0, post_adjust_idx=0,
                                  multi_start_idx=0, multi_end_idx=1, lof_neighbors=3, text_cache=tmp_path),
                    CASSAdapter(model, vfm=dino, size=None, slide=None, text_cache=tmp_path),
                    ProxyCLIPAdapter(model, vfm=dino, size=None, slide=None, text_cache=tmp_path)):
        text = adapter.encode_text(VOCAB, TEMPLATES)
        assert torch.equal(text.features, first.features)
        assert adapter(image, text).logits.shape[1] == 4
    assert runs.count == 1, "the method adapters share the plain CLIP text entry"
