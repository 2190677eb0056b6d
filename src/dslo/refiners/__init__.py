"""The method itself, model-free: tensors in, tensors out."""

from .config import RefinerConfig
from .jbu import JointBilateralUpsample, joint_bilateral_upsample
from .records import Attention, PatchLogits, RefinerOutput
from .refiner import DiscrepancyRefiner, discrepancy_map

__all__ = ["Attention", "DiscrepancyRefiner", "JointBilateralUpsample", "PatchLogits",
           "RefinerConfig", "RefinerOutput", "discrepancy_map", "joint_bilateral_upsample"]
