"""Patch features in the Attention record: validation, grid resampling, the DINOv2 provider's
value projections, and the on-disk cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dslo.integrations.cache import AttentionCache, CachedProvider
from dslo.refiners.grid import resample_attention
from dslo.refiners.records import Attention


def _attention(b=2, grid=(3, 4), d=5, seed=0, features=True) -> Attention:
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    feats = torch.randn(b, n, d, generator=g) if features else None
    return Attention.from_scores(torch.rand(b, n, n, generator=g), grid, "test", feats)


# ------------------------------------------------------------------------ the record


def test_features_are_optional_and_stored():
    att = _attention()
    assert att.features.shape == (2, 12, 5)
    assert _attention(features=False).features is None
    m = att.matrix
    assert Attention(m, (3, 4)).features is None
    assert Attention(m, (3, 4), "x", att.features).features is att.features
    assert Attention._trusted(m, (3, 4), "x", features=att.features).features is att.features


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 11, 5), r"\(2, 12, D >= 1\)"),  # wrong N
        ((1, 12, 5), r"\(2, 12, D >= 1\)"),  # wrong batch
        ((2, 12, 0), r"D >= 1"),  # no channels
        ((2, 12), r"3 dimensions"),
    ],
)
def test_features_shape_is_checked(shape, match):
    m = _attention(features=False).matrix
    bad = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        Attention(m, (3, 4), "", bad)
    with pytest.raises(ValueError, match=match):
        Attention.from_scores(m, (3, 4), "", bad)
    with pytest.raises(ValueError, match=match):
        Attention._trusted(m, (3, 4), "", bad)


def test_features_must_be_finite_floats():
    m = _attention(features=False).matrix
    nan = torch.zeros(2, 12, 5)
    nan[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="Attention.features: expected finite"):
        Attention(m, (3, 4), "", nan)
    with pytest.raises(ValueError, match="floating"):
        Attention(m, (3, 4), "", torch.zeros(2, 12, 5, dtype=torch.int64))


# ------------------------------------------------------------------------ grid resampling


def test_resample_carries_features_bilinearly():
    att = _attention(grid=(3, 4), d=5)
    out = resample_attention(att, (5, 7))
    fmap = att.features.transpose(1, 2).reshape(2, 5, 3, 4)
    expected = F.interpolate(fmap, size=(5, 7), mode="bilinear", align_corners=False)
    expected = expected.reshape(2, 5, 35).transpose(1, 2)
    assert out.features.shape == (2, 35, 5)
    torch.testing.assert_close(out.features, expected)
    # a constant feature map stays constant (bilinear weights sum to 1)
    const = Attention(att.matrix, (3, 4), "", torch.ones(2, 12, 5))
    torch.testing.assert_close(resample_attention(const, (2, 9)).features, torch.ones(2, 18, 5))


def test_resample_keeps_missing_features_and_same_grid():
    att = _attention()
    assert resample_attention(att, (3, 4)) is att
    assert resample_attention(_attention(features=False), (6, 2)).features is None
    f64 = Attention(att.matrix, (3, 4), "", att.features.double())
    assert resample_attention(f64, (4, 4)).features.dtype == torch.float64


# ------------------------------------------------------------------------ the cache


def test_cache_round_trip_keeps_features(tmp_path):
    att = _attention()
    calls = []

    def provider(image):
        calls.append(1)
        return att

    cached = CachedProvider(provider, AttentionCache(tmp_path), "fake")
    image = torch.rand(2, 3, 8, 8)
    first = cached(image)
    second = cached(image)
    assert len(calls) == 1
    assert second.features is not None
    torch.testing.assert_close(second.features, att.features)
    torch.testing.assert_close(second.matrix, first.matrix)
    # entries without features load too
    plain = CachedProvider(lambda image: _attention(features=False), AttentionCache(tmp_path), "plain")
    plain(image)
    assert plain(image).features is None and plain.cache.hits == 1


def test_cache_key_depends_on_provider_description():
    image = torch.rand(1, 3, 4, 4)
    assert AttentionCache.key("dinov2 features=value", image) != AttentionCache.key("dinov2", image)


# ------------------------------------------------------------------------ DINOv2 provider

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
        patch_size=14, image_size=56, initializer_range=0.3,
    )
    return transformers.Dinov2Model(config).eval()


@pytest.mark.parametrize("kind, proj", [("value", "v_proj"), ("key", "k_proj"), ("query", "q_proj")])
def test_dinov2_features_are_last_block_projections(tiny_model, kind, proj):
    from dslo.attention.dinov2 import DINOv2Attention, dinov2_pixel_values

    image = torch.rand(2, 3, 50, 77, generator=torch.Generator().manual_seed(3))
    provider = DINOv2Attention(tiny_model, size=None, features=kind)
    att = provider(image)
    assert att.grid == (4, 6)
    # manual: the last block's input is the second-to-last hidden state; the projection acts
    # on its pre-attention layer norm; CLS dropped
    pixels, _ = dinov2_pixel_values(image, size=None)
    with torch.no_grad():
        hidden = tiny_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        block = tiny_model.encoder.layer[-1]
        attention = block.attention
        linear = getattr(attention, proj, None) or getattr(
            attention.attention, {"v_proj": "value", "k_proj": "key", "q_proj": "query"}[proj])
        expected = linear(block.norm1(hidden))[:, 1:, :]
    assert att.features.shape == (2, 24, 32) and att.features.dtype == torch.float32
    torch.testing.assert_close(att.features, expected, atol=1e-5, rtol=1e-5)
    assert f"features={kind}" in provider.source


def test_dinov2_features_option(tiny_model):
    from dslo.attention.dinov2 import DINOv2Attention

    image = torch.rand(1, 3, 28, 28)
    none = DINOv2Attention(tiny_model, size=None, features=None)
    assert none(image).features is None and "features" not in none.source
    default = DINOv2Attention(tiny_model, size=None)
    assert default.features == "value"
    torch.testing.assert_close(default(image).matrix, none(image).matrix)
    with pytest.raises(ValueError, match="features"):
        DINOv2Attention(tiny_model, features="values")
