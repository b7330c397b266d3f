"""Model zoo: `create(name, num_classes=..., in_channels=...)` builds a registered model.

Each architecture file registers small factory functions with
`@register_model("name", input_shape=..., num_classes=...)`, giving the input shape and
class count the architecture is meant for (`defaults(name)`). Every factory takes
`num_classes` and `in_channels` keywords and returns an initialised `nn.Module`
(Kaiming-normal fan_in for Conv/Linear weights, zero biases, BN gamma 1 beta 0, as in the
reference models).

Example:
    >>> from ntksap import models
    >>> net = models.create("resnet20", num_classes=10)
    >>> net.ntksap_model
    {'name': 'resnet20', 'num_classes': 10, 'in_channels': 3}
    >>> models.defaults("resnet18")
    ModelDefaults(input_shape=(3, 224, 224), num_classes=1000)
    >>> "vgg16_bn" in models.list_models()
    True
"""

from __future__ import annotations

from torch import nn

from ntksap import validate

# The architecture files register themselves on import.
from ntksap.models import cifar_resnet, imagenet_resnet, small, vgg  # noqa: F401
from ntksap.models.base import (
    FALLBACK_DEFAULTS,
    MODEL_ATTRIBUTE,
    MODELS,
    ModelDefaults,
    defaults,
    list_models,
    register_model,
)

__all__ = [
    "FALLBACK_DEFAULTS",
    "MODELS",
    "MODEL_ATTRIBUTE",
    "ModelDefaults",
    "create",
    "defaults",
    "list_models",
    "register_model",
]


def create(
    name: str, num_classes: int | None = None, in_channels: int | None = None, **kwargs
) -> nn.Module:
    """Build the registered model `name`; raises a ValueError listing the valid names.

    `num_classes` and `in_channels` default to the model's `defaults(name)` (its class count
    and the first entry of its input shape). The model records what built it in
    `model.ntksap_model` (name, num_classes, in_channels and the further keywords), which
    `ntksap.prune` copies into the masks' metadata.
    """
    factory = MODELS.get(name)
    default = defaults(name)
    num_classes = default.num_classes if num_classes is None else num_classes
    in_channels = default.input_shape[0] if in_channels is None else in_channels
    validate.positive_int("num_classes", num_classes)
    validate.positive_int("in_channels", in_channels)
    model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    # Tells NTK-SAP (init="auto") which distribution to re-draw weights from.
    model.ntksap_init_scheme = "kaiming"
    setattr(
        model,
        MODEL_ATTRIBUTE,
        {"name": name.lower(), "num_classes": num_classes, "in_channels": in_channels, **kwargs},
    )
    return model
