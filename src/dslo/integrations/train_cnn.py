"""Train the small CNN segmenter (``dslo.adapters.cnn``) on annotated frames, on the CPU.

    python -m dslo.integrations.train_cnn --data DATA/camvid367 \
        --match 0001TP,0006R0 --out results/models/camvid_cnn.pt

Trains from scratch (no pretrained weights exist offline): Adam with cosine decay,
median-frequency class weights (thin classes such as pole and sign are rare), horizontal
flips and colour jitter; loss on the scores bilinearly upsampled to the network's input
resolution. The file records what made it (data folder, ids digest, epochs, seed, the
command, seconds, dslo version) and ``CNNAdapter.load`` checks its digest.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..adapters.cnn import CNNAdapter, TinySegNet, cnn_input
from .bench import load_dataset

__all__ = ["train_cnn", "main"]


def _frames(dataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All frames as network inputs (K, 5, 8h, 8w) and labels (K, 8h, 8w) (255 = ignore)."""
    xs, ys = [], []
    for sid in dataset.ids:
        s = dataset.load(sid)
        x, _ = cnn_input(s.image.unsqueeze(0), size)
        y = F.interpolate(s.mask[None, None].float(), size=x.shape[-2:], mode="nearest")[0, 0].long()
        xs.append(x[0])
        ys.append(y)
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"train_cnn: frames of one size expected (one batch shape), got {sorted(shapes)}")
    return torch.stack(xs), torch.stack(ys)


def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Median-frequency balancing: w_c = median(freq) / freq_c (absent classes: 0)."""
    valid = labels[labels < num_classes]
    freq = torch.bincount(valid, minlength=num_classes).float()
    present = freq > 0
    w = torch.zeros(num_classes)
    w[present] = freq[present].median() / freq[present]
    return w


def train_cnn(
    data,
    *,
    match: Optional[Sequence[str]] = None,
    epochs: int = 16,
    batch: int = 8,
    lr: float = 3e-3,
    width: int = 48,
    size: int = 518,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> CNNAdapter:
    """Train ``TinySegNet`` on a folder of images and masks.

    Args:
        data: folder in the ``images/ masks/ classes.txt`` layout.
        match: id prefixes to train on (hold out other sequences for evaluation).
        epochs, batch, lr, width: optimisation and network size.
        size: the ViT long side whose patch grid the output matches.
        seed: makes the run repeatable (initialisation, shuffling, augmentation).
        log: called with one progress line per epoch.

    Returns:
        a ``CNNAdapter`` (eval mode) whose ``about`` says what made it.
    """
    torch.manual_seed(seed)
    dataset = load_dataset(data, match=match)
    started = time.perf_counter()
    x, y = _frames(dataset, size)
    c = len(dataset.classes)
    y[y >= c] = 255
    weights = _class_weights(y, c)
    net = TinySegNet(c, width=width)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            xb, yb = x[idx].clone(), y[idx].clone()
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip, :3] = xb[flip, :3].flip(-1)
            yb[flip] = yb[flip].flip(-1)
            gain = 1 + 0.2 * (torch.rand(len(idx), 1, 1, 1, generator=gen) - 0.5)
            shift = 0.2 * (torch.rand(len(idx), 3, 1, 1, generator=gen) - 0.5)
            xb[:, :3] = xb[:, :3] * gain + shift
            out = F.interpolate(net(xb), size=yb.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(out, yb, weight=weights, ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f} ({time.perf_counter() - started:.0f} s)")
    from .. import __version__

    ids_digest = hashlib.sha256("\n".join(dataset.ids).encode()).hexdigest()[:16]
    about = {"data": str(Path(data)), "match": list(match or []), "frames": len(dataset.ids),
             "ids_sha256": ids_digest, "epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
             "seconds": round(time.perf_counter() - started, 1), "dslo": __version__,
             "torch": str(torch.__version__)}
    return CNNAdapter(net.eval(), dataset.classes, size=size, about=about)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m dslo.integrations.train_cnn --data DIR --out FILE``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dslo.integrations.train_cnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with images/, masks/, classes.txt")
    p.add_argument("--match", default="", help="comma-separated id prefixes to train on")
    p.add_argument("--out", required=True, help="weights file to write")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    match = [m for m in a.match.split(",") if m] or None
    adapter = train_cnn(a.data, match=match, epochs=a.epochs, seed=a.seed,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    adapter.about["command"] = "python -m dslo.integrations.train_cnn " + " ".join(argv if argv is not None else sys.argv[1:])
    adapter.save(a.out)
    print(f"wrote {a.out} ({adapter.about['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
