"""SD2 attention provider: a tiny random UNet/VAE/text encoder in the diffusers layout."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from dslo.attention import Attention, resample_attention  # noqa: E402
from dslo.attention.sd2 import (  # noqa: E402
    DEFAULT_BLOCKS,
    SD2Attention,
    build_sd2,
    empty_prompt_embeds,
    load_sd2,
    sd2_input_size,
    sd2_latents,
    self_attention_modules,
    unet_self_attention,
    unet_self_attention_levels,
)

CROSS_DIM = 32
#: one self-attention module of the finest default level (up_blocks.2 works at the latent size)
MODULE = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"


def tiny_unet(seed: int = 0):
    """SD2's UNet structure shrunk: CrossAttn down blocks then a plain one, the mirror going up,
    so up_blocks.0 has no attention and up_blocks.1 / up_blocks.2 are the default levels."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=2,  # the number of heads, in diffusers' UNet naming
        sample_size=8,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    # larger weights than the default init so attention is far from uniform
    with torch.no_grad():
        for name, module in self_attention_modules(unet).items():
            module.to_q.weight.mul_(8)
            module.to_k.weight.mul_(8)
    return unet.eval()


def tiny_vae(seed: int = 1):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16),  # factor 2
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def save_tokenizer(path):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "a": 4}
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), pad_token="!", model_max_length=8
    )
    tok.save_pretrained(path)


def tiny_text_encoder(seed: int = 2):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=5, hidden_size=CROSS_DIM, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
        pad_token_id=2,
    )
    return transformers.CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def parts():
    return tiny_vae(), tiny_unet()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, parts):
    """A diffusers-layout directory: vae/, unet/, text_encoder/, tokenizer/."""
    vae, unet = parts
    root = tmp_path_factory.mktemp("tiny-sd2")
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    tiny_text_encoder().save_pretrained(root / "text_encoder")
    save_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def no_text_dir(tmp_path_factory, parts):
    vae, unet = parts
    root = tmp_path_factory.mktemp("tiny-sd2-no-text")
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    return root


