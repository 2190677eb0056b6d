"""The README's paper-reproduction command (section "Paper, Table 1"), run end to end on tiny
random weights and tiny data, and the provenance of the table it writes.

The command is read out of README.md, so this test breaks when the README command changes
shape. Only what cannot run here is substituted: ``DATA`` becomes a folder holding the eight
benchmarks in mmseg's layouts (two small images each, a few labels), ``--device cuda`` becomes
``--device cpu``, and the weights are a tiny random open_clip ViT (model-config JSON plus
checkpoint file) and a tiny random SD2 folder in the diffusers layout. ``--size 512x512`` is
kept: the tiny ViT has 16-pixel patches like ViT-B/16 and the tiny VAE / UNet downsample like
SD2's (8 and 8), so the grids are the paper's (32 x 32 CLIP patches; SD2 upsamples each image to
a long side of 512 px and its default blocks give a grid of 1/16 of that, 32 x 32 for a square
image), and the run stays fast on a CPU because the models are narrow, not because the inputs are
small. ``--limit 1``, ``--no-plot`` and private results / cache / stand-in folders are added.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("typer")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from dslo.adapters import load_class_names  # noqa: E402
from dslo.integrations.cache import AttentionCache  # noqa: E402
from dslo.integrations.cli import app  # noqa: E402
from dslo.integrations.experiments import BENCHMARK_DATA  # noqa: E402
from dslo.integrations.provenance import file_record  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"

#: the options of the README command, and the only ones: a new option means a new substitution
README_OPTIONS = {"--adapters", "--solvers", "--attention", "--datasets", "--data-root", "--size", "--device"}

#: a tiny open_clip ViT with ViT-B/16's patch size: 512 x 512 px -> 32 x 32 patches
TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=16, image_size=64),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
CROSS_DIM = 32

#: (height, width) of the two images of each benchmark (cityscapes keeps its 1:2 aspect)
IMAGE_SIZES = {"cityscapes": [(32, 64), (32, 64)]}
DEFAULT_IMAGE_SIZES = [(48, 64), (64, 48)]


# ----------------------------------------------------------------------------- the README command


def readme_command() -> list[str]:
    """The ``dslo versatility ...`` command of README's "Paper, Table 1", as argv after ``dslo``."""
    text = README.read_text()
    assert "Paper, Table 1" in text, "README.md lost its 'Paper, Table 1' section"
    section = text.split("Paper, Table 1", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "no ```bash block after 'Paper, Table 1' in README.md"
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    assert argv[:2] == ["dslo", "versatility"], argv
    return argv[1:]


def options_of(argv: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command without flags that take no value."""
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    return dict(zip(argv[::2], argv[1::2]))


def substitute(argv: list[str], data_root: Path) -> list[str]:
    """The README command with DATA and the device replaced (nothing else)."""
    out = list(argv)
    opts = options_of(out[1:])
    assert set(opts) == README_OPTIONS, f"README command options changed: {sorted(opts)}"
    assert opts["--data-root"] == "DATA" and opts["--device"] == "cuda", opts
    out[out.index("--data-root") + 1] = str(data_root)
    out[out.index("--device") + 1] = "cpu"
    return out


# ----------------------------------------------------------------------------- tiny weights


def save_tiny_clip(cfg: Path, ckpt: Path, seed: int) -> None:
    """A random tiny open_clip model's state dict saved as ``ckpt`` (config at ``cfg``)."""
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(cfg.stem).state_dict(), ckpt)


def save_tiny_sd2(root: Path) -> None:
    """SD2's structure at tiny width in the diffusers layout (vae/, unet/, text_encoder/,
    tokenizer/): a VAE with factor 8 and a UNet whose up_blocks.1 / up_blocks.2 (the default
    blocks) work at 1/16 and 1/8 of the latent, as in stabilityai/stable-diffusion-2-base."""
    torch.manual_seed(10)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                                  sample_size=64)
    torch.manual_seed(11)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CROSS_DIM, attention_head_dim=2, sample_size=8, norm_num_groups=8,
        use_linear_projection=True)
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    torch.manual_seed(12)
    config = transformers.CLIPTextConfig(vocab_size=5, hidden_size=CROSS_DIM, intermediate_size=37,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    transformers.CLIPTextModel(config).save_pretrained(root / "text_encoder")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3,
                                                    "a": 4}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!",
                               model_max_length=8).save_pretrained(tok_dir)


# ----------------------------------------------------------------------------- tiny benchmarks


