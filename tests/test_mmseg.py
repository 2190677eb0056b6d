"""mmsegmentation integration: Runner.test end to end, RefinedSegmentor, configs, mmcv.ops
stand-in, weights_only checkpoints.

Models are tiny random-initialised open_clip ViTs (saved to a checkpoint so that two runs see
the same weights) and a tiny segmentor defined here; data sets are written by the tests in
mmseg's ADE20K layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("mmseg")
open_clip = pytest.importorskip("open_clip")

from dslo.integrations import mmseg as dm  # noqa: E402  (installs the mmcv.ops stand-in first)

from mmengine.config import Config  # noqa: E402
from mmseg.models.segmentors import BaseSegmentor  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

TINY = dict(embed_dim=32, vision_cfg=dict(layers=3, width=64, head_width=16, patch_size=8, image_size=32),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
SIZES = [(40, 56), (48, 64), (56, 40)]  # (H, W): different sizes, one portrait


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[str, str]:
    """(model-config JSON, checkpoint) of a tiny random open_clip CLIP."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = d / "dslo-tiny-mmseg.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    ckpt = d / "tiny.pt"
    torch.save(open_clip.create_model("dslo-tiny-mmseg").state_dict(), ckpt)
    return str(cfg), str(ckpt)


def write_ade(root: Path, masks: list[np.ndarray] | None = None, seed: int = 0) -> Path:
    """ADEChallengeData2016/{images,annotations}/validation in mmseg's layout; labels 0..150
    with 0 = "other" (ignored through reduce_zero_label)."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    base = root / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "validation").mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(SIZES):
        path = base / "images" / "validation" / f"ADE_val_{i:08d}.jpg"
        if not path.exists():
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1) + rng.integers(0, 30, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        mask = masks[i] if masks is not None else rng.integers(0, 6, (h, w))
        Image.fromarray(mask.astype(np.uint8)).save(base / "annotations" / "validation" / f"ADE_val_{i:08d}.png")
    return root


def miou_from_files(pred_dir: Path, ann_dir: Path, num_classes: int = 150) -> tuple[float, float]:
    """Independent dataset-level mIoU / aAcc (%) from saved ADE-format predictions (1..150) and
    label maps (0 = ignore): numpy confusion matrix, classes with an empty union dropped."""
    from PIL import Image

    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for ann in sorted(ann_dir.glob("*.png")):
        gt = np.asarray(Image.open(ann)).astype(np.int64) - 1
        pred = np.asarray(Image.open(pred_dir / ann.name)).astype(np.int64) - 1
        assert pred.shape == gt.shape
        keep = gt >= 0
        np.add.at(conf, (gt[keep], pred[keep]), 1)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    return float(iou.mean() * 100), float(tp.sum() / conf.sum() * 100)


def ovss_model(tiny_clip) -> dict:
    cfg, ckpt = tiny_clip
    # one prompt template instead of CLIP's 80: the 150 ADE names encode 80x faster
    return dict(type="OVSSSegmentor", adapter=dict(name="clip", model=cfg, pretrained=ckpt, size=32,
                                                   templates=["a photo of a {}."]),
                attention=dict(name="affinity"), refiner=dict(solver="velocity"), classes="ade20k")


# ----------------------------------------------------------------------------- Runner.test


def test_runner_test_end_to_end_matches_an_independent_miou(tmp_path, tiny_clip):
    """Runner.test with mmseg's ADE20KDataset + IoUMetric, once through ``run_eval`` and once
    through the shipped config file; the reported mIoU equals one computed here from the saved
    predictions."""
    data = write_ade(tmp_path / "data")
    first = dm.run_eval("ade20k", data, ovss_model(tiny_clip), work_dir=tmp_path / "w1", output_dir=tmp_path / "p1")
    assert first["images"] == 3
    # labels that overlap the model's predictions on the left half, noise elsewhere, so the
    # metric is not trivially 0; the weights are fixed, so the second run predicts the same
    from PIL import Image

    rng = np.random.default_rng(1)
    masks = []
    for i, (h, w) in enumerate(SIZES):
        pred = np.asarray(Image.open(tmp_path / "p1" / f"ADE_val_{i:08d}.png")).astype(np.int64)
        assert pred.shape == (h, w) and pred.min() >= 1  # original size, ADE convention (+1)
        mask = rng.integers(0, 151, (h, w))
        mask[:, : w // 2] = pred[:, : w // 2]
        masks.append(mask)
    write_ade(data, masks)

    cfg = Config.fromfile(dm.config_path("eval/ade20k.py"))
    cfg.model = ovss_model(tiny_clip)  # replace, not merge: no SD2 weights here
    cfg.test_dataloader.dataset.data_root = str(data / "ADEChallengeData2016")
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.persistent_workers = False
    cfg.test_evaluator.output_dir = str(tmp_path / "p2")
    cfg.work_dir = str(tmp_path / "w2")
    cfg.log_level = "ERROR"
    from mmengine.runner import Runner

    metrics = Runner.from_cfg(cfg).test()
    miou, acc = miou_from_files(tmp_path / "p2", data / "ADEChallengeData2016" / "annotations" / "validation")
    assert metrics["mIoU"] > 0
    assert metrics["mIoU"] == pytest.approx(miou, abs=0.006)  # mmseg rounds to 2 decimals
    assert metrics["aAcc"] == pytest.approx(acc, abs=0.006)
    for i in range(3):  # deterministic: same predictions as the first run
        a = np.asarray(Image.open(tmp_path / "p1" / f"ADE_val_{i:08d}.png"))
        b = np.asarray(Image.open(tmp_path / "p2" / f"ADE_val_{i:08d}.png"))
        assert np.array_equal(a, b)


def test_ovss_segmentor_predicts_at_the_original_size_and_undoes_normalisation(tiny_clip):
    cfg, ckpt = tiny_clip
    kw = dict(adapter=dict(name="clip", model=cfg, pretrained=ckpt, size=32), attention="affinity",
              classes=["sky", "tree", "road"])
    plain = dm.OVSSSegmentor(**kw)
    imagenet = dm.OVSSSegmentor(**kw, data_preprocessor=dict(
        type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=False))
    g = torch.Generator().manual_seed(0)
    bgr = torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8)
    meta = dict(ori_shape=(80, 112), img_shape=(40, 56))  # as if the pipeline had halved the image
    outs = []
    for model in (plain, imagenet):
        batch = model.data_preprocessor(dict(inputs=[bgr], data_samples=[SegDataSample(metainfo=meta)]))
        outs.append(model.predict(batch["inputs"], batch["data_samples"])[0])
    for out in outs:
        assert out.pred_sem_seg.data.shape == (1, 80, 112)
        assert out.seg_logits.data.shape == (3, 80, 112) and torch.isfinite(out.seg_logits.data).all()
    # both preprocessors hand the model the same RGB image: same labels
    assert torch.equal(outs[0].pred_sem_seg.data, outs[1].pred_sem_seg.data)
    with pytest.raises(NotImplementedError, match="training-free"):
        plain.loss(None, None)


class _CountingProvider(nn.Module):
    """Stand-in for a provider with weights: affinity attention plus one parameter, recording
    the device it was built on."""

    def __init__(self, device) -> None:
        super().__init__()
        from dslo.attention.affinity import AffinityAttention  # the factory is patched

        self.built_on = device
        self.weight = nn.Parameter(torch.zeros(1))
        self.affinity = AffinityAttention()

    def forward(self, image):
        return self.affinity(image)


def _count_builds(monkeypatch) -> list:
    """Replace ``dslo.attention.build_attention`` (what ``build_provider`` builds with) by one
    returning a ``_CountingProvider``; the returned list gets the device of each build."""
    import dslo.attention

    calls = []

    def build(name, device=None, **options):
        calls.append(device)
        return _CountingProvider(device)

    monkeypatch.setattr(dslo.attention, "build_attention", build)
    return calls


def _lazy_submodules(model) -> list:
    return [m for m in model.modules() if isinstance(m, dm._ProviderHome)]


def _one_image(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bgr = torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8)
    meta = dict(ori_shape=(40, 56), img_shape=(40, 56))
    return model.data_preprocessor(dict(inputs=[bgr], data_samples=[SegDataSample(metainfo=meta)]))


def test_ovss_segmentor_device_builds_the_adapter_there_and_the_vocabulary_follows_moves(tiny_clip, monkeypatch):
    """``device`` reaches ``build_adapter_by_name``; the encoded vocabulary is a pair of
    non-persistent buffers, so a later ``.to()`` (here a dtype cast: no GPU here) reaches the
    features the pipeline reads; a device that does not exist fails at build time."""
    cfg, ckpt = tiny_clip
    seen = []
    real = dm.build_adapter_by_name

    def spy(name, **kwargs):
        seen.append(kwargs.get("device"))
        return real(name, **kwargs)

    monkeypatch.setattr(dm, "build_adapter_by_name", spy)
    kw = dict(adapter=dict(name="clip", model=cfg, pretrained=ckpt, size=32), attention="affinity",
              classes=["sky", "tree", "road"])
    model = dm.OVSSSegmentor(**kw, device="cpu")
    assert seen == [torch.device("cpu")]
    assert model.pipeline.text.features is model.text_features and model.text_features.shape[0] == 3
    assert "text_features" not in model.state_dict()  # not persistent: checkpoints unchanged
    batch = _one_image(model)
    before = model.extract_feat(batch["inputs"])
    model.to(torch.float64)
    text = model.pipeline.text
    assert text.features.dtype == torch.float64 and text.features is model.text_features
    assert text.query_to_class.dtype == torch.int64 and text.num_classes == 3
    after = model.extract_feat(batch["inputs"])
    torch.testing.assert_close(after.float(), before, atol=1e-4, rtol=1e-4)  # same logits in float64
    model.float()
    assert model.pipeline.text.features.dtype == torch.float32
    assert model.predict(batch["inputs"], batch["data_samples"])[0].pred_sem_seg.data.shape == (1, 40, 56)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            dm.OVSSSegmentor(**kw, device="cuda")
    dm.OVSSSegmentor(**kw)  # device=None: as before (CPU build)
    assert seen[-1] is None


def test_attention_is_built_lazily_on_the_device_the_segmentor_is_on_at_call_time(tiny_clip, monkeypatch):
    """Building the segmentor builds no provider; the first call builds it on the device of the
    segmentor then (the Runner moves the model between build and first image: simulated by
    moving to 'meta', a device every CPU build has), and the built provider becomes a
    submodule that follows later moves."""
    cfg, ckpt = tiny_clip
    calls = _count_builds(monkeypatch)
    model = dm.OVSSSegmentor(adapter=dict(name="clip", model=cfg, pretrained=ckpt, size=32),
                             attention=dict(name="affinity"), classes=["sky", "tree"], device="cpu")
    assert calls == []
    (home,) = _lazy_submodules(model)  # a submodule, so model.to() reaches its device anchor
    assert home.model is None and any(b is home._anchor for b in model.buffers())
    assert home.device == torch.device("cpu")
    home.to("meta")  # what model.to(device) does to this submodule
    image01 = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    model._attention(image01)
    model._attention(image01)
    assert calls == [torch.device("meta")]  # once, where the segmentor was at call time
    assert any(m is home.model for m in model.modules()) and isinstance(home.model, _CountingProvider)
    model.to(torch.float64)
    assert home.model.weight.dtype == torch.float64  # later moves reach the built provider

    # RefinedSegmentor: same lazy provider, and the device argument
    with dm._mmseg_scope():
        refined = MODELS.build(dict(type="RefinedSegmentor", segmentor=dict(type="TinyTestSegmentor",
                                                                            data_preprocessor=IMAGENET),
                                    attention="affinity", device="cpu"))
    assert len(_lazy_submodules(refined)) == 1 and len(calls) == 1


def test_cached_attention_never_builds_the_provider(tiny_clip, tmp_path, monkeypatch):
    """With the image's attention in the on-disk cache, a new segmentor predicts without
    building its SD2 provider; labels equal the first run's. (The cache keys entries by the
    weight files, so a stand-in SD2 folder is there; the patched factory loads nothing.)"""
    cfg, ckpt = tiny_clip
    calls = _count_builds(monkeypatch)
    sd2 = tmp_path / "sd2"
    (sd2 / "unet").mkdir(parents=True)
    (sd2 / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"stand-in")
    kw = dict(adapter=dict(name="clip", model=cfg, pretrained=ckpt, size=32),
              attention=dict(name="sd2", weights=str(sd2)),
              classes=["sky", "tree", "road"], cache=str(tmp_path / "attention"))
    first = dm.OVSSSegmentor(**kw)
    assert calls == []
    batch = _one_image(first)
    a = first.predict(batch["inputs"], batch["data_samples"])[0].pred_sem_seg.data
    assert calls == [torch.device("cpu")] and first._provider.cache.misses == 1
    assert len(list((tmp_path / "attention").rglob("*.pt"))) == 1
    second = dm.OVSSSegmentor(**kw)
    batch = _one_image(second)
    b = second.predict(batch["inputs"], batch["data_samples"])[0].pred_sem_seg.data
    assert len(calls) == 1 and second._provider.cache.hits == 1
    assert [m.model for m in _lazy_submodules(second)] == [None]
    assert torch.equal(a, b)
    # weights not on the machine: the cache's weight identity builds the provider (a download
    # would fetch the files); that build and the cache miss share one model, on the home's device
    absent = dm.OVSSSegmentor(**{**kw, "attention": dict(name="sd2", weights="nobody/absent-sd2")})
    batch = _one_image(absent)
    absent.predict(batch["inputs"], batch["data_samples"])
    assert calls == [torch.device("cpu")] * 2 and isinstance(_lazy_submodules(absent)[0].model, _CountingProvider)


def test_run_eval_takes_the_device_from_the_model_config(tmp_path, tiny_clip):
    data = write_ade(tmp_path / "data")
    out = dm.run_eval("ade20k", data, {**ovss_model(tiny_clip), "device": "cpu"}, work_dir=tmp_path / "w", limit=1)
    assert out["images"] == 1 and out["mIoU"] >= 0
    if not torch.cuda.is_available():  # the key reaches the constructor: a missing GPU is named
        with pytest.raises(ValueError, match="CUDA is not available"):
            dm.run_eval("ade20k", data, {**ovss_model(tiny_clip), "device": "cuda"}, work_dir=tmp_path / "w2",
                        limit=1)


# ----------------------------------------------------------------------------- RefinedSegmentor


class _Head(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        return self.conv_seg(x)


@MODELS.register_module(force=True)
class TinyTestSegmentor(BaseSegmentor):
    """A stride-8 conv 'backbone' + a decode head with conv_seg, like mmseg's EncoderDecoder."""

    def __init__(self, num_classes: int = 4, data_preprocessor=None) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        torch.manual_seed(3)
        self.backbone = nn.Conv2d(3, 16, 8, stride=8)
        self.decode_head = _Head(num_classes)

    def extract_feat(self, inputs):
        return self.backbone(inputs)

    def encode_decode(self, inputs, batch_img_metas):
        return F.interpolate(self.decode_head(self.extract_feat(inputs)), size=inputs.shape[-2:], mode="bilinear")

    def loss(self, inputs, data_samples):
        raise NotImplementedError

    def predict(self, inputs, data_samples=None):
        return self.postprocess_result(self.encode_decode(inputs, None), data_samples)

    def _forward(self, inputs, data_samples=None):
        return self.encode_decode(inputs, None)


