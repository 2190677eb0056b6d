"""Finding weights without surprises: the Hugging Face cache, a local ``weights_dir``, a
checkpoint file, offline mode.

- ``load_clip_model``: an open_clip CLIP model; offline mode (``HF_HUB_OFFLINE=1``) honoured; a
  one-line ``ValueError`` naming the missing weights and how to get them.
- ``resolve_repo_dir``: a Hugging Face repo id mapped to a local copy in ``weights_dir``.

The attention providers' own loaders (``dslo.attention.dinov2/sd2/clip``) share the offline
and path helpers of ``dslo._hub``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .._hub import OFFLINE_ALTERNATIVES, hub_offline, hub_unavailable

__all__ = ["ClipWeights", "hub_offline", "load_clip_model", "locate_clip_weights", "resolve_repo_dir"]



_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _local_candidates(weights_dir: Path, model: str, tag: str, repo: Optional[str]) -> list[Path]:
    """Files in ``weights_dir`` that may hold open_clip ``model``/``tag`` weights, most specific first."""
    stems = [f"{model}-{tag}", f"{model}_{tag}", f"{model}/{tag}", f"{tag}"]
    if repo:
        name = repo.split("/")[-1]
        stems += [f"{name}/open_clip_model", f"{name}/open_clip_pytorch_model", f"{repo}/open_clip_model",
                  f"{repo}/open_clip_pytorch_model"]
    return [weights_dir / f"{s}{suffix}" for s in stems for suffix in _CHECKPOINT_SUFFIXES]


def _hub_cached(repo: str, filename: str, cache_dir: Optional[Path]) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        return None
    kw = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    for name in (Path(filename).with_suffix(".safetensors").name.replace("pytorch_model", "model"), filename):
        found = try_to_load_from_cache(repo, name, **kw)
        if isinstance(found, str):
            return found
    return None


@dataclass(frozen=True)
class ClipWeights:
    """Where an open_clip model's weights are, found without loading them.

    Attributes:
        model: the open_clip model name (a model-config JSON is registered under its stem).
        config: that JSON file, when the model was given as one.
        tag: the open_clip tag or checkpoint path; None for random weights.
        file: the local checkpoint to load; None for random weights or when only a download
            can fetch it (online).
        quick_gelu: the tag's QuickGELU setting (lost when a file is passed as ``pretrained``).
        repo, filename: the Hugging Face source of the tag ("" when it has none).
    """

    model: str
    config: Optional[Path]
    tag: Optional[str]
    file: Optional[Path]
    quick_gelu: bool = False
    repo: str = ""
    filename: str = ""


def locate_clip_weights(model: str = "ViT-B-16", pretrained: Optional[str] = "openai", *,
                        weights_dir: Union[str, Path, None] = None) -> ClipWeights:
    """Find the checkpoint ``load_clip_model`` would load, without loading it.

    Args: see ``load_clip_model``.

    Raises:
        ValueError: one line: unknown model or tag, a checkpoint file that does not exist, or
            weights absent from ``weights_dir`` and the Hugging Face cache while offline.
    """
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("CLIP adapters need open_clip: pip install 'dslo[clip]'") from exc
    config = None
    if isinstance(model, (str, Path)) and str(model).endswith(".json"):
        config = Path(model).expanduser()
        if not config.is_file():
            raise ValueError(f"open_clip model config {str(model)!r} does not exist")
        open_clip.add_model_config(config)
        model = config.stem
    if not isinstance(model, str) or model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; see open_clip.list_models() (e.g. 'ViT-B-16') "
                         "or give the path of a model-config JSON")
    wdir = Path(weights_dir).expanduser() if weights_dir is not None else None
    if wdir is not None and not wdir.is_dir():
        raise ValueError(f"--weights-dir {str(weights_dir)!r} is not a directory")
    tag = None if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random") else str(pretrained)
    if tag is None:
        return ClipWeights(model, config, None, None)
    as_file = Path(tag).expanduser()
    if as_file.is_file():
        return ClipWeights(model, config, tag, as_file)
    if as_file.suffix in _CHECKPOINT_SUFFIXES or "/" in tag:
        raise ValueError(f"missing weights: checkpoint file {tag!r} does not exist")
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"unknown weights: open_clip has no pretrained tag {tag!r} for {model!r}; known: {known}")
    # a file passed as pretrained loses the tag's settings (OpenAI's QuickGELU): restore them
    quick = bool(cfg.get("quick_gelu", False))
    # "org/name/" (default file name) or "org/name/file.bin"
    repo, filename = os.path.split(str(cfg.get("hf_hub", "")))
    filename = filename or "open_clip_pytorch_model.bin"
    if wdir is not None:
        for cand in _local_candidates(wdir, model, tag, repo or None):
            if cand.is_file():
                return ClipWeights(model, config, tag, cand, quick, repo, filename)
    cached = _hub_cached(repo, filename, wdir) if repo else None
    if cached is None and repo and wdir is not None:
        cached = _hub_cached(repo, filename, None)
    if cached is not None:
        return ClipWeights(model, config, tag, Path(cached), quick, repo, filename)
    reason = hub_unavailable()
    if reason is not None:
        # fail now, in one line, rather than after a minute of download retries
        raise ValueError(f"missing weights: open_clip {model} '{tag}' from {_where(repo, filename, cfg)} is not in "
                         f"the Hugging Face cache{' or ' + str(wdir) if wdir else ''} and {reason}; "
                         f"{_how(model, tag, repo, filename)}; {OFFLINE_ALTERNATIVES}")
    return ClipWeights(model, config, tag, None, quick, repo, filename)


def _where(repo: str, filename: str, cfg: dict) -> str:
    return f"Hugging Face {repo} ({filename})" if repo else str(cfg.get("url", "its URL"))


def _how(model: str, tag: str, repo: str, filename: str) -> str:
    return (f"get it on a machine with internet (`huggingface-cli download {repo} {filename}`) and copy the "
            "Hugging Face cache (~/.cache/huggingface/hub), or put the file in --weights-dir as "
            f"{model}-{tag}{Path(filename).suffix}, or pass a checkpoint file as --pretrained")


def load_clip_model(model: str = "ViT-B-16", pretrained: Optional[str] = "openai", *,
                    weights_dir: Union[str, Path, None] = None, device: Union[str, torch.device, None] = None,
                    image_size: Optional[int] = None) -> torch.nn.Module:
    """Build an open_clip CLIP model, finding its weights without surprises.

    Args:
        model: an open_clip model name, or the path of an open_clip model-config JSON file
            (registered with ``open_clip.add_model_config``; the file's stem is the name), which
            is how tests build tiny random models.
        pretrained: an open_clip tag ("openai", "laion2b_s34b_b88k", ...), a checkpoint file, or
            None / "none" / "random" for random weights.
        weights_dir: a folder searched first: checkpoint files named ``MODEL-TAG.{safetensors,
            bin,pt,pth}`` (or ``MODEL/TAG.*``, ``REPO-NAME/open_clip_model.safetensors``, ...), or
            a Hugging Face cache (``models--org--name/``) used as ``cache_dir``.
        device: where to put the model.
        image_size: open_clip's ``force_image_size`` (optional).

    Returns:
        the model in eval mode.

    Raises:
        ValueError: one line: unknown model or tag, or weights absent from the cache and
            ``weights_dir`` while offline (or the download failing), saying how to get them.
    """
    import open_clip

    found = locate_clip_weights(model, pretrained, weights_dir=weights_dir)
    extra = {"device": device} if device is not None else {}
    if image_size is not None:
        extra["force_image_size"] = int(image_size)
    wdir = Path(weights_dir).expanduser() if weights_dir is not None else None
    try:
        if found.tag is None:
            return open_clip.create_model(found.model, **extra).eval()
        if found.file is not None:
            quick = {"force_quick_gelu": True} if found.quick_gelu else {}
            return open_clip.create_model(found.model, pretrained=str(found.file), **quick, **extra).eval()
        try:
            return open_clip.create_model(found.model, pretrained=found.tag, cache_dir=str(wdir) if wdir else None,
                                          **extra).eval()
        except Exception as exc:  # noqa: BLE001 - download errors differ across hub versions
            reason = " ".join(str(exc).split())[:160]
            cfg = open_clip.get_pretrained_cfg(found.model, found.tag)
            raise ValueError(f"missing weights: open_clip {found.model} '{found.tag}' from "
                             f"{_where(found.repo, found.filename, cfg)} could not be loaded ({type(exc).__name__}: "
                             f"{reason}); {_how(found.model, found.tag, found.repo, found.filename)}") from None
    except ValueError:
        raise
    except (RuntimeError, OSError, KeyError) as exc:
        raise ValueError(f"cannot load open_clip {found.model} with pretrained={pretrained!r}: "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None


def resolve_repo_dir(weights: str, weights_dir: Optional[Path]) -> str:
    """A Hugging Face repo id -> a local directory in ``weights_dir`` when one holds it
    (``DIR/name``, ``DIR/org/name``, or a hub-cache snapshot ``DIR/models--org--name/snapshots/*``)."""
    if weights_dir is None or "/" not in weights or Path(weights).expanduser().exists():
        return weights
    org, name = weights.split("/", 1)
    for cand in (weights_dir / name, weights_dir / org / name):
        if cand.is_dir():
            return str(cand)
    snaps = sorted((weights_dir / f"models--{org}--{name}" / "snapshots").glob("*"))
    return str(snaps[-1]) if snaps else weights
