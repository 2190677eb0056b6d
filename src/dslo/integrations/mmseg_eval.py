"""Evaluation through mmseg: ``run_eval`` runs ``Runner.test`` on one benchmark with mmseg's
dataset and ``IoUMetric`` from the complete config ``eval_config`` builds; ``DsloUnwrapped``
(registered in mmengine's ``MODEL_WRAPPERS`` when this module is imported) keeps the Runner
from wrapping the model in ``DistributedDataParallel``; a rich progress bar over the test
iterations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .mmseg_compat import import_mmseg

import_mmseg()  # the mmcv.ops stand-in before the first mmseg import

from mmengine.registry import MODEL_WRAPPERS  # noqa: E402

from .experiments import BENCHMARK_DATA, canonical_dataset  # noqa: E402
from .mmseg_data import dataset_config  # noqa: E402

__all__ = ["DsloUnwrapped", "eval_config", "run_eval"]


@MODEL_WRAPPERS.register_module(force=True)
class DsloUnwrapped:
    """``model_wrapper_cfg=dict(type="DsloUnwrapped")``: under a distributed launcher, run the
    model as is on each rank. The Runner would wrap it in ``DistributedDataParallel``, which
    is for training (it refuses CPU modules given device ids, and needs gradients); testing
    only needs each rank to predict its shard, and ``IoUMetric`` gathers the results."""

    def __new__(cls, module: torch.nn.Module, **kwargs) -> torch.nn.Module:
        return module


def eval_config(dataset: str, data_root: Union[str, Path], model: Mapping, *, work_dir: Union[str, Path],
                limit: Optional[int] = None, output_dir: Union[str, Path, None] = None,
                launcher: str = "none") -> dict:
    """A complete mmengine config for ``Runner.test`` of ``model`` on one benchmark."""
    return dict(
        default_scope="mmseg",
        custom_imports=dict(imports=["dslo.integrations.mmseg"], allow_failed_imports=False),
        model=dict(model),
        test_dataloader=dict(batch_size=1, num_workers=0, persistent_workers=False,
                             sampler=dict(type="DefaultSampler", shuffle=False),
                             dataset=dataset_config(dataset, data_root, limit=limit)),
        test_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"],
                            output_dir=None if output_dir is None else str(output_dir)),
        test_cfg=dict(type="TestLoop"),
        model_wrapper_cfg=dict(type="DsloUnwrapped"),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if torch.cuda.is_available() else "gloo")),
        default_hooks=dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=50)),
        log_level="ERROR",  # mmengine warns about IoUMetric without a prefix on every run
        launcher=launcher,
        work_dir=str(work_dir),
    )


class _ProgressHook:
    """A rich progress bar over the test iterations (an mmengine hook, built lazily)."""

    @staticmethod
    def build(total: int, description: str):
        from mmengine.hooks import Hook
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        class RichProgress(Hook):
            priority = "VERY_LOW"

            def before_test(self, runner) -> None:
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeRemainingColumn(), transient=True)
                self.progress.start()
                self.task = self.progress.add_task(description, total=total)

            def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
                self.progress.advance(self.task)

            def after_test(self, runner) -> None:
                self.progress.stop()

        return RichProgress()


def run_eval(dataset: str, data_root: Union[str, Path], model: Mapping, *, work_dir: Union[str, Path],
             limit: Optional[int] = None, output_dir: Union[str, Path, None] = None,
             progress: bool = False) -> dict:
    """Evaluate ``model`` (an mmseg model config, e.g. ``dict(type="OVSSSegmentor", ...)``) on
    one benchmark with mmseg's dataset, ``IoUMetric`` and ``Runner.test``.

    ``model["device"]`` ("cpu", "cuda", "cuda:N"; optional) is where the model is built and
    evaluated. Without it the model is built on the CPU and the Runner moves it to its own
    device (the GPU when there is one).

    Returns:
        mmseg's metrics: ``{"aAcc", "mIoU", "mAcc"}`` in percent (rounded to 2 decimals by
        mmseg), plus the number of images under ``"images"``.
    """
    from mmengine.config import Config
    from mmengine.runner import Runner

    from .experiments import _layout_ids

    key = canonical_dataset(dataset)
    layout = BENCHMARK_DATA.get(key)
    if layout is None:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(BENCHMARK_DATA)}")
    root = Path(data_root) / layout.root
    # mmengine fails on an empty dataset with "need at least one array to concatenate"
    if not (root / layout.img_dir).is_dir() or not _layout_ids(root, layout):
        raise ValueError(f"dataset {key}: no {layout.img_suffix} images with {layout.seg_suffix} label maps under "
                         f"{root} (mmseg layout: {layout.img_dir}/, {layout.ann_dir}/)")
    if layout.split is not None and not (root / layout.split).is_file():
        raise ValueError(f"dataset {key}: the split file {root / layout.split} is missing")
    launcher = "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    if output_dir is not None:
        # IoUMetric creates it on rank 0 only; other ranks may save their first image earlier
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    cfg = Config(eval_config(key, data_root, model, work_dir=work_dir, limit=limit, output_dir=output_dir,
                             launcher=launcher))
    try:
        runner = Runner.from_cfg(cfg)
        device = model.get("device")
        if device is not None:
            # the Runner moves every model to its device type ("cuda" = the current GPU) while
            # building; an explicit device (the CPU on a GPU machine, or another GPU) wins
            runner.model.to(device)
        total = len(runner.test_dataloader.dataset)  # builds the dataset (mmengine is lazy)
        if progress:
            runner.register_hook(_ProgressHook.build(total, key))
        metrics = runner.test()
    except (FileNotFoundError, AssertionError) as exc:  # mmseg's dataset checks are asserts
        raise ValueError(f"dataset {key}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    return {**{k: float(v) for k, v in metrics.items()}, "images": total}
