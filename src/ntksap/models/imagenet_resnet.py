"""ImageNet ResNets (He et al. 2016): resnet18/34 (BasicBlock) and resnet50 (Bottleneck).

7x7 stride-2 stem conv (64) + BN + ReLU + 3x3 stride-2 max-pool, four stages with widths
64/128/256/512 (stride 2 at the first block of stages 2-4), 1x1 conv + BN projection
shortcuts where the shape changes, global average pooling and a Linear classifier. The
Bottleneck puts the stride on its 3x3 conv ("ResNet v1.5", as torchvision). Written from
scratch; parameter counts match torchvision (11,689,512 and 25,557,032 at 1000 classes).
Initialisation is the zoo's Kaiming-normal fan_in (not torchvision's fan_out), with no
zero-init of the last BN in each block. Shapes in comments are for a (N, 3, 224, 224)
input; the adaptive pooling makes the classifier independent of the input size (64x64
Tiny-ImageNet images work as they are).

Example:
    >>> import torch
    >>> from ntksap import models
    >>> net = models.create("resnet18", num_classes=200)
    >>> net(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 200])
"""

from __future__ import annotations

import torch
from torch import nn

from ntksap.models.base import register_model
from ntksap.models.init import kaiming_init_
from ntksap.validate import positive_int

__all__ = ["BasicBlock", "Bottleneck", "ImageNetResNet"]


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN projection shortcut, or None when the identity fits."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; output channels = planes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))  # (N, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand; output channels = 4 * planes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _downsample(in_planes, out_planes, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))  # (N, planes, H, W)
        out = self.relu2(self.bn2(self.conv2(out)))  # (N, planes, H/stride, W/stride)
        out = self.bn3(self.conv3(out))  # (N, 4 * planes, H/stride, W/stride)
        return self.relu3(out + identity)


class ImageNetResNet(nn.Module):
    """ResNet with a 7x7 stem; `block` is BasicBlock or Bottleneck, `layers` blocks per stage.

    Example:
        >>> ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes=10).fc
        Linear(in_features=512, out_features=10, bias=True)
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {layers!r}")

        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_planes = 64
        stages: list[nn.Module] = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 64, 112, 112)
        x = self.maxpool(x)  # (N, 64, 56, 56)
        x = self.layer1(x)  # (N, 64 * e, 56, 56), e = block expansion
        x = self.layer2(x)  # (N, 128 * e, 28, 28)
        x = self.layer3(x)  # (N, 256 * e, 14, 14)
        x = self.layer4(x)  # (N, 512 * e, 7, 7)
        x = torch.flatten(self.avgpool(x), 1)  # (N, 512 * e)
        return self.fc(x)  # (N, num_classes)


@register_model("resnet18", input_shape=(3, 224, 224), num_classes=1000)
def resnet18(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-18: BasicBlock, (2, 2, 2, 2); 11,689,512 parameters at 1000 classes."""
    return ImageNetResNet(
        BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, **kwargs
    )


@register_model("resnet34", input_shape=(3, 224, 224), num_classes=1000)
def resnet34(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-34: BasicBlock, (3, 4, 6, 3); 21,797,672 parameters at 1000 classes."""
    return ImageNetResNet(
        BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, **kwargs
    )


@register_model("resnet50", input_shape=(3, 224, 224), num_classes=1000)
def resnet50(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-50: Bottleneck, (3, 4, 6, 3); 25,557,032 parameters at 1000 classes."""
    return ImageNetResNet(
        Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, **kwargs
    )
