"""The three PX rules (option `variant`), each against a hand computation.

The network: Linear(4, 5) -> BatchNorm1d(5) -> ReLU -> Linear(5, 6) -> ReLU -> Linear(6, 3),
float64, non-zero biases, a BatchNorm with non-trivial affine parameters and running
statistics. For every variant the three passes are written out here with explicit matrices
(BatchNorm in train mode is (h - batch mean) / sqrt(biased batch var + eps) * gamma + beta,
in eval mode the same with the running statistics), R is summed over two batches, and
autograd differentiates that hand computation with respect to the pk copy's weights. No
library code is called to build the reference.

    variant      activation pass   jvf (no gradient)                 pk (leaves)
    code-2025    eval              1 * m, classifier theta, x**2     theta**2, classifier theta, 1
    paper        eval              1 * m (classifier too), x**2      theta**2 (classifier too), 1
    code-2024    train             theta * m, x, train               theta**2 (classifier too), x, train
"""  # noqa: E501

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ntksap
from conftest import pooled_bn_net
from ntksap.scoring.px import PXRoundingWarning

RTOL = 1e-9  # float64 on both sides; only the summation order differs


def _net(act: type[nn.Module] = nn.ReLU, **act_kw) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), act(**act_kw),
        nn.Linear(5, 6), act(**act_kw), nn.Linear(6, 3),
    ).double()  # fmt: skip
    with torch.no_grad():
        for i in (0, 3, 5):
            net[i].bias.normal_()  # non-zero biases: the bias paths are part of the check
        bn = net[1]
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return net


def _data(seed: int = 0, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of 6 float64 inputs (B, 4), labels 0, 1, 2, 0, 1, 2."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn((6, 4), generator=g, dtype=torch.float64), torch.arange(6) % 3)
        for _ in range(n)
    ]


def _masks(net: nn.Module, keep: float, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(net[i].weight.shape, generator=g) < keep
            for n, i in (("0.weight", 0), ("3.weight", 3), ("5.weight", 5))}  # fmt: skip


