"""On-disk cache of prompt-ensembled CLIP text features.

Encoding 80 templates x 150 classes with a ViT-B text tower takes tens of minutes on a CPU
and gives the same numbers on every run, so ``CLIPDenseBase.encode_text(..., cache=True)``
stores the result and later runs load it instead.

An entry is keyed by everything that decides the features (sha256 of a JSON record):

- the entry format (``TEXT_CACHE_FORMAT``) and ``dslo.__version__``;
- the text weights: a sha256 over the names, dtypes, shapes and bytes of the parameters and
  buffers of the text tower (``token_embedding``, ``positional_embedding``, ``transformer``,
  ``ln_final``, ``text_projection``, ``attn_mask``; the ``text`` module of open_clip's
  ``CustomTextCLIP``), the class names of its submodules (QuickGELU and GELU share weights)
  and its pooling settings (``text_weights_fingerprint``); a model name is not enough, two
  checkpoints of one architecture share it;
- the model class;
- the tokenizer: its class, context length, and the tokens of a fixed probe sentence (every
  Hugging Face tokenizer has the class ``HFTokenizer``);
- the exact vocabulary (class names with their synonyms, in order) and templates.

Entries live in ``$DSLO_CACHE/text/<key[:2]>/<key>.pt`` (default ``~/.cache/dslo/text``),
the convention of the prototype cache: two folders below ``$DSLO_CACHE`` keeps them out of
the attention cache's ``*/*.pt`` globs (its clear and eviction) when that cache sits at
``$DSLO_CACHE`` itself. Files are written to a temporary file then renamed (several
processes writing one entry leave one complete file), read with ``weights_only=True``. Each
entry carries its key and a sha256 of its payload (``dslo._cachefile``): a damaged, foreign or
misplaced file is a miss, said in one warning line naming it, and is re-encoded. ``clear``
deletes only files named and shaped as this cache's entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .._cachefile import folder_problem, is_entry_file, read_entry, save_entry, warn

__all__ = [
    "TEXT_CACHE_FORMAT",
    "TextCacheEntry",
    "TextFeatureCache",
    "default_text_cache_dir",
    "resolve_text_cache",
    "text_weights_fingerprint",
    "tokenizer_identity",
]

#: Part of every key; bump it when the stored layout or the computation changes meaning
#: (v2: entries carry a digest of their payload).
TEXT_CACHE_FORMAT = "dslo-text-v2"

#: The attributes of an open_clip ``CLIP`` that ``encode_text`` reads (``attn_mask`` is the
#: causal mask buffer, non-persistent so absent from ``state_dict``).
TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")

#: Tokenised to tell apart tokenizers that share a class (every Hugging Face tokenizer in
#: open_clip is an ``HFTokenizer``): casing, punctuation, digits and accents.
_TOKENIZER_PROBE = ["a photo of a traffic light.", "Crème brûlée, 2 PEOPLE & a dog-sled!"]


#: (folder, problem) already said by ``TextFeatureCache.usable`` in this process
_SAID: set = set()


def default_text_cache_dir() -> Path:
    """``$DSLO_CACHE/text`` or ``~/.cache/dslo/text``."""
    root = os.environ.get("DSLO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dslo") / "text"


# ----------------------------------------------------------------------------- identities


def _text_parts(model: nn.Module) -> dict[str, Any]:
    text = getattr(model, "text", None)
    if isinstance(text, nn.Module):  # open_clip CustomTextCLIP: the whole text tower in one module
        return {"text": text}
    parts = {name: getattr(model, name) for name in TEXT_PARTS if getattr(model, name, None) is not None}
    if "token_embedding" not in parts or "transformer" not in parts:
        raise ValueError(
            f"text cache: {type(model).__name__} has no open_clip text tower (expected "
            f"{', '.join(TEXT_PARTS[:4])} or a 'text' module)"
        )
    return parts


def _text_tensors(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """(name, tensor) of every parameter and buffer of the text parts, names sorted; and the
    submodule classes that carry no weights but change the output (activations, norms)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = []
    for part, obj in sorted(_text_parts(model).items()):
        if isinstance(obj, nn.Module):
            for name, t in list(obj.named_parameters()) + list(obj.named_buffers()):
                tensors[f"{part}.{name}"] = t
            structure += [f"{part}.{name}:{type(m).__name__}" for name, m in obj.named_modules()]
        elif isinstance(obj, torch.Tensor):
            tensors[part] = obj
    for attr in ("text_pool_type", "text_eos_id", "pad_id"):
        if hasattr(model, attr):
            structure.append(f"{attr}={getattr(model, attr)!r}")
    return sorted(tensors.items()), structure


