"""PX (Path eXclusion): scores against independent hand computations, activation handling,
bad input, the zoo and the command line.

The reference values are computed here without the library: the activation patterns, z1
(all-ones network on x**2, gated), z2 (squared-weight linear network on ones) and R are
written out layer by layer with explicit matrices (a convolution is its im2col matrix,
BatchNorm in train mode is (h - batch mean) / sqrt(biased batch var + eps)), and autograd
differentiates that hand computation with respect to the squared weights. For the MLP the
gradient is also written in closed form.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from conftest import pooled_bn_net
from ntksap import models
from ntksap.cli import main
from ntksap.scoring.px import PXRoundingWarning

torch.set_default_dtype(torch.float32)  # the tests build float64 models explicitly

RTOL = 1e-10  # float64 on both sides; only the summation order differs


def _batches(shape: tuple[int, ...], classes: int, per_batch: int, n: int, seed: int = 0):
    """`n` batches of `per_batch` float64 inputs each, labels cycling over the classes."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn((per_batch, *shape), generator=g, dtype=torch.float64),
            torch.arange(per_batch) % classes,
        )
        for _ in range(n)
    ]


def _random_masks(net: nn.Module, keep: float = 0.7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) < keep
        for n, p in ntksap.prunable_parameters(net).items()
    }


def _close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], zero: tuple[str, ...] = ()
) -> None:
    """Equal to float64 rounding; every reference non-zero except the tensors in `zero`."""
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == torch.float64, n
        scale = float(want[n].abs().max())
        if n in zero:
            assert scale == 0 and float(got[n].abs().max()) == 0, n
            continue
        assert scale > 0, n  # a reference of zeros would prove nothing
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=RTOL * scale, msg=n)


# ---------------------------------------------------------------------------------------
# (a) a 3-layer ReLU MLP, by hand
# ---------------------------------------------------------------------------------------
def _mlp(act: type[nn.Module] = nn.ReLU, **act_kw) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 5), act(**act_kw), nn.Linear(5, 6), act(**act_kw), nn.Linear(6, 3)
    ).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.normal_()  # non-zero biases: the bias path is part of the check
    return net


def _mlp_hand(net: nn.Sequential, masks, data, gate_off: float = 0.0, slope: float = 0.0):
    """R(S1, S2, W3) of the MLP written out; returns (R, leaves) with leaves the tensors the
    scores differentiate: S1 = W1**2, S2 = W2**2 and the classifier's W3 itself.

    gate_off: the jvf gate of a unit with negative input (0 for ReLU); slope: the real
    network's negative slope (0 for ReLU).
    """
    w1, w2, w3 = (net[i].weight.detach() for i in (0, 2, 4))
    b1, b2, b3 = (net[i].bias.detach() for i in (0, 2, 4))
    m1, m2, m3 = (masks[f"{i}.weight"].double() for i in (0, 2, 4))
    s1 = (w1**2).requires_grad_(True)  # (5, 4)
    s2 = (w2**2).requires_grad_(True)  # (6, 5)
    c3 = w3.clone().requires_grad_(True)  # (3, 6): the classifier keeps theta
    total = torch.zeros((), dtype=torch.float64)
    for x, _ in data:  # x (B, 4)
        # activation pattern: the real masked network
        h1 = x @ (w1 * m1).T + b1  # (B, 5)
        a1 = h1 > 0
        h2 = torch.where(a1, h1, slope * h1) @ (w2 * m2).T + b2  # (B, 6)
        a2 = h2 > 0

        def gate(a: torch.Tensor) -> torch.Tensor:  # built in float64: 0.04 is not exact
            return a.double() + (~a).double() * gate_off

        # jvf: weights and biases 1 (masked), gated, classifier theta, fed x**2
        j1 = ((x**2) @ m1.T + 1.0) * gate(a1)  # (B, 5)
        j2 = (j1 @ m2.T + 1.0) * gate(a2)  # (B, 6)
        z1 = j2 @ (w3 * m3).T + b3  # (B, 3)
        # pk: weights and biases squared (masked), no activations, classifier theta, ones
        ones = torch.ones_like(x)
        p1 = ones @ (s1 * m1).T + b1**2  # (B, 5)
        p2 = p1 @ (s2 * m2).T + b2**2  # (B, 6)
        z2 = p2 @ (c3 * m3).T + b3  # (B, 3)
        total = total + (z1 * z2).sum()
    return total, {"0.weight": s1, "2.weight": s2, "4.weight": c3}


