"""Trains a pruned MLP for 2 epochs; run plainly (1 process) or under torchrun (DDP, gloo).

    python tests/ddp_worker.py OUT                                  # one process, batch 64
    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT   # 2 x 32

Each rank writes OUT/rank{r}.pt with its final state_dict and masks. Used by
tests/test_training.py::test_ddp_two_ranks_match_one_process_with_the_doubled_batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import ntksap
from ntksap import data, models
from ntksap.training import TrainConfig, distributed, fit

GLOBAL_BATCH = 64


def main(out: Path) -> None:
    env = distributed.setup("cpu")
    torch.manual_seed(0)
    model = models.create("mlp", num_classes=4, in_channels=1, input_size=8, hidden=(32, 16))
    local = None
    if env.is_main:  # prune on rank 0 only; the other rank receives the masks
        local = ntksap.prune(model, "ntksap", sparsity=0.8, input_shape=(1, 8, 8), rounds=2)
    shapes = {n: p.shape for n, p in ntksap.prunable_parameters(model).items()}
    masks = distributed.broadcast_masks(dict(local) if local else None, shapes, env)
    ntksap.apply_masks(model, masks)
    ds = data.create("synthetic", num_classes=4, input_shape=(1, 8, 8), size=512, seed=0)
    loader = data.make_loader(
        ds, batch_size=GLOBAL_BATCH // env.world_size, train=True, device="cpu", seed=0,
        rank=env.rank, world_size=env.world_size,
    )  # fmt: skip
    cfg = TrainConfig(
        epochs=2, batch_size=GLOBAL_BATCH, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=(1,)
    )
    fit(model, loader, None, cfg, env=env, log=lambda _m: None)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(
        {"state": state, "masks": masks, "world": env.world_size}, out / f"rank{env.rank}.pt"
    )
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