IMAGENET = dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                bgr_to_rgb=True)


def test_refined_segmentor_wraps_a_segmentor_from_a_config(tmp_path):
    from dslo import DiscrepancyRefiner
    from dslo.attention import build_attention

    cfg = Config(dict(model=dict(type="RefinedSegmentor",
                                 segmentor=dict(type="TinyTestSegmentor", num_classes=4, data_preprocessor=IMAGENET),
                                 layers="decode_head.conv_seg", attention=dict(name="affinity"),
                                 refiner=dict(solver="velocity", logit_scale=1.0))))
    with dm._mmseg_scope():
        model = MODELS.build(cfg.model)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8) for _ in range(2)]
    samples = [SegDataSample(metainfo=dict(ori_shape=(40, 56), img_shape=(40, 56))) for _ in images]
    outs = model.test_step(dict(inputs=images, data_samples=samples))
    assert [tuple(o.pred_sem_seg.data.shape) for o in outs] == [(1, 40, 56)] * 2
    assert outs[0].seg_logits.data.shape == (4, 40, 56)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # hooks released
    # the same refinement by hand: conv_seg logits on the 5 x 7 grid, attention, refiner
    rgb = images[0].flip(0).float()
    x = ((rgb - torch.tensor(IMAGENET["mean"]).view(3, 1, 1)) / torch.tensor(IMAGENET["std"]).view(3, 1, 1))[None]
    inner = model.segmentor
    with torch.no_grad():
        logits = inner.decode_head.conv_seg(inner.backbone(x))
        image01 = rgb[None] / 255
        ref = DiscrepancyRefiner(solver="velocity", logit_scale=1.0)(logits, build_attention("affinity")(image01), image01)
    assert logits.shape == (1, 4, 5, 7)
    assert torch.equal(outs[0].pred_sem_seg.data, ref.labels)

    # a checkpoint of the wrapped model (mmengine format) is loaded with weights_only
    trained = TinyTestSegmentor(num_classes=4, data_preprocessor=IMAGENET)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    torch.save({"meta": {"epoch": 1}, "state_dict": trained.state_dict()}, tmp_path / "seg.pth")
    with dm._mmseg_scope():
        loaded = MODELS.build({**cfg.model.to_dict(), "checkpoint": str(tmp_path / "seg.pth")})
    assert torch.equal(loaded.segmentor.decode_head.conv_seg.weight, trained.decode_head.conv_seg.weight)


