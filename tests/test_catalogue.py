"""Catalogue of bad and edge inputs (one table): every case either raises ``ValueError`` with
a message naming what was expected, or returns a defined result with no NaN."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dslo import Attention, DiscrepancyRefiner, PatchLogits
from dslo.attention import build_attention
from dslo.integrations.bench import load_dataset
from dslo.integrations.cli import app
from dslo.refiners.jbu import joint_bilateral_upsample
from dslo.refiners.path import sinkhorn_plan
from dslo.refiners.velocity import doubly_stochastic

from conftest import blob_problem, random_attention

L, A, IMG, _ = blob_problem()


_FILES = tempfile.TemporaryDirectory(prefix="dslo-catalogue-")  # removed when the session ends


def _file(name: str, data: bytes):
    """A small data file written for one case (cases run lazily, in any order)."""
    path = Path(tempfile.mkdtemp(dir=_FILES.name)) / name
    path.write_bytes(data)
    return path


def _protos(**kw):
    from dslo.adapters.prototype_record import Prototypes

    args = dict(vectors=torch.nn.functional.normalize(torch.rand(2, 8), dim=1), class_names=["a", "b"],
                counts=torch.tensor([1, 2]), layer=2)
    args.update(kw)
    return Prototypes(**args)


def _load_protos_naming(weights):
    from dslo.adapters.prototype import PrototypeAdapter

    path = _file("p.pt", b"")
    _protos(weights=str(weights)).save(path)
    return PrototypeAdapter(path)


def _folder_with_code():
    folder = _file("config.json", b'{"model_type": "x", "auto_map": {"AutoModel": "m.M"}}').parent
    (folder / "m.py").write_text("raise SystemExit('ran')\n")
    return folder


def _out_is_input():
    from dslo.integrations.outputs import check_outputs

    f = _file("photo.png", b"a photo")
    return check_outputs({"--out": f.parent / "x" / ".." / "photo.png"}, inputs=[f])


def refine(logits=L, attention=A, image=IMG, **kw):
    return DiscrepancyRefiner(**kw)(logits, attention, image)


def with_(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# (name, thunk, expected): expected is a regex for ValueError, or None for "defined result"
CASES = [
    ("nan logits", lambda: refine(logits=with_(L, (0, 0, 0, 0), float("nan"))), "finite"),
    ("inf logits", lambda: refine(logits=with_(L, (0, 1, 2, 3), float("inf"))), "finite"),
    ("2-d logits", lambda: refine(logits=L[0, 0]), r"4 dimensions \(B, C, h, w\)"),
    ("integer logits", lambda: refine(logits=(L * 100).long()), "floating"),
    ("zero classes", lambda: refine(logits=L[:, :0]), "C >= 1"),
    ("batch size 0", lambda: refine(logits=L[:0], image=IMG[:0]), "B >= 1"),
    ("mismatched batch sizes", lambda: refine(image=torch.cat([IMG, IMG])), "match logits"),
    ("attention batch 3 vs 1", lambda: refine(attention=torch.cat([A] * 3)), "batch size 3"),
    ("negative attention", lambda: refine(attention=with_(A, (0, 0, 0), -0.5)), "non-negative"),
    ("non-square attention", lambda: refine(attention=A[:, :, :60]), r"\(B, N, N\)"),
    ("attention row sums to 0", lambda: refine(attention=with_(A, (0, 5), 0.0)), "sum to 0"),
    ("attention grid mismatch", lambda: refine(attention=A[:, :30, :30]), "N = h\\*w = 120"),
    ("attention of wrong type", lambda: refine(attention=[[1.0]]), "dslo.Attention"),
    ("Attention grid with a zero", lambda: Attention(torch.ones(1, 1, 1), (0, 1)), "h, w >= 1"),
    ("Attention not stochastic", lambda: Attention(torch.ones(1, 4, 4), (2, 2)), "row-stochastic"),
    ("image 0..255", lambda: refine(image=IMG * 255), r"\[0, 1\]"),
    ("image with 4 channels", lambda: refine(image=torch.rand(1, 4, 80, 96)), "3 channels"),
    ("unknown solver", lambda: DiscrepancyRefiner(solver="ot"), "solver"),
    ("unknown option", lambda: DiscrepancyRefiner(tau=0.3), "unknown option"),
    ("memory guard", lambda: refine(logits=torch.rand(1, 2, 64, 64), attention=Attention(torch.full((1, 4, 4), .25), (2, 2)),
                                    image=torch.rand(1, 3, 64, 64), max_matrix_bytes=2**20), "max_matrix_bytes"),
    ("PatchLogits synonyms length", lambda: PatchLogits(torch.rand(1, 3, 2, 2), torch.tensor([0, 1])), "one per query"),
    ("PatchLogits negative class", lambda: PatchLogits(torch.rand(1, 2, 2, 2), torch.tensor([0, -1])), ">= 0"),
    ("sinkhorn negative marginal", lambda: sinkhorn_plan(torch.rand(3, 3), -torch.ones(1, 3) / 3, torch.ones(3) / 3), "non-negative"),
    ("IPF with NaN", lambda: doubly_stochastic(torch.full((3, 3), float("nan"))), "finite"),
    ("JBU sigma 0", lambda: joint_bilateral_upsample(torch.rand(1, 1, 4, 4), torch.rand(1, 3, 8, 8), 0.0), "sigmas"),
    ("unknown provider", lambda: build_attention("sd3"), "unknown attention provider"),
    ("unknown weights", lambda: build_attention("dinov2", weights="no/such-model", local_files_only=True), "no/such-model"),
    ("CUDA requested without CUDA", lambda: build_attention("affinity", device="cuda") if not torch.cuda.is_available()
        else (_ for _ in ()).throw(ValueError("CUDA not available (skipped: this machine has CUDA)")), "CUDA"),
    ("bad device name", lambda: build_attention("affinity", device="gpu0"), "device"),
    ("dataset folder missing", lambda: load_dataset("/nonexistent/voc"), "missing"),
    # untrusted files and paths (issue: trust in what is reused and written)
    ("0x0 image", lambda: refine(image=torch.rand(1, 3, 0, 0)), "H, W >= 1"),
    ("0x0 image in a rival", lambda: refine(image=torch.rand(1, 3, 0, 0), solver="pamr"), "H, W >= 1"),
    ("prototypes with duplicate names", lambda: _protos(class_names=["car", "Car"]), "duplicate"),
    ("prototypes with negative counts", lambda: _protos(counts=torch.tensor([3, -2])), "non-negative"),
    ("prototypes long side 20000", lambda: _protos(size=20000), "1 to 1036"),
    ("prototype file naming code", lambda: _load_protos_naming(_folder_with_code()), "refused"),
    ("prototype file naming unknown hub weights", lambda: _load_protos_naming("someone/vit"), "not a known DINOv2"),
    ("damaged prototype file", lambda: __import__("dslo.adapters.prototype_record", fromlist=["x"]).Prototypes.load(
        _file("d.pt", b"PK\x03\x04 not really")), "cannot read prototype file"),
    ("class file in Latin-1", lambda: __import__("dslo.adapters.vocab", fromlist=["x"]).load_class_names(
        _file("c.txt", "caf\xe9\n".encode("latin-1"))), "not UTF-8"),
    ("class file with a duplicate", lambda: __import__("dslo.adapters.vocab", fromlist=["x"]).load_class_names(
        _file("c.txt", b"cat\ndog\ncat\n")), "duplicate"),
    ("output path resolving to an input", _out_is_input, "input file"),
    # defined results
    ("all patches rejected by NMS", lambda: refine(logits=torch.full((1, 3, 10, 12), 0.2)), None),
    ("one class", lambda: refine(logits=L[:, :1]), None),
    ("171 classes", lambda: refine(logits=torch.rand(1, 171, 10, 12) * 0.05 + 0.2, solver="path"), None),
    ("1x1 grid", lambda: refine(logits=torch.rand(1, 3, 1, 1), attention=torch.ones(1, 1, 1), image=torch.rand(1, 3, 5, 7)), None),
    ("odd image size", lambda: refine(image=torch.rand(1, 3, 37, 53)), None),
    ("image smaller than the grid", lambda: refine(image=torch.rand(1, 3, 4, 5)), None),
    ("fp16 inputs", lambda: refine(logits=L.half(), attention=A.half(), image=IMG.half()), None),
    ("bf16 inputs", lambda: refine(logits=L.bfloat16(), attention=A.bfloat16(), image=IMG.bfloat16()), None),
    ("float64 inputs", lambda: refine(logits=L.double(), attention=A.double(), image=IMG.double()), None),
    ("huge logits", lambda: refine(logits=L * 1e4), None),
    ("all classes tied", lambda: refine(logits=torch.full((1, 4, 10, 12), 0.25), solver="velocity"), None),
    ("identity attention", lambda: refine(attention=torch.eye(120).unsqueeze(0), solver="path"), None),
    ("attention on a finer grid", lambda: refine(attention=Attention(random_attention(1, 20 * 24), (20, 24))), None),
    ("velocity literal reading", lambda: refine(solver="velocity", velocity_reading="paper"), None),
    ("path literal reading", lambda: refine(solver="path", path_reading="paper"), None),
]


@pytest.mark.parametrize("name,thunk,expected", CASES, ids=[c[0] for c in CASES])
def test_catalogue(name, thunk, expected):
    if expected is not None:
        with pytest.raises(ValueError, match=expected):
            thunk()
        return
    out = thunk()
    assert not bool(torch.isnan(out.scores).any()), name
    c = out.scores.shape[1]
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) < c
    assert out.labels.shape[-2:] == out.scores.shape[-2:]


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30


# ---- the command line: one-line errors, exit code 2, no partial output ----

@pytest.fixture
def files(tmp_path):
    from PIL import Image
    import numpy as np

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8")).save(img)
    lg = tmp_path / "logits.pt"
    torch.save(torch.rand(3, 4, 5) * 0.05 + 0.2, lg)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a tensor")
    text_img = tmp_path / "notimage.png"
    text_img.write_text("hello")
    return tmp_path, img, lg, garbage, text_img


CLI_CASES = [
    ("missing logits", lambda d, img, lg, g, t: ["refine", "--logits", str(d / "nope.pt"), "--image", str(img)], "not found"),
    ("garbage logits", lambda d, img, lg, g, t: ["refine", "--logits", str(g), "--image", str(img)], "cannot read logits"),
    ("unreadable image", lambda d, img, lg, g, t: ["refine", "--logits", str(lg), "--image", str(t)], "cannot read image"),
    ("class count mismatch", lambda d, img, lg, g, t: ["refine", "--logits", str(lg), "--image", str(img), "--classes", "a,b"], "C = 3"),
    ("empty class name", lambda d, img, lg, g, t: ["refine", "--logits", str(lg), "--image", str(img), "--classes", "a,,b"], "empty class name"),
    ("duplicate class names", lambda d, img, lg, g, t: ["refine", "--logits", str(lg), "--image", str(img), "--classes", "a,a,b"], "duplicate"),
    ("unknown provider", lambda d, img, lg, g, t: ["refine", "--logits", str(lg), "--image", str(img), "--attention", "nope"], "unknown attention provider"),
    ("unknown solver", lambda d, img, lg, g, t: ["refine", "--logits", str(lg), "--image", str(img), "--attention", "affinity", "--solver", "x"], "solver"),
    ("figure is the image", lambda d, img, lg, g, t: ["refine", "--logits", str(lg), "--image", str(img), "--attention", "affinity", "--figure", str(img)], "input file"),
    ("figure is a folder", lambda d, img, lg, g, t: ["refine", "--logits", str(lg), "--image", str(img), "--attention", "affinity", "--figure", str(d)], "is a folder"),
    ("segment figure is the image", lambda d, img, lg, g, t: ["segment", str(img), "--classes", "a,b", "--figure", str(img)], "input file"),
    ("segment adapter typo", lambda d, img, lg, g, t: ["segment", str(img), "--classes", "a,b", "--adapter", "protoype", "--attention", "affinity"], "did you mean 'prototype'"),
]


@pytest.mark.parametrize("name,args,match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_errors_are_one_line_and_keep_outputs(files, name, args, match):
    d, img, lg, g, t = files
    out = d / "mask.png"
    out.write_bytes(b"a good mask from before")
    res = CliRunner().invoke(app, args(d, img, lg, g, t) + ["--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dslo: error:"), res.output
    assert match in lines[0]
    assert out.read_bytes() == b"a good mask from before"
    assert not list(d.glob("*.tmp*"))


def test_cli_refine_writes_mask_and_figure(files):
    from PIL import Image

    d, img, lg, *_ = files
    res = CliRunner().invoke(app, ["refine", "--logits", str(lg), "--image", str(img), "--attention", "affinity",
                                   "--classes", "cat,dog,sofa", "--out", str(d / "m.png"), "--figure", str(d / "f.png")])
    assert res.exit_code == 0, res.output
    mask = Image.open(d / "m.png")
    assert mask.size == (56, 40)
    import numpy as np

    assert int(np.asarray(mask).max()) < 3
    assert (d / "f.png").stat().st_size > 1000
