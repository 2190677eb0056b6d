"""Plain CLIP dense patch logits on open_clip, and the CLIP plumbing the other adapters share.

``CLIPAdapter(model="ViT-B-16", pretrained="openai")`` gives MaskCLIP-style dense logits: the
last residual block's query-key attention is skipped and each token keeps only its own value
path,

    x_L = x + out_proj(W_v ln_1(x) + b_v)        (no token mixing in the last block)
    x_L = x_L + mlp(ln_2(x_L))                    (MaskCLIP keeps the residual and the MLP)
    f   = ln_post(x_L) @ proj,     logit(p, q) = cos(f_p, t_q)

which is what MaskCLIP's ``return_qkv`` branch computes (``v += x; v = ffn(norm2(v), identity=v)``).
``last_block="vanilla"`` runs the unmodified last block on every token (the "CLIP" row of the
SCLIP / SC-CLIP / CASS / ProxyCLIP tables: dense tokens of an untouched CLIP);
``last_block="value-only"`` drops the residual and the MLP as well (``out_proj(v)`` alone,
the "reduced" architecture of SCLIP / NACLIP / CASS without their attention).

open_clip is imported when a model is built, not when this module is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.records import PatchLogits
from .base import (TextFeatures, check_image, cosine_logits, input_size, resize_image,
                   slide_windows, _pair)
from .text_cache import (TextFeatureCache, entry_info, resolve_text_cache, text_weights_fingerprint,
                         tokenizer_identity)
from .vocab import IMAGENET_TEMPLATES, flatten_queries, normalise_class_names

__all__ = [
    "CLIPAdapter",
    "CLIPDenseBase",
    "load_open_clip",
    "LastBlock",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
]

LastBlock = Literal["maskclip", "vanilla", "value-only"]
_LAST_BLOCKS = ("maskclip", "vanilla", "value-only")

from .._hub import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402  (re-exported)

TextCache = Union[bool, str, os.PathLike, TextFeatureCache, None]
#: ``progress(iterable, description, total) -> iterable``, called positionally as in
#: ``build_prototypes`` (``rich.progress.track`` and ``tqdm.tqdm`` fit)
Progress = Callable[[Iterable, str, int], Iterable]


class _AdapterDefault:
    """``encode_text``'s ``cache`` when not given: the adapter's ``text_cache``. A sentinel
    rather than None because an explicit None means "no disk cache"."""

    def __repr__(self) -> str:
        return "<adapter's text_cache>"


_ADAPTER_DEFAULT = _AdapterDefault()

_HOW_TO_GET = (
    "give an open_clip model name with a pretrained tag (e.g. model='ViT-B-16', "
    "pretrained='openai'; needs the weights in the Hugging Face / open_clip cache, or internet), "
    "a local checkpoint file as pretrained (pretrained='/path/to/ViT-B-16.pt'), pretrained=None "
    "for random weights (tests), or an open_clip CLIP model object as model"
)


def _local_or_fail(open_clip, model: str, pretrained: Optional[str]) -> tuple[Optional[str], dict]:
    """A pretrained tag that cannot be downloaded now (HF_HUB_OFFLINE, no network): its cached
    file (with the tag's QuickGELU setting, which a file loses), or a one-line ValueError at
    once (open_clip would retry the download for a minute). Otherwise ``pretrained`` as given."""
    import os

    from .._hub import hub_cached, hub_unavailable, missing_hub_weights

    if pretrained is None or Path(str(pretrained)).expanduser().is_file():
        return pretrained, {}
    cfg = open_clip.get_pretrained_cfg(model, str(pretrained)) if model in open_clip.list_models() else {}
    if not cfg or not cfg.get("hf_hub"):
        return pretrained, {}  # unknown tags and URL-only tags: open_clip's own message
    reason = hub_unavailable()
    if reason is None:
        return pretrained, {}
    repo, filename = os.path.split(cfg["hf_hub"])
    for name in (filename or "open_clip_pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = hub_cached(repo, name)
        if found is not None:
            return found, {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    raise missing_hub_weights(
        f"open_clip {model} '{pretrained}' from", repo, reason,
        f"download it on a machine with internet (`hf download {repo}`) and copy the Hugging Face cache "
        "(~/.cache/huggingface/hub), or pass a checkpoint file as pretrained")


def load_open_clip(model: Union[str, nn.Module], pretrained: Optional[str] = "openai",
                   device: Union[str, torch.device, None] = None) -> tuple[nn.Module, Optional[str]]:
    """Build or accept an open_clip CLIP model; returns (model in eval mode, model name or None).

    A model object is used as is (switched to eval mode, on ``device`` if given).

    Raises:
        ValueError: the model cannot be built or loaded, or is not an open_clip ViT CLIP.
    """
    if isinstance(model, nn.Module):
        net, name = model, None
        if device is not None:
            net = net.to(device)
    elif isinstance(model, str) and model.strip():
        try:
            import open_clip
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError("CLIP adapters need open_clip: pip install 'dslo[clip]'") from e
        name = model
        pretrained, extra = _local_or_fail(open_clip, model, pretrained)
        try:
            if pretrained is None:
                net = open_clip.create_model(model, device=device)
            else:
                net = open_clip.create_model(model, pretrained=str(pretrained), device=device, **extra)
        # open_clip's download and checkpoint errors differ across versions (RuntimeError,
        # OSError from huggingface_hub, ValueError, FileNotFoundError): report them uniformly
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"CLIP adapter: cannot build open_clip model {model!r} with pretrained="
                f"{pretrained!r}: {type(e).__name__}: {e}; {_HOW_TO_GET}"
            ) from e
    else:
        raise ValueError(f"CLIP adapter: model must be a name or an open_clip model, got {model!r}; {_HOW_TO_GET}")
    _vision_tower(net)
    net.eval()  # adapters run inference under torch.no_grad(); parameters are left as they are
    return net, name


def _vision_tower(net: nn.Module) -> nn.Module:
    visual = getattr(net, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post")
    if visual is None or blocks is None or any(not hasattr(visual, a) for a in needed):
        raise ValueError(
            f"CLIP adapter: {type(net).__name__} is not an open_clip ViT CLIP (needs visual.conv1, "
            "visual.positional_embedding, visual.transformer.resblocks, visual.ln_post); "
            "ResNet, timm and SigLIP towers are not supported"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("CLIP adapter: vision towers with attentional pooling are not supported")
    for i, blk in enumerate(blocks):
        if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention) or not blk.attn._qkv_same_embed_dim:
            raise ValueError(
                f"CLIP adapter: block {i} has no nn.MultiheadAttention with a packed in_proj_weight "
                "(custom open_clip blocks with qk_norm / scaled cosine attention are not supported)"
            )
    return visual


# ----------------------------------------------------------------------------- ViT pieces


class ViTParts:
    """Functional access to an open_clip VisionTransformer (batch-first tensors throughout)."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self.blocks = list(visual.transformer.resblocks)
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self.patch = _pair(tuple(int(p) for p in visual.conv1.kernel_size), "patch size")
        self.heads = int(self.blocks[-1].attn.num_heads)
        self.width = int(visual.conv1.out_channels)
        n = visual.positional_embedding.shape[0] - 1
        grid = getattr(visual, "grid_size", None)
        if grid is None:
            side = int(round(n ** 0.5))
            grid = (side, side)
        self.native_grid = (int(grid[0]), int(grid[1]))
        if self.native_grid[0] * self.native_grid[1] != n:
            raise ValueError(f"CLIP adapter: positional embedding has {n} patches, not grid {self.native_grid}")

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + h*w, D): the class position plus the patch positions resized bicubically to ``grid``."""
        pos = self.visual.positional_embedding
        if tuple(grid) == self.native_grid:
            return pos
        gh, gw = self.native_grid
        patches = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([pos[:1], patches], dim=0)

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised pixels (B, 3, H, W), H and W multiples of the patch -> (B, 1 + N, D), grid."""
        v = self.visual
        x = v.conv1(pixels.to(self.dtype))
        grid = (int(x.shape[2]), int(x.shape[3]))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(grid).to(x.dtype)
        return v.ln_pre(x), grid

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[index]
        if self.batch_first:
            return blk(x)
        return blk(x.transpose(0, 1)).transpose(0, 1)

    def run(self, x: torch.Tensor, stop: int) -> list[torch.Tensor]:
        """Outputs of blocks 0 .. stop-1 (a list of (B, 1 + N, D))."""
        outs = []
        for i in range(stop):
            x = self.block(i, x)
            outs.append(x)
        return outs

    def qkv(self, index: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Already layer-normed tokens (B, L, D) -> q, k, v each (B, heads, L, D / heads)."""
        attn = self.blocks[index].attn
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        b, n, d = q.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        return split(q), split(k), split(v)

    def value(self, index: int, y: torch.Tensor) -> torch.Tensor:
        """The value projection alone: (B, L, D) -> (B, L, D) (heads not split)."""
        attn = self.blocks[index].attn
        d = y.shape[-1]
        bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
        return F.linear(y, attn.in_proj_weight[2 * d:], bias)

    def out_proj(self, index: int, heads: torch.Tensor) -> torch.Tensor:
        """(B, heads, L, D / heads) -> (B, L, D) through the block's output projection."""
        b, h, n, c = heads.shape
        return self.blocks[index].attn.out_proj(heads.transpose(1, 2).reshape(b, n, h * c))

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then the projection into the joint space: (..., D) -> (..., E)."""
        x = self.visual.ln_post(tokens)
        proj = getattr(self.visual, "proj", None)
        return x @ proj if proj is not None else x


# ----------------------------------------------------------------------------- adapters


class CLIPDenseBase(nn.Module):
    """Shared machinery: model, tokenizer, text encoding, input sizing, sliding windows.

    Subclasses implement ``_window_logits(image01, text, context) -> (B, Q, h, w)`` for one
    window of the resized image (values in [0, 1]); ``output_patch`` is the pixel size of one
    cell of the output grid (CLIP's patch here).

    ``text_cache`` (None, False, True, a folder or a ``TextFeatureCache``) is the default
    ``cache`` of ``encode_text``: None keeps text features off the disk.
    """

    method = "clip"

    def __init__(
        self,
        model: Union[str, nn.Module] = "ViT-B-16",
        pretrained: Optional[str] = "openai",
        *,
        size: Union[int, tuple[int, int], None] = 448,
        slide: Optional[tuple[int, int]] = None,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        device: Union[str, torch.device, None] = None,
        text_batch_size: int = 1024,
        text_cache: TextCache = None,
    ) -> None:
        super().__init__()
        self.clip, self.model_name = load_open_clip(model, pretrained, device)
        self.vit = ViTParts(self.clip.visual)
        self.size = size
        self.templates = _check_templates(templates)
        self._tokenizer = tokenizer
        self.text_batch_size = int(text_batch_size)
        # off by default: a library call should not write to the user's home unasked
        self.text_cache: Optional[TextFeatureCache] = resolve_text_cache(text_cache)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.slide = None
        if slide is not None:
            crop, stride = _pair(tuple(slide), "slide (crop, stride)")
            self.slide = (crop, stride)

    # -- geometry ---------------------------------------------------------------------

    @property
    def output_patch(self) -> tuple[int, int]:
        return self.vit.patch

    def _check_slide(self) -> None:
        if self.slide is None:
            return
        ph, pw = self.output_patch
        crop, stride = self.slide
        if crop % ph or crop % pw or stride % ph or stride % pw:
            raise ValueError(
                f"slide: crop {crop} and stride {stride} must be multiples of the output patch "
                f"size {self.output_patch} so that windows align with the patch grid"
            )

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> resized (B, 3, H', W') in [0, 1], sides multiples of the output patch."""
        image = check_image(image)
        hh, ww = input_size(image.shape[2], image.shape[3], self.size, self.output_patch)
        return resize_image(image.to(self.vit.device), (hh, ww))

    def normalise(self, image01: torch.Tensor) -> torch.Tensor:
        return ((image01 - self.mean) / self.std).to(self.vit.dtype)

    def clip_pixels(self, image01: torch.Tensor) -> torch.Tensor:
        """CLIP input for a window: resized to multiples of CLIP's patch if needed, normalised."""
        ph, pw = self.vit.patch
        h, w = image01.shape[-2:]
        if h % ph or w % pw:
            image01 = resize_image(image01, input_size(h, w, None, (ph, pw)))
        return self.normalise(image01)

    # -- text -------------------------------------------------------------------------

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return self._resolve_tokenizer()(texts)

    def _resolve_tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        if self._tokenizer is None:
            import open_clip

            if self.model_name is not None:
                self._tokenizer = open_clip.get_tokenizer(self.model_name)
            else:
                length = getattr(self.clip, "context_length", None)
                if length is None:
                    raise ValueError(
                        "CLIP adapter: this model has no context_length; pass tokenizer=... "
                        "(a callable list[str] -> LongTensor (n, context_length))"
                    )
                self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(length))
        return self._tokenizer

    @torch.no_grad()
    def encode_text(self, class_names, templates: Optional[Sequence[str]] = None, *,
                    cache: TextCache = _ADAPTER_DEFAULT, progress: Optional[Progress] = None) -> TextFeatures:
        """Prompt-ensembled text features, one row per query (class name or synonym).

        Args:
            class_names: ``list[str]``, ``list[list[str]]`` (synonyms), or a benchmark name /
                class-file path (see ``dslo.adapters.load_class_names``).
            templates: prompt templates with ``"{}"`` for the name; default the adapter's
                (the 80 ImageNet templates).
            cache: on-disk text cache (``dslo.adapters.text_cache``): None or False: none;
                True: ``$DSLO_CACHE/text`` (default ``~/.cache/dslo/text``); a folder path;
                a ``TextFeatureCache``. Not given: the adapter's ``text_cache`` (off unless
                the constructor turned it on). A hit encodes nothing.
            progress: ``progress(iterable, description, total) -> iterable`` wrapping the
                loop over prompt batches (``total`` = ceil(Q * T / text_batch_size)); called
                only when the text tower runs.

        Returns:
            ``TextFeatures``: features (Q, D) float32 on the adapter's device, for each query
            the mean over the T templates of the L2-normalised ``encode_text`` embeddings,
            L2-normalised again (as SCLIP, SC-CLIP, CASS, ProxyCLIP); query_to_class (Q,).
            A cache hit returns the stored bits of that same computation.
        """
        names = normalise_class_names(class_names)
        temps = self.templates if templates is None else _check_templates(templates)
        store = self.text_cache if cache is _ADAPTER_DEFAULT else resolve_text_cache(cache)
        queries, owners = flatten_queries(names)
        device = self.vit.device
        if store is not None:
            identity = self.text_identity()
            key = store.key(class_names=names, templates=temps, **identity)
            hit = store.get(key, device=device, class_names=names, templates=temps)
            if hit is not None:
                # float32 like a fresh computation, wherever and however the entry was written
                return self._text_features(hit.features.to(device=device, dtype=torch.float32), owners, names, temps)
        emb = self._encode_prompts(queries, temps, progress)
        if store is not None:
            info = entry_info(features=emb, num_classes=len(names), num_templates=len(temps),
                              model_name=self.model_name, **identity)
            store.put(key, emb, class_names=names, templates=temps, info=info)
        return self._text_features(emb, owners, names, temps)

    def _encode_prompts(self, queries: list[str], temps: tuple[str, ...],
                        progress: Optional[Progress]) -> torch.Tensor:
        """Q queries x T templates -> (Q, D) float32 on the adapter's device, rows L2-normalised."""
        prompts = [t.format(q) for q in queries for t in temps]
        starts: Iterable[int] = range(0, len(prompts), self.text_batch_size)
        if progress is not None:
            total = len(starts)
            starts = progress(starts, f"text features ({len(queries)} queries x {len(temps)} templates)", total)
        rows = []
        for start in starts:
            tokens = self.tokenizer(prompts[start:start + self.text_batch_size])
            emb = self.clip.encode_text(tokens.to(self.vit.device))
            rows.append(F.normalize(emb.float(), dim=-1))
        emb = torch.cat(rows).view(len(queries), len(temps), -1).mean(1)
        return F.normalize(emb, dim=-1)

    @staticmethod
    def _text_features(features: torch.Tensor, owners: list[int], names, temps) -> TextFeatures:
        return TextFeatures(features, torch.tensor(owners, dtype=torch.long, device=features.device), names, temps)

    def text_identity(self) -> dict[str, str]:
        """What, besides the vocabulary and templates, decides the text features: the text
        tower's weights fingerprint, the model class and the tokenizer identity (the text
        cache key's model part; ``dslo.adapters.text_cache``)."""
        cls = type(self.clip)
        return {
            "weights": text_weights_fingerprint(self.clip),
            "model_class": f"{cls.__module__}.{cls.__qualname__}",
            "tokenizer": tokenizer_identity(self._resolve_tokenizer(), getattr(self.clip, "context_length", None)),
        }

    def _text(self, text) -> TextFeatures:
        return text if isinstance(text, TextFeatures) else self.encode_text(text)

    # -- forward ----------------------------------------------------------------------

    def _image_context(self, image01: torch.Tensor, text: TextFeatures):
        """Per-forward context computed once on the whole resized image (default none)."""
        return None

    def _window_logits(self, image01: torch.Tensor, text: TextFeatures, context) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, image: torch.Tensor, text) -> PatchLogits:
        """image (B, 3, H, W) in [0, 1], text (``TextFeatures`` or class names) -> ``PatchLogits``.

        The logits live on the output grid of the resized image (H'/p, W'/p); with ``slide``,
        windows of ``crop`` pixels every ``stride`` are computed separately and averaged on
        that grid (each cell over the windows covering it).
        """
        text = self._text(text)
        self._check_slide()
        x = self.resize(image)
        context = self._image_context(x, text)
        if self.slide is None:
            logits = self._window_logits(x, text, context)
        else:
            logits = self._slide(x, text, context)
        return PatchLogits(logits.float(), text.query_to_class.to(logits.device), text.num_classes, kind="cosine")

    def _slide(self, x: torch.Tensor, text: TextFeatures, context) -> torch.Tensor:
        ph, pw = self.output_patch
        crop, stride = self.slide
        hh, ww = x.shape[-2:]
        total = None
        count = x.new_zeros(1, 1, hh // ph, ww // pw)
        for y0, y1, x0, x1 in slide_windows(hh, ww, crop, stride):
            part = self._window_logits(x[:, :, y0:y1, x0:x1], text, context).float()
            if total is None:
                total = part.new_zeros(part.shape[0], part.shape[1], hh // ph, ww // pw)
            total[:, :, y0 // ph:y1 // ph, x0 // pw:x1 // pw] += part
            count[:, :, y0 // ph:y1 // ph, x0 // pw:x1 // pw] += 1
        return total / count

    def extra_repr(self) -> str:
        return f"method={self.method!r}, model={self.model_name!r}, size={self.size!r}, slide={self.slide!r}"


class CLIPAdapter(CLIPDenseBase):
    """Plain CLIP dense patch logits (MaskCLIP-style by default) on an open_clip ViT.

    ``CLIPAdapter(model="ViT-B-16", pretrained="openai", size=448)``; ``model`` may also be an
    open_clip model object; ``pretrained`` an open_clip tag, a local checkpoint path, or None.

    Args:
        last_block: "maskclip" (default; value path + residual + MLP), "vanilla" (the untouched
            last block), "value-only" (``out_proj(v)`` without residual and MLP).
        size: short side in pixels (int), a fixed (H, W), or None (keep); each side is then
            rounded to a multiple of the patch size. The positional embedding is resized
            bicubically to the (possibly non-square) patch grid.
        slide: optional (crop, stride) in pixels, multiples of the patch size.
        templates, tokenizer, mean, std, device: see ``CLIPDenseBase``.

    Call: ``adapter(image, text) -> PatchLogits`` with logits (B, Q, H'/p, W'/p).
    """

    method = "clip"

    def __init__(self, model: Union[str, nn.Module] = "ViT-B-16", pretrained: Optional[str] = "openai", *,
                 last_block: LastBlock = "maskclip", **options) -> None:
        super().__init__(model, pretrained, **options)
        if last_block not in _LAST_BLOCKS:
            raise ValueError(f"last_block: expected one of {_LAST_BLOCKS}, got {last_block!r}")
        self.last_block = last_block

    def dense_features(self, image01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] (sides multiples of the patch) -> (B, h, w, E) projected features."""
        vit = self.vit
        x, grid = vit.embed(self.clip_pixels(image01))
        last = len(vit.blocks) - 1
        x = vit.run(x, last)[-1] if last > 0 else x
        blk = vit.blocks[last]
        if self.last_block == "vanilla":
            x = vit.block(last, x)
        elif self.last_block == "maskclip":
            x = x + blk.ls_1(blk.attn.out_proj(vit.value(last, blk.ln_1(x))))
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        else:
            x = blk.attn.out_proj(vit.value(last, blk.ln_1(x)))
        f = vit.head(x[:, 1:])
        return f.reshape(f.shape[0], grid[0], grid[1], -1)

    def _window_logits(self, image01, text, context):
        return cosine_logits(self.dense_features(image01), text.features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", last_block={self.last_block!r}"


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    temps = tuple(templates) if not isinstance(templates, str) else (templates,)
    if not temps or any(not isinstance(t, str) or t.count("{}") != 1 for t in temps):
        raise ValueError(
            "templates: expected a non-empty list of strings each with exactly one '{}' for the "
            f"class name, got {templates!r}"
        )
    return temps