def _bn_train(h: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """Train-mode BatchNorm1d of h (B, C): batch statistics, gradient through them."""
    mean = h.mean(0, keepdim=True)
    var = ((h - mean) ** 2).mean(0, keepdim=True)  # biased, as BN normalises
    return (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.detach() + bn.bias.detach()


def _bn_eval(h: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    return (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight.detach() + (
        bn.bias.detach()
    )


class _P:
    """The net's tensors, detached: w1 (5, 4), b1 (5,), w2 (6, 5), b2, w3 (3, 6), b3, masks."""

    def __init__(self, net: nn.Sequential, masks: dict[str, torch.Tensor]) -> None:
        self.bn = net[1]
        self.w1, self.w2, self.w3 = (net[i].weight.detach() for i in (0, 3, 5))
        self.b1, self.b2, self.b3 = (net[i].bias.detach() for i in (0, 3, 5))
        self.m1, self.m2, self.m3 = (
            masks[n].double() for n in ("0.weight", "3.weight", "5.weight")
        )

    def gates(self, x: torch.Tensor, train: bool, slope: float):
        """Pre-activations of the real masked network: (h1 (B, 5), h2 (B, 6))."""
        bn = _bn_train if train else _bn_eval
        h1 = bn(x @ (self.w1 * self.m1).T + self.b1, self.bn)
        h2 = torch.where(h1 > 0, h1, slope * h1) @ (self.w2 * self.m2).T + self.b2
        return h1, h2


def _gate(h: torch.Tensor, off: float) -> torch.Tensor:
    """The jvf gate: 1 where h > 0, `off` elsewhere (built in float64)."""
    on = (h > 0).double()
    return on + (1.0 - on) * off


def _hand_code_2025(net, masks, data, norm_stats="running", slope=0.0):
    """R and the leaves of the February 2025 rule: classifier theta in both copies."""
    p, bn = _P(net, masks), (_bn_eval if norm_stats == "running" else _bn_train)
    s1 = (p.w1**2).requires_grad_(True)
    s2 = (p.w2**2).requires_grad_(True)
    c3 = p.w3.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for x, _ in data:
        h1, h2 = p.gates(x, train=False, slope=slope)  # activation pass: eval mode
        off = slope**2
        j1 = bn((x**2) @ p.m1.T + 1.0, p.bn) * _gate(h1, off)  # jvf: ones, x**2
        j2 = (j1 @ p.m2.T + 1.0) * _gate(h2, off)
        z1 = j2 @ (p.w3 * p.m3).T + p.b3  # classifier theta
        q1 = bn(torch.ones_like(x) @ (s1 * p.m1).T + p.b1**2, p.bn)  # pk: squares, ones
        q2 = q1 @ (s2 * p.m2).T + p.b2**2
        z2 = q2 @ (c3 * p.m3).T + p.b3  # classifier theta
        total = total + (z1 * z2).sum()
    return total, {"0.weight": s1, "3.weight": s2, "5.weight": c3}


def _hand_paper(net, masks, data, norm_stats="running", slope=0.0):
    """R and the leaves of the paper's equations: the classifier is a path layer too."""
    p, bn = _P(net, masks), (_bn_eval if norm_stats == "running" else _bn_train)
    s1 = (p.w1**2).requires_grad_(True)
    s2 = (p.w2**2).requires_grad_(True)
    s3 = (p.w3**2).requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for x, _ in data:
        h1, h2 = p.gates(x, train=False, slope=slope)
        off = slope**2
        j1 = bn((x**2) @ p.m1.T + 1.0, p.bn) * _gate(h1, off)
        j2 = (j1 @ p.m2.T + 1.0) * _gate(h2, off)
        z1 = j2 @ p.m3.T + 1.0  # classifier weights and bias 1 as well
        q1 = bn(torch.ones_like(x) @ (s1 * p.m1).T + p.b1**2, p.bn)
        q2 = q1 @ (s2 * p.m2).T + p.b2**2
        z2 = q2 @ (s3 * p.m3).T + p.b3**2  # classifier squared as well
        total = total + (z1 * z2).sum()
    return total, {"0.weight": s1, "3.weight": s2, "5.weight": s3}


def _hand_code_2024(net, masks, data, slope=0.0, jvf_ones=False):
    """R and the leaves of the April 2024 code: every copy in train mode, the real batch x
    in all three, pk squares everything but BatchNorm (classifier too); the jvf weights stay
    theta * m (its fill of a copy), or 1 * m with jvf_ones=True (what it meant to do)."""
    p = _P(net, masks)
    s1 = (p.w1**2).requires_grad_(True)
    s2 = (p.w2**2).requires_grad_(True)
    s3 = (p.w3**2).requires_grad_(True)
    v1, v2, v3 = (p.m1, p.m2, p.m3) if jvf_ones else (p.w1 * p.m1, p.w2 * p.m2, p.w3 * p.m3)
    total = torch.zeros((), dtype=torch.float64)
    for x, _ in data:
        h1, h2 = p.gates(x, train=True, slope=slope)  # activation pass: train mode
        j1 = _bn_train(x @ v1.T + p.b1, p.bn) * _gate(h1, 0.0)  # binary gates, x, biases theta
        j2 = (j1 @ v2.T + p.b2) * _gate(h2, 0.0)
        z1 = j2 @ v3.T + p.b3
        q1 = _bn_train(x @ (s1 * p.m1).T + p.b1**2, p.bn)  # pk: the real batch, train mode
        q2 = q1 @ (s2 * p.m2).T + p.b2**2
        z2 = q2 @ (s3 * p.m3).T + p.b3**2
        total = total + (z1 * z2).sum()
    return total, {"0.weight": s1, "3.weight": s2, "5.weight": s3}, (v1, v2, v3)


def _theta2_scores(net, total, leaves, masks) -> dict[str, torch.Tensor]:
    """|dR/dp| * theta^2 * m (code-2025 and paper)."""
    grads = torch.autograd.grad(total, list(leaves.values()))
    params = dict(net.named_parameters())
    return {n: g.abs() * params[n].detach() ** 2 * masks[n].double() for n, g in zip(leaves, grads)}


def _code_2024_scores(net, total, leaves, jvf, masks) -> dict[str, torch.Tensor]:
    """|p1.grad * p1 * p2 * p.pow(2)|: p1 the pk weight (theta^2 m), p2 the jvf weight."""
    grads = torch.autograd.grad(total, list(leaves.values()))
    params = dict(net.named_parameters())
    return {
        n: (g * (s * masks[n].double()) * v * params[n].detach() ** 2).abs()
        for (n, s), g, v in zip(leaves.items(), grads, jvf)
    }


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], blind=()) -> None:
    """Equal to float64 rounding. `blind`: tensors whose exact score is 0 (both sides must
    be rounding noise, below 1e-12 of the largest score)."""
    assert set(got) == set(want)
    top = max(float(w.abs().max()) for w in want.values())
    for n in blind:
        assert float(want[n].abs().max()) < 1e-12 * top, n
        assert float(got[n].abs().max()) < 1e-12 * top, n
    for n, w in want.items():
        if n in blind:
            continue
        assert got[n].dtype == torch.float64, n
        scale = float(w.abs().max())
        assert scale > 0, n  # a reference of zeros would prove nothing
        torch.testing.assert_close(got[n], w, rtol=RTOL, atol=RTOL * scale, msg=n)


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names=None) -> None:
    for n in names or a:
        assert not torch.allclose(a[n], b[n], rtol=1e-3), f"{n}: the variants should differ"


MASKINGS = [1.0, 0.7]
MASK_IDS = ["dense", "masked"]


# ---------------------------------------------------------------------------------------
# Each variant against its hand computation
# ---------------------------------------------------------------------------------------
# With norm_stats="batch" the pk copy feeds B identical all-ones rows to a train-mode
# BatchNorm1d: its output is beta whatever the first layer's weights, whose exact score is
# then 0 (the blind spot the module docstring describes; here without any pooling).
BLIND = {"running": (), "batch": ("0.weight",)}


@pytest.mark.filterwarnings("ignore::ntksap.scoring.px.PXRoundingWarning")  # the blind spot
@pytest.mark.parametrize("norm_stats", ["running", "batch"])
@pytest.mark.parametrize("keep", MASKINGS, ids=MASK_IDS)
def test_code_2025_equals_the_hand_computation(keep, norm_stats):
    net, data = _net(), _data()
    masks = _masks(net, keep)
    got = ntksap.compute_scores(
        net, "px", data=data, masks=masks, variant="code-2025", norm_stats=norm_stats
    )
    want = _theta2_scores(net, *_hand_code_2025(net, masks, data, norm_stats), masks)
    _close(got, want, blind=BLIND[norm_stats])
    if norm_stats == "running":  # code-2025's own default is running statistics
        again = ntksap.compute_scores(net, "px", data=data, masks=masks, variant="code-2025")
        _close(again, got)


@pytest.mark.filterwarnings("ignore::ntksap.scoring.px.PXRoundingWarning")  # the blind spot
@pytest.mark.parametrize("norm_stats", ["running", "batch"])
@pytest.mark.parametrize("keep", MASKINGS, ids=MASK_IDS)
def test_paper_equals_the_hand_computation(keep, norm_stats):
    net, data = _net(), _data()
    masks = _masks(net, keep)
    got = ntksap.compute_scores(
        net, "px", data=data, masks=masks, variant="paper", norm_stats=norm_stats
    )
    want = _theta2_scores(net, *_hand_paper(net, masks, data, norm_stats), masks)
    _close(got, want, blind=BLIND[norm_stats])


@pytest.mark.parametrize("keep", MASKINGS, ids=MASK_IDS)
def test_code_2024_equals_the_hand_computation(keep):
    net, data = _net(), _data()
    masks = _masks(net, keep)
    got = ntksap.compute_scores(net, "px", data=data, masks=masks, variant="code-2024")
    total, leaves, jvf = _hand_code_2024(net, masks, data)
    _close(got, _code_2024_scores(net, total, leaves, jvf, masks))
    # the default rule is code-2024 (chosen by benchmarks/px_variants.md)
    _close(ntksap.compute_scores(net, "px", data=data, masks=masks), got)
    if keep < 1:
        for n, m in masks.items():
            assert bool((got[n][~m] == 0).all()), f"{n}: pruned weights must score 0"


def test_leaky_relu_gate_per_variant():
    """LeakyReLU (slope 0.2): paper and code-2025 gate jvf with slope**2 (their default),
    code-2024 with 0/1 as its torch.where(u > 0, 1.0, 0.0) does."""
    net, data = _net(nn.LeakyReLU, negative_slope=0.2), _data(seed=3)
    masks = _masks(net, 0.7, seed=4)
    got = ntksap.compute_scores(net, "px", data=data, masks=masks, variant="paper")
    _close(got, _theta2_scores(net, *_hand_paper(net, masks, data, slope=0.2), masks))
    got = ntksap.compute_scores(net, "px", data=data, masks=masks, variant="code-2024")
    total, leaves, jvf = _hand_code_2024(net, masks, data, slope=0.2)
    _close(got, _code_2024_scores(net, total, leaves, jvf, masks))


# ---------------------------------------------------------------------------------------
# The variants differ where they should
# ---------------------------------------------------------------------------------------
def test_the_fill_of_a_copy_is_what_code_2024_reproduces():
    """`p[m > 0].fill_(1.0)` indexes with a boolean mask, which makes a copy: p keeps its
    values. So the April 2024 jvf copy is the masked network itself (z1 = f(x), train mode,
    for a ReLU net) and its score carries |theta| instead of 1 * m. code-2024 reproduces
    that (the hand computation above); the fill it meant to do (jvf weights 1 * m) would
    rank the weights differently."""
    p, m = torch.tensor([0.5, -2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0])
    p[m > 0].fill_(1.0)
    p[m <= 0].fill_(0.0)
    assert p.tolist() == [0.5, -2.0, 3.0]  # torch semantics: the fill never reached p

    net, data = _net(), _data()
    masks = _masks(net, 0.7)
    got = ntksap.compute_scores(net, "px", data=data, masks=masks, variant="code-2024")
    total, leaves, jvf = _hand_code_2024(net, masks, data, jvf_ones=True)
    meant = _code_2024_scores(net, total, leaves, jvf, masks)
    _differ(got, meant)
    assert any(  # not only a rescaling: the order of the kept weights changes
        not torch.equal(got[n][masks[n]].argsort(), meant[n][masks[n]].argsort()) for n in got
    )


def test_each_pair_of_variants_scores_differently():
    net, data = _net(), _data()
    masks = _masks(net, 0.7)
    got = {
        v: ntksap.compute_scores(net, "px", data=data, masks=masks, variant=v)
        for v in ("code-2025", "paper", "code-2024")
    }
    _differ(got["code-2025"], got["paper"])  # the classifier is a path layer in the paper
    _differ(got["paper"], got["code-2024"])
    batch = ntksap.compute_scores(
        net, "px", data=data, masks=masks, variant="code-2025", norm_stats="batch"
    )
    _differ(batch, got["code-2024"])  # the same BN rule, not the same passes


def test_code_2024_has_no_batchnorm_blind_spot_before_a_global_pool():
    """pk on all-ones images in train mode cannot see the convs before a globally pooled
    BatchNorm (the rounding warning of norm_stats="batch"); code-2024 feeds pk the real
    batch, so the same network scores its convs and nothing warns."""
    net = pooled_bn_net()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn((6, 2, 5, 5), generator=g, dtype=torch.float64), torch.arange(6) % 3)]
    with pytest.warns(PXRoundingWarning, match="float rounding"):
        ntksap.compute_scores(net, "px", data=data, variant="paper", norm_stats="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PXRoundingWarning)
        old = ntksap.compute_scores(net, "px", data=data, variant="code-2024")
    fc = float(old["8.weight"].max())
    for conv in ("0.weight", "3.weight"):
        assert float(old[conv].max()) > 1e-6 * fc, conv


# ---------------------------------------------------------------------------------------
# Options a variant fixes, and what the metadata records
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "option", "value", "words"),
    [
        ("code-2024", "norm_stats", "running", ["fixes norm_stats='batch'", "train mode",
         "got norm_stats='running'", "'code-2025' or 'paper'", "batch or running"]),
        ("code-2024", "leaky_gate", "squared", ["fixes leaky_gate='binary'",
         "got leaky_gate='squared'", "squared or binary"]),
        ("code-2024", "classifier", "5", ["fixes no classifier", "got classifier='5'",
         "variant='code-2025'"]),
        ("paper", "classifier", "5", ["variant='paper' fixes no classifier", "all parameters one",
         "variant='code-2025'"]),
    ],
)  # fmt: skip
def test_an_option_a_variant_fixes_is_an_error_when_it_conflicts(variant, option, value, words):
    net, data = _net(), _data(n=1)
    with pytest.raises(ValueError) as info:
        ntksap.prune(net, "px", density=0.5, data=data, variant=variant, **{option: value})
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_variant_names_the_choices():
    with pytest.raises(ValueError, match=r"px variant must be one of code-2025, paper, code-2024"):
        ntksap.prune(_net(), "px", density=0.5, data=_data(n=1), variant="2024")


