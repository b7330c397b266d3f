"""Attach masks to any `nn.Module` with `torch.nn.utils.parametrize`, bake them, export them.

`apply_masks` registers a parametrization `W -> W * m` on every masked tensor, so the
effective weight is exactly zero at pruned places whatever an optimiser does to the stored
tensor: its gradient there is `dL/dW_eff * m = 0`. The stored tensor is zeroed at pruned
places too (by default), so weight decay and momentum see zeros as well. Parametrized models
deep-copy, work with `torch.func` and with DDP (unlike `torch.nn.utils.prune`'s hooks).

Example:
    >>> from torch import nn
    >>> import torch
    >>> net = nn.Linear(2, 2)
    >>> masks = Masks({"weight": torch.tensor([[True, False], [False, True]])})
    >>> net = apply_masks(net, masks)
    >>> bool(net.weight[0, 1] == 0)  # the pruned entry is exactly zero
    True
    >>> net = remove_masks(net)  # plain parameters again, exact zeros kept
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from ntksap.masks import MaskError, Masks
from ntksap.targets import _canonical


class MaskParametrization(nn.Module):
    """`forward(W) = W * mask`; the mask is a non-trainable buffer (moves with `.to()`)."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"density={float(self.mask.float().mean()):.4f}"


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy to work on, so the user's model is never touched; a clear error if the
    model cannot be copied (torch.nn.utils.prune's hooks cannot, in torch 2.13)."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(
            f"cannot deep-copy the model ({exc}); models with torch.nn.utils.prune hooks "
            "cannot be copied: call torch.nn.utils.prune.remove on them first"
        ) from exc


def _owners(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Canonical parameter name -> every (module, attribute) that holds that tensor.

    Tied weights are held by several modules; all of them must see the mask.
    """
    by_id: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                by_id.setdefault(id(p), []).append((module, attr))
    out: dict[str, list[tuple[nn.Module, str]]] = {}
    for name, p in model.named_parameters():
        out[_canonical(name)] = by_id[id(p)]
    return out


def _module_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def apply_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], zero: bool = True
) -> nn.Module:
    """Attach `masks` to `model` in place (parametrize) and return it.

    Args:
        masks: `Masks` (or a dict name -> bool tensor) keyed by parameter name.
        zero: also write exact zeros into the stored tensor at pruned places.

    Raises:
        MaskError: a name is unknown, a shape differs, or the tensor is already masked.
    """
    masks = masks if isinstance(masks, Masks) else Masks(masks)
    masks.check_model(model)
    owners = _owners(model)
    for name in masks:
        module, attr = _module_attr(model, name)
        if parametrize.is_parametrized(module, attr):
            raise MaskError(
                f"{name} already has a parametrization (masks attached?); call "
                "ntksap.remove_masks(model) first"
            )
    for name, mask in masks.items():
        holders = owners[name]
        param = getattr(holders[0][0], holders[0][1])
        mask = mask.to(param.device)
        if zero:
            with torch.no_grad():
                param.mul_(mask.to(param.dtype))
        for module, attr in holders:
            # unsafe=True skips a trial forward that would allocate a full copy per tensor
            parametrize.register_parametrization(
                module, attr, MaskParametrization(mask), unsafe=True
            )
    return model


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class.

    `copy.deepcopy` of a parametrized module shares the generated `Parametrized<Cls>` class
    with the original, and `remove_parametrizations` deletes the property from that class,
    which silently breaks the *other* copy (torch 2.13: `AttributeError: ... no attribute
    'weight'`). A private class makes the removal local.
    """
    cls = type(module)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake every mask into plain parameters (exact zeros at pruned places), in place."""
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        _own_class(module)
        for attr in list(module.parametrizations.keys()):
            plist = module.parametrizations[attr]
            if any(isinstance(p, MaskParametrization) for p in plist):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


def get_masks(model: nn.Module) -> Masks:
    """The masks currently attached to `model` by `apply_masks`, keyed by parameter name."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, MaskParametrization):
                    name = f"{mod_name}.{attr}" if mod_name else attr
                    out.setdefault(name, p.mask.detach().clone())
    return Masks(out)


def export_to_torch_prune(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Attach `masks` with `torch.nn.utils.prune.custom_from_mask` instead (in place).

    For tools that expect the `weight_orig` / `weight_mask` convention. Note such a model
    cannot be deep-copied (a torch limitation); prefer `apply_masks`.
    """
    masks = masks if isinstance(masks, Masks) else Masks(masks)
    masks.check_model(model)
    for name, mask in masks.items():
        module, attr = _module_attr(model, name)
        p = getattr(module, attr)
        torch_prune.custom_from_mask(module, attr, mask.to(p.device))
    return model
