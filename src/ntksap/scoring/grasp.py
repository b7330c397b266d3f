"""GraSP (Wang, Zhang, Grosse 2020): keep the largest theta * (H g).

g is the gradient of the cross-entropy of logits / T (T = 200, the reference temperature)
with respect to the effective weights, summed over the data's batches; H is the Hessian of
the same loss. The paper scores S = -theta * Hg and removes its largest values, which is
the same ranking as keeping the largest theta * Hg.

H g is computed as a Hessian-vector product by double backward: d/dw (grad_w L . g_const).
"""

from __future__ import annotations

import torch

from ntksap.scoring.base import (
    Option,
    ScoreContext,
    Scores,
    cross_entropy_sum_over_batches,
    register_method,
)


@register_method(
    "grasp",
    needs_data=True,
    default_rounds=1,
    options=[
        Option(
            "temperature",
            200.0,
            float,
            "T in the cross-entropy of logits / T (the reference's 200)",
            low=0.0,
            low_open=True,
        )
    ],
    summary="theta * Hg, gradient-flow preservation (Wang 2020)",
)
def grasp_scores(ctx: ScoreContext) -> Scores:
    """theta * (H g) at the current mask; keep the largest."""
    ctx.model.train()  # as the reference: BatchNorm with batch statistics
    temp = float(ctx.options["temperature"])
    names = list(ctx.params)
    theta = {n: p.detach() for n, p in ctx.params.items()}
    masks = ctx.mask_float()
    # Effective weights as leaves, so autograd differentiates with respect to w = theta * m.
    w = {n: (theta[n] * masks[n]).requires_grad_(True) for n in names}

    # Pass 1: g = sum_b grad_w L_b (no graph kept).
    loss = cross_entropy_sum_over_batches(ctx, w, temp)
    g = torch.autograd.grad(loss, [w[n] for n in names])

    # Pass 2, per batch (bounded memory): Hg += grad_w (grad_w L_b . g).
    hg = [torch.zeros_like(t) for t in g]
    assert ctx.data is not None
    for x, y in ctx.data:
        out = ctx.forward(w, x)
        loss_b = torch.nn.functional.cross_entropy(out / temp, y)
        gb = torch.autograd.grad(loss_b, [w[n] for n in names], create_graph=True)
        z = sum((a * b).sum() for a, b in zip(gb, g))
        for acc, h in zip(hg, torch.autograd.grad(z, [w[n] for n in names])):
            acc.add_(h)
    return {n: theta[n] * h for n, h in zip(names, hg)}
