"""Memory and time of the SD2 attention capture on an SD2-base-sized UNet (random weights, CPU).

Builds a ``UNet2DConditionModel`` with stabilityai/stable-diffusion-2-base's UNet configuration
(written out below; random float32 weights: no download needed), feeds random 64 x 64 latents
(= a 512 x 512 image; the VAE is skipped) and the zero prompt embedding through
``dslo.attention.sd2.unet_self_attention``, and prints, for each variant:

- seconds per image: median of ``--repeats`` runs (batch 1), wall clock and process CPU time
  (CPU seconds summed over threads: steadier than wall time on a shared machine, where other
  processes stretch the wall time);
- peak resident memory of the process during the variant (Linux: VmHWM, reset before each
  variant through /proc/self/clear_refs; elsewhere ``ru_maxrss``, a process-wide high-water
  mark, so only the first variant's number is meaningful there), and the increase over the
  resident memory after building the UNet (the weights alone: ~3.5 GB in float32).

Variants: a plain UNet forward (no capture, the reference), the default capture (up_blocks.1 +
up_blocks.2, stopping the UNet after up_blocks.2), the same without stopping early, and all
three attention up blocks (up_blocks.1-3, 64 x 64 maps included).

    PYTHONPATH=src python benchmarks/sd2_memory.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    import dslo  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dslo.attention.sd2 import unet_self_attention, unet_self_attention_levels  # noqa: E402

#: stabilityai/stable-diffusion-2-base, unet/config.json (diffusers names; attention_head_dim is
#: the number of heads per level: 64 channels per head everywhere).
SD2_BASE_UNET = dict(
    act_fn="silu",
    attention_head_dim=(5, 10, 20, 20),
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1,
    dual_cross_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True,
    upcast_attention=False,
)

GIB = 1024**3


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int:
    value = _status("VmRSS")
    return value if value is not None else _maxrss()


def _maxrss() -> int:
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _peak(can_reset: bool) -> int:
    value = _status("VmHWM") if can_reset else None
    return value if value is not None else _maxrss()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--variants", nargs="*", default=["plain", "default", "default-full", "up-all"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads "
        f"{torch.get_num_threads()}, cpus {os.cpu_count()}, python {platform.python_version()}"
    )
    rss0 = _rss()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = diffusers.UNet2DConditionModel(**SD2_BASE_UNET).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    rss_model = _rss()
    print(
        f"SD2-base UNet: {params / 1e6:.1f} M parameters, float32, built in {build_s:.1f} s; "
        f"RSS {rss0 / GIB:.2f} GiB before, {rss_model / GIB:.2f} GiB after building"
    )

    latents = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))
    prompt = torch.zeros(1, 77, SD2_BASE_UNET["cross_attention_dim"])
    blocks_all = {"up_blocks.1": 1, "up_blocks.2": 1, "up_blocks.3": 1}

    levels = unet_self_attention_levels(
        unet, torch.randn(1, 4, 16, 16), prompt, blocks=blocks_all, stop_early=True
    )
    scale = args.latent // 16
    print(
        "grids at a %dx%d latent (%d px): %s" % (
            args.latent, args.latent, args.latent * 8,
            ", ".join(
                f"up_blocks.{i}: {g[0] * scale}x{g[1] * scale}"
                for i, (g, _, _) in zip((3, 2, 1), levels)
            ),
        )
    )

    def plain():
        with torch.no_grad():
            unet(latents, 0, encoder_hidden_states=prompt, return_dict=False)
        return None

    variants = {
        "plain": ("plain UNet forward (reference, no capture)", plain),
        "default": (
            "capture up_blocks.1 + up_blocks.2 (default; stops after up_blocks.2)",
            lambda: unet_self_attention(unet, latents, prompt),
        ),
        "default-full": (
            "capture up_blocks.1 + up_blocks.2, full forward (stop_early=False)",
            lambda: unet_self_attention(unet, latents, prompt, stop_early=False),
        ),
        "up-all": (
            "capture up_blocks.1 + 2 + 3 (64x64 maps included)",
            lambda: unet_self_attention(unet, latents, prompt, blocks=blocks_all),
        ),
    }
    can_reset = _reset_peak()
    if not can_reset:
        print("note: cannot reset the peak RSS here; peaks are process-wide high-water marks")
    print(
        f"{'variant':<14} {'wall s (median)':>15} {'wall runs':>20} {'cpu s (median)':>15} "
        f"{'peak RSS':>10} {'over model':>11}  grid"
    )
    for key in args.variants:
        label, fn = variants[key]
        _reset_peak()
        base = _rss()
        times, cpu = [], []
        out = None
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        peak = _peak(can_reset)
        grid = f"{out.grid[0]}x{out.grid[1]}" if out is not None else "-"
        runs = ", ".join(f"{s:.2f}" for s in times)
        print(
            f"{key:<14} {statistics.median(times):>15.2f} {runs:>20} {statistics.median(cpu):>15.2f} "
            f"{peak / GIB:>8.2f}Gi "
            f"{(peak - base) / GIB:>9.2f}Gi  {grid}   # {label}"
        )
        del out


if __name__ == "__main__":
    main()
