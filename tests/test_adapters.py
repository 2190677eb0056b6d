"""Adapters: vocabulary, text encoding, plain CLIP logits, hooks and wrap.

Models are tiny random-initialised open_clip ViTs; reference computations are written here
from the equations (float64, raw parameters), never with the adapters' helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")

from dslo import Attention, DiscrepancyRefiner, PatchLogits  # noqa: E402
from dslo.adapters import (BENCHMARKS, IMAGENET_TEMPLATES, HookAdapter, TextFeatures,  # noqa: E402
                           build_adapter, load_class_names, wrap)
from dslo.adapters.base import input_size, slide_windows  # noqa: E402
from dslo.adapters.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPAdapter  # noqa: E402

# ----------------------------------------------------------------------------- fixtures


def tiny_clip(seed: int = 0, layers: int = 5) -> nn.Module:
    """Width 64, 4 heads of 16, patch 8 on a native 4 x 4 grid, text vocab of the real BPE."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=layers, width=64, head_width=16, patch_size=8, image_size=32),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model.eval()


@pytest.fixture(scope="module")
def clip_model() -> nn.Module:
    return tiny_clip()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 40, 56, generator=g)  # non-square: a 5 x 7 grid at patch 8


def random_text(q: int = 4, d: int = 32, seed: int = 2) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    return TextFeatures.from_features(torch.randn(q, d, generator=g))


# ----------------------------------------------------------------------------- references


def ln(x: torch.Tensor, mod: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), mod.weight.double(), mod.bias.double(), mod.eps)


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, h, d // h).transpose(1, 2)


def merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, c = t.shape
    return t.transpose(1, 2).reshape(b, n, h * c)


def ref_qkv(blk, y):
    w, bias = blk.attn.in_proj_weight.double(), blk.attn.in_proj_bias.double()
    q, k, v = (y @ w.T + bias).chunk(3, dim=-1)
    h = blk.attn.num_heads
    return heads(q, h), heads(k, h), heads(v, h)


def ref_out(blk, o):
    return merge(o) @ blk.attn.out_proj.weight.double().T + blk.attn.out_proj.bias.double()


def ref_mlp(blk, y):
    hidden = F.gelu(y @ blk.mlp.c_fc.weight.double().T + blk.mlp.c_fc.bias.double())
    return hidden @ blk.mlp.c_proj.weight.double().T + blk.mlp.c_proj.bias.double()


def ref_block(blk, x):
    """x + MHA(ln_1 x); x + MLP(ln_2 x): the standard pre-norm residual block."""
    q, k, v = ref_qkv(blk, ln(x, blk.ln_1))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    x = x + ref_out(blk, a @ v)
    return x + ref_mlp(blk, ln(x, blk.ln_2))


def ref_embed(visual, pixels):
    """Patch embedding + class token + bicubically resized positions + ln_pre (float64)."""
    w = visual.conv1.weight.double()
    x = F.conv2d(pixels.double(), w, stride=w.shape[-1])
    gh, gw = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding.double()
    g0 = int(round(math.sqrt(pos.shape[0] - 1)))
    grid = pos[1:].reshape(g0, g0, -1).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    grid = grid[0].permute(1, 2, 0).reshape(gh * gw, -1)
    cls = visual.class_embedding.double().expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + torch.cat([pos[:1], grid], 0)
    return ln(x, visual.ln_pre), (gh, gw)


def clip_pixels(image):
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (image - mean) / std


def ref_head(visual, tokens):
    return ln(tokens, visual.ln_post) @ visual.proj.double()


def ref_cos(features, text, grid):
    """features (B, N, E), text (Q, E) -> (B, Q, h, w)."""
    f = F.normalize(features, dim=-1)
    t = F.normalize(text.double(), dim=-1)
    return (f @ t.T).transpose(1, 2).reshape(f.shape[0], -1, *grid)


def ref_clip_logits(model, image, text, last_block):
    vis = model.visual
    x, grid = ref_embed(vis, clip_pixels(image))
    blocks = list(vis.transformer.resblocks)
    for blk in blocks[:-1]:
        x = ref_block(blk, x)
    blk = blocks[-1]
    if last_block == "vanilla":
        x = ref_block(blk, x)
    else:
        _, _, v = ref_qkv(blk, ln(x, blk.ln_1))
        value = ref_out(blk, v)  # out_proj(W_v ln_1(x) + b_v), no token mixing
        if last_block == "maskclip":
            x = x + value
            x = x + ref_mlp(blk, ln(x, blk.ln_2))
        else:
            x = value
    return ref_cos(ref_head(vis, x[:, 1:]), text, grid)


# ----------------------------------------------------------------------------- vocabulary


