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
    register_method,
    summed_batch_gradients,
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
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(ctx.forward(w, x) / temp, y)

    # g = sum_b grad L_b (float64 sum, split over ranks), a constant in the second step
    g = [t.to(ctx.dtype) for t in summed_batch_gradients(ctx, loss, [w[n] for n in names])]

    def grad_dot_g(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gb = torch.autograd.grad(loss(x, y), [w[n] for n in names], create_graph=True)
        return sum((a * b).sum() for a, b in zip(gb, g))  # type: ignore[return-value]

    # H g = sum_b d(grad L_b . g)/dw, by double backward
    hg = summed_batch_gradients(ctx, grad_dot_g, [w[n] for n in names])
    return {n: theta[n] * h.to(ctx.dtype) for n, h in zip(names, hg)}
