"""On-disk attention cache: each image's attention is computed once per provider and reused
by every adapter and solver of a grid.

Key = sha256 of (the entry format, the provider's identity, the image tensor's shape, dtype and
bytes). The identity names the provider, its options and the contents of the weight files it
loads (``provenance.weights_identity``), not just their names: attention computed from one SD2
folder is never served for another under the same repo id. Entries of one identity live in
one folder ``ROOT/<group>/`` whose ``about.json`` says what produced them (``dslo cache info``
lists them); when a provider finds entries of the same name and options made from other
weights, it says so once and computes anew.

An entry holds the attention matrix, its grid, the provider's description and, where the
provider has them, its patch features (``Attention.features``), plus its own key and a sha256
of that payload (``dslo._cachefile``). A read checks both: an entry that is cut short, not a
torch file, a pickle, another image's entry copied over this one, or damaged by a single bit
is recomputed with one warning line naming the file, never served. Entries are written to a
temporary file and renamed, so several ranks writing the same entry at once leave one
complete file. A size limit evicts the least recently used entries.

A folder that cannot be used (``DSLO_CACHE`` naming a file, no write permission) is found
when the provider is wrapped, before any work, and the run goes on without the cache after
one warning. ``clear`` deletes only files named and shaped as dslo's entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .._cachefile import folder_problem, is_entry_file, read_entry, save_entry, warn
from ..refiners.records import Attention

__all__ = ["AttentionCache", "CachedProvider", "default_cache_dir"]

#: Part of every key. Version 2 entries carry patch features; version 3 keys by the weights'
#: contents and groups entries by what produced them; version 4 entries carry their key and a
#: digest of their payload. Bumping the version makes older
#: entries miss once instead of coming back under a weaker key.
CACHE_FORMAT = "dslo-attention-v4"

#: the file in each group folder describing what produced its entries
ABOUT = "about.json"

#: (folder, problem) already said by ``AttentionCache.usable`` in this process
_SAID: set = set()


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and all(c in "0123456789abcdef" for c in name)


def _read_about(path: Path) -> dict:
    """A group's ``about.json`` as a dict; ``{}`` when absent, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_attention_entry(path: Path) -> bool:
    """Whether ``path`` holds an attention entry (this format, or an older one with a matrix),
    read lazily (``mmap``: the tensors are not loaded)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch zip file: not ours
        return False
    if not isinstance(data, dict):
        return False
    fmt = data.get("format")
    return (isinstance(fmt, str) and fmt.startswith("dslo-attention")) or (
        fmt is None and isinstance(data.get("matrix"), torch.Tensor))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def group_name(identity: str) -> str:
    """The folder name of a provider identity's entries."""
    return hashlib.sha256(f"{CACHE_FORMAT}|{identity}".encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$DSLO_CACHE`` or ``~/.cache/dslo/attention``."""
    root = os.environ.get("DSLO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "dslo" / "attention"


class AttentionCache:
    """A folder of ``<key>.pt`` files holding an ``Attention`` (matrix, grid, source, features).

    Args:
        root: the folder (created on first write).
        max_bytes: evict least recently used entries beyond this total size (None: no limit).
    """

    def __init__(self, root: str | Path | None = None, max_bytes: Optional[int] = 20 * 2**30,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"AttentionCache: max_bytes must be positive or None, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.log = log if log is not None else warn
        #: None: not checked yet; True: entries are neither read nor written (said once)
        self.disabled: Optional[bool] = None

    def usable(self) -> bool:
        """Whether the folder can hold entries (created if absent); the first time it cannot,
        one warning says so and the cache is off for this object: a run goes on without it."""
        if self.disabled is None:
            problem = folder_problem(self.root)
            if problem and (str(self.root), problem) not in _SAID:
                # a grid wraps a provider per (data set, adapter): the folder is said once per process
                _SAID.add((str(self.root), problem))
                self.log(f"attention cache: cannot use {self.root} ({problem}); running without the cache")
            self.disabled = problem is not None
        return not self.disabled

    def _off(self, path: Path, exc: OSError) -> None:
        if not self.disabled:
            self.log(f"attention cache: cannot write {path} ({type(exc).__name__}: {exc.strerror or exc}); "
                     "running without the cache")
        self.disabled = True

    @staticmethod
    def key(provider_id: str, image: torch.Tensor) -> str:
        """sha256 over the entry format, the provider description and the image's shape, dtype
        and content."""
        h = hashlib.sha256(f"{CACHE_FORMAT}|{provider_id}".encode())
        x = image.detach().cpu().contiguous()
        h.update(f"{tuple(x.shape)}|{x.dtype}".encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        return h.hexdigest()

    def _path(self, key: str, group: Optional[str] = None) -> Path:
        base = self.root / group if group else self.root
        return base / key[:2] / f"{key}.pt"

    def get(self, key: str, group: Optional[str] = None) -> Optional[Attention]:
        """The entry ``key`` (in ``group``'s folder), or None when absent or not sound (then one
        warning line names the file: it will be recomputed and replaced)."""
        if self.disabled:
            return None
        path = self._path(key, group)
        data, reason = read_entry(path, CACHE_FORMAT, key)
        if data is not None:
            try:
                features = data.get("features")
                att = Attention(data["matrix"], tuple(data["grid"]), str(data["source"]), features)
                if features is not None and not isinstance(features, torch.Tensor):
                    raise ValueError("features: expected a tensor")
            except (KeyError, TypeError, ValueError) as exc:
                data, reason = None, f"not a valid attention ({' '.join(str(exc).split())[:120]})"
        if data is None:
            if reason:
                self.log(f"attention cache: entry {path} {reason}; recomputing it")
            return None
        try:
            os.utime(path)  # recency for LRU eviction
        except OSError:
            pass
        return att

    def put(self, key: str, attention: Attention, group: Optional[str] = None) -> None:
        """Store ``attention`` under ``key`` (in ``group``'s folder), atomically, with the key and
        a digest of the payload. A folder that cannot be written gives one warning and turns
        the cache off: the attention was computed, losing the cache must not lose the run."""
        if self.disabled:
            return
        path = self._path(key, group)
        features = attention.features
        try:
            save_entry(path, {
                "format": CACHE_FORMAT,
                "key": key,
                "matrix": attention.matrix.detach().cpu(),
                "grid": list(attention.grid),
                "source": attention.source,
                "features": None if features is None else features.detach().cpu(),
            })
        except OSError as exc:
            self._off(path, exc)
            return
        self._evict()

    def _entries(self) -> list[Path]:
        # ROOT/xx/KEY.pt (entries without a group) and ROOT/GROUP/xx/KEY.pt, nothing else: with
        # $DSLO_CACHE as root, the text and prototype caches live beside them in other folders
        if not self.root.is_dir():
            return []
        plain = [p for p in self.root.glob("*/*.pt") if is_entry_file(p)]
        grouped = [p for p in self.root.glob("*/*/*.pt") if is_entry_file(p) and _is_hex(p.parent.parent.name, 16)]
        return plain + grouped

    def size(self) -> int:
        """Total bytes of the entries."""
        return sum(p.stat().st_size for p in self._entries() if p.exists())

    def clear(self) -> int:
        """Delete every entry dslo made (and the groups' descriptions); returns how many were
        removed. A file is deleted only when its name is an entry's (``xx/<64 hex>.pt``) and
        its content is one (a torch file of an attention entry, read without its tensors):
        a user's own file in the folder stays."""
        n = 0
        for p in self._entries():
            if _is_attention_entry(p):
                p.unlink(missing_ok=True)
                n += 1
                _remove_if_empty(p.parent)
        for about in self.root.glob(f"*/{ABOUT}") if self.root.is_dir() else []:
            if _is_hex(about.parent.name, 16) and "format" in _read_about(about):
                about.unlink(missing_ok=True)
                _remove_if_empty(about.parent)
        return n

    def write_about(self, group: str, about: dict) -> None:
        """Describe what produced a group's entries (written once, atomically)."""
        path = self.root / group / ABOUT
        if self.disabled or path.is_file():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(about, f, indent=1, default=str)
            os.replace(tmp, path)
        except OSError as exc:
            self._off(path, exc)

    def groups(self) -> list[dict]:
        """One dict per group folder: its ``about.json`` (what produced the entries; ``{}`` for
        entries stored without one), ``"group"``, ``"entries"`` and ``"bytes"``; largest first."""
        out: dict[str, dict] = {}
        for p in self._entries():
            rel = p.relative_to(self.root).parts
            group = rel[0] if len(rel) == 3 else ""
            g = out.setdefault(group, {"group": group, "entries": 0, "bytes": 0, "about": {}})
            g["entries"] += 1
            g["bytes"] += p.stat().st_size
        for group, g in out.items():
            if group:
                g["about"] = _read_about(self.root / group / ABOUT)
        return sorted(out.values(), key=lambda g: -g["bytes"])

    def _evict(self) -> None:
        if self.max_bytes is None:
            return
        try:
            files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self._entries()]
        except OSError:  # another process evicting at the same time
            return
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


class CachedProvider:
    """Wrap an attention provider with an ``AttentionCache``.

    Args:
        provider: image (B, 3, H, W) -> Attention.
        cache: the cache.
        provider_id: what identifies the provider's output besides the image: name, options,
            weights contents (see ``provenance.weights_identity``), resolution. A string, or a
            function returning ``(identity, about)`` called on first use (resolving weights
            may hash files or, for weights not yet on the machine, build the provider).
            Default: the provider's ``source`` attribute or repr.
        label: the identity without the weights' contents (name and options): groups with the
            same label and another identity were made from other weights, which is said once
            through ``log`` before computing anew.
        log: receives that one line (default: standard error).

    Call: image (B, 3, H, W) in [0, 1] -> Attention (from the cache when present).
    """

    def __init__(self, provider: Callable[[torch.Tensor], Attention], cache: AttentionCache,
                 provider_id: Union[str, Callable[[], tuple[str, dict]], None] = None, *,
                 label: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> None:
        self.provider = provider
        self.cache = cache
        self._id = provider_id or str(getattr(provider, "source", None) or repr(provider))
        self.label = label
        self.log = log if log is not None else (lambda s: print(s, file=sys.stderr))
        self._resolved: Optional[tuple[str, dict]] = None
        cache.usable()  # an unusable folder is said now, before any attention is computed

    def resolve(self) -> tuple[str, dict]:
        """(identity, about) of this provider's entries, computed once."""
        if self._resolved is None:
            ident, about = self._id() if callable(self._id) else (self._id, {})
            about = {"identity": ident, "label": self.label, "format": CACHE_FORMAT,
                     "created": time.strftime("%Y-%m-%d %H:%M:%S"), **about}
            self._resolved = (ident, about)
            self._say_if_weights_changed(ident)
        return self._resolved

    @property
    def provider_id(self) -> str:
        """The identity (resolving it on first use)."""
        return self.resolve()[0]

    def _say_if_weights_changed(self, ident: str) -> None:
        if self.label is None or self.cache.disabled:
            return
        mine = group_name(ident)
        if (self.cache.root / mine / ABOUT).is_file():
            return
        others = [g for g in self.cache.groups() if g["group"] not in ("", mine)
                  and g["about"].get("label") == self.label and g["about"].get("identity") != ident]
        if others:
            before = others[0]["about"].get("identity", "?")
            self.log(f"attention cache: {self.label}: {sum(g['entries'] for g in others)} entries were computed from "
                     f"other weights ({before} -> {ident}); computing anew")

    def __call__(self, image: torch.Tensor) -> Attention:
        ident, about = self.resolve()
        group = group_name(ident)
        key = self.cache.key(ident, image)
        hit = self.cache.get(key, group)
        if hit is not None:
            self.cache.hits += 1
            features = None if hit.features is None else hit.features.to(image.device)
            return Attention(hit.matrix.to(image.device), hit.grid, hit.source, features)
        self.cache.misses += 1
        att = self.provider(image)
        self.cache.write_about(group, about)
        self.cache.put(key, att, group)
        return att
