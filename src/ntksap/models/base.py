"""The model registry: names -> factories, and what each architecture is built for.

Kept apart from `ntksap.models` (which imports every architecture file) so that the
architecture files can register themselves without an import cycle.

Example:
    >>> from ntksap.models.base import defaults
    >>> defaults("resnet20")
    ModelDefaults(input_shape=(3, 32, 32), num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ntksap import validate
from ntksap.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# Attribute `ntksap.models.create` sets on every model it builds (registered name and
# arguments), so that the masks' metadata can tell what the model is.
MODEL_ATTRIBUTE = "ntksap_model"


@dataclass(frozen=True)
class ModelDefaults:
    """What a registered architecture is built for: one input's shape (no batch dimension)
    and the number of classes; `create` uses them when not told otherwise."""

    input_shape: tuple[int, ...]
    num_classes: int


_DEFAULTS: dict[str, ModelDefaults] = {}

#: What `register_model` assumes when not told: CIFAR-sized images, 10 classes.
FALLBACK_DEFAULTS = ModelDefaults(input_shape=(3, 32, 32), num_classes=10)


def register_model(
    name: str,
    *,
    input_shape: Sequence[int] = FALLBACK_DEFAULTS.input_shape,
    num_classes: int = FALLBACK_DEFAULTS.num_classes,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a factory `fn(num_classes=..., in_channels=..., **kw) -> nn.Module`
    with the input shape and class count it is meant for."""
    shape = tuple(validate.positive_int(f"model {name!r} input_shape", s) for s in input_shape)
    if not shape:
        raise ValueError(f"model {name!r}: input_shape must not be empty")
    classes = validate.positive_int(f"model {name!r} num_classes", num_classes)
    register = MODELS.register(name)

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        register(fn)
        _DEFAULTS[name.lower()] = ModelDefaults(shape, classes)
        return fn

    return deco


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return MODELS.names()


def defaults(name: str) -> ModelDefaults:
    """The default input shape and class count of the registered model `name`.

    >>> defaults("lenet5")
    ModelDefaults(input_shape=(1, 28, 28), num_classes=10)
    """
    MODELS.get(name)  # the unknown-name error, listing the valid names
    # (a factory put in MODELS directly, without register_model, gets the fallback)
    return _DEFAULTS.get(name.lower(), FALLBACK_DEFAULTS)