def _scores_from_hand(net, total, leaves, masks) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(total, list(leaves.values()))
    params = dict(net.named_parameters())
    return {n: g.abs() * params[n].detach() ** 2 * masks[n].double() for n, g in zip(leaves, grads)}


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_mlp_scores_equal_the_hand_computation(masked):
    net = _mlp()
    data = _batches((4,), 3, 6, n=2)  # two batches: R sums over both
    masks = (
        _random_masks(net)
        if masked
        else {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    )
    masks = {n: m for n, m in masks.items() if n.endswith("weight")}
    got = ntksap.compute_scores(net, "px", variant="code-2025", data=data, masks=masks)
    total, leaves = _mlp_hand(net, masks, data)
    want = _scores_from_hand(net, total, leaves, masks)
    _close(got, want)
    if masked:
        for n, m in masks.items():
            assert bool((got[n][~m] == 0).all()), f"{n}: pruned weights must score 0"

    # closed form of the same gradients (no autograd): z2 is the same for every row
    w1, w2, w3 = (net[i].weight.detach() for i in (0, 2, 4))
    b1, _, _ = (net[i].bias.detach() for i in (0, 2, 4))
    m1, m2, m3 = (masks[f"{i}.weight"].double() for i in (0, 2, 4))
    z1_sum = torch.zeros(3, dtype=torch.float64)  # sum over all images of z1, (3,)
    for x, _ in data:
        h1 = x @ (w1 * m1).T + net[0].bias.detach()
        h2 = h1.clamp(min=0) @ (w2 * m2).T + net[2].bias.detach()
        j2 = ((((x**2) @ m1.T + 1) * (h1 > 0)) @ m2.T + 1) * (h2 > 0)
        z1_sum += (j2 @ (w3 * m3).T + net[4].bias.detach()).sum(0)
    p1 = (w1**2 * m1).sum(1) + b1**2  # (5,) pk after layer 1 (input ones)
    p2 = (w2**2 * m2) @ p1 + net[2].bias.detach() ** 2  # (6,)
    v3 = z1_sum @ (w3 * m3)  # (6,) dR/dp2
    closed = {
        "0.weight": ((v3 @ (w2**2 * m2))[:, None] * m1) * w1**2,  # dR/dS1 = (v3 W2^2)_j * 1
        "2.weight": (v3[:, None] * p1[None, :] * m2) * w2**2,
        "4.weight": (z1_sum[:, None] * p2[None, :] * m3).abs() * w3**2,
    }
    _close(got, {n: closed[n].abs() for n in closed})


def test_leaky_relu_gate_is_the_squared_slope_or_binary():
    net = _mlp(nn.LeakyReLU, negative_slope=0.2)
    data = _batches((4,), 3, 6, n=2, seed=3)
    masks = _random_masks(net, seed=4)
    got = ntksap.compute_scores(net, "px", variant="code-2025", data=data, masks=masks)
    total, leaves = _mlp_hand(net, masks, data, gate_off=0.2**2, slope=0.2)
    _close(got, _scores_from_hand(net, total, leaves, masks))
    binary = ntksap.compute_scores(
        net, "px", variant="code-2025", data=data, masks=masks, leaky_gate="binary"
    )
    total, leaves = _mlp_hand(net, masks, data, gate_off=0.0, slope=0.2)
    _close(binary, _scores_from_hand(net, total, leaves, masks))
    assert not torch.allclose(got["0.weight"], binary["0.weight"])  # the gate matters


# ---------------------------------------------------------------------------------------
# (b) a small conv net with BatchNorm, by hand
# ---------------------------------------------------------------------------------------
def _convnet() -> nn.Sequential:
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),  # (B, 3, 5, 5)
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, bias=False),  # (B, 4, 5, 5)
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),  # no global average pool: see test_batch_statistics_blind_spot
        nn.Linear(4 * 5 * 5, 3),
    ).double()
    with torch.no_grad():  # non-trivial BN state: affine and running statistics
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
        net[0].bias.normal_(0, 0.3)
    return net


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """3x3, padding 1 convolution as one explicit matrix product over im2col columns."""
    n, _, h, wd = x.shape
    cols = F.unfold(x, 3, padding=1)  # (N, C*9, H*W)
    out = (w.reshape(w.shape[0], -1) @ cols).reshape(n, w.shape[0], h, wd)
    return out if b is None else out + b[None, :, None, None]