def test_class_name_files_have_the_benchmark_sizes():
    sizes = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81,
             "coco_stuff": 171, "cityscapes": 19, "ade20k": 150}
    for name, count in sizes.items():
        classes = load_class_names(name)
        assert len(classes) == count, name
        assert all(names and all(n and n == n.strip() for n in names) for names in classes)
    voc = load_class_names("voc21")
    assert len(voc[0]) > 10 and voc[0][:2] == ["sky", "wall"]  # background as stuff synonyms
    assert voc[15][0] == "person" and len(voc[15]) == 7
    assert load_class_names("voc21_proxyclip")[15] == ["person"]
    assert load_class_names("cls_city_scapes") == load_class_names("cityscapes")
    assert load_class_names("coco-stuff") == load_class_names("coco_stuff")
    assert set(sizes) <= set(BENCHMARKS)


def test_class_name_file_formats(tmp_path):
    comma = tmp_path / "a.txt"
    comma.write_text("background, sky\ncat\ntv monitor, screen\n\n")
    semi = tmp_path / "b.txt"
    semi.write_text("background; sky\ncat\ntv monitor; screen")
    expected = [["background", "sky"], ["cat"], ["tv monitor", "screen"]]
    assert load_class_names(comma) == expected
    assert load_class_names(str(semi)) == expected
    bad = tmp_path / "c.txt"
    bad.write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="line 2"):
        load_class_names(bad)
    with pytest.raises(ValueError, match="known"):
        load_class_names("voc22")
    with pytest.raises(ValueError, match="does not exist"):
        load_class_names(tmp_path / "missing.txt")


