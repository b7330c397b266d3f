"""Each method's scores against an independent computation written here, on tiny networks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from conftest import INPUT_SHAPE, small_convnet


def _random_mask(params, density=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in params.items()}


# --- NTK-SAP ---------------------------------------------------------------------------------
def _manual_convnet_forward(w, bn, x, stats):
    """small_convnet's forward written out; BN in eval form with the given statistics."""

    def bn_eval(h, i, key):
        mean, var = stats[key]
        gamma, beta, eps = bn[i].weight, bn[i].bias, bn[i].eps
        return (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps) * gamma[
            None, :, None, None
        ] + beta[None, :, None, None]

    h = F.conv2d(x, w["0.weight"], bn[0].bias, padding=1)
    h = F.relu(bn_eval(h, 1, 1))
    h = F.conv2d(h, w["3.weight"], None, stride=2, padding=1)
    h = F.relu(bn_eval(h, 4, 4))
    return F.linear(h.mean(dim=(2, 3)), w["8.weight"], bn[8].bias)


def _clean_stats(w, bn, x):
    """The clean network's per-channel batch mean and *unbiased* variance, layer by layer."""
    with torch.no_grad():
        stats = {}
        h = F.conv2d(x, w["0.weight"], bn[0].bias, padding=1)
        stats[1] = (h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), correction=1))
        h = F.relu(_bn_with(h, bn[1], stats[1]))
        h = F.conv2d(h, w["3.weight"], None, stride=2, padding=1)
        stats[4] = (h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), correction=1))
    return stats


def _bn_with(h, mod, st):
    # In the no-grad train-mode pass the clean network normalises with *biased* batch stats;
    # only the running statistics (used afterwards in eval mode) are unbiased.
    mean = h.mean(dim=(0, 2, 3))
    var = h.var(dim=(0, 2, 3), correction=0)
    return (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + mod.eps) * (
        mod.weight[None, :, None, None]
    ) + mod.bias[None, :, None, None]


def _fused_stats(w, bn, x):
    """bn_pass="fused": each BatchNorm's statistics are those of its own input in the clean
    eval-mode forward, which normalises with them (unbiased variance) as it goes."""
    with torch.no_grad():
        stats = {}
        h = F.conv2d(x, w["0.weight"], bn[0].bias, padding=1)
        stats[1] = (h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), correction=1))
        mean, var = stats[1]
        h = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn[1].eps)
        h = F.relu(h * bn[1].weight[None, :, None, None] + bn[1].bias[None, :, None, None])
        h = F.conv2d(h, w["3.weight"], None, stride=2, padding=1)
        stats[4] = (h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), correction=1))
    return stats


def _mix(base: int, k: int) -> int:
    """splitmix64 of (base, k), written out here: the seed of draw k of a round."""
    m64 = (1 << 64) - 1
    x = (base * 0x9E3779B97F4A7C15 + k + 1) & m64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


@pytest.mark.parametrize("bn_pass", ["separate", "fused"])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_ntksap_equals_direct_autograd_of_the_formula_with_bn_rule(bn_pass, memory_format):
    net = small_convnet()
    params = ntksap.prunable_parameters(net)
    cur = _random_mask(params, 0.6)
    eps, resamples, num_samples, batch_size, seed = 0.05, 2, 6, 4, 11
    got = ntksap.compute_scores(
        net, "ntksap", masks=cur, input_shape=INPUT_SHAPE, seed=seed, epsilon=eps,
        resamples=resamples, num_samples=num_samples, batch_size=batch_size, init="reset",
        bn_pass=bn_pass, memory_format=memory_format,
    )  # fmt: skip

    # Independent computation on the same draws. The draw protocol: one round seed from
    # torch's RNG (seeded by `seed`); draw k (resample r, batch b) has its own generator
    # seeded by mix(round seed, k), from which come, in order: a seed for the modules'
    # reset_parameters() (theta), z ~ N(0, I), then delta ~ N(0, eps^2) per tensor.
    torch.manual_seed(seed)
    base = int(torch.randint(0, (1 << 63) - 1, ()))
    tmp = copy.deepcopy(net)
    m = {n: v.float().requires_grad_(True) for n, v in cur.items()}
    total = {n: torch.zeros_like(v) for n, v in m.items()}
    k = 0
    for _ in range(resamples):
        for bs in (4, 2):  # 6 noise images in batches of 4
            gen = torch.Generator().manual_seed(_mix(base, k))
            k += 1
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(0, (1 << 63) - 1, (), generator=gen)))
                for mod in tmp.modules():
                    if hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
            theta = {n: tmp.get_parameter(n).detach().clone() for n in params}
            z = torch.randn((bs, *INPUT_SHAPE), generator=gen)
            delta = {n: torch.randn(theta[n].shape, generator=gen) * eps for n in params}
            bn = {i: tmp[i] for i in (0, 1, 4, 8)}
            w_clean = {n: theta[n] * m[n] for n in params}
            w_pert = {n: (theta[n] + delta[n]) * m[n] for n in params}
            clean_stats = _clean_stats if bn_pass == "separate" else _fused_stats
            stats = clean_stats({n: v.detach() for n, v in w_clean.items()}, bn, z)
            r = (
                (_manual_convnet_forward(w_clean, bn, z, stats)
                 - _manual_convnet_forward(w_pert, bn, z, stats)).pow(2).sum()
            )  # fmt: skip
            for n, g in zip(m, torch.autograd.grad(r, list(m.values()))):
                total[n] += g
    for n in params:
        expected = total[n].abs() * cur[n]
        assert torch.allclose(got[n], expected, rtol=1e-4, atol=1e-6 * float(expected.max())), n
        assert (got[n][~cur[n]] == 0).all(), "pruned weights must score zero"


