"""CIFAR ResNets (He et al. 2016, section 4.2): resnet20/32/44/56/110.

Depth = 6n + 2: a 3x3 conv stem (16 channels) + BN + ReLU, three stages of n BasicBlocks
with widths 16/32/64 (stride 2 at the first block of stages 2 and 3), global average
pooling and a Linear classifier. Downsampling shortcuts are a 1x1 stride-2 conv + BN
("option B"), as in the OpenLTH/SynFlow/NTK-SAP reference; other shortcuts are identity.
All convs have bias=False. Shapes in comments are for a (N, 3, 32, 32) input.

Example:
    >>> import torch
    >>> from ntksap import models
    >>> net = models.create("resnet20", num_classes=10)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in net.parameters())
    272474
"""

from __future__ import annotations

import torch
from torch import nn

from ntksap.models.base import register_model
from ntksap.models.init import kaiming_init_
from ntksap.validate import positive_int

__all__ = ["BasicBlock", "CifarResNet"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (expansion 1)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            # Option B: projection shortcut.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))  # (N, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; `depth` must be 6n + 2 with n >= 1.

    Example:
        >>> CifarResNet(depth=20).fc
        Linear(in_features=64, out_features=10, bias=True)
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if len(widths) != 3:
            raise ValueError(f"widths must give the 3 stage widths, got {widths!r}")
        n = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()

        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 16, 32, 32)
        x = self.layer1(x)  # (N, 16, 32, 32)
        x = self.layer2(x)  # (N, 32, 16, 16)
        x = self.layer3(x)  # (N, 64, 8, 8)
        x = torch.flatten(self.avgpool(x), 1)  # (N, 64)
        return self.fc(x)  # (N, num_classes)


@register_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
def resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-20 (n=3, 272,474 parameters at 10 classes)."""
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("resnet32", input_shape=(3, 32, 32), num_classes=10)
def resnet32(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-32 (n=5)."""
    return CifarResNet(32, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("resnet44", input_shape=(3, 32, 32), num_classes=10)
def resnet44(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-44 (n=7)."""
    return CifarResNet(44, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("resnet56", input_shape=(3, 32, 32), num_classes=10)
def resnet56(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-56 (n=9)."""
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("resnet110", input_shape=(3, 32, 32), num_classes=10)
def resnet110(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-110 (n=18)."""
    return CifarResNet(110, num_classes=num_classes, in_channels=in_channels, **kwargs)
