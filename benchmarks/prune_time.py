"""Wall time of every pruning method on CIFAR ResNet-20 at 98.2 % sparsity, paper settings.

Settings (algorithm.md): ntksap T=20, R=5, 100 Gaussian noise images in one batch;
synflow T=100; itersnip T=100 and snip/grasp T=1 on a class-balanced batch of 100
CIFAR-shaped images (10 x classes; synthetic here: the timing does not depend on pixel values);
random and magnitude T=1.

The baseline, measured in the same run, is one dense training step of ResNet-20 on the same
100 images (forward + backward, train mode). Each method's time is printed as a ratio to it
("dense-step equivalents"), which is comparable across machines.

    python benchmarks/prune_time.py                     # all methods, 1 run each
    python benchmarks/prune_time.py --repeats 3 --methods ntksap,synflow --device cuda

Writes JSON evidence (runs, mean, spread, hardware, versions) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from _common import cpu_name

import ntksap
from ntksap import models

PAPER = {
    "ntksap": {"rounds": 20, "resamples": 5, "num_samples": 100, "batch_size": 256},
    "synflow": {"rounds": 100},
    "itersnip": {"rounds": 100},
    "snip": {"rounds": 1},
    "grasp": {"rounds": 1},
    "random": {"rounds": 1},
    "magnitude": {"rounds": 1},
}
SPARSITY = 0.982
SHAPE = (3, 32, 32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_step_seconds(net, x, y, device, repeats: int = 5) -> list[float]:
    """Forward + backward of the dense model on the batch (the baseline unit of work)."""
    net = net.to(device).train()
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        _sync(device)
        if i:  # the first call warms up
            times.append(time.perf_counter() - t)
        net.zero_grad(set_to_none=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", default=",".join(ntksap.list_methods()))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results") / "prune_time.json"
    )
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        ntksap.get_method(m)  # unknown names fail here, before any timing
    device = torch.device(args.device)
    # collapse is recorded per method in the JSON ("collapsed"); no need to warn as well
    warnings.simplefilter("ignore", ntksap.LayerCollapseWarning)

    net = models.create("resnet20", num_classes=10).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((100, *SHAPE), generator=g).to(device)
    y = torch.arange(10).repeat(10).to(device)  # class-balanced: 10 per class
    base = dense_step_seconds(copy.deepcopy(net), x, y, device)
    base_s = statistics.median(base)
    print(f"baseline: dense ResNet-20 fwd+bwd on 100 images: {base_s * 1e3:.1f} ms (median of 5)")

    rows = []
    for m in methods:
        kw = dict(PAPER[m])
        if ntksap.get_method(m).needs_data:
            kw["data"] = [(x, y)]
        runs = []
        for r in range(args.repeats):
            _sync(device)
            t = time.perf_counter()
            masks = ntksap.prune(net, m, sparsity=SPARSITY, input_shape=SHAPE, seed=r, **kw)
            _sync(device)
            runs.append(time.perf_counter() - t)
        mean = statistics.fmean(runs)
        row = {
            "method": m,
            "settings": PAPER[m],
            "runs_s": [round(v, 4) for v in runs],
            "mean_s": round(mean, 4),
            "stdev_s": round(statistics.stdev(runs), 4) if len(runs) > 1 else None,
            "dense_step_equivalents": round(mean / base_s, 1),
            "kept": masks.num_kept,
            "collapsed": masks.collapsed(),
        }
        rows.append(row)
        print(
            f"{m:10s} {mean:9.2f} s  = {row['dense_step_equivalents']:8.1f} x dense step"
            f"  (runs {row['runs_s']}, kept {masks.num_kept:,})",
            flush=True,
        )

    evidence = {
        "benchmark": "prune_time",
        "model": "resnet20 (CIFAR, 10 classes)",
        "sparsity": SPARSITY,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "baseline_dense_step_s": [round(v, 5) for v in base],
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(evidence, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
