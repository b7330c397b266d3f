"""Which parameters are prunable.

Default (as in the paper): the `weight` of every Conv (1d/2d/3d, transposed too) and Linear
module, including the first conv, 1x1 shortcut convs and the classifier. Biases, norm-layer
affine parameters and embeddings are kept dense unless asked for with `include_bias` or
`include` patterns. Names are the model's own `named_parameters()` names; a parameter that
several modules share (a Linear called twice, tied weights) appears once.

Patterns are shell-style globs matched against full names (`fnmatch`), e.g. `"fc.*"`,
`"*shortcut*"`. A pattern that matches nothing is an error, not a silent no-op.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(10))
    >>> list(prunable_parameters(net, exclude=["3.*"]))
    ['0.weight']
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _canonical(name: str) -> str:
    """`a.parametrizations.weight.original` -> `a.weight` (the name before masks attached)."""
    return _PARAMETRIZED.sub(r"\1\2", name)


def named_parameters_canonical(model: nn.Module) -> dict[str, torch.Tensor]:
    """`named_parameters()` with parametrized names mapped back to the plain ones.

    For a parametrized weight the value is the stored (original) tensor.
    """
    return {_canonical(n): p for n, p in model.named_parameters()}


def _match_all(patterns: Sequence[str], names: Iterable[str], what: str) -> set[str]:
    names = list(names)
    hit: set[str] = set()
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise ValueError(f"{what} patterns must be non-empty strings, got {pat!r}")
        found = fnmatch.filter(names, pat)
        if not found:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise ValueError(f"{what} pattern {pat!r} matches no parameter; names are: {shown}")
        hit.update(found)
    return hit


def prunable_parameters(
    model: nn.Module,
    *,
    include_bias: bool = False,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
) -> dict[str, nn.Parameter]:
    """Ordered `{name: parameter}` of the prunable parameters of `model`.

    Args:
        include_bias: also prune the biases of the selected layers.
        exclude: glob patterns of names to keep dense (e.g. `["conv1.weight", "fc.*"]`).
        include: glob patterns of further parameters to prune (e.g. `["embed.weight"]`).
        layer_types: module classes whose weights are prunable.

    Raises:
        ValueError: a pattern matches nothing, or no parameter is left to prune.
    """
    if isinstance(exclude, str) or isinstance(include, str):
        raise TypeError("exclude/include take a list of glob patterns, not a single string")
    seen: set[int] = set()
    chosen: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, layer_types):
            continue
        attrs = ["weight"] + (["bias"] if include_bias else [])
        for attr in attrs:
            if parametrize.is_parametrized(module, attr):
                p = getattr(module.parametrizations, attr).original
            else:
                p = module._parameters.get(attr)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            chosen[f"{mod_name}.{attr}" if mod_name else attr] = p
    if include:
        all_params = named_parameters_canonical(model)
        for name in sorted(_match_all(include, all_params, "include")):
            p = all_params[name]
            if id(p) not in seen:
                seen.add(id(p))
                chosen[name] = p  # type: ignore[assignment]
    if exclude:
        for name in _match_all(exclude, chosen, "exclude"):
            del chosen[name]
    if not chosen:
        raise ValueError(
            "the model has no prunable parameters (no Conv/Linear weights left after "
            "include/exclude); pass include=[...] to name some"
        )
    return chosen
