"""The README as a new user meets it: every Python block runs as written (from the repository
root, nothing beside the clone), a block that needs downloaded weights says so and ends in the
one-line error at once, and the first command writes a palette mask with its summary."""

import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDS_WEIGHTS = "# needs downloaded weights"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def first_command() -> list[str]:
    """The bash block under "## First command": its one command, split like a shell would."""
    section = README.read_text().split("## First command", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))




def test_readme_has_the_blocks_it_promises():
    blocks = python_blocks()
    assert len(blocks) >= 4, "README lost a Python example"
    assert sum(NEEDS_WEIGHTS in b for b in blocks) >= 1  # the CLIP example is marked
    assert first_command()[:2] == ["dslo", "segment"]


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_as_written(index, monkeypatch, no_network):
    pytest.importorskip("onnx")
    block = python_blocks()[index]
    monkeypatch.chdir(ROOT)  # the blocks read examples/ relative to the clone
    scope: dict = {"__name__": "__readme__"}
    code = compile(block, f"README.md python block {index}", "exec")
    if NEEDS_WEIGHTS in block:
        pytest.importorskip("open_clip")
        started = time.monotonic()
        with pytest.raises(ValueError) as err:
            exec(code, scope)
        seconds = time.monotonic() - started
        message = str(err.value)
        assert "\n" not in message and message.startswith("missing weights:"), message
        assert "download" in message and "offline alternatives" in message, message
        assert seconds < 30, f"the missing-weights error took {seconds:.0f} s (a retry storm?)"
        return
    exec(code, scope)
    if "rival" in scope:  # the logits + attention example
        out, rival = scope["out"], scope["rival"]
        assert out.labels.shape == (1, 448, 448) and out.labels.dtype == torch.int64
        assert out.scores.shape == (1, 5, 448, 448) and not bool(torch.isnan(out.scores).any())
        assert rival.labels.shape == (1, 448, 448) and bool(rival.active.all())
    elif "shares" in scope:  # the example photo through the shipped prototypes
        out, shares = scope["out"], scope["shares"]
        assert out.labels.shape == (1, 360, 480) and int(out.labels.max()) < 11
        assert abs(float(shares.sum()) - 1) < 1e-6
        road = scope["adapter"].class_names.index("road")
        assert float(shares[road]) > 0.2  # a street photo: the road is found
    elif "their_model" in scope:
        labels = scope["labels"]
        assert labels.shape == (1, 224, 224) and int(labels.max()) < 4
    else:
        pytest.fail(f"README python block {index} is not checked by this test: {block[:80]!r}")


def test_readme_first_command_writes_a_palette_mask(tmp_path, monkeypatch, no_network):
    """The first command as written, with --out moved to tmp: a palette PNG (class indices as
    pixel values, one colour per class) and a summary with index, name and share."""
    pytest.importorskip("onnx")
    pytest.importorskip("typer")
    from PIL import Image
    from typer.testing import CliRunner

    from dslo.integrations.cli import app
    from dslo.integrations.figures import label_palette

    args = first_command()[2:]
    out = tmp_path / "mask.png"
    args[args.index("--out") + 1] = str(out)
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, ["segment", *args])
    assert res.exit_code == 0, res.output
    mask = Image.open(out)
    assert mask.mode == "P" and mask.size == (480, 360)
    labels = np.asarray(mask)
    assert labels.max() < 11
    palette = np.asarray(mask.getpalette()[:33], dtype=np.uint8).reshape(11, 3)
    assert (palette == label_palette(11)).all() and len({tuple(c) for c in palette}) == 11
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} (360x480, palette PNG")
    names = ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
             "pedestrian", "bicyclist"]
    shares = {}
    for line in lines[2:]:
        match = re.fullmatch(r"\s+(\d+)\s+(.+?)\s+([\d.]+)%", line)
        if match:
            shares[int(match.group(1))] = (match.group(2), float(match.group(3)))
    present = sorted(set(np.unique(labels).tolist()))
    assert sorted(shares) == present and all(shares[k][0] == names[k] for k in present)
    for k in present:
        assert abs(shares[k][1] - 100 * (labels == k).mean()) < 0.06
    assert "--figure" in lines[-1]
