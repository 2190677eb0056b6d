"""On-disk attention cache: each image's attention is computed once per provider and reused
by every adapter and solver of a grid.

Key = sha256 of (the entry format, provider description, extra key parts such as weights id
and options, the image tensor's shape, dtype and bytes). An entry holds the attention matrix,
its grid, the provider's description and, where the provider has them, its patch features
(``Attention.features``). Entries are written to a temporary file and renamed, so several
ranks writing the same entry at once leave one complete file. A size limit evicts the least
recently used entries.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from ..refiners.records import Attention

__all__ = ["AttentionCache", "CachedProvider", "default_cache_dir"]

#: Part of every key. Version 2 entries carry patch features; bumping the version makes the
#: older entries (which never stored features) miss once instead of coming back without them.
CACHE_FORMAT = "dslo-attention-v2"


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

    def __init__(self, root: str | Path | None = None, max_bytes: Optional[int] = 20 * 2**30) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"AttentionCache: max_bytes must be positive or None, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(provider_id: str, image: torch.Tensor) -> str:
        """sha256 over the entry format, the provider description and the image's shape, dtype
        and content."""
        h = hashlib.sha256(f"{CACHE_FORMAT}|{provider_id}".encode())
        x = image.detach().cpu().contiguous()
        h.update(f"{tuple(x.shape)}|{x.dtype}".encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get(self, key: str) -> Optional[Attention]:
        path = self._path(key)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            matrix, grid, source = entry["matrix"], entry["grid"], entry["source"]
            features = entry.get("features")
        except (FileNotFoundError, RuntimeError, EOFError, ValueError, KeyError, TypeError):
            # missing, a file cut short by a crash elsewhere, or a foreign layout: recompute
            return None
        os.utime(path)  # recency for LRU eviction
        return Attention(matrix, tuple(grid), source, features)

    def put(self, key: str, attention: Attention) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            features = attention.features
            torch.save({
                "matrix": attention.matrix.detach().cpu(),
                "grid": list(attention.grid),
                "source": attention.source,
                "features": None if features is None else features.detach().cpu(),
            }, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._evict()

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*.pt")) if self.root.exists() else 0

    def clear(self) -> int:
        """Delete every entry; returns how many were removed."""
        n = 0
        if self.root.exists():
            for p in self.root.glob("*/*.pt"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def _evict(self) -> None:
        if self.max_bytes is None:
            return
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.root.glob("*/*.pt")]
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
            weights id, resolution. Default: the provider's ``source`` attribute or repr.

    Call: image (B, 3, H, W) in [0, 1] -> Attention (from the cache when present).
    """

    def __init__(self, provider: Callable[[torch.Tensor], Attention], cache: AttentionCache,
                 provider_id: Optional[str] = None) -> None:
        self.provider = provider
        self.cache = cache
        self.provider_id = provider_id or str(getattr(provider, "source", None) or repr(provider))

    def __call__(self, image: torch.Tensor) -> Attention:
        key = self.cache.key(self.provider_id, image)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.hits += 1
            features = None if hit.features is None else hit.features.to(image.device)
            return Attention(hit.matrix.to(image.device), hit.grid, hit.source, features)
        self.cache.misses += 1
        att = self.provider(image)
        self.cache.put(key, att)
        return att
