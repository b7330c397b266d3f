"""SynFlow (Tanaka et al. 2020): iterative synaptic flow, data-free.

R = sum(f(1; |theta| * m)): the network with every parameter and buffer replaced by its
absolute value, fed a single all-ones input, in eval mode (BatchNorm uses its running
statistics, an affine identity at init). Score = |w * dR/dw| with w = |theta| * m.
Products of many layers overflow float32 on deep nets, so `precision="auto"` computes in
the model's dtype (float32 or float64) and redoes a float32 round in float64 when its result
is not finite.
"""

from __future__ import annotations

import torch

from ntksap.scoring.base import Option, ScoreContext, Scores, register_method

PRECISIONS = ("auto", "float32", "float64")

#: The `precision` option of the methods that multiply long chains of weights (synflow, px).
PRECISION_OPTION = Option(
    "precision",
    "auto",
    str,
    "dtype of the score computation; auto: the model's, float64 if float32 overflows",
    choices=PRECISIONS,
)


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
    options=[PRECISION_OPTION],
    summary="iterative synaptic flow |theta * dR/dtheta| (Tanaka 2020, data-free)",
)
def synflow_scores(ctx: ScoreContext) -> Scores:
    """|w * dR/dw|, R the all-ones output of the |theta| * m network; T rounds (default 100)."""
    precision = ctx.options["precision"]
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(precision, ctx.dtype)
    scores, finite = _synflow_once(ctx, dtype)
    if not finite and precision == "auto" and dtype != torch.float64:
        dtype = torch.float64  # products over many layers overflow float32 on deep nets
        scores, finite = _synflow_once(ctx, dtype)
    if not finite:
        hint = "" if dtype == torch.float64 else '; use precision="auto" or "float64"'
        raise FloatingPointError(f"synflow scores overflow in {dtype}{hint}")
    return scores
