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

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping

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


@contextlib.contextmanager
def _transaction(model: nn.Module, tensors: Iterable[torch.Tensor] | None = None) -> Iterator[None]:
    """Undo everything the block did to `model` if it raises, then re-raise.

    Restored: every module's class and its parameter, buffer and submodule slots (what
    `parametrize` rewires), and the storage and values of `tensors` (default: every
    parameter and buffer; `remove_parametrizations` swaps a tensor's storage with `set_`).
    Tensor objects keep their identity, so optimisers holding them are unaffected.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> w = net.weight.detach().clone()
        >>> try:
        ...     with _transaction(net):
        ...         _ = apply_masks(net, {"weight": torch.zeros(2, 2, dtype=torch.bool)})
        ...         raise RuntimeError("later step failed")
        ... except RuntimeError:
        ...     pass
        >>> parametrize.is_parametrized(net), torch.equal(net.weight, w)
        (False, True)
    """
    slots = [
        (m, m.__class__, dict(m._parameters), dict(m._buffers), dict(m._modules))
        for m in model.modules()
    ]
    if tensors is None:
        tensors = [t for _, _, ps, bs, _ in slots for t in [*ps.values(), *bs.values()]]
    saved: dict[int, tuple] = {}
    for t in tensors:
        if t is not None and id(t) not in saved:
            saved[id(t)] = (
                t,
                t.untyped_storage(),
                t.storage_offset(),
                t.size(),
                t.stride(),
                t.detach().clone(),
            )
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, cls, params, buffers, modules in slots:
                if m.__class__ is not cls:
                    m.__class__ = cls
                for now, before in (
                    (m._parameters, params),
                    (m._buffers, buffers),
                    (m._modules, modules),
                ):
                    now.clear()  # the same dict objects: other code may hold them
                    now.update(before)
            for t, storage, offset, size, stride, value in saved.values():
                if t.untyped_storage().data_ptr() != storage.data_ptr() or t.size() != size:
                    t.set_(storage, offset, size, stride)
                t.copy_(value)
        raise


def apply_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], zero: bool = True
) -> nn.Module:
    """Attach `masks` to `model` in place (parametrize) and return it.

    A tensor that several modules hold (tied weights) is masked in all of them. The
    operation is all-or-nothing: if it fails, `model` is left exactly as it was.

    Args:
        masks: `Masks` (or a dict name -> bool tensor) keyed by parameter name.
        zero: also write exact zeros into the stored tensor at pruned places.

    Raises:
        MaskError: a name is unknown, a shape differs, a mask cannot be read on the
            parameter's device, or the tensor is already masked.
    """
    masks = masks if isinstance(masks, Masks) else Masks(masks)
    masks.check_model(model)
    owners = _owners(model)
    for name in masks:
        # A parametrized tensor's holder is its ParametrizationList ("original").
        holders = [_module_attr(model, name), *owners[name]]
        if any(
            isinstance(module, parametrize.ParametrizationList)
            or parametrize.is_parametrized(module, attr)
            for module, attr in holders
        ):
            raise MaskError(
                f"{name} already has a parametrization (masks attached?); call "
                "ntksap.remove_masks(model) first"
            )
    # Everything a mask can make fail happens here, before the model is touched.
    plan = []
    for name, mask in masks.items():
        holders = owners[name]
        param = getattr(holders[0][0], holders[0][1])
        try:
            parts = [MaskParametrization(mask.to(param.device)) for _ in holders]
        except Exception as exc:  # e.g. a mask on the meta device holds no values
            raise MaskError(
                f"mask {name!r} cannot be used on {param.device} ({type(exc).__name__}: {exc})"
            ) from exc
        plan.append((holders, param, parts))
    with _transaction(model, [param for _, param, _ in plan] if zero else []):
        for holders, param, parts in plan:
            if zero:
                with torch.no_grad():
                    param.mul_(parts[0].mask.to(param.dtype))
            for (module, attr), part in zip(holders, parts):
                if parametrize.is_parametrized(module):
                    # torch adds the new property to the module's generated class, which
                    # deep copies share: they would get a property with nothing behind it.
                    _own_class(module)
                # unsafe=True skips a trial forward that would allocate a full copy per tensor
                parametrize.register_parametrization(module, attr, part, unsafe=True)
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


def _masked(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) that carries a `MaskParametrization`."""
    return [
        (module, attr)
        for module in model.modules()
        if parametrize.is_parametrized(module)
        for attr, plist in module.parametrizations.items()
        if any(isinstance(p, MaskParametrization) for p in plist)
    ]


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake every mask into plain parameters (exact zeros at pruned places), in place.

    All-or-nothing: if it fails, the masks stay attached and the weights as they were.
    """
    todo = _masked(model)
    originals = [module.parametrizations[attr].original for module, attr in todo]
    with _transaction(model, originals):
        owned: set[int] = set()
        for module, attr in todo:
            if id(module) not in owned:
                _own_class(module)
                owned.add(id(module))
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


def get_masks(model: nn.Module) -> Masks:
    """The masks currently attached to `model` by `apply_masks`, keyed by parameter name.

    A tensor held by several modules (tied weights) appears once, under the name
    `model.named_parameters()` gives it (with the parametrization part removed): the name
    `ntksap.prune` uses.
    """
    by_tensor: dict[int, torch.Tensor] = {}
    for module, attr in _masked(model):
        plist = module.parametrizations[attr]
        mask = next(p.mask for p in plist if isinstance(p, MaskParametrization))
        by_tensor.setdefault(id(plist.original), mask)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # one name per tensor
        if id(p) in by_tensor:
            out[_canonical(name)] = by_tensor[id(p)].detach().clone()
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
