"""The exact empirical NTK (`ntksap.analysis.ntk`) against an explicit per-sample Jacobian."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ntksap
from conftest import INPUT_SHAPE, NUM_CLASSES, small_convnet
from ntksap.analysis import ntk as ntk_mod
from ntksap.analysis.ntk import NTKMemoryError, empirical_ntk, ntk_cost
from ntksap.masks import MaskError

IMPLS = ["jacobian", "ntk_vp"]

# torch's first jvp imports its jvp decompositions, which calls the deprecated torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def small_mlp(d_in: int = 16, hidden: int = 32, k: int = 5) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, k),
    )


def bn_convnet() -> nn.Module:
    """The shared conv net with non-trivial BN running statistics and affine parameters."""
    net = small_convnet()
    g = torch.Generator().manual_seed(3)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return net


def explicit_jacobian(
    model: nn.Module, x: torch.Tensor, masks: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """(N*K, P_kept): d logits / d prunable weights, sample-major rows, pruned columns deleted.

    Written directly: a float64 eval-mode copy at w = theta * m, one autograd.grad per
    (sample, logit).
    """
    net = copy.deepcopy(model).double().eval()
    names = list(ntksap.prunable_parameters(net))
    params = dict(net.named_parameters())
    masks = masks or {}
    with torch.no_grad():
        for n in names:
            if n in masks:
                params[n].mul_(masks[n].to(torch.float64))
    rows = []
    for i in range(x.shape[0]):
        out = net(x[i : i + 1].double()).reshape(-1)
        for k in range(out.numel()):
            grads = torch.autograd.grad(out[k], [params[n] for n in names], retain_graph=True)
            row = []
            for n, g in zip(names, grads):
                g = g.flatten()
                if n in masks:
                    g = g[masks[n].flatten()]
                row.append(g)
            rows.append(torch.cat(row))
    return torch.stack(rows)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def diagonal_blocks(full: torch.Tensor, k: int) -> torch.Tensor:
    """(K, N, N) per-logit kernels read out of the sample-major (N*K, N*K) matrix."""
    return torch.stack([full[j::k, j::k] for j in range(k)])


def random_masks(model: nn.Module, density: float = 0.4, seed: int = 5) -> ntksap.Masks:
    g = torch.Generator().manual_seed(seed)
    return ntksap.Masks(
        {
            n: torch.rand(p.shape, generator=g) < density
            for n, p in ntksap.prunable_parameters(model).items()
        }
    )


@pytest.fixture(scope="module")
def conv_case():
    net = bn_convnet()
    x = torch.randn((4, *INPUT_SHAPE), generator=torch.Generator().manual_seed(0))
    J = explicit_jacobian(net, x)
    return net, x, J


@pytest.fixture(scope="module")
def mlp_case():
    net = small_mlp()
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    J = explicit_jacobian(net, x)
    return net, x, J


# ---------------------------------------------------------------------------------------
# 1. Both implementations equal the explicit J J^T; diagonal and trace are consistent
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["conv_case", "mlp_case"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_explicit_jacobian(case, impl, request):
    net, x, J = request.getfixturevalue(case)
    ref = J @ J.T  # (N*K, N*K)
    k = ref.shape[0] // x.shape[0]
    full = empirical_ntk(net, x, implementation=impl)
    assert full.dtype == torch.float64 and full.shape == ref.shape
    assert rel(full, ref) < 1e-10
    assert torch.equal(full, full.T)  # exactly symmetric
    diag = empirical_ntk(net, x, mode="diagonal", implementation=impl)
    assert diag.shape == (k, x.shape[0], x.shape[0])
    assert rel(diag, diagonal_blocks(ref, k)) < 1e-10
    assert rel(diag, diagonal_blocks(full, k)) < 1e-10
    tr = empirical_ntk(net, x, mode="trace", implementation=impl)
    assert tr.dim() == 0
    assert abs(float(tr) - float((J**2).sum())) < 1e-10 * float(tr)
    assert abs(float(tr) - float(full.trace())) < 1e-10 * float(tr)


@pytest.mark.parametrize("case", ["conv_case", "mlp_case"])
def test_implementations_agree(case, request):
    net, x, _ = request.getfixturevalue(case)
    a = empirical_ntk(net, x, implementation="jacobian")
    b = empirical_ntk(net, x, implementation="ntk_vp")
    assert rel(a, b) < 1e-5


def test_float32_close_to_float64(conv_case):
    net, x, J = conv_case
    f32 = empirical_ntk(net, x, dtype=torch.float32)
    assert f32.dtype == torch.float32
    assert rel(f32.double(), J @ J.T) < 1e-4


def test_chunk_size_override(mlp_case):
    net, x, J = mlp_case
    for impl in IMPLS:
        out = empirical_ntk(net, x, implementation=impl, chunk_size=4)  # chunks of 4 and 2
        assert rel(out, J @ J.T) < 1e-10


# ---------------------------------------------------------------------------------------
# 2. Masks: pruned weights contribute nothing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_equals_deleted_columns(conv_case, impl):
    net, x, _ = conv_case
    masks = random_masks(net)
    J = explicit_jacobian(net, x, masks)  # (N*K, P_kept) at w = theta * m
    ref = J @ J.T
    assert rel(empirical_ntk(net, x, masks, implementation=impl), ref) < 1e-10
    diag = empirical_ntk(net, x, masks, mode="diagonal", implementation=impl)
    assert rel(diag, diagonal_blocks(ref, NUM_CLASSES)) < 1e-10
    tr = empirical_ntk(net, x, masks, mode="trace")
    assert abs(float(tr) - float((J**2).sum())) < 1e-10 * float(tr)
    # it really differs from the dense kernel
    assert rel(empirical_ntk(net, x, implementation=impl), ref) > 1e-3


def test_masked_weight_values_are_irrelevant(conv_case):
    """Only theta * m matters: changing stored weights at pruned places changes nothing."""
    net, x, _ = conv_case
    masks = random_masks(net)
    other = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in ntksap.prunable_parameters(other).items():
            p.add_(torch.randn_like(p) * (~masks[n]))
    a = empirical_ntk(net, x, masks)
    b = empirical_ntk(other, x, masks)
    assert rel(a, b) < 1e-12


def test_partial_masks_mean_dense_elsewhere(mlp_case):
    net, x, _ = mlp_case
    full = random_masks(net)
    only = {"1.weight": full["1.weight"]}
    dense_rest = {n: (m if n == "1.weight" else torch.ones_like(m)) for n, m in full.items()}
    assert rel(empirical_ntk(net, x, only), empirical_ntk(net, x, dense_rest)) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_attached_masks(conv_case, impl):
    net, x, _ = conv_case
    masks = random_masks(net)
    ref = empirical_ntk(net, x, masks, implementation=impl)
    attached = ntksap.apply_masks(copy.deepcopy(net), masks)
    before = {k: v.clone() for k, v in attached.state_dict().items()}
    assert rel(empirical_ntk(attached, x, implementation=impl), ref) < 1e-12
    # masks given on top of attached ones: a weight counts when both keep it
    more = random_masks(net, density=0.7, seed=9)
    both = {n: masks[n] & more[n] for n in masks}
    assert rel(empirical_ntk(attached, x, more), empirical_ntk(net, x, both)) < 1e-12
    # the attached model is left as it was, still parametrized and working
    assert ntksap.get_masks(attached) == masks
    after = attached.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    attached(x)


# ---------------------------------------------------------------------------------------
# 3. Closed form: f(x) = W x
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_closed_form(impl):
    d, k, n = 7, 3, 5
    net = nn.Linear(d, k, bias=False)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gram = x @ x.T  # (N, N)
    full = empirical_ntk(net, x, implementation=impl)
    assert torch.allclose(full, torch.kron(gram, torch.eye(k, dtype=torch.float64)), atol=1e-12)
    diag = empirical_ntk(net, x, mode="diagonal", implementation=impl)
    assert torch.allclose(diag, gram.expand(k, n, n), atol=1e-12)
    tr = empirical_ntk(net, x, mode="trace", implementation=impl)
    assert torch.allclose(tr, k * (x**2).sum())


# ---------------------------------------------------------------------------------------
# 4. Memory bound
# ---------------------------------------------------------------------------------------
def _record(monkeypatch) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    monkeypatch.setattr(ntk_mod, "_debug_hook", lambda kind, b: seen.setdefault(kind, []).append(b))
    return seen


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["full", "diagonal", "trace"])
@pytest.mark.parametrize("cap", [256 * 2**10, 64 * 2**10])
def test_memory_limit_respected(monkeypatch, impl, mode, cap):
    net = small_mlp()  # P = 16*32 + 32*32 + 32*5 = 1696 prunable weights, K = 5
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(4))
    J = explicit_jacobian(net, x)
    ref = J @ J.T
    P, K, N = J.shape[1], 5, 12
    assert cap < N * K * P * 8  # the whole Jacobian would not fit
    if cap < 2**17:
        assert cap < K * P * 8  # not even one sample's K rows fit
    plan = ntk_cost(net, x, mode=mode, implementation=impl, memory_limit=cap)
    chosen = plan[impl]
    assert chosen["feasible"] and chosen["peak_bytes"] <= cap
    if cap < 2**17 and mode != "trace":
        assert chosen["chunk_logits"] < K  # a sample's logits are split across chunks
    seen = _record(monkeypatch)
    out = empirical_ntk(net, x, mode=mode, implementation=impl, memory_limit=cap)
    if mode == "full":
        assert rel(out, ref) < 1e-10
    elif mode == "diagonal":
        assert rel(out, diagonal_blocks(ref, K)) < 1e-10
    else:
        assert abs(float(out) - float((J**2).sum())) < 1e-10 * float(out)
    # Jacobian data alive at once: the panel (or tangents) + one raw chunk + one gathered one
    alive = sum(max(seen.get(kind, [0])) for kind in ("panel", "column"))
    alive += max(max(seen.get("rows", [0])), max(seen.get("tangents", [0])))
    assert 0 < alive <= cap
    assert alive <= chosen["jacobian_bytes"]
    if impl == "jacobian" and mode != "trace":
        assert len(seen["panel"]) > 1  # several panels: J_m did not fit at once


def test_result_too_large():
    net = small_mlp()
    x = torch.randn(40, 16)  # full: (200, 200) float64 = 312.5 KiB
    with pytest.raises(NTKMemoryError, match=r"result alone needs .* GiB"):
        empirical_ntk(net, x, memory_limit=256 * 2**10)
    with pytest.raises(MemoryError):  # also catchable as a MemoryError
        empirical_ntk(net, x, memory_limit=256 * 2**10)
    # diagonal (5 x 40 x 40) fits
    assert empirical_ntk(net, x, mode="diagonal", memory_limit=256 * 2**10).shape == (5, 40, 40)


def test_nothing_fits():
    net = small_mlp()
    x = torch.randn(2, 16)
    with pytest.raises(NTKMemoryError, match="cannot compute"):
        empirical_ntk(net, x, implementation="jacobian", memory_limit=1000)


def test_auto_choice(conv_case, mlp_case):
    net, x, _ = conv_case
    c = ntk_cost(net, x)
    assert c["choice"] == "jacobian"  # conv: a forward costs far more than K * P flops
    assert c["jacobian"]["flops"] < c["ntk_vp"]["flops"]
    assert c["P"] == sum(p.numel() for p in ntksap.prunable_parameters(net).values())
    assert c["K"] == NUM_CLASSES and c["N"] == x.shape[0]
    assert c["result_bytes"] == (x.shape[0] * NUM_CLASSES) ** 2 * 8
    net, x, _ = mlp_case
    c = ntk_cost(net, x)
    assert c["choice"] == "ntk_vp"  # MLP: a forward is ~2P flops < K * P
    assert ntk_cost(net, x, implementation="jacobian")["choice"] == "jacobian"
    masks = random_masks(net, density=0.1)
    assert ntk_cost(net, x, masks)["P_kept"] == masks.num_kept


# ---------------------------------------------------------------------------------------
# 5. The model is left untouched
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_model_untouched(train):
    net = bn_convnet()
    net.train(train)
    net[0].bias.requires_grad_(False)
    net[8].train(not train)  # mixed modes are kept too
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    dtypes = [p.dtype for p in net.parameters()]
    x = torch.randn((3, *INPUT_SHAPE))
    for mode in ("full", "diagonal", "trace"):
        for impl in IMPLS:
            empirical_ntk(net, x, random_masks(net), mode=mode, implementation=impl)
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert [p.dtype for p in net.parameters()] == dtypes
    assert all(p.grad is None for p in net.parameters())


def test_eval_mode_used_even_for_train_mode_model(conv_case):
    net, x, J = conv_case
    net = copy.deepcopy(net).train()
    assert rel(empirical_ntk(net, x), J @ J.T) < 1e-10  # running statistics, not batch ones


# ---------------------------------------------------------------------------------------
# 6. Bad inputs
# ---------------------------------------------------------------------------------------
def test_bad_choices(mlp_case):
    net, x, _ = mlp_case
    with pytest.raises(ValueError, match="full, diagonal, trace"):
        empirical_ntk(net, x, mode="eigen")
    with pytest.raises(ValueError, match="auto, jacobian, ntk_vp"):
        empirical_ntk(net, x, implementation="fast")
    with pytest.raises(ValueError, match=r"torch\.float32, torch\.float64"):
        empirical_ntk(net, x, dtype=torch.float16)
    with pytest.raises(ValueError, match="memory_limit"):
        empirical_ntk(net, x, memory_limit=0)
    with pytest.raises(ValueError, match="chunk_size"):
        ntk_cost(net, x, chunk_size=-1)


def test_bad_masks(mlp_case):
    net, x, _ = mlp_case
    with pytest.raises(MaskError, match="shapes do not match"):
        empirical_ntk(net, x, {"1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(MaskError, match="does not have"):
        empirical_ntk(net, x, {"9.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not prunable"):
        empirical_ntk(net, x, {"1.bias": torch.ones(32, dtype=torch.bool)})
    # ... unless biases are prunable
    out = empirical_ntk(net, x, {"1.bias": torch.ones(32, dtype=torch.bool)}, include_bias=True)
    assert out.shape == (30, 30)


def test_batchnorm_without_running_stats():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        empirical_ntk(net, torch.randn(3, 4))


def test_include_bias_counts_biases(mlp_case):
    net, x, J = mlp_case
    with_bias = empirical_ntk(net, x, include_bias=True)
    # the bias part of the kernel is PSD: adding it can only increase every eigenvalue
    assert float(with_bias.trace()) > float((J**2).sum())
