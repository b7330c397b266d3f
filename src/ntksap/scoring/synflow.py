"""SynFlow (Tanaka et al. 2020): iterative synaptic flow, data-free.

R = sum(f(1; |theta| * m)): the network with every parameter and buffer replaced by its
absolute value, fed a single all-ones input, in eval mode (BatchNorm uses its running
statistics, an affine identity at init). Score = |w * dR/dw| with w = |theta| * m.
Products of many layers overflow float32 on deep nets, so `precision="auto"` redoes the
round in float64 when the float32 result is not finite.
"""

from __future__ import annotations

import torch

from ntksap.scoring.base import ScoreContext, Scores, check_choice, register_method

PRECISIONS = ("auto", "float32", "float64")


def _synflow_once(ctx: ScoreContext, dtype: torch.dtype) -> tuple[Scores, bool]:
    ctx.model.eval()
    assert ctx.input_shape is not None
    # Every floating parameter and buffer as |value| in `dtype`, passed functionally, so the
    # model's own tensors are never abs()-ed in place.
    state = {
        n: t.detach().abs().to(dtype)
        for n, t in [*ctx.model.named_parameters(), *ctx.model.named_buffers()]
        if t.is_floating_point()
    }
    masks = ctx.mask_float(dtype)
    w = {n: (state[n] * masks[n]).requires_grad_(True) for n in ctx.params}
    x = torch.ones((1, *ctx.input_shape), device=ctx.device, dtype=dtype)
    out = ctx.forward(w, x, **{n: t for n, t in state.items() if n not in w})
    r = out.sum()
    grads = torch.autograd.grad(r, list(w.values()))
    scores = {n: (w[n] * g).detach().abs() for n, g in zip(w, grads)}
    finite = bool(torch.isfinite(r)) and all(bool(torch.isfinite(s).all()) for s in scores.values())
    return scores, finite


@register_method(
    "synflow",
    needs_input_shape=True,
    default_rounds=100,
    options={"precision": "auto"},
    validate=lambda o: check_choice("synflow", "precision", o["precision"], PRECISIONS),
    summary="iterative synaptic flow |theta * dR/dtheta| (Tanaka 2020, data-free)",
)
def synflow_scores(ctx: ScoreContext) -> Scores:
    """|w * dR/dw|, R the all-ones output of the |theta| * m network; T rounds (default 100)."""
    precision = ctx.options["precision"]
    if precision == "float64":
        return _synflow_once(ctx, torch.float64)[0]
    scores, finite = _synflow_once(ctx, torch.float32)
    if finite or precision == "float32":
        return scores
    scores, finite = _synflow_once(ctx, torch.float64)
    if not finite:
        raise FloatingPointError("synflow scores overflow even in float64")
    return scores