def test_refined_segmentor_errors():
    seg = dict(type="TinyTestSegmentor", data_preprocessor=IMAGENET)
    with dm._mmseg_scope():
        with pytest.raises(ValueError, match="no submodule 'decode_head.conv'"):
            MODELS.build(dict(type="RefinedSegmentor", segmentor=seg, layers="decode_head.conv",
                              attention=dict(name="affinity")))
        with pytest.raises(ValueError, match="give attention"):
            MODELS.build(dict(type="RefinedSegmentor", segmentor=seg))
        with pytest.raises(ValueError, match="package.module:function"):
            MODELS.build(dict(type="RefinedSegmentor", segmentor=seg, attention="affinity", to_logits="nocolon"))


# ----------------------------------------------------------------------------- configs and data


@pytest.mark.parametrize("name", ["voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff",
                                  "cityscapes", "ade20k"])
def test_shipped_configs_match_the_layouts_and_class_files(name):
    from mmseg.registry import DATASETS

    from dslo.adapters import load_class_names

    cfg = Config.fromfile(dm.config_path(f"eval/{name}.py"))
    assert cfg.test_dataloader.dataset.to_dict() == dm.dataset_config(name, "data")
    assert cfg.model.type == "OVSSSegmentor" and cfg.model.classes == name
    assert cfg.model.adapter.name == "clip" and cfg.model.attention.name == "sd2"
    dataset_cls = DATASETS.get(cfg.test_dataloader.dataset.type)
    assert len(dataset_cls.METAINFO["classes"]) == len(load_class_names(name))


