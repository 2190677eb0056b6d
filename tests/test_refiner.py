import pytest
import torch

import dslo
from dslo import Attention, DiscrepancyRefiner, PatchLogits, RefinerConfig
from dslo.refiners.grid import resample_attention

from conftest import blob_problem, random_attention

SOLVERS = ["none", "kl", "path", "velocity", "fusion", "propagate"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_output_contract(solver):
    logits, att, image, _ = blob_problem(b=2)
    out = DiscrepancyRefiner(solver=solver)(logits, att, image)
    assert out.labels.shape == (2, 80, 96) and out.labels.dtype == torch.int64
    assert out.scores.shape == (2, 3, 80, 96)
    assert out.active.shape == (2, 3) and out.active.dtype == torch.bool
    assert not bool(torch.isnan(out.scores).any())
    # the labels are the argmax of the scores and never a rejected class
    torch.testing.assert_close(out.labels, out.scores.argmax(1))
    assert bool(out.active.gather(1, out.labels.flatten(1)).all())


def test_ties_go_to_the_first_class():
    """Two identical classes tie at every pixel; the label is the lower index, as argmax."""
    logits, att, image, _ = blob_problem()
    logits[:, 2] = logits[:, 0]
    out = DiscrepancyRefiner(solver="none", early_rejection=False, upsample="bilinear")(logits, att, image)
    assert bool((out.scores[:, 0] == out.scores[:, 2]).all())
    assert not bool((out.labels == 2).any()) and bool((out.labels == 0).any())
    torch.testing.assert_close(out.labels, out.scores.argmax(1))


@pytest.mark.parametrize("solver,reading", [("path", "relaxed"), ("path", "joint"), ("velocity", "arrival"),
                                            ("propagate", "relaxed")])
def test_solvers_repair_a_noisy_region(solver, reading):
    """Logits say 'left' and 'right' with noise; the attention knows the halves; the refined
    labels must be more correct than the raw argmax."""
    logits, att, image, truth = blob_problem(seed=1)
    logits = logits.clone()
    logits[0, 1, 2:5, 1:3] += 0.1  # a confident wrong blob inside the left half
    big = torch.nn.functional.interpolate(truth[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0].long()
    raw = DiscrepancyRefiner(solver="none", upsample="bilinear")(logits, att, image).labels[0]
    kw = {"path_reading": reading} if solver == "path" else {}
    ref = DiscrepancyRefiner(solver=solver, **kw)(logits, att, image).labels[0]
    assert (ref == big).float().mean() > (raw == big).float().mean()
    assert (ref == big).float().mean() > 0.95


def test_early_rejection_keeps_argmax_winners_only():
    logits, att, image, _ = blob_problem()
    out = DiscrepancyRefiner()(logits, att, image)
    assert out.active[0].tolist() == [True, True, False]
    assert bool(torch.isinf(out.scores[0, 2]).all())


def test_single_class_and_171_classes():
    logits, att, image, _ = blob_problem()
    one = DiscrepancyRefiner()(logits[:, :1], att, image)
    assert bool((one.labels == 0).all())
    many = torch.full((1, 171, 10, 12), 0.1)
    many[:, 37] += 0.05
    many[:, 90, :, 6:] += 0.1
    out = DiscrepancyRefiner(solver="path")(many, att, image)
    assert set(out.labels.unique().tolist()) <= {37, 90}
    assert int(out.active.sum()) == 2


@pytest.mark.parametrize("solver", SOLVERS)
def test_all_patches_rejected_by_nms_is_defined(solver):
    logits = torch.full((1, 4, 6, 6), 0.2) + 1e-4 * torch.randn(1, 4, 6, 6)  # nothing confident
    out = DiscrepancyRefiner(solver=solver)(logits, random_attention(1, 36), torch.rand(1, 3, 30, 30))
    assert not bool(torch.isnan(out.scores).any())
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) < 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    logits, att, image, _ = blob_problem()
    ref = DiscrepancyRefiner()(logits, att, image)
    out = DiscrepancyRefiner()(logits.to(dtype), att.to(dtype), image.to(dtype))
    assert out.scores.dtype == torch.float32
    assert (out.labels == ref.labels).float().mean() > 0.98


def test_attention_on_another_grid_is_resampled():
    logits, att, image, _ = blob_problem()
    fine = Attention(random_attention(1, 20 * 24, seed=3), (20, 24))
    out = DiscrepancyRefiner()(logits, fine, image)
    assert out.labels.shape == (1, 80, 96)
    coarse = resample_attention(fine, (10, 12))
    torch.testing.assert_close(coarse.matrix.sum(-1), torch.ones(1, 120))


def test_batch_one_attention_broadcasts():
    logits, att, image, _ = blob_problem(b=2)
    a = DiscrepancyRefiner()(logits, att[:1], image)
    b = DiscrepancyRefiner()(logits, att, image)
    torch.testing.assert_close(a.scores, b.scores)


def test_deterministic_on_cpu():
    logits, att, image, _ = blob_problem(seed=4)
    for solver in ("path", "velocity"):
        a = DiscrepancyRefiner(solver=solver)(logits, att, image)
        b = DiscrepancyRefiner(solver=solver)(logits, att, image)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)


