"""What produced a number: weight files hashed once, caches and finished cells keyed by the
weights' contents (not their names), runs checked before the first image, provenance in the
outputs. Models are tiny random DINOv2 / open_clip ViTs saved by the tests; "the same name"
means the same path rewritten with other weights, as a rehearsal or a fine-tune would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dslo
from dslo.integrations import provenance
from dslo.integrations.cache import AttentionCache
from dslo.integrations.experiments import build_provider

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # the hash memo lives under $DSLO_CACHE: keep each test's to itself
    monkeypatch.setenv("DSLO_CACHE", str(tmp_path / "dslo-cache"))


def _save_tiny_dinov2(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    patch_size=14, image_size=56, initializer_range=0.3)
    transformers.Dinov2Model(cfg).save_pretrained(path)


def test_file_record_hashes_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    rec = provenance.file_record(f)
    assert rec == {"path": str(f.resolve()), "bytes": 1000,
                   "sha256": __import__("hashlib").sha256(b"a" * 1000).hexdigest()[:16]}
    calls = []
    real = provenance.hashlib.sha256
    monkeypatch.setattr(provenance.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert provenance.file_record(f) == rec and calls == []  # remembered, not re-read
    f.write_bytes(b"b" * 1000)  # same size, new contents and mtime
    import os

    os.utime(f, ns=(1, 1))
    assert provenance.file_record(f)["sha256"] != rec["sha256"] and calls == [1]
    with pytest.raises(ValueError, match="does not exist"):
        provenance.file_record(tmp_path / "nope.bin")


def test_identity_follows_contents_not_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _save_tiny_dinov2(a, 0)
    _save_tiny_dinov2(b, 0)
    ra, rb = provenance.weights_record("dinov2", str(a)), provenance.weights_record("dinov2", str(b))
    assert {Path(f["path"]).name for f in ra["files"]} == {"config.json", "model.safetensors"}
    # the same weights in another folder: same identity but for the name given
    assert provenance.weights_identity(ra).split(":")[-1] == provenance.weights_identity(rb).split(":")[-1]
    _save_tiny_dinov2(b, 1)
    rb = provenance.weights_record("dinov2", str(b))
    assert provenance.weights_identity(ra).split(":")[-1] != provenance.weights_identity(rb).split(":")[-1]
    assert provenance.weights_record("dinov2", "nobody/absent-repo", tmp_path)["files"] is None
    assert provenance.weights_identity(provenance.weights_record("dinov2", "nobody/absent-repo")).endswith(
        ":unresolved")


def test_attention_cache_is_not_reused_across_weights_saved_under_one_name(tmp_path):
    weights, cache_dir = tmp_path / "dinov2-small", tmp_path / "cache"
    image = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    said: list[str] = []

    def run():
        provider = build_provider("dinov2", weights=str(weights), cache=cache_dir, lazy=True, log=said.append)
        return provider(image), provider

    _save_tiny_dinov2(weights, 0)
    first, p1 = run()
    again, p2 = run()
    assert (p1.cache.misses, p2.cache.hits) == (1, 1) and torch.equal(first.matrix, again.matrix)
    assert said == []
    _save_tiny_dinov2(weights, 1)  # a second model written over the first, same folder
    other, p3 = run()
    assert p3.cache.misses == 1 and p3.cache.hits == 0
    assert not torch.allclose(other.matrix, first.matrix)
    assert len(said) == 1 and "computed from other weights" in said[0] and "computing anew" in said[0]
    groups = AttentionCache(cache_dir).groups()
    assert len(groups) == 2
    shas = {f["sha256"] for g in groups for f in g["about"]["weights"]["files"]
            if f["path"].endswith("model.safetensors")}
    assert shas == {provenance.file_record(weights / "model.safetensors")["sha256"], *shas} and len(shas) == 2


def test_cached_attention_needs_no_model(tmp_path, monkeypatch):
    weights, cache_dir = tmp_path / "w", tmp_path / "cache"
    _save_tiny_dinov2(weights, 0)
    image = torch.rand(1, 3, 56, 56)
    build_provider("dinov2", weights=str(weights), cache=cache_dir, lazy=True)(image)
    import dslo.attention

    def no_model(*args, **kwargs):
        raise AssertionError("the provider's model was built although its attention is cached")

    monkeypatch.setattr(dslo.attention, "build_attention", no_model)
    provider = build_provider("dinov2", weights=str(weights), cache=cache_dir, lazy=True)
    assert provider(image).matrix.shape[-1] == 37 * 37 and provider.cache.hits == 1  # resized to 518 px


def test_cache_info_says_what_each_group_was_computed_from(tmp_path):
    from typer.testing import CliRunner

    from dslo.integrations.cli import app

    weights, cache_dir = tmp_path / "w", tmp_path / "cache"
    _save_tiny_dinov2(weights, 0)
    build_provider("dinov2", weights=str(weights), cache=cache_dir, options={"features": "key"})(torch.rand(1, 3, 56, 56))
    (cache_dir / "ab").mkdir()
    torch.save({"matrix": torch.eye(2)}, cache_dir / "ab" / ("ab" + "0" * 62 + ".pt"))  # an old, ungrouped entry
    res = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(cache_dir)])
    assert res.exit_code == 0, res.output
    sha = provenance.file_record(weights / "model.safetensors")["sha256"]
    assert "in 2 entries" in res.output and f"sha256 {sha}" in res.output and '"features": "key"' in res.output
    assert "older dslo" in res.output
    assert f"{cache_dir / 'text'}: 0.0 MiB in 0 encoded vocabularies" in res.output
    res = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(cache_dir)])
    assert "removed 2 entries" in res.output and AttentionCache(cache_dir).groups() == []
    assert "removed 0 encoded vocabularies" in res.output


def test_cache_leaves_other_caches_in_the_same_folder_alone(tmp_path):
    root = tmp_path / "dslo"
    text = root / "text" / "ab" / ("ab" + "1" * 62 + ".pt")
    text.parent.mkdir(parents=True)
    torch.save({"x": 1}, text)
    cache = AttentionCache(root)
    assert cache.groups() == [] and cache.clear() == 0 and text.is_file()


def test_environment_and_table_lines(tmp_path):
    env = provenance.environment("cpu", torch.float32)
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["torch"] == torch.__version__
    assert env["dslo"] == __import__("dslo").__version__
    f = tmp_path / "ViT-B-16.safetensors"
    f.write_bytes(b"x" * 3000)
    lines = provenance.provenance_lines(env, [{"kind": "clip", "weights": "ViT-B-16", "pretrained": str(f),
                                               "files": [provenance.file_record(f)]},
                                              {"kind": "sd2", "weights": "org/sd", "files": None}])
    assert lines[0].startswith("Produced by dslo") and "device cpu" in lines[0]
    assert str(f) in lines[1] and provenance.file_record(f)["sha256"] in lines[1] and "2.9 KB" in lines[1]
    assert "not found on this machine" in lines[2]


# ----------------------------------------------------------------------------- the commands

open_clip = pytest.importorskip("open_clip")
TINY = dict(embed_dim=32, vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))


def _tiny_clip(folder: Path, seed: int) -> tuple[Path, Path]:
    cfg = folder / "dslo-tiny-prov.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    ckpt = folder / "tiny.pt"
    torch.save(open_clip.create_model("dslo-tiny-prov").state_dict(), ckpt)
    return cfg, ckpt


def _ade(root: Path, n: int = 2) -> Path:
    from PIL import Image

    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for sub in ("images/validation", "annotations/validation"):
        (base / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)).save(
            base / "images/validation" / f"ADE_val_{i:08d}.jpg")
        Image.fromarray(rng.integers(0, 8, (40, 48)).astype(np.uint8)).save(
            base / "annotations/validation" / f"ADE_val_{i:08d}.png")
    return root


def _invoke(args):
    from typer.testing import CliRunner

    from dslo.integrations.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _versatility_args(tmp_path, cfg, ckpt, data, results, solvers="none"):
    """A one-image versatility run of the tiny CLIP on the stand-in ADE folder, affinity attention."""
    return ["versatility", "--adapters", "clip", "--solvers", solvers, "--attention", "affinity", "--datasets",
            "ade20k", "--data-root", data, "--stand-in-root", tmp_path / "no-stand-ins", "--limit", "1",
            "--model", cfg, "--pretrained", ckpt, "--size", "32x32", "--adapter-option", "templates=a {}.",
            "--results-dir", results, "--cache-dir", tmp_path / "cache", "--no-plot"]


def test_versatility_cells_are_recomputed_when_the_weights_under_a_name_change(tmp_path):
    cfg, ckpt = _tiny_clip(tmp_path, 0)
    data = _ade(tmp_path / "data")
    results = tmp_path / "results"
    args = _versatility_args(tmp_path, cfg, ckpt, data, results)
    assert _invoke(args).exit_code == 0
    cell = results / "versatility" / "ade20k" / "clip__-__none.json"
    first = json.loads(cell.read_text())
    sha0 = provenance.file_record(ckpt)["sha256"]
    assert first["provenance"]["weights"][0]["files"][-1]["sha256"] == sha0
    assert first["provenance"]["environment"]["device"] == "cpu"
    assert f"sha256 {sha0}" in (results / "versatility.md").read_text()
    res = _invoke(args)
    assert "skip ade20k clip - none" in res.output
    _tiny_clip(tmp_path, 1)  # other weights, same file name
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    assert "recompute ade20k clip - none: changed model_weights" in res.output
    sha1 = provenance.file_record(ckpt)["sha256"]
    table = (results / "versatility.md").read_text()
    assert sha1 != sha0 and f"sha256 {sha1}" in table and f"sha256 {sha0}" not in table


def test_versatility_cells_follow_the_refiner_configuration_not_its_label(tmp_path, monkeypatch):
    """A cell is keyed by the refiner's whole configuration: when a default changes under the
    same solver name, the cell is computed again (and says which field changed)."""
    from dslo.integrations import experiments

    cfg, ckpt = _tiny_clip(tmp_path, 0)
    data = _ade(tmp_path / "data")
    results = tmp_path / "results"
    args = _versatility_args(tmp_path, cfg, ckpt, data, results, "velocity,velocity:logit_scale=none;nms_floor=0")
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    cells = sorted(p.name for p in (results / "versatility" / "ade20k").glob("*.json"))
    assert len(cells) == 2, cells  # the ';'-separated options make a cell of their own
    assert "skip ade20k clip affinity velocity " in _invoke(args).output
    parse = experiments.parse_solver

    def other_default(spec):  # as if the default floor were 0.5: same label, other configuration
        label, refiner = parse(spec)
        return label, (dslo.DiscrepancyRefiner(refiner.config.replace(nms_floor=0.5)) if label == "velocity" else refiner)

    monkeypatch.setattr(experiments, "parse_solver", other_default)
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    assert "recompute ade20k clip affinity velocity: changed refiner.nms_floor 0.9 -> 0.5" in res.output
    # the cell that spells its floor out is unchanged
    assert "skip ade20k clip affinity velocity:logit_scale=none;nms_floor=0" in res.output


def test_missing_datasets_and_weights_fail_before_any_image(tmp_path, monkeypatch):
    from dslo.integrations import experiments  # run_versatility looks build_adapter_by_name up there

    cfg, ckpt = _tiny_clip(tmp_path, 0)
    data = _ade(tmp_path / "data")

    def never(*args, **kwargs):
        raise AssertionError("a model was built before the run was checked")

    monkeypatch.setattr(experiments, "build_adapter_by_name", never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = _invoke(["versatility", "--adapters", "clip", "--solvers", "none,velocity", "--attention", "affinity,sd2",
                   "--datasets", "ade20k,cityscapes,context60", "--data-root", data,
                   "--attention-weights", f"sd2={tmp_path / 'no-sd2-here'}",
                   "--stand-in-root", tmp_path / "none", "--model", cfg, "--pretrained", ckpt,
                   "--results-dir", tmp_path / "results"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dslo: error: cannot start: 3 problem(s)")
    assert "dataset cityscapes" in lines[0] and "dataset context60" in lines[0] and "no-sd2-here" in lines[0]
    assert "ade20k" not in lines[0].replace(str(data), "")
    assert not (tmp_path / "results").exists()


def test_eval_device_reaches_the_model_the_vocabulary_and_the_provider(tmp_path, monkeypatch):
    from dslo.integrations import pipeline  # build_pipeline looks both builders up there

    cfg, ckpt = _tiny_clip(tmp_path, 0)
    data = _ade(tmp_path / "data", 1)
    seen: dict = {}
    real_adapter, real_provider = pipeline.build_adapter_by_name, pipeline.build_provider

    def adapter(*args, **kwargs):
        seen["adapter"] = kwargs.get("device")
        built = real_adapter(*args, **kwargs)
        encode = built.encode_text

        def encode_text(*a, **k):
            seen["text"] = str(next(built.parameters()).device)
            return encode(*a, **k)

        built.encode_text = encode_text
        return built

    monkeypatch.setattr(pipeline, "build_adapter_by_name", adapter)
    monkeypatch.setattr(pipeline, "build_provider",
                        lambda *a, **k: seen.__setitem__("provider", k.get("device")) or real_provider(*a, **k))
    out = tmp_path / "r.json"
    res = _invoke(["eval", "--dataset", "ade20k", "--data-root", data, "--engine", "dslo", "--attention", "affinity",
                   "--model", cfg, "--pretrained", ckpt, "--size", "32x32", "--adapter-option", "templates=a {}.",
                   "--device", "cpu", "--json", out, "--cache-dir", tmp_path / "cache"])
    assert res.exit_code == 0, res.output
    assert seen == {"adapter": "cpu", "text": "cpu", "provider": "cpu"}
    record = json.loads(out.read_text())
    assert record["provenance"]["environment"]["device"] == "cpu"
    assert record["provenance"]["weights"][0]["files"][-1]["sha256"] == provenance.file_record(ckpt)["sha256"]
    # mmseg's float32 metrics are written as the 2-decimal percentages they are
    assert all(v == round(v, 2) for k, v in record.items() if k in ("mIoU", "aAcc", "mAcc"))


def test_commands_hide_library_progress_bars_unless_verbose(tmp_path):
    """transformers prints a "Loading weights" bar per model; the commands keep the terminal to
    their own lines (``dslo --verbose`` lets the libraries talk)."""
    from PIL import Image

    weights = tmp_path / "w"
    _save_tiny_dinov2(weights, 0)
    photo = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((56, 56, 3)) * 255).astype(np.uint8)).save(photo)
    logits = tmp_path / "l.pt"
    torch.save(torch.rand(2, 4, 4), logits)
    args = ["refine", "--logits", logits, "--image", photo, "--attention", "dinov2", "--weights", weights,
            "--out", tmp_path / "m.png"]
    from dslo.attention.dinov2 import _load_cached

    _load_cached.cache_clear()  # load the weights in the command, not from an earlier test
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    assert "Loading weights" not in res.output and res.output.startswith("wrote ")
    _load_cached.cache_clear()
    res = _invoke(["--verbose", *args])
    assert res.exit_code == 0 and "Loading weights" in res.output


def test_one_input_size_for_every_command_and_the_mmseg_config():
    from dslo.integrations import cli_common, pipeline

    assert cli_common._DEFAULT_SIZE == "x".join(str(v) for v in pipeline.DEFAULT_SIZE) == "512x512"
    config = Path(__file__).resolve().parents[1] / "src/dslo/integrations/configs/_base_/models/ovss_clip_sd2.py"
    scope: dict = {}
    exec(config.read_text(), scope)
    assert tuple(scope["model"]["adapter"]["size"]) == pipeline.DEFAULT_SIZE


def test_hash_memo_forgets_files_that_are_gone(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"1")
    provenance.file_record(a)
    a.unlink()
    b.write_bytes(b"2")
    provenance.file_record(b)
    memo = json.loads((tmp_path / "dslo-cache" / "file-hashes.json").read_text())
    assert [k.rsplit("|", 2)[0] for k in memo] == [str(b.resolve())]