def test_fused_and_separate_statistics_differ_only_slightly():
    """The two BatchNorm rules differ (biased vs unbiased normalisation in the statistics
    pass) by O(1/n), n = values per channel: on 64-image batches the scores agree within a
    few percent, and the two tests above show each equals its own hand computation."""
    net = small_convnet()
    kw = dict(input_shape=INPUT_SHAPE, seed=0, num_samples=64, batch_size=64)
    a = ntksap.compute_scores(net, "ntksap", bn_pass="separate", **kw)
    b = ntksap.compute_scores(net, "ntksap", bn_pass="fused", **kw)
    for n in a:
        rel = float((a[n] - b[n]).norm() / a[n].norm())
        assert 0 < rel < 0.05, (n, rel)


def test_ntksap_score_scales_like_epsilon_squared():
    """A finite difference of a smooth map: doubling eps multiplies the score by about 4."""
    net = small_convnet()
    kw = dict(input_shape=INPUT_SHAPE, seed=0, num_samples=4, batch_size=4)
    a = ntksap.compute_scores(net, "ntksap", **kw)
    b = ntksap.compute_scores(net, "ntksap", epsilon=0.02, **kw)
    # Finite difference: for small eps the score scales as eps^2 (ratio 4) but not exactly.
    ratio = sum(float(b[n].sum()) for n in b) / sum(float(a[n].sum()) for n in a)
    assert 3.0 < ratio < 5.0


def test_ntksap_init_none_uses_the_models_weights():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    kw = dict(
        input_shape=(3, 2, 2), num_samples=5, batch_size=5, init="none", epsilon=0.01, resamples=1
    )
    torch.manual_seed(0)
    got = ntksap.compute_scores(net, "ntksap", seed=2, **kw)
    torch.manual_seed(2)  # the draw protocol (see the test above), without a theta draw
    gen = torch.Generator().manual_seed(_mix(int(torch.randint(0, (1 << 63) - 1, ())), 0))
    z = torch.randn((5, 3, 2, 2), generator=gen).flatten(1)
    names = ["1.weight", "3.weight"]
    theta = {n: net.get_parameter(n).detach() for n in names}
    delta = {n: torch.randn(theta[n].shape, generator=gen) * 0.01 for n in names}
    m = {n: torch.ones_like(theta[n], requires_grad=True) for n in names}

    def f(w):
        return F.linear(F.relu(F.linear(z, w["1.weight"], net[1].bias)), w["3.weight"], net[3].bias)

    r = f({n: theta[n] * m[n] for n in names}) - f({n: (theta[n] + delta[n]) * m[n] for n in names})
    grads = torch.autograd.grad(r.pow(2).sum(), [m[n] for n in names])
    for n, g in zip(names, grads):
        assert torch.allclose(got[n], g.abs(), rtol=1e-5, atol=1e-9)


# --- SNIP -----------------------------------------------------------------------------------
def test_snip_is_abs_grad_times_weight(convnet, batches):
    got = ntksap.compute_scores(convnet, "snip", data=batches)
    ref = copy.deepcopy(convnet).train()
    params = ntksap.prunable_parameters(ref)
    loss = sum(F.cross_entropy(ref(x), y) for x, y in batches)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (n, p), g in zip(params.items(), grads):
        assert torch.allclose(got[n], (g * p).abs(), rtol=1e-5, atol=1e-8), n


