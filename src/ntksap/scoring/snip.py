"""SNIP (Lee et al. 2019) and iterative SNIP: |dL/dm| on real batches, model in train mode.

With effective weights `w = theta * m`, dL/dm_j = (dL/dw_j) * theta_j, so at m = 1 the SNIP
score is |g * theta|. Iterative SNIP recomputes it at the current mask every round.
"""

from __future__ import annotations

import torch

from ntksap.scoring.base import (
    ScoreContext,
    Scores,
    register_method,
    summed_batch_gradients,
)


def connection_sensitivity(ctx: ScoreContext) -> Scores:
    """|d(sum_b CE_b)/dm| at the current mask, gradients summed over all batches first
    (in float64; split across the ranks of a distributed job)."""
    ctx.model.train()  # BatchNorm normalises with each batch's statistics, as the reference
    theta = {n: p.detach() for n, p in ctx.params.items()}
    m = {n: v.requires_grad_(True) for n, v in ctx.mask_float().items()}

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = {n: theta[n] * m[n] for n in theta}  # per batch: each backward frees its graph
        return torch.nn.functional.cross_entropy(ctx.forward(w, x), y)

    grads = summed_batch_gradients(ctx, loss, list(m.values()))
    return {n: g.abs().to(ctx.dtype) for n, g in zip(m, grads)}


@register_method(
    "snip", needs_data=True, default_rounds=1, summary="|g * theta| on a real batch (Lee 2019)"
)
def snip_scores(ctx: ScoreContext) -> Scores:
    """SNIP connection sensitivity |dL/dm| at m = 1, one round."""
    return connection_sensitivity(ctx)


@register_method(
    "itersnip",
    needs_data=True,
    default_rounds=100,
    summary="SNIP recomputed at the current mask every round",
)
def itersnip_scores(ctx: ScoreContext) -> Scores:
    """Iterative SNIP: |dL/dm| at the current mask, T rounds (default 100)."""
    return connection_sensitivity(ctx)
