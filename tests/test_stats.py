"""Per-layer statistics: FLOPs checked against hand-computed counts (multiply-add = 2 FLOPs)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ntksap
from ntksap import models
from ntksap.masks import MaskError, Masks
from ntksap.stats import LayerStat, Totals, count_module_flops, format_table, human, layer_table


class Tiny(nn.Module):
    """conv 1->2 (3x3) on 1x5x5, a Linear(4, 3) called twice, a Linear(3, 2) head.

    Hand counts for one input (2 FLOPs per multiply-add):
        conv: 2 * (2 * 3 * 3 outputs) * (1 * 3 * 3) = 324
        fc:   2 calls * 2 * 4 * 3 = 48
        head: 2 * 3 * 2 = 12
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x).flatten(1)[:, :4])  # (N, 4)
        return self.head(self.fc(h) + self.fc(h))  # (N, 2)


CONV, FC, HEAD = 324, 48, 12


def tiny_masks() -> Masks:
    conv = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    conv.view(-1)[:9] = True  # 9 of 18 kept: density 0.5
    fc = torch.zeros(3, 4, dtype=torch.bool)
    fc[0, :3] = True  # 3 of 12 kept: density 0.25
    head = torch.zeros(2, 3, dtype=torch.bool)  # all pruned: layer collapse
    return Masks({"conv.weight": conv, "fc.weight": fc, "head.weight": head})


def test_count_module_flops_by_hand() -> None:
    total, per = count_module_flops(Tiny(), (1, 5, 5))
    assert total == CONV + FC + HEAD
    assert per["conv"] == CONV
    assert per["fc"] == FC  # both calls of the shared Linear counted
    assert per["head"] == HEAD
    assert per[""] == total  # the root: everything


def test_conv_and_linear_alone() -> None:
    assert count_module_flops(nn.Conv2d(1, 2, 3), (1, 5, 5))[0] == 2 * (2 * 3 * 3) * (1 * 3 * 3)
    assert count_module_flops(nn.Linear(4, 3), (4,))[0] == 2 * 4 * 3


def test_layer_table_hand_made_mask() -> None:
    stats, totals = layer_table(Tiny(), tiny_masks(), (1, 5, 5))
    by = {s.name: s for s in stats}
    assert [s.name for s in stats] == ["conv.weight", "fc.weight", "head.weight"]
    assert by["conv.weight"] == LayerStat("conv.weight", (2, 1, 3, 3), 18, 9, 0.5, CONV, 162)
    assert by["fc.weight"] == LayerStat("fc.weight", (3, 4), 12, 3, 0.25, FC, 12)
    assert by["head.weight"] == LayerStat("head.weight", (2, 3), 6, 0, 0.0, HEAD, 0)
    assert (totals.params, totals.kept) == (36, 12)
    assert totals.density == pytest.approx(1 / 3)
    assert totals.flops_dense == CONV + FC + HEAD
    # remaining = dense - sum (dense - kept) = 384 - (162 + 36 + 12)
    assert totals.flops_remaining == 174
    assert totals.collapsed == ["head.weight"]


def test_model_left_untouched() -> None:
    net = Tiny().train()
    net.bn.eval()  # a mixed-mode model: every module's own flag must come back
    before = copy.deepcopy(net.state_dict())
    layer_table(net, tiny_masks(), (1, 5, 5))
    assert net.training and net.conv.training and not net.bn.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_numbers_with_masks_attached() -> None:
    net = Tiny()
    plain = layer_table(net, tiny_masks(), (1, 5, 5))
    masked = ntksap.apply_masks(copy.deepcopy(net), tiny_masks())
    assert layer_table(masked, tiny_masks(), (1, 5, 5)) == plain


def test_tied_weight_counts_every_user() -> None:
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 3, bias=False))
    net[2].weight = net[0].weight  # tied: one tensor, two layers, 2 * (2 * 3 * 3) FLOPs
    masks = Masks({"0.weight": torch.tensor([[True] * 3, [False] * 3, [False] * 3])})
    (s,), totals = layer_table(net, masks, (3,))
    assert (s.flops_dense, s.flops_kept) == (36, 12)
    assert totals.flops_remaining == 12


def test_bias_gets_no_flops_and_root_module() -> None:
    net = nn.Linear(4, 3)  # the root itself owns the weight
    masks = Masks({"weight": torch.ones(3, 4, dtype=torch.bool), "bias": torch.ones(3).bool()})
    stats, totals = layer_table(net, masks, (4,))
    assert [(s.name, s.flops_dense) for s in stats] == [("weight", 24), ("bias", 0)]
    assert totals.flops_remaining == totals.flops_dense == 24


def test_lenet5_by_hand() -> None:
    """LeNet-5 on 1x28x28 (padding 2, pools 2): every FLOP of the model is in a masked layer."""
    net = models.create("lenet5", num_classes=10, in_channels=1)
    masks = Masks.ones_like(ntksap.prunable_parameters(net))
    stats, totals = layer_table(net, masks, (1, 28, 28))
    expected = {
        "features.0.weight": 2 * (6 * 28 * 28) * (1 * 5 * 5),  # 235,200
        "features.3.weight": 2 * (16 * 14 * 14) * (6 * 5 * 5),  # 940,800
        "fc1.weight": 2 * 400 * 120,
        "fc2.weight": 2 * 120 * 84,
        "fc3.weight": 2 * 84 * 10,
    }
    assert {s.name: s.flops_dense for s in stats} == expected
    assert totals.flops_dense == totals.flops_remaining == sum(expected.values()) == 1_293_840


def test_errors() -> None:
    with pytest.raises(MaskError, match="does not have"):
        layer_table(Tiny(), Masks({"nope.weight": torch.ones(2).bool()}), (1, 5, 5))
    with pytest.raises(ValueError, match="input_shape"):
        layer_table(Tiny(), tiny_masks(), (1, 0, 5))


def test_format_table() -> None:
    stats, totals = layer_table(Tiny(), tiny_masks(), (1, 5, 5))
    text = format_table(stats, totals)
    lines = text.splitlines()
    header = ["name", "shape", "params", "kept", "density", "effective", "FLOPs", "kept"]
    assert lines[0].split() == header
    # the head keeps nothing, so no kept weight reaches the output: effective density 0
    assert lines[1].split() == ["conv.weight", "2x1x3x3", "18", "9", "50.00%", "0.00%", "162"]
    assert lines[2].split() == ["fc.weight", "3x4", "12", "3", "25.00%", "0.00%", "12"]
    assert "effective        0.00% (effective sparsity 100.00%): 12 kept weights" in text
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns
    assert "density          33.33% (sparsity 66.67%)" in text
    assert "dense FLOPs      384 (384) per 1x5x5 input" in text
    assert "remaining FLOPs  174 (174), 45.31% of dense" in text
    assert "1 multiply-add = 2 FLOPs" in text
    assert lines[-1].startswith("WARNING: layer collapse: 1 tensor(s) pruned to zero")
    assert lines[-1].endswith("head.weight")


def test_no_warning_without_collapse() -> None:
    text = format_table([], Totals(10, 10, 1.0, 100, 100, (4,)))
    assert "WARNING" not in text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1.00K"),
        (40_812_000, "40.8M"),
        (999_600, "1.00M"),
        (123_456_789, "123M"),
        (2.5e9, "2.50G"),
    ],
)
def test_human(n: float, text: str) -> None:
    assert human(n) == text
