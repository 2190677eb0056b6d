"""``dslo demo``: a local page (Gradio) that puts dslo's solvers and the rivals side by side
on one photo.

    from dslo.integrations.demo import DemoApp, serve
    app = DemoApp(Catalogue(prototypes="protos.pt"))
    result = app.compare("street.png", None, "prototype", "road, car, sky", ["dinov2"], ["none", "velocity"])
    serve(app, host="127.0.0.1", port=7860)          # the page; blocks until Ctrl-C

``DemoApp.compare`` is the page's work without the page (the tests call it): the model and
each attention provider run once per photo (``demo_models.Catalogue`` keeps them), every
method runs on the same inputs (``demo_compare.run_methods``), the masks, tables and
downloads are written under one temporary folder. ``build_page`` lays out the Gradio
components around it; bad input becomes a message on the page, never a traceback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .demo_compare import (MAX_PIXELS, METHODS, MethodRun, available_methods, method_needs, parse_class_names,
                           per_class_table, palette_image, read_mask, read_photo, run_methods, score_table)
from .demo_models import Catalogue
from .demo_views import class_key_html, comparison_figure, mask_overlays, stage_data, stage_maps_figure

__all__ = ["DemoApp", "Comparison", "build_page", "serve", "shipped_examples", "MAX_UPLOAD", "IMAGE_SUFFIXES"]

#: largest upload the page accepts (Gradio refuses bigger files before they are stored)
MAX_UPLOAD = "25mb"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def shipped_examples(extra: Union[str, Path, None] = None) -> list[Path]:
    """Example photos offered by the page: those of ``extra`` (a folder, ``--images``), then
    the ``examples/`` folder of the source checkout when there is one. Masks and files that
    are not images are skipped; at most 12."""
    folders = []
    if extra is not None:
        folders.append(Path(extra).expanduser())
    folders.append(Path(__file__).resolve().parents[3] / "examples")
    found: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES and "mask" not in p.stem.lower())
    return found[:12]


@dataclass
class Comparison:
    """What one press of "Compare" produced (kept in the session for the stage view).

    The runs' full outputs are dropped once the tables and pictures are made (a method's
    scores at a 4 Mpx photo take C x 16 MB); what the page still needs is kept: each run's
    labels (the mask download) and ``StageData`` (the stage view).

    Attributes:
        image: (1, 3, H, W) in [0, 1]; class_names: the C compared classes.
        runs: ``MethodRun`` per (method, provider), outputs dropped; ``error`` None = it ran.
        ground_truth: (H, W) or None.
        table: ``score_table`` rows; per_class: ``per_class_table`` rows (empty without truth).
        timings: "model ..." and "attention ..." lines (seconds, computed or reused).
        folder: the temporary folder holding this comparison's files.
        overlays: (picture, caption) per run and the truth (``demo_views.mask_overlays``).
        key: the class key (HTML).
        labels: run label -> (H, W) labels; stages: run label -> ``StageData``.
        figure: the comparison PNG.
    """

    image: torch.Tensor
    class_names: list[str]
    runs: list[MethodRun]
    ground_truth: Optional[torch.Tensor]
    table: list[dict]
    per_class: list[dict]
    timings: list[str]
    folder: Path
    overlays: list = field(default_factory=list)
    key: str = ""
    labels: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    figure: Optional[Path] = None
    masks: dict = field(default_factory=dict)

    @property
    def ran(self) -> list[str]:
        """Labels of the runs that produced labels, in run order."""
        return [r.label for r in self.runs if r.label in self.labels]

    def _check(self, label: str) -> None:
        if label not in self.labels:
            run = next((r for r in self.runs if r.label == label), None)
            if run is None:
                raise ValueError(f"no method {label!r} in this comparison; ran: {self.ran}")
            raise ValueError(f"{label} did not run: {run.error}")

    def mask_file(self, label: str) -> Path:
        """The palette PNG of one run's labels (written on first request)."""
        self._check(label)
        if label not in self.masks:
            safe = "".join(ch if ch.isalnum() or ch in "+-" else "_" for ch in label.replace(" @ ", "_at_"))
            path = self.folder / f"mask_{safe}.png"
            palette_image(self.labels[label].long(), len(self.class_names)).save(path)
            self.masks[label] = path
        return self.masks[label]

    def stages_picture(self, label: str):
        """(H, W, 3) uint8 picture of ``demo_views.stage_maps_figure`` for one run."""
        import matplotlib.pyplot as plt
        import numpy as np

        self._check(label)
        fig = stage_maps_figure(self.image, self.stages[label], self.class_names)
        try:
            fig.canvas.draw()
            picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        finally:
            plt.close(fig)
        return picture


