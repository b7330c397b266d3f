"""VGG-11/13/16/19 with BatchNorm for 32x32 images, as in the OpenLTH/SynFlow/NTK-SAP code.

Each config entry is conv3x3 (padding 1) + BN + ReLU with that many channels; 'M' is a 2x2
max-pool. Following the reference (`Models/lottery_vgg.py` of NTK-SAP, from OpenLTH), the
plans omit the fifth max-pool of the ImageNet VGG: a 32x32 input leaves a (512, 2, 2) map,
which is averaged to (512, 1, 1) and fed to a single Linear(512, num_classes). We use
AdaptiveAvgPool2d(1), equal to the reference's AvgPool2d(2) at 32x32 and valid at any
input size. Convs keep bias=True as in the reference (and torchvision's VGG); biases are
initialised to zero. Shapes in comments are for a (N, 3, 32, 32) input.

Example:
    >>> import torch
    >>> from ntksap import models
    >>> net = models.create("vgg16_bn", num_classes=100)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
"""

from __future__ import annotations

import torch
from torch import nn

from ntksap.models.base import register_model
from ntksap.models.init import kaiming_init_
from ntksap.validate import positive_int

__all__ = ["CFGS", "VGG"]

# Channels per conv, "M" = 2x2 max-pool (the final ImageNet "M" dropped, as in the reference).
CFGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "E": (
        64, 64, "M",
        128, 128, "M",
        256, 256, 256, 256, "M",
        512, 512, 512, 512, "M",
        512, 512, 512, 512,
    ),
}  # fmt: skip


class VGG(nn.Module):
    """VGG with BatchNorm: `features` (conv-BN-ReLU / max-pool), global avg-pool, Linear.

    Example:
        >>> VGG(CFGS["A"]).classifier
        Linear(in_features=512, out_features=10, bias=True)
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        num_classes: int = 10,
        in_channels: int = 3,
        conv_bias: bool = True,
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(channels, v, kernel_size=3, padding=1, bias=conv_bias),
                    nn.BatchNorm2d(v),
                    nn.ReLU(),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 512, 2, 2)
        x = torch.flatten(self.avgpool(x), 1)  # (N, 512)
        return self.classifier(x)  # (N, num_classes)


@register_model("vgg11_bn", input_shape=(3, 32, 32), num_classes=10)
def vgg11_bn(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """VGG-11 (config A) with BatchNorm."""
    return VGG(CFGS["A"], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("vgg13_bn", input_shape=(3, 32, 32), num_classes=10)
def vgg13_bn(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """VGG-13 (config B) with BatchNorm."""
    return VGG(CFGS["B"], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("vgg16_bn", input_shape=(3, 32, 32), num_classes=10)
def vgg16_bn(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """VGG-16 (config D) with BatchNorm."""
    return VGG(CFGS["D"], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("vgg19_bn", input_shape=(3, 32, 32), num_classes=10)
def vgg19_bn(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """VGG-19 (config E) with BatchNorm."""
    return VGG(CFGS["E"], num_classes=num_classes, in_channels=in_channels, **kwargs)