def build_benchmarks(data_root: Path, keys: list[str]) -> None:
    """Two image / label-map pairs per benchmark in mmseg's layout (``BENCHMARK_DATA``), with the
    split files where the layout has one. Benchmarks sharing a folder share its images, as in
    mmseg (VOC21 / VOC20, Context60 / Context59, COCO-Object / COCO-Stuff, the last two with a
    label file each). Raw labels 0..4 plus ignored pixels (255): classes 0..4, or, where
    ``reduce_zero_label`` (VOC20, Context59, ADE20K), "unlabelled" and classes 0..3."""
    rng = np.random.default_rng(0)
    names = {"voc21": "2007_{:06d}", "voc20": "2007_{:06d}", "context60": "2008_{:06d}", "context59": "2008_{:06d}",
             "coco-object": "{:012d}", "coco-stuff": "{:012d}", "cityscapes": "frankfurt/frankfurt_{:06d}_000019",
             "ade20k": "ADE_val_{:08d}"}
    for key in keys:
        layout = BENCHMARK_DATA[key]
        assert len(load_class_names(layout.vocab)) > 5, key
        root = data_root / layout.root
        ids = []
        for i, (h, w) in enumerate(IMAGE_SIZES.get(key, DEFAULT_IMAGE_SIZES)):
            sample_id = names[key].format(i + 1)
            ids.append(sample_id)
            img = root / layout.img_dir / f"{sample_id}{layout.img_suffix}"
            seg = root / layout.ann_dir / f"{sample_id}{layout.seg_suffix}"
            if not img.exists():
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(img)
            if not seg.exists():
                seg.parent.mkdir(parents=True, exist_ok=True)
                labels = rng.integers(0, 5, (h, w)).astype(np.uint8)
                labels[:4] = 255  # ignored pixels
                Image.fromarray(labels).save(seg)
        if layout.split is not None:
            (root / layout.split).parent.mkdir(parents=True, exist_ok=True)
            (root / layout.split).write_text("".join(f"{i}\n" for i in ids))


# ----------------------------------------------------------------------------- reading the outputs


