"""Data-free, weight-only baselines: random and magnitude."""

from __future__ import annotations

import torch

from ntksap.scoring.base import ScoreContext, Scores, register_method


@register_method("random", default_rounds=1, summary="N(0,1) score per weight (data-free)")
def random_scores(ctx: ScoreContext) -> Scores:
    """A fresh N(0, 1) draw per weight: uniform random pruning at every layer's share."""
    # float32 whatever the model's dtype: the same seed gives the same mask for every dtype
    return {
        n: torch.randn(p.shape, device=p.device, dtype=torch.float32) for n, p in ctx.params.items()
    }


@register_method("magnitude", default_rounds=1, summary="|theta| at initialisation (data-free)")
def magnitude_scores(ctx: ScoreContext) -> Scores:
    """|theta|: keep the largest initial weights."""
    return {n: p.detach().abs() for n, p in ctx.params.items()}