def _bn_train(h: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as BN normalises
    g, b = bn.weight.detach()[None, :, None, None], bn.bias.detach()[None, :, None, None]
    return (h - mean) / torch.sqrt(var + bn.eps) * g + b


def _bn_eval(h: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    rm, rv = bn.running_mean[None, :, None, None], bn.running_var[None, :, None, None]
    g, b = bn.weight.detach()[None, :, None, None], bn.bias.detach()[None, :, None, None]
    return (h - rm) / torch.sqrt(rv + bn.eps) * g + b


def _convnet_hand(net: nn.Sequential, masks, data, norm_stats: str = "batch"):
    """R(S1, S2, W3) of the conv net written out (see `_mlp_hand`); BN in jvf and pk with
    batch statistics (train mode) or running statistics (norm_stats="running")."""
    bn = _bn_train if norm_stats == "batch" else _bn_eval
    w1, w2, w3 = net[0].weight.detach(), net[3].weight.detach(), net[7].weight.detach()
    b1, b3 = net[0].bias.detach(), net[7].bias.detach()
    m1, m2, m3 = (masks[n].double() for n in ("0.weight", "3.weight", "7.weight"))
    s1 = (w1**2).requires_grad_(True)
    s2 = (w2**2).requires_grad_(True)
    c3 = w3.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for x, _ in data:  # x (B, 2, 5, 5)
        # activation pattern: eval mode, running statistics
        h1 = _bn_eval(_conv(x, w1 * m1, b1), net[1])  # (B, 3, 5, 5)
        a1 = (h1 > 0).double()
        h2 = _bn_eval(_conv(h1.clamp(min=0), w2 * m2, None), net[4])  # (B, 4, 5, 5)
        a2 = (h2 > 0).double()
        # jvf: weights and bias 1 (masked), BN with its own affine parameters, gated
        j = bn(_conv(x**2, torch.ones_like(w1) * m1, torch.ones_like(b1)), net[1]) * a1
        j = bn(_conv(j, torch.ones_like(w2) * m2, None), net[4]) * a2  # (B, 4, 5, 5)
        z1 = j.flatten(1) @ (w3 * m3).T + b3  # (B, 3)
        # pk: squared weights and bias, BN as it is, identity activations, all-ones input
        p = bn(_conv(torch.ones_like(x), s1 * m1, b1**2), net[1])
        p = bn(_conv(p, s2 * m2, None), net[4])
        z2 = p.flatten(1) @ (c3 * m3).T + b3  # (B, 3)
        total = total + (z1 * z2).sum()
    return total, {"0.weight": s1, "3.weight": s2, "7.weight": c3}


@pytest.mark.parametrize("norm_stats", ["batch", "running"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_convnet_with_batchnorm_equals_the_hand_computation(masked, norm_stats):
    net = _convnet()
    data = _batches((2, 5, 5), 3, 6, n=2, seed=5)
    masks = _random_masks(net, keep=0.7 if masked else 1.0, seed=6)
    got = ntksap.compute_scores(
        net, "px", variant="code-2025", data=data, masks=masks, norm_stats=norm_stats
    )
    total, leaves = _convnet_hand(net, masks, data, norm_stats)
    _close(got, _scores_from_hand(net, total, leaves, masks))


def test_batch_statistics_blind_spot_before_a_globally_averaged_batchnorm():
    """The documented caveat of norm_stats="batch": pk is fed the same image B times, so a
    train-mode BN output averages to beta over each image's positions, and after a global
    average pool z2 no longer depends on the convs: their exact (float64) scores vanish,
    while the classifier's (beta != 0) and every score with norm_stats="running" do not."""
    net = pooled_bn_net()
    data = _batches((2, 5, 5), 3, 6, n=1)
    with pytest.warns(PXRoundingWarning, match=r"2 of 3 prunable tensors are float rounding"):
        batch = ntksap.compute_scores(net, "px", variant="code-2025", data=data, norm_stats="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PXRoundingWarning)  # no false alarm here...
        running = ntksap.compute_scores(net, "px", variant="code-2025", data=data)  # its default
        ntksap.compute_scores(
            _convnet(), "px", variant="code-2025", data=data, norm_stats="batch"
        )  # real signal
    fc = float(batch["8.weight"].max())
    assert fc > 1e-3
    for conv in ("0.weight", "3.weight"):
        assert float(batch[conv].max()) < 1e-12 * fc, conv  # rounding noise only
        assert float(running[conv].max()) > 1e-3 * float(running["8.weight"].max()), conv


@pytest.mark.filterwarnings("ignore::ntksap.LayerCollapseWarning")  # side is pruned away
def test_the_classifier_is_found_by_structure_not_order_or_name():
    """fc defined first, a side Linear run after it that never reaches the logits: the
    classifier is still fc, and naming it (module or parameter) gives the same scores."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)
            self.body = nn.Linear(4, 5)
            self.side = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(torch.relu(self.body(x)))
            self.side(out)  # called last, result unused
            return out

    torch.manual_seed(0)
    net = Net().double()
    data = _batches((4,), 3, 6, n=1)
    masks = ntksap.prune(net, "px", variant="code-2025", density=0.5, data=data, rounds=2)
    assert masks.metadata["options"]["classifier"] == "fc"
    auto = ntksap.compute_scores(net, "px", variant="code-2025", data=data)
    assert float(auto["side.weight"].abs().max()) == 0  # it does not reach the logits
    for name in ("fc", "fc.weight"):
        got = ntksap.compute_scores(net, "px", variant="code-2025", data=data, classifier=name)
        _close(got, auto, zero=("side.weight",))
    other = ntksap.compute_scores(net, "px", variant="code-2025", data=data, classifier="body")
    assert not torch.allclose(other["fc.weight"], auto["fc.weight"])  # the choice matters
    with pytest.raises(ValueError, match=r"classifier must name a module.*'head'.*fc"):
        ntksap.compute_scores(net, "px", variant="code-2025", data=data, classifier="head")


# ---------------------------------------------------------------------------------------
# How activations are written does not matter; what PX cannot handle is refused
# ---------------------------------------------------------------------------------------
class _FunctionalMLP(nn.Module):
    """The MLP of `_mlp()` with its activations as function calls of several spellings."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3)
        self.style = style

    def act(self, h: torch.Tensor) -> torch.Tensor:
        if self.style == "F.relu":
            return F.relu(h)
        if self.style == "torch.relu":
            return torch.relu(h)
        if self.style == "Tensor.relu_":
            return h.relu_()
        if self.style == "F.relu(inplace)":
            F.relu(h, inplace=True)
            return h  # relies on the in-place semantics
        raise AssertionError(self.style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.act(self.l2(self.act(self.l1(x)))))


@pytest.mark.parametrize("style", ["F.relu", "torch.relu", "Tensor.relu_", "F.relu(inplace)"])
def test_functional_relu_is_handled_like_relu_modules(style):
    ref = _mlp()
    net = _FunctionalMLP(style).double()
    net.load_state_dict(
        {k.replace("0.", "l1.").replace("2.", "l2.").replace("4.", "l3."): v
         for k, v in ref.state_dict().items()}
    )  # fmt: skip
    data = _batches((4,), 3, 6, n=2)
    want = ntksap.compute_scores(ref, "px", variant="code-2025", data=data)
    got = ntksap.compute_scores(net, "px", variant="code-2025", data=data)
    _close({k.replace("l1.", "0.").replace("l2.", "2.").replace("l3.", "4."): v
            for k, v in got.items()}, want)  # fmt: skip


def test_inplace_relu_modules_and_dropout_change_nothing():
    ref = _mlp()
    data = _batches((4,), 3, 6, n=2)
    want = ntksap.compute_scores(ref, "px", variant="code-2025", data=data)
    inplace = copy.deepcopy(ref)
    inplace[1].inplace = inplace[3].inplace = True
    _close(ntksap.compute_scores(inplace, "px", variant="code-2025", data=data), want)
    with_dropout = nn.Sequential(*ref[:2], nn.Dropout(0.5), *ref[2:4], nn.Dropout(0.5), ref[4])
    got = ntksap.compute_scores(with_dropout, "px", variant="code-2025", data=data)
    _close({n.replace("3.", "2.").replace("6.", "4."): s for n, s in got.items()}, want)


@pytest.mark.parametrize(
    ("act", "name"),
    [(nn.GELU(), "GELU"), (nn.SiLU(), "SiLU"), (nn.Tanh(), "Tanh"), (nn.ReLU6(), "ReLU6")],
)
def test_other_activation_modules_are_a_clear_error(act, name):
    net = nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3))
    with pytest.raises(ValueError, match=rf"ReLU/LeakyReLU networks only.*{name} at '1'.*"
                       r"Valid activations: ReLU, LeakyReLU"):  # fmt: skip
        ntksap.prune(net, "px", variant="code-2025", density=0.5, data=_batches((4,), 3, 6, 1))


@pytest.mark.parametrize("fn", [F.gelu, F.silu, torch.tanh, torch.sigmoid])
def test_other_functional_activations_are_a_clear_error_before_any_score(fn, monkeypatch):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(fn(self.a(x)))

    seen = []  # backward passes: there must be none (no score was computed)
    real_grad = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd, "grad", lambda *a, **k: seen.append(1) or real_grad(*a, **k)
    )
    with pytest.raises(ValueError, match=rf"the torch function {fn.__name__} \(called in the "
                       r"model's forward\).*Valid activations: ReLU, LeakyReLU"):  # fmt: skip
        ntksap.compute_scores(Net(), "px", variant="code-2025", data=_batches((4,), 3, 6, 1))
    assert not seen


def test_activations_that_differ_between_train_and_eval_mode_cannot_be_aligned():
    """With norm_stats="batch" jvf and pk run in train mode: a forward that calls other
    activations in train mode is refused before work; in eval mode (default) all passes agree."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.a(x))
            if self.training:  # an extra activation in train mode only
                h = F.relu(h)
            return self.b(h)

    data = _batches((4,), 3, 6, 1)
    with pytest.raises(ValueError, match=r"cannot align the activation patterns.*train mode"):
        ntksap.prune(
            Branchy(), "px", variant="code-2025", density=0.5, data=data, norm_stats="batch"
        )
    masks = ntksap.prune(Branchy(), "px", variant="code-2025", density=0.5, data=data, rounds=2)
    assert masks.num_kept == round(0.5 * masks.num_total)


def test_integer_inputs_are_refused():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    data = [(torch.randint(0, 10, (6, 2)), torch.arange(6) % 3)]
    with pytest.raises(ValueError, match="floating point"):
        ntksap.prune(net, "px", variant="code-2025", density=0.5, data=data)


def test_pruning_leaves_the_model_untouched():
    net = _convnet()
    net[2].inplace = True
    net[1].momentum = None
    net.train()
    before = copy.deepcopy(net.state_dict())
    modes = [m.training for m in net.modules()]
    ntksap.prune(
        net, "px", variant="code-2025", sparsity=0.9, data=_batches((2, 5, 5), 3, 6, 2), rounds=3
    )
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == [m.training for m in net.modules()]
    assert net[2].inplace and net[1].momentum is None
    assert all(not h for m in net.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


# ---------------------------------------------------------------------------------------
# The zoo and the command line
# ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::ntksap.LayerCollapseWarning")
@pytest.mark.filterwarnings("ignore::ntksap.scoring.px.PXRoundingWarning")  # BN + global pool
@pytest.mark.parametrize(
    ("model", "shape", "classifier"),
    [("resnet20", (3, 32, 32), "fc"), ("vgg16_bn", (3, 16, 16), "classifier"),
     ("lenet5", (1, 28, 28), "fc3")],
)  # fmt: skip
def test_zoo_models(model, shape, classifier):
    net = models.create(model, num_classes=10, in_channels=shape[0])
    data = [(torch.randn(4, *shape), torch.arange(4))]  # few images: VGG-16 is 15M weights
    masks = ntksap.prune(net, "px", variant="code-2025", sparsity=0.9, data=data, rounds=2)
    assert masks.num_kept == round(0.1 * masks.num_total)
    assert masks.metadata["options"]["classifier"] == classifier
    assert masks.metadata["rounds"] == 2 and masks.metadata["method"] == "px"


def test_registered_with_the_paper_defaults():
    meth = ntksap.get_method("px")
    assert "px" in ntksap.list_methods()
    assert meth.needs_data and meth.default_rounds == 100
    assert meth.defaults == {
        "variant": "code-2024", "classifier": None, "leaky_gate": None, "norm_stats": None,
        "precision": "auto",
    }  # fmt: skip
    assert meth.options["variant"].choices == ("code-2025", "paper", "code-2024")


def test_cli_lists_and_prunes_with_px(tmp_path, capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert any(line.split()[:1] == ["px"] for line in listed.splitlines()), listed
    out = tmp_path / "px.safetensors"
    argv = ["prune", "--model", "lenet5", "--input-shape", "1,28,28", "--method", "px",
            "--sparsity", "0.9", "--rounds", "2", "--dataset", "synthetic", "--out", str(out),
            "--no-progress", "--variant", "code-2025"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    masks = ntksap.Masks.load(out)
    assert masks.metadata["method"] == "px" and masks.metadata["options"]["classifier"] == "fc3"
    assert masks.metadata["options"]["variant"] == "code-2025"
    out.unlink()
    assert main(argv[:-2]) == 0, capsys.readouterr().err  # the default rule: code-2024
    options = ntksap.Masks.load(out).metadata["options"]
    assert (options["variant"], options["norm_stats"], options["classifier"]) == (
        "code-2024",
        "batch",
        None,
    )


def test_cli_run_sweep_and_spectrum_take_px(tmp_path, capsys):
    """`ntksap run` prunes with px on real data and trains; `sweep` plans px cells;
    `spectrum` scores px on the data set's images."""
    run_dir = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--model", "lenet5", "--epochs", "1",
            "--no-progress", "--method", "px", "--sparsity", "0.8", "--rounds", "2",
            "--out", str(run_dir)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    masks = ntksap.Masks.load(run_dir / "mask.safetensors")
    assert masks.metadata["method"] == "px" and masks.metadata["rounds"] == 2
    assert masks.num_kept == round(0.2 * masks.num_total)
    argv = ["sweep", "--dataset", "digits", "--methods", "px", "ntksap", "--sparsities", "0.9",
            "--out", str(tmp_path / "sw"), "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    assert "px-s90-seed0-" in capsys.readouterr().out
    argv = ["spectrum", "--model", "lenet5", "--dataset", "digits", "--sparsity", "0.8",
            "--methods", "px", "--samples", "10", "--fd-draws", "1", "--set", "px.rounds=2",
            "--out-dir", str(tmp_path / "spec")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "px" in capsys.readouterr().out


def test_a_jvf_beyond_float32_is_computed_wide_and_scaled_by_a_power_of_two():
    """24 ReLU layers of width 48: the all-ones jvf copy multiplies by ~24 per layer, |z1|
    ~ 1e33-1e38, beyond the float32 limit px uses as is (2**100). precision="auto" then
    computes z1 in float64 and scales it by 2**-k: the float32 scores equal the float64
    ones divided by one power of two (to float32 rounding), and the masks are the same."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(16, 48), nn.ReLU()]
    for _ in range(23):
        layers += [nn.Linear(48, 48), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(48, 3)).float()
    data = [(x.float(), y) for x, y in _batches((4, 4), 3, 12, n=2)]
    s32 = ntksap.compute_scores(net, "px", variant="code-2025", data=data)
    s64 = ntksap.compute_scores(net, "px", variant="code-2025", data=data, precision="float64")
    total32 = sum(float(s.double().sum()) for s in s32.values())
    total64 = sum(float(s.sum()) for s in s64.values())
    assert total64 > 2.0**100  # the unscaled scores: out of float32's usable range
    ratio = total64 / total32
    assert ratio > 2.0**20 and math.isclose(ratio, 2.0 ** round(math.log2(ratio)), rel_tol=1e-5)
    for n in s32:
        assert s32[n].dtype == torch.float32
        assert torch.allclose(s32[n].double() * ratio, s64[n], rtol=1e-4, atol=0), n
    m32 = ntksap.prune(net, "px", variant="code-2025", data=data, density=0.1, rounds=3)
    m64 = ntksap.prune(
        net, "px", variant="code-2025", data=data, density=0.1, rounds=3, precision="float64"
    )
    assert m32 == m64
    assert m32.metadata["options"]["precision"] == "auto"  # stayed float32 (with a wide jvf)
