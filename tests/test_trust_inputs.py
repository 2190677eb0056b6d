"""Data files as untrusted input: class files read as UTF-8 with the BOM stripped (else one
line naming the file), duplicate class names refused where names are matched, 16-bit PNGs read
at their range (or refused with a message), sizes bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dslo.adapters.image_files import read_label_map, read_rgb
from dslo.adapters.prototype_build import read_examples
from dslo.adapters.vocab import load_class_names
from dslo.integrations.bench import load_dataset
from dslo.integrations.cli import app


def _folder(root, classes_bytes, mask=None, image=None):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_bytes(classes_bytes)
    Image.fromarray(image if image is not None else np.zeros((28, 28, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(mask if mask is not None else np.zeros((28, 28), np.uint8)).save(root / "masks" / "a.png")
    return root


def test_bom_is_not_part_of_the_first_class_name(tmp_path):
    root = _folder(tmp_path / "ex", "\ufeffsky\nroad\n".encode("utf-8"))
    assert read_examples(root).class_names == ["sky", "road"]
    assert load_dataset(root).classes == ["sky", "road"]
    f = tmp_path / "names.txt"
    f.write_bytes("\ufeffcat\ndog, puppy\n".encode("utf-8"))
    assert load_class_names(f) == [["cat"], ["dog", "puppy"]]


def test_latin1_class_files_give_one_line_naming_the_file(tmp_path):
    root = _folder(tmp_path / "ex", "caf\xe9\nroad\n".encode("latin-1"))
    for call in (lambda: read_examples(root), lambda: load_dataset(root)):
        with pytest.raises(ValueError, match="not UTF-8") as err:
            call()
        assert str(root / "classes.txt") in str(err.value) and "\n" not in str(err.value)
    f = tmp_path / "names.txt"
    f.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{f}.*not UTF-8"):
        load_class_names(f)


def test_duplicate_class_names_are_refused_where_names_are_matched(tmp_path):
    root = _folder(tmp_path / "ex", b"sky\nroad\nSky\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_examples(root)
    f = tmp_path / "names.txt"
    f.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_class_names(f)
    # a benchmark scored by label index may repeat a name (ADE20K-150 has two "screen" lines)
    assert load_dataset(_folder(tmp_path / "ade", b"wall\nscreen\nscreen\n")).classes == ["wall", "screen", "screen"]


def test_sixteen_bit_greyscale_png_is_read_at_its_range(tmp_path):
    grey = (np.linspace(0, 40000, 28 * 28).reshape(28, 28)).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(grey).save(path)
    rgb = read_rgb(path)
    assert rgb.shape == (28, 28, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[..., 1], grey / 65535.0, atol=1e-6)
    assert (rgb >= 0.999).mean() < 0.01  # PIL's convert("RGB") makes 99 % of it white


def test_sixteen_bit_image_in_a_data_set_and_on_the_command_line(tmp_path):
    grey = (np.linspace(0, 60000, 28 * 28).reshape(28, 28)).astype(np.uint16)
    root = _folder(tmp_path / "set", b"sky\nroad\n")
    Image.fromarray(grey).save(root / "images" / "a.png")
    sample = load_dataset(root).load("a")
    np.testing.assert_allclose(sample.image[0].numpy(), grey / 65535.0, atol=1e-6)
    from dslo.integrations.cli_segment import read_image

    assert float(read_image(root / "images" / "a.png").max()) == pytest.approx(60000 / 65535, abs=1e-6)


def test_float_and_32_bit_images_are_refused_with_a_message(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.random.rand(8, 8).astype(np.float32)).save(path)
    with pytest.raises(ValueError, match="no defined range"):
        read_rgb(path)


def test_sixteen_bit_mask_values_beyond_the_classes_are_one_line(tmp_path):
    mask = np.zeros((28, 28), np.uint16)
    mask[0, 0] = 1000
    root = _folder(tmp_path / "set", b"sky\nroad\n")
    Image.fromarray(mask).save(root / "masks" / "a.png")
    assert read_label_map(root / "masks" / "a.png").max() == 1000
    with pytest.raises(ValueError, match="mask values up to 1000"):
        load_dataset(root).load("a")


def test_segment_size_20000_is_one_line(tmp_path):
    import torch.nn.functional as F

    from dslo.adapters.prototype_record import MAX_LONG_SIDE, Prototypes

    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(img)
    protos = tmp_path / "p.pt"
    Prototypes(F.normalize(torch.rand(2, 384), dim=1), ["a", "b"], torch.tensor([1, 2]), 8).save(protos)
    res = CliRunner().invoke(app, ["segment", str(img), "--adapter", "prototype", "--prototypes", str(protos),
                                   "--attention", "affinity", "--size", "20000", "--out", str(tmp_path / "m.png")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and str(MAX_LONG_SIDE) in lines[0], res.output


@pytest.mark.parametrize("size", ["20000", "448x20000", "0"])
def test_clip_size_beyond_the_limit_is_one_line(tmp_path, size):
    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(img)
    res = CliRunner().invoke(app, ["segment", str(img), "--classes", "a,b", "--attention", "affinity",
                                   "--size", size, "--out", str(tmp_path / "m.png")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "1..2048" in lines[0], res.output
