"""The one weight initialisation shared by every model in the zoo.

The reference NTK-SAP / SynFlow / OpenLTH models initialise every Conv and Linear weight
with Kaiming-normal (fan_in, ReLU gain, so std = sqrt(2 / fan_in)) and every BatchNorm
with gamma 1, beta 0. Biases are set to zero here (the reference code leaves PyTorch's
default uniform bias init in place, with its zeroing line commented out).

Example:
    >>> from torch import nn
    >>> net = kaiming_init_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    >>> net[1].weight.min().item(), net[0].bias.abs().max().item()
    (1.0, 0.0)
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

#: The layers whose weights are Kaiming-normal drawn, and the norms set to 1 / 0.
KAIMING_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
KAIMING_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_WEIGHTED, _NORMS = KAIMING_LAYERS, KAIMING_NORMS


@torch.no_grad()
def kaiming_init_(module: M) -> M:
    """Initialise `module` and all its submodules in place; returns `module` for chaining.

    Conv/Linear: weight ~ N(0, 2 / fan_in), bias 0. BatchNorm: weight 1, bias 0, and the
    running statistics reset. Other modules are left alone.
    """
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            m.reset_running_stats()
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return module
