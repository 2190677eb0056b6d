"""``dslo demo``: serve the comparison page (``demo.py``) on this machine (registered on
``app`` in ``cli.py``). Gradio is imported only when the command runs (extra ``demo``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import _fail, _quietly, _rich_progress


@_quietly
def demo(
    host: str = typer.Option("127.0.0.1", help="address to bind; the default serves this machine only (0.0.0.0 exposes the page to the network)"),
    port: Optional[int] = typer.Option(None, help="port (default: Gradio's, 7860, or the next free one)"),
    examples: Optional[Path] = typer.Option(None, help="prototype model: annotated examples (images/, masks/, classes.txt); prototypes are built once and cached"),
    prototypes: Optional[Path] = typer.Option(None, help="prototype model: a prototype file (Prototypes.save) instead of --examples"),
    images: Optional[Path] = typer.Option(None, help="a folder of photos the page offers as examples (beside the checkout's examples/)"),
    weights_dir: Optional[Path] = typer.Option(None, help="folder with local weights (CLIP checkpoints, Hugging Face repos)"),
) -> None:
    """A local page comparing refiners and attention providers on your own photo (offline)."""
    import os
    import signal

    try:
        import gradio  # noqa: F401
    except ImportError:
        _fail("dslo demo needs gradio: pip install 'dslo[demo]'")
    # the page never downloads: weights not on this machine are listed as unavailable
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .demo import DemoApp, serve
    from .demo_models import Catalogue

    for name, path in (("--examples", examples), ("--prototypes", prototypes), ("--images", images)):
        if path is not None and not path.exists():
            _fail(f"{name}: not found: {path}")
    try:
        catalogue = Catalogue(examples=examples, prototypes=prototypes, weights_dir=weights_dir,
                              prototype_options={"progress": _rich_progress()} if examples is not None else None)
        if catalogue.models:  # build the default model now, not on the first press of Compare
            catalogue.adapter(catalogue.models[0])
    except ValueError as exc:
        _fail(str(exc))
    if not catalogue.models:
        reasons: dict = {}  # the four CLIP adapters share one reason: say it once
        for what, why in catalogue.unavailable.items():
            if what.startswith("model "):
                reasons.setdefault(why, []).append(what.removeprefix("model "))
        _fail("no model can run here: " + "; ".join(f"{', '.join(names)}: {why}" for why, names in reasons.items()))
    app = DemoApp(catalogue, images=images)

    def stop(*_):  # a plain kill ends the page like Ctrl-C does: the temporary folder is removed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    typer.echo(f"dslo demo: models {catalogue.models}, attention {catalogue.providers}; temporary files in {app.folder}")
    try:
        serve(app, host=host, port=port)
    except OSError as exc:
        _fail(f"cannot serve on {host}:{port or 7860}: {exc}")
    finally:
        app.close()
