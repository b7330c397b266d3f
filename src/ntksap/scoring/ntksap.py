"""NTK-SAP (Wang, Li, Sun, ICLR 2023): spectrum-aware pruning by a finite-difference NTK trace.

The trace norm of the fixed-weight NTK is ||J_theta f(X)||_F^2. NTK-SAP approximates it by a
finite difference, averaged over random weights and random Gaussian inputs:

    R(m) = sum_i || f(z_i; theta_i * m) - f(z_i; (theta_i + delta_i) * m) ||_2^2

    z_i      ~ N(0, I), shape (batch, *input_shape): no real data is read
    theta_i  ~ the init distribution, re-drawn for every noise batch ("new input, new weight")
    delta_i  ~ N(0, eps^2 I) on the prunable weights only (eps = 0.01 is the std)

and scores S_j = |dR/dm_j| at the current mask; the gradient reaches the shared mask through
both the clean and the perturbed network. Gradients accumulate over `resamples` x
ceil(num_samples / batch_size) draws before the absolute value is taken.

BatchNorm rule (as the reference): for every noise batch, the running statistics are those
of the clean masked network on that batch (reset, one no-grad train-mode pass with momentum
1, so running_var is the *unbiased* batch variance), then both networks run in eval mode, so
the perturbed network is normalised with the clean network's statistics and no gradient
flows through the statistics.

Ablation "noise vs real inputs" (the paper's appendix): with the option inputs="data" every
noise batch z_i is replaced by real input images from the `data` batches given to `prune`
(their targets are ignored); everything else (fresh theta_i per batch, delta_i, the BN rule,
the gradient accumulation, num_samples and batch_size) is unchanged. The default "noise" is
the published, data-free method.
"""

from __future__ import annotations

from typing import Any

import torch

from ntksap.reinit import INIT_SCHEMES, redraw_
from ntksap.scoring.base import (
    Option,
    ScoreContext,
    Scores,
    batchnorms,
    register_method,
)

NTKSAP_INITS = ("auto", *INIT_SCHEMES, "none")

#: Where the inputs z_i come from: "noise" (N(0, I), the published method) or "data".
NTKSAP_INPUTS = ("noise", "data")

# Attribute set by `ntksap.models.create` naming the scheme the model was initialised with.
INIT_ATTRIBUTE = "ntksap_init_scheme"


def noise_batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Split `num_samples` noise inputs into batches: 1000 by 256 -> [256, 256, 256, 232]."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


@torch.no_grad()
def set_clean_bn_statistics(ctx: ScoreContext, weights: dict[str, torch.Tensor], z: torch.Tensor):
    """Running stats of every BatchNorm := the clean network's statistics on batch `z`."""
    bns = batchnorms(ctx.model)
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0
    ctx.model.train()
    ctx.forward(weights, z)


def reads_data(options: dict[str, Any]) -> bool:
    """Whether NTK-SAP with these (full) options reads real batches: only inputs="data".

    The method's data need hangs on this one option, so `prune` and `ntksap.run` ask it
    (through `Method.needs_data_for`) instead of a fixed flag.
    """
    return options["inputs"] == "data"


def real_input_pool(ctx: ScoreContext) -> torch.Tensor:
    """The inputs of every `ctx.data` batch, concatenated in order (targets dropped)."""
    if not ctx.data:
        raise ValueError(
            "ntksap with inputs='data' reads real inputs: pass data=[(inputs, targets), ...] "
            "(only the inputs are used), or use inputs='noise' (the default, data-free)"
        )
    return torch.cat([x for x, _ in ctx.data])