@pytest.mark.parametrize(
    ("variant", "given", "recorded"),
    [
        ("code-2025", {}, {"norm_stats": "running", "leaky_gate": "squared", "classifier": "5"}),
        ("code-2025", {"norm_stats": "batch", "leaky_gate": "binary"},
         {"norm_stats": "batch", "leaky_gate": "binary", "classifier": "5"}),
        ("paper", {"norm_stats": "batch"},
         {"norm_stats": "batch", "leaky_gate": "squared", "classifier": None}),
        ("code-2024", {"norm_stats": "batch", "leaky_gate": "binary"},  # the fixed values
         {"norm_stats": "batch", "leaky_gate": "binary", "classifier": None}),
        ("code-2024", {}, {"norm_stats": "batch", "leaky_gate": "binary", "classifier": None}),
    ],
)  # fmt: skip
def test_the_metadata_records_the_values_each_variant_used(variant, given, recorded):
    masks = ntksap.prune(
        _net(), "px", density=0.5, data=_data(n=1), rounds=2, variant=variant, **given
    )
    opts = masks.metadata["options"]
    assert opts["variant"] == variant
    assert {k: opts[k] for k in recorded} == recorded


@pytest.mark.filterwarnings("ignore::ntksap.LayerCollapseWarning")
@pytest.mark.filterwarnings("ignore::ntksap.scoring.px.PXRoundingWarning")
@pytest.mark.parametrize("variant", ["paper", "code-2024"])
@pytest.mark.parametrize(("model", "shape"), [("resnet20", (3, 32, 32)), ("lenet5", (1, 28, 28))])
def test_zoo_models_prune_with_every_variant(model, shape, variant):
    net = ntksap.models.create(model, num_classes=10, in_channels=shape[0])
    data = [(torch.randn(4, *shape), torch.arange(4))]
    masks = ntksap.prune(net, "px", sparsity=0.9, data=data, rounds=2, variant=variant)
    assert masks.num_kept == round(0.1 * masks.num_total)
    assert masks.metadata["options"]["variant"] == variant
