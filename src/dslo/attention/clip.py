"""CLIP ViT self-attention (one block, default the last) as a patch-to-patch ``Attention``.

``build_clip(model="ViT-B-16", pretrained="openai")`` gives a provider: image (B, 3, H, W) in
[0, 1] -> ``Attention`` with matrix (B, N, N) on the ViT's patch grid. The attention is computed
from the chosen block's own projections applied to ``ln_1(x)``, where ``x`` is the block's input
captured by a forward pre-hook (pytorch-grad-cam style: the hook is removed on exit, and the
forward pass stops at the hook, so blocks after the chosen one are never run):

- "key-key" (default): ``softmax(k k^T / sqrt(d))``;
- "query-query": ``softmax(q q^T / sqrt(d))``;
- "query-key": ``softmax(q k^T / sqrt(d))``, the block's own attention probabilities.

Why key-key by default: the last block of a CLIP ViT attends from every patch to the same few
global tokens (its query-key maps are nearly identical for all rows, which is what makes CLIP's
patch features spatially noisy); the self-self similarities that training-free OVSS methods
use instead (SCLIP: q-q + k-k, NACLIP and ClearCLIP-style: k-k) keep the local, object-shaped
neighbourhoods that the refiner needs. Query-query is offered for the same reason.

Heads are averaged (one head at a time is materialised), the CLS token's row and column are
dropped, and rows are renormalised to sum to 1 (the same rule as ``dslo.attention.dinov2``:
a patch's attention mass on CLS is removed and the rest rescaled).

Models: an open_clip ``CLIP`` / ``CustomTextCLIP`` (its ``.visual``), an open_clip
``VisionTransformer``, or a timm ``VisionTransformer`` (also inside open_clip's ``TimmModel``
as ``.visual.trunk``), built here from an open_clip name + pretrained tag / checkpoint file /
local directory, or passed in already built (so the CLIP that gives the logits can give the
attention). open_clip and timm are imported inside the functions that need them, so importing
this module costs only torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.records import Attention
from .base import check_image
from .._hub import OFFLINE_ALTERNATIVES as _OFFLINE_ALTERNATIVES, hub_unavailable as _hub_unavailable, pair as _pair

__all__ = [
    "AttentionMode",
    "CLIPAttention",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VisionTower",
    "build_clip",
    "clip_attention_maps",
    "clip_pixel_values",
    "load_clip",
    "vision_tower",
]

AttentionMode = Literal["key-key", "query-key", "query-query"]
_MODES = ("key-key", "query-key", "query-query")

from .._hub import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402  (re-exported)

#: The ViT input side when ``build_clip`` loads the model itself (open_clip's
#: ``force_image_size``: the positional embeddings are interpolated at load time).
DEFAULT_SIZE = 448

_HOW_TO_GET = (
    "accepted: an open_clip model name with a pretrained tag (e.g. model='ViT-B-16', "
    "pretrained='openai'; see open_clip.list_pretrained()), a model name with a checkpoint file "
    "path as pretrained, a local directory with open_clip_config.json and weights (as model; "
    "'local-dir:DIR' also works), 'hf-hub:org/repo', or an already-built open_clip/timm model as "
    "model_obj. To use a tag offline, download it first on a machine with internet (e.g. "
    "`python -c \"import open_clip; open_clip.create_model('ViT-B-16', 'openai')\"`) and copy the "
    "Hugging Face cache"
)


class _Stop(Exception):
    """Raised by the capture hook: nothing after the chosen block is needed."""


# --------------------------------------------------------------------------- towers


@dataclass(frozen=True)
class VisionTower:
    """How to read attention from a ViT.

    Attributes:
        module: the module called on pixel values.
        blocks: its transformer blocks, in order.
        kind: "open_clip" (ResidualAttentionBlock: ln_1 + nn.MultiheadAttention) or "timm"
            (Block: norm1 + Attention with a fused qkv Linear).
        num_prefix_tokens: tokens before the patches (CLS, registers).
        patch_size: (ph, pw).
        image_size: the fixed input (H, W), or None when the model takes any multiple of the
            patch size (timm ``dynamic_img_size``).
        batch_first: whether block inputs are (B, T, D) (else (T, B, D)).
        mean, std: the model's normalisation (RGB).
    """

    module: nn.Module
    blocks: Sequence[nn.Module]
    kind: str
    num_prefix_tokens: int
    patch_size: tuple[int, int]
    image_size: Optional[tuple[int, int]]
    batch_first: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def vision_tower(model: nn.Module) -> VisionTower:
    """Find the vision transformer in an open_clip or timm model.

    Accepts an open_clip ``CLIP``/``CustomTextCLIP`` (uses ``.visual``), an open_clip
    ``VisionTransformer``, an open_clip ``TimmModel`` (uses ``.trunk``), or a timm
    ``VisionTransformer``.

    Raises:
        ValueError: for anything else, naming what came.
    """
    visual = getattr(model, "visual", None)
    tower = visual if isinstance(visual, nn.Module) else model
    preprocess = getattr(tower, "preprocess_cfg", None) or getattr(model, "preprocess_cfg", None) or {}
    trunk = getattr(tower, "trunk", None)
    if isinstance(trunk, nn.Module) and hasattr(trunk, "blocks"):
        tower = trunk
    transformer = getattr(tower, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks") and hasattr(tower, "conv1"):
        blocks = list(transformer.resblocks)
        for i, block in enumerate(blocks):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise ValueError(
                    f"CLIP attention: block {i} of {type(tower).__name__} is a "
                    f"{type(block).__name__} whose attn is {type(attn).__name__}; expected "
                    "open_clip's ResidualAttentionBlock with nn.MultiheadAttention (custom "
                    "blocks with qk-norm or scaled cosine attention are not supported)"
                )
        mean, std = _mean_std(preprocess)
        return VisionTower(
            module=tower,
            blocks=blocks,
            kind="open_clip",
            num_prefix_tokens=1,
            patch_size=_pair(tower.patch_size),
            image_size=_pair(tower.image_size),
            batch_first=bool(getattr(transformer, "batch_first", True)),
            mean=mean,
            std=std,
        )
    blocks = getattr(tower, "blocks", None)
    patch_embed = getattr(tower, "patch_embed", None)
    if blocks is not None and patch_embed is not None and len(blocks) > 0:
        blocks = list(blocks)
        for i, block in enumerate(blocks):
            attn = getattr(block, "attn", None)
            if not (hasattr(block, "norm1") and isinstance(getattr(attn, "qkv", None), nn.Linear)
                    and hasattr(attn, "num_heads")):
                raise ValueError(
                    f"CLIP attention: block {i} of {type(tower).__name__} is a "
                    f"{type(block).__name__}; expected timm's Block (norm1, attn.qkv Linear)"
                )
        cfg = getattr(tower, "pretrained_cfg", None) or {}
        mean, std = _mean_std(preprocess or cfg)
        dynamic = bool(getattr(tower, "dynamic_img_size", False)) or not getattr(
            patch_embed, "strict_img_size", True
        )
        return VisionTower(
            module=tower,
            blocks=blocks,
            kind="timm",
            num_prefix_tokens=int(getattr(tower, "num_prefix_tokens", 1)),
            patch_size=_pair(patch_embed.patch_size),
            image_size=None if dynamic else _pair(patch_embed.img_size),
            batch_first=True,
            mean=mean,
            std=std,
        )
    raise ValueError(
        f"CLIP attention: {type(model).__name__} is not a supported vision transformer; expected "
        "an open_clip CLIP / VisionTransformer or a timm VisionTransformer"
    )


def _mean_std(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(float(v) for v in cfg.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("std", OPENAI_CLIP_STD))
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    return mean, std


# --------------------------------------------------------------------------- maps


def _projections(tower: VisionTower, block: nn.Module, x: torch.Tensor, mode: AttentionMode):
    """(left, right, scale): per-head (B, heads, T, d) tensors whose softmax(left right^T) is wanted."""
    b, t, dim = x.shape
    if tower.kind == "open_clip":
        attn = block.attn
        xn = block.ln_1(x)
        heads = int(attn.num_heads)
        w, bias = attn.in_proj_weight, attn.in_proj_bias

        def proj(i):  # 0: q, 1: k (rows [i*D, (i+1)*D) of in_proj)
            part = F.linear(
                xn, w[i * dim:(i + 1) * dim], None if bias is None else bias[i * dim:(i + 1) * dim]
            )
            return part.view(b, t, heads, dim // heads).transpose(1, 2)

        q = proj(0) if "query" in mode else None
        k = proj(1) if "key" in mode else None
        scale = (dim // heads) ** -0.5
    else:
        attn = block.attn
        xn = block.norm1(x)
        heads = int(attn.num_heads)
        qkv = attn.qkv(xn)
        d = qkv.shape[-1] // (3 * heads)
        qkv = qkv.view(b, t, 3, heads, d).permute(2, 0, 3, 1, 4)
        q = attn.q_norm(qkv[0]) if "query" in mode else None
        k = attn.k_norm(qkv[1]) if "key" in mode else None
        scale = float(getattr(attn, "scale", d**-0.5))
    left, right = {
        "query-key": (q, k),
        "key-key": (k, k),
        "query-query": (q, q),
    }[mode]
    return left, right, scale


def clip_attention_maps(
    model: Union[nn.Module, VisionTower],
    pixel_values: torch.Tensor,
    *,
    layer: int = -1,
    mode: AttentionMode = "key-key",
) -> torch.Tensor:
    """Head-averaged self-attention of one block of a CLIP/timm ViT, all tokens.

    A forward pre-hook on the block captures its input ``x``; the block's own norm and q/k
    projections give ``softmax(left right^T * d**-0.5)`` per head (float32), averaged over heads
    as they are computed. The forward pass is stopped at the hook and the hook removed.

    Args:
        model: see ``vision_tower``, or a ``VisionTower``.
        pixel_values: (B, 3, H, W) normalised, H and W multiples of the patch size (and equal to
            the model's image size unless it takes dynamic sizes).
        layer: block index; negative counts from the end (default the last block).
        mode: "key-key", "query-key" or "query-query".

    Returns:
        (B, T, T) float32, T = prefix tokens + patches, rows summing to 1.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    tower = model if isinstance(model, VisionTower) else vision_tower(model)
    index = _normalise_layer(layer, len(tower.blocks))
    block = tower.blocks[index]
    captured: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        x = args[0] if args else next(
            (kwargs[k] for k in ("q_x", "x", "hidden_states") if k in kwargs), None
        )
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"CLIP attention: could not find the input of block {index}")
        if not tower.batch_first:
            x = x.transpose(0, 1)
        left, right, scale = _projections(tower, block, x, mode)
        b, heads, t, _ = left.shape
        acc = torch.zeros(b, t, t, dtype=torch.float32, device=x.device)
        for h in range(heads):
            s = torch.matmul(left[:, h].float(), right[:, h].float().transpose(-1, -2)).mul_(scale)
            acc.add_(torch.softmax(s, dim=-1))
        captured.append(acc.div_(heads))
        raise _Stop

    param = next(tower.module.parameters())
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            tower.module(pixel_values.to(device=param.device, dtype=param.dtype))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"CLIP attention: block {index} was not run by the forward pass")
    return captured[0]


