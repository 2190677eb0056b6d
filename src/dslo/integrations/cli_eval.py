"""``dslo eval`` (one benchmark, mmseg or dslo engine) and ``dslo versatility`` (the
adapters x attention x solvers x datasets grid), registered on ``app`` in ``cli.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .cli_common import (_DEFAULT_SIZE, _cache_arg, _command_line, _fail, _model_options, _options, _parse_size,
                         _quietly, _rich_progress)
from .outputs import check_outputs


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
    from .benchmarks import BENCHMARK_DATA, canonical_dataset
    from .experiments import atomic_write_text

    rank, world = init_distributed()
    key = canonical_dataset(dataset)
    if key not in BENCHMARK_DATA:
        _fail(f"unknown dataset {dataset!r}; known: {sorted(BENCHMARK_DATA)}")
    if engine not in ("auto", "mmseg", "dslo"):
        _fail(f"--engine: expected auto, mmseg or dslo, got {engine!r}")
    if not data_root.is_dir():
        _fail(f"--data-root {data_root} is not a directory")
    try:
        check_outputs({"--json": json_out}, {"--out-dir": out_dir, "--work-dir": work_dir},
                      inputs=[data_root, weights_dir, model, pretrained, attention_weights])
    except ValueError as exc:
        _fail(str(exc))
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
            from .pipeline import ADAPTERS

            if name not in ADAPTERS:
                raise ValueError(f"unknown adapter {adapter!r}; known: {list(ADAPTERS)}")
            from .pipeline import parse_solver

            parse_solver(solver)
            att = {"name": attention, **_options(attention_option)}
            if attention_weights is not None:
                att["weights"] = attention_weights
            from .pipeline import text_cache_dir

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
            from .benchmarks import evaluate, open_dataset
            from .pipeline import build_pipeline

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


@_quietly
def versatility(
    ctx: typer.Context,
    adapters: str = typer.Option("clip", help="comma-separated: clip, sc-clip, cass, proxyclip"),
    solvers: str = typer.Option("none,path,velocity", help="comma-separated solvers; none = the adapter's own prediction"),
    attention: str = typer.Option("sd2", help="comma-separated providers: sd2, dinov2, clip, affinity, own"),
    datasets: str = typer.Option("voc21", help="comma-separated benchmarks (voc21, voc20, context60, context59, coco-object, coco-stuff, cityscapes, ade20k) or folders in the images/, masks/, classes.txt layout"),
    data_root: Optional[Path] = typer.Option(None, help="folder holding the benchmarks in mmseg's layout"),
    stand_in_root: Optional[Path] = typer.Option(None, help="only when given: a folder of small sets in the images/, masks/, classes.txt layout (voc14, ade20k4) that stand in for absent benchmarks (voc21/voc20 -> voc14, ade20k -> ade20k4), marked * in the table; default: an absent benchmark is an error"),
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
    if device is None and world > 1 and __import__("torch").cuda.is_available():
        device = f"cuda:{__import__('os').environ.get('LOCAL_RANK', '0')}"
    command = _command_line(ctx)
    try:
        check_outputs(folders={"--results-dir": results_dir, "--cells-dir": cells_dir},
                      inputs=[data_root, stand_in_root, weights_dir, model, pretrained, *split(datasets)])
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
