"""Logits in every form a user has: cosines, raw scores, log-probabilities, probabilities."""

import math

import pytest
import torch

import dslo
from dslo.refiners.logit_forms import auto_temperature, detect_logit_kind, log_domain_logits
from dslo.refiners.selection import nms_mask

from conftest import blob_problem


def _scores(seed=0, shape=(2, 4, 6, 7), spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return spread * torch.randn(*shape, generator=g)


def test_each_form_is_told_apart():
    s = _scores()
    assert detect_logit_kind(s) == "scores"
    assert detect_logit_kind(torch.log_softmax(s, 1)) == "log_probs"
    assert detect_logit_kind(torch.softmax(s, 1)) == "probs"
    assert detect_logit_kind(0.2 + 0.01 * s) == "cosine"
    # one class: no softmax to check, values in [-1, 1] read as cosines
    assert detect_logit_kind(torch.full((1, 1, 2, 2), 0.3)) == "cosine"


def test_every_form_gives_the_same_class_probabilities():
    s = _scores(1)
    want = torch.softmax(s, 1)
    for form in (s, torch.log_softmax(s, 1), torch.softmax(s, 1)):
        z, _ = log_domain_logits(form)
        torch.testing.assert_close(torch.softmax(z, 1), want, atol=1e-5, rtol=1e-4)
    cos = 0.2 + 0.01 * s
    z, kind = log_domain_logits(cos)
    assert kind == "cosine"
    torch.testing.assert_close(z, 100 * cos)  # CLIP's temperature on cosines
    z, _ = log_domain_logits(cos, "scores")  # an explicit kind is obeyed
    torch.testing.assert_close(z, cos)
    z, _ = log_domain_logits(cos, scale=40.0)
    torch.testing.assert_close(z, 40 * cos)


def test_forms_out_of_their_range_are_refused():
    with pytest.raises(ValueError, match="'probs'.*\\[0, 1\\]"):
        log_domain_logits(torch.full((1, 2, 2, 2), 2.0), "probs")
    with pytest.raises(ValueError, match="'log_probs'.*<= 0"):
        log_domain_logits(torch.full((1, 2, 2, 2), 0.5), "log_probs")
    with pytest.raises(ValueError, match="logits kind"):
        log_domain_logits(torch.zeros(1, 2, 2, 2), "logit")
    with pytest.raises(ValueError, match="PatchLogits.kind"):
        dslo.PatchLogits(torch.zeros(1, 2, 2, 2), kind="cosines")
    with pytest.raises(ValueError, match="RefinerConfig.logits"):
        dslo.RefinerConfig(logits="raw")


@pytest.mark.parametrize("solver", ["none", "velocity", "path", "pamr"])
def test_refiner_labels_do_not_depend_on_the_form(solver):
    """The same model's beliefs handed over as scores, log-probabilities or probabilities give
    the same labels (probabilities are clamped at 1e-12, so give them moderate confidence)."""
    logits, att, image, _ = blob_problem()
    s = (logits - logits.mean(1, keepdim=True)) * 30  # scores with softmax confidence ~0.6-0.99
    ref = dslo.DiscrepancyRefiner(solver=solver)
    base = ref(s, att, image).labels
    for form in (torch.log_softmax(s, 1), torch.softmax(s, 1)):
        assert torch.equal(ref(form, att, image).labels, base)
    # the call's kind wins over detection: s / 100 lies in [-1, 1] and reads as cosines (x100
    # at the kinds' own scales; the default temperature would make both alike)
    staged = dslo.DiscrepancyRefiner(solver=solver, return_stages=True, logit_scale=None)
    as_cos = staged(s / 100, att, image).stages["probabilities"]
    as_scores = staged(s / 100, att, image, kind="scores").stages["probabilities"]
    assert float(as_cos.amax(1).mean()) > 0.75  # x100: the confidence of s itself
    assert float(as_scores.amax(1).max()) < 0.55  # nearly flat: scores taken as they are


def test_nms_floor_keeps_part_of_every_winning_class():
    g = torch.Generator().manual_seed(0)
    # an under-confident model: top probability ~0.4-0.6 everywhere, below the 0.9 cut
    z = 0.3 * torch.randn(1, 3, 50, generator=g)
    plain = nms_mask(z, 0.9)
    assert bool(plain.all())  # nothing passes: the old rule keeps everything (no seed at all)
    z[0, 0, :10] += 5.0  # class 0 confident on 10 patches: now only those pass the cut
    plain = nms_mask(z, 0.9)
    winners = torch.softmax(z, 1).argmax(1)[0]
    assert set(winners[plain[0]].tolist()) == {0}
    floored = nms_mask(z, 0.9, 0.5)[0]
    for c in winners.unique().tolist():
        won = winners == c
        assert int((floored & won).sum()) >= (int(won.sum()) + 1) // 2, c
        # the ones kept are the class's most confident
        conf = torch.softmax(z, 1).amax(1)[0]
        kept, dropped = conf[floored & won], conf[~floored & won]
        if len(dropped):
            assert float(kept.min()) >= float(dropped.max())
    assert torch.equal(nms_mask(z, 0.9, 1.0), torch.ones_like(plain))
    with pytest.raises(ValueError, match="nms_floor"):
        dslo.RefinerConfig(nms_floor=1.5)


def test_floor_only_where_the_cut_starves_the_image():
    g = torch.Generator().manual_seed(1)
    z = 8.0 * torch.randn(1, 3, 40, generator=g)  # confident: most patches pass 0.9
    plain = nms_mask(z, 0.9)
    assert float(plain.float().mean()) >= 0.5
    assert torch.equal(nms_mask(z, 0.9, 0.5), plain)  # untouched: the cut removes noise there


@pytest.mark.parametrize("solver", ["velocity", "path", "propagate"])
def test_an_under_confident_model_does_not_lose_a_class(solver):
    """Class 0 sure (p ~0.95) on two columns and fairly sure (~0.8) on the rest of the left
    half, class 1 unsure (~0.6) on the right half: the 0.9 cut alone keeps 17 % of the patches,
    all class 0, and the solver hands class 0 the whole image (the trained CNN's collapse);
    the default's floor keeps each class's best seeds."""
    _, _, image, truth = blob_problem()
    left = truth == 0
    same = (left.flatten()[:, None] == left.flatten()[None, :]).float()
    att = (same + 0.3) / (same + 0.3).sum(-1, keepdim=True)
    z = torch.zeros(1, 3, *truth.shape)
    z[0, 0] = torch.where(left, 2.0, 0.0)
    z[0, 0, :, :2] = 3.5
    z[0, 1] = torch.where(left, 0.0, 1.0)
    z += 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(truth[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0].long()
    plain = dslo.DiscrepancyRefiner(solver=solver, logit_scale=None, nms_share=None, nms_floor=0.0)(
        z, att[None], image, kind="scores").labels[0]
    assert float((plain == 0).float().mean()) > 0.95  # the collapse the guards exist for
    # each guard alone prevents it: the per-class share, the floor under the cut, the temperature
    for options in ({}, {"logit_scale": None}, {"logit_scale": None, "nms_share": None},
                    {"nms_share": None, "nms_floor": 0.0}):
        guarded = dslo.DiscrepancyRefiner(solver=solver, **options)(z, att[None], image, kind="scores").labels[0]
        assert float((guarded == up).float().mean()) > 0.95, options


def test_auto_temperature_makes_the_share_confident_whatever_the_form():
    s = _scores(3, shape=(2, 5, 9, 11), spread=1.0)
    for share in (0.5, 0.9):
        t = auto_temperature(s, 0.9, share)
        assert t.shape == (2,)
        conf = torch.softmax(s * t.view(2, 1, 1, 1), 1).amax(1).flatten(1)  # (B, N)
        reached = (conf >= 0.9 - 1e-4).float().mean(1)
        n = conf.shape[1]
        assert bool(((reached - share).abs() <= 1.5 / n).all()), (share, reached)
        # a constant factor divides it; log-softmax and log-probabilities leave it unchanged
        torch.testing.assert_close(auto_temperature(4 * s, 0.9, share) * 4, t, rtol=1e-4, atol=0)
        torch.testing.assert_close(auto_temperature(torch.log_softmax(s, 1), 0.9, share), t, rtol=1e-4, atol=0)
        probs_z, _ = log_domain_logits(torch.softmax(s, 1))
        torch.testing.assert_close(auto_temperature(probs_z, 0.9, share), t, rtol=1e-4, atol=0)


def test_auto_temperature_edge_cases():
    assert torch.equal(auto_temperature(torch.zeros(3, 1, 4, 4)), torch.ones(3))  # one class
    tied = torch.zeros(1, 3, 4, 4)  # every patch a tie: never confident, the largest scale, no NaN
    t = auto_temperature(tied)
    assert bool(torch.isfinite(t).all()) and float(t) >= 1e7
    logits, att, image, _ = blob_problem()
    out = dslo.DiscrepancyRefiner()(torch.zeros_like(logits), att, image, kind="scores")
    assert out.labels.shape[-2:] == image.shape[-2:]
    for bad in ({"threshold": 1.0}, {"share": 0.0}, {"share": 1.5}):
        with pytest.raises(ValueError, match="auto_temperature"):
            auto_temperature(_scores(), **bad)


@pytest.mark.parametrize("solver", ["velocity", "path", "propagate"])
def test_default_labels_are_the_same_for_every_scale_of_one_model(solver):
    """x1, x1/4, x4, log-probabilities, probabilities of one model's scores: one result
    (the per-image temperature undoes the scale), where a fixed scale gives different ones."""
    logits, att, image, _ = blob_problem()
    s = (logits - logits.mean(1, keepdim=True)) * 10
    ref = dslo.DiscrepancyRefiner(solver=solver)
    base = ref(s, att, image, kind="scores").labels
    for form in (0.25 * s, 4 * s, torch.log_softmax(s, 1)):
        assert torch.equal(ref(form, att, image, kind="scores").labels, base)
    assert torch.equal(ref(torch.softmax(s, 1), att, image).labels, base)


def test_raw_and_rivals_keep_the_models_own_scale():
    """``solver="none"`` and the rivals show the model's own probabilities, not the temperature's."""
    logits, att, image, _ = blob_problem()
    s = (logits - logits.mean(1, keepdim=True)) * 3
    staged = dslo.DiscrepancyRefiner(solver="none", return_stages=True)(s, att, image, kind="scores")
    # (the softmax over the classes that win somewhere: early rejection)
    active = staged.active[:, :, None, None]
    want = torch.softmax(s.masked_fill(~active, float("-inf")), 1)
    torch.testing.assert_close(staged.stages["probabilities"], want)
    for solver in ("none", "pamr"):
        auto = dslo.DiscrepancyRefiner(solver=solver)(s, att, image, kind="scores").scores
        fixed = dslo.DiscrepancyRefiner(solver=solver, logit_scale=None)(s, att, image, kind="scores").scores
        torch.testing.assert_close(auto, fixed)
    velocity = dslo.DiscrepancyRefiner(return_stages=True)(s, att, image, kind="scores")
    assert float(velocity.stages["probabilities"].amax(1).mean()) > float(torch.softmax(s, 1).amax(1).mean())


def test_logit_scale_values():
    assert dslo.RefinerConfig().logit_scale == "auto"
    assert dslo.RefinerConfig(logit_scale="100").logit_scale == 100.0  # text options
    assert dslo.RefinerConfig(logit_scale="none").logit_scale is None
    assert dslo.RefinerConfig(logit_scale=40).logit_scale == 40
    for bad in ("hot", 0, -1.0, True):
        with pytest.raises(ValueError, match="logit_scale"):
            dslo.RefinerConfig(logit_scale=bad)
    with pytest.raises(ValueError, match="temperature_share"):
        dslo.RefinerConfig(temperature_share=0.0)


def test_nms_share_keeps_the_same_share_of_every_class_whatever_the_confidence():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 60, generator=g)
    z[0, 0] += 6.0  # image 0: class 0 wins most patches, confidently
    for share in (0.5, 0.7, 1.0):
        keep = nms_mask(z, 0.9, 0.0, share)
        probs = torch.softmax(z, 1)
        conf, winners = probs.amax(1), probs.argmax(1)
        for b in range(2):
            for c in winners[b].unique().tolist():
                won = winners[b] == c
                n_won = int(won.sum())
                assert int((keep[b] & won).sum()) == math.ceil(share * n_won - 1e-6), (b, c, share)
                kept, dropped = conf[b][keep[b] & won], conf[b][~keep[b] & won]
                if len(dropped):
                    assert float(kept.min()) >= float(dropped.max())
    # the threshold and the floor play no part
    assert torch.equal(nms_mask(z, 0.1, 0.0, 0.7), nms_mask(z, 0.99, 0.9, 0.7))
    with pytest.raises(ValueError, match="nms_share"):
        dslo.RefinerConfig(nms_share=0.0)