def test_shipped_model_config_resizes_to_512_by_512():
    """The paper's input size: every image to 512 x 512 (not a 512 short side), in the base
    model config and so in every eval config."""
    from dslo.adapters.base import input_size

    base = Config.fromfile(dm.config_path("_base_/models/ovss_clip_sd2.py"))
    assert tuple(base.model.adapter.size) == (512, 512)
    assert input_size(375, 500, base.model.adapter.size, 16) == (512, 512)  # a VOC-sized photo
    assert base.model.device is None  # built on the CPU, the Runner moves it
    for name in ("voc21", "ade20k", "cityscapes"):
        assert tuple(Config.fromfile(dm.config_path(f"eval/{name}.py")).model.adapter.size) == (512, 512)


def test_refined_segformer_example_config_parses():
    cfg = Config.fromfile(dm.config_path("refined_segformer_ade20k.py"))  # 'mmseg::' base: pkg_resources
    assert cfg.model.type == "RefinedSegmentor"
    assert cfg.model.segmentor.type == "EncoderDecoder" and cfg.model.segmentor.decode_head.num_classes == 150


def test_voc20_and_coco_object_datasets_read_their_layouts(tmp_path):
    from PIL import Image
    from mmseg.registry import DATASETS

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc / "JPEGImages" / "a.jpg")
    Image.fromarray(np.array([[0, 1], [20, 255]], np.uint8).repeat(4, 0).repeat(4, 1)).save(
        voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\n")
    ds = DATASETS.build(dm.dataset_config("voc20", tmp_path))
    sample = ds[0]
    labels = sample["data_samples"].gt_sem_seg.data.unique().tolist()
    assert len(ds.metainfo["classes"]) == 20 and labels == [0, 19, 255]  # background ignored
    coco = tmp_path / "coco_stuff164k"
    (coco / "images/val2017").mkdir(parents=True)
    (coco / "annotations/val2017").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(coco / "images/val2017/000001.jpg")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(coco / "annotations/val2017/000001_instanceTrainIds.png")
    ds = DATASETS.build(dm.dataset_config("coco-object", tmp_path))
    assert len(ds) == 1 and len(ds.metainfo["classes"]) == 81


# ----------------------------------------------------------------------------- install pitfalls


def test_mmcv_ops_stand_in():
    import importlib.util
    import sys

    ops = sys.modules["mmcv.ops"]
    if importlib.util.find_spec("mmcv._ext") is not None:
        pytest.skip("full mmcv installed: no stand-in")
    assert getattr(ops, "__dslo_standin__", False)
    # point_sample is mmcv's own PyTorch code: bilinear sampling at relative coordinates
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 7, generator=g)
    points = torch.rand(2, 5, 2, generator=g)
    expected = F.grid_sample(x, (points * 2 - 1).unsqueeze(2), align_corners=False).squeeze(3)
    torch.testing.assert_close(ops.point_sample(x, points), expected)
    # the focal loss equals mmseg's own pure-PyTorch version
    from mmseg.models.losses.focal_loss import py_sigmoid_focal_loss

    logits = torch.randn(10, 4, generator=g)
    target = torch.randint(0, 5, (10,), generator=g)  # 4 = no positive class
    onehot = F.one_hot(target, 5)[:, :4].float()
    torch.testing.assert_close(ops.sigmoid_focal_loss(logits, target, 2.0, 0.25, None, "none"),
                               py_sigmoid_focal_loss(logits, onehot, gamma=2.0, alpha=0.25, reduction="none"))
    # any other compiled op imports, but fails clearly when used
    from mmcv.ops import CrissCrossAttention

    assert not isinstance(nn.Conv2d(1, 1, 1), CrissCrossAttention)
    with pytest.raises(NotImplementedError, match="compiled ops"):
        CrissCrossAttention(8)


