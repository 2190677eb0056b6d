"""mmsegmentation integration: dslo as an mmseg segmentor, a refining wrapper around any mmseg
segmentor, the eight OVSS benchmark datasets, and evaluation through mmseg's ``IoUMetric``.

Importing this module imports mmseg and registers, in mmseg's registries:

- ``OVSSSegmentor``: adapter (patch logits) + attention provider + ``DiscrepancyRefiner``
  as an mmseg ``BaseSegmentor``, whole-image inference, labels at the original resolution;
- ``RefinedSegmentor``: wraps another mmseg segmentor config (a peer's, or any trained model),
  reads its patch logits with ``dslo.adapters.HookAdapter`` and refines them;
- ``PascalVOC20Dataset`` and ``COCOObjectDataset``: the two benchmark datasets mmseg lacks
  (same definitions as SCLIP and its successors; ``mmseg_data``);
- ``DsloUnwrapped``: the model wrapper ``run_eval`` uses (``mmseg_eval``).

Configs: ``configs/`` beside this file (``config_path("eval/voc21.py")``); a config needs
``custom_imports = dict(imports=["dslo.integrations.mmseg"])`` so that mmseg finds these.

This module holds the two segmentors and is the public entry: it re-exports the mmcv / mmseg
compatibility layer (``mmseg_compat``: the ``mmcv.ops`` stand-in, installed before the first
mmseg import, ``import_mmseg``, ``load_checkpoint`` for mmengine checkpoints under torch's
``weights_only`` loader), the dataset configs (``mmseg_data``) and ``run_eval``
(``mmseg_eval``). Tested with mmsegmentation 1.2.2, mmengine 0.10.7, mmcv-lite 2.1.0
(``pip install 'dslo[mmseg]'``).
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .mmseg_compat import (TESTED_VERSIONS, allow_mmengine_checkpoints, import_mmseg, install_mmcv_ops_standin,
                           load_checkpoint)

__all__ = [
    "TESTED_VERSIONS",
    "install_mmcv_ops_standin",
    "import_mmseg",
    "allow_mmengine_checkpoints",
    "load_checkpoint",
    "config_path",
    "dataset_config",
    "default_pipeline",
    "eval_config",
    "run_eval",
    "OVSSSegmentor",
    "RefinedSegmentor",
]

import_mmseg()  # the mmcv.ops stand-in before the first mmseg import

from mmengine.structures import PixelData  # noqa: E402
from mmseg.models.segmentors import BaseSegmentor  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from ..adapters.base import TextFeatures  # noqa: E402
from ..refiners import DiscrepancyRefiner  # noqa: E402
from .experiments import (Pipeline, _dummy_attention, build_adapter_by_name, build_provider,  # noqa: E402
                          parse_solver)
# importing these registers the datasets and the model wrapper
from .mmseg_data import (COCOObjectDataset, PascalVOC20Dataset, config_path, dataset_config,  # noqa: E402,F401
                         default_pipeline)
from .mmseg_eval import DsloUnwrapped, eval_config, run_eval  # noqa: E402,F401


def _unit_rgb(data_preprocessor, inputs: torch.Tensor) -> torch.Tensor:
    """Undo an mmseg ``SegDataPreProcessor``: (B, 3, H, W) normalised -> RGB in [0, 1]."""
    x = inputs.float()
    if getattr(data_preprocessor, "_enable_normalize", False):
        x = x * data_preprocessor.std.to(x) + data_preprocessor.mean.to(x)
    x = x / 255.0
    if not getattr(data_preprocessor, "channel_conversion", False):
        x = x.flip(1)  # mmseg loads BGR with cv2; without bgr_to_rgb the channels are still BGR
    return x.clamp(0, 1)


def _undo_geometry(x: torch.Tensor, meta: Mapping) -> torch.Tensor:
    """Crop test-time padding and undo a flip of one (1, C, H, W) input."""
    pad = meta.get("img_padding_size", meta.get("padding_size", None))
    if pad:
        left, right, top, bottom = (int(p) for p in pad)
        x = x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]
    if meta.get("flip", False):
        x = x.flip(3) if meta.get("flip_direction", "horizontal") == "horizontal" else x.flip(2)
    return x


class _RefiningSegmentor(BaseSegmentor):
    """Shared predict: per image, undo padding/flip, back to RGB [0, 1], patch logits ->
    attention -> refiner with the image at its original size as guide -> labels there."""

    align_corners = False

    def _patch_logits(self, inputs: torch.Tensor, image01: torch.Tensor, metas: list) -> torch.Tensor:
        raise NotImplementedError

    def _attention(self, image01: torch.Tensor):
        raise NotImplementedError

    def _refine(self, inputs: torch.Tensor, data_samples) -> list:
        """inputs (B, 3, H, W) preprocessed -> list of RefinerOutput (labels at each ori_shape)."""
        b = inputs.shape[0]
        metas = [ds.metainfo for ds in data_samples] if data_samples else \
            [dict(ori_shape=tuple(inputs.shape[-2:]), img_shape=tuple(inputs.shape[-2:]))] * b
        outs = []
        for i in range(b):  # images of a batch differ in original size: one at a time
            x = _undo_geometry(inputs[i:i + 1], metas[i])
            image01 = _unit_rgb(self.data_preprocessor, x)
            ori = tuple(int(s) for s in metas[i].get("ori_shape", x.shape[-2:])[:2])
            guide = image01 if tuple(image01.shape[-2:]) == ori else \
                F.interpolate(image01, size=ori, mode="bilinear", align_corners=False).clamp(0, 1)
            logits = self._patch_logits(x, image01, [metas[i]])
            if self.refiner.config.solver in ("none", "kl"):
                att = _dummy_attention(logits)
            else:
                att = self._attention(image01)
            outs.append(self.refiner(logits.float(), att, guide))
        return outs

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, data_samples=None) -> list:
        """inputs (B, 3, H, W) from the data preprocessor -> ``SegDataSample`` list with
        ``pred_sem_seg`` (1, H0, W0) int64 at each image's original size and ``seg_logits``
        (C, H0, W0) (the refiner's scores; rejected classes at a finite floor)."""
        outs = self._refine(inputs, data_samples)
        if data_samples is None:
            data_samples = [SegDataSample() for _ in outs]
        for sample, out in zip(data_samples, outs):
            scores = out.scores[0]
            finite = scores[torch.isfinite(scores)]
            floor = (finite.min() - 1) if finite.numel() else scores.new_tensor(-1.0)
            sample.set_data({"seg_logits": PixelData(data=torch.where(torch.isfinite(scores), scores, floor)),
                             "pred_sem_seg": PixelData(data=out.labels)})
        return data_samples

    def _forward(self, inputs: torch.Tensor, data_samples=None) -> torch.Tensor:
        """Refined scores of the first image's size, (B, C, H0, W0) (images of equal size)."""
        return torch.cat([o.scores for o in self._refine(inputs, data_samples)])

    def encode_decode(self, inputs: torch.Tensor, batch_img_metas: list) -> torch.Tensor:
        samples = [SegDataSample(metainfo=m) for m in batch_img_metas]
        return torch.cat([o.scores for o in self._refine(inputs, samples)])

    def loss(self, inputs, data_samples) -> dict:
        raise NotImplementedError(f"{type(self).__name__} is training-free: use it with Runner.test / predict")


def _mmseg_scope():
    """mmseg as the default registry scope while building (BaseModel builds the data
    preprocessor from mmengine's root registry, which finds mmseg's types only through the
    default scope; the Runner sets it, plain Python use does not)."""
    from contextlib import nullcontext

    from mmengine.registry import DefaultScope

    current = DefaultScope.get_current_instance()
    if current is not None and current.scope_name == "mmseg":
        return nullcontext()
    return DefaultScope.overwrite_default_scope("mmseg")


def _build_refiner(refiner: Union[Mapping, DiscrepancyRefiner, None]) -> DiscrepancyRefiner:
    if isinstance(refiner, DiscrepancyRefiner):
        return refiner
    cfg = dict(refiner or {})
    _, built = parse_solver(str(cfg.pop("solver", "velocity")))
    return DiscrepancyRefiner(built.config.replace(**cfg)) if cfg else built


def _adopt_provider(owner: torch.nn.Module, provider, home: Optional[torch.nn.Module] = None) -> None:
    """Register the provider's model (behind a cache wrapper, if any), or the ``_ProviderHome``
    of a lazy one, as a submodule, so that ``model.to(device)`` (the Runner's move to the GPU)
    moves it with the adapter."""
    inner = home if home is not None else getattr(provider, "provider", provider)
    if isinstance(inner, torch.nn.Module) and not any(inner is m for m in owner.modules()):
        owner.attention_model = inner


class _ProviderHome(torch.nn.Module):
    """Where a lazily built attention provider lives inside a segmentor.

    The provider is built on the device this module is on at build time, read off an empty
    buffer: the segmentor holds this module as a submodule, so the buffer follows
    ``model.to(device)`` / ``.cuda()`` (the Runner moves the model after building it and
    before any image arrives), and the provider lands where the images are. Once built, the
    provider (when an ``nn.Module``) is the submodule ``model`` and follows later moves.

    Args:
        build: device -> provider (image (B, 3, H, W) in [0, 1] -> ``Attention``).
        device: the device before any move (None: CPU).
    """

    def __init__(self, build: Callable[[torch.device], Callable], device=None) -> None:
        super().__init__()
        self._build = build
        self.model = None
        self.register_buffer("_anchor", torch.empty(0, device=device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def build(self) -> Callable:
        """The provider, built now on ``self.device`` if it was not yet."""
        if self.model is None:
            self.model = self._build(self.device)
        return self.model


def _build_attention(attention, weights_dir, cache, device=None) -> tuple[Optional[Callable], Optional[torch.nn.Module]]:
    """dict(name=..., weights=..., **options) / "name" / callable / None ("own") -> (provider,
    the ``_ProviderHome`` of a named one).

    A named provider is built on its first use: the first cache miss when ``cache`` is set (so
    with every map in the cache, SD2 is never loaded), on the device its home is on then;
    ``device`` is that device when nothing moved the segmentor since.
    """
    if attention is None or attention == "own" or (isinstance(attention, Mapping) and attention.get("name") == "own"):
        return None, None
    if callable(attention):
        return attention, None
    if isinstance(attention, str):
        attention = {"name": attention}
    opts = dict(attention)
    name = opts.pop("name", None)
    if name is None:
        raise ValueError(f"attention config needs name=...: {dict(attention)}")
    kwargs = dict(weights=opts.pop("weights", None), weights_dir=weights_dir, options=opts)
    provider = build_provider(name, **kwargs, cache=cache, lazy=True, device=device)
    home = _ProviderHome(lambda dev: build_provider(name, **kwargs, device=dev), device)
    lazy = getattr(provider, "provider", provider)
    # the lazy layer of build_provider builds on the device fixed now, which is wrong once the
    # Runner has moved the segmentor: route its build through the home, which reads the
    # device at build time. The layer itself stays, as the cache's weight identity may build
    # through it (weights not yet on the machine), so both paths share one model.
    if callable(getattr(lazy, "_build", None)):
        lazy._build = home.build
    return provider, home


def _check_device(device) -> Optional[torch.device]:
    """None -> None; "cpu" / "cuda" / "cuda:N" / torch.device -> torch.device, checked to exist."""
    if device is None:
        return None
    from ..attention.base import resolve_device

    return resolve_device(device)


@MODELS.register_module(force=True)
class OVSSSegmentor(_RefiningSegmentor):
    """A dslo pipeline as an mmseg segmentor (training-free, whole-image inference).

    Args:
        adapter: ``dict(name="clip", model="ViT-B-16", pretrained="openai", size=(512, 512),
            **adapter options)`` (``experiments.build_adapter_by_name``; ``model`` may be an
            open_clip model-config JSON path, ``pretrained=None`` for random weights) or an
            adapter object. ``size``: the (H, W) every image is resized to for the adapter;
            the paper and the shipped config use (512, 512); an int is a short side (aspect
            kept); the builder's default is a 448 short side.
        attention: ``dict(name="sd2" | "dinov2" | "clip" | "affinity", weights=..., **options)``,
            a name, "own" / None (the adapter's own attention), or a callable. A named provider
            is built on its first cache miss, on the device the segmentor is on then (so with
            every map in ``cache``, SD2 is never loaded; the cache keys by the weight files, so
            they must be on the machine).
        refiner: ``dict(solver="velocity", **RefinerConfig fields)`` or a ``DiscrepancyRefiner``.
        classes: a benchmark class file name ("voc21", "ade20k", ...), a class-file path, or a
            list of names; must match the dataset's label order.
        weights_dir: local folder searched for weights (see ``weights.load_clip_model``).
        cache: attention cache folder, True for the default one, None for none.
        device: "cpu", "cuda", "cuda:N" or None: the adapter is built there, the vocabulary
            encoded there, and the whole segmentor moved there. None: built on the CPU (the
            Runner then moves it to its device).
        data_preprocessor: default ``SegDataPreProcessor`` with mean 0, std 255, RGB: the
            model sees [0, 1] images (any other normalisation is undone).

    ``predict`` returns labels at each image's original size: the adapter and attention see the
    pipeline's image, the refiner upsamples (JBU) guided by that image resized to ``ori_shape``.

    The encoded vocabulary is kept as non-persistent buffers (``text_features`` (Q, D),
    ``text_query_to_class`` (Q,)), so ``.to(device)``, ``.cuda()`` and dtype casts reach it;
    it is not part of the state dict.
    """

    def __init__(self, adapter: Union[Mapping, object, None] = None, attention=None, refiner=None,
                 classes: Union[str, Sequence] = "voc21", weights_dir: Optional[str] = None, cache=None,
                 device: Union[str, torch.device, None] = None, data_preprocessor: Optional[Mapping] = None,
                 init_cfg: Optional[Mapping] = None) -> None:
        dev = _check_device(device)
        if data_preprocessor is None:
            data_preprocessor = dict(type="SegDataPreProcessor", mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0],
                                     bgr_to_rgb=True)
        with _mmseg_scope():
            super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        adapter = {"name": "clip"} if adapter is None else adapter
        if isinstance(adapter, Mapping):
            opts = dict(adapter)
            name = opts.pop("name", "clip")
            opts.setdefault("device", dev)  # an adapter-level device is kept for the build
            adapter = build_adapter_by_name(name, weights_dir=weights_dir, **opts)
        elif dev is not None and isinstance(adapter, torch.nn.Module):
            adapter = adapter.to(dev)  # before encode_text, which runs where the adapter is
        self.adapter = adapter
        self.refiner = _build_refiner(refiner)
        provider, home = _build_attention(attention if attention is not None else "own", weights_dir, cache, dev)
        if provider is None and not callable(getattr(adapter, "attention", None)):
            raise ValueError(f"OVSSSegmentor: attention 'own' needs an adapter with an attention of its own "
                             f"(sc-clip, cass, proxyclip); {type(adapter).__name__} has none: give attention=dict(name=...)")
        self._provider = provider
        _adopt_provider(self, provider, home)
        text = adapter.encode_text(list(classes) if isinstance(classes, tuple) else classes)
        # buffers, not attributes of a frozen TextFeatures: Module._apply (to / cuda / double)
        # reaches buffers only; _apply rebuilds the TextFeatures the pipeline reads around them
        self.register_buffer("text_features", text.features, persistent=False)
        self.register_buffer("text_query_to_class", text.query_to_class, persistent=False)
        self._text = text
        self.num_classes = int(text.num_classes)
        self.pipeline = Pipeline(self.adapter, text, provider, self.refiner)
        if dev is not None:
            self.to(dev)  # the data preprocessor's device, the refiner, the provider's home

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        text = getattr(self, "_text", None)
        if text is not None and (text.features is not self.text_features
                                 or text.query_to_class is not self.text_query_to_class):
            self._text = TextFeatures(self.text_features, self.text_query_to_class, text.class_names,
                                      text.templates)
            self.pipeline.text = self._text
        return self

    def extract_feat(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed -> per-class patch logits (B, C, h, w)."""
        return self.pipeline.logits(_unit_rgb(self.data_preprocessor, inputs))

    def _patch_logits(self, inputs, image01, metas):
        return self.pipeline.logits(image01)

    def _attention(self, image01):
        return self.pipeline.attend(image01)


def _import_callable(spec: Union[str, Callable, None]) -> Optional[Callable]:
    """``"package.module:function"`` -> the function (configs hold strings, not objects)."""
    if spec is None or callable(spec):
        return spec
    module, colon, attr = str(spec).partition(":")
    if not colon:
        raise ValueError(f"to_logits: expected 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"to_logits: cannot import {spec!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"to_logits: {spec!r} is not callable")
    return fn


@MODELS.register_module(force=True)
class RefinedSegmentor(_RefiningSegmentor):
    """Any mmseg segmentor, its patch logits refined by dslo.

    Args:
        segmentor: the config of the wrapped segmentor (any registered type, e.g. a peer's
            ``EncoderDecoder`` or its own OVSS segmentor); its ``data_preprocessor`` is used.
        layers: submodule(s) of the wrapped segmentor whose output (or input) holds the patch
            logits, as ``HookAdapter`` takes them: a name (default ``"decode_head.conv_seg"``,
            the classifier of every mmseg decode head), a list, or ``{name: "output"|"input"}``.
        to_logits: ``"package.module:function"`` (or a callable) ``(captured, image) ->
            PatchLogits | (B, C, h, w)``; default: the single captured tensor.
        run: how the wrapped model is run: "encode_decode" (default) or "predict".
        stop_early: stop the wrapped forward once the layers are captured.
        attention: as ``OVSSSegmentor``; None uses the wrapped model's ``attention(image)``
            if it has one.
        refiner: as ``OVSSSegmentor``. The refiner tells the logits' form from their values
            (``RefinerConfig.logits="auto"``) and picks their temperature per image
            (``logit_scale="auto"``), so a decode head's scale does not matter;
            ``logits="scores"`` says what they are explicitly, as the shipped config does.
        checkpoint: weights of the wrapped segmentor (mmseg checkpoint), loaded with
            ``load_checkpoint``; ``trust_checkpoint`` allows full unpickling.
        device: as ``OVSSSegmentor``: the built segmentor (wrapped model included) is moved
            there; None leaves it on the CPU for the Runner to move.
    """

    def __init__(self, segmentor: Mapping, layers: Union[str, Sequence[str], Mapping] = "decode_head.conv_seg",
                 to_logits: Union[str, Callable, None] = None, run: str = "encode_decode", stop_early: bool = True,
                 attention=None, refiner=None, checkpoint: Optional[str] = None, trust_checkpoint: bool = False,
                 weights_dir: Optional[str] = None, cache=None, device: Union[str, torch.device, None] = None,
                 data_preprocessor: Optional[Mapping] = None, init_cfg: Optional[Mapping] = None) -> None:
        from ..adapters import HookAdapter

        dev = _check_device(device)
        if not isinstance(segmentor, Mapping) or "type" not in segmentor:
            raise ValueError(f"RefinedSegmentor: segmentor must be an mmseg model config with a type, got {segmentor!r}")
        if run not in ("encode_decode", "predict"):
            raise ValueError(f"RefinedSegmentor: run must be 'encode_decode' or 'predict', got {run!r}")
        inner_cfg = dict(segmentor)
        with _mmseg_scope():
            super().__init__(data_preprocessor=None, init_cfg=init_cfg)
            self.segmentor = MODELS.build(inner_cfg)
            if data_preprocessor is not None:
                self.data_preprocessor = MODELS.build(data_preprocessor)
            else:
                # the wrapped model expects its own normalisation; inputs arrive through ours
                self.data_preprocessor = self.segmentor.data_preprocessor
        if checkpoint is not None:
            load_checkpoint(self.segmentor, checkpoint, trusted=trust_checkpoint)
        self.run = run
        self._metas: list = []
        self._samples: list = []
        self.hooks = HookAdapter(self.segmentor, layers, _import_callable(to_logits), forward=self._run_inner,
                                 stop_early=stop_early)
        self.refiner = _build_refiner(refiner)
        provider, home = _build_attention(attention, weights_dir, cache, dev)
        if provider is None:
            own = getattr(self.segmentor, "attention", None)
            if not callable(own):
                raise ValueError("RefinedSegmentor: give attention=dict(name=...) (the wrapped segmentor has no "
                                 "attention(image) of its own)")
            provider = own
        self._provider = provider
        _adopt_provider(self, provider, home)
        if dev is not None:
            self.to(dev)

    def _run_inner(self, model, inputs):
        if self.run == "predict":
            return model.predict(inputs, self._samples)
        return model.encode_decode(inputs, self._metas)

    def extract_feat(self, inputs: torch.Tensor) -> torch.Tensor:
        metas = [dict(ori_shape=tuple(inputs.shape[-2:]), img_shape=tuple(inputs.shape[-2:]))] * inputs.shape[0]
        return self._patch_logits(inputs, None, metas)

    def _patch_logits(self, inputs, image01, metas):
        self._metas = list(metas)
        self._samples = [SegDataSample(metainfo=m) for m in metas]
        patch = self.hooks(inputs)
        return patch.per_class()

    def _attention(self, image01):
        return self._provider(image01)
