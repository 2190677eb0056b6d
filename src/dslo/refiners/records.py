"""Records that flow through dslo: small frozen dataclasses of tensors.

They live here, in ``refiners/``, because the refiner consumes them and ``refiners/`` imports
nothing from the rest of the package; ``dslo.attention`` and ``dslo.adapters`` re-export them.
Every record checks shapes, dtypes and finiteness at construction and raises ``ValueError``
saying what was expected and what came.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

#: what patch logits can be (``PatchLogits.kind``, ``RefinerConfig.logits``)
LOGIT_KINDS = ("auto", "cosine", "scores", "log_probs", "probs")

__all__ = ["Attention", "PatchLogits", "RefinerOutput", "check_image", "check_tensor", "check_maps_and_image"]

#: Tolerance on attention row sums. Providers renormalise in float32, so rows sum to 1 within
#: a few ulps times N; fp16 inputs are converted before the check.
ROW_SUM_TOL = 1e-3


def check_tensor(
    x: object,
    name: str,
    ndim: int,
    *,
    floating: bool = True,
    finite: bool = True,
    dims: str = "",
) -> torch.Tensor:
    """Check that ``x`` is a tensor with ``ndim`` dimensions (and finite floats).

    Args:
        x: the value to check.
        name: how the error message calls it.
        ndim: expected number of dimensions.
        floating: require a floating dtype.
        finite: require every entry to be finite.
        dims: the expected layout for the message, e.g. ``"(B, C, h, w)"``.

    Returns:
        ``x`` unchanged.

    Raises:
        ValueError: naming what was expected and what came.
    """
    layout = f" {dims}" if dims else ""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor{layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(
            f"{name}: expected {ndim} dimensions{layout}, got shape {tuple(x.shape)}"
        )
    if floating and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    # one reduction pass: NaN and inf survive a sum; only then pay for the exact count
    if finite and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x.sum(dtype=torch.float64)
                                                                                  if x.dtype != torch.float64 else x.sum())) \
            and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf entries")
    return x


def check_image(image: object, name: str = "image") -> torch.Tensor:
    """Check an image batch (B, 3, H, W), floating, finite, values in [0, 1].

    Raises:
        ValueError: with what was expected, e.g. when a 0..255 image is passed.
    """
    x = check_tensor(image, name, 4, dims="(B, 3, H, W) in [0, 1]")
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 channels (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected a batch of at least one image, got B = 0")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: expected H, W >= 1, got a {x.shape[2]}x{x.shape[3]} image")
    if x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3):
        raise ValueError(
            f"{name}: expected values in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]"
            " (divide 0..255 images by 255)"
        )
    return x


def check_maps_and_image(maps: object, image: object, name: str = "scores") -> torch.Tensor:
    """Check per-class maps (B, C, H, W) with C, H, W >= 1 and their guide image (B, 3, H', W')
    in [0, 1] of the same batch size (the pixel-level rivals take both).

    Returns:
        ``maps`` unchanged.

    Raises:
        ValueError: naming what was expected and what came.
    """
    check_tensor(maps, name, 4, dims="(B, C, H, W)")
    check_image(image)
    if maps.shape[0] != image.shape[0]:
        raise ValueError(
            f"{name} and image: expected the same batch size B, got {name} {tuple(maps.shape)}"
            f" and image {tuple(image.shape)}"
        )
    if maps.shape[1] == 0 or min(maps.shape[-2:]) == 0:
        raise ValueError(f"{name}: expected (B, C, H, W) with C, H, W >= 1, got {tuple(maps.shape)}")
    return maps


@dataclass(frozen=True)
class Attention:
    """A row-stochastic patch-to-patch attention on a patch grid.

    Attributes:
        matrix: (B, N, N) float, non-negative, each row sums to 1; N = grid[0] * grid[1],
            patches in row-major order (index = row * w + col).
        grid: (h, w) of the patch grid the rows and columns live on.
        source: free-form description of the provider (for records and figures).
        features: optional (B, N, D) float patch features on the same grid and in the same
            row-major order as the matrix, for graph-based rivals that build their own
            affinities (LPOSS's kNN graph); None when the provider has none.
    """

    matrix: torch.Tensor
    grid: tuple[int, int]
    source: str = ""
    features: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        m = check_tensor(self.matrix, "Attention.matrix", 3, dims="(B, N, N)")
        grid = tuple(int(g) for g in self.grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"Attention.grid: expected (h, w) with h, w >= 1, got {self.grid}")
        object.__setattr__(self, "grid", grid)
        n = grid[0] * grid[1]
        if m.shape[1] != m.shape[2] or m.shape[1] != n:
            raise ValueError(
                f"Attention.matrix: expected (B, N, N) with N = h*w = {grid[0]}*{grid[1]} = {n}, "
                f"got shape {tuple(m.shape)}"
            )
        _check_features(self.features, m.shape[0], n, grid)
        if m.numel() == 0:
            return
        low = float(m.min())
        if low < 0:
            raise ValueError(f"Attention.matrix: expected non-negative entries, min is {low:.3g}")
        rows = m.float().sum(-1)
        err = float((rows - 1).abs().max())
        if err > ROW_SUM_TOL:
            raise ValueError(
                "Attention.matrix: expected rows summing to 1 (row-stochastic), largest "
                f"deviation is {err:.3g}; use Attention.from_scores() to normalise raw weights"
            )

    @property
    def batch(self) -> int:
        return int(self.matrix.shape[0])

    @classmethod
    def from_scores(
        cls,
        weights: torch.Tensor,
        grid: tuple[int, int],
        source: str = "",
        features: Optional[torch.Tensor] = None,
    ) -> "Attention":
        """Build from non-negative weights (B, N, N) by renormalising rows.

        ``features`` (B, N, D), if given, is checked and stored as is. Rows that sum to zero
        raise ``ValueError`` rather than silently becoming uniform.
        """
        w = check_tensor(weights, "attention weights", 3, dims="(B, N, N)").float()
        if w.numel() and float(w.min()) < 0:
            raise ValueError("attention weights: expected non-negative entries")
        s = w.sum(-1, keepdim=True)
        if bool((s <= 0).any()):
            raise ValueError(
                f"attention weights: {int((s <= 0).sum())} rows sum to 0; cannot make them stochastic"
            )
        _check_features(features, w.shape[0], int(grid[0]) * int(grid[1]), tuple(grid))
        return cls._trusted(w / s, grid, source, features)

    @classmethod
    def _trusted(
        cls,
        matrix: torch.Tensor,
        grid: tuple[int, int],
        source: str = "",
        features: Optional[torch.Tensor] = None,
    ) -> "Attention":
        """Build without re-checking a matrix this package has just normalised (each check is a
        pass over N^2 entries, comparable to a solver iteration). Shapes are still checked;
        features, at N x D, are cheap enough to check in full."""
        n = int(grid[0]) * int(grid[1])
        if matrix.ndim != 3 or matrix.shape[1:] != (n, n):
            raise ValueError(f"Attention: expected (B, {n}, {n}) for grid {tuple(grid)}, got {tuple(matrix.shape)}")
        _check_features(features, matrix.shape[0], n, (int(grid[0]), int(grid[1])))
        obj = cls.__new__(cls)
        object.__setattr__(obj, "matrix", matrix)
        object.__setattr__(obj, "grid", (int(grid[0]), int(grid[1])))
        object.__setattr__(obj, "source", source)
        object.__setattr__(obj, "features", features)
        return obj


def _check_features(features: Optional[torch.Tensor], batch: int, n: int, grid: tuple) -> None:
    """Patch features must sit on the matrix's grid: (B, N, D) with the matrix's B and N."""
    if features is None:
        return
    f = check_tensor(features, "Attention.features", 3, dims="(B, N, D)")
    if f.shape[0] != batch or f.shape[1] != n or f.shape[2] < 1:
        raise ValueError(
            f"Attention.features: expected (B, N, D) = ({batch}, {n}, D >= 1) to match the matrix "
            f"on grid {tuple(grid)}, got shape {tuple(f.shape)}"
        )


@dataclass(frozen=True)
class PatchLogits:
    """Raw patch-text similarities of an OVSS model, before any upsampling.

    Attributes:
        logits: (B, Q, h, w) float: cosine similarities of Q text queries (classes or
            synonyms) at each patch of an h x w grid.
        query_to_class: (Q,) int64 in [0, C): the class each query belongs to; synonyms
            share a class. Default: identity (Q = C).
        num_classes: C; default ``max(query_to_class) + 1``.
        kind: what the numbers are, so the refiner turns them into class probabilities the
            right way: "cosine" (CLIP-style similarities in [-1, 1]),
            "scores" (a classifier's raw outputs), "log_probs", "probs", or "auto" (default:
            the refiner tells them apart from the values, ``dslo.refiners.logit_forms``).
    """

    logits: torch.Tensor
    query_to_class: Optional[torch.Tensor] = None
    num_classes: Optional[int] = None
    kind: str = "auto"

    def __post_init__(self) -> None:
        lg = check_tensor(self.logits, "PatchLogits.logits", 4, dims="(B, Q, h, w)")
        q = lg.shape[1]
        if q == 0:
            raise ValueError("PatchLogits.logits: expected at least one query, got Q = 0")
        qc = self.query_to_class
        if qc is None:
            qc = torch.arange(q, device=lg.device)
        qc = check_tensor(qc, "PatchLogits.query_to_class", 1, floating=False, dims="(Q,)").long()
        if qc.shape[0] != q:
            raise ValueError(
                f"PatchLogits.query_to_class: expected {q} entries (one per query), got {qc.shape[0]}"
            )
        if bool((qc < 0).any()):
            raise ValueError("PatchLogits.query_to_class: expected class indices >= 0")
        c = int(qc.max()) + 1 if self.num_classes is None else int(self.num_classes)
        if c < int(qc.max()) + 1:
            raise ValueError(
                f"PatchLogits.num_classes = {c} but query_to_class refers to class {int(qc.max())}"
            )
        if self.kind not in LOGIT_KINDS:
            raise ValueError(f"PatchLogits.kind: expected one of {LOGIT_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "query_to_class", qc.to(lg.device))
        object.__setattr__(self, "num_classes", c)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.logits.shape[2]), int(self.logits.shape[3])

    def per_class(self) -> torch.Tensor:
        """Reduce synonyms to classes by taking the max over each class's queries.

        Returns:
            (B, C, h, w) logits; a class without any query gets the minimum logit of the image
            (so it never wins the argmax) rather than -inf (which would make NaN in softmax
            products downstream).
        """
        lg = self.logits
        b, _, h, w = lg.shape
        c = self.num_classes
        idx = self.query_to_class.view(1, -1, 1, 1).expand_as(lg)
        floor = lg.amin(dim=(1, 2, 3), keepdim=True).expand(b, c, h, w).clone()
        return floor.scatter_reduce(1, idx, lg, reduce="amax", include_self=True)


@dataclass(frozen=True)
class RefinerOutput:
    """What ``DiscrepancyRefiner`` returns.

    Attributes:
        labels: (B, H, W) int64 class indices in [0, C).
        scores: (B, C, H, W) float32 per-class scores at image resolution (higher wins;
            rejected classes hold -inf so they never win).
        active: (B, C) bool: classes kept by category early rejection.
        stages: optional intermediates for figures (name -> tensor), empty unless asked for.
    """

    labels: torch.Tensor
    scores: torch.Tensor
    active: torch.Tensor
    stages: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_tensor(self.labels, "RefinerOutput.labels", 3, floating=False, dims="(B, H, W)")
        if self.labels.dtype != torch.int64:
            raise ValueError(f"RefinerOutput.labels: expected int64, got {self.labels.dtype}")
        check_tensor(self.scores, "RefinerOutput.scores", 4, finite=False, dims="(B, C, H, W)")
        if bool(torch.isnan(self.scores).any()):
            raise ValueError("RefinerOutput.scores: NaN entries")
        check_tensor(self.active, "RefinerOutput.active", 2, floating=False, dims="(B, C)")
        b, c, hh, ww = self.scores.shape
        if tuple(self.labels.shape) != (b, hh, ww) or tuple(self.active.shape) != (b, c):
            raise ValueError(
                f"RefinerOutput: inconsistent shapes labels {tuple(self.labels.shape)}, "
                f"scores {tuple(self.scores.shape)}, active {tuple(self.active.shape)}"
            )
