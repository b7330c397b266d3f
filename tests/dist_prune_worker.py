"""Prunes with every data-reading and data-free method; run plainly or under torchrun.

    python tests/dist_prune_worker.py OUT                                   # 1 process
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_prune_worker.py OUT

Each rank joins the gloo group (when launched by torchrun), calls `ntksap.prune(...,
distributed=True)` (or plainly with 1 process) and `compute_scores` with the same
arguments, and writes OUT/rank{r}.pt: masks and raw first-round scores per method. Used by
tests/test_distributed_scoring.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import ntksap
from ntksap.training import distributed

SHAPE = (3, 8, 8)
CLASSES = 4


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES),
    )  # fmt: skip


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n class-balanced batches of 8 images (3 batches: rank 0 gets 2, rank 1 gets 1)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn((8, *SHAPE), generator=g), torch.arange(8) % CLASSES) for _ in range(n)]


#: method -> prune keywords: NTK-SAP with 3 resamples x 3 noise batches = 9 draws a round
#: (5 on rank 0, 4 on rank 1), and both BatchNorm rules.
CASES = {
    "ntksap": {"rounds": 3, "resamples": 3, "num_samples": 20, "batch_size": 8},
    "ntksap_separate": {"rounds": 2, "resamples": 2, "num_samples": 16, "batch_size": 8,
                        "bn_pass": "separate"},
    "ntksap_data": {"rounds": 2, "resamples": 2, "num_samples": 12, "batch_size": 8,
                    "inputs": "data"},
    "snip": {},
    "itersnip": {"rounds": 3},
    "grasp": {},
    "synflow": {"rounds": 5},
    "px": {"rounds": 3},
}  # fmt: skip


def main(out: Path) -> None:
    env = distributed.setup("cpu")
    dist = env.distributed
    result: dict[str, object] = {"world": env.world_size}
    for case, kw in CASES.items():
        method = case.split("_")[0]
        data = batches() if ntksap.get_method(method).needs_data_for(kw) else None
        masks = ntksap.prune(
            net(), method, sparsity=0.8, input_shape=SHAPE, data=data, seed=5,
            distributed=dist, **kw,
        )  # fmt: skip
        first = {k: v for k, v in kw.items() if k != "rounds"}
        scores = ntksap.compute_scores(
            net(), method, input_shape=SHAPE, data=data, seed=5, distributed=dist, **first
        )
        result[case] = {"masks": dict(masks), "scores": scores}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{env.rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
