"""``dslo cache info`` / ``dslo cache clear``: the on-disk attention cache and, beside it, the
encoded-vocabulary cache (registered on ``cache_app`` in ``cli.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def cache_clear(cache_dir: Optional[Path] = typer.Option(None, help="cache folder")) -> None:
    """Delete every cached attention matrix."""
    from .cache import AttentionCache

    from ..adapters.text_cache import TextFeatureCache

    c = AttentionCache(cache_dir)
    typer.echo(f"removed {c.clear()} entries from {c.root}")
    text = TextFeatureCache(_text_root(cache_dir))
    typer.echo(f"removed {text.clear()} encoded vocabularies from {text.root}")


def cache_info(cache_dir: Optional[Path] = typer.Option(None, help="cache folder")) -> None:
    """Where the cache is, how big, and what each group of entries was computed from
    (provider, options, weight files with size and sha256, dslo version)."""
    from .cache import AttentionCache

    c = AttentionCache(cache_dir)
    groups = c.groups()
    typer.echo(f"{c.root}: {c.size() / 2**20:.1f} MiB in {sum(g['entries'] for g in groups)} entries")
    for g in groups:
        about = g["about"]
        head = f"  {g['group'] or '(no group)'}: {g['entries']} entries, {g['bytes'] / 2**20:.1f} MiB"
        if not about:
            typer.echo(f"{head}; made by an older dslo that did not record its weights (never hit now)")
            continue
        typer.echo(f"{head}; {about.get('provider')} {json.dumps(about.get('options', {}), sort_keys=True)}, "
                   f"dslo {about.get('dslo')}, created {about.get('created')}")
        rec = about.get("weights") or {}
        files = rec.get("files")
        if files is None:
            typer.echo(f"    weights {rec.get('weights')}: not on the machine when computed")
        for f in files or []:
            typer.echo(f"    {f['path']} ({f['bytes']} bytes, sha256 {f['sha256']})")
    from ..adapters.text_cache import TextFeatureCache

    text = TextFeatureCache(_text_root(cache_dir))
    entries = text.entries()
    typer.echo(f"{text.root}: {text.size() / 2**20:.1f} MiB in {len(entries)} encoded vocabularies")
    for e in entries:
        info = e.info or {}
        typer.echo(f"  {Path(e.path).name[:16]}: {info.get('model_name') or info.get('model_class')}, "
                   f"{info.get('queries')} queries x {info.get('templates')} templates, "
                   f"text weights {str(info.get('weights'))[:16]}, dslo {info.get('dslo')}")


def _text_root(cache_dir: Optional[Path]) -> Optional[Path]:
    """The encoded-vocabulary cache beside an attention cache folder (``pipeline.text_cache_dir``)."""
    return cache_dir / "text" if cache_dir is not None else None
