"""Which parameters are prunable.

Default (as in the paper): the `weight` of every Conv (1d/2d/3d, transposed too) and Linear
module, including the first conv, 1x1 shortcut convs and the classifier. Biases, norm-layer
affine parameters and embeddings are kept dense unless asked for with `include_bias` or
`include` patterns. Names are the model's own `named_parameters()` names; a parameter that
several modules share (a Linear called twice, tied weights) appears once.

Patterns are shell-style globs matched against full names (`fnmatch`), e.g. `"fc.*"`,
`"*shortcut*"`. A pattern that matches nothing is an error, not a silent no-op.

A weight computed from other tensors (weight_norm, spectral_norm, any parametrization other
than ntksap's own masks, torch.nn.utils.prune hooks) cannot be pruned as it is: it is an
error naming the layer and the fix, unless `exclude` keeps it dense.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(10))
    >>> list(prunable_parameters(net, exclude=["3.*"]))
    ['0.weight']
"""

from __future__ import annotations

import fnmatch
import re
import sys
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


def _module_expr(mod_name: str) -> str:
    """Python for the module called `mod_name` inside `model`, for error messages."""
    return f"model.get_submodule({mod_name!r})" if mod_name else "model"


def _layer_class(module: nn.Module) -> str:
    """`Linear` for a Linear, also once parametrize has swapped in `ParametrizedLinear`."""
    cls = type(module)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _computed_weight(module: nn.Module, mod_name: str, attr: str) -> str | None:
    """Why `module.<attr>` is not a plain prunable tensor, and the fix; None if it is one.

    ntksap's own masks (`MaskParametrization`) do not count: their `original` is the weight.
    """
    # ntksap.attach imports this module, so its class is looked up, not imported (no import
    # cycle); if attach was never imported, no model can carry its masks.
    attach = sys.modules.get("ntksap.attach")
    mask_class = getattr(attach, "MaskParametrization", ())

    name = f"{mod_name}.{attr}" if mod_name else attr
    expr = _module_expr(mod_name)
    keep_dense = f", or pass exclude=[{name!r}] to keep it dense"
    if parametrize.is_parametrized(module, attr):
        plist = getattr(module.parametrizations, attr)
        foreign = [type(p).__name__ for p in plist if not isinstance(p, mask_class)]
        if not foreign:
            return None
        return (
            f"is computed by a parametrization ({', '.join(foreign)}, e.g. weight_norm or "
            f"spectral_norm); remove it first with torch.nn.utils.parametrize."
            f"remove_parametrizations({expr}, {attr!r}){keep_dense}"
        )
    # Old-style hooks recompute the attribute before every forward from other parameters.
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    # Old weight_norm and prune hooks also make the model impossible to deep-copy, which
    # pruning needs, so excluding the layer is no way out for them.
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == attr:
            return (
                "is computed by torch.nn.utils.weight_norm; remove it first with "
                f"torch.nn.utils.remove_weight_norm({expr}, {attr!r}) (this old-style hook "
                "also prevents the deep copy pruning works on; "
                "torch.nn.utils.parametrizations.weight_norm does not, and can be excluded)"
            )
        if isinstance(hook, SpectralNorm) and hook.name == attr:
            return (
                "is computed by torch.nn.utils.spectral_norm; remove it first with "
                f"torch.nn.utils.remove_spectral_norm({expr}, {attr!r}){keep_dense}"
            )
        if isinstance(hook, BasePruningMethod) and hook._tensor_name == attr:
            return (
                "is masked by torch.nn.utils.prune hooks (which also prevent the deep copy "
                f"pruning works on); make it plain first with "
                f"torch.nn.utils.prune.remove({expr}, {attr!r})"
            )
    return None


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
        ValueError: a pattern matches nothing, no parameter is left to prune, or a selected
            weight is computed (weight_norm, spectral_norm, ...) and not excluded.

    Example:
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> net = nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
        >>> prunable_parameters(net)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: 0.weight (Linear) is computed by a parametrization (_WeightNorm, ...
        >>> list(prunable_parameters(net, exclude=["0.weight"]))
        ['1.weight']
    """
    if isinstance(exclude, str) or isinstance(include, str):
        raise TypeError("exclude/include take a list of glob patterns, not a single string")
    if not isinstance(include_bias, bool):
        raise ValueError(f"include_bias must be True or False, got {include_bias!r}")
    seen: set[int] = set()
    chosen: dict[str, nn.Parameter] = {}
    computed: dict[str, str] = {}  # name -> why it cannot be pruned as it is
    # A tensor held by several modules (tied weights, e.g. an embedding and a Linear head) is
    # named as `named_parameters()` names it (its first holder), whichever holder selects it:
    # masks, copies and `apply_masks` all look it up by that name.
    canonical = {id(p): n for n, p in named_parameters_canonical(model).items()}
    for mod_name, module in model.named_modules():
        if not isinstance(module, layer_types):
            continue
        attrs = ["weight"] + (["bias"] if include_bias else [])
        for attr in attrs:
            name = f"{mod_name}.{attr}" if mod_name else attr
            why = _computed_weight(module, mod_name, attr)
            if why is not None:
                computed[name] = f"{name} ({_layer_class(module)}) {why}"
                continue
            if parametrize.is_parametrized(module, attr):
                p = getattr(module.parametrizations, attr).original  # under ntksap's mask
            else:
                p = module._parameters.get(attr)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            chosen[canonical.get(id(p), name)] = p
    if include:
        all_params = named_parameters_canonical(model)
        for name in sorted(_match_all(include, all_params, "include")):
            p = all_params[name]
            if id(p) not in seen:
                seen.add(id(p))
                chosen[name] = p  # type: ignore[assignment]
    if exclude:
        for name in _match_all(exclude, [*chosen, *computed], "exclude"):
            chosen.pop(name, None)
            computed.pop(name, None)
    if computed:
        why = next(iter(computed.values()))
        more = f" ({len(computed) - 1} more such weight(s))" if len(computed) > 1 else ""
        raise ValueError(f"{why}{more}")
    if not chosen:
        raise ValueError(
            "the model has no prunable parameters (no Conv/Linear weights left after "
            "include/exclude); pass include=[...] to name some"
        )
    return chosen