def _image(b=2, h=30, w=45, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _latents(b=2, h=16, w=8, seed=0):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _prompt(seed=3):
    return torch.randn(1, 8, CROSS_DIM, generator=torch.Generator().manual_seed(seed))


def _assert_stochastic(att: Attention, grid):
    m = att.matrix
    n = grid[0] * grid[1]
    assert att.grid == grid
    assert m.dtype == torch.float32 and m.shape[1:] == (n, n)
    assert torch.isfinite(m).all() and (m >= 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-5, rtol=0)


def _processor_state(unet):
    return {k: (type(v), id(v)) for k, v in unet.attn_processors.items()}


def _direct(module, hidden, mode):
    """Head-averaged softmax(q k^T * scale) from the module's own weights, diffusers' way."""
    q = module.to_q(hidden)
    k = module.to_k(hidden)
    left = module.head_to_batch_dim(q if mode == "query-key" else k)
    right = module.head_to_batch_dim(k)
    probs = module.get_attention_scores(left, right)  # (B * heads, N, N)
    b, n = hidden.shape[:2]
    return probs.view(b, module.heads, n, n).mean(1)


# ------------------------------------------------------------------------ sizes


def test_input_size_keeps_aspect_and_rounds_to_the_multiple():
    assert sd2_input_size(512, 512) == (512, 512)
    assert sd2_input_size(480, 640) == (384, 512)
    assert sd2_input_size(100, 1000, resolution=512) == (64, 512)  # at least one multiple
    assert sd2_input_size(33, 47, resolution=None, multiple=8) == (32, 48)
    assert sd2_input_size(10, 10, resolution=(128, 256)) == (128, 256)
    with pytest.raises(ValueError, match="multiples of 64"):
        sd2_input_size(10, 10, resolution=(100, 128))
    with pytest.raises(ValueError, match="resolution"):
        sd2_input_size(10, 10, resolution=0)


def test_latents_are_the_scaled_posterior_mean(parts):
    vae, _ = parts
    image = _image(1, 16, 16)
    lat = sd2_latents(vae, image, size=(16, 16))
    with torch.no_grad():
        expected = vae.encode(image * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    assert lat.shape == (1, 4, 8, 8)
    torch.testing.assert_close(lat, expected)
    torch.testing.assert_close(sd2_latents(vae, image, size=(16, 16)), lat)  # no noise


# ------------------------------------------------------------------------ capture


@pytest.mark.parametrize("mode", ["key-key", "query-key"])
def test_capture_matches_direct_computation(parts, mode):
    _, unet = parts
    module = unet.get_submodule(MODULE)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        att = unet_self_attention(unet, _latents(), _prompt(), blocks=MODULE, mode=mode)
    finally:
        handle.remove()
    assert len(seen) == 1
    hidden = seen[0]
    assert hidden.shape == (2, 16 * 8, 32)
    with torch.no_grad():
        expected = _direct(module, hidden, mode)
    _assert_stochastic(att, (16, 8))
    torch.testing.assert_close(att.matrix, expected, atol=1e-5, rtol=1e-4)
    # the map is not uniform: the check above would be vacuous otherwise
    assert float(att.matrix.max()) > 5.0 / att.matrix.shape[-1]


@pytest.mark.parametrize("chunk_bytes", [1, 10**9])  # one head at a time; all heads at once
@pytest.mark.parametrize("mode", ["key-key", "query-key"])
def test_capture_processor_heads_chunks_and_mask(monkeypatch, chunk_bytes, mode):
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    from diffusers.models.attention_processor import AttnProcessor

    import dslo.attention.sd2 as sd2

    monkeypatch.setattr(sd2, "_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    attn = DiffusersAttention(24, heads=4, dim_head=6).eval()
    with torch.no_grad():
        attn.to_q.weight.mul_(4)
        attn.to_k.weight.mul_(4)
    x = torch.randn(2, 10, 24)
    mask = torch.zeros(2, 1, 10)
    mask[0, 0, 7:] = -10000.0  # image 0 may not attend to its last three tokens
    sink = sd2._Sink()
    proc = sd2.SelfAttentionCapture(AttnProcessor(), sink, 0.25, mode, [0], 0, "attn")
    with torch.no_grad():
        out = proc(attn, x, attention_mask=mask)
        torch.testing.assert_close(out, AttnProcessor()(attn, x, attention_mask=mask))
        q = attn.head_to_batch_dim(attn.to_q(x) if mode == "query-key" else attn.to_k(x))
        k = attn.head_to_batch_dim(attn.to_k(x))
        full_mask = attn.prepare_attention_mask(mask, 10, 2)
        expected = attn.get_attention_scores(q, k, full_mask).view(2, 4, 10, 10).mean(1)
    assert list(sink.maps) == [10] and sink.weights == {10: 0.25}
    torch.testing.assert_close(sink.maps[10] / 0.25, expected, atol=1e-5, rtol=1e-4)
    assert float(sink.maps[10][0, :, 7:].max()) < 1e-6


def test_key_key_differs_from_query_key(parts):
    _, unet = parts
    kk = unet_self_attention(unet, _latents(1), _prompt(), blocks=MODULE, mode="key-key").matrix
    qk = unet_self_attention(unet, _latents(1), _prompt(), blocks=MODULE, mode="query-key").matrix
    assert (kk - qk).abs().max() > 1e-3


def test_default_blocks_resample_and_weigh_levels(parts):
    _, unet = parts
    lat, prompt = _latents(1, 16, 16), _prompt()
    att = unet_self_attention(unet, lat, prompt)
    _assert_stochastic(att, (16, 16))  # up_blocks.2 works at the latent size
    levels = unet_self_attention_levels(unet, lat, prompt)
    assert [(g, round(w, 6)) for g, w, _ in levels] == [((16, 16), 0.5), ((8, 8), 0.5)]
    # each level = average of its transformer blocks, each block checked separately
    up1 = [n for n in self_attention_modules(unet) if n.startswith("up_blocks.1.")]
    assert len(up1) == 2
    maps = [unet_self_attention(unet, lat, prompt, blocks=n).matrix for n in up1]
    torch.testing.assert_close(levels[1][2], (maps[0] + maps[1]) / 2, atol=1e-6, rtol=1e-5)
    coarse = resample_attention(Attention(levels[1][2], (8, 8)), (16, 16)).matrix
    expected = 0.5 * levels[0][2] + 0.5 * coarse
    torch.testing.assert_close(att.matrix, expected / expected.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    # an explicit grid and unequal weights
    att2 = unet_self_attention(unet, lat, prompt, blocks={"up_blocks.1": 3, "up_blocks.2": 1}, grid=(8, 8))
    _assert_stochastic(att2, (8, 8))


def test_stop_early_gives_the_same_maps_and_the_unet_output_is_unchanged(parts):
    _, unet = parts
    lat, prompt = _latents(1), _prompt()
    with torch.no_grad():
        plain = unet(lat, 0, encoder_hidden_states=prompt).sample
    outputs = []
    handle = unet.register_forward_hook(lambda m, i, o: outputs.append(o[0]))
    try:
        full = unet_self_attention(unet, lat, prompt, stop_early=False)
        early = unet_self_attention(unet, lat, prompt, stop_early=True)
    finally:
        handle.remove()
    assert len(outputs) == 1  # the early-stopped run never finished the forward pass
    torch.testing.assert_close(outputs[0], plain)
    torch.testing.assert_close(full.matrix, early.matrix)


def test_processors_restored_after_the_call_and_after_an_error(parts):
    _, unet = parts
    before = _processor_state(unet)
    unet_self_attention(unet, _latents(1), _prompt())
    assert _processor_state(unet) == before

    def boom(*_):
        raise RuntimeError("boom")

    handle = unet.up_blocks[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            unet_self_attention(unet, _latents(1), _prompt())
    finally:
        handle.remove()
    assert _processor_state(unet) == before


def test_timestep_changes_the_maps(parts):
    _, unet = parts
    a = unet_self_attention(unet, _latents(1), _prompt(), timestep=0).matrix
    b = unet_self_attention(unet, _latents(1), _prompt(), timestep=900).matrix
    assert (a - b).abs().max() > 1e-4


# ------------------------------------------------------------------------ provider + weights


def test_provider_from_directory_with_text_encoder(weights_dir):
    provider = build_sd2(str(weights_dir), resolution=32, device="cpu")
    assert isinstance(provider, SD2Attention)
    assert provider.blocks == dict(DEFAULT_BLOCKS)
    image = _image(2, 30, 45)
    att = provider(image)
    # long side 45 -> 32, short 30 -> 21.3 -> 24 (multiple of 2 * 4 = 8); latent 12 x 16
    _assert_stochastic(att, (12, 16))
    assert att.matrix.device == image.device
    # the empty-prompt embedding is the text encoder's output on ""
    tok = transformers.CLIPTokenizer.from_pretrained(weights_dir / "tokenizer")
    enc = transformers.CLIPTextModel.from_pretrained(weights_dir / "text_encoder")
    torch.testing.assert_close(provider.prompt_embeds, empty_prompt_embeds(enc, tok))
    assert provider.prompt_embeds.shape == (1, 8, CROSS_DIM)
    # same result through the latents entry point
    lat = sd2_latents(provider.vae, image, size=(24, 32))
    torch.testing.assert_close(provider.from_latents(lat).matrix, att.matrix)
    # the loader caches: a second build shares the modules
    assert build_sd2(str(weights_dir), resolution=32, device="cpu").unet is provider.unet


def test_provider_zero_prompt_and_precomputed_prompt(no_text_dir):
    with pytest.raises(ValueError, match="text_encoder/"):
        build_sd2(str(no_text_dir), device="cpu")
    zeros = build_sd2(str(no_text_dir), empty_prompt="zeros", resolution=32, device="cpu", mode="query-key")
    assert torch.equal(zeros.prompt_embeds, torch.zeros(1, 77, CROSS_DIM))
    _assert_stochastic(zeros(_image(1, 32, 32)), (16, 16))
    given = build_sd2(str(no_text_dir), prompt_embeds=_prompt(), resolution=32, device="cpu")
    torch.testing.assert_close(given.prompt_embeds, _prompt())
    with pytest.raises(ValueError, match="empty_prompt"):
        build_sd2(str(no_text_dir), empty_prompt="nothing")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_bad_inputs(parts, no_text_dir, tmp_path, monkeypatch):
    vae, unet = parts
    provider = SD2Attention(vae, unet, resolution=32)
    with pytest.raises(ValueError, match="3 channels"):
        provider(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="4 dimensions"):
        provider(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        provider(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="no self-attention module under 'up_blocks.7'"):
        SD2Attention(vae, unet, blocks="up_blocks.7")
    with pytest.raises(ValueError, match="no self-attention module under 'up_blocks.0'"):
        SD2Attention(vae, unet, blocks={"up_blocks.0": 1.0})  # UpBlock2D: no attention
    with pytest.raises(ValueError, match="overlap"):
        unet_self_attention(unet, _latents(1), _prompt(), blocks=["up_blocks.2", MODULE])
    with pytest.raises(ValueError, match="weight"):
        SD2Attention(vae, unet, blocks={"up_blocks.1": -1.0})
    with pytest.raises(ValueError, match="mode"):
        SD2Attention(vae, unet, mode="value-value")
    with pytest.raises(ValueError, match="multiples of 4"):
        unet_self_attention(unet, _latents(1, 10, 8), _prompt())
    with pytest.raises(ValueError, match="4 channels"):
        unet_self_attention(unet, torch.randn(1, 3, 8, 8), _prompt())
    with pytest.raises(ValueError, match="last dimension 32"):
        unet_self_attention(unet, _latents(1), torch.zeros(1, 8, 7))
    with pytest.raises(ValueError, match="prompt_embeds"):
        SD2Attention(vae, unet, prompt_embeds=torch.zeros(1, 8, 7))
    # weights
    with pytest.raises(ValueError, match="not an existing directory"):
        load_sd2(str(tmp_path / "missing" / "sd2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="lacks vae/, unet/"):
        load_sd2(str(tmp_path / "empty"), text_encoder=False)
    with pytest.raises(ValueError, match="unknown weights"):
        load_sd2("not a repo id!")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="missing weights: SD2 'dslo-test/no-such-sd2-repo' is not in the Hugging "
                       "Face cache and HF_HUB_OFFLINE is set; download it") as err:
        load_sd2("dslo-test/no-such-sd2-repo", text_encoder=False, device="cpu")
    assert "\n" not in str(err.value) and "--attention affinity" in str(err.value)


def test_processors_keep_their_type_through_a_provider_call(parts):
    vae, unet = parts
    original = unet.attn_processors
    unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor())
    try:
        before = _processor_state(unet)
        SD2Attention(vae, unet, resolution=32)(_image(1, 32, 32))
        assert _processor_state(unet) == before
        assert {t for t, _ in before.values()} == {diffusers.models.attention_processor.AttnProcessor}
    finally:
        unet.set_attn_processor(dict(original))


# ------------------------------------------------------------------------ real SD2 structure


SD2_BASE_UNET = dict(
    act_fn="silu",
    attention_head_dim=(5, 10, 20, 20),
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    use_linear_projection=True,
)


@pytest.mark.slow
def test_sd2_base_structure_grids_at_512px():
    """The grid of every self-attention level of the real SD2-base UNet at a 64 x 64 latent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = diffusers.UNet2DConditionModel(**SD2_BASE_UNET).eval()
    names = self_attention_modules(unet)
    blocks = {}
    for name in names:
        parts = name.split(".")
        blocks.setdefault(".".join(parts[:2]) if parts[0].endswith("_blocks") else parts[0], 0)
    assert sorted(blocks) == [
        "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
        "up_blocks.1", "up_blocks.2", "up_blocks.3",
    ]
    grids = {}
    for block in blocks:
        levels = unet_self_attention_levels(
            unet, torch.randn(1, 4, 64, 64), torch.zeros(1, 77, 1024), blocks=block
        )
        assert len(levels) == 1
        grids[block] = levels[0][0]
        heads = {names[n].heads for n in names if n.startswith(block + ".")}
        grids[block + ":heads"] = heads
    assert grids == {
        "down_blocks.0": (64, 64), "down_blocks.0:heads": {5},
        "down_blocks.1": (32, 32), "down_blocks.1:heads": {10},
        "down_blocks.2": (16, 16), "down_blocks.2:heads": {20},
        "mid_block": (8, 8), "mid_block:heads": {20},
        "up_blocks.1": (16, 16), "up_blocks.1:heads": {20},
        "up_blocks.2": (32, 32), "up_blocks.2:heads": {10},
        "up_blocks.3": (64, 64), "up_blocks.3:heads": {5},
    }
    assert sum(n.startswith("up_blocks.1.") for n in names) == 3