def _signature(tensors: list[tuple[str, torch.Tensor]]) -> Optional[tuple]:
    # storage address plus version counter: a move (.to, .half) or any in-place write
    # (load_state_dict, copy_) changes it, so a remembered fingerprint is never stale
    try:
        return tuple((name, t.device.type, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


#: model -> (signature, fingerprint); weak so that a cached fingerprint never keeps a model alive
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[Optional[tuple], str]]" = weakref.WeakKeyDictionary()


def text_weights_fingerprint(model: nn.Module) -> str:
    """sha256 hex of an open_clip model's text tower: parameter and buffer names (sorted),
    dtypes, shapes and bytes, plus submodule classes and pooling settings.

    Hashing a ViT-B text tower (63 M parameters) takes a fraction of a second; the result is
    remembered per model object and recomputed only when a text tensor was moved or written
    in place since.

    Raises:
        ValueError: the model has no open_clip text tower.
    """
    tensors, structure = _text_tensors(model)
    sig = _signature(tensors)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and sig is not None and memo[0] == sig:
        return memo[1]
    h = hashlib.sha256(f"{type(model).__name__}|{structure}".encode())
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"|{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    digest = h.hexdigest()
    _FINGERPRINTS[model] = (sig, digest)
    return digest


def tokenizer_identity(tokenizer, context_length: Optional[int] = None) -> str:
    """``"Class(context_length=N, probe=sha256[:16])"`` for a callable ``list[str] -> (n, L)``.

    The probe is the tokenisation of two fixed sentences, so two tokenizers of one class
    with different vocabularies get different identities.
    """
    cls = type(tokenizer)
    name = getattr(tokenizer, "__qualname__", None) if cls.__name__ == "function" else None
    name = f"{cls.__module__}.{name or cls.__qualname__}"
    length = getattr(tokenizer, "context_length", None) or context_length
    tokens = torch.as_tensor(tokenizer(list(_TOKENIZER_PROBE))).detach().cpu().to(torch.int64).contiguous()
    probe = hashlib.sha256(f"{tuple(tokens.shape)}".encode() + tokens.numpy().tobytes()).hexdigest()[:16]
    return f"{name}(context_length={length}, probe={probe})"


# ----------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class TextCacheEntry:
    """One stored entry.

    Attributes:
        features: (Q, D) float, L2-normalised rows, on the device asked for in ``get``.
        class_names: C tuples of queries (a class name and its synonyms), Q in total.
        templates: the T prompt templates.
        info: what produced it (weights fingerprint, model class and name, tokenizer,
            counts, dslo version, creation time), for ``dslo cache info``-style listings.
        path: the file it was read from.
    """

    features: torch.Tensor
    class_names: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...]
    info: dict = field(default_factory=dict)
    path: Optional[Path] = None


