"""Shared tiny models and data for the pruning tests (all run in well under a second)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntksap

INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 5

# The paper's grid: density 0.8^k for k = 2, 4, ..., 18 (sparsity 36% .. 98.2%).
PAPER_DENSITIES = [0.8**k for k in range(2, 19, 2)]

# Fast settings per method for tests that loop over every method.
FAST_OPTIONS: dict[str, dict] = {
    "ntksap": {"num_samples": 8, "batch_size": 4},
}


def small_convnet() -> nn.Module:
    """Conv-BN-ReLU x2 + a shortcut-free head; 3x8x8 input, 5 logits."""
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),  # (N, 6, 8, 8)
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),  # (N, 8, 4, 4)
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )


def class_balanced_batch(
    n_per_class: int = 2, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat(n_per_class)
    x = torch.randn((len(y), *INPUT_SHAPE), generator=g)
    return [(x, y)]


def prune_fast(model: nn.Module, method: str, **kw) -> ntksap.Masks:
    """`prune` with the test data, shape and fast options for `method`."""
    kw.setdefault("input_shape", INPUT_SHAPE)
    kw.setdefault("data", class_balanced_batch())
    if not ntksap.get_method(method).needs_data:
        kw["data"] = None
    kw.setdefault("rounds", min(ntksap.get_method(method).default_rounds, 3))
    return ntksap.prune(model, method, **{**FAST_OPTIONS.get(method, {}), **kw})


@pytest.fixture
def convnet() -> nn.Module:
    return small_convnet()


@pytest.fixture
def batches():
    return class_balanced_batch()


def run_cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ntksap ARGV` (items made str); argparse's SystemExit
    becomes its code."""
    from ntksap.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def pooled_bn_net() -> nn.Module:
    """Two conv-BN-ReLU blocks, a global average pool and a Linear(4, 3), float64, seeded;
    the second BN's beta is 0.5 (input (N, 2, H, W)): the network where px's path kernel on
    all-ones images in train mode cannot see the convs."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()  # fmt: skip
    with torch.no_grad():
        net[4].bias.fill_(0.5)
    return net
