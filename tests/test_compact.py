"""`ntksap.compact`: dead channels removed, outputs equal to the masked dense model."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from ntksap import models
from ntksap.attach import apply_masks
from ntksap.compact import (
    CompactionError,
    CompactionResult,
    compact,
    compact_with_masks,
    compaction_report,
    relative_error,
)
from ntksap.masks import Masks
from ntksap.targets import prunable_parameters


def masked_output(model: nn.Module, masks: Masks, x: torch.Tensor) -> torch.Tensor:
    """The reference: the dense model with the masks attached (parametrize), eval mode."""
    import copy

    ref = apply_masks(copy.deepcopy(model), masks).eval()
    with torch.no_grad():
        return ref(x)


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and biases, as after training: dead channels then
    output non-zero constants (at initialisation they are exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 2 - 1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=g) * 2 - 1)
            elif isinstance(mod, nn.Conv2d | nn.Linear) and mod.bias is not None:
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) - 0.5)
    return model


def random_masks(model: nn.Module, density: float, dead: float, seed: int = 0) -> Masks:
    """Random masks at `density`, with a fraction `dead` of every tensor's output rows and,
    separately, of its input columns pruned whole: dead channels of both kinds."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in prunable_parameters(model).items():
        m = torch.rand(p.shape, generator=g) < density
        if p.dim() >= 2:
            m[torch.rand(p.shape[0], generator=g) < dead] = False
            m[:, torch.rand(p.shape[1], generator=g) < dead] = False
        out[name] = m
    return Masks(out)


def check(model: nn.Module, masks: Masks, shape: tuple[int, ...]) -> nn.Module:
    """Compact, then compare with the masked model on a fresh input (1e-5 relative) and check
    the pruned weights of what remains are exact zeros; returns the compacted model."""
    small, small_masks, _ = compact_with_masks(model, masks, torch.zeros(1, *shape))
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = small(x)
    assert relative_error(got, masked_output(model, masks, x)) <= 1e-5
    params = dict(small.named_parameters())
    for name, m in small_masks.items():
        assert params[name].shape == m.shape
        assert bool((params[name][~m] == 0).all()), name
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    return small


