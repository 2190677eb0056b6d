"""What every ``dslo`` command shares: the one-line failure, quiet mode, ``key=value``
options, the command line rebuilt for provenance, ``--size``, the cache and progress-bar
arguments.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer

#: the adapters' input size of every command (``pipeline.DEFAULT_SIZE`` as text; not imported
#: from there: that module imports the pipeline's dependencies, and ``dslo --help`` should not wait for them)
_DEFAULT_SIZE = "512x512"

#: the largest side --size accepts: a ViT-B/16 at 2048 px already attends over 16384 patches
#: (12 GB of attention per block); 20000 would first allocate a multi-GB image
_MAX_SIZE = 2048


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


def _parse_size(size: str):
    """--size: "448" (short side, aspect kept) or "512x512" (a fixed height x width)."""
    text = str(size).strip().lower()
    try:
        if "x" in text:
            h, w = (int(v) for v in text.split("x"))
            if 1 <= h <= _MAX_SIZE and 1 <= w <= _MAX_SIZE:
                return [h, w]
        elif 1 <= int(text) <= _MAX_SIZE:
            return int(text)
    except ValueError:
        pass
    _fail(f"--size: expected a short side like 448 or HxW like 512x512, each side 1..{_MAX_SIZE}, got {size!r}")


def _model_options(model: str, pretrained: Optional[str], size: str, adapter_option) -> dict:
    opts = {"model": model, "pretrained": None if pretrained in (None, "none", "random") else pretrained,
            "size": _parse_size(size)}
    opts.update(_options(adapter_option))
    return opts


def _cache_arg(cache: bool, cache_dir: Optional[Path]):
    return (cache_dir if cache_dir is not None else True) if cache else None


def _rich_progress():
    """(iterable, description, total) -> iterable that reports progress on stderr: a rich
    progress bar on a terminal; otherwise (a log file, a pipe, a CI job) a plain line about
    every 10 % with the count and the elapsed time, so long work is visible there too."""
    import sys

    if not sys.stderr.isatty():
        return _line_progress

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    def wrap(items, description, total):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as progress:
            yield from progress.track(items, total=total, description=description)

    return wrap


def _line_progress(items, description, total):
    """A line on stderr at about every 10 % of ``total`` (and at the end): "DESC: 37/367 (10 %, 45 s)"."""
    import sys
    import time

    total = int(total) if total else 0
    marks = {max(1, round(total * k / 10)) for k in range(1, 11)} if total > 0 else set()
    started = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        if done in marks:
            print(f"{description}: {done}/{total} ({100 * done // total} %, {time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