def real_input_batch(pool: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """`size` images of `pool` read from position `start` of the endless cyclic stream
    pool[0], pool[1], ..., pool[-1], pool[0], ... (fewer images than asked for repeat).

    >>> real_input_batch(torch.arange(5), 3, 4).tolist()
    [3, 4, 0, 1]
    """
    index = torch.arange(start, start + size, device=pool.device) % pool.shape[0]
    return pool.index_select(0, index)


def ntksap_round_gradients(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """dR/dm summed over every (resample, noise batch) draw of one round (signed).

    With inputs="data" the batches z_i are real images instead of noise, read as one cyclic
    stream over the given data (see `real_input_batch`) that continues across resamples and
    rounds: round t, resample r reads num_samples images from position
    ((t - 1) * resamples + r) * num_samples, in batches of batch_size, as the noise would be.
    So with at least rounds x resamples x num_samples images no image is seen twice (like
    fresh noise); with fewer, the images repeat (with exactly num_samples, e.g. `ntksap.run`'s
    10 per class at the default num_samples = 10 x classes, every draw sees the same images
    and only theta_i and delta_i change). No z is drawn, so the random stream then holds only
    theta_i and delta_i.
    """
    opts = ctx.options
    eps = float(opts["epsilon"])
    resamples = int(opts["resamples"])
    batch_size = int(opts["batch_size"])
    num_samples = opts["num_samples"]
    init = opts["init"]
    assert ctx.input_shape is not None and num_samples is not None
    pool = real_input_pool(ctx) if opts["inputs"] == "data" else None
    position = (ctx.round - 1) * resamples * int(num_samples)  # in the real-input stream

    names = list(ctx.params)
    m = {n: v.requires_grad_(True) for n, v in ctx.mask_float().items()}
    grad = {n: torch.zeros_like(ctx.params[n], dtype=m[n].dtype) for n in names}
    for _ in range(resamples):
        for bs in noise_batch_sizes(int(num_samples), batch_size):
            if init != "none":
                redraw_(ctx.model, init)  # theta_i: a fresh draw for this noise batch
            theta = {n: ctx.params[n].detach() for n in names}
            # Noise is drawn in float32 and cast, so a float64 model sees the z and delta of
            # its float32 twin (same seed) and only computes more precisely.
            if pool is None:
                z = _normal((bs, *ctx.input_shape), ctx)
            else:
                z = real_input_batch(pool, position, bs)
                position += bs
            delta = {n: _normal(theta[n].shape, ctx) * eps for n in names}

            set_clean_bn_statistics(ctx, {n: theta[n] * m[n].detach() for n in names}, z)
            ctx.model.eval()
            clean = ctx.forward({n: theta[n] * m[n] for n in names}, z)
            perturbed = ctx.forward({n: (theta[n] + delta[n]) * m[n] for n in names}, z)
            r = (clean - perturbed).pow(2).sum()
            for n, g in zip(names, torch.autograd.grad(r, [m[n] for n in names])):
                grad[n].add_(g)
    return grad


def _normal(shape: tuple[int, ...] | torch.Size, ctx: ScoreContext) -> torch.Tensor:
    """N(0, 1) of `shape` drawn in float32 on the scoring device, in the compute dtype."""
    return torch.randn(shape, device=ctx.device, dtype=torch.float32).to(ctx.dtype)


@torch.no_grad()
def default_num_samples(ctx: ScoreContext) -> int:
    """10 x the model's output width per sample (the paper's "10 x classes").

    The width comes from the pruning loop's input-shape check (`ctx.output_width`); only a
    context built without it costs a forward pass here.
    """
    if ctx.output_width is not None:
        return 10 * ctx.output_width
    assert ctx.input_shape is not None
    ctx.model.eval()
    x = torch.zeros((2, *ctx.input_shape), device=ctx.device, dtype=ctx.dtype)
    return 10 * ctx.forward({}, x)[0].numel()


@register_method(
    "ntksap",
    needs_input_shape=True,
    default_rounds=20,
    options=[
        Option(
            "epsilon",
            0.01,
            float,
            "std of the weight perturbation delta (the paper's variance 1e-4)",
            low=0.0,
            low_open=True,
        ),
        Option("resamples", 5, int, "independent (theta, z) draws per noise batch", low=1),
        Option(
            "num_samples",
            None,
            int,
            "noise inputs per resample; auto: 10 x the model's output width",
            allow_none=True,
            low=1,
        ),
        Option("batch_size", 256, int, "noise inputs per forward pass", low=1),
        Option(
            "init",
            "auto",
            str,
            "how theta is re-drawn; auto: kaiming for zoo models, reset otherwise",
            choices=NTKSAP_INITS,
        ),
        Option(
            "inputs",
            "noise",
            str,
            "inputs z: noise N(0, I) (the paper, data-free) or data (real images; ablation)",
            choices=NTKSAP_INPUTS,
        ),
    ],
    summary="NTK spectrum-aware, finite-difference NTK trace (Wang 2023, data-free by default)",
    needs_data_when=reads_data,
)
def ntksap_scores(ctx: ScoreContext) -> Scores:
    """|dR/dm| at the current mask, zero where already pruned.

    Options:
        epsilon: std of the weight perturbation delta (default 0.01; results are insensitive
            within 1e-3..1e-2, the paper's N(0, 1e-4 I) variance).
        resamples: R, independent draws of (theta, z) per noise batch. Default 5, the
            paper's CIFAR-10 setting: every paper setting scores each round on >= 4 draws
            (CIFAR-100: 1 x 4 batches, Tiny-ImageNet: 1 x 8); a single draw is noisy (on
            mnist5k LeNet-5 at 90 % sparsity: 95.9 % top-1 with R=1, 97.5 % with R=5).
        num_samples: noise inputs per resample (default: 10 x the model's output width,
            the paper's "10 x classes").
        batch_size: noise inputs per forward pass (default 256).
        init: how theta_i is drawn: "auto" (default: the scheme a zoo model was built with,
            i.e. "kaiming"; "reset" for any other model), "reset" (each module's
            reset_parameters), "kaiming" (the reference models' init: Kaiming-normal fan_in,
            zero bias, BN 1/0), or "none" (the model's current weights, fixed).
        inputs: "noise" (default: z_i ~ N(0, I), the published, data-free method) or
            "data" (the paper's appendix ablation: z_i are the real inputs of `data`, which
            must then be given; targets are ignored). num_samples and batch_size keep their
            meaning: num_samples images per resample are taken from the data, cycling
            through its batches if they hold fewer (see `ntksap_round_gradients`).
    """
    if ctx.options["init"] == "auto":
        ctx.options["init"] = getattr(ctx.model, INIT_ATTRIBUTE, "reset")
    if ctx.options["num_samples"] is None:
        # resolved once; the loop keeps the options dict across rounds and records it
        ctx.options["num_samples"] = default_num_samples(ctx)
    return {n: g.abs() * ctx.masks[n] for n, g in ntksap_round_gradients(ctx).items()}
