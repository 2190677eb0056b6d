"""A user's own model in the quality benchmark: ``--logits saved:DIR``.

The user runs their model over a data set's images and saves each image's patch logits with
``save_logits`` (or any writer of the same files); ``dslo bench quality --data DATA --logits
saved:DIR`` then scores every method on them against DATA's masks.

``DIR`` holds:

- ``<image id>.pt`` (a tensor, or a dict with ``"logits"`` and optionally ``"kind"``) or
  ``<image id>.npy``, shaped (C, h, w) or (1, C, h, w) on the model's own patch grid;
- optionally ``classes.txt``: the class name of each channel, one per line, matched by name
  to the data set's classes (any order, any subset).

Files whose names start with "." (an interrupted atomic write) are not logits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .logit_files import parse_logits

__all__ = ["SavedLogits", "save_logits", "LOGIT_SUFFIXES"]

#: the files ``--logits saved:DIR`` reads, one per image
LOGIT_SUFFIXES = (".pt", ".npy")


class SavedLogits:
    """Logits saved from a user's model, one file per image: a ``LogitSource``.

    ``source(sample, dataset, grid, seed) -> (logits (1, Q, h, w) float32, vocab (Q,) int64)``:
    the file of ``sample.id`` on its own (h, w) grid (``grid`` and ``seed`` are not used; the
    refiner resamples the attention to the logits) and ``vocab[q]``, the dataset class of
    channel q.

    Channels -> classes: with ``DIR/classes.txt``, by name (a name the data set holds twice,
    like ADE20K's "screen", maps its k-th channel to its k-th class). Without it, the channels
    follow the lines of the data set folder's own ``classes.txt`` (C = its number of lines), or
    the data set's scored classes (C = ``len(dataset.classes)``, which differs only when the
    ignore label is one of the lines, like ADE's "other"). A channel of the class the data set
    ignores is dropped (renormalised for probabilities), as that class is never scored.

    Kind: the benchmark calls every refiner without a per-source kind, so the refiners detect
    it from the values ("auto", ``dslo.refiners.logit_forms.detect_logit_kind``). A kind stored
    in a .pt file is checked (one of ``LOGIT_KINDS``) and, where detection reads the values
    otherwise, one warning says how to force it (method option ``logits=KIND``).

    ``name``: "saved (DIR name, N files, sha256 D)", D over the sorted names and bytes of the
    logit files and classes.txt, taken when the source is built; a file whose bytes differ when
    it is read raises ``ValueError``, so a table always names the logits it scored.

    Raises:
        ValueError: DIR is not a folder or holds no logit files.
    """

    fingerprints = None  # nothing to drop from the scored set: the logits are not built from examples
    adapter = None

    def __init__(self, folder: Union[str, Path]) -> None:
        from ..adapters.vocab import read_class_lines

        root = Path(folder).expanduser()
        if not root.is_dir():
            hint = " (a trailing :probs, :log_probs or :xS with S > 0 is a form)" if ":" in str(folder) else ""
            raise ValueError(f"--logits saved:{folder}: not a folder; expected a folder of <image id>.pt or "
                             f"<image id>.npy files{hint}")
        self.root = root
        found = sorted(p for p in root.iterdir()
                       if p.suffix in LOGIT_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not found:
            raise ValueError(f"--logits saved:{root}: no logit files; expected <image id>.pt or <image id>.npy "
                             "per image (dslo.integrations.sources.save_logits writes them)")
        self.files: dict[str, list[Path]] = {}
        for p in found:
            self.files.setdefault(p.stem, []).append(p)
        self.hashes = {p.name: _sha256(p) for p in found}
        classes = root / "classes.txt"
        self.class_names: Optional[list[str]] = read_class_lines(classes, unique=False) if classes.is_file() else None
        digest = hashlib.sha256()
        for file_name in sorted(self.hashes):
            digest.update(f"{file_name}|{self.hashes[file_name]}|".encode())
        if classes.is_file():
            digest.update(f"classes.txt|{_sha256(classes)}|".encode())
        self.digest = digest.hexdigest()
        self.name = f"saved ({root.resolve().name}, {len(found)} files, sha256 {self.digest[:12]})"
        self._maps: dict = {}
        self._warned = False

    def __call__(self, sample, dataset, grid, seed) -> tuple[torch.Tensor, torch.Tensor]:
        path = self._file(sample.id)
        logits, kind = self._read(path)
        vocab, keep = self._mapping(dataset, logits.shape[1], path)
        form = kind if kind not in (None, "auto") else _detect(logits)
        if keep is not None:
            logits = _keep_channels(logits, keep, form)
        self._check_kind(kind, logits, path)
        return logits, vocab

    def mismatch(self, dataset) -> Optional[str]:
        """Why this folder cannot score ``dataset`` (None when it can): its channels are not the
        data set's classes, or it has no file for any of the data set's images. The benchmark
        skips such sets; a set with only some files fails on the first missing one."""
        present = [i for i in dataset.ids if i in self.files]
        if not present:
            example = f" (e.g. {self.root / dataset.ids[0]}.pt)" if dataset.ids else ""
            return (f"no logits in {self.root} for any of its {len(dataset.ids)} images{example}; "
                    f"{len(self.hashes)} logit files there")
        path = self._file(present[0])
        channels = self._read(path)[0].shape[1]  # a broken file is an error, not a reason to skip the set
        try:
            self._mapping(dataset, channels, path)
        except ValueError as exc:
            return str(exc)
        return None

    def _file(self, sample_id: str) -> Path:
        paths = self.files.get(sample_id, [])
        if not paths:
            expected = " or ".join(str(self.root / f"{sample_id}{s}") for s in LOGIT_SUFFIXES)
            raise ValueError(f"saved logits: no file for image {sample_id!r}: expected {expected} "
                             f"({len(self.hashes)} logit files in {self.root})")
        if len(paths) > 1:
            raise ValueError(f"saved logits: image {sample_id!r} has {' and '.join(map(str, paths))}; keep one")
        return paths[0]

    def _read(self, path: Path) -> tuple[torch.Tensor, Optional[str]]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read logits {path}: {exc.strerror or type(exc).__name__}") from None
        if hashlib.sha256(data).hexdigest() != self.hashes[path.name]:
            raise ValueError(f"saved logits {path}: changed since the run started (its bytes differ from those "
                             "in the source's digest); rerun once the folder is complete")
        logits, kind = parse_logits(data, path)
        if logits.shape[0] != 1:
            raise ValueError(f"saved logits {path}: expected one image, (C, h, w) or (1, C, h, w); got shape "
                             f"{tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise ValueError(f"saved logits {path}: {int((~torch.isfinite(logits)).sum())} non-finite values "
                             "(NaN or inf); expected finite logits")
        return logits, kind

    def _check_kind(self, kind, logits: torch.Tensor, path: Path) -> None:
        from ..refiners.records import LOGIT_KINDS

        if kind is None:
            return
        if kind not in LOGIT_KINDS:
            raise ValueError(f"saved logits {path}: kind {kind!r}; expected one of {LOGIT_KINDS}")
        detected = _detect(logits)
        if kind != "auto" and detected != kind and not self._warned:
            from .._cachefile import warn

            # the bench cannot hand a per-source kind to the refiners: say how to force it
            warn(f"saved logits {path}: stored kind {kind!r}, but the refiners detect {detected!r} from the values; "
                 f"to use the stored kind give it per method, e.g. --methods 'velocity:logits={kind}'")
            self._warned = True

    def _mapping(self, dataset, channels: int, path: Path) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(vocab (Q,) int64: the dataset class of each kept channel, the kept channel indices
        (Q,) int64 or None for all) for a file of ``channels`` channels."""
        key = (str(dataset.root), dataset.ignore_label, tuple(dataset.classes), channels)
        if key not in self._maps:
            self._maps[key] = self._build_mapping(dataset, channels, path)
        return self._maps[key]

    def _build_mapping(self, dataset, channels: int, path: Path):
        from ..adapters.vocab import read_class_lines

        classes = list(dataset.classes)
        folder_file = Path(dataset.root) / "classes.txt"
        lines = read_class_lines(folder_file, unique=False) if folder_file.is_file() else classes
        ignored = lines[dataset.ignore_label] if 0 <= dataset.ignore_label < len(lines) else None
        if self.class_names is None:
            if channels == len(lines):
                # the order a user sees in the folder's classes.txt; the ignored line has no class
                kept = [k for k in range(len(lines)) if k != dataset.ignore_label]
                vocab = list(range(len(kept)))
            elif channels == len(classes):
                kept, vocab = list(range(channels)), list(range(channels))
            else:
                sizes = f"{len(lines)} classes.txt lines" + (
                    f", {len(classes)} scored" if len(classes) != len(lines) else "")
                raise ValueError(f"saved logits {path}: {channels} channels, but {dataset.name} has {sizes}; "
                                 f"add {self.root / 'classes.txt'} naming the class of each channel, one per line")
        else:
            names = self.class_names
            if len(names) != channels:
                raise ValueError(f"saved logits {path}: {channels} channels, but {self.root / 'classes.txt'} names "
                                 f"{len(names)} classes; expected one name per channel")
            kept, vocab, missing, seen = [], [], [], {}
            for q, name in enumerate(names):
                at = [k for k, c in enumerate(classes) if c == name]
                if not at:
                    if name != ignored:
                        missing.append(name)
                    continue
                kept.append(q)
                vocab.append(at[min(seen.get(name, 0), len(at) - 1)])
                seen[name] = seen.get(name, 0) + 1
            if missing:
                raise ValueError(f"saved logits {self.root / 'classes.txt'}: classes {missing} are not classes of "
                                 f"{dataset.name} ({classes})")
            if not kept:
                raise ValueError(f"saved logits {self.root / 'classes.txt'}: every channel is the class "
                                 f"{dataset.name} ignores ({ignored!r})")
        keep = None if kept == list(range(channels)) else torch.tensor(kept, dtype=torch.long)
        return torch.tensor(vocab, dtype=torch.long), keep


def save_logits(folder: Union[str, Path], image_id: str, logits, classes: Optional[Sequence[str]] = None,
                kind: Optional[str] = None) -> Path:
    """Write one image's logits for ``--logits saved:FOLDER`` as ``FOLDER/<image_id>.pt``.

    Args:
        folder: created if needed.
        image_id: the image's id in the data set (its file name without suffix: "2007_000033").
        logits: (C, h, w) or (1, C, h, w) torch tensor or numpy array, finite floats, on the
            model's patch grid; saved as (C, h, w) in their dtype (float16 halves the folder).
        classes: the C class names of the channels; written to ``FOLDER/classes.txt`` on the
            first call, checked against it on the others. None: the channels are the data set's
            classes in the order of its classes.txt.
        kind: what the logits are, one of ``LOGIT_KINDS`` ("cosine", "scores", "log_probs",
            "probs", "auto"); stored beside them, None stores nothing.

    Returns:
        the path written. The file is written to a temporary sibling and renamed, so a reader
        never sees half a file.

    Raises:
        ValueError: a bad id, shape, non-finite value or kind, or classes that differ from the
            folder's classes.txt (nothing is written then).
    """
    from ..refiners.records import LOGIT_KINDS
    from .outputs import temporary_sibling

    folder = Path(folder).expanduser()
    image_id = str(image_id)
    if not image_id or image_id.startswith(".") or Path(image_id).name != image_id or "\\" in image_id:
        raise ValueError(f"save_logits: image id {image_id!r}; expected a file name without folders, not "
                         "starting with '.'")
    tensor = torch.from_numpy(np.ascontiguousarray(logits)) if isinstance(logits, np.ndarray) else logits
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"save_logits: logits expected a torch tensor or numpy array, got {type(logits).__name__}")
    tensor = tensor.detach().cpu()
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3 or not tensor.is_floating_point():
        raise ValueError(f"save_logits: logits expected float (C, h, w), got {tensor.dtype} {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"save_logits: logits of {image_id!r} hold non-finite values (NaN or inf)")
    if kind is not None and kind not in LOGIT_KINDS:
        raise ValueError(f"save_logits: kind {kind!r}; expected one of {LOGIT_KINDS} or None")
    if (folder / f"{image_id}.npy").exists():
        raise ValueError(f"save_logits: {folder / image_id}.npy exists; an image takes one logits file")
    _check_classes(folder, classes, int(tensor.shape[0]))
    path = folder / f"{image_id}.pt"
    payload = {"logits": tensor.contiguous().clone()}
    if kind is not None:
        payload["kind"] = kind
    tmp = temporary_sibling(path)  # starts with ".": never read as logits if left behind
    try:
        torch.save(payload, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_classes(folder: Path, classes: Optional[Sequence[str]], channels: int) -> None:
    """Write ``folder/classes.txt`` or check ``classes`` (and the channel count) against it."""
    from ..adapters.vocab import read_class_lines
    from .outputs import temporary_sibling

    target = folder / "classes.txt"
    existing = read_class_lines(target, unique=False) if target.is_file() else None
    if classes is None:
        if existing is not None and len(existing) != channels:
            raise ValueError(f"save_logits: {channels} channels, but {target} names {len(existing)} classes")
        return
    names = [str(c).strip() for c in classes]
    if any(not n or "\n" in n or "\r" in n for n in names):
        raise ValueError(f"save_logits: classes expected non-empty one-line names, got {list(classes)}")
    if len(names) != channels:
        raise ValueError(f"save_logits: {len(names)} class names for {channels} channels; expected one per channel")
    if existing is not None:
        if existing != names:
            raise ValueError(f"save_logits: classes {names} differ from {target} ({existing}); every image of a "
                             "folder takes the same classes in the same order")
        return
    tmp = temporary_sibling(target)
    try:
        tmp.write_text("\n".join(names) + "\n", encoding="utf-8")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _detect(logits: torch.Tensor) -> str:
    from ..refiners.logit_forms import detect_logit_kind

    return detect_logit_kind(logits)


def _keep_channels(logits: torch.Tensor, keep: torch.Tensor, form: str) -> torch.Tensor:
    """(1, C, h, w) -> (1, Q, h, w), keeping the form: probabilities and log-probabilities are
    renormalised over the kept classes, so detection still reads them as such."""
    kept = logits[:, keep]
    if form == "probs":
        return kept / kept.sum(1, keepdim=True).clamp_min(1e-12)
    if form == "log_probs":
        return torch.log_softmax(kept, 1)
    return kept


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
