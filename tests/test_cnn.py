"""The small CNN segmenter: shapes, its file (digest checked), and training that learns."""

import numpy as np
import pytest
import torch
from PIL import Image

from dslo.adapters.cnn import CNNAdapter, TinySegNet, cnn_input
from dslo.integrations.train_cnn import train_cnn


def test_output_on_the_vit_grid_and_kind_scores():
    net = TinySegNet(3, width=8)
    adapter = CNNAdapter(net, ["a", "b", "c"])
    image = torch.rand(2, 3, 120, 160)
    patch = adapter(image)
    # long side 160 -> 518: scale 3.2375, grid (120*3.24/14, 37)
    assert patch.logits.shape == (2, 3, 28, 37) and patch.kind == "scores"
    x, grid = cnn_input(image)
    assert x.shape == (2, 5, 8 * 28, 8 * 37) and grid == (28, 37)
    assert adapter(image, ["c", "a"]).logits.shape[1] == 2
    torch.testing.assert_close(adapter(image, ["c"]).logits[:, 0], patch.logits[:, 2])
    with pytest.raises(ValueError, match="unknown class"):
        adapter(image, ["zebra"])
    with pytest.raises(ValueError, match="distinct class names"):
        CNNAdapter(net, ["a", "a", "b"])
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\)"):
        net(torch.rand(1, 3, 16, 16))


def test_file_round_trip_and_damage_detected(tmp_path):
    torch.manual_seed(0)
    adapter = CNNAdapter(TinySegNet(2, width=8), ["x", "y"], about={"epochs": 1})
    path = adapter.save(tmp_path / "net.pt")
    back = CNNAdapter.load(path)
    image = torch.rand(1, 3, 50, 70)
    torch.testing.assert_close(back(image).logits, adapter(image).logits)
    assert back.about["epochs"] == 1 and len(back.about["sha256"]) == 64
    record = torch.load(path, weights_only=True)
    record["state"]["classifier.bias"][0] += 1e-3  # one weight changed after saving
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="digest mismatch"):
        CNNAdapter.load(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file of ours")
    with pytest.raises(ValueError, match="not a sound dslo CNN file"):
        CNNAdapter.load(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="no such file"):
        CNNAdapter.load(tmp_path / "missing.pt")


def _toy_folder(root, frames=6, size=(42, 56)):
    """Sky (0) above road (1) at a random horizon, coloured by class with noise."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nroad\n")
    rng = np.random.default_rng(0)
    for k in range(frames):
        horizon = int(rng.integers(12, 30))
        mask = np.zeros(size, np.uint8)
        mask[horizon:] = 1
        img = np.where(mask[..., None] == 0, [90, 140, 230], [90, 90, 90]) + rng.normal(0, 20, size + (3,))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"f{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"f{k}.png")


def test_training_learns_a_toy_scene(tmp_path):
    _toy_folder(tmp_path)
    lines = []
    adapter = train_cnn(tmp_path, epochs=25, batch=3, width=8, size=112, lr=1e-2, log=lines.append)
    assert len(lines) == 25 and adapter.about["frames"] == 6 and adapter.class_names == ["sky", "road"]
    img = np.array(Image.open(tmp_path / "images" / "f0.png"), np.float32) / 255
    mask = torch.from_numpy(np.array(Image.open(tmp_path / "masks" / "f0.png"))).long()
    logits = adapter(torch.from_numpy(img).permute(2, 0, 1)[None]).logits
    pred = torch.nn.functional.interpolate(logits, size=mask.shape, mode="bilinear").argmax(1)[0]
    assert float((pred == mask).float().mean()) > 0.9
    # what training records (versions, command-free provenance) survives the safe loader
    back = CNNAdapter.load(adapter.save(tmp_path / "toy.pt"))
    assert back.about["frames"] == 6 and back.about["torch"] == str(torch.__version__)
