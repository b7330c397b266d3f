"""CPU time of px's default on CIFAR ResNet-20: float32 with a wide (float64) jvf vs float64.

With eval-mode norm layers (px's default) the all-ones jvf copy of ResNet-20 reaches
|z1| ~ 1e46, beyond float32. precision="auto" computes only z1 in float64 and scales it by a
power of two (pk, its gradient and the scores stay float32); precision="float64" computes
every pass in float64 (what "auto" did before). Same masks (tests/test_px.py); this measures
the cost. Process CPU time on one thread, so other jobs on the machine distort it less than
wall time; the two variants are interleaved.

    python benchmarks/px_precision_time.py            # 5 rounds, 100 images, 2 repetitions
"""

from __future__ import annotations

import argparse
import time

import torch

import ntksap
from ntksap.models import create


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create("resnet20", num_classes=10)
    data = [(torch.randn(args.images, 3, 32, 32), torch.arange(args.images) % 10)]
    seconds: dict[str, list[float]] = {"auto": [], "float64": []}
    masks = {}
    for _ in range(args.repeat):
        for precision in seconds:
            started = time.process_time()
            masks[precision] = ntksap.prune(
                model, "px", data=data, sparsity=0.98, rounds=args.rounds, precision=precision
            )
            seconds[precision].append(time.process_time() - started)
    best = {k: min(v) for k, v in seconds.items()}
    same = masks["auto"] == masks["float64"]
    print(
        f"ResNet-20, {args.images} images, {args.rounds} rounds, 1 thread, CPU seconds (best "
        f"of {args.repeat}): auto {best['auto']:.2f}, float64 {best['float64']:.2f}, "
        f"ratio {best['float64'] / best['auto']:.2f}x; same masks: {same}"
    )


if __name__ == "__main__":
    main()
