"""Re-drawing a model's weights from its initialisation distribution.

Used by NTK-SAP (a fresh theta for every noise batch) and by the re-initialisation ablation.

Schemes:
    "reset":   every submodule's own `reset_parameters()` (PyTorch's defaults, or the user's).
    "kaiming": Kaiming-normal (fan_in, ReLU gain) Conv/Linear weights, zero biases, norm
               weight 1 and bias 0, as the NTK-SAP/SynFlow reference models; other modules
               with `reset_parameters()` are reset.

Example:
    >>> from torch import nn
    >>> net = nn.Linear(4, 2)
    >>> _ = reinitialize(net, "kaiming", seed=0)
"""

from __future__ import annotations

import torch
from torch import nn

from ntksap.models.init import kaiming_init_

INIT_SCHEMES = ("reset", "kaiming")


@torch.no_grad()
def redraw_(model: nn.Module, scheme: str) -> nn.Module:
    """Re-draw every parameter of `model` in place from `scheme`, using torch's global RNG."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(
            f"unknown init scheme {scheme!r}; valid choices: {', '.join(INIT_SCHEMES)}"
        )
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    if scheme == "kaiming":
        kaiming_init_(model)
    return model


def reinitialize(model: nn.Module, scheme: str = "kaiming", seed: int | None = None) -> nn.Module:
    """Re-initialise `model` in place (the 'reinit' sanity-check ablation); returns it.

    With `seed`, the draw is reproducible and torch's global RNG state is left as it was.
    Masks attached with `apply_masks` stay attached (on every module holding a tied
    tensor); pruned weights stay zero. All-or-nothing: if any step fails, the weights,
    buffers and attached masks are left exactly as they were.
    """
    from ntksap.attach import _transaction, apply_masks, get_masks, remove_masks

    if scheme not in INIT_SCHEMES:  # before the backup copy of every tensor
        raise ValueError(
            f"unknown init scheme {scheme!r}; valid choices: {', '.join(INIT_SCHEMES)}"
        )
    masks = get_masks(model)
    with _transaction(model):
        if len(masks):
            remove_masks(model)
        if seed is None:
            redraw_(model, scheme)
        else:
            with torch.random.fork_rng(devices=_cuda_devices(model)):
                torch.manual_seed(seed)
                redraw_(model, scheme)
        if len(masks):
            apply_masks(model, masks)
    return model


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
