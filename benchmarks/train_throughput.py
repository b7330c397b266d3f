"""Training throughput (images/s) of a pruned CIFAR ResNet-20, ntksap vs a plain PyTorch loop.

Both train the same ResNet-20 with the same 98.2 %-sparse mask on the same CIFAR-shaped
uint8 images (synthetic pixels: throughput does not depend on them), batch 128, SGD
momentum 0.9, weight decay 1e-4, with random-crop (4-pixel padding) + flip augmentation.

baseline ("the loop users write today", measured in the same run):
    masks attached with torch.nn.utils.prune.custom_from_mask; a Dataset whose __getitem__
    pads, crops, flips and normalises ONE image (numpy, as torchvision's transforms do);
    a DataLoader with shuffle. Measured with 0 and with 2 workers; the faster is the baseline.
ntksap:
    masks attached with ntksap.apply_masks (parametrize); data held as one uint8 tensor,
    augmented per batch in tensor ops (ntksap.data.make_loader); ntksap.training's step.
    Variants: float32 NCHW, + channels_last, + bfloat16 autocast (on CPUs with AVX-512 BF16
    or on GPU).

    python benchmarks/train_throughput.py                 # CPU
    python benchmarks/train_throughput.py --device cuda   # GPU

Prints images/s per variant and the ratio to the baseline; writes JSON evidence to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import cpu_name
from torch.nn.utils import prune as torch_prune

import ntksap
from ntksap import data, models
from ntksap.data.base import DatasetInfo, TensorImageDataset
from ntksap.training import TrainConfig
from ntksap.training.loop import train_one_epoch

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class PerImageCifar(torch.utils.data.Dataset):
    """What a typical script does: one HWC uint8 image at a time, numpy transforms."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images_hwc, labels  # (N, 32, 32, 3) uint8, (N,)
        self.mean = np.array(MEAN, dtype=np.float32)
        self.std = np.array(STD, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = np.pad(self.images[i], ((4, 4), (4, 4), (0, 0)))  # RandomCrop(32, padding=4)
        top, left = np.random.randint(0, 9, size=2)
        img = img[top : top + 32, left : left + 32]
        if np.random.rand() < 0.5:  # RandomHorizontalFlip
            img = img[:, ::-1]
        x = (img.astype(np.float32) / 255.0 - self.mean) / self.std  # ToTensor + Normalize
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batches, warmup: int, steps: int, device) -> float:
    """images/s over `steps` training steps after `warmup` steps."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    _sync(device)
    t = time.perf_counter()
    n = 0
    for _ in range(steps):
        x, y = next(it)
        step(x, y)
        n += len(y)
    _sync(device)
    return n / (time.perf_counter() - t)


def baseline_run(net, masks, images_hwc, labels, workers, device, warmup, steps) -> float:
    net = copy.deepcopy(net).to(device)
    for name, m in masks.items():
        mod = net.get_submodule(name.rpartition(".")[0])
        torch_prune.custom_from_mask(mod, "weight", m.to(device))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        PerImageCifar(images_hwc, labels), batch_size=128, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
    )  # fmt: skip
    net.train()

    def batches():
        while True:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def step(x, y):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_steps(step, batches(), warmup, steps, device)


def ntksap_run(net, masks, ds, device, channels_last, amp, warmup, steps) -> float:
    net = ntksap.apply_masks(copy.deepcopy(net), masks).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    cfg = TrainConfig(epochs=1000, batch_size=128, lr=0.1, weight_decay=1e-4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    loader = data.make_loader(ds, batch_size=128, train=True, device=device, seed=0, augment=True)

    class Window:  # feeds train_one_epoch exactly `n` batches per call, cycling epochs
        def __init__(self, n: int) -> None:
            self.n, self.epoch = n, 0

        def __len__(self) -> int:
            return self.n

        def __iter__(self):
            done = 0
            while done < self.n:
                loader.set_epoch(self.epoch)
                self.epoch += 1
                for batch in loader:
                    yield batch
                    done += 1
                    if done == self.n:
                        return

        def set_epoch(self, _e: int) -> None:
            pass

    run = dict(optimizer=opt, scheduler=sched, scaler=scaler, cfg=cfg, device=device,
               amp=amp, channels_last=channels_last)  # fmt: skip
    train_one_epoch(net, Window(warmup), **run)
    _sync(device)
    t = time.perf_counter()
    train_one_epoch(net, Window(steps), **run)
    _sync(device)
    return steps * 128 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=6400)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results") / "train_throughput.json"
    )
    args = ap.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    net = models.create("resnet20", num_classes=10)
    masks = ntksap.prune(net, "magnitude", sparsity=0.982)  # the mask's method does not matter
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    info = DatasetInfo("cifar-shaped", 10, (3, 32, 32), MEAN, STD, crop_padding=4)
    ds = TensorImageDataset(images, labels, info, "train")
    images_hwc = images.permute(0, 2, 3, 1).contiguous().numpy()

    bf16 = device.type == "cuda" or "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    variants = {
        "baseline, 0 workers": lambda: baseline_run(
            net, masks, images_hwc, labels.numpy(), 0, device, args.warmup, args.steps
        ),
        "baseline, 2 workers": lambda: baseline_run(
            net, masks, images_hwc, labels.numpy(), 2, device, args.warmup, args.steps
        ),
        "ntksap fp32": lambda: ntksap_run(
            net, masks, ds, device, False, False, args.warmup, args.steps
        ),
        "ntksap fp32 channels_last": lambda: ntksap_run(
            net, masks, ds, device, True, False, args.warmup, args.steps
        ),
    }
    if bf16:
        variants["ntksap bf16 autocast"] = lambda: ntksap_run(
            net, masks, ds, device, False, True, args.warmup, args.steps
        )
        variants["ntksap bf16 channels_last"] = lambda: ntksap_run(
            net, masks, ds, device, True, True, args.warmup, args.steps
        )
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):  # interleaved, so drift in machine load hits all alike
        for name, fn in variants.items():
            runs[name].append(fn())
            print(f"repeat {r + 1} {name:28s} {runs[name][-1]:8.0f} img/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    base_name = max(("baseline, 0 workers", "baseline, 2 workers"), key=lambda k: med[k])
    print(f"\nbaseline = {base_name}: {med[base_name]:.0f} img/s (median of {args.repeats})")
    rows = []
    for name, v in med.items():
        ratio = v / med[base_name]
        rows.append(
            {
                "variant": name,
                "images_per_s_runs": [round(x, 1) for x in runs[name]],
                "median_images_per_s": round(v, 1),
                "ratio_to_baseline": round(ratio, 2),
            }
        )
        print(f"{name:28s} {v:8.0f} img/s   x{ratio:.2f}")
    evidence = {
        "benchmark": "train_throughput",
        "model": "resnet20, 98.2% sparse (global magnitude mask)",
        "batch_size": 128,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "baseline": base_name,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(evidence, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
