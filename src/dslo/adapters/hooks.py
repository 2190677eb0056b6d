"""Wrap any existing segmentation model: read its patch logits with forward hooks.

``HookAdapter(model, layers, to_logits)`` registers forward hooks on named submodules
(``dict(model.named_modules())[name]``), runs the model, and hands the captured tensors to
``to_logits(captured, image) -> PatchLogits`` (or a (B, Q, h, w) tensor). Nothing is patched
permanently: hooks are registered for one call and removed in a ``finally`` (also when the
forward raises), or kept for the body of a ``with`` block and removed on exit.

``wrap(model, refiner, attention, to_logits=..., layers=...)`` returns an ``nn.Module`` whose
``forward(image)`` gives refined labels (B, H, W): a drop-in replacement for the model.

The style follows pytorch-grad-cam's ``ActivationsAndGradients`` (handles kept and released),
without its persistent registration.
"""

from __future__ import annotations

import difflib
from typing import Callable, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..refiners.records import Attention, PatchLogits, RefinerOutput

__all__ = ["HookAdapter", "RefinedModel", "wrap"]

Capture = Literal["output", "input"]
ToLogits = Callable[[dict, torch.Tensor], Union[PatchLogits, torch.Tensor]]


class _CaptureDone(Exception):
    """Raised inside a hook to stop the forward once every layer has been captured."""


