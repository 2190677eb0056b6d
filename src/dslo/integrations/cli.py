"""The ``dslo`` command: the typer app, its command groups, and the entry point ``main``.

    dslo segment photo.jpg --classes "cat,couch,remote" --attention sd2 --out mask.png
    dslo eval --dataset voc21 --data-root DATA --adapter clip --attention sd2 --solver velocity
    dslo versatility --adapters clip,sc-clip --solvers none,path,velocity --attention sd2,dinov2 \
        --datasets voc21,ade20k --data-root DATA
    dslo bench quality --data DATA/voc14 --methods raw+bilinear,raw+jbu,velocity,path

The commands live by job and are registered here: ``cli_segment.py`` (segment, refine: one
image), ``cli_eval.py`` (eval, versatility: benchmarks), ``cli_bench.py`` (bench quality),
``cli_cache.py`` (cache info, cache clear), ``cli_demo.py`` (demo: the comparison page); ``cli_common.py`` holds what they share.

Errors from bad input end the command with a one-line message and exit code 2 (no traceback);
outputs are written to a temporary file and renamed, so a failed run never replaces a good file.
"""

from __future__ import annotations

try:
    import typer
except ImportError as exc:  # pragma: no cover - exercised only without the cli extra
    raise SystemExit("the dslo command needs typer and rich: pip install 'dslo[cli]'") from exc

from .cli_bench import bench_quality, write_section
from .cli_cache import cache_clear, cache_info
from .cli_common import _Quiet
from .cli_demo import demo
from .cli_eval import eval_command, versatility
from .cli_segment import read_image, read_logits, refine, segment, write_mask

__all__ = ["app", "main", "read_image", "read_logits", "write_mask", "write_section"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free refinement of OVSS logits.")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show the libraries' progress bars and warnings (weight loading, downloads)")) -> None:
    """Training-free refinement of OVSS logits."""
    _Quiet.verbose = verbose


bench_app = typer.Typer(no_args_is_help=True, help="Measure refiners on real images.")
app.add_typer(bench_app, name="bench")
cache_app = typer.Typer(no_args_is_help=True, help="The on-disk attention cache.")
app.add_typer(cache_app, name="cache")

# the order of registration is the order of ``dslo --help``
cache_app.command("clear")(cache_clear)
cache_app.command("info")(cache_info)
bench_app.command("quality")(bench_quality)
app.command("refine")(refine)
app.command("segment")(segment)
app.command("eval")(eval_command)
app.command("versatility")(versatility)
app.command("demo")(demo)


def main() -> None:
    """Entry point of the ``dslo`` console script (also ``python -m dslo.integrations.cli``)."""
    app(prog_name="dslo")


if __name__ == "__main__":  # pragma: no cover
    main()
