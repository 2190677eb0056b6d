from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

def _data_root() -> Path:
    """$DSLO_DATA, else ../shared/data beside the checkout, else the development machines'
    /work/shared/data (a clean clone for CI may live elsewhere)."""
    candidates = [os.environ.get("DSLO_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
                  "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "voc14" / "images").is_dir():
            return Path(c)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


DATA = _data_root()


@pytest.fixture
def data_dir() -> Path:
    """../shared/data, or skip: the real-image sets live beside the project, not inside it."""
    if not (DATA / "voc14" / "images").is_dir():
        pytest.skip(f"real-image data not found at {DATA} (see ../shared/data/README.md)")
    return DATA


def random_attention(b: int, n: int, seed: int = 0, sharp: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, n, n, generator=g) * sharp, -1)


def blob_problem(b: int = 1, h: int = 10, w: int = 12, seed: int = 0):
    """Two-region logits (left/right halves) with noise, a matching block attention and image."""
    g = torch.Generator().manual_seed(seed)
    n = h * w
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, : w // 2] = True
    truth = torch.where(left, 0, 1)
    logits = torch.full((b, 3, h, w), 0.2)
    logits[:, 0] += 0.06 * left
    logits[:, 1] += 0.06 * ~left
    logits[:, 2] -= 0.05  # a distractor that never wins
    logits += 0.02 * torch.randn(b, 3, h, w, generator=g)
    same = (left.flatten()[:, None] == left.flatten()[None, :]).float()
    att = same + 0.05
    att = (att / att.sum(-1, keepdim=True)).expand(b, n, n).contiguous()
    image = torch.zeros(b, 3, h * 8, w * 8)
    image[:, 0, :, : w * 4] = 0.9
    image[:, 2, :, w * 4:] = 0.8
    return logits, att, image, truth


def tiny_dinov2(layers: int = 3, seed: int = 0):
    """A tiny random transformers ``Dinov2Model`` (32-d, 2 heads, 14-px patches) in eval mode:
    the real architecture at test size."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=2,
                                       patch_size=14, image_size=56, initializer_range=0.3)
    return transformers.Dinov2Model(config).eval()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """What a fresh machine without the weights sees: HF_HUB_OFFLINE unset, an empty Hugging Face
    cache, and a Hub that refuses connections (port 9 of localhost: refused at once)."""
    from dslo import _hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    _hub.hub_reachable.cache_clear()
    yield
    _hub.hub_reachable.cache_clear()
