"""CLIP attention provider: tiny random open_clip / timm ViTs checked against direct computations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from dslo.attention import Attention  # noqa: E402
from dslo.attention.clip import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPAttention,
    build_clip,
    clip_attention_maps,
    clip_pixel_values,
    load_clip,
    vision_tower,
)

MODES = ["key-key", "query-key", "query-query"]

TINY_CFG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8),  # 4 heads
    text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1),
)


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CFG).eval()
    # sharper than the default init so attention is far from uniform
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.attn.in_proj_weight.mul_(4)
    return model


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip()


def _image(b=2, h=40, w=30, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_stochastic(att: Attention, grid):
    m = att.matrix
    n = grid[0] * grid[1]
    assert att.grid == grid
    assert m.dtype == torch.float32 and m.shape[1:] == (n, n)
    assert torch.isfinite(m).all() and (m >= 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-5, rtol=0)


def _block_input(visual, pixel_values, index=-1):
    seen = []
    block = visual.transformer.resblocks[index]
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            visual(pixel_values)
    finally:
        handle.remove()
    return seen[0]


def _direct(block, x, mode):
    """From in_proj_weight/in_proj_bias on ln_1(x), all heads at once; (B, T, T) head mean."""
    attn = block.attn
    d = attn.embed_dim
    h = attn.num_heads
    xn = block.ln_1(x)
    qkv = F.linear(xn, attn.in_proj_weight, attn.in_proj_bias)
    q, k = qkv[..., :d], qkv[..., d:2 * d]
    b, t, _ = x.shape
    q = q.view(b, t, h, d // h).transpose(1, 2)
    k = k.view(b, t, h, d // h).transpose(1, 2)
    left, right = {"query-key": (q, k), "key-key": (k, k), "query-query": (q, q)}[mode]
    return torch.softmax(left @ right.transpose(-1, -2) / (d // h) ** 0.5, -1).mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_matches_direct_computation_cls_dropped(clip_model, mode):
    provider = build_clip(model_obj=clip_model, mode=mode)
    assert provider.size == (32, 32) and provider.grid == (4, 4)
    image = _image()
    att = provider(image)
    _assert_stochastic(att, (4, 4))
    assert att.matrix.shape[-1] == 4 * 4  # N == h * w: CLS dropped
    pixel_values = clip_pixel_values(image, (32, 32))
    x = _block_input(clip_model.visual, pixel_values)
    assert x.shape == (2, 1 + 16, 32)
    with torch.no_grad():
        full = _direct(clip_model.visual.transformer.resblocks[-1], x, mode)
    patches = full[:, 1:, 1:]
    torch.testing.assert_close(att.matrix, patches / patches.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert float(att.matrix.max()) > 3.0 / 16


def test_query_key_equals_the_models_own_attention_weights(clip_model):
    """nn.MultiheadAttention's own head-averaged probabilities, asked for explicitly."""
    pixel_values = clip_pixel_values(_image(1), (32, 32))
    x = _block_input(clip_model.visual, pixel_values)
    block = clip_model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        xn = block.ln_1(x)
        _, weights = block.attn(xn, xn, xn, need_weights=True, average_attn_weights=True)
    maps = clip_attention_maps(clip_model, pixel_values, mode="query-key")
    torch.testing.assert_close(maps, weights, atol=1e-5, rtol=1e-4)


