"""The scorer contract and the method registry.

A scorer takes a `ScoreContext` and returns one score tensor per prunable parameter; higher
means "keep". It changes nothing the user owns: it works on the pruning loop's private copy
of the model (whose state the loop restores after every round) and reads the current mask
from the context. Selection (top-k) and application (parametrize) are separate steps.

Adding a method is one function and one decorator:

    >>> @register_method("abs_grad_free", needs_data=False, default_rounds=1)
    ... def my_score(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    ...     return {n: p.detach().abs() for n, p in ctx.params.items()}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ntksap.registry import Registry

Scores = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ScoreContext:
    """Everything a scorer may read.

    Attributes:
        model: the loop's private copy of the user's model (mode and buffers may be changed
            by the scorer; the loop restores them).
        params: prunable name -> the copy's parameter (theta), in `named_parameters` order.
        masks: prunable name -> current bool mask (True = kept), same device as `params`.
        data: list of (inputs, targets) batches on the scoring device, or None.
        input_shape: shape of one input without the batch dimension, e.g. (3, 32, 32).
        round: 1-based index of the pruning round; `rounds` is the total T.
        options: the method's options, defaults filled in.
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    masks: dict[str, torch.Tensor]
    data: list[Batch] | None
    input_shape: tuple[int, ...] | None
    device: torch.device
    round: int = 1
    rounds: int = 1
    options: dict[str, Any] = field(default_factory=dict)

    def mask_float(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Current masks as 0/1 float tensors (dtype of the parameters unless given)."""
        return {n: m.to(dtype or self.params[n].dtype) for n, m in self.masks.items()}

    def forward(
        self, weights: Mapping[str, torch.Tensor], x: torch.Tensor, **extra: torch.Tensor
    ) -> torch.Tensor:
        """`model(x)` with the prunable weights replaced by `weights` (functional, no writes)."""
        return functional_call(self.model, {**weights, **extra}, (x,), strict=False)


ScoreFn = Callable[[ScoreContext], Scores]


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    Attributes:
        name: registry name.
        fn: the scorer.
        needs_data: True for methods that read real (inputs, targets) batches.
        needs_input_shape: True for data-free methods that feed synthetic inputs.
        default_rounds: the paper's number of pruning rounds T.
        options: allowed keyword options and their defaults.
        summary: one line for `ntksap list`.
        validate: checks a full options dict, raising ValueError; runs before any work.
    """

    name: str
    fn: ScoreFn
    needs_data: bool
    needs_input_shape: bool
    default_rounds: int
    options: Mapping[str, Any]
    summary: str
    validate: Callable[[dict[str, Any]], None] | None = None


METHODS: Registry[Method] = Registry("method")


def register_method(
    name: str,
    *,
    needs_data: bool = False,
    needs_input_shape: bool = False,
    default_rounds: int = 1,
    options: Mapping[str, Any] | None = None,
    summary: str = "",
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a scorer under `name`."""

    def deco(fn: ScoreFn) -> ScoreFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS.register(name)(
            Method(
                name=name,
                fn=fn,
                needs_data=needs_data,
                needs_input_shape=needs_input_shape,
                default_rounds=default_rounds,
                options=dict(options or {}),
                summary=summary or (doc[0] if doc else ""),
                validate=validate,
            )
        )
        return fn

    return deco


def list_methods() -> list[str]:
    """Sorted names of every registered pruning method."""
    return METHODS.names()


def get_method(name: str) -> Method:
    """The registered `Method` called `name` (ValueError listing the choices otherwise)."""
    return METHODS.get(name)


def check_positive_int(method: str, key: str, value: Any, allow_none: bool = False) -> None:
    """Raise ValueError unless `value` is an int >= 1 (or None when allowed)."""
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{method} {key} must be an integer >= 1{extra}, got {value!r}")


def check_positive_float(method: str, key: str, value: Any) -> None:
    """Raise ValueError unless `value` is a finite number > 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{method} {key} must be a positive number, got {value!r}")


def check_choice(method: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{method} {key} must be one of {', '.join(choices)}, got {value!r}")


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def cross_entropy_sum_over_batches(
    ctx: ScoreContext,
    weights: Mapping[str, torch.Tensor],
    temperature: float = 1.0,
) -> torch.Tensor:
    """sum over the data's batches of mean cross-entropy of `model(x) / temperature`."""
    if not ctx.data:
        raise ValueError("this method needs data: pass data=[(inputs, targets), ...]")
    total = torch.zeros((), device=ctx.device)
    for x, y in ctx.data:
        out = ctx.forward(weights, x)
        total = total + nn.functional.cross_entropy(out / temperature, y)
    return total