class DemoApp:
    """The page's work: models and providers (``Catalogue``), methods, files under one
    temporary folder (removed by ``close``).

    Args:
        catalogue: what can run here.
        images: extra folder of example photos (``shipped_examples``).
        workdir: parent of the temporary folder (default: the system's temporary directory).
    """

    def __init__(self, catalogue: Catalogue, images: Union[str, Path, None] = None,
                 workdir: Union[str, Path, None] = None) -> None:
        self.catalogue = catalogue
        self.methods, self.unavailable_methods = available_methods()
        self.examples = shipped_examples(images)
        self.folder = Path(tempfile.mkdtemp(prefix="dslo-demo-", dir=workdir))

    def close(self) -> None:
        """Remove the temporary folder and everything written in it."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def unavailable_lines(self) -> list[str]:
        """"model clip: reason" lines for every model, provider and method that cannot run."""
        lines = [f"{what}: {why}" for what, why in self.catalogue.unavailable.items()]
        lines += [f"method {m}: {why}" for m, why in self.unavailable_methods.items()]
        return lines

    def default_classes(self, model: str) -> str:
        """The model's classes as the page's class text ("" for open-vocabulary models)."""
        try:
            return ", ".join(self.catalogue.default_classes(model))
        except ValueError:
            return ""

    def compare(self, photo: Union[str, Path, None], mask: Union[str, Path, None], model: str, classes: str,
                providers: Sequence[str], methods: Sequence[str]) -> Comparison:
        """One comparison: read and check the inputs, the model and each provider once,
        every method on the same inputs, scores, the comparison figure.

        Args:
            photo: image file (at most ``MAX_PIXELS``); mask: optional ground-truth PNG of
                the same size, indices into the model's classes (``demo_compare.read_mask``).
            model: a model of the catalogue; classes: comma-separated names (a subset of the
                prototype model's; any for CLIP models).
            providers: attention providers for the methods that read attention.
            methods: keys of ``demo_compare.METHODS``.

        Raises:
            ValueError: one line for the page (bad file, duplicates, nothing chosen,
                unavailable model or provider, ...).
        """
        if photo is None:
            raise ValueError("photo: upload a photo or pick an example")
        methods = list(methods or [])
        if not methods:
            raise ValueError("methods: choose at least one method")
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ValueError(f"methods {unknown} cannot run here; available: {self.methods}")
        providers = list(providers or [])
        if any(method_needs(m) != "image" for m in methods) and not providers:
            raise ValueError("attention: the chosen methods need at least one attention provider")
        image = read_photo(photo)
        known = self.catalogue.default_classes(model)
        names = parse_class_names(classes, known or None) if str(classes or "").strip() or not known else known
        gt = None if mask is None else read_mask(mask, image.shape[-2:], names, known or names)
        timings = []
        logits, seconds, reused = self.catalogue.logits(model, image, names)
        timings.append(f"model {model}: {seconds:.2f} s" + (" (computed earlier for this photo, reused)" if reused else ""))
        attentions = {}
        if any(method_needs(m) != "image" for m in methods):
            for p in providers:
                att, seconds, reused = self.catalogue.attention(p, image)
                attentions[p] = att
                timings.append(f"attention {p}: {seconds:.2f} s" + (" (reused)" if reused else ""))
        runs = run_methods(logits, attentions, image, methods)
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.folder))
        table = score_table(runs, gt, len(names))
        per_class = per_class_table(runs, gt, names) if gt is not None else []
        result = Comparison(image, list(names), runs, gt, table, per_class, timings, folder)
        if any(r.output is not None for r in runs):
            result.figure = comparison_figure(image, runs, names, folder / "comparison.png", gt)
        result.overlays = mask_overlays(image, runs, len(names), gt)
        result.key = class_key_html(runs, names, gt)
        for r in runs:
            if r.output is not None:
                data = stage_data(r, len(names))
                result.labels[r.label], result.stages[r.label] = data.labels, data
                r.output = None
        return result


# --------------------------------------------------------------------------- the page

_INTRO = """# dslo: refiners side by side
Pick a photo, a model and its classes, one or more attention providers and the methods to compare.
The model and each attention run once per photo; every method refines the same logits.
Photos up to {mpx:.1f} Mpx, uploads up to {upload}; a ground-truth mask (palette or index PNG, the photo's size,
indices into the model's classes, 255 = ignored) adds mIoU and pixel accuracy."""


def build_page(app: DemoApp):
    """The Gradio ``Blocks`` of the page around ``app`` (not launched)."""
    import gradio as gr

    models = app.catalogue.models
    providers = app.catalogue.providers
    default_model = models[0] if models else None
    default_providers = [p for p in ("dinov2",) if p in providers] or providers[:1]
    unavailable = app.unavailable_lines()

    with gr.Blocks(title="dslo demo", analytics_enabled=False) as page:
        gr.Markdown(_INTRO.format(mpx=MAX_PIXELS / 1e6, upload=MAX_UPLOAD.replace("mb", " MB")))
        if unavailable:
            gr.Markdown("**Unavailable here:**\n" + "\n".join(f"- {line}" for line in unavailable),
                        elem_id="unavailable")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.File(label="photo", type="filepath", elem_id="photo")
                if app.examples:
                    example = gr.Dropdown([p.name for p in app.examples], value=None, label="or a shipped example",
                                          elem_id="example")
                    example.change(lambda name: next((str(p) for p in app.examples if p.name == name), None),
                                   example, photo)
                mask = gr.File(label="ground-truth mask (optional)", type="filepath", elem_id="mask")
                model = gr.Dropdown(models, value=default_model, label="model", elem_id="model")
                classes = gr.Textbox(app.default_classes(default_model) if default_model else "",
                                     label="classes (comma-separated)", elem_id="classes")
                attention = gr.CheckboxGroup(providers, value=default_providers, label="attention providers",
                                             elem_id="providers")
                methods = gr.CheckboxGroup([(f"{m}: {METHODS[m]}", m) for m in app.methods],
                                           value=[m for m in ("none", "velocity") if m in app.methods],
                                           label="methods", elem_id="methods")
                go = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column(scale=2):
                message = gr.Markdown("", elem_id="message")
                timings = gr.Markdown("", elem_id="timings")
                gallery = gr.Gallery(label="masks (label colours over the photo)", columns=4, height="auto",
                                     elem_id="masks")
                key = gr.HTML("", elem_id="key")
                table = gr.Dataframe(headers=["method", "attention", "seconds", "mIoU", "pixel accuracy", "note"],
                                     label="results", elem_id="results", interactive=False)
                per_class = gr.Dataframe(label="IoU per class (with a ground truth)", elem_id="per-class",
                                         interactive=False)
                chosen = gr.Dropdown([], label="method for the stage maps and the mask download", elem_id="chosen")
                stages = gr.Image(label="stage maps", type="numpy", elem_id="stages", interactive=False)
                with gr.Row():
                    mask_download = gr.File(label="chosen mask (palette PNG)", elem_id="mask-download")
                    figure_download = gr.File(label="comparison (PNG)", elem_id="figure-download")

        model.change(app.default_classes, model, classes)

        def on_compare(photo_, mask_, model_, classes_, attention_, methods_):
            try:
                result = app.compare(photo_, mask_, model_, classes_, attention_, methods_)
            except Exception as exc:  # the page shows one line; the server's log keeps the traceback of a bug
                if not isinstance(exc, ValueError):
                    traceback.print_exc()
                first = " ".join(str(exc).strip().splitlines()[:1])
                if not isinstance(exc, ValueError):
                    first = f"unexpected {type(exc).__name__}: {first} (details in the terminal running dslo demo)"
                return (None, f"**error:** {first}", "", [], "", None, None, gr.Dropdown(choices=[], value=None),
                        None, None, None)
            ran = result.ran
            # the stage view opens on a dslo solver when one ran: its stages are the interesting ones
            solvers = [r.label for r in result.runs if r.label in ran and r.method in ("path", "velocity",
                                                                                    "fusion", "propagate")]
            first = (solvers or ran or [None])[0]
            failed = [f"{r.label}: {r.error}" for r in result.runs if r.label not in ran]
            note = f"compared {len(result.runs)} runs on {len(result.class_names)} classes" + (
                "; " + "; ".join(failed) if failed else "")
            header = list(result.table[0].keys())
            rows = [[r[h] if r[h] is not None else "" for h in header] for r in result.table]
            per = None
            if result.per_class:
                cols = ["class"] + ran
                per = {"headers": cols, "data": [[row.get(c) if row.get(c) is not None else "" for c in cols]
                                                  for row in result.per_class]}
            return (result, note, " · ".join(result.timings),
                    result.overlays, result.key,
                    {"headers": header, "data": rows}, per,
                    gr.Dropdown(choices=ran, value=first),
                    result.stages_picture(first) if first else None,
                    str(result.mask_file(first)) if first else None,
                    str(result.figure) if result.figure else None)

        go.click(on_compare, [photo, mask, model, classes, attention, methods],
                 [state, message, timings, gallery, key, table, per_class, chosen, stages, mask_download,
                  figure_download], concurrency_limit=1)

        def on_choose(result, label):
            if result is None or not label:
                return None, None
            try:
                return result.stages_picture(label), str(result.mask_file(label))
            except ValueError:
                return None, None

        chosen.change(on_choose, [state, chosen], [stages, mask_download])
    return page


def serve(app: DemoApp, host: str = "127.0.0.1", port: Optional[int] = None, block: bool = True):
    """Launch the page (blocks until interrupted unless ``block=False``, which returns the
    Gradio ``Blocks``; close it with ``.close()``).

    Gradio keeps its uploads under ``app.folder/uploads`` (GRADIO_TEMP_DIR), so nothing is
    written outside the app's temporary folder; analytics are off (the page works offline).
    """
    os.environ["GRADIO_TEMP_DIR"] = str(app.folder / "uploads")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page = build_page(app)
    allowed = [str(p.parent) for p in app.examples] + [str(app.folder)]
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, allowed_paths=sorted(set(allowed)),
                prevent_thread_lock=not block, quiet=True, show_error=False, footer_links=[], ssr_mode=False)
    return page