def test_itersnip_scores_at_the_current_mask(convnet, batches):
    params = ntksap.prunable_parameters(convnet)
    cur = _random_mask(params, 0.5, seed=3)
    got = ntksap.compute_scores(convnet, "itersnip", data=batches, masks=cur)
    ref = copy.deepcopy(convnet).train()
    rparams = ntksap.prunable_parameters(ref)
    with torch.no_grad():
        for n, p in rparams.items():
            p.mul_(cur[n])  # effective weights theta * m
    loss = sum(F.cross_entropy(ref(x), y) for x, y in batches)
    grads = torch.autograd.grad(loss, list(rparams.values()))
    for (n, p), g in zip(params.items(), grads):
        # dL/dm = dL/dw_eff * theta (theta: the unmasked weight)
        assert torch.allclose(got[n], (g * p).abs(), rtol=1e-5, atol=1e-8), n


# --- SynFlow --------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_synflow_closed_form_two_layer_linear(masked):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    params = ntksap.prunable_parameters(net)
    cur = _random_mask(params, 0.7, seed=1) if masked else None
    got = ntksap.compute_scores(net, "synflow", input_shape=(4,), masks=cur)
    a1 = net[0].weight.detach().abs()  # (3, 4)
    a2 = net[1].weight.detach().abs()  # (2, 3)
    if masked:
        a1, a2 = a1 * cur["0.weight"], a2 * cur["1.weight"]
    # R = 1^T |W2| |W1| 1  =>  dR/d|W1|_jk = sum_i |W2|_ij,  dR/d|W2|_ij = sum_k |W1|_jk
    exp1 = a1 * a2.sum(dim=0)[:, None]
    exp2 = a2 * a1.sum(dim=1)[None, :]
    assert torch.allclose(got["0.weight"], exp1, rtol=1e-6)
    assert torch.allclose(got["1.weight"], exp2, rtol=1e-6)


def test_synflow_falls_back_to_float64_on_overflow():
    torch.manual_seed(0)
    layers = []
    for _ in range(40):  # 40 layers of |w| ~ 60: the product overflows float32 (~3e38)
        lin = nn.Linear(8, 8, bias=False)
        nn.init.constant_(lin.weight, 8.0)
        layers.append(lin)
    net = nn.Sequential(*layers)
    got = ntksap.compute_scores(net, "synflow", input_shape=(8,))
    assert all(torch.isfinite(s).all() and s.dtype == torch.float64 for s in got.values())
    with pytest.raises(ValueError, match="precision"):
        ntksap.compute_scores(net, "synflow", input_shape=(8,), precision="half")


# --- GraSP ----------------------------------------------------------------------------------
def test_grasp_is_theta_times_explicit_hessian_vector_product():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
        for _ in range(2)
    ]
    got = ntksap.compute_scores(net, "grasp", data=batches)
    names = ["0.weight", "2.weight"]
    shapes = [net.get_parameter(n).shape for n in names]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([net.get_parameter(n).detach().flatten() for n in names])

    def loss_of(flat):
        w = dict(zip(names, [t.view(s) for t, s in zip(flat.split(sizes), shapes)]))
        return sum(
            F.cross_entropy(torch.func.functional_call(net, w, (x,)) / 200.0, y) for x, y in batches
        )

    grad = torch.autograd.functional.jacobian(loss_of, theta)
    hess = torch.autograd.functional.hessian(loss_of, theta)  # explicit (35 x 35) Hessian
    expected = (theta * (hess @ grad)).split(sizes)
    for n, e, s in zip(names, expected, shapes):
        assert torch.allclose(got[n], e.view(s), rtol=1e-6, atol=1e-12), n


# --- random and magnitude ---------------------------------------------------------------------
def test_magnitude_is_abs_theta(convnet):
    got = ntksap.compute_scores(convnet, "magnitude")
    for n, p in ntksap.prunable_parameters(convnet).items():
        assert torch.equal(got[n], p.detach().abs())


def test_random_scores_are_standard_normal():
    net = nn.Linear(200, 100)
    s = ntksap.compute_scores(net, "random")["weight"]
    assert abs(float(s.mean())) < 0.02 and abs(float(s.std()) - 1) < 0.02


def test_random_pruning_is_uniform_across_layers():
    net = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 50))
    masks = ntksap.prune(net, "random", density=0.3)
    for d in masks.layer_densities().values():
        assert abs(d - 0.3) < 0.03
