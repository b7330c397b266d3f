"""Small models for digit-sized images: a LeNet-5 and a LeNet-300-100-style MLP.

Example:
    >>> import torch
    >>> from ntksap import models
    >>> models.create("lenet5", in_channels=1)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> models.create("mlp", in_channels=1, input_size=28)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ntksap.models.base import register_model
from ntksap.models.init import kaiming_init_
from ntksap.validate import positive_int

__all__ = ["MLP", "LeNet5"]


class LeNet5(nn.Module):
    """LeNet-5 (ReLU, max-pool) for any input size: 8x8 digits, 28x28 MNIST, 32x32 CIFAR.

    conv5x5(6) + ReLU + maxpool2, conv5x5(16) + ReLU + maxpool2, AdaptiveAvgPool2d((5, 5)),
    then 400 -> 120 -> 84 -> num_classes. Both convs use padding 2 and the pools
    ceil_mode=True, so no spatial size ever reaches 0 (an unpadded second conv would fail
    on 8x8 inputs, which are 4x4 by then); the adaptive pool makes the first Linear always
    16*5*5 -> 120. Shapes in comments are for a (N, 1, 28, 28) input.

    Example:
        >>> LeNet5(num_classes=10, in_channels=1).fc3
        Linear(in_features=84, out_features=10, bias=True)
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 16, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.pool = nn.AdaptiveAvgPool2d((5, 5))
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 16, 7, 7)
        x = torch.flatten(self.pool(x), 1)  # (N, 400)
        x = self.relu1(self.fc1(x))  # (N, 120)
        x = self.relu2(self.fc2(x))  # (N, 84)
        return self.fc3(x)  # (N, num_classes)


class MLP(nn.Module):
    """Fully connected ReLU net on flattened images: in -> hidden[0] -> ... -> num_classes.

    `input_size` is the image side length, so in_features = in_channels * input_size**2.

    Example:
        >>> MLP(num_classes=10, in_channels=1, input_size=28).layers[1]
        Linear(in_features=784, out_features=300, bias=True)
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        hidden: Sequence[int] = (300, 100),
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        positive_int("input_size", input_size)
        for h in hidden:
            positive_int("every hidden size", h)
        self.in_features = in_channels * input_size**2
        layers: list[nn.Module] = [nn.Flatten()]  # (N, C, S, S) -> (N, C * S * S)
        width = self.in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]  # (N, h)
            width = h
        layers.append(nn.Linear(width, num_classes))  # (N, num_classes)
        self.layers = nn.Sequential(*layers)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:].numel() != self.in_features:
            raise ValueError(
                f"MLP built for {self.in_features} input features per sample, got input of "
                f"shape {tuple(x.shape)}; pass input_size= matching the images"
            )
        return self.layers(x)


@register_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
def lenet5(num_classes: int = 10, in_channels: int = 1, **kwargs) -> nn.Module:
    """LeNet-5 (61,706 parameters at 10 classes, 1 channel)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("mlp", input_shape=(1, 28, 28), num_classes=10)
def mlp(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, **kwargs) -> nn.Module:
    """LeNet-300-100-style MLP; `input_size` is the side of the (square) input images."""
    return MLP(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)
