"""dslo: training-free refinement of open-vocabulary segmentation from patch logits and
self-attention ("Direct Segmentation without Logits Optimization", CVPR 2026).

``import dslo`` needs torch and numpy only; model-backed providers and adapters import their
heavy dependencies when built.
"""

from .refiners import (Attention, DiscrepancyRefiner, PatchLogits, RefinerConfig,
                       RefinerOutput, joint_bilateral_upsample)

__version__ = "0.1.0"
__all__ = ["wrap", "Attention", "DiscrepancyRefiner", "PatchLogits", "RefinerConfig", "RefinerOutput",
           "joint_bilateral_upsample", "__version__"]


def __getattr__(name: str):
    # dslo.wrap lives with the adapters; imported on first use so `import dslo` stays light
    if name == "wrap":
        from .adapters.hooks import wrap

        return wrap
    raise AttributeError(f"module 'dslo' has no attribute {name!r}")