class HookAdapter:
    """Patch logits of an arbitrary model, read by forward hooks.

    Args:
        model: any ``nn.Module``.
        layers: submodule names (``model.named_modules()``): a name, a list of names (capture
            each module's output), or a mapping name -> "output" | "input" (the first
            positional input, e.g. the logits entering an upsampling module).
        to_logits: ``(captured, image) -> PatchLogits`` or a (B, Q, h, w) tensor of raw
            cosine logits; ``captured`` maps each layer name to its tensor (or whatever the
            module returned, e.g. a tuple). Default: the single layer's tensor as is.
        forward: how to run the model, ``forward(model, image)``; default ``model(image)``.
        stop_early: stop the forward (by an exception caught here) as soon as every layer has
            been captured, skipping the model's own upsampling and post-processing.
        no_grad: run under ``torch.no_grad()`` (default True).

    Call: ``adapter(image) -> PatchLogits``. As a context manager, the hooks stay registered
    for the body (so your own ``model(image)`` calls fill ``adapter.captured``) and are removed
    on exit, even when the body raises; ``adapter.logits(image)`` then builds the logits from
    the last capture.
    """

    def __init__(self, model: nn.Module, layers: Union[str, Sequence[str], Mapping[str, Capture]],
                 to_logits: Optional[ToLogits] = None, *, forward: Optional[Callable] = None,
                 stop_early: bool = False, no_grad: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"HookAdapter: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str):
            layers = {layers: "output"}
        elif not isinstance(layers, Mapping):
            layers = {name: "output" for name in layers}
        if not layers:
            raise ValueError("HookAdapter: expected at least one layer name")
        modules = dict(model.named_modules())
        for name, what in layers.items():
            if what not in ("output", "input"):
                raise ValueError(f"HookAdapter: layer {name!r}: capture must be 'output' or 'input', got {what!r}")
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
                raise ValueError(
                    f"HookAdapter: {type(model).__name__} has no submodule {name!r}"
                    + (f"; close names: {close}" if close else f"; some names: {[n for n in modules if n][:10]}")
                )
        if to_logits is None and len(layers) != 1:
            raise ValueError("HookAdapter: give to_logits=... when capturing more than one layer")
        self.model = model
        self.layers = dict(layers)
        self.to_logits = to_logits
        self.forward_fn = forward
        self.stop_early = bool(stop_early)
        self.no_grad = bool(no_grad)
        self.captured: dict = {}
        self._handles: list = []
        self._entered = False

    # -- hooks --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _make_hook(self, name: str, what: Capture):
        def hook(module, args, output):
            value = output if what == "output" else (args[0] if args else None)
            self.captured[name] = value.detach() if isinstance(value, torch.Tensor) else value
            if self.stop_early and all(n in self.captured for n in self.layers):
                raise _CaptureDone
        return hook

    def register(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        try:
            for name, what in self.layers.items():
                self._handles.append(modules[name].register_forward_hook(self._make_hook(name, what)))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook this adapter registered."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "HookAdapter":
        self.register()
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        self._entered = False
        self.remove()

    def __del__(self) -> None:  # best effort: never leave hooks behind
        try:
            self.remove()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- running ------------------------------------------------------------------------

    def capture(self, image: torch.Tensor) -> dict:
        """Run the model on ``image`` and return the captured tensors (name -> tensor)."""
        self.captured = {}
        temporary = not self._handles
        if temporary:
            self.register()
        try:
            with torch.no_grad() if self.no_grad else torch.enable_grad():
                try:
                    if self.forward_fn is not None:
                        self.forward_fn(self.model, image)
                    else:
                        self.model(image)
                except _CaptureDone:
                    pass
        finally:
            if temporary:
                self.remove()
        missing = [n for n in self.layers if n not in self.captured]
        if missing:
            raise ValueError(f"HookAdapter: the forward never ran layer(s) {missing}; check the layer names")
        return dict(self.captured)

    def logits(self, image: torch.Tensor, captured: Optional[dict] = None) -> PatchLogits:
        """Build ``PatchLogits`` from a capture (default: the last one)."""
        captured = self.captured if captured is None else captured
        if self.to_logits is None:
            out = next(iter(captured.values()))
        else:
            out = self.to_logits(captured, image)
        if isinstance(out, PatchLogits):
            return out
        if isinstance(out, torch.Tensor):
            return PatchLogits(out.float())
        raise ValueError(
            f"HookAdapter: to_logits must return PatchLogits or a (B, Q, h, w) tensor, got {type(out).__name__}"
        )

    def __call__(self, image: torch.Tensor) -> PatchLogits:
        return self.logits(image, self.capture(image))


class RefinedModel(nn.Module):
    """A model followed by the DSLO refiner: ``forward(image) -> labels (B, H, W)``.

    Built by ``wrap``. ``refine(image)`` returns the full ``RefinerOutput``; ``patch_logits``
    the model's ``PatchLogits``.
    """

    def __init__(self, source: Callable[[torch.Tensor], PatchLogits], model: nn.Module, refiner: nn.Module,
                 attention: Callable[[torch.Tensor], Attention]) -> None:
        super().__init__()
        self.model = model
        self.refiner = refiner
        if isinstance(attention, nn.Module):
            self.attention = attention
        else:
            self._attention_fn = attention
        self._source = source

    def _attention(self, image: torch.Tensor):
        fn = self.attention if "attention" in self._modules else self._attention_fn
        return fn(image)

    def patch_logits(self, image: torch.Tensor) -> PatchLogits:
        return self._source(image)

    def refine(self, image: torch.Tensor) -> RefinerOutput:
        patch = self.patch_logits(image)
        from ..refiners.refiner import DiscrepancyRefiner

        if isinstance(self.refiner, DiscrepancyRefiner):
            # the adapter knows what its numbers are (cosines, scores, ...): say so
            return self.refiner(patch.per_class(), self._attention(image), image, kind=patch.kind)
        return self.refiner(patch.per_class(), self._attention(image), image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.refine(image).labels


def wrap(model: nn.Module, refiner: Optional[nn.Module] = None, attention: Optional[Callable] = None, *,
         to_logits: Optional[ToLogits] = None, layers=None, text=None, forward: Optional[Callable] = None,
         stop_early: bool = False) -> RefinedModel:
    """Turn a segmentation model into one that returns DSLO-refined labels.

    Args:
        model: an OVSS model. With ``layers``: any ``nn.Module``, read by ``HookAdapter``
            (``to_logits`` builds the patch logits from the captured tensors). Without:
            ``model(image)`` must return ``PatchLogits`` or (B, Q, h, w) logits, or, with
            ``text``, ``model(image, text)`` must (a ``dslo.adapters`` adapter).
        refiner: a ``dslo.DiscrepancyRefiner`` (default ``DiscrepancyRefiner()``).
        attention: ``image -> Attention`` (e.g. ``dslo.attention.build_attention("dinov2")``);
            default the model's own ``model.attention`` if it has one.
        to_logits, layers, forward, stop_early: see ``HookAdapter``.
        text: ``TextFeatures`` or class names for an adapter.

    Returns:
        ``RefinedModel``: ``forward(image (B, 3, H, W) in [0, 1]) -> labels (B, H, W)``.
    """
    if refiner is None:
        from ..refiners.refiner import DiscrepancyRefiner

        refiner = DiscrepancyRefiner()
    if attention is None:
        attention = getattr(model, "attention", None)
        if not callable(attention):
            raise ValueError(
                "wrap: give attention=... (image -> dslo.Attention, e.g. "
                "dslo.attention.build_attention('dinov2')); the model has no attention() of its own"
            )
    if layers is not None:
        source = HookAdapter(model, layers, to_logits, forward=forward, stop_early=stop_early)
    elif to_logits is not None:
        raise ValueError("wrap: to_logits needs layers=... (the submodules whose outputs it reads)")
    else:
        if text is not None and hasattr(model, "encode_text") and not _is_text_features(text):
            text = model.encode_text(text)

        def source(image: torch.Tensor) -> PatchLogits:
            with torch.no_grad():
                out = model(image) if text is None else model(image, text)
            if isinstance(out, PatchLogits):
                return out
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                return PatchLogits(out.float())
            raise ValueError(
                f"wrap: model(image) returned {type(out).__name__}; expected PatchLogits or (B, Q, h, w) "
                "logits; pass layers=... and to_logits=... to read them with hooks"
            )
    return RefinedModel(source, model, refiner, attention)


def _is_text_features(text) -> bool:
    from .base import TextFeatures

    return isinstance(text, TextFeatures)
