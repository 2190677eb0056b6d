"""Outputs never destroy inputs: every command checks the paths it will write before any work.

``check_outputs(files=..., folders=..., inputs=...)`` refuses, in one ``ValueError`` line naming
the option:

- an output file equal to an input file, resolving to it (symbolic links, ``..``), or a hard
  link of it (same device and inode): ``dslo segment photo.png --out photo.png`` would
  replace the photograph with its mask;
- an output file or folder inside an input folder (a data set, an examples folder, a weights
  folder): predictions written there could replace ground-truth masks;
- an output folder equal to an input file or folder;
- two outputs naming the same file;
- an output file that is an existing folder or device, or whose parent is a file or cannot be
  written (otherwise the run would fail only after the work, at the last step).

``temporary_sibling(path)``: the unique temporary file atomic writers write before renaming
over ``path`` (a fixed name like ``mask.tmp.png`` could be an input).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

__all__ = ["check_outputs", "temporary_sibling"]

PathLike = Union[str, os.PathLike]


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts, case-insensitive file systems
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _existing_ancestor(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path("/")


def _check_writable(option: str, path: Path, folder: bool) -> None:
    if not folder and path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; expected a file path to write")
    if not folder and path.exists() and not path.is_file():
        raise ValueError(f"{option} {path}: exists and is not a regular file (a device, a pipe); it would be "
                         "replaced by a file")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: is a file; expected a folder")
    parent = path if folder else path.parent
    base = _existing_ancestor(parent)
    if not base.is_dir():
        raise ValueError(f"{option} {path}: {base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {base} is not writable")


def check_outputs(files: Optional[Mapping[str, Optional[PathLike]]] = None,
                  folders: Optional[Mapping[str, Optional[PathLike]]] = None,
                  inputs: Iterable[Optional[PathLike]] = ()) -> None:
    """Refuse outputs that would overwrite or sit among inputs; call before any work.

    Args:
        files: option name (``"--out"``) -> the file it will write (None: not written).
        folders: option name (``"--out-dir"``) -> the folder it will fill (None: not used).
        inputs: every file or folder the command reads (None and missing paths are skipped;
            strings that are not paths, like a hub id, never match anything).

    Raises:
        ValueError: one line naming the option, the path and the input it would destroy.
    """
    files = {k: Path(v).expanduser() for k, v in (files or {}).items() if v is not None}
    folders = {k: Path(v).expanduser() for k, v in (folders or {}).items() if v is not None}
    in_files, in_dirs = [], []
    for item in inputs:
        if item is None or str(item).strip() == "":
            continue
        p = Path(item).expanduser()
        if p.is_dir():
            in_dirs.append((p, _resolved(p)))
        elif p.exists():
            in_files.append((p, _resolved(p)))

    seen: dict[Path, str] = {}
    for option, path in files.items():
        real = _resolved(path)
        for given, src in in_files:
            if real == src or _same_file(path, src):
                raise ValueError(f"{option} {path}: is the input file {given}; writing it would destroy the "
                                 "input; choose another output path")
        for given, src in in_dirs:
            if _inside(real, src):
                raise ValueError(f"{option} {path}: lies inside the input folder {given}; write outputs "
                                 "outside the folders dslo reads")
        if real in seen:
            raise ValueError(f"{option} {path}: is also the path of {seen[real]}; give each output its own path")
        seen[real] = option
        _check_writable(option, path, folder=False)
    for option, path in folders.items():
        real = _resolved(path)
        for given, src in in_files:
            if real == src:
                raise ValueError(f"{option} {path}: is the input file {given}; expected a folder for outputs")
        for given, src in in_dirs:
            if _inside(real, src):
                raise ValueError(f"{option} {path}: is or lies inside the input folder {given}; write outputs "
                                 "outside the folders dslo reads")
        _check_writable(option, path, folder=True)


def temporary_sibling(path: PathLike) -> Path:
    """A new, empty file beside ``path`` with a name no other file has (``mkstemp``), keeping
    ``path``'s suffix so writers that pick the format by extension (PIL, matplotlib) still do.

    Atomic writers write here and rename over ``path``. A fixed temporary name such as
    ``mask.tmp.png`` would overwrite whatever file already has that name, an input included.
    The file gets the mode a plain ``open`` would give (0666 minus the umask), not mkstemp's 0600.
    """
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return Path(tmp)
