"""Vocabulary: prompt templates and the class-name files of the eight OVSS benchmarks.

Class-name files hold one class per line; a line may list synonyms separated by ``", "``
(SCLIP / SC-CLIP / CASS / NACLIP format) or ``"; "`` (ProxyCLIP format). The shipped files
in ``classnames/`` are the peers' lists, byte for byte except for a final newline:

- ``voc21`` ``voc20`` ``context60`` ``context59`` ``coco_object`` ``coco_stuff`` (171 classes)
  ``cityscapes`` ``ade20k``: the lists shared by SCLIP, SC-CLIP, CASS and NACLIP
  (``configs/cls_*.txt``); the background of ``voc21`` / ``coco_object`` is a list of stuff
  synonyms, ``person`` and ``tvmonitor`` carry synonyms, ``boat`` is spelled ``ship``.
- ``voc21_proxyclip`` ``voc20_proxyclip`` ``coco_object_proxyclip``: ProxyCLIP's variants
  (``"; "`` separated, ``person`` and ``tvmonitor`` without synonyms, a shorter background).
  ProxyCLIP's other five lists equal the shared ones.

Only torch-free standard library here.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Sequence, Union

__all__ = [
    "read_text_file",
    "read_class_lines",
    "IMAGENET_TEMPLATES",
    "BENCHMARKS",
    "load_class_names",
    "normalise_class_names",
    "flatten_queries",
]

#: The 80 prompt templates of CLIP's ImageNet zero-shot classifier, as used by SCLIP,
#: SC-CLIP, CASS, NACLIP and ProxyCLIP (``openai_imagenet_template``): ``"{}"`` is the name.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

#: Benchmark name -> (file in ``classnames/``, number of classes). Aliases below.
BENCHMARKS: dict[str, tuple[str, int]] = {
    "voc21": ("voc21.txt", 21),
    "voc20": ("voc20.txt", 20),
    "context60": ("context60.txt", 60),
    "context59": ("context59.txt", 59),
    "coco_object": ("coco_object.txt", 81),
    "coco_stuff": ("coco_stuff.txt", 171),
    "cityscapes": ("cityscapes.txt", 19),
    "ade20k": ("ade20k.txt", 150),
    "voc21_proxyclip": ("voc21_proxyclip.txt", 21),
    "voc20_proxyclip": ("voc20_proxyclip.txt", 20),
    "coco_object_proxyclip": ("coco_object_proxyclip.txt", 81),
}

_ALIASES = {
    "voc": "voc21",
    "pascal_voc": "voc21",
    "city_scapes": "cityscapes",
    "coco_stuff164k": "coco_stuff",
    "coco_stuff171": "coco_stuff",
    "ade": "ade20k",
    "ade150": "ade20k",
    "pascal_context": "context60",
}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key.startswith("cls_"):
        key = key[4:]
    return _ALIASES.get(key, key)


def read_text_file(path: Union[str, Path], what: str = "text file") -> str:
    """A text file read as UTF-8, a leading byte-order mark removed.

    Raises:
        ValueError: missing or unreadable file, or bytes that are not UTF-8 (naming the file,
            the offending byte and its position).
    """
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read ({type(exc).__name__}: {exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at position {exc.start}); "
                         "save it as UTF-8") from None


def read_class_lines(path: Union[str, Path], unique: bool = True) -> list[str]:
    """A data set's ``classes.txt``: one class name per line (UTF-8, BOM removed, surrounding
    spaces stripped, trailing empty lines dropped).

    Args:
        unique: refuse a name given twice (compared ignoring case): wherever classes are
            matched by name (prototypes) a repeated name is ambiguous. Benchmarks that score by
            label index may repeat one (ADE20K-150 has two "screen" lines): ``unique=False``.

    Raises:
        ValueError: not UTF-8, no classes, an empty line between names, or (``unique``) a name
            given twice, naming the file.
    """
    names = [ln.strip() for ln in read_text_file(path, "classes.txt").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise ValueError(f"classes.txt {path}: expected one non-empty class name per line")
    if unique:
        _no_duplicates([n.lower() for n in names], str(path))
    return names


def _no_duplicates(names: list, source: str) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"class names {source}: duplicate class names {dup[:5]}; each class must appear once")


def _parse(text: str, source: str) -> list[list[str]]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    classes: list[list[str]] = []
    for number, line in enumerate(lines, start=1):
        sep = ";" if ";" in line else ","
        names = [part.strip() for part in line.split(sep)]
        if not line.strip() or any(not n for n in names):
            raise ValueError(
                f"class names {source}: line {number} has an empty name ({line!r}); expected one "
                "class per line, synonyms separated by ', ' or '; '"
            )
        classes.append(names)
    if not classes:
        raise ValueError(f"class names {source}: no classes found")
    # a synonym may repeat across lines (COCO's background lists "bed"), a class name may not
    _no_duplicates([names[0].lower() for names in classes], source)
    return classes


def load_class_names(name_or_path: Union[str, Path]) -> list[list[str]]:
    """Load a class list: a benchmark name or a text file in the peers' format.

    Args:
        name_or_path: one of ``BENCHMARKS`` (``"voc21"``, ``"context59"``, ``"coco_stuff"``,
            ``"ade20k"``, ...; also ``"cls_voc21"``, ``"city_scapes"``, ``"coco-object"``), or
            the path of a text file with one class per line and synonyms separated by ``", "``
            or ``"; "`` (a line is split on ``;`` if it has one, else on ``,``).

    Returns:
        one list of names per class, in file order (class index = line index); names are
        stripped of surrounding whitespace.

    Raises:
        ValueError: unknown name / missing file (listing the known names), or an empty line or
            empty synonym in the middle of the file.
    """
    if isinstance(name_or_path, Path) or (
        isinstance(name_or_path, str) and (Path(name_or_path).suffix or "/" in name_or_path)
    ):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ValueError(
                f"class names: file {str(name_or_path)!r} does not exist; give a path to a text "
                f"file or one of the benchmark names {sorted(BENCHMARKS)}"
            )
        return _parse(read_text_file(path, "class names"), str(path))
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"class names: expected a benchmark name or a path, got {name_or_path!r}")
    key = _canonical(name_or_path)
    if key not in BENCHMARKS:
        close = difflib.get_close_matches(key, list(BENCHMARKS), n=3)
        hint = f" (did you mean {close}?)" if close else ""
        raise ValueError(
            f"class names: unknown benchmark {name_or_path!r}{hint}; known: {sorted(BENCHMARKS)}, "
            "or pass the path of a text file"
        )
    filename, count = BENCHMARKS[key]
    text = resources.files(__package__).joinpath("classnames", filename).read_text(encoding="utf-8")
    classes = _parse(text, key)
    if len(classes) != count:  # pragma: no cover - guards the shipped data files
        raise ValueError(f"class names {key}: expected {count} classes, file has {len(classes)}")
    return classes


def normalise_class_names(class_names: object) -> tuple[tuple[str, ...], ...]:
    """Turn ``list[str]`` (one name per class) or ``list[list[str]]`` (synonyms) into tuples.

    A benchmark name or path (a single ``str``) is loaded with ``load_class_names``.

    Raises:
        ValueError: empty vocabulary, a class without names, or a non-string name.
    """
    if isinstance(class_names, (str, Path)):
        class_names = load_class_names(class_names)
    if not isinstance(class_names, Sequence) or len(class_names) == 0:
        raise ValueError(
            "class names: expected a non-empty list of names (or of synonym lists), got "
            f"{class_names!r}"
        )
    out = []
    for index, entry in enumerate(class_names):
        names = (entry,) if isinstance(entry, str) else tuple(entry) if isinstance(entry, Sequence) else None
        if not names or any(not isinstance(n, str) or not n.strip() for n in names):
            raise ValueError(
                f"class names: class {index} must be a non-empty string or a non-empty list of "
                f"non-empty strings, got {entry!r}"
            )
        out.append(tuple(n.strip() for n in names))
    return tuple(out)


def flatten_queries(class_names: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """Synonym lists -> (queries, query_to_class): one query per name, in class order."""
    queries: list[str] = []
    owners: list[int] = []
    for index, names in enumerate(class_names):
        queries.extend(names)
        owners.extend([index] * len(names))
    return queries, owners
