"""Logits in every form a user has: cosines, raw scores, log-probabilities, probabilities."""

import pytest
import torch

import dslo
from dslo.refiners.logit_forms import detect_logit_kind, log_domain_logits
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
    # the call's kind wins over detection: s / 100 lies in [-1, 1] and reads as cosines (x100)
    staged = dslo.DiscrepancyRefiner(solver=solver, return_stages=True)
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
    guarded = dslo.DiscrepancyRefiner(solver=solver)(z, att[None], image, kind="scores").labels[0]
    plain = dslo.DiscrepancyRefiner(solver=solver, nms_floor=0.0)(z, att[None], image, kind="scores").labels[0]
    assert float((plain == 0).float().mean()) > 0.95  # the collapse the guard exists for
    assert float((guarded == up).float().mean()) > 0.95
