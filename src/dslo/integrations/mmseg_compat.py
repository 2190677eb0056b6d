"""mmcv / mmseg compatibility: a stand-in for mmcv's compiled ops, importing mmseg, and
mmengine checkpoints under torch's ``weights_only`` loader.

Tested with mmsegmentation 1.2.2, mmengine 0.10.7, mmcv-lite 2.1.0 (``pip install
'dslo[mmseg]'``). Full mmcv has no wheel for current torch and compiles for ~27 minutes; mmseg
imports two of mmcv's compiled ops at module level (``point_sample`` and
``sigmoid_focal_loss``), so when ``mmcv._ext`` is absent ``install_mmcv_ops_standin`` puts a
small ``mmcv.ops`` in ``sys.modules`` first: ``point_sample`` from mmcv's own source (plain
PyTorch), a PyTorch ``sigmoid_focal_loss``, and placeholders that raise on use for every
other compiled op. torch >= 2.6 loads checkpoints with ``weights_only=True``, which refuses
mmengine checkpoints (they pickle ``HistoryBuffer`` and numpy arrays in their message hub):
``allow_mmengine_checkpoints`` allow-lists exactly those types, so mmengine's own loader (and
``Runner(load_from=...)``) works without turning ``weights_only`` off.

Importing this module imports neither mmseg nor mmcv: ``import_mmseg`` does, the stand-in
first (``dslo.integrations.mmseg`` calls it before any mmseg import of its own).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["TESTED_VERSIONS", "install_mmcv_ops_standin", "import_mmseg", "allow_mmengine_checkpoints",
           "load_checkpoint"]

TESTED_VERSIONS = {"mmsegmentation": "1.2.2", "mmengine": "0.10.7", "mmcv-lite": "2.1.0"}
_INSTALL = "pip install 'dslo[mmseg]' (mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 'setuptools<82' ftfy regex)"


# --------------------------------------------------------------------------- mmcv.ops stand-in


def _sigmoid_focal_loss(input: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25,
                        weight: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """PyTorch version of mmcv's compiled ``sigmoid_focal_loss``.

    Args:
        input: (N, C) logits; target: (N,) int64 class ids (C or more: no positive class).
        weight: optional (C,) weight, applied per sample by its target class (as mmcv's kernel).
        reduction: "none" ((N, C)), "mean" (sum / N), "sum".
    """
    n, c = input.shape
    t = F.one_hot(target.long().clamp(0, c), c + 1)[:, :c].to(input.dtype)
    p = input.sigmoid()
    loss = -(alpha * (1 - p).pow(gamma) * t * F.logsigmoid(input)
             + (1 - alpha) * p.pow(gamma) * (1 - t) * F.logsigmoid(-input))
    if weight is not None and weight.numel():
        loss = loss * weight[target.long().clamp(0, c - 1)].view(-1, 1)
    if reduction == "mean":
        return loss.sum() / max(n, 1)
    if reduction == "sum":
        return loss.sum()
    return loss


def _missing_op(name: str):
    """Module ``__getattr__`` of the stand-in: a placeholder class for any compiled op, so
    mmseg's ``from mmcv.ops import X`` succeeds and only using X fails (isinstance checks work)."""
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv.ops.{name} needs mmcv's compiled ops; dslo installed a stand-in mmcv.ops (mmcv-lite has "
            "none). Install full mmcv (compiles from source) to use models that need it")

    return type(name, (), {"__init__": unavailable, "__doc__": f"unavailable compiled op {name}"})


def install_mmcv_ops_standin() -> bool:
    """Register a small ``mmcv.ops`` in ``sys.modules`` when mmcv's compiled ops are absent.

    Must run before the first mmseg import. Does nothing when ``mmcv.ops`` is already imported
    or ``mmcv._ext`` exists (full mmcv). Returns True when the stand-in was installed.
    """
    if "mmcv.ops" in sys.modules:
        return False
    import mmcv

    if importlib.util.find_spec("mmcv._ext") is not None:
        return False
    ops = types.ModuleType("mmcv.ops", "dslo stand-in for mmcv.ops (mmcv-lite has no compiled ops)")
    # submodules that are plain PyTorch (point_sample.py) still import from mmcv's own source
    ops.__path__ = [str(Path(mmcv.__file__).parent / "ops")]
    ops.__dslo_standin__ = True
    ops.__getattr__ = _missing_op
    sys.modules["mmcv.ops"] = ops
    mmcv.ops = ops
    try:
        from mmcv.ops.point_sample import point_sample
    except Exception:  # noqa: BLE001 - keep mmcv importable whatever happens
        del sys.modules["mmcv.ops"]
        del mmcv.ops
        raise
    ops.point_sample = point_sample
    ops.sigmoid_focal_loss = _sigmoid_focal_loss
    return True


