"""Distributed scoring (`prune(..., distributed=True)` under torchrun, gloo on the CPU):
1 and 2 processes give the same masks, every rank the same masks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ntksap
from torchrun import torchrun

HERE = Path(__file__).parent
WORKER = str(HERE / "dist_prune_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    subprocess.run([sys.executable, WORKER, str(tmp / "one")], check=True, env=env, timeout=600)
    proc = torchrun([WORKER, str(tmp / "two")], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    return {
        "one": load(tmp / "one" / "rank0.pt"),
        "r0": load(tmp / "two" / "rank0.pt"),
        "r1": load(tmp / "two" / "rank1.pt"),
    }


CASES = [
    "ntksap", "ntksap_separate", "ntksap_data", "snip", "itersnip", "grasp", "synflow", "px"
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_one_and_two_processes_give_the_same_masks(runs, case):
    """Bound: the 2-process scores are sums of the same per-draw (per-batch) float32
    gradients in another order, in float64, so they differ from 1 process's by float64
    rounding (~1e-16 relative) before the cast back to float32; a mask can differ only
    where two scores tie at the threshold to that precision. Here: no entry differs."""
    assert (runs["one"]["world"], runs["r0"]["world"], runs["r1"]["world"]) == (1, 2, 2)
    one, r0, r1 = runs["one"][case], runs["r0"][case], runs["r1"][case]
    for n, m in one["masks"].items():
        assert torch.equal(r0["masks"][n], r1["masks"][n]), (case, n)  # every rank alike
        flips = int((r0["masks"][n] != m).sum())
        assert flips == 0, f"{case} {n}: {flips} entries differ between 1 and 2 processes"
    for n, s in one["scores"].items():
        # at most one float32 rounding step apart (the float64 sums differ by ~1e-16)
        assert torch.allclose(r0["scores"][n], s, rtol=2e-7, atol=0), (case, n)
        assert torch.equal(r0["scores"][n], r1["scores"][n]), (case, n)


def test_distributed_scoring_really_splits_the_work(runs):
    """The masks agree because every draw is computed once somewhere, not because each
    rank did everything: a rank's partial sum alone gives other scores (shown in one
    process by scoring only rank 0's share)."""
    from ntksap.scoring import ScoreContext
    from ntksap.scoring.ntksap import ntksap_round_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    params = dict(model.named_parameters())
    opts = ntksap.get_method("ntksap").resolve_options(
        {"num_samples": 6, "batch_size": 2, "resamples": 2, "init": "reset"}
    )

    class Alone(ScoreContext):
        """A rank without its peers: its partial sum, not reduced."""

        def all_reduce_(self, tensors):
            pass

        def broadcast_int(self, value):
            return value

    def grads(rank: int, world: int) -> dict[str, torch.Tensor]:
        ctx = Alone(
            model, {n: params[n] for n in ("1.weight", "3.weight")},
            {n: torch.ones_like(params[n], dtype=torch.bool) for n in ("1.weight", "3.weight")},
            None, (3, 2, 2), torch.device("cpu"), options=dict(opts), rank=rank,
            world_size=world,
        )  # fmt: skip
        torch.manual_seed(3)
        return ntksap_round_gradients(ctx)

    full, part0, part1 = grads(0, 1), grads(0, 2), grads(1, 2)
    for n in full:
        assert not torch.allclose(part0[n], full[n])
        # the parts add up to the whole (what all_reduce does across processes)
        assert torch.allclose(part0[n] + part1[n], full[n], rtol=1e-12, atol=0)


def test_distributed_without_a_process_group_is_a_clear_error():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="torchrun"):
        ntksap.prune(net, "magnitude", sparsity=0.5, distributed=True)
