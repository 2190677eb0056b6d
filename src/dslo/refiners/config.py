"""RefinerConfig: every knob of DiscrepancyRefiner, with the paper's defaults where they work.

Where the paper is ambiguous or its literal reading fails on real images, the reading is a
named option and the default is the one measured best on voc14/ade20k4/coco1 (see
results/quality.md for the numbers and the command).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, Optional, Union

from .records import LOGIT_KINDS

__all__ = ["RefinerConfig", "Solver", "PathReading", "VelocityReading", "Upsample", "KernelDtype"]

Solver = Literal["path", "velocity", "fusion", "kl", "propagate", "none", "pamr", "densecrf", "lposs", "lposs+"]
PathReading = Literal["relaxed", "joint", "paper"]
VelocityReading = Literal["arrival", "paper"]
Upsample = Literal["jbu", "bilinear"]
KernelDtype = Literal["float32", "bfloat16", "float16"]
VelocityTies = Literal["start+end", "start"]
LogitKind = Literal["auto", "cosine", "scores", "log_probs", "probs"]

_CHOICES = {
    "logits": LOGIT_KINDS,
    "velocity_ties": ("start+end", "start"),
    "solver": ("path", "velocity", "fusion", "kl", "propagate", "none", "pamr", "densecrf", "lposs", "lposs+"),
    "path_reading": ("relaxed", "joint", "paper"),
    "velocity_reading": ("arrival", "paper"),
    "upsample": ("jbu", "bilinear"),
    "kernel_dtype": ("float32", "bfloat16", "float16"),
}


@dataclass(frozen=True)
class RefinerConfig:
    """Configuration of ``DiscrepancyRefiner`` (frozen; override with ``replace`` or keywords).

    Front end (paper section 3, supplement):
        logits: what the logits are: "auto" (default: told apart from the values,
            ``dslo.refiners.logit_forms``), "cosine", "scores", "log_probs", "probs". An
            adapter's ``PatchLogits.kind``, passed to the call as ``kind=``, wins over it.
        logit_scale: the temperature of the logits (multiplies them, after ``log`` for
            probabilities) before the solvers' softmax. "auto" (default): per image, the scale
            at which ``temperature_share`` of the patches reach class probability 0.9
            (``logit_forms.auto_temperature``; 0.9 is the paper's NMS threshold): the same for
            every form of one model's logits (x S, log-softmax, softmax), so an under- or
            over-confident model is refined as a calibrated one. None: the kind's own scale,
            CLIP's 100 for cosines and 1 for scores and log-probabilities. A number: that
            scale. ``solver="none"`` and the rivals always take the kind's own scale (or the
            number): they show the model's own probabilities. The solvers' stage
            "probabilities" (``return_stages``) are at the temperature used.
        temperature_share: for ``logit_scale="auto"``, the share of patches that reach
            probability 0.9 (0.9: measured on the development sets, docs/solvers.md).
        early_rejection: keep only classes that win the argmax at some patch.
        nms: zero the class probabilities of the patches the NMS rejects (``nms_share`` or
            the cut below). Feeds the solvers only; ``solver="none"`` never applies it (it
            would leave rejected patches without a label).
        nms_share: the default NMS (0.8): in every image each class keeps its most
            confident ``nms_share`` of the patches it wins, whatever their confidence: a
            relative cut, so a thin class loses no more of its patches than a large one and
            an unsure model keeps its seeds. None: the paper's absolute cut below.
        nms_threshold: with ``nms_share=None``: patches whose top softmax probability over
            the full vocabulary is below it are rejected (paper: 0.9).
        nms_floor: with ``nms_share=None``: in an image where the cut keeps less than this
            fraction of the patches, each class keeps at least this fraction of the patches
            it wins (its most confident), so an under-confident model never loses most of an
            image to the cut (0.9); 0: the paper's plain cut.
            ``logit_scale=None, nms_share=None, nms_floor=0`` is the paper's front end
            (results/real-models.md: what it gains on noise-like logits, loses on others).
        protect: where the model's top class probability reaches this, its own probabilities
            replace the solver's (per-patch normalised) map; None (default): off.

    Solvers:
        solver: "path" (optimal path, eq. 1-3/13-22), "velocity" (maximum velocity, eq. 10-12),
            "fusion" (mean of the two maps after per-patch normalisation, Table 2 row VII),
            "kl" (KL-to-uniform baseline, Table 2 row II), "propagate" (control: one step of
            class probability through the sharpened chain, no OT and no velocity), "none"
            (raw softmax, the baseline). Rivals, run as their public code does (no early
            rejection, NMS or JBU; ``dslo.refiners.rivals``): "pamr" (SCLIP's PAMR), "densecrf"
            (fully connected CRF, ``crf`` extra), "lposs" and "lposs+" (need
            ``Attention.features``).
        ipf_iters: IPF rounds turning attention into a doubly stochastic T (paper: 15).
        path_reading: "relaxed" (default, measured best): per class, source held at f^c, target
            1/N penalised by rho*KL, cost -log T, map = class mass delivered to each patch;
            "joint": one balanced plan for all classes, map = class share of arriving mass;
            "paper": literal, f^c = softmax over patches, cost = attention, balanced, map =
            Norm(sum_j pi_ij C_ij).
        path_eps: entropic regularisation relative to the cost (for cost -log T, eps = 0.5
            makes the Gibbs kernel proportional to T^2); the paper's 0.1 is used by "paper".
        path_rho: strength of the KL penalty on the target marginal ("relaxed").
        path_iters: maximum Sinkhorn iterations; path_tol: stop early when the marginal error
            and the change of log v are below it (checked every 10 iterations).
        velocity_reading: "arrival" (default): velocity = 1/(1 + t), t the continuous arrival
            time of the class probability at ``velocity_tau`` under the chain IPF(A∘A);
            "paper": literal v_i = max{1/l : |f_i^(l) - f_i^(l-1)| <= tau} on f^c = softmax
            over patches and chain T (ties everywhere, kept for the record).
        velocity_tau: arrival threshold (paper: 0.3 with its literal rule).
        velocity_steps: Markov steps L.
        velocity_ties: how "arrival" breaks exact ties (patches reached at the same step):
            "start+end" (default: the start state and the end state, which favours classes
            with mass around) or "start" (the model's own belief).
        sharpen: for "velocity" ("arrival") and "propagate": build the chain from A∘A
            (element-wise square) rather than A (measured: velocity 59.5/35.3/54.1 vs
            59.1/30.8/50.7 on voc14/ade20k4/coco1). The path solvers sharpen through their
            kernel instead: (T / max T)^(1/eps) with eps 0.5 squares T.

    Rivals (defaults: their public code's):
        pamr_iters, pamr_dilations: PAMR steps and stencil dilations (SCLIP: 10, (8, 16)).
        crf_iters: mean-field iterations of the dense CRF (10).
        lposs_k, lposs_gamma, lposs_sigma, lposs_alpha, lposs_iters: LPOSS's kNN graph
            (k neighbours, cosine^gamma, exp(-sigma * pixel distance)) and propagation
            (I - alpha S) Z = Y by ``lposs_iters`` CG steps (400, 3, 0.01, 0.95, 10);
            lposs_patch_size: input pixels per grid step for the distance; None (default):
            448 / min(h, w), LPOSS's unit (pixels of an input whose short side is 448).
        lposs_window, lposs_tau: LPOSS+'s pixel window and Lab-colour temperature (13, 0.01).

    Output:
        upsample: "jbu" (eq. 23) or "bilinear".
        jbu_sigma_spatial2, jbu_sigma_range2, jbu_radius: JBU parameters (paper: 1, 0.1; the
            window radius in low-resolution pixels is ours: e^{-r^2/sigma_s^2} < 2% beyond 2).
        return_stages: keep intermediates (probabilities, NMS mask, discrepancy map).
        kernel_topk: compressed kernel: after the (dense) IPF and sharpening, keep the k largest
            entries of each kernel row (and the diagonal) and run the Markov chain and Sinkhorn
            on that sparse pattern, O(C N k) per product instead of O(C N^2). Supported by "velocity" ("arrival"),
            "propagate", "path" ("relaxed") and "fusion". None: dense (default).
        kernel_dtype: storage and product precision of the dense kernel (path "relaxed"/"joint")
            and chain ("arrival" velocity, "propagate") after the float32 IPF: "float32"
            (default), or "bfloat16"/"float16" for GPUs (half the memory, tensor-core
            products; the vectors stay float32). On a CPU the float32 default takes the fused
            numba path and is as fast. Quality change measured in results/quality.md.
        max_matrix_bytes: memory guard; an N x N float32 attention per image above it is
            refused with a clear error rather than taking the machine down (None: no limit).
    """

    logit_scale: Union[float, str, None] = "auto"
    temperature_share: float = 0.9
    logits: LogitKind = "auto"
    early_rejection: bool = True
    nms: bool = True
    nms_threshold: float = 0.9
    nms_floor: float = 0.9
    nms_share: Optional[float] = 0.8
    protect: Optional[float] = None
    map_power: float = 1.0
    solver: Solver = "velocity"
    ipf_iters: int = 15
    path_reading: PathReading = "relaxed"
    path_eps: float = 0.5
    path_rho: float = 0.1
    path_iters: int = 100
    path_tol: float = 1e-6
    velocity_reading: VelocityReading = "arrival"
    velocity_tau: float = 0.1
    velocity_steps: int = 20
    velocity_ties: VelocityTies = "start+end"
    sharpen: bool = True
    upsample: Upsample = "jbu"
    jbu_sigma_spatial2: float = 1.0
    jbu_sigma_range2: float = 0.1
    jbu_radius: int = 2
    return_stages: bool = False
    max_matrix_bytes: Optional[int] = 4 * 1024**3
    kernel_topk: Optional[int] = None
    kernel_dtype: KernelDtype = "float32"
    pamr_iters: int = 10
    pamr_dilations: tuple = (8, 16)
    crf_iters: int = 10
    lposs_k: int = 400
    lposs_gamma: float = 3.0
    lposs_sigma: float = 0.01
    lposs_alpha: float = 0.95
    lposs_iters: int = 10
    lposs_patch_size: Optional[float] = None
    lposs_window: int = 13
    lposs_tau: float = 0.01

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"RefinerConfig.{name}: expected one of {choices}, got {value!r}")
        scale = self.logit_scale
        if isinstance(scale, str) and scale != "auto":
            # from text options ("logit_scale=100", "logit_scale=none")
            try:
                scale = None if scale.lower() == "none" else float(scale)
            except ValueError:
                raise ValueError(f"RefinerConfig.logit_scale: expected \"auto\", None or a number > 0, got {scale!r}") from None
            object.__setattr__(self, "logit_scale", scale)
        if isinstance(scale, bool) or (scale not in (None, "auto") and not (isinstance(scale, (int, float)) and scale > 0)):
            raise ValueError(f"RefinerConfig.logit_scale: expected \"auto\", None or a number > 0, got {scale!r}")
        if not 0.0 < float(self.temperature_share) <= 1.0:
            raise ValueError(f"RefinerConfig.temperature_share: expected in (0, 1], got {self.temperature_share!r}")
        if self.protect is not None and not 0.0 < float(self.protect) <= 1.0:
            raise ValueError(f"RefinerConfig.protect: expected in (0, 1] or None, got {self.protect!r}")
        if not float(self.map_power) > 0:
            raise ValueError(f"RefinerConfig.map_power: expected > 0, got {self.map_power!r}")
        if self.nms_share is not None and not 0.0 < float(self.nms_share) <= 1.0:
            raise ValueError(f"RefinerConfig.nms_share: expected in (0, 1] or None, got {self.nms_share!r}")
        if not 0.0 <= float(self.nms_floor) <= 1.0:
            raise ValueError(f"RefinerConfig.nms_floor: expected in [0, 1], got {self.nms_floor!r}")
        positive = ("path_eps", "path_rho", "velocity_tau", "jbu_sigma_spatial2",
                    "jbu_sigma_range2", "path_tol")
        for name in positive:
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"RefinerConfig.{name}: expected > 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.lposs_alpha) < 1.0:
            raise ValueError(f"RefinerConfig.lposs_alpha: expected in [0, 1), got {self.lposs_alpha!r}")
        if int(self.lposs_window) < 1 or int(self.lposs_window) % 2 == 0:
            raise ValueError(f"RefinerConfig.lposs_window: expected an odd integer >= 1, got {self.lposs_window!r}")
        dil = tuple(self.pamr_dilations) if isinstance(self.pamr_dilations, (tuple, list)) else ()
        if not dil or any(isinstance(d, bool) or int(d) != d or d < 1 for d in dil):
            raise ValueError(f"RefinerConfig.pamr_dilations: expected a tuple of integers >= 1, got {self.pamr_dilations!r}")
        object.__setattr__(self, "pamr_dilations", tuple(int(d) for d in dil))
        for name in ("pamr_iters", "crf_iters", "lposs_iters"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"RefinerConfig.{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lposs_k", "lposs_gamma", "lposs_sigma", "lposs_tau", "lposs_patch_size"):
            if getattr(self, name) is None:
                continue
            value = float(getattr(self, name))
            if value < 0 if name in ("lposs_sigma", "lposs_gamma") else not value > 0:
                raise ValueError(f"RefinerConfig.{name}: expected {'>=' if name in ('lposs_sigma', 'lposs_gamma') else '>'} 0, "
                                 f"got {getattr(self, name)!r}")
        for name in ("ipf_iters", "path_iters", "velocity_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RefinerConfig.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if int(self.jbu_radius) < 0:
            raise ValueError(f"RefinerConfig.jbu_radius: expected >= 0, got {self.jbu_radius!r}")
        if not 0.0 <= float(self.nms_threshold) < 1.0:
            raise ValueError(f"RefinerConfig.nms_threshold: expected in [0, 1), got {self.nms_threshold!r}")
        if self.kernel_topk is not None:
            if int(self.kernel_topk) < 1:
                raise ValueError(f"RefinerConfig.kernel_topk: expected an integer >= 1 or None, got {self.kernel_topk!r}")
            if self.solver in ("path", "fusion") and self.path_reading != "relaxed" or \
                    self.solver in ("velocity", "fusion") and self.velocity_reading != "arrival":
                raise ValueError("RefinerConfig.kernel_topk: the compressed kernel supports path_reading="
                                 "'relaxed' and velocity_reading='arrival' only")
        if self.kernel_dtype != "float32" and self.kernel_topk is not None:
            raise ValueError("RefinerConfig.kernel_dtype: half-precision kernels are dense only; "
                             "use kernel_dtype='float32' with kernel_topk")
        if self.max_matrix_bytes is not None and int(self.max_matrix_bytes) <= 0:
            raise ValueError("RefinerConfig.max_matrix_bytes: expected a positive byte count or None")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes) -> "RefinerConfig":
        """A copy with ``changes`` applied (validated); unknown names raise ``ValueError``."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"RefinerConfig: unknown option(s) {unknown}; known: {self.field_names()}")
        return replace(self, **changes)
