import math

import pytest
import torch
import torch.nn.functional as F

from dslo.refiners.jbu import JointBilateralUpsample, joint_bilateral_upsample


def naive_jbu(maps, image, s2, r2, radius):
    """Per-pixel loop straight from eq. 23 (the oracle; slow, tiny inputs only)."""
    b, c, h, w = maps.shape
    hh, ww = image.shape[-2:]
    guide = F.interpolate(image, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = torch.zeros(b, c, hh, ww, dtype=torch.float64)
    for bi in range(b):
        for y in range(hh):
            for x in range(ww):
                py = (y + 0.5) * h / hh - 0.5
                px = (x + 0.5) * w / ww - 0.5
                cy, cx = min(max(math.floor(py + 0.5), 0), h - 1), min(max(math.floor(px + 0.5), 0), w - 1)
                num = torch.zeros(c, dtype=torch.float64)
                den = 0.0
                for qy in range(cy - radius, cy + radius + 1):
                    for qx in range(cx - radius, cx + radius + 1):
                        if not (0 <= qy < h and 0 <= qx < w):
                            continue
                        fs = math.exp(-((py - qy) ** 2 + (px - qx) ** 2) / s2)
                        d2 = float(((image[bi, :, y, x] - guide[bi, :, qy, qx]) ** 2).sum())
                        wgt = fs * math.exp(-d2 / r2)
                        num += wgt * maps[bi, :, qy, qx].double()
                        den += wgt
                out[bi, :, y, x] = num / den
    return out


@pytest.mark.parametrize("size,hw", [((5, 7), (13, 17)), ((4, 4), (9, 14)), ((4, 6), (16, 24)), ((3, 5), (3, 5))])
def test_matches_naive_reference(size, hw):
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, *size, generator=g)
    image = torch.rand(2, 3, *hw, generator=g)
    fast = joint_bilateral_upsample(maps, image, 1.0, 0.1, 2)
    ref = naive_jbu(maps, image, 1.0, 0.1, 2)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)


def test_block_and_offset_paths_agree():
    from dslo.refiners.jbu import _jbu_blocks, _jbu_offsets

    g = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 4, 8, 6, generator=g)
    image = torch.rand(2, 3, 32, 36, generator=g)
    guide_low = F.interpolate(image, size=(8, 6), mode="bilinear", antialias=True, align_corners=False)
    a = _jbu_blocks(maps, image, guide_low, 1.0, 0.1, 2, max_elems=5000)  # several chunks
    b = _jbu_offsets(maps, image, guide_low, 1.0, 0.1, 2)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_constant_map_stays_constant_and_convex():
    image = torch.rand(1, 3, 40, 50)
    maps = torch.stack([torch.full((6, 8), 0.3), torch.linspace(0, 1, 48).view(6, 8)]).unsqueeze(0)
    out = joint_bilateral_upsample(maps, image)
    torch.testing.assert_close(out[:, 0], torch.full((1, 40, 50), 0.3))
    assert float(out[:, 1].min()) >= 0 and float(out[:, 1].max()) <= 1


def test_edges_follow_the_image():
    """A step in the guide inside a low-res cell: JBU puts the boundary on it, bilinear cannot."""
    h, w, scale = 4, 8, 10
    image = torch.zeros(1, 3, h * scale, w * scale)
    image[..., : 43] = 1.0  # the true edge at x = 43, inside low-res column 4
    truth = torch.zeros(h * scale, w * scale, dtype=torch.bool)
    truth[:, :43] = True
    maps = torch.zeros(1, 2, h, w)
    maps[:, 0, :, :4] = 1.0
    maps[:, 1, :, 5:] = 1.0
    maps[:, :, :, 4] = 0.5
    jbu = joint_bilateral_upsample(maps, image).argmax(1)[0] == 0
    bil = F.interpolate(maps, size=(h * scale, w * scale), mode="bilinear").argmax(1)[0] == 0
    assert int((jbu != truth).sum()) < int((bil != truth).sum())


def test_module_wrapper_and_identity_size():
    maps = torch.rand(1, 2, 6, 6)
    image = torch.rand(1, 3, 6, 6)
    out = JointBilateralUpsample(radius=0)(maps, image)
    torch.testing.assert_close(out, maps)


@pytest.mark.parametrize("maps,image,match", [
    (torch.rand(2, 6, 6), torch.rand(1, 3, 12, 12), "4 dimensions"),
    (torch.rand(1, 2, 6, 6), torch.rand(1, 1, 12, 12), "3 channels"),
    (torch.rand(1, 2, 6, 6), torch.rand(1, 3, 12, 12) * 255, r"\[0, 1\]"),
    (torch.rand(2, 2, 6, 6), torch.rand(1, 3, 12, 12), "batch"),
    (torch.full((1, 2, 6, 6), float("nan")), torch.rand(1, 3, 12, 12), "finite"),
])
def test_bad_inputs(maps, image, match):
    with pytest.raises(ValueError, match=match):
        joint_bilateral_upsample(maps, image)


@pytest.mark.slow
def test_memory_bounded_at_1024():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = joint_bilateral_upsample(torch.rand(1, 5, 64, 64), torch.rand(1, 3, 1024, 1024))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.shape == (1, 5, 1024, 1024)
    # output is 20 MiB; a per-offset buffer design stays within a few multiples of it
    assert (after - before) / 1024 < 400