def test_modes_differ_and_layer_choice(clip_model):
    image = _image(1)
    maps = {m: build_clip(model_obj=clip_model, mode=m)(image).matrix for m in MODES}
    assert (maps["key-key"] - maps["query-key"]).abs().max() > 1e-3
    assert (maps["query-query"] - maps["key-key"]).abs().max() > 1e-3
    first = build_clip(model_obj=clip_model, layer=0)(image).matrix
    assert (first - maps["key-key"]).abs().max() > 1e-3
    pixel_values = clip_pixel_values(image, (32, 32))
    x = _block_input(clip_model.visual, pixel_values, index=0)
    with torch.no_grad():
        expected = _direct(clip_model.visual.transformer.resblocks[0], x, "key-key")[:, 1:, 1:]
    torch.testing.assert_close(first, expected / expected.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_the_hook_is_removed_and_the_forward_is_stopped(clip_model):
    blocks = clip_model.visual.transformer.resblocks
    ran = []
    handle = blocks[-1].register_forward_hook(lambda *a: ran.append(1))
    try:
        build_clip(model_obj=clip_model)(_image(1))
    finally:
        handle.remove()
    assert ran == []  # stopped at the last block's input
    assert all(not b._forward_pre_hooks for b in blocks)


def test_accepts_the_visual_tower_and_normalises_with_its_mean_std(clip_model):
    a = CLIPAttention(clip_model.visual)(_image(1)).matrix
    b = CLIPAttention(clip_model)(_image(1)).matrix
    torch.testing.assert_close(a, b)
    tower = vision_tower(clip_model)
    assert tower.mean == pytest.approx(OPENAI_CLIP_MEAN) and tower.std == pytest.approx(OPENAI_CLIP_STD)
    c = CLIPAttention(clip_model, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(_image(1)).matrix
    assert (c - b).abs().max() > 1e-4


def test_timm_vision_transformer_with_registers():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
        reg_tokens=2, depth=2,
    ).eval()
    provider = CLIPAttention(model, mode="query-key")
    image = _image(1)
    att = provider(image)
    _assert_stochastic(att, (4, 4))
    assert vision_tower(model).num_prefix_tokens == 3
    # the model's own (non-fused) attention probabilities of the last block
    block = model.blocks[-1]
    seen = []
    handle = block.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(clip_pixel_values(image, (32, 32), mean=provider.mean, std=provider.std))
    finally:
        handle.remove()
    attn = block.attn
    b, t, _ = seen[0].shape
    qkv = attn.qkv(seen[0]).view(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(attn.q_norm(qkv[0]) * attn.scale @ attn.k_norm(qkv[1]).transpose(-1, -2), -1)
    patches = probs.mean(1)[:, 3:, 3:]
    torch.testing.assert_close(att.matrix, patches / patches.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_local_directory_with_forced_image_size(tmp_path, clip_model):
    from safetensors.torch import save_file

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_file(clip_model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    provider = build_clip(model=str(tmp_path), size=64, device="cpu")
    assert provider.size == (64, 64) and provider.grid == (8, 8)
    assert provider.model.visual.positional_embedding.shape == (1 + 64, 32)  # interpolated
    _assert_stochastic(provider(_image(1, 50, 70)), (8, 8))
    # the same weights at the native size give the same maps as the in-memory model
    native = build_clip(model="local-dir:" + str(tmp_path), size=32, device="cpu")
    torch.testing.assert_close(native(_image(1)).matrix, build_clip(model_obj=clip_model)(_image(1)).matrix)
    assert build_clip(model=str(tmp_path), size=64, device="cpu").model is provider.model  # cached


def test_bad_inputs(clip_model, tmp_path, monkeypatch):
    provider = build_clip(model_obj=clip_model)
    with pytest.raises(ValueError, match="3 channels"):
        provider(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        provider(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="mode"):
        build_clip(model_obj=clip_model, mode="value-value")
    with pytest.raises(ValueError, match="layer"):
        build_clip(model_obj=clip_model, layer=2)
    with pytest.raises(ValueError, match="force_image_size"):
        build_clip(model_obj=clip_model, size=64)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        build_clip(model_obj=clip_model, size=36)
    with pytest.raises(ValueError, match="not a supported vision transformer"):
        CLIPAttention(torch.nn.Linear(2, 2))
    # weights
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_clip(str(tmp_path))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("ViT-Nope-99", "openai")
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        load_clip("ViT-B-16", "no-such-tag")
    with pytest.raises(ValueError, match="random weights"):
        load_clip("ViT-B-16", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="not in the local cache"):
        load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not in the local cache"):
        load_clip("hf-hub:dslo-test/no-such-clip", cache_dir=str(tmp_path / "cache"))