# ---------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------
def hand_mlp() -> tuple[nn.Module, Masks]:
    """4 -> 3 -> 3 -> 2. Hidden layer 1: unit 0 keeps no input weight (it outputs the
    constant relu(b1[0]) = 0.7), unit 1 feeds only unit 1 of layer 2, which feeds nothing
    (no output path for either), unit 2 is alive. Layer 2: unit 0 reads units 0 and 2 of
    layer 1, unit 2 reads unit 2."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([0.7, 0.2, 0.1]))
    t, f = True, False
    masks = Masks(
        {
            "0.weight": torch.tensor([[f, f, f, f], [t, f, f, f], [f, t, t, f]]),
            "2.weight": torch.tensor([[t, f, t], [f, t, f], [f, f, t]]),
            "4.weight": torch.tensor([[t, f, t], [t, f, t]]),
        }
    )
    return net, masks


def test_hand_worked_mlp_loses_exactly_the_dead_units() -> None:
    net, masks = hand_mlp()
    small, small_masks, notes = compact_with_masks(net, masks, torch.zeros(1, 4))
    # layer 1 keeps unit 2 only; layer 2 keeps units 0 and 2; the output layer stays whole
    assert (small[0].in_features, small[0].out_features) == (4, 1)
    assert (small[2].in_features, small[2].out_features) == (1, 2)
    assert (small[4].in_features, small[4].out_features) == (2, 2)
    assert sum(p.numel() for p in small.parameters()) == (4 + 1) + (2 + 2) + (4 + 2)
    # the constant 0.7 of dead unit 0 went into the bias of layer 2's unit 0
    w2, b2 = net[2].weight.detach(), net[2].bias.detach()
    expected = torch.stack([b2[0] + w2[0, 0] * 0.7, b2[2]])
    assert torch.allclose(small[2].bias.detach(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(
        small[0].weight.detach(), net[0].weight.detach()[2:3] * masks["0.weight"][2:3]
    )
    assert small_masks["2.weight"].tolist() == [[True], [True]]
    assert notes == []
    x = torch.randn(5, 4)
    assert relative_error(small(x), masked_output(net, masks, x)) <= 1e-6


def constant_channel_net(kernel: int, beta: float) -> tuple[nn.Module, Masks]:
    """conv(1->2) - BN - ReLU - conv(2->3, `kernel`, padding kernel // 2) - pool - Linear.
    Channel 0 of the first conv keeps no weight: after BN and ReLU it is the constant
    relu(beta) everywhere (running mean 0, var 1, gamma 1)."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Conv2d(2, 3, kernel, padding=kernel // 2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    )
    with torch.no_grad():
        net[1].bias.fill_(beta)
    first = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    first[0] = False
    return net, Masks({"0.weight": first})


def test_constant_channel_into_a_1x1_conv_is_folded_into_its_bias() -> None:
    net, masks = constant_channel_net(kernel=1, beta=0.5)
    small = check(net, masks, (1, 6, 6))
    assert small[0].out_channels == 1 and small[3].in_channels == 1
    # the 1x1 conv sees 0.5 at every position: 0.5 * w[:, 0] added to its bias
    expected = net[3].bias.detach() + 0.5 * net[3].weight.detach()[:, 0, 0, 0]
    assert torch.allclose(small[3].bias.detach(), expected, rtol=1e-6, atol=1e-7)


def test_constant_channel_into_a_padded_conv_is_kept() -> None:
    net, masks = constant_channel_net(kernel=3, beta=0.5)
    small, _, notes = compact_with_masks(net, masks, torch.zeros(1, 1, 6, 6))
    # zero padding makes its contribution differ at the border: it cannot become a bias
    assert small[0].out_channels == 2
    assert any("1 dead channel(s) kept" in n for n in notes)
    x = torch.randn(2, 1, 6, 6)
    assert relative_error(small(x), masked_output(net, masks, x)) <= 1e-5


def test_zero_constant_channel_goes_even_before_a_padded_conv() -> None:
    net, masks = constant_channel_net(kernel=3, beta=-0.5)  # relu(-0.5) = 0
    small = check(net, masks, (1, 6, 6))
    assert small[0].out_channels == 1


def test_masks_attached_or_not_give_the_same_compacted_model() -> None:
    net, masks = hand_mlp()
    a = compact(net, masks, torch.zeros(1, 4))
    b = compact(apply_masks(hand_mlp()[0], masks), masks, torch.zeros(1, 4))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not any(hasattr(m, "parametrizations") for m in b.modules())


# ---------------------------------------------------------------------------------------
# The zoo (structural groups), with trained-like statistics
# ---------------------------------------------------------------------------------------
ZOO = [
    ("resnet20", {}, (3, 16, 16)),
    ("resnet32", {}, (3, 8, 8)),
    ("resnet56", {}, (3, 8, 8)),
    ("vgg11_bn", {}, (3, 32, 32)),
    ("resnet18", {"num_classes": 10}, (3, 32, 32)),
    ("resnet50", {"num_classes": 10}, (3, 32, 32)),
    ("lenet5", {}, (1, 12, 12)),
    ("mlp", {"input_size": 8}, (1, 8, 8)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), ZOO, ids=[z[0] for z in ZOO])
def test_zoo_model_outputs_equal_the_masked_model(name, kwargs, shape) -> None:
    torch.manual_seed(0)
    net = trained_like(models.create(name, in_channels=shape[0], **kwargs))
    masks = random_masks(net, density=0.3, dead=0.3)
    small = check(net, masks, shape)
    assert not small.training


def test_vgg16_bn_at_init_removes_every_dead_channel() -> None:
    # at initialisation (BN beta 0, zero biases) every dead channel outputs 0: none is kept
    torch.manual_seed(0)
    net = models.create("vgg16_bn")
    masks = random_masks(net, density=0.05, dead=0.2)
    small, _, notes = compact_with_masks(net, masks, torch.zeros(1, 3, 32, 32))
    assert notes == []
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    # every remaining output channel has an effective weight
    assert all(bool(m.weight.flatten(1).any(1).all()) for m in convs)
    x = torch.randn(2, 3, 32, 32)
    assert relative_error(small(x), masked_output(net, masks, x)) <= 1e-5


def test_residual_stream_channel_stays_while_one_block_uses_it() -> None:
    torch.manual_seed(0)
    net = models.create("resnet20")
    masks = {k: v.clone() for k, v in Masks.ones_like(prunable_parameters(net)).items()}
    # channel 3 of the stage-1 stream: no block reads or writes it except the last block's
    # conv1, which reads it
    masks["conv1.weight"][3] = False
    for b in range(3):
        masks[f"layer1.{b}.conv2.weight"][3] = False
        masks[f"layer1.{b}.conv1.weight"][:, 3] = False
    masks["layer2.0.conv1.weight"][:, 3] = False
    masks["layer2.0.shortcut.0.weight"][:, 3] = False
    small = compact(net, masks, torch.zeros(1, 3, 8, 8))
    assert small.conv1.out_channels == 15 and small.layer1[2].conv2.out_channels == 15
    assert small.layer2[0].shortcut[0].in_channels == 15
    masks2 = {k: v.clone() for k, v in masks.items()}
    masks2["layer1.2.conv1.weight"][:, 3] = True  # ... but one block still reads it
    masks2["conv1.weight"][3] = True  # and the stem writes it
    small2 = compact(net, masks2, torch.zeros(1, 3, 8, 8))
    assert small2.conv1.out_channels == 16


# ---------------------------------------------------------------------------------------
# Any model, through Torch-Pruning's dependency graph
# ---------------------------------------------------------------------------------------
class Branchy(nn.Module):
    """Residual addition, a 1x1 conv after it and a flatten into a Linear: not a zoo model."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 12, 3, padding=1)
        self.c = nn.Conv2d(12, 8, 1)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.a(x)))  # (N, 12, H, W)
        y = y + torch.relu(self.b(y))  # residual
        z = nn.functional.adaptive_avg_pool2d(torch.relu(self.c(y)), 2)  # (N, 8, 2, 2)
        return self.fc2(torch.relu(self.fc1(z.flatten(1))))


def test_arbitrary_model_via_torch_pruning() -> None:
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    net = trained_like(Branchy())
    masks = random_masks(net, density=0.5, dead=0.35, seed=3)
    small = check(net, masks, (3, 8, 8))
    assert small.fc2.out_features == 4  # the output layer keeps its outputs
    assert small.c.out_channels < 8 or small.fc1.out_features < 16


class Concat(nn.Module):
    """Two convs reading one map, concatenated, flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.d = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        z = torch.cat([self.c(y), self.d(y)], 1)  # (N, 16, H, W)
        return self.fc(nn.functional.adaptive_avg_pool2d(z, 2).flatten(1))


def test_groups_the_traced_graph_gets_wrong_are_left_whole() -> None:
    # Torch-Pruning 1.6 couples c's and d's channels i across the concatenation (and maps
    # both onto the first half of fc's columns): cutting that group would change the
    # outputs, so compaction undoes it and says so; the rest is still cut
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    net = trained_like(Concat())
    masks = random_masks(net, density=0.5, dead=0.35, seed=1)
    small, _, notes = compact_with_masks(net, masks, torch.zeros(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    assert relative_error(small(x), masked_output(net, masks, x)) <= 1e-5
    assert small.a.out_channels < 16
    assert all("left whole" in n for n in notes)


def test_arbitrary_model_needs_an_input_shape() -> None:
    net = Branchy()
    masks = random_masks(net, density=0.5, dead=0.3)
    with pytest.raises(ValueError, match="example_input"):
        compact(net, masks)


def test_missing_torch_pruning_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails
    net = Branchy()
    with pytest.raises(CompactionError, match="deploy"):
        compact(net, random_masks(net, 0.5, 0.3), torch.zeros(1, 3, 8, 8))
    # the zoo does not need it
    lenet = models.create("lenet5")
    compact(lenet, random_masks(lenet, 0.3, 0.3), torch.zeros(1, 1, 12, 12))


def test_masks_for_another_model_are_refused() -> None:
    _, masks = hand_mlp()
    with pytest.raises(ValueError, match="parameters the model does not have"):
        compact(models.create("lenet5"), masks, torch.zeros(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------
def test_report_counts_before_and_after() -> None:
    net, masks = hand_mlp()
    small = compact(net, masks, torch.zeros(1, 4))
    report = compaction_report(net, masks, small, torch.zeros(1, 4), batch_size=4, repeats=2)
    assert isinstance(report, CompactionResult)
    assert (report.params_before, report.params_after) == (35, 15)
    # kept weights 3 + 4 + 4 = 11; the ones into and out of the dead units go: layer 1
    # keeps 2 (unit 2), layer 2 keeps 2 (units 0 and 2 reading unit 2), the output layer 4
    assert (report.kept_before, report.kept_after) == (11, 8)
    assert (report.flops_before, report.flops_after) == (2 * (12 + 9 + 6), 2 * (4 + 2 + 4))
    assert report.max_relative_error <= 1e-6 and report.latency_ms_after > 0
    text = str(report)
    assert "parameters" in text and "FLOPs" in text and "latency" in text


def test_align_keeps_a_multiple_of_channels_and_the_outputs() -> None:
    torch.manual_seed(0)
    net = trained_like(models.create("resnet20"))
    masks = random_masks(net, density=0.3, dead=0.3)
    x = torch.randn(2, 3, 8, 8)
    full = compact(net, masks, torch.zeros(1, 3, 8, 8))
    aligned = compact(net, masks, torch.zeros(1, 3, 8, 8), align=8)
    widths = [m.out_channels for m in aligned.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)
    assert sum(p.numel() for p in full.parameters()) < sum(p.numel() for p in aligned.parameters())
    assert relative_error(aligned(x), masked_output(net, masks, x)) <= 1e-5
    with pytest.raises(ValueError, match="align"):
        compact(net, masks, x, align=0)
