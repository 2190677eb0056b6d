"""dslo: training-free refinement of open-vocabulary segmentation from patch logits and
self-attention ("Direct Segmentation without Logits Optimization", CVPR 2026).

``import dslo`` needs torch and numpy only; model-backed providers and adapters import their
heavy dependencies when built.
"""

from .refiners import (Attention, DiscrepancyRefiner, PatchLogits, RefinerConfig,
                       RefinerOutput, joint_bilateral_upsample)

__version__ = "0.1.0"
__all__ = ["Attention", "DiscrepancyRefiner", "PatchLogits", "RefinerConfig", "RefinerOutput",
           "joint_bilateral_upsample", "__version__"]