def clip_pixel_values(
    image: torch.Tensor,
    size: tuple[int, int],
    *,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """Resize a [0, 1] image batch to ``size`` (bilinear, antialiased; no crop, so the patch grid
    covers the whole image) and normalise with ``mean``/``std``. Returns (B, 3, H', W') float32."""
    image = check_image(image)
    x = image.float()
    if tuple(size) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    m = x.new_tensor(tuple(mean)).view(1, 3, 1, 1)
    s = x.new_tensor(tuple(std)).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- provider


class CLIPAttention(nn.Module):
    """CLIP ViT self-attention provider: image (B, 3, H, W) in [0, 1] -> ``Attention``.

    Args:
        model: an open_clip ``CLIP`` (or its ``.visual``) or a timm ``VisionTransformer``; the
            vision tower is switched to eval mode (patch dropout would drop tokens otherwise).
        mode: "key-key" (default), "query-key" or "query-query"; see the module docstring.
        layer: block index, negative from the end; default -1, the last block.
        size: the ViT input (H, W) or side; None: the model's image size (open_clip models have
            a fixed one: build with ``open_clip.create_model(..., force_image_size=S)`` to use
            another). Must be a multiple of the patch size.
        mean, std: normalisation; default the model's (``preprocess_cfg`` / timm
            ``pretrained_cfg``), else OpenAI CLIP's.
        source: description stored in ``Attention.source``.

    Call: image (B, 3, H, W) float in [0, 1] -> ``Attention`` with matrix (B, N, N) float32 on
    the image's device, N = h * w, grid (h, w) = (H'/p, W'/p); CLS (and any register tokens)
    dropped, rows renormalised.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: AttentionMode = "key-key",
        layer: int = -1,
        size: Union[int, tuple[int, int], None] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        source: Optional[str] = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        tower = vision_tower(model)
        self.layer = _normalise_layer(layer, len(tower.blocks))
        if size is None:
            if tower.image_size is None:
                raise ValueError(
                    "size: this model takes dynamic image sizes; pass size=(H, W) or an int"
                )
            size = tower.image_size
        size = _check_size(size, tower.patch_size)
        if tower.image_size is not None and size != tower.image_size:
            raise ValueError(
                f"size: the model's image size is {tower.image_size}, got {size}; build the model "
                f"at that size (open_clip.create_model(..., force_image_size={size}) or timm "
                "dynamic_img_size=True), or leave size=None"
            )
        mean = tuple(float(v) for v in (tower.mean if mean is None else mean))
        std = tuple(float(v) for v in (tower.std if std is None else std))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std: expected 3 values each, std > 0; got {mean}, {std}")
        tower.module.eval()
        self.model = model
        self._tower = tower
        self.mode = mode
        self.size = size
        self.mean, self.std = mean, std
        self.grid = (size[0] // tower.patch_size[0], size[1] // tower.patch_size[1])
        self.source = source or (
            f"clip[{type(tower.module).__name__} {tower.kind}] {mode} layer={self.layer} size={size}"
        )

    def forward(self, image: torch.Tensor) -> Attention:
        """image (B, 3, H, W) in [0, 1] -> Attention, matrix (B, N, N) float32, grid (h, w)."""
        image = check_image(image)
        pixel_values = clip_pixel_values(image, self.size, mean=self.mean, std=self.std)
        maps = clip_attention_maps(self._tower, pixel_values, layer=self.layer, mode=self.mode)
        s = self._tower.num_prefix_tokens
        patches = maps[:, s:, s:]
        expected = self.grid[0] * self.grid[1]
        if patches.shape[-1] != expected:
            raise RuntimeError(
                f"CLIPAttention: {patches.shape[-1]} patch tokens after dropping {s} prefix tokens, "
                f"expected {self.grid[0]}x{self.grid[1]} = {expected}"
            )
        return Attention.from_scores(patches.to(image.device), self.grid, self.source)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, layer={self.layer}, size={self.size}"


def build_clip(
    model: str = "ViT-B-16",
    pretrained: Optional[str] = "openai",
    model_obj: Optional[nn.Module] = None,
    **options,
) -> CLIPAttention:
    """A CLIP attention provider.

    Args:
        model: an open_clip model name (``open_clip.list_models()``), a local directory with
            open_clip_config.json and weights, or an open_clip 'hf-hub:' / 'local-dir:' name.
            Ignored when ``model_obj`` is given.
        pretrained: an open_clip pretrained tag for ``model`` (``open_clip.list_pretrained()``)
            or a checkpoint file path; ignored for directories and schema names.
        model_obj: an already-built open_clip CLIP / VisionTransformer or timm ViT, used as is.
        **options: ``size`` (default 448 when loading, so the positional embeddings are
            interpolated by open_clip's ``force_image_size``; the model's own size for
            ``model_obj``), ``mode``, ``layer``, ``mean``, ``std``, ``source`` (``CLIPAttention``);
            for loading: ``local_files_only`` (None: follow ``HF_HUB_OFFLINE``), ``cache_dir``,
            ``device`` (default "cuda" when available, else "cpu").

    Returns:
        provider: image (B, 3, H, W) in [0, 1] -> Attention, matrix (B, N, N).
    """
    local_files_only = options.pop("local_files_only", None)
    cache_dir = options.pop("cache_dir", None)
    device = options.pop("device", None)
    if model_obj is None:
        size = options.pop("size", DEFAULT_SIZE)
        model_obj = load_clip(
            model, pretrained, size=size, local_files_only=local_files_only, cache_dir=cache_dir,
            device=device,
        )
    elif not isinstance(model_obj, nn.Module):
        raise ValueError(f"model_obj: expected a torch.nn.Module, got {type(model_obj).__name__}")
    return CLIPAttention(model_obj, **options)


# --------------------------------------------------------------------------- weights


def load_clip(
    model: str = "ViT-B-16",
    pretrained: Optional[str] = "openai",
    *,
    size: Union[int, tuple[int, int], None] = DEFAULT_SIZE,
    local_files_only: Optional[bool] = None,
    cache_dir: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
) -> nn.Module:
    """Build an open_clip model with pretrained weights (float32, eval, no gradients), cached.

    For pretrained tags the QuickGELU setting of the tag is applied (open_clip only warns when
    e.g. 'ViT-B-16' + 'openai' disagree, and builds GELU, which is wrong for OpenAI weights).
    Offline (``local_files_only`` or ``HF_HUB_OFFLINE``), tags and 'hf-hub:' names are resolved
    in the local Hugging Face cache only (open_clip itself would try to download).

    Args:
        model, pretrained: see ``build_clip``. Random weights are never returned silently:
            ``pretrained=None`` with a plain model name raises.
        size: the image size (int or (H, W)) to build at (``force_image_size``), or None for
            the model config's own.
        local_files_only: None follows ``HF_HUB_OFFLINE`` (read at call time).
        cache_dir: open_clip / Hugging Face cache directory.
        device: default "cuda" when available, else "cpu".

    Returns:
        the open_clip model (``CLIP`` or ``CustomTextCLIP``); the same object for the same
        arguments (do not modify it in place).

    Raises:
        ValueError: unknown model, unknown tag, missing weights, with how to get them.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"CLIP model: expected a non-empty string, got {model!r}; {_HOW_TO_GET}")
    if size is not None:
        size = _check_size(size, (1, 1))
    device = str(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    # no network: resolve in the local cache now instead of a minute of download retries
    offline = (_hub_unavailable() is not None) if local_files_only is None else bool(local_files_only)
    path = Path(model).expanduser()
    stamp: tuple = ()
    if path.is_dir():
        model = "local-dir:" + str(path.resolve())
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(
                f"CLIP weights: directory {str(folder)!r} has no open_clip_config.json; {_HOW_TO_GET}"
            )
        stamp = tuple(
            sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file())
        )
        pretrained = None
    elif model.startswith("hf-hub:"):
        pretrained = None
        if offline:
            model = "local-dir:" + _cached_hf_dir(model[len("hf-hub:"):], cache_dir)
    else:
        if pretrained is None or not str(pretrained).strip():
            raise ValueError(
                f"CLIP weights: pretrained is {pretrained!r} for model {model!r}; random weights are "
                f"never used silently; {_HOW_TO_GET}"
            )
        if Path(str(pretrained)).expanduser().is_file():
            file = Path(str(pretrained)).expanduser().resolve()
            pretrained = str(file)
            stat = file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
    return _load_cached(model, pretrained, size, offline, cache_dir, device, stamp)


