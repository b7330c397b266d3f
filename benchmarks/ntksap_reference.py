"""The NTK-SAP reference procedure, written plainly: the baseline of `prune_time.py`.

This is what the paper's code does for every noise batch, step by step, with no speed work:

    1. re-draw every weight module by module (`ntksap.reinit.redraw_`, torch's global RNG)
    2. z ~ N(0, I) and delta ~ N(0, eps^2 I) on the prunable weights (global RNG)
    3. BatchNorm statistics: reset, momentum 1, one no-grad train-mode forward of the clean
       masked network on z (running_var becomes the unbiased batch variance)
    4. clean and perturbed network in eval mode (NCHW inputs), R = ||f_clean - f_pert||^2
    5. backward into the shared mask; gradients summed over resamples x batches, then |.|

Run through `ntksap.prune` as method "ntksap_reference" inside `with registered():`, so it
uses the same pruning loop, selection and schedule as `ntksap`: any time difference is
scoring.

For the equivalence tests, `reference_round_gradients(ctx, draw=...)` takes the draws from
a callback instead of the global RNG, so it sees exactly the theta, z and delta that
ntksap's scorer draws (`ntksap_draw`).

Example:
    >>> with registered() as name:  # doctest: +SKIP
    ...     masks = ntksap.prune(net, name, sparsity=0.982, input_shape=(3, 32, 32))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ntksap.reinit import redraw_
from ntksap.scoring import ScoreContext, Scores, get_method, register_method
from ntksap.scoring import ntksap as fast
from ntksap.scoring.base import METHODS, batchnorms

#: A draw callback: (ctx, draw index k, batch size) -> (z, delta); it re-draws theta in
#: ctx.model in place.
Draw = Callable[[ScoreContext, int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def global_rng_draw(ctx: ScoreContext, k: int, size: int):
    """The reference's draws: module-by-module re-initialisation and noise from torch's
    global RNG, in the order the reference takes them."""
    redraw_(ctx.model, ctx.options["init"])
    assert ctx.input_shape is not None
    z = torch.randn((size, *ctx.input_shape), device=ctx.device, dtype=ctx.dtype)
    eps = float(ctx.options["epsilon"])
    delta = {n: torch.randn_like(p) * eps for n, p in ctx.params.items()}
    return z, delta


def ntksap_draw(base: int) -> Draw:
    """ntksap's own draws for a round with base seed `base` (per-draw seeded generator):
    with it, the reference and `ntksap` see identical theta, z and delta."""

    def draw(ctx: ScoreContext, k: int, size: int):
        gen = torch.Generator(device=ctx.device).manual_seed(fast.draw_seed(base, k))
        fast.redraw_seeded_(ctx.model, ctx.options["init"], gen)
        assert ctx.input_shape is not None
        z = fast._normal((size, *ctx.input_shape), ctx, gen)
        eps = float(ctx.options["epsilon"])
        delta = {n: fast._normal(p.shape, ctx, gen) * eps for n, p in ctx.params.items()}
        return z, delta

    return draw


def reference_round_gradients(ctx: ScoreContext, draw: Draw = global_rng_draw) -> Scores:
    """Signed dR/dm of one round, summed over resamples x noise batches (float32)."""
    opts = ctx.options
    names = list(ctx.params)
    m = {n: v.requires_grad_(True) for n, v in ctx.mask_float().items()}
    grad = {n: torch.zeros_like(ctx.params[n]) for n in names}
    sizes = fast.noise_batch_sizes(int(opts["num_samples"]), int(opts["batch_size"]))
    k = 0
    for _ in range(int(opts["resamples"])):
        for size in sizes:
            z, delta = draw(ctx, k, size)
            k += 1
            theta = {n: ctx.params[n].detach() for n in names}
            with torch.no_grad():  # 3. the statistics pass
                for bn in batchnorms(ctx.model):
                    bn.reset_running_stats()
                    bn.momentum = 1.0
                ctx.model.train()
                ctx.forward({n: theta[n] * m[n].detach() for n in names}, z)
            ctx.model.eval()  # 4. both networks with the clean statistics
            clean = ctx.forward({n: theta[n] * m[n] for n in names}, z)
            perturbed = ctx.forward({n: (theta[n] + delta[n]) * m[n] for n in names}, z)
            r = (clean - perturbed).pow(2).sum()
            for n, g in zip(names, torch.autograd.grad(r, [m[n] for n in names])):
                grad[n].add_(g)  # 5.
    return grad


NAME = "ntksap_reference"

#: Set by `same_draws()`: the reference then takes ntksap's per-draw seeded draws.
_SAME_DRAWS = [False]


@contextlib.contextmanager
def same_draws() -> Iterator[None]:
    """Inside, the reference scorer draws theta, z and delta exactly as ntksap's scorer does
    for the same `seed` (round seed from torch's RNG, then `ntksap_draw`), instead of the
    reference's global-RNG sequence: the equivalence tests compare scores on equal draws."""
    _SAME_DRAWS[0] = True
    try:
        yield
    finally:
        _SAME_DRAWS[0] = False


def reference_scores(ctx: ScoreContext) -> Scores:
    """|dR/dm| by the reference procedure; same options as ntksap (bn_pass and
    memory_format are ignored: always a separate statistics pass, NCHW inputs)."""
    if ctx.options["init"] == "auto":
        ctx.options["init"] = getattr(ctx.model, fast.INIT_ATTRIBUTE, "reset")
    if ctx.options["num_samples"] is None:
        ctx.options["num_samples"] = fast.default_num_samples(ctx)
    if ctx.options["inputs"] != "noise":
        raise ValueError("the reference baseline draws noise inputs only")
    draw = ntksap_draw(fast.round_base_seed(ctx)) if _SAME_DRAWS[0] else global_rng_draw
    grads = reference_round_gradients(ctx, draw)
    return {n: g.abs() * ctx.masks[n] for n, g in grads.items()}


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """Register the reference as pruning method "ntksap_reference" while inside (so it runs
    in `ntksap.prune`'s loop), and remove it afterwards (the registry stays as it was)."""
    register_method(
        NAME,
        needs_input_shape=True,
        default_rounds=20,
        options=list(get_method("ntksap").options.values()),
        summary="NTK-SAP, the reference procedure written plainly (benchmark baseline)",
    )(reference_scores)
    try:
        yield NAME
    finally:
        METHODS._items.pop(NAME, None)
