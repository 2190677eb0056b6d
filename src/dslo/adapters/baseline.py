"""The peers' own post-processing of patch logits, for comparing with their published mIoU.

SCLIP, SC-CLIP, CASS and ProxyCLIP turn dense cosine logits into labels the same way
(``postprocess_result`` in their segmentors): bilinear upsampling to the image, a softmax
over all queries of ``logit_scale * logits``, synonyms reduced by the max probability,
argmax, pixels whose best probability is below ``prob_thd`` set to class 0 (background),
and for SC-CLIP on VOC21 an area filter. ``baseline_labels`` does that from ``PatchLogits``;
``PEER_POSTPROCESS`` holds the values of their public configs.

Two differences remain from the peers' pipelines: with sliding windows they average the
upsampled window logits per pixel, the adapters average on the patch grid; and the image is
resized by the adapters to multiples of the patch size before the ViT.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..refiners.records import PatchLogits

__all__ = ["baseline_labels", "PEER_POSTPROCESS"]

#: (method, benchmark) -> keyword arguments of ``baseline_labels`` from the public configs;
#: benchmarks not listed use logit_scale 40, no thresholds.
PEER_POSTPROCESS: dict[tuple[str, str], dict] = {
    ("sc-clip", "voc21"): dict(logit_scale=50.0, prob_thd=0.15, area_thd=0.1),
    ("sc-clip", "coco_object"): dict(logit_scale=55.0, prob_thd=0.35),
    ("sc-clip", "context60"): dict(prob_thd=0.15),
    ("proxyclip", "voc21"): dict(prob_thd=0.2),
    ("proxyclip", "coco_object"): dict(prob_thd=0.25),
    ("proxyclip", "context60"): dict(prob_thd=0.15),
    ("cass", "voc21"): dict(prob_thd=0.1),
    ("cass", "coco_object"): dict(prob_thd=0.1),
    ("cass", "context60"): dict(prob_thd=0.1),
}


def baseline_labels(patch: PatchLogits, size: tuple[int, int], *, logit_scale: float = 40.0,
                    prob_thd: float = 0.0, area_thd: Optional[float] = None) -> torch.Tensor:
    """Labels (B, H, W) int64 by the peers' post-processing of ``patch`` at image ``size``.

    Args:
        patch: ``PatchLogits`` (raw cosine logits on the patch grid).
        size: (H, W) of the output (the original image).
        logit_scale: multiplies the logits before the softmax over queries (40 by default).
        prob_thd: pixels whose best class probability is below it become class 0.
        area_thd: SC-CLIP's filter: foreground classes (1..C-1) covering at most this fraction
            of the foreground pixels of the argmax map get probability 0.
    """
    logits = F.interpolate(patch.logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    probs = torch.softmax(logits * logit_scale, dim=1)
    b, _, h, w = probs.shape
    c = patch.num_classes
    idx = patch.query_to_class.view(1, -1, 1, 1).expand_as(probs)
    per_class = probs.new_zeros(b, c, h, w).scatter_reduce(1, idx, probs, reduce="amax", include_self=True)
    if area_thd is not None:
        onehot = F.one_hot(per_class.argmax(1), c)[..., 1:].sum((1, 2)).float()  # (B, C-1)
        keep = onehot > area_thd * onehot.sum(-1, keepdim=True)
        per_class[:, 1:] *= keep.view(b, c - 1, 1, 1).to(per_class.dtype)
    best, labels = per_class.max(1)
    return labels.masked_fill(best < prob_thd, 0)
