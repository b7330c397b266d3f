"""Model zoo: `create(name, num_classes=..., in_channels=...)` builds a registered model.

Each architecture file registers small factory functions with `@register_model("name")`.
Every factory takes `num_classes` and `in_channels` keywords and returns an initialised
`nn.Module` (Kaiming-normal fan_in for Conv/Linear weights, zero biases, BN gamma 1 beta 0,
as in the reference models).

Example:
    >>> from ntksap import models
    >>> net = models.create("resnet20", num_classes=10)
    >>> "vgg16_bn" in models.list_models()
    True
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ntksap.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a factory `fn(num_classes=..., in_channels=..., **kw) -> nn.Module`."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return MODELS.names()


def create(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the registered model `name`; raises a ValueError listing the valid names."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    model = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    # Tells NTK-SAP (init="auto") which distribution to re-draw weights from.
    model.ntksap_init_scheme = "kaiming"
    return model


# Import the architecture files so their decorators run.
from ntksap.models import cifar_resnet, imagenet_resnet, small, vgg  # noqa: E402,F401