def test_mmengine_checkpoints_load_with_weights_only(tmp_path):
    from mmengine.logging import MessageHub
    from mmengine.runner import load_checkpoint as mmengine_load

    hub = MessageHub("dslo-test")
    hub.update_scalar("train/loss", 1.5)
    model = nn.Linear(3, 2)
    torch.save({"meta": {"seed": np.int64(3), "hist": np.zeros(3)}, "state_dict": model.state_dict(),
                "message_hub": hub.state_dict()}, tmp_path / "ok.pth")
    fresh = nn.Linear(3, 2)
    dm.load_checkpoint(fresh, tmp_path / "ok.pth")
    assert torch.equal(fresh.weight, model.weight)
    mmengine_load(nn.Linear(3, 2), str(tmp_path / "ok.pth"), logger="silent")  # mmengine's own loader too
    assert torch.load(tmp_path / "ok.pth", weights_only=True)["message_hub"]["log_scalars"]["train/loss"].mean() == 1.5

    class Payload:
        def __reduce__(self):  # what an attacker would put in a checkpoint
            return (getattr, (dm.load_checkpoint, "__globals__"))

    torch.save({"state_dict": model.state_dict(), "x": Payload()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weights_only loader refused"):
        dm.load_checkpoint(fresh, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not exist"):
        dm.load_checkpoint(fresh, tmp_path / "missing.pth")