def read_table(md: str, datasets: list[str]) -> dict[tuple[str, str, str], list[str]]:
    """``(adapter, attention, solver) -> [the dataset cells]`` of ``versatility.md``."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["adapter", "attention", "solver", *datasets, "mean"], header
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        assert len(cells) == len(header), ln
        rows[tuple(cells[:3])] = cells[3:]
    return rows


def weights_lines(md: str) -> dict[str, str]:
    """Provenance "Weights KIND ...: ..." lines of the table by kind."""
    return {ln.split()[1]: ln for ln in md.splitlines() if ln.startswith("Weights ")}


def named(line: str, path: Path) -> bool:
    """The provenance line lists ``path`` with the sha256 ``file_record`` gives it now."""
    rec = file_record(path)
    return re.search(re.escape(f"`{rec['path']}` (") + r"[^)]*" + re.escape(f"sha256 {rec['sha256']})"),
                     line) is not None


def cells(results: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted((results / "versatility").glob("*/*.json"))}


# ----------------------------------------------------------------------------- the test


@pytest.mark.slow
def test_readme_table1_command_runs_and_its_table_names_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DSLO_CACHE", str(tmp_path / "dslo-cache"))  # file-hash memo, not ~/.cache
    monkeypatch.chdir(tmp_path)  # nothing lands in the checkout whatever the command defaults to

    readme = readme_command()
    opts = options_of(readme[1:])
    datasets = [d.strip() for d in opts["--datasets"].split(",")]
    adapters = [a.strip() for a in opts["--adapters"].split(",")]
    solvers = [s.strip() for s in opts["--solvers"].split(",")]
    attention = [a.strip() for a in opts["--attention"].split(",")]
    assert sorted(datasets) == sorted(BENCHMARK_DATA), datasets  # the eight benchmarks, built below
    assert attention == ["sd2"], attention  # the only provider given tiny weights here

    data_root, results, cache = tmp_path / "DATA", tmp_path / "results", tmp_path / "cache"
    stand_ins = tmp_path / "no-stand-ins"
    stand_ins.mkdir()
    build_benchmarks(data_root, datasets)
    weights = tmp_path / "weights"
    weights.mkdir()
    cfg, ckpt = weights / "dslo-tiny-repro.json", weights / "tiny-clip.pt"
    cfg.write_text(json.dumps(TINY_CLIP))
    save_tiny_clip(cfg, ckpt, seed=0)
    sd2 = weights / "tiny-sd2"
    save_tiny_sd2(sd2)
    unet_file = sd2 / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet_file.is_file(), sorted(p.name for p in (sd2 / "unet").iterdir())

    args = substitute(readme, data_root) + [
        "--model", cfg, "--pretrained", ckpt, "--attention-weights", f"sd2={sd2}", "--limit", "1",
        "--results-dir", results, "--cache-dir", cache, "--no-plot", "--stand-in-root", stand_ins]
    args = [str(a) for a in args]

    def run():
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
        return res

    # ---- first run: every cell computed
    res = run()
    md_path = results / "versatility.md"
    md = md_path.read_text()
    expected = list(dict.fromkeys((a, "-" if s == "none" else att, s)
                                  for a in adapters for att in attention for s in solvers))
    table = read_table(md, datasets)
    assert list(table) == expected, md
    for key, values in table.items():
        assert "-" not in values, f"{key}: a dataset column is empty\n{md}"
        assert all(re.fullmatch(r"\d+\.\d", v) for v in values), (key, values)

    produced = [ln for ln in md.splitlines() if ln.startswith("Produced by dslo")]
    assert len(produced) == 1 and "device cpu" in produced[0] and f"torch {torch.__version__}" in produced[0], md
    by_kind = weights_lines(md)
    assert set(by_kind) == {"clip", "sd2"}, md
    assert named(by_kind["clip"], ckpt) and named(by_kind["clip"], cfg), by_kind["clip"]
    assert named(by_kind["sd2"], unet_file), by_kind["sd2"]
    old_sha = file_record(ckpt)["sha256"]

    found = cells(results)
    assert len(found) == len(datasets) * len(expected)
    assert {p.parent.name for p in found} == set(datasets)
    for path, cell in found.items():
        assert cell["images"] == 1 and cell["stand_in"] is False, path  # --limit 1 of two images
        prov = cell["provenance"]
        assert prov["environment"]["device"] == "cpu" and prov["environment"]["torch"] == torch.__version__, path
        files = {f["path"]: f["sha256"] for w in prov["weights"] for f in (w.get("files") or [])}
        assert files.get(str(ckpt.resolve())) == old_sha, (path, files)
        if cell["attention"] == "sd2":
            assert files.get(str(unet_file.resolve())) == file_record(unet_file)["sha256"], (path, files)
    stamps = {p: p.stat().st_mtime_ns for p in found}
    text_entries = len(list((cache / "text").glob("*/*.pt")))
    assert text_entries == len(datasets)  # one encoded vocabulary per benchmark
    # SD2 ran once per image: benchmarks sharing a folder (VOC, Context, COCO) share its attention
    images = len({(BENCHMARK_DATA[d].root, BENCHMARK_DATA[d].img_dir) for d in datasets})
    assert [g["entries"] for g in AttentionCache(cache).groups()] == [images]

    # ---- same command again: every cell read back, nothing computed
    res = run()
    skips = [ln for ln in res.output.splitlines() if ln.startswith("skip ")]
    assert len(skips) == len(found), res.output
    assert not [ln for ln in res.output.splitlines() if ln.startswith(("done ", "recompute "))], res.output
    assert {p: p.stat().st_mtime_ns for p in cells(results)} == stamps
    assert md_path.read_text() == md

    # ---- other CLIP weights written over the same checkpoint path: every cell computed again
    save_tiny_clip(cfg, ckpt, seed=1)
    new_sha = file_record(ckpt)["sha256"]
    assert new_sha != old_sha
    res = run()
    assert "recompute" in res.output and "model_weights" in res.output, res.output
    recomputed = [ln for ln in res.output.splitlines() if ln.startswith("recompute ")]
    assert len(recomputed) == len(found) and all("model_weights" in ln for ln in recomputed), res.output
    assert not [ln for ln in res.output.splitlines() if ln.startswith("skip ")], res.output
    new_md = md_path.read_text()
    clip_line = weights_lines(new_md)["clip"]
    assert named(clip_line, ckpt) and f"sha256 {new_sha}" in clip_line, clip_line
    assert old_sha not in new_md, new_md
    assert named(weights_lines(new_md)["sd2"], unet_file)  # SD2 untouched, still named
    for path, cell in cells(results).items():
        files = {f["path"]: f["sha256"] for w in cell["provenance"]["weights"] for f in (w.get("files") or [])}
        assert files.get(str(ckpt.resolve())) == new_sha, (path, files)
    # the new weights were really loaded: their vocabularies were encoded again
    assert len(list((cache / "text").glob("*/*.pt"))) == 2 * text_entries
    # while the SD2 attention, keyed by SD2's files, came from the cache
    assert [g["entries"] for g in AttentionCache(cache).groups()] == [images]
