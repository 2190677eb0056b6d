"""What every on-disk cache of dslo shares (attention, text features, prototypes): an entry
carries its key and a digest of its payload, a read verifies both, writes are atomic, a folder
that cannot be used is found out before the work, and only files dslo made are ever deleted.

- ``payload_digest(obj)``: sha256 over nested dicts / lists / tensors / plain values.
- ``save_entry(path, payload)``: ``torch.save`` of ``payload`` plus its digest, to a temporary
  file renamed over ``path``.
- ``read_entry(path, fmt, key)``: the payload, or the one-line reason it cannot be served
  (unreadable, foreign, another key, a digest mismatch); never an exception.
- ``folder_problem(path)``: why a cache folder cannot be written (None when it can).
- ``is_entry_file(path)``: ``<key[:2]>/<key>.pt`` with a 64-hex key: the only names dslo deletes.
- ``warn(text)``: one line on standard error (``dslo: warning: ...``). Not ``warnings.warn``:
  the command line silences library warnings, and a cache that served nothing must say so.

Only the standard library and torch here: adapters and integrations both use it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["payload_digest", "save_entry", "read_entry", "folder_problem", "is_entry_file", "warn"]

_HEX = frozenset("0123456789abcdef")


def warn(text: str) -> None:
    """One warning line on standard error."""
    print(f"dslo: warning: {' '.join(str(text).split())}", file=sys.stderr, flush=True)


def _update(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for k in sorted(obj, key=str):
            h.update(f"{k!r}=".encode())
            _update(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}|".encode())
        for v in obj:
            _update(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}|".encode())


def payload_digest(obj: Any) -> str:
    """sha256 hex over a payload of dicts, lists, tensors (dtype, shape, bytes) and plain values."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def save_entry(path: Union[str, Path], payload: dict) -> Path:
    """Write ``payload`` plus ``"digest"`` (its ``payload_digest``) atomically; mode 0644.

    Raises:
        OSError: the folder cannot be written (callers warn and go on without the cache).
    """
    path = Path(path)
    body = {k: v for k, v in payload.items() if k != "digest"}
    body["digest"] = payload_digest(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        torch.save(body, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_entry(path: Union[str, Path], fmt: str, key: Optional[str]) -> tuple[Optional[dict], str]:
    """``(payload, "")`` for a sound entry; ``(None, reason)`` otherwise ("" when simply absent).

    Sound: a ``weights_only`` torch file (no code is unpickled) holding a dict whose ``format``
    is ``fmt``, whose ``key`` is ``key`` (when given) and whose ``digest`` matches its payload.
    """
    path = Path(path)
    if not path.is_file():
        return None, ""
    try:
        with warnings.catch_warnings():  # torch's own notes on foreign pickles: the reason below says it
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncation, pickles, random bytes: all unreadable
        return None, f"unreadable ({type(exc).__name__})"
    if not isinstance(data, dict) or data.get("format") != fmt:
        return None, f"not a {fmt} entry"
    if key is not None and data.get("key") != key:
        return None, "holds the entry of another key (copied or renamed)"
    stored = data.get("digest")
    body = {k: v for k, v in data.items() if k != "digest"}
    try:
        ok = isinstance(stored, str) and payload_digest(body) == stored
    except Exception:  # noqa: BLE001 - a payload of odd types cannot match
        ok = False
    if not ok:
        return None, "payload digest mismatch (damaged)"
    return body, ""


def require_entry(path: Union[str, Path], fmt: str, what: str, hint: str = "", kind: str = "") -> dict:
    """``read_entry`` for files a user names: the payload, or ``ValueError`` naming ``what``
    (e.g. "CNN weights"), the kind of file expected (default ``fmt``) and why (absent: ``hint``
    says how to make one)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file" + (f" ({hint})" if hint else ""))
    data, reason = read_entry(path, fmt, None)
    if data is None:
        raise ValueError(f"{what} {path}: not a sound {kind or fmt} file ({reason})")
    return data


def file_sha256(path: Union[str, Path]) -> str:
    """sha256 hex of a file's bytes, read in 4 MiB chunks (weights files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_problem(path: Union[str, Path]) -> Optional[str]:
    """Why ``path`` cannot hold cache entries (not a folder, not writable), or None.

    Creates the folder when absent, and writes and removes one probe file.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def is_entry_file(path: Path) -> bool:
    """``.../<key[:2]>/<key>.pt`` with a 64-hex-digit key: the names dslo gives its entries."""
    stem = path.stem
    return (path.suffix == ".pt" and len(stem) == 64 and set(stem) <= _HEX
            and path.parent.name == stem[:2])