@functools.lru_cache(maxsize=2)
def _load_cached(model, pretrained, size, offline, cache_dir, device, stamp) -> nn.Module:
    import open_clip

    extra: dict = {}
    if pretrained is not None and not os.path.isfile(pretrained):
        name = model.replace("/", "-")
        if open_clip.get_model_config(name) is None:
            raise ValueError(
                f"CLIP model: unknown open_clip model {model!r} (see open_clip.list_models()); "
                f"{_HOW_TO_GET}"
            )
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            raise ValueError(
                f"CLIP weights: {pretrained!r} is neither a pretrained tag of {model!r} (known: "
                f"{open_clip.list_pretrained_tags_by_model(name)}) nor an existing file; {_HOW_TO_GET}"
            )
        extra["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
        if offline:
            pretrained = _cached_tag_file(name, pretrained, cfg, cache_dir)
            extra["force_preprocess_cfg"] = {k: cfg[k] for k in ("mean", "std") if k in cfg}
    try:
        clip = open_clip.create_model(
            model,
            pretrained=pretrained,
            force_image_size=size,
            device=device,
            cache_dir=cache_dir,
            require_pretrained=True,
            **extra,
        )
    except (RuntimeError, OSError, ValueError) as err:
        raise ValueError(
            f"CLIP weights: could not build {model!r} with pretrained={pretrained!r}: {err}; {_HOW_TO_GET}"
        ) from err
    return clip.float().eval().requires_grad_(False)


def _cached_tag_file(name: str, tag: str, cfg: dict, cache_dir: Optional[str]) -> str:
    """The locally cached checkpoint of an open_clip tag, without any network access."""
    tried = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        for fname in names:
            try:
                return hf_hub_download(repo, fname, cache_dir=cache_dir, local_files_only=True)
            except Exception as err:  # LocalEntryNotFoundError and friends
                tried.append(f"{repo}/{fname} ({type(err).__name__})")
    url = cfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
        tried.append(target)
    raise ValueError(
        f"CLIP weights: {name!r} / {tag!r} is not in the local cache (offline; looked for "
        f"{tried}); {_HOW_TO_GET}; {_OFFLINE_ALTERNATIVES}"
    )


def _cached_hf_dir(repo: str, cache_dir: Optional[str]) -> str:
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo, "open_clip_config.json", cache_dir=cache_dir, local_files_only=True)
    except Exception as err:
        raise ValueError(
            f"CLIP weights: 'hf-hub:{repo}' is not in the local cache (offline): {err}; {_HOW_TO_GET}"
        ) from err
    return str(Path(config).parent)


# --------------------------------------------------------------------------- internals


def _check_size(size, patch: tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, bool):
        raise ValueError(f"size: expected an int or (H, W), got {size!r}")
    try:
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected an int or (H, W), got {size!r}") from None
    if len(hw) != 2 or min(hw) < 1 or hw[0] % patch[0] or hw[1] % patch[1]:
        raise ValueError(
            f"size: expected positive (H, W) multiples of the patch size {patch}, got {size!r}"
        )
    return hw


def _normalise_layer(layer: int, count: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer: expected an int block index, got {layer!r}")
    if not -count <= layer < count:
        raise ValueError(f"layer: index {layer} out of range for a model with {count} blocks")
    return layer % count
