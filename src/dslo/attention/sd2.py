"""Stable Diffusion 2 self-attention as a patch-to-patch ``Attention``.

``build_sd2(weights="stabilityai/stable-diffusion-2-base")`` gives a provider: image
(B, 3, H, W) in [0, 1] -> ``Attention`` with matrix (B, N, N) on a latent grid. The image is
encoded to noise-free latents, ONE unconditional UNet step runs at timestep ``t`` (default 0),
and the self-attention (``attn1``) probabilities of chosen UNet blocks are captured by an
attention processor installed with ``unet.set_attn_processor`` (the pattern of diffusers'
attend-and-excite pipeline). diffusers' default processor (``AttnProcessor2_0``, scaled dot
product attention) never materialises the probabilities, so the capture processor computes
them itself from the module's own ``to_q``/``to_k`` and ``scale``, one head at a time, and
then hands the call to the processor that was installed before, so the UNet's output is
unchanged. The original processors are restored on exit.

Grids of the SD2 UNet (``stabilityai/stable-diffusion-2-base``: block_out_channels
(320, 640, 1280, 1280), attention_head_dim (5, 10, 20, 20) = number of heads, 64 channels per
head everywhere, layers_per_block 2, so 3 transformer blocks per up block). At 512 x 512 px the
VAE (factor 8) gives a 64 x 64 latent, and the self-attention levels are:

============== ======== ====== ========================================
block          grid      heads  tokens N
============== ======== ====== ========================================
down_blocks.0  64 x 64   5      4096 (2 transformer blocks)
down_blocks.1  32 x 32   10     1024
down_blocks.2  16 x 16   20     256
down_blocks.3  --        --     no attention (DownBlock2D)
mid_block      8 x 8     20     64
up_blocks.0    --        --     no attention (UpBlock2D), works at 8 x 8
up_blocks.1    16 x 16   20     256 (3 transformer blocks)
up_blocks.2    32 x 32   10     1024 (3 transformer blocks)
up_blocks.3    64 x 64   5      4096 (3 transformer blocks)
============== ======== ====== ========================================

(checked by running the SD2-base configuration, see ``benchmarks/sd2_memory.py``). In general a
block's grid is the latent size divided by 2 ** (its depth), i.e. the image size divided by
8 * 2 ** depth.

The default blocks are the paper's "up_0 + up_1": the first two up blocks that have attention,
``up_blocks.1`` (16 x 16 at 512 px) and ``up_blocks.2`` (32 x 32), weighted 0.5 / 0.5. Each
level's map is the average over its transformer blocks (heads averaged as they are captured);
each level's map is then resampled to a common grid with
``dslo.refiners.grid.resample_attention`` (bilinear on rows and columns, rows renormalised) and
the levels are summed with their weights. The common grid is the finest grid among the chosen
blocks (32 x 32 for the default at 512 px), or the ``grid`` option: upsampling the coarse
level keeps the fine level's detail, which is what the refiner needs, while downsampling would
throw it away.

diffusers and transformers are imported inside the functions that need them, so importing this
module costs only torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.grid import resample_attention
from ..refiners.records import Attention, check_tensor
from .base import check_image
from .._hub import check_hub_reference as _check_hub_reference

__all__ = [
    "AttentionMode",
    "DEFAULT_BLOCKS",
    "DEFAULT_WEIGHTS",
    "SD2Attention",
    "SD2Components",
    "SelfAttentionCapture",
    "build_sd2",
    "load_sd2",
    "empty_prompt_embeds",
    "sd2_input_size",
    "sd2_latents",
    "self_attention_modules",
    "unet_self_attention",
    "unet_self_attention_levels",
]

AttentionMode = Literal["key-key", "query-key"]
_MODES = ("key-key", "query-key")

#: The paper's "up_0 + up_1": the first two up blocks with attention in SD2's UNet (up_blocks.0
#: is an attention-free UpBlock2D), equal weights.
DEFAULT_BLOCKS: Mapping[str, float] = {"up_blocks.1": 0.5, "up_blocks.2": 0.5}

DEFAULT_WEIGHTS = "stabilityai/stable-diffusion-2-base"

_HOW_TO_GET = (
    "accepted: a Hugging Face repo id in the diffusers layout (default "
    f"'{DEFAULT_WEIGHTS}', subfolders vae/, unet/, text_encoder/, tokenizer/) or a local "
    "directory in the same layout (e.g. written by `StableDiffusionPipeline.save_pretrained` or "
    "`huggingface-cli download stabilityai/stable-diffusion-2-base --local-dir DIR`). To use a "
    "repo id offline, download it first on a machine with internet (then copy the Hugging Face "
    "cache, or pass the downloaded directory). Without text_encoder/ and tokenizer/, pass "
    "empty_prompt='zeros' or a precomputed prompt_embeds tensor"
)


#: Memory for one chunk of heads' float32 scores in the capture processor (the probabilities
#: need as much again while they are summed into the accumulator).
_CHUNK_BYTES = 64 << 20


class _CaptureDone(Exception):
    """Raised by the last capture processor to stop the UNet once every map is in."""


class _Sink:
    """Weighted sums of captured maps and their total weights, keyed by token count N."""

    def __init__(self) -> None:
        self.maps: dict[int, torch.Tensor] = {}
        self.weights: dict[int, float] = {}

    def add(self, n: int, weighted: torch.Tensor, weight: float) -> None:
        if n in self.maps:
            self.maps[n].add_(weighted)
            self.weights[n] += weight
        else:
            self.maps[n] = weighted
            self.weights[n] = weight


# --------------------------------------------------------------------------- capture


class SelfAttentionCapture:
    """A diffusers attention processor that records head-averaged self-attention.

    Installed on a self-attention module (``attn1``) with ``unet.set_attn_processor``. On call
    it computes, from the module's own projections, ``softmax(q k^T * attn.scale)`` per head in
    float32 (``query-key``: the module's attention probabilities; ``key-key``: q replaced by k),
    adds the head average times ``weight`` to the sink's sum for N tokens, then returns
    ``inner(...)``: the processor that was installed before computes the module's output, so the
    forward pass is unchanged. Heads are processed in chunks of at most 64 MiB of float32 scores
    (one head at a time for 64 x 64 tokens, all heads at once for small maps) and summed into the
    accumulator as they come: the scores and probabilities of all heads of a large map are
    never held at once (at 512 px and 64 x 64 tokens: 3 x 64 MiB per image besides the
    UNet's own activations).

    Args:
        inner: the original processor (computes the output).
        sink: where the weighted maps go, one (B, N, N) float32 sum per token count N, shared
            by the processors of one capture.
        weight: this module's weight in the combination.
        mode: "key-key" or "query-key".
        counter: a one-element list shared by the processors of one capture; when it reaches
            ``stop_after`` the processor raises ``_CaptureDone`` instead of computing the output.
        stop_after: number of captures after which the UNet is stopped (0: never).
        name: the module's name, for error messages.
    """

    def __init__(
        self,
        inner,
        sink: "_Sink",
        weight: float,
        mode: AttentionMode,
        counter: list,
        stop_after: int,
        name: str,
    ) -> None:
        self.inner = inner
        self.sink = sink
        self.weight = float(weight)
        self.mode = mode
        self.counter = counter
        self.stop_after = int(stop_after)
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError(
                f"SD2 attention capture: {self.name} was called as cross-attention; only "
                "self-attention (attn1) modules can be captured"
            )
        self._capture(attn, hidden_states, attention_mask, temb)
        self.counter[0] += 1
        if self.stop_after and self.counter[0] >= self.stop_after:
            raise _CaptureDone
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    @torch.no_grad()
    def _capture(self, attn, hidden_states, attention_mask, temb) -> None:
        # the same preprocessing as diffusers' AttnProcessor / AttnProcessor2_0
        x = hidden_states
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        if x.ndim == 4:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        b, n, _ = x.shape
        heads = int(attn.heads)
        key = attn.to_k(x)
        d = key.shape[-1] // heads
        key = key.view(b, n, heads, d).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.mode == "query-key":
            query = attn.to_q(x).view(b, n, heads, d).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
        else:
            query = key
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, n, b).view(b, heads, -1, n).float()
        acc = torch.zeros(b, n, n, dtype=torch.float32, device=x.device)
        scale = float(attn.scale)
        # heads in chunks of at most _CHUNK_BYTES of float32 scores (one head at a time for
        # 64 x 64 tokens; all heads at once for small maps, where per-head calls cost more than
        # the arithmetic); the two chunk buffers are reused, since fresh 64 MiB allocations cost
        # as much in page faults as the matmul itself on CPU
        step = _head_chunk(heads, b * n * n * 4)
        scores = torch.empty(b, step, n, n, dtype=torch.float32, device=x.device)
        probs = torch.empty_like(scores)
        for i in range(0, heads, step):
            # float32 whatever the UNet's dtype (the upcast_attention rule, always on)
            left = query[:, i:i + step].float() * scale  # scaling (N, d) is cheaper than (N, N)
            right = key[:, i:i + step].float().transpose(-1, -2)
            torch.matmul(left, right, out=scores)
            if mask is not None:
                scores.add_(mask[:, i:i + step])
            _softmax_into(scores, probs)
            acc.add_(probs[:, 0] if step == 1 else probs.sum(1))
        del scores, probs
        self.sink.add(n, acc.mul_(self.weight / heads), self.weight)


def _head_chunk(heads: int, bytes_per_head: int) -> int:
    """The largest divisor of ``heads`` whose scores fit in ``_CHUNK_BYTES`` (at least 1)."""
    fit = max(1, _CHUNK_BYTES // max(1, bytes_per_head))
    return max(d for d in range(1, heads + 1) if heads % d == 0 and d <= fit)


def _softmax_into(x: torch.Tensor, out: torch.Tensor) -> None:
    try:
        torch.ops.aten._softmax.out(x, -1, False, out=out)
    except (AttributeError, RuntimeError, NotImplementedError):  # pragma: no cover - old torch
        out.copy_(torch.softmax(x, dim=-1))


def self_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """The self-attention modules of a diffusers UNet, by module name.

    A module counts when it is a diffusers attention module (has ``set_processor`` and
    ``to_q``/``to_k``) that attends to its own tokens: not ``is_cross_attention`` and not
    ``only_cross_attention``; in ``UNet2DConditionModel`` these are the ``...attn1`` modules.
    """
    found = {}
    for name, module in unet.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "to_q") and hasattr(module, "to_k")):
            continue
        if getattr(module, "is_cross_attention", False) or getattr(module, "only_cross_attention", False):
            continue
        found[name] = module
    return found


def _block_weights(blocks) -> dict[str, float]:
    if isinstance(blocks, str):
        blocks = {blocks: 1.0}
    elif isinstance(blocks, Mapping):
        blocks = dict(blocks)
    else:
        try:
            names = list(blocks)
        except TypeError:
            raise ValueError(
                f"blocks: expected a module-name prefix, a sequence of prefixes or a dict "
                f"prefix -> weight, got {blocks!r}"
            ) from None
        if len(set(names)) != len(names):
            raise ValueError(f"blocks: expected distinct prefixes, got {names}")
        blocks = {name: 1.0 for name in names}
    if not blocks:
        raise ValueError("blocks: expected at least one block")
    out = {}
    for name, weight in blocks.items():
        if not isinstance(name, str) or not name.strip(".").strip():
            raise ValueError(f"blocks: expected module-name prefixes (str), got {name!r}")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"blocks: weight of {name!r} must be a number, got {weight!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"blocks: weight of {name!r} must be finite and >= 0, got {weight!r}")
        out[name.strip(".")] = w
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"blocks: weights must not all be zero, got {blocks}")
    return {name: w / total for name, w in out.items()}


def _select_modules(unet: nn.Module, blocks) -> dict[str, float]:
    """module name -> weight; a block's weight is split evenly over its self-attention modules."""
    weights = _block_weights(blocks)
    modules = self_attention_modules(unet)
    selected: dict[str, float] = {}
    owner: dict[str, str] = {}
    for prefix, weight in weights.items():
        names = [n for n in modules if n == prefix or n.startswith(prefix + ".")]
        if not names:
            levels = sorted({_level_name(n) for n in modules})
            raise ValueError(
                f"blocks: no self-attention module under {prefix!r}; blocks with self-attention "
                f"in this UNet: {levels}"
            )
        for name in names:
            if name in owner:
                raise ValueError(
                    f"blocks: {prefix!r} and {owner[name]!r} overlap (both contain {name}); "
                    "give disjoint prefixes"
                )
            owner[name] = prefix
            selected[name] = weight / len(names)
    return {n: w for n, w in selected.items() if w > 0}


def _level_name(module_name: str) -> str:
    parts = module_name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _unet_factor(unet: nn.Module) -> int:
    config = getattr(unet, "config", None)
    channels = getattr(config, "block_out_channels", None)
    if not channels:
        raise ValueError(
            f"SD2 attention: expected a diffusers UNet2DConditionModel (config.block_out_channels), "
            f"got {type(unet).__name__}"
        )
    return 2 ** (len(channels) - 1)


def _grid_of(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    hl, wl = latent_hw
    ratio, rest = divmod(hl * wl, n)
    f = math.isqrt(ratio) if ratio > 0 else 0
    if rest or f < 1 or f * f != ratio or hl % f or wl % f:
        raise RuntimeError(
            f"SD2 attention: a self-attention map with {n} tokens does not fit the {hl}x{wl} latent "
            "at any power-of-two downsampling"
        )
    return hl // f, wl // f


def unet_self_attention_levels(
    unet: nn.Module,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    blocks=DEFAULT_BLOCKS,
    mode: AttentionMode = "key-key",
    timestep: Union[int, float, torch.Tensor] = 0,
    stop_early: bool = True,
) -> list[tuple[tuple[int, int], float, torch.Tensor]]:
    """Captured self-attention of chosen UNet blocks, one map per grid level.

    Runs ``unet(latents, timestep, encoder_hidden_states)`` once under ``torch.no_grad`` with
    ``SelfAttentionCapture`` processors installed on the chosen self-attention modules (the other
    modules keep their processors), then restores the original processors, also on error.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any UNet with diffusers attention
            modules and ``config.block_out_channels``).
        latents: (B, C, h, w) in the UNet's input space; h and w multiples of
            2 ** (len(block_out_channels) - 1) so every level's grid is exact.
        encoder_hidden_states: (B or 1, L, cross_attention_dim) text embeddings (expanded to B).
        blocks: module-name prefix -> weight (dict), a sequence of prefixes (equal weights) or a
            single prefix; weights are normalised to sum 1 and split evenly over the prefix's
            self-attention modules. A prefix matches a module name equal to it or starting with
            it plus ".", e.g. "up_blocks.1" or "up_blocks.1.attentions.0".
        mode: "key-key" (softmax(k k^T * scale)) or "query-key" (the module's own probabilities).
        timestep: the diffusion timestep (0: no noise).
        stop_early: stop the UNet once the last chosen module is captured (the later blocks
            cannot change what was captured; at 512 px this skips the 64 x 64 up_blocks.3).

    Returns:
        [(grid (h, w), weight, map (B, N, N) float32 row-stochastic)], one entry per grid level
        of the chosen modules, finest first; weights sum to 1; maps on the latents' device.

    Raises:
        ValueError: wrong shapes, unknown blocks, unknown mode.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    latents = check_tensor(latents, "latents", 4, dims="(B, C, h, w)")
    factor = _unet_factor(unet)
    b, _, hl, wl = latents.shape
    if b == 0 or hl % factor or wl % factor or hl == 0 or wl == 0:
        raise ValueError(
            f"latents: expected (B >= 1, C, h, w) with h and w positive multiples of {factor} (the "
            f"UNet's total downsampling), got shape {tuple(latents.shape)}"
        )
    expected_channels = getattr(unet.config, "in_channels", None)
    if expected_channels is not None and latents.shape[1] != expected_channels:
        raise ValueError(
            f"latents: expected {expected_channels} channels (unet.config.in_channels), got "
            f"shape {tuple(latents.shape)}"
        )
    ehs = check_tensor(encoder_hidden_states, "encoder_hidden_states", 3, dims="(B, L, D)")
    cross_dim = getattr(unet.config, "cross_attention_dim", None)
    if isinstance(cross_dim, int) and ehs.shape[-1] != cross_dim:
        raise ValueError(
            f"encoder_hidden_states: expected last dimension {cross_dim} "
            f"(unet.config.cross_attention_dim), got shape {tuple(ehs.shape)}"
        )
    if ehs.shape[0] not in (1, b):
        raise ValueError(
            f"encoder_hidden_states: expected batch 1 or {b} (the latents' batch), got "
            f"shape {tuple(ehs.shape)}"
        )
    selected = _select_modules(unet, blocks)

    param = next(unet.parameters())
    latents = latents.to(device=param.device, dtype=param.dtype)
    ehs = ehs.to(device=param.device, dtype=param.dtype).expand(b, -1, -1)
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor(timestep, device=param.device)

    sink = _Sink()
    counter = [0]
    original = unet.attn_processors
    installed = dict(original)
    for name, weight in selected.items():
        key = f"{name}.processor"
        installed[key] = SelfAttentionCapture(
            original[key], sink, weight, mode, counter, len(selected) if stop_early else 0, name
        )
    try:
        # set_attn_processor pops from the dict it is given: pass copies
        unet.set_attn_processor(installed)
        with torch.no_grad():
            try:
                unet(latents, timestep, encoder_hidden_states=ehs, return_dict=False)
            except _CaptureDone:
                pass
    finally:
        unet.set_attn_processor(dict(original))
    if counter[0] != len(selected):
        raise RuntimeError(
            f"SD2 attention: {counter[0]} of {len(selected)} chosen self-attention modules ran "
            "in the UNet's forward pass"
        )
    levels = []
    for n in sorted(sink.maps, reverse=True):
        weight = sink.weights[n]
        levels.append((_grid_of(n, (hl, wl)), weight, sink.maps.pop(n).div_(weight)))
    total = sum(w for _, w, _ in levels)
    return [(g, w / total, m) for g, w, m in levels]


def unet_self_attention(
    unet: nn.Module,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    blocks=DEFAULT_BLOCKS,
    mode: AttentionMode = "key-key",
    timestep: Union[int, float, torch.Tensor] = 0,
    grid: Optional[tuple[int, int]] = None,
    stop_early: bool = True,
    source: str = "",
) -> Attention:
    """Self-attention of chosen UNet blocks on latents, combined on one grid.

    Each level's map from ``unet_self_attention_levels`` is resampled to the common grid with
    ``resample_attention`` and the levels are summed with their weights.

    Args:
        unet, latents, encoder_hidden_states, blocks, mode, timestep, stop_early: see
            ``unet_self_attention_levels``.
        grid: the output grid (h, w); default the finest grid among the chosen blocks.
        source: stored in ``Attention.source``.

    Returns:
        Attention with matrix (B, N, N) float32 on the latents' device, N = h * w.
    """
    levels = unet_self_attention_levels(
        unet, latents, encoder_hidden_states, blocks=blocks, mode=mode, timestep=timestep,
        stop_early=stop_early,
    )
    target = levels[0][0] if grid is None else _check_grid(grid)
    out = None
    for level_grid, weight, m in levels:
        resampled = resample_attention(Attention(m, level_grid), target).matrix
        out = resampled * weight if out is None else out.add_(resampled, alpha=weight)
    return Attention.from_scores(out, target, source)


def _check_grid(grid) -> tuple[int, int]:
    try:
        h, w = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid: expected (h, w) with h, w >= 1, got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"grid: expected (h, w) with h, w >= 1, got {grid!r}")
    return h, w


# --------------------------------------------------------------------------- preprocessing


def sd2_input_size(
    height: int,
    width: int,
    *,
    resolution: Union[int, tuple[int, int], None] = 512,
    multiple: int = 64,
) -> tuple[int, int]:
    """The (H', W') an (height, width) image is resized to before the VAE.

    ``resolution`` int: the long side is scaled to it keeping the aspect ratio; None keeps the
    image's scale; then each side is rounded to the nearest multiple of ``multiple`` (at least
    one), halves up. ``resolution`` (H, W): exactly that size, which must be multiples of
    ``multiple``. ``multiple`` = VAE factor * UNet downsampling (8 * 8 = 64 for SD2), so every
    UNet level has an integer grid: a 512 x 512 image gives a 64 x 64 latent.
    """
    if height < 1 or width < 1:
        raise ValueError(f"sd2_input_size: expected a positive image size, got {height}x{width}")
    if isinstance(resolution, (tuple, list)):
        try:
            hh, ww = (int(r) for r in resolution)
        except (TypeError, ValueError):
            raise ValueError(f"resolution: expected an int, (H, W) or None, got {resolution!r}") from None
        if hh < multiple or ww < multiple or hh % multiple or ww % multiple:
            raise ValueError(
                f"resolution: (H, W) must be positive multiples of {multiple}, got {resolution!r}"
            )
        return hh, ww
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(
                f"resolution: expected a positive int (long side in pixels), (H, W) or None, got {resolution!r}"
            )
        scale = resolution / max(height, width)
        height, width = height * scale, width * scale
    return (
        max(multiple, int(math.floor(height / multiple + 0.5)) * multiple),
        max(multiple, int(math.floor(width / multiple + 0.5)) * multiple),
    )


def sd2_latents(vae: nn.Module, image: torch.Tensor, *, size: tuple[int, int]) -> torch.Tensor:
    """Noise-free latents of an image batch.

    The image is resized to ``size`` (bilinear, antialiased), mapped to [-1, 1] and encoded;
    the latent is the posterior mean (no sampling, no noise) times ``scaling_factor`` (after
    subtracting ``shift_factor`` when the VAE has one), as the SD pipelines scale latents.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        image: (B, 3, H, W) float in [0, 1].
        size: (H', W') pixels, multiples of the VAE factor.

    Returns:
        (B, latent_channels, H'/f, W'/f) in the VAE's dtype and device.
    """
    image = check_image(image)
    x = image.float()
    if tuple(size) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    param = next(vae.parameters())
    x = (x * 2 - 1).to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        mean = mean - shift
    return mean * float(getattr(vae.config, "scaling_factor", 1.0))


# --------------------------------------------------------------------------- provider


class SD2Attention(nn.Module):
    """Stable Diffusion 2 self-attention provider: image (B, 3, H, W) in [0, 1] -> ``Attention``.

    The image is resized (``sd2_input_size``), encoded to noise-free latents (``sd2_latents``),
    and ONE UNet step runs at ``timestep`` with the unconditional (empty-prompt) text embedding;
    the self-attention of ``blocks`` is captured and combined on one grid (module docstring).

    Args:
        vae: a diffusers ``AutoencoderKL``, or None to use only ``from_latents``.
        unet: a diffusers ``UNet2DConditionModel``.
        prompt_embeds: (1 or B, L, cross_attention_dim) text embedding of the empty prompt
            (``empty_prompt_embeds``); None: zeros of shape (1, 77, cross_attention_dim). Zeros
            are not what SD2 was trained with (its empty prompt is CLIP's "" embedding, far from
            zero); they only serve when no text encoder is available, and change the
            cross-attention outputs, hence the later blocks' inputs.
        blocks: module-name prefix -> weight, see ``unet_self_attention_levels``; default
            ``DEFAULT_BLOCKS`` = {"up_blocks.1": 0.5, "up_blocks.2": 0.5}.
        mode: "key-key" (default: symmetric logits, patches of one object attend to each other
            evenly) or "query-key" (the UNet's own attention probabilities).
        timestep: the diffusion timestep; default 0 (clean latents, no noise added).
        resolution: long side in pixels (int, default 512), exact (H, W), or None; see
            ``sd2_input_size``.
        grid: output grid (h, w); default the finest among the chosen blocks.
        stop_early: stop the UNet after the last chosen block (``unet_self_attention_levels``).
        source: description stored in ``Attention.source``.

    Call: image (B, 3, H, W) float in [0, 1] -> ``Attention`` with matrix (B, N, N) float32 on
    the image's device, grid (h, w); at 512 x 512 px with the default blocks, 32 x 32.
    """

    def __init__(
        self,
        vae: Optional[nn.Module],
        unet: nn.Module,
        *,
        prompt_embeds: Optional[torch.Tensor] = None,
        blocks=DEFAULT_BLOCKS,
        mode: AttentionMode = "key-key",
        timestep: Union[int, float] = 0,
        resolution: Union[int, tuple[int, int], None] = 512,
        grid: Optional[tuple[int, int]] = None,
        stop_early: bool = True,
        source: Optional[str] = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        self.unet_factor = _unet_factor(unet)
        self.blocks = dict(_block_weights(blocks))
        _select_modules(unet, self.blocks)  # validates the prefixes now rather than at call time
        cross_dim = unet.config.cross_attention_dim
        if prompt_embeds is None:
            if not isinstance(cross_dim, int):
                raise ValueError(
                    f"SD2Attention: unet.config.cross_attention_dim is {cross_dim!r}; pass prompt_embeds"
                )
            prompt_embeds = torch.zeros(1, 77, cross_dim)
        prompt_embeds = check_tensor(prompt_embeds, "prompt_embeds", 3, dims="(1 or B, L, D)")
        if isinstance(cross_dim, int) and prompt_embeds.shape[-1] != cross_dim:
            raise ValueError(
                f"prompt_embeds: expected last dimension {cross_dim} (unet.config.cross_attention_dim), "
                f"got shape {tuple(prompt_embeds.shape)}"
            )
        self.vae_factor = (
            2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else None
        )
        if vae is not None:
            latent_channels = getattr(vae.config, "latent_channels", None)
            if latent_channels is not None and latent_channels != unet.config.in_channels:
                raise ValueError(
                    f"SD2Attention: the VAE makes {latent_channels}-channel latents but the UNet "
                    f"takes {unet.config.in_channels}"
                )
            sd2_input_size(1, 1, resolution=resolution, multiple=self.vae_factor * self.unet_factor)
        self.vae = vae.eval() if vae is not None else None
        self.unet = unet.eval()
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
        self.mode = mode
        self.timestep = timestep
        self.resolution = resolution
        self.grid = None if grid is None else _check_grid(grid)
        self.stop_early = bool(stop_early)
        name = getattr(unet.config, "_name_or_path", "") or type(unet).__name__
        self.source = source or (
            f"sd2[{name}] {mode} blocks={self.blocks} t={timestep} resolution={resolution}"
        )

    def forward(self, image: torch.Tensor) -> Attention:
        """image (B, 3, H, W) in [0, 1] -> Attention, matrix (B, N, N) float32, grid (h, w)."""
        image = check_image(image)
        if self.vae is None:
            raise ValueError("SD2Attention: built without a VAE; call from_latents(latents) instead")
        size = sd2_input_size(
            image.shape[2], image.shape[3], resolution=self.resolution,
            multiple=self.vae_factor * self.unet_factor,
        )
        latents = sd2_latents(self.vae, image, size=size)
        att = self.from_latents(latents)
        return Attention(att.matrix.to(image.device), att.grid, att.source)

    def from_latents(self, latents: torch.Tensor) -> Attention:
        """latents (B, C, h, w) (scaled, as the UNet takes them) -> Attention on the chosen grid."""
        return unet_self_attention(
            self.unet, latents, self.prompt_embeds, blocks=self.blocks, mode=self.mode,
            timestep=self.timestep, grid=self.grid, stop_early=self.stop_early, source=self.source,
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, blocks={self.blocks}, timestep={self.timestep}, "
            f"resolution={self.resolution}, grid={self.grid}"
        )


def build_sd2(weights: str = DEFAULT_WEIGHTS, **options) -> SD2Attention:
    """A Stable Diffusion 2 attention provider.

    Args:
        weights: a Hugging Face repo id or a local directory in the diffusers layout
            (``load_sd2``).
        **options:
            ``empty_prompt``: "text-encoder" (default: run the text encoder on "" once, at build
            time, then drop it) or "zeros" (zeros of shape (1, 77, cross_attention_dim), for
            weights without a text encoder); ``prompt_embeds``: a precomputed (1 or B, L, D)
            tensor, overrides ``empty_prompt``;
            ``device`` (default "cuda" when available, else "cpu"), ``dtype`` (default float16
            on CUDA, float32 on CPU), ``local_files_only`` (None: follow ``HF_HUB_OFFLINE``);
            ``blocks``, ``mode``, ``timestep``, ``resolution``, ``grid``, ``stop_early``,
            ``source``: see ``SD2Attention``.

    Returns:
        provider: image (B, 3, H, W) in [0, 1] -> Attention, matrix (B, N, N).
    """
    empty_prompt = options.pop("empty_prompt", "text-encoder")
    prompt_embeds = options.pop("prompt_embeds", None)
    device = options.pop("device", None)
    dtype = options.pop("dtype", None)
    local_files_only = options.pop("local_files_only", None)
    if empty_prompt not in ("text-encoder", "zeros"):
        raise ValueError(f"empty_prompt: expected 'text-encoder' or 'zeros', got {empty_prompt!r}")
    parts = load_sd2(
        weights,
        local_files_only=local_files_only,
        text_encoder=prompt_embeds is None and empty_prompt == "text-encoder",
        device=device,
        dtype=dtype,
    )
    if prompt_embeds is None:
        prompt_embeds = parts.prompt_embeds  # None for "zeros": SD2Attention makes them
    return SD2Attention(parts.vae, parts.unet, prompt_embeds=prompt_embeds, **options)


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class SD2Components:
    """What ``load_sd2`` returns.

    Attributes:
        vae: diffusers ``AutoencoderKL`` (eval, no gradients).
        unet: diffusers ``UNet2DConditionModel`` (eval, no gradients).
        prompt_embeds: (1, L, D) float32 CPU embedding of the empty prompt, or None when the
            text encoder was not asked for.
    """

    vae: nn.Module
    unet: nn.Module
    prompt_embeds: Optional[torch.Tensor]


def load_sd2(
    weights: str = DEFAULT_WEIGHTS,
    *,
    local_files_only: Optional[bool] = None,
    text_encoder: bool = True,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> SD2Components:
    """Load SD2's VAE and UNet (and the empty-prompt embedding), cached per process.

    Args:
        weights: a Hugging Face repo id (subfolders vae/, unet/, text_encoder/, tokenizer/) or a
            local directory in the diffusers layout (at least vae/ and unet/ with config.json).
        local_files_only: for repo ids; None follows ``HF_HUB_OFFLINE`` (read at call time).
        text_encoder: load ``CLIPTextModel`` + ``CLIPTokenizer`` to make the empty-prompt
            embedding (then free them); False: ``prompt_embeds`` is None.
        device: default "cuda" when available, else "cpu".
        dtype: default float16 on CUDA, float32 elsewhere.

    Returns:
        ``SD2Components``. The same objects are returned for the same arguments (one entry is
        cached: the float32 SD2 UNet alone is 3.5 GB); do not modify them in place.

    Raises:
        ValueError: unknown or missing weights, saying what was given and how to get them.
    """
    if not isinstance(weights, str) or not weights.strip():
        raise ValueError(f"SD2 weights: expected a non-empty string, got {weights!r}; {_HOW_TO_GET}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    path = Path(weights).expanduser()
    if path.is_dir():
        needed = ["vae", "unet"] + (["text_encoder", "tokenizer"] if text_encoder else [])
        missing = [
            sub for sub in needed
            if not (path / sub).is_dir()
            or (sub != "tokenizer" and not (path / sub / "config.json").is_file())
        ]
        if missing:
            raise ValueError(
                f"SD2 weights: directory {weights!r} lacks {', '.join(f'{m}/' for m in missing)} "
                f"(with config.json); {_HOW_TO_GET}"
            )
        resolved = path.resolve()
        stamp = tuple(
            sorted(
                (str(p.relative_to(resolved)), p.stat().st_mtime_ns, p.stat().st_size)
                for sub in needed for p in (resolved / sub).iterdir() if p.is_file()
            )
        )
        return _load_cached("directory", str(resolved), True, stamp, bool(text_encoder), str(device), dtype)
    offline = _check_hub_reference(
        "SD2", weights, local_files_only, "unet/config.json", _HOW_TO_GET,
        f"download it on a machine with internet (`hf download {weights}`, about 5 GB) and copy the "
        "Hugging Face cache (~/.cache/huggingface/hub), or pass a diffusers directory (--attention-weights DIR)")
    return _load_cached("hub", weights, offline, (), bool(text_encoder), str(device), dtype)


def empty_prompt_embeds(text_encoder: nn.Module, tokenizer) -> torch.Tensor:
    """The text embedding of the empty prompt, as the SD pipelines make it.

    ``tokenizer("")`` padded to ``model_max_length``, through the text encoder, last hidden
    state (SD2's text encoder already ends at OpenCLIP-H's penultimate layer); the attention
    mask is passed only when ``text_encoder.config.use_attention_mask`` is set, as in
    ``StableDiffusionPipeline.encode_prompt``.

    Returns:
        (1, L, D) float32 on CPU.
    """
    tokens = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )
    param = next(text_encoder.parameters())
    kwargs = {}
    if getattr(text_encoder.config, "use_attention_mask", False):
        kwargs["attention_mask"] = tokens.attention_mask.to(param.device)
    with torch.no_grad():
        out = text_encoder(tokens.input_ids.to(param.device), **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return hidden.float().cpu()


@functools.lru_cache(maxsize=1)
def _load_cached(
    kind: str, key: str, local_files_only: bool, stamp: tuple, text_encoder: bool, device: str,
    dtype: torch.dtype,
) -> SD2Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    where = "local directory" if kind == "directory" else (
        "Hugging Face repo id (offline: only the local cache was searched)"
        if local_files_only else "Hugging Face repo id"
    )

    def load(cls, subfolder, **extra):
        try:
            return cls.from_pretrained(
                key, subfolder=subfolder, local_files_only=local_files_only, **extra
            )
        except (OSError, ValueError) as err:  # EnvironmentError, LocalEntryNotFoundError, ...
            raise ValueError(
                f"SD2 weights: could not load {subfolder}/ of {key!r} as a {where}: {err}; {_HOW_TO_GET}"
            ) from err

    vae = load(AutoencoderKL, "vae", torch_dtype=dtype)
    unet = load(UNet2DConditionModel, "unet", torch_dtype=dtype)
    prompt = None
    if text_encoder:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = load(CLIPTokenizer, "tokenizer")
        encoder = load(CLIPTextModel, "text_encoder", torch_dtype=dtype)
        encoder = encoder.to(device).eval().requires_grad_(False)
        prompt = empty_prompt_embeds(encoder, tokenizer)
        del encoder, tokenizer  # the text encoder is needed only for this one embedding
    vae = vae.to(device).eval().requires_grad_(False)
    unet = unet.to(device).eval().requires_grad_(False)
    return SD2Components(vae, unet, prompt)