def test_templates_are_clips_eighty():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET_TEMPLATES) == 80
    assert IMAGENET_TEMPLATES == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def test_default_tokenizer_needs_no_download():
    tok = open_clip.get_tokenizer("ViT-B-16")
    tokens = tok(["a photo of a cat.", "a dog"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert int(tokens[0, 0]) == 49406  # <start_of_text> from the bundled BPE vocabulary


# ----------------------------------------------------------------------------- text


def test_encode_text_is_the_prompt_ensemble(clip_model):
    adapter = CLIPAdapter(clip_model, size=None)
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    text = adapter.encode_text([["cat", "kitty"], "dog"], templates=templates)
    assert text.class_names == (("cat", "kitty"), ("dog",))
    assert text.query_to_class.tolist() == [0, 0, 1] and text.num_classes == 2
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        for row, name in enumerate(["cat", "kitty", "dog"]):
            emb = clip_model.encode_text(tok([t.format(name) for t in templates])).double()
            ref = F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(text.features[row].double(), ref, atol=1e-5, rtol=0)
    assert len(adapter.encode_text("voc20", templates=["{}"]).class_names) == 20
    with pytest.raises(ValueError, match="templates"):
        adapter.encode_text(["cat"], templates=["no placeholder"])
    with pytest.raises(ValueError, match="class"):
        adapter.encode_text([[]])


# ----------------------------------------------------------------------------- plain CLIP


@pytest.mark.parametrize("last_block", ["maskclip", "vanilla", "value-only"])
def test_clip_patch_logits_match_reference(clip_model, image, last_block):
    text = random_text()
    adapter = CLIPAdapter(clip_model, size=None, last_block=last_block)
    out = adapter(image, text)
    assert isinstance(out, PatchLogits)
    assert out.logits.shape == (2, 4, 5, 7) and out.grid == (5, 7)
    ref = ref_clip_logits(clip_model, image, text.features, last_block)
    torch.testing.assert_close(out.logits.double(), ref, atol=1e-5, rtol=0)


def test_clip_resizes_short_side_to_patch_multiples(clip_model, image):
    assert input_size(40, 56, 48, 8) == (48, 64)  # 48 x 67.2 -> multiples of 8
    assert input_size(40, 56, (30, 70), 8) == (32, 72)
    assert input_size(5, 3, None, 8) == (8, 8)
    adapter = CLIPAdapter(clip_model, size=48)
    out = adapter(image, random_text())
    assert out.grid == (6, 8)
    resized = F.interpolate(image, size=(48, 64), mode="bilinear", align_corners=False, antialias=False)
    ref = ref_clip_logits(clip_model, resized, random_text().features, "maskclip")
    torch.testing.assert_close(out.logits.double(), ref, atol=1e-5, rtol=0)


def test_clip_sliding_windows_average_on_the_patch_grid(clip_model, image):
    text = random_text()
    slid = CLIPAdapter(clip_model, size=None, slide=(32, 16))(image, text).logits
    whole = CLIPAdapter(clip_model, size=None)
    total = torch.zeros(2, 4, 5, 7, dtype=torch.float64)
    count = torch.zeros(1, 1, 5, 7, dtype=torch.float64)
    boxes = slide_windows(40, 56, 32, 16)
    assert boxes == [(0, 32, 0, 32), (0, 32, 16, 48), (0, 32, 24, 56),
                     (8, 40, 0, 32), (8, 40, 16, 48), (8, 40, 24, 56)]
    for y0, y1, x0, x1 in boxes:
        part = whole(image[:, :, y0:y1, x0:x1], text).logits.double()
        total[:, :, y0 // 8:y1 // 8, x0 // 8:x1 // 8] += part
        count[:, :, y0 // 8:y1 // 8, x0 // 8:x1 // 8] += 1
    torch.testing.assert_close(slid.double(), total / count, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiples"):
        CLIPAdapter(clip_model, size=None, slide=(30, 16))(image, text)


def test_clip_adapter_checks_inputs(clip_model, image):
    adapter = CLIPAdapter(clip_model, size=None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adapter(image * 255, random_text())
    with pytest.raises(ValueError, match="3 channels"):
        adapter(image[:, :2], random_text())
    with pytest.raises(ValueError, match="last_block"):
        CLIPAdapter(clip_model, last_block="clearclip")
    with pytest.raises(ValueError, match="open_clip"):
        CLIPAdapter(nn.Linear(2, 2))
    # class names instead of TextFeatures are encoded on the fly
    out = adapter(image, [["cat", "kitty"], "dog"])
    assert out.logits.shape == (2, 3, 5, 7) and out.per_class().shape == (2, 2, 5, 7)


def test_build_adapter_dispatch(clip_model):
    from dslo.adapters import OVSSAdapter

    adapter = build_adapter("CLIP", model=clip_model, size=None)
    assert isinstance(adapter, CLIPAdapter) and isinstance(adapter, OVSSAdapter)
    with pytest.raises(ValueError, match=r"known: \['cass', 'clip', 'prototype', 'proxyclip', 'sc-clip'\]"):
        build_adapter("lseg")
    with pytest.raises(ValueError, match="cannot build open_clip model"):
        build_adapter("clip", model="no-such-model", pretrained=None)


def test_clip_from_a_name_and_a_local_checkpoint(tmp_path, clip_model, image):
    """open_clip name + checkpoint path (what a user with downloaded weights does)."""
    import json

    config = dict(embed_dim=32, vision_cfg=dict(layers=5, width=64, head_width=16, patch_size=8, image_size=32),
                  text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    (tmp_path / "dslo-tiny-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(clip_model.state_dict(), checkpoint)
    named = build_adapter("clip", model="dslo-tiny-test", pretrained=str(checkpoint), size=None)
    direct = CLIPAdapter(clip_model, size=None)
    text = named.encode_text(["cat", "dog"], templates=["a photo of a {}."])
    torch.testing.assert_close(text.features, direct.encode_text(["cat", "dog"], templates=["a photo of a {}."]).features)
    torch.testing.assert_close(named(image, text).logits, direct(image, text).logits)
    with pytest.raises(ValueError, match="local checkpoint"):
        build_adapter("clip", model="dslo-tiny-test", pretrained=str(tmp_path / "missing.pt"))


def test_baseline_labels_follow_the_peers_postprocessing():
    from dslo.adapters import PEER_POSTPROCESS, baseline_labels

    g = torch.Generator().manual_seed(0)
    logits = 0.2 + 0.05 * torch.randn(1, 4, 3, 4, generator=g)  # queries: bg, cat, kitty, dog
    patch = PatchLogits(logits, torch.tensor([0, 1, 1, 2]))
    labels = baseline_labels(patch, (6, 8), logit_scale=50.0)
    up = F.interpolate(logits, size=(6, 8), mode="bilinear", align_corners=False)
    probs = torch.softmax(50 * up, 1)
    per_class = torch.stack([probs[:, 0], probs[:, 1:3].amax(1), probs[:, 3]], 1)
    assert torch.equal(labels, per_class.argmax(1))
    best = per_class.amax(1)
    thd = float(best.median())
    assert torch.equal(baseline_labels(patch, (6, 8), logit_scale=50.0, prob_thd=thd),
                       torch.where(best < thd, 0, per_class.argmax(1)))
    # the area filter drops a foreground class covering <= 40 % of the foreground
    counts = torch.bincount(per_class.argmax(1).flatten(), minlength=3)[1:].float()
    small = int(torch.argmin(counts)) + 1
    assert counts.min() <= 0.4 * counts.sum()
    filtered = baseline_labels(patch, (6, 8), logit_scale=50.0, area_thd=0.4)
    assert not bool((filtered == small).any()) and bool((filtered == 3 - small).any())
    assert PEER_POSTPROCESS[("sc-clip", "voc21")]["area_thd"] == 0.1


# ----------------------------------------------------------------------------- hooks


class ToySegmentor(nn.Module):
    """A third-party-style segmentor: patch logits, then its own upsampling to the image."""

    def __init__(self, classes: int = 3, fail: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.GELU())
        self.head = nn.Conv2d(16, classes, 1)
        self.up = nn.Upsample(scale_factor=8, mode="bilinear", align_corners=False)
        self.fail = fail
        self.upsample_calls = 0

    def forward(self, x):
        logits = self.head(self.backbone(x))
        if self.fail:
            raise RuntimeError("boom")
        self.upsample_calls += 1
        return self.up(logits)


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hook_adapter_recovers_patch_logits_and_cleans_up(image):
    torch.manual_seed(0)
    model = ToySegmentor().eval()
    with torch.no_grad():
        expected = model.head(model.backbone(image))
        assert model(image).shape == (2, 3, 40, 56)  # the model itself upsamples
    adapter = HookAdapter(model, "head")
    out = adapter(image)
    assert isinstance(out, PatchLogits) and out.grid == (5, 7)
    assert torch.equal(out.logits, expected)
    assert hooks_of(model) == 0 and not model.head._forward_hooks

    # the input of the upsampling module is the same tensor
    via_input = HookAdapter(model, {"up": "input"}, lambda cap, img: PatchLogits(cap["up"]))(image)
    assert torch.equal(via_input.logits, expected) and hooks_of(model) == 0

    # stop_early skips the model's own upsampling
    calls = model.upsample_calls
    early = HookAdapter(model, "head", stop_early=True)(image)
    assert torch.equal(early.logits, expected) and model.upsample_calls == calls
    assert hooks_of(model) == 0


def test_hooks_removed_when_forward_raises(image):
    model = ToySegmentor(fail=True).eval()
    adapter = HookAdapter(model, "head")
    with pytest.raises(RuntimeError, match="boom"):
        adapter(image)
    assert hooks_of(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with HookAdapter(model, ["head", "backbone"], lambda cap, img: cap["head"]) as hooked:
            assert len(model.head._forward_hooks) == 1 and len(model.backbone._forward_hooks) == 1
            model(image)
    assert hooks_of(model) == 0 and not hooked.active


def test_hook_context_manager_keeps_hooks_for_the_body(image):
    model = ToySegmentor().eval()
    with HookAdapter(model, "head") as hooked:
        with torch.no_grad():
            model(image)  # the user's own forward fills the capture
        assert hooked.captured["head"].shape == (2, 3, 5, 7)
        assert hooked.logits(image).grid == (5, 7)
        hooked(image)  # calls inside the block reuse the hooks
        assert len(model.head._forward_hooks) == 1
    assert hooks_of(model) == 0


def test_hook_adapter_errors():
    model = ToySegmentor()
    with pytest.raises(ValueError, match="close names: \\['head'\\]"):
        HookAdapter(model, "heda")
    with pytest.raises(ValueError, match="to_logits"):
        HookAdapter(model, ["head", "backbone"])
    with pytest.raises(ValueError, match="'output' or 'input'"):
        HookAdapter(model, {"head": "grad"})


def uniform_attention(image: torch.Tensor) -> Attention:
    b, h, w = image.shape[0], image.shape[2] // 8, image.shape[3] // 8
    n = h * w
    weights = torch.eye(n).expand(b, n, n) + 0.1
    return Attention.from_scores(weights.contiguous(), (h, w))


def test_wrap_returns_labels_like_a_drop_in_segmentor(image):
    torch.manual_seed(0)
    model = ToySegmentor().eval()
    refiner = DiscrepancyRefiner(solver="velocity")
    seg = wrap(model, refiner, uniform_attention, layers="head",
               to_logits=lambda cap, img: PatchLogits(torch.tanh(cap["head"])))
    assert isinstance(seg, nn.Module)
    labels = seg(image)
    assert labels.shape == (2, 40, 56) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < 3
    assert hooks_of(model) == 0
    out = seg.refine(image)
    assert torch.equal(out.labels, labels)
    with pytest.raises(ValueError, match="attention"):
        wrap(model, refiner, layers="head")


def test_wrap_an_adapter_with_text(clip_model, image):
    adapter = CLIPAdapter(clip_model, size=None)
    seg = wrap(adapter, DiscrepancyRefiner(solver="path"), uniform_attention, text=[["cat", "kitty"], "dog"])
    labels = seg(image)
    assert labels.shape == (2, 40, 56) and int(labels.max()) <= 1