class TextFeatureCache:
    """A folder of ``<key[:2]>/<key>.pt`` files, each the text features of one vocabulary.

    Args:
        root: the folder (created on first write); None: ``default_text_cache_dir()``.
    """

    def __init__(self, root: Union[str, Path, None] = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_text_cache_dir()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"TextFeatureCache({str(self.root)!r})"

    @staticmethod
    def key(*, weights: str, model_class: str, tokenizer: str,
            class_names: Sequence[Sequence[str]], templates: Sequence[str]) -> str:
        """sha256 hex over the format, dslo version, weights fingerprint, model class,
        tokenizer identity, the nested class names (order and grouping) and the templates."""
        record = {
            "format": TEXT_CACHE_FORMAT,
            "dslo": _dslo_version(),
            "weights": weights,
            "model_class": model_class,
            "tokenizer": tokenizer,
            "class_names": [list(names) for names in class_names],
            "templates": list(templates),
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get(self, key: str, *, device: Union[str, torch.device, None] = None,
            class_names: Optional[Sequence[Sequence[str]]] = None,
            templates: Optional[Sequence[str]] = None) -> Optional[TextCacheEntry]:
        """The entry stored under ``key`` with its features on ``device`` (default CPU), or
        None when missing, unreadable (cut short, not a torch file, foreign layout) or not
        matching the given ``class_names`` / ``templates``. Counts ``hits`` and ``misses``."""
        entry = self._read(self.path(key), key)
        if entry is not None:
            names = tuple(tuple(n) for n in class_names) if class_names is not None else None
            if (names is not None and entry.class_names != names) or (
                    templates is not None and entry.templates != tuple(templates)):
                entry = None  # a hash collision or a hand-edited file: never return wrong rows
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        if device is not None:
            entry = dataclasses.replace(entry, features=entry.features.to(device))
        return entry

    def _read(self, path: Path, key: Optional[str], quiet: bool = False) -> Optional[TextCacheEntry]:
        data, reason = read_entry(path, TEXT_CACHE_FORMAT, key)
        if data is not None:
            try:
                feats = data["features"]
                names = tuple(tuple(str(n) for n in group) for group in data["class_names"])
                temps = tuple(str(t) for t in data["templates"])
                info = dict(data.get("info") or {})
                if (not isinstance(feats, torch.Tensor) or feats.dim() != 2 or not feats.is_floating_point()
                        or feats.shape[0] != sum(len(g) for g in names) or not bool(torch.isfinite(feats).all())):
                    raise ValueError("features")
            except (AttributeError, KeyError, TypeError, ValueError):
                data, reason = None, "not a valid text-feature entry"
        if data is None:
            if reason and not quiet:
                warn(f"text cache: entry {path} {reason}; encoding the vocabulary again")
            return None
        return TextCacheEntry(feats, names, temps, info, path)

    def put(self, key: str, features: torch.Tensor, *, class_names: Sequence[Sequence[str]],
            templates: Sequence[str], info: Optional[dict] = None) -> Optional[Path]:
        """Store (Q, D) ``features`` (copied to the CPU) under ``key``, atomically, with the key
        and a digest of the payload.

        A folder that cannot be written (read-only, full disk, a file in the way) gives one
        warning line and None: the features were computed, losing the cache must not lose the run.
        """
        path = self.path(key)
        payload = {
            "format": TEXT_CACHE_FORMAT,
            "key": key,
            "features": features.detach().to("cpu").contiguous(),
            "class_names": [list(n) for n in class_names],
            "templates": list(templates),
            "info": dict(info or {}),
        }
        try:
            save_entry(path, payload)
        except OSError as exc:
            warn(f"text cache: cannot write {path} ({type(exc).__name__}: {exc.strerror or exc}); "
                 "running without the cache")
            return None
        return path

    def usable(self) -> bool:
        """Whether the folder can hold entries (created when absent); False with one warning."""
        problem = folder_problem(self.root)
        if problem and (str(self.root), problem) not in _SAID:
            _SAID.add((str(self.root), problem))  # every adapter of a grid resolves the cache: said once
            warn(f"text cache: cannot use {self.root} ({problem}); running without the cache")
        return problem is None

    def _files(self) -> list[Path]:
        return [p for p in self.root.glob("*/*.pt") if is_entry_file(p)] if self.root.is_dir() else []

    def entries(self) -> list[TextCacheEntry]:
        """Every sound entry (features on the CPU), oldest file first."""
        out = []
        for path in sorted(self._files(), key=lambda p: p.stat().st_mtime):
            entry = self._read(path, None, quiet=True)
            if entry is not None:
                out.append(entry)
        return out

    def size(self) -> int:
        """Total bytes of the entry files."""
        return sum(p.stat().st_size for p in self._files())

    def clear(self) -> int:
        """Delete every entry this cache made (a ``<key[:2]>/<key>.pt`` file holding a text-cache
        entry, sound or damaged); a user's own file in the folder stays. Returns how many."""
        n = 0
        for p in self._files():
            try:
                data = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - not a torch zip file: not ours
                continue
            if isinstance(data, dict) and str(data.get("format", "")).startswith("dslo-text"):
                p.unlink(missing_ok=True)
                n += 1
        return n


def resolve_text_cache(cache: Union[bool, str, os.PathLike, TextFeatureCache, None]) -> Optional[TextFeatureCache]:
    """None / False: no cache; True: ``default_text_cache_dir()``; a path: that folder; a
    ``TextFeatureCache``: itself. A folder that cannot be used (a file in the way, no write
    permission) gives one warning and None: found now, before any vocabulary is encoded.

    Raises:
        ValueError: anything else.
    """
    if cache is None or cache is False:
        return None
    if cache is True:
        cache = TextFeatureCache()
    elif isinstance(cache, (str, os.PathLike)) and str(cache).strip():
        cache = TextFeatureCache(cache)
    if isinstance(cache, TextFeatureCache):
        return cache if cache.usable() else None
    raise ValueError(f"text cache: expected None, False, True, a folder path or a TextFeatureCache, got {cache!r}")


def _dslo_version() -> str:
    import dslo

    return str(getattr(dslo, "__version__", "unknown"))


def entry_info(*, weights: str, model_class: str, model_name: Optional[str], tokenizer: str,
               features: torch.Tensor, num_classes: int, num_templates: int) -> dict:
    """The small description stored beside the tensor (plain str / int / float for
    ``weights_only`` loading)."""
    return {
        "weights": weights,
        "model_class": model_class,
        "model_name": model_name or "",
        "tokenizer": tokenizer,
        "queries": int(features.shape[0]),
        "classes": int(num_classes),
        "templates": int(num_templates),
        "dim": int(features.shape[1]),
        "dslo": _dslo_version(),
        "format": TEXT_CACHE_FORMAT,
        "created": time.time(),
    }