def _history_buffer_getattr(obj, name, *default):
    """The only ``builtins.getattr`` an mmengine checkpoint needs: its message hub pickles each
    ``HistoryBuffer`` with its statistics methods (``getattr(HistoryBuffer, "mean")``, ...).
    Anything else is refused: a general ``getattr`` would let a pickle reach arbitrary code."""
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and isinstance(name, str) and name in HistoryBuffer._statistics_methods:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"checkpoint calls getattr({obj!r}, {name!r}); only HistoryBuffer statistics "
                                 "methods are allowed")


# registered under the global name the pickle uses ("builtins.getattr")
_history_buffer_getattr.__module__ = "builtins"
_history_buffer_getattr.__qualname__ = _history_buffer_getattr.__name__ = "getattr"


def allow_mmengine_checkpoints() -> None:
    """Allow-list, for torch's ``weights_only`` loader, the non-tensor objects mmengine puts in
    its checkpoints: ``HistoryBuffer`` (with a ``getattr`` restricted to its statistics
    methods), numpy arrays, dtypes and scalars. Then ``torch.load`` (and mmengine's
    ``load_checkpoint`` / ``Runner(load_from=...)``) reads them with ``weights_only=True``."""
    import numpy as np

    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 loads everything anyway
        return
    from mmengine.logging.history_buffer import HistoryBuffer

    core = getattr(np, "_core", None) or np.core
    safe = [HistoryBuffer, _history_buffer_getattr, np.ndarray, np.dtype, core.multiarray._reconstruct,
            core.multiarray.scalar]
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                         "uint8", "bool")]
    add(safe)


_MMSEG = None


def import_mmseg():
    """Import mmseg (stand-in for ``mmcv.ops`` first when needed) and return it.

    Raises:
        ImportError: mmseg / mmengine / mmcv missing, with the install command.
    """
    global _MMSEG
    if _MMSEG is not None:
        return _MMSEG
    try:
        import mmcv  # noqa: F401
        import mmengine  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the mmseg integration needs mmsegmentation, mmengine and mmcv: {_INSTALL}") from exc
    install_mmcv_ops_standin()
    try:
        import mmseg
        import mmseg.datasets  # noqa: F401 - registers datasets and transforms
        import mmseg.evaluation  # noqa: F401
        import mmseg.models  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"cannot import mmseg ({exc}); {_INSTALL}") from exc
    allow_mmengine_checkpoints()
    _MMSEG = mmseg
    return mmseg


def load_checkpoint(model: torch.nn.Module, path: Union[str, Path], *, trusted: bool = False,
                    strict: bool = True) -> None:
    """Load an mmengine / mmseg checkpoint (``{"state_dict": ...}`` or a bare state dict) into
    ``model``.

    torch's ``weights_only`` loader is used with mmengine's types allow-listed; a checkpoint that
    still pickles other objects is refused unless ``trusted=True`` (full unpickling runs code
    from the file: only for files you trust).

    Raises:
        ValueError: missing file, refused pickle, or keys that do not fit (with ``strict``).
    """
    import pickle

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted:
            import re

            found = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(\s|$)", str(exc))
            first = (found.group(1) if found else " ".join(str(exc).split()))[:200]
            raise ValueError(f"checkpoint {path}: torch's weights_only loader refused it ({first}); pass "
                             "trust_checkpoint=True only if you trust the file") from None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path}: expected a state dict of tensors (or {{'state_dict': ...}})")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(f"checkpoint {path}: missing keys {list(result.missing_keys)[:5]}, unexpected keys "
                         f"{list(result.unexpected_keys)[:5]}")