def test_stages_and_config_keywords():
    logits, att, image, _ = blob_problem()
    r = DiscrepancyRefiner(RefinerConfig(solver="path"), return_stages=True)
    out = r(logits, att, image)
    assert r.config.solver == "path"
    assert set(out.stages) == {"probabilities", "nms", "map"}
    assert out.stages["map"].shape == (1, 3, 10, 12)


@pytest.mark.parametrize("kwargs,match", [
    ({"solver": "magic"}, "solver"),
    ({"path_reading": "x"}, "path_reading"),
    ({"logit_scale": 0}, "logit_scale"),
    ({"nms_threshold": 1.5}, "nms_threshold"),
    ({"velocity_steps": 0}, "velocity_steps"),
    ({"not_a_field": 1}, "unknown option"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiscrepancyRefiner(**kwargs)


def _bad_cases():
    logits, att, image, _ = blob_problem()
    nan = logits.clone()
    nan[0, 0, 0, 0] = float("nan")
    neg = att.clone()
    neg[0, 0, 0] = -1
    zero = att.clone()
    zero[0, 3] = 0
    return [
        ("nan logits", (nan, att, image), "finite"),
        ("3-d logits", (logits[0], att, image), "4 dimensions"),
        ("grid mismatch", (logits, att[:, :50, :50], image), "N = h\\*w = 120"),
        ("negative attention", (logits, neg, image), "non-negative"),
        ("zero row", (logits, zero, image), "sum to 0"),
        ("image 0..255", (logits, att, image * 255), r"\[0, 1\]"),
        ("image batch", (logits, att, torch.cat([image, image])), "match logits"),
        ("attention batch", (logits, torch.cat([att] * 3), image), "batch size 3"),
        ("int logits", (logits.long(), att, image), "floating"),
        ("attention type", (logits, "attn", image), "dslo.Attention"),
        ("zero classes", (logits[:, :0], att, image), "C >= 1"),
    ]


@pytest.mark.parametrize("name,args,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_value_error(name, args, match):
    with pytest.raises(ValueError, match=match):
        DiscrepancyRefiner()(*args)


def test_memory_guard_refuses_huge_grids():
    logits = torch.rand(1, 2, 64, 64)
    att = Attention(torch.full((1, 4, 4), 0.25), (2, 2))
    with pytest.raises(ValueError, match="max_matrix_bytes"):
        DiscrepancyRefiner(max_matrix_bytes=10 * 2**20)(logits, att, torch.rand(1, 3, 64, 64))


def test_records_validate():
    with pytest.raises(ValueError, match="rows summing to 1"):
        Attention(torch.rand(1, 4, 4) + 1, (2, 2))
    with pytest.raises(ValueError, match="N = h\\*w"):
        Attention(torch.full((1, 4, 4), 0.25), (3, 2))
    pl = PatchLogits(torch.tensor([[[[0.1]], [[0.3]], [[0.2]]]]), torch.tensor([0, 1, 0]))
    assert pl.num_classes == 2
    torch.testing.assert_close(pl.per_class().flatten(), torch.tensor([0.2, 0.3]))
    with pytest.raises(ValueError, match="one per query"):
        PatchLogits(torch.rand(1, 3, 2, 2), torch.tensor([0, 1]))
    assert dslo.__version__
