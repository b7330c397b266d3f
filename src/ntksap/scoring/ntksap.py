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

BatchNorm rule: for every noise batch, both networks run in eval mode with the statistics
of the clean masked network on that batch, so the perturbed network is normalised with the
clean network's statistics and no gradient flows through the statistics. How the clean
statistics are measured is the option `bn_pass`:

    "separate" (the reference code): reset, momentum 1, one extra no-grad train-mode
        forward; running_var is the unbiased batch variance. That pass normalises each layer
        with the *biased* variance, so the eval-mode clean forward that follows sees slightly
        other activations (a factor ~sqrt((n-1)/n) per layer, n = values per channel:
        batch x spatial size for conv BatchNorm, batch for BatchNorm1d on (N, C)) than those
        the statistics came from. 7 forward-equivalents of compute per noise batch.
    "fused" (default): each BatchNorm of the clean eval-mode forward first takes the mean
        and unbiased variance of its own input (`torch.batch_norm_update_stats`, no
        gradient), then normalises with them; the perturbed forward uses the same values.
        The clean network is exactly normalised by its own statistics; what changes is only
        the O(1/n) mismatch above (1e-5 relative for ResNet-20's 100 x 32 x 32 values).
        6 forward-equivalents (no extra pass). Its masks lie within the reference's
        seed-to-seed spread on ResNet-20 and VGG-16-BN (per-layer
        densities, 5 seeds each: benchmarks/RESULTS.md).

Draws: every (resample, noise batch) draw k of a round has its own generator, seeded by
`draw_seed(round seed, k)`; theta_i, z_i and delta_i come from it. So a draw does not depend
on which process computes it: `prune(..., distributed=True)` splits the draws of every
round across the ranks of a torch.distributed job and sums the per-draw gradients in
float64, and 1 or N processes give the same masks.

Speed (benchmarks/prune_time.py, RESULTS.md): besides the fused statistics, inputs are
channels_last where oneDNN / cuDNN run the convs faster (`memory_format`), and theta is
re-drawn in one pass per weight (no module-by-module reset then re-initialisation). Peak
memory is one draw's graph: nothing is kept across draws.

Ablation "noise vs real inputs" (the paper's appendix): with the option inputs="data" every
noise batch z_i is replaced by real input images from the `data` batches given to `prune`
(their targets are ignored); everything else (fresh theta_i per batch, delta_i, the BN rule,
the gradient accumulation, num_samples and batch_size) is unchanged. The default "noise" is
the published, data-free method.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ntksap.models.init import KAIMING_LAYERS, KAIMING_NORMS
from ntksap.reinit import INIT_SCHEMES
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

#: How the BatchNorm statistics of the clean network are measured (see `draw_gradients`).
BN_PASSES = ("fused", "separate")

#: Layout of the inputs (and so of every conv activation).
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")

#: Arithmetic of the clean and perturbed passes: float32 (the model's compute dtype) or
#: bfloat16 autocast. float16 is not offered: its masks' agreement is untested (no GPU).
PRECISIONS = ("float32", "bfloat16")

# Attribute set by `ntksap.models.create` naming the scheme the model was initialised with.
INIT_ATTRIBUTE = "ntksap_init_scheme"


def noise_batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Split `num_samples` noise inputs into batches: 1000 by 256 -> [256, 256, 256, 232]."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


@torch.no_grad()
def set_clean_bn_statistics(ctx: ScoreContext, weights: dict[str, torch.Tensor], z: torch.Tensor):
    """Running stats of every BatchNorm := the clean network's statistics on batch `z`
    (the reference's separate pass: reset, momentum 1, one no-grad train-mode forward)."""
    bns = batchnorms(ctx.model)
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0
    ctx.model.train()
    ctx.forward(weights, z)


#: Draws of one round of robust=True's guarded pass when resamples is not given, and its
#: rounds: 100 rounds x 1 draw, the same 100 draws (and compute) as the published 20 x 5
#: (measured in benchmarks/quality_extreme.md: 100 x 5 is no better on LeNet-5 and worse on
#: ResNet-20 at 99.3 %).
ROBUST_RESAMPLES = 1
ROBUST_ROUNDS = 100
PUBLISHED_RESAMPLES = 5


def robust_rounds(options: dict[str, Any]) -> int | None:
    """The default rounds: 100 with robust=True (finer steps near the end, where a round's
    choice of the few weights left matters most); None otherwise (the paper's 20)."""
    return ROBUST_ROUNDS if options["robust"] else None


def robust_first_pass(options: dict[str, Any]) -> dict[str, Any] | None:
    """robust=True prunes as published first (these options: robust off), and again with
    the guards only if that mask starves a layer (`ntksap.pruning.starved_layers`)."""
    return {**options, "robust": False} if options["robust"] else None


def robust_floor(options: dict[str, Any]) -> float:
    """The selection floor robust NTK-SAP asks `ntksap.prune` for: 1.0 (a balanced share per
    layer, every output unit kept; see `ntksap.pruning.floor_reserve`), 0.0 otherwise."""
    return 1.0 if options["robust"] else 0.0


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


def _record_statistics(bn: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """Forward pre-hook: running stats := this batch's mean and unbiased variance, read
    from the BatchNorm's own input (no gradient), before it normalises with them."""
    with torch.no_grad():
        torch.batch_norm_update_stats(args[0], bn.running_mean, bn.running_var, 1.0)


@contextlib.contextmanager
def fused_clean_statistics(model: nn.Module) -> Iterator[None]:
    """While active, every BatchNorm (eval mode) first sets its running statistics to those
    of its current input, then normalises with them: the clean forward measures its own
    statistics as it goes, and the perturbed forward after it (hooks removed) is normalised
    with them. BatchNorms without running statistics are left alone (they normalise with
    batch statistics in either mode, as in the reference).
    """
    hooks = [
        bn.register_forward_pre_hook(_record_statistics)
        for bn in batchnorms(model)
        if bn.track_running_stats and bn.running_mean is not None
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def draw_seed(base: int, index: int) -> int:
    """The seed of draw `index` of a round whose base seed is `base` (splitmix64 mix).

    Every (resample, noise batch) draw has its own seed, so a draw is the same whichever
    process computes it and in whatever order: 1 and N processes score alike.

    >>> draw_seed(7, 0) != draw_seed(7, 1), draw_seed(7, 3) == draw_seed(7, 3)
    (True, True)
    """
    x = (base * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & _MASK63


_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


@torch.no_grad()
def redraw_seeded_(model: nn.Module, scheme: str, generator: torch.Generator) -> None:
    """Re-draw the model's weights from `scheme`, every random number from `generator`.

    "kaiming" (the zoo and reference models): each Conv/Linear weight ~ N(0, 2 / fan_in)
    drawn in place, biases 0, BatchNorm 1 / 0 and its statistics reset, other modules'
    `reset_parameters()` under a seed from `generator`: the same distribution as
    `ntksap.reinit.redraw_(model, "kaiming")`, which first runs every module's
    `reset_parameters()` and then overwrites most of it (twice the random numbers).
    "reset": every module's `reset_parameters()`, torch's RNG seeded from `generator` (and
    restored afterwards).
    """
    if scheme == "kaiming":
        # the other modules first: a custom module's reset may re-draw its children, and
        # the Kaiming draw must win, as in redraw_ (every reset, then kaiming_init_)
        modules = [
            m
            for m in model.modules()
            if not isinstance(m, KAIMING_LAYERS + KAIMING_NORMS)
            and callable(getattr(m, "reset_parameters", None))
        ]
    else:
        modules = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    if modules:
        seed = int(torch.randint(0, _MASK63, (), generator=generator, device=generator.device))
        devices = sorted(
            {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for m in modules:
                m.reset_parameters()
    if scheme != "kaiming":
        return
    for m in model.modules():
        if isinstance(m, KAIMING_LAYERS):
            fan_in = nn.init._calculate_fan_in_and_fan_out(m.weight)[0]
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, KAIMING_NORMS):
            m.reset_running_stats()
            if m.affine:
                m.weight.fill_(1.0)
                m.bias.fill_(0.0)


def round_base_seed(ctx: ScoreContext) -> int:
    """One seed per round from torch's RNG (seeded by `prune`), rank 0's in a distributed
    job; every draw of the round derives its own seed from it (`draw_seed`)."""
    return ctx.broadcast_int(int(torch.randint(0, _MASK63, ())))


def use_channels_last(ctx: ScoreContext) -> bool:
    """Whether to feed channels_last inputs: option "auto" = yes for 2-d conv nets on CUDA
    and for 2-d conv nets whose convs are mostly narrow (<= 128 channels) on the CPU, where
    oneDNN runs them faster in NHWC; wide CPU convs (VGG's 512) run as fast or faster NCHW.
    """
    fmt = ctx.options["memory_format"]
    if fmt != "auto" or ctx.input_shape is None or len(ctx.input_shape) != 3:
        return fmt == "channels_last"
    convs = [m for m in ctx.model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return False
    if ctx.device.type == "cuda":
        return True
    narrow = sum(m.weight.numel() for m in convs if m.out_channels <= 128)
    return 2 * narrow >= sum(m.weight.numel() for m in convs)


def draw_gradients(
    ctx: ScoreContext,
    m: dict[str, torch.Tensor],
    z: torch.Tensor,
    delta: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """dR_i/dm for one draw (theta_i in the model, noise z_i, perturbation delta_i), in the
    order of `m`: R_i = ||f(z; theta * m) - f(z; (theta + delta) * m)||^2, BatchNorm by the
    clean network's statistics on z (option bn_pass: "separate" = the reference's extra
    no-grad train-mode pass, "fused" = measured inside the clean forward)."""
    names = list(m)
    theta = {n: ctx.params[n].detach() for n in names}
    if ctx.options["precision"] == "bfloat16":
        # forward and backward under bf16 autocast; masks, z, delta and the summed
        # gradients stay in the compute dtype
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            return _draw_gradients(ctx, m, z, delta, names, theta)
    return _draw_gradients(ctx, m, z, delta, names, theta)


def _draw_gradients(ctx, m, z, delta, names, theta):  # type: ignore[no-untyped-def]
    if ctx.options["bn_pass"] == "separate":
        set_clean_bn_statistics(ctx, {n: theta[n] * m[n].detach() for n in names}, z)
    ctx.model.eval()
    with affine_batchnorms(ctx.model):
        if ctx.options["bn_pass"] == "separate":
            clean = ctx.forward({n: theta[n] * m[n] for n in names}, z)
        else:
            with fused_clean_statistics(ctx.model):
                clean = ctx.forward({n: theta[n] * m[n] for n in names}, z)
        perturbed = ctx.forward({n: (theta[n] + delta[n]) * m[n] for n in names}, z)
    r = (clean - perturbed).pow(2).sum()
    return torch.autograd.grad(r, [m[n] for n in names])


def _affine_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode BatchNorm as one fused multiply-add, x * scale + shift per channel
    (scale = gamma / sqrt(var + eps), shift = beta - mean * scale): the same function
    (to float rounding) with a cheaper backward than the BatchNorm kernel's on channels_last
    CPU tensors. Train mode, or no running statistics: the module's own forward."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return type(bn).forward(bn, x)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale = scale * bn.weight
        shift = shift * bn.weight + bn.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel, dimension 1
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


@contextlib.contextmanager
def affine_batchnorms(model: nn.Module) -> Iterator[None]:
    """While active, eval-mode BatchNorms of `model` compute as `_affine_forward`
    (an instance attribute shadows the class's forward; removed on exit)."""
    bns = [bn for bn in batchnorms(model) if "forward" not in vars(bn)]
    for bn in bns:
        bn.forward = functools.partial(_affine_forward, bn)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for bn in bns:
            del bn.forward


def ntksap_round_gradients(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """dR/dm summed over every (resample, noise batch) draw of one round (signed, float64).

    Draw k = r * B + b (resample r, noise batch b of B) re-draws theta, then z and delta,
    all from a generator seeded by `draw_seed(round seed, k)`: its own stream, so the
    draws can be split across processes (`ctx.shard`: rank j takes k = j, j + world, ...)
    and the per-draw gradients summed in float64 (`ctx.all_reduce_`) give the same total
    as one process up to float64 rounding (~1e-16 relative).

    With inputs="data" the batches z_i are real images instead of noise, read as one cyclic
    stream over the given data (see `real_input_batch`) that continues across resamples and
    rounds: round t, resample r reads num_samples images from position
    ((t - 1) * resamples + r) * num_samples, in batches of batch_size, as the noise would be.
    So with at least rounds x resamples x num_samples images no image is seen twice (like
    fresh noise); with fewer, the images repeat (with exactly num_samples, e.g. `ntksap.run`'s
    10 per class at the default num_samples = 10 x classes, every draw sees the same images
    and only theta_i and delta_i change).
    """
    opts = ctx.options
    eps = float(opts["epsilon"])
    resamples = int(opts["resamples"])
    num_samples = int(opts["num_samples"])
    init = opts["init"]
    assert ctx.input_shape is not None
    pool = real_input_pool(ctx) if opts["inputs"] == "data" else None
    sizes = noise_batch_sizes(num_samples, int(opts["batch_size"]))
    starts = [sum(sizes[:b]) for b in range(len(sizes))]  # of each batch in its resample
    channels_last = use_channels_last(ctx)
    base = round_base_seed(ctx)

    names = list(ctx.params)
    m = {n: v.requires_grad_(True) for n, v in ctx.mask_float().items()}
    grad = {n: torch.zeros_like(ctx.params[n], dtype=torch.float64) for n in names}
    draws = [(r, b) for r in range(resamples) for b in range(len(sizes))]
    for k, (r, b) in ctx.shard(list(enumerate(draws))):
        gen = torch.Generator(device=ctx.device).manual_seed(draw_seed(base, k))
        if init != "none":
            redraw_seeded_(ctx.model, init, gen)  # theta_i: a fresh draw for this batch
        # Noise is drawn in float32 and cast, so a float64 model sees the z and delta of
        # its float32 twin (same seed) and only computes more precisely.
        if pool is None:
            z = _normal((sizes[b], *ctx.input_shape), ctx, gen)
        else:
            position = ((ctx.round - 1) * resamples + r) * num_samples + starts[b]
            z = real_input_batch(pool, position, sizes[b])
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        delta = {n: _normal(ctx.params[n].shape, ctx, gen) * eps for n in names}
        for n, g in zip(names, draw_gradients(ctx, m, z, delta)):
            grad[n].add_(g)
    ctx.all_reduce_(list(grad.values()))
    return grad


def _normal(
    shape: tuple[int, ...] | torch.Size, ctx: ScoreContext, generator: torch.Generator
) -> torch.Tensor:
    """N(0, 1) of `shape` drawn in float32 on the scoring device, in the compute dtype."""
    out = torch.randn(shape, device=ctx.device, dtype=torch.float32, generator=generator)
    return out.to(ctx.dtype)


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
        Option(
            "resamples",
            None,
            int,
            "independent (theta, z) draws per noise batch; auto: 5 (1 in robust's guarded pass)",
            allow_none=True,
            low=1,
        ),
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
        Option(
            "bn_pass",
            "fused",
            str,
            "BatchNorm statistics of the clean net: fused (measured in its forward) or "
            "separate (the reference's extra train-mode pass)",
            choices=BN_PASSES,
        ),
        Option(
            "memory_format",
            "auto",
            str,
            "input layout: auto (channels_last for narrow 2-d convs on CPU, all on CUDA)",
            choices=MEMORY_FORMATS,
        ),
        Option(
            "robust",
            False,
            bool,
            "prune as published; if that mask starves a layer (fewer weights than output "
            "units), again with guards: a balanced per-layer floor, every output unit kept, "
            "theta fixed at the model's weights, 100 rounds",
        ),
        Option(
            "precision",
            "float32",
            str,
            "float32, or bfloat16 autocast (faster on CPUs with AVX-512 BF16 and on GPUs; "
            "masks agree with float32's as well as two seeds do)",
            choices=PRECISIONS,
        ),
    ],
    summary="NTK spectrum-aware, finite-difference NTK trace (Wang 2023, data-free by default)",
    needs_data_when=reads_data,
    floor_when=robust_floor,
    rounds_when=robust_rounds,
    unguarded_when=robust_first_pass,
)
def ntksap_scores(ctx: ScoreContext) -> Scores:
    """|dR/dm| at the current mask, zero where already pruned.

    Options:
        epsilon: std of the weight perturbation delta (default 0.01; results are insensitive
            within 1e-3..1e-2, the paper's N(0, 1e-4 I) variance).
        resamples: R, independent draws of (theta, z) per noise batch (None: 5, or 1 in the
            guarded pass of robust=True, whose 100 rounds then make the same 100 draws).
            Default 5, the paper's CIFAR-10 setting: every paper setting scores each round
            on >= 4 draws (CIFAR-100: 1 x 4 batches, Tiny-ImageNet: 1 x 8); a single draw
            is noisy (on mnist5k LeNet-5 at 90 % sparsity: 95.9 % top-1 with R=1, 97.5 % with
            R=5).
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
        robust: False (default: the published method) or True: `ntksap.prune` prunes as
            published, and returns that mask unless it starves a layer
            (`ntksap.pruning.starved_layers`: a tensor with fewer weights than output units,
            or an output unit with none); then it prunes again with the guards measured in
            benchmarks/quality_extreme.md: a balanced floor per layer (floor=1.0: no tensor
            below its share k/L of the round's kept count, and every output unit of the
            last layer its share / units, at least one weight), theta the model's own
            weights, fixed (init "auto" means "none": the mask is chosen for the weights
            it will train with), and 100 rounds of 1 draw (given `rounds`, `resamples`,
            `init`, `floor` win in both passes). The masks' metadata "guard" says whether
            the guarded pass ran and which layers the published mask starved. The plain
            score starves the fully connected layers at 98 %+ (LeNet-5 keeps 23 of fc2's
            10,080 weights at 98 %) and the classifier (ResNet-20: 9 of 640 at 99.5 %);
            where it starves nothing (ResNet-20 up to 98.2 %) the published mask is the
            better one, so it is kept.
    """
    if ctx.options["init"] == "auto":
        # robust: score the weights the network will train from (see `robust` above)
        default = "none" if ctx.options["robust"] else getattr(ctx.model, INIT_ATTRIBUTE, "reset")
        ctx.options["init"] = default
    if ctx.options["resamples"] is None:
        robust = ctx.options["robust"]
        ctx.options["resamples"] = ROBUST_RESAMPLES if robust else PUBLISHED_RESAMPLES
    if ctx.options["num_samples"] is None:
        # resolved once; the loop keeps the options dict across rounds and records it
        ctx.options["num_samples"] = default_num_samples(ctx)
    grads = ntksap_round_gradients(ctx)
    return {n: g.abs().to(ctx.dtype) * ctx.masks[n] for n, g in grads.items()}
