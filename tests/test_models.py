"""Model zoo: every registered model builds, runs forward/backward, is initialised as stated,
and has the expected parameter count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntksap import models
from ntksap.models import MODELS

SMALL = {"lenet5", "mlp"}
IMAGENET = {"resnet18", "resnet34", "resnet50"}
ALL_NAMES = models.list_models()


def input_spec(name: str) -> tuple[int, int]:
    """(in_channels, side) used to exercise a model quickly."""
    if name in SMALL:
        return 1, 28
    if name in IMAGENET:
        return 3, 64
    return 3, 32  # CIFAR ResNets and VGGs


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_registry_has_the_zoo() -> None:
    expected = {
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
        "resnet18", "resnet34", "resnet50",
        "lenet5", "mlp",
    }  # fmt: skip
    assert expected <= set(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    in_channels, side = input_spec(name)
    net = models.create(name, num_classes=7, in_channels=in_channels)
    net.train()
    x = torch.randn(2, in_channels, side, side)
    out = net(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 6])).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        if p.dim() > 1:  # every conv/linear weight is on the path to the output
            assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"
    net.eval()
    with torch.no_grad():
        assert net(x[:1]).shape == (1, 7)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_init_and_plain_layers(name: str) -> None:
    torch.manual_seed(0)
    in_channels, _ = input_spec(name)
    net = models.create(name, num_classes=10, in_channels=in_channels)
    checked = 0
    for mname, m in net.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            # Pruning code relies on plain layers: no custom masked layer classes.
            assert type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d), f"{mname}: {type(m)}"
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), mname
        elif isinstance(m, nn.Conv2d | nn.Linear):
            if m.bias is not None:
                assert torch.all(m.bias == 0), mname
            w = m.weight.detach()
            if w.numel() >= 4096:  # big enough for a tight std estimate (~1% noise)
                fan_in = w[0].numel()
                target = math.sqrt(2.0 / fan_in)  # Kaiming normal, fan_in, ReLU gain
                assert abs(w.std().item() / target - 1) < 0.10, (mname, w.std().item(), target)
                assert abs(w.mean().item()) < 0.05 * target, mname
                checked += 1
    assert checked > 0


# Exact counts. resnet20 by hand (option-B shortcuts, BN = 2 params per channel):
#   stem 3*16*9 + 32                                   =     464
#   stage 1: 3 blocks * 2 * (16*16*9 + 32)             =  14,016
#   stage 2: (16*32*9+64) + (32*32*9+64) + (16*32+64)
#            + 2 blocks * 2 * (32*32*9 + 64)           =  51,648
#   stage 3: (32*64*9+128) + (64*64*9+128) + (32*64+128)
#            + 2 blocks * 2 * (64*64*9 + 128)          = 205,696
#   fc 64*10 + 10                                      =     650   -> 272,474
# lenet5 (1 channel): 156 + 2,416 + 48,120 + 10,164 + 850 = 61,706.
# mlp (784-300-100-10): 235,500 + 30,100 + 1,010 = 266,610.
# resnet18/34/50 at 1000 classes: the torchvision counts.
PARAM_COUNTS = [
    ("resnet20", 10, 3, 272_474),
    ("resnet32", 10, 3, 466_906),
    ("resnet44", 10, 3, 661_338),
    ("resnet56", 10, 3, 855_770),
    ("resnet110", 10, 3, 1_730_714),
    ("vgg11_bn", 10, 3, 9_231_114),
    ("vgg13_bn", 10, 3, 9_416_010),
    ("vgg16_bn", 10, 3, 14_728_266),
    ("vgg19_bn", 10, 3, 20_040_522),
    ("resnet18", 1000, 3, 11_689_512),
    ("resnet34", 1000, 3, 21_797_672),
    ("resnet50", 1000, 3, 25_557_032),
    ("lenet5", 10, 1, 61_706),
    ("mlp", 10, 1, 266_610),
]


@pytest.mark.parametrize(("name", "num_classes", "in_channels", "expected"), PARAM_COUNTS)
def test_param_count(name: str, num_classes: int, in_channels: int, expected: int) -> None:
    net = models.create(name, num_classes=num_classes, in_channels=in_channels)
    assert n_params(net) == expected


@pytest.mark.parametrize(
    ("name", "widths"),
    [
        ("vgg11_bn", [64, 128, 256, 256, 512, 512, 512, 512]),
        ("vgg16_bn", [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]),
    ],
)
def test_vgg_count_from_first_principles(name: str, widths: list[int]) -> None:
    # conv3x3 with bias + BN (gamma, beta) per layer, then a single Linear(512, 10).
    total, c_in = 0, 3
    for c in widths:
        total += 9 * c_in * c + c + 2 * c
        c_in = c
    total += 512 * 10 + 10
    assert n_params(models.create(name, num_classes=10)) == total


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="valid choices") as info:
        models.create("nope")
    for name in ALL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_bad_sizes_raise(name: str) -> None:
    with pytest.raises(ValueError):
        models.create(name, num_classes=0)
    # The factories check on their own too, not only `create`.
    factory = MODELS.get(name)
    with pytest.raises(ValueError, match="num_classes"):
        factory(num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        factory(in_channels=0)


def test_unknown_kwarg_is_an_error() -> None:
    with pytest.raises(TypeError):
        models.create("resnet20", num_classes=10, not_an_option=1)


@pytest.mark.parametrize(("in_channels", "side"), [(1, 8), (1, 28), (3, 32)])
def test_lenet5_any_input_size(in_channels: int, side: int) -> None:
    net = models.create("lenet5", num_classes=10, in_channels=in_channels)
    out = net(torch.randn(2, in_channels, side, side))
    assert out.shape == (2, 10)
    assert net.fc1.in_features == 16 * 5 * 5


def test_mlp_options() -> None:
    net = models.create("mlp", num_classes=10, in_channels=1, input_size=8, hidden=(32,))
    assert [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [32, 10]
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="input_size"):
        net(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError):
        models.create("mlp", input_size=0)


def test_cifar_resnet_in_channels_and_depth() -> None:
    from ntksap.models.cifar_resnet import CifarResNet

    net = models.create("resnet20", num_classes=10, in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=21)


def test_seeded_init_is_deterministic() -> None:
    torch.manual_seed(123)
    a = models.create("resnet20").state_dict()
    torch.manual_seed(123)
    b = models.create("resnet20").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
