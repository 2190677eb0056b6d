"""Row-vector products with a kernel stored in float32, bfloat16 or float16.

``RefinerConfig.kernel_dtype`` stores the dense Gibbs kernel / Markov chain in half the memory
and runs its products at the GPU's (or a bf16 CPU's) half-precision rate. The vectors stay
float32 outside the products: each row is divided by its largest entry before the cast (the
Sinkhorn scalings span far more than float16's range) and multiplied back after it.
"""

from __future__ import annotations

import torch

__all__ = ["KERNEL_DTYPES", "row_matmul"]

#: RefinerConfig.kernel_dtype names -> torch dtypes
KERNEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def row_matmul(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x @ kernel for row vectors.

    Args:
        x: (..., C, N) row vectors (non-negative in the refiner, any sign allowed).
        kernel: (..., N, M). bfloat16 or float16: x is scaled per row into [-1, 1], cast to
            the kernel's dtype, multiplied, and scaled back, giving float32. Any other dtype:
            a plain ``x @ kernel``.

    Returns:
        (..., C, M): float32 for a half-precision kernel, else the matmul's dtype.
    """
    if kernel.dtype not in (torch.bfloat16, torch.float16):
        return x @ kernel
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return ((xf / scale).to(kernel.dtype) @ kernel).float() * scale
