"""Rivals behind DiscrepancyRefiner's call: same inputs, same record, their own pipeline."""

import pytest
import torch
import torch.nn.functional as F

import dslo
from dslo.integrations.bench import parse_method
from dslo.refiners.lposs import lposs, lposs_plus
from dslo.refiners.pamr import pamr


def problem(seed=0, grid=(6, 7), size=(24, 28), d=5):
    g = torch.Generator().manual_seed(seed)
    logits = 0.2 + 0.02 * torch.randn(1, 3, *grid, generator=g)
    image = torch.rand(1, 3, *size, generator=g)
    n = grid[0] * grid[1]
    att = dslo.Attention.from_scores(torch.rand(1, n, n, generator=g), grid,
                                     features=torch.randn(1, n, d, generator=g))
    return logits, att, image


def test_pamr_through_refiner_equals_functional():
    logits, att, image = problem()
    out = dslo.DiscrepancyRefiner(solver="pamr")(logits, att, image)
    up = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    ref = pamr(up, image, iters=10, dilations=(8, 16))
    assert torch.allclose(out.scores, ref, atol=1e-6)
    assert torch.equal(out.labels, ref.argmax(1)) and bool(out.active.all())
    # PAMR needs no attention at all
    assert torch.equal(dslo.DiscrepancyRefiner(solver="pamr")(logits, None, image).labels, out.labels)


def test_lposs_through_refiner_equals_functional():
    logits, att, image = problem(1)
    cfg = dict(lposs_k=10)
    out = dslo.DiscrepancyRefiner(solver="lposs", **cfg)(logits, att, image)
    z = lposs(logits, att.features, k=10, patch_size=448 / 6)
    up = F.interpolate(z, size=image.shape[-2:], mode="bilinear", align_corners=False)
    assert torch.allclose(out.scores, up, atol=1e-6)
    plus = dslo.DiscrepancyRefiner(solver="lposs+", **cfg)(logits, att, image)
    assert torch.allclose(plus.scores, lposs_plus(up, image), atol=1e-5)
    assert not torch.equal(plus.labels, out.labels) or not torch.allclose(plus.scores, out.scores)


def test_lposs_without_features_names_what_is_missing():
    logits, att, image = problem()
    bare = dslo.Attention(att.matrix, att.grid, source="affinity")
    with pytest.raises(ValueError, match="features.*affinity"):
        dslo.DiscrepancyRefiner(solver="lposs")(logits, bare, image)
    with pytest.raises(ValueError, match="features"):
        dslo.DiscrepancyRefiner(solver="lposs+")(logits, bare.matrix, image)


def test_rival_options_validated_and_parsed():
    assert parse_method("pamr:pamr_dilations=4/8,pamr_iters=3")[1].config.pamr_dilations == (4, 8)
    with pytest.raises(ValueError, match="pamr_dilations"):
        dslo.RefinerConfig(pamr_dilations=(0,))
    with pytest.raises(ValueError, match="lposs_alpha"):
        dslo.RefinerConfig(lposs_alpha=1.0)
    with pytest.raises(ValueError, match="lposs_window"):
        dslo.RefinerConfig(lposs_window=12)


def test_rival_stages_for_figures(tmp_path):
    from dslo.integrations.figures import stage_figure

    logits, att, image = problem(2)
    out = dslo.DiscrepancyRefiner(solver="pamr", return_stages=True)(logits, att, image)
    assert out.stages["probabilities"].shape == logits.shape
    assert torch.allclose(out.stages["probabilities"].sum(1), torch.ones(1, *logits.shape[-2:]))
    assert torch.equal(out.stages["map"], out.scores)
    path = stage_figure(image[0], {"pamr": out}, ["a", "b", "c"], tmp_path / "f.png")
    assert path.stat().st_size > 0
