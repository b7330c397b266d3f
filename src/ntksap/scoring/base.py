"""The scorer contract and the method registry.

A scorer takes a `ScoreContext` and returns one score tensor per prunable parameter; higher
means "keep". It changes nothing the user owns: it works on the pruning loop's private copy
of the model (whose state the loop restores after every round) and reads the current mask
from the context. Selection (top-k) and application (parametrize) are separate steps.

Adding a method is one function and one decorator. Its keyword options are typed `Option`
specs: `prune` fills in the defaults and checks every value before any work, so a scorer
reads `ctx.options` without checking anything:

    >>> @register_method(  # doctest: +SKIP
    ...     "abs_power",
    ...     default_rounds=1,
    ...     options=[Option("power", 1.0, float, "exponent of |theta|", low=0.0, low_open=True)],
    ... )
    ... def abs_power(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    ...     return {n: p.detach().abs() ** ctx.options["power"] for n, p in ctx.params.items()}

One option on its own:

    >>> power = Option("power", 1.0, float, "exponent of |theta|", low=0.0, low_open=True)
    >>> power.check("abs_power", 2)  # an int is fine for a float option
    2.0
    >>> power.check("abs_power", 0)
    Traceback (most recent call last):
    ...
    ValueError: abs_power power must be a positive number, got 0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ntksap import validate as validators  # (`validate` is a Method field's name)
from ntksap.registry import Registry

Scores = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

#: The value types an `Option` may have (what a command line can parse, and JSON can hold).
OPTION_TYPES: tuple[type, ...] = (int, float, str, bool)


@dataclass(frozen=True)
class Option:
    """One keyword option of a pruning method: its default, type, bounds and help.

    Attributes:
        name: the keyword, e.g. "epsilon".
        default: the value used when the option is not given (checked at registration).
        type: int, float, str or bool: the type of every non-None value.
        help: one line for `ntksap list` and `--help`; for `allow_none` say what None does.
        choices: the only valid values, or None for any value of `type`.
        allow_none: None is valid (it means "auto"; `help` says what auto is).
        low: numeric lower bound, or None; `low_open` makes it exclusive.

    Example:
        >>> Option("resamples", 5, int, low=1).check("ntksap", 3)
        3
        >>> Option("init", "auto", str, choices=("auto", "reset")).check("ntksap", "bad")
        Traceback (most recent call last):
        ...
        ValueError: ntksap init must be one of auto, reset, got 'bad'
    """

    name: str
    default: Any
    type: type
    help: str = ""
    choices: tuple[Any, ...] | None = None
    allow_none: bool = False
    low: float | None = None
    low_open: bool = False

    def __post_init__(self) -> None:
        # A bad spec is a programming error: report it at import time, not in a user's run.
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise TypeError(f"option name must be a Python identifier, got {self.name!r}")
        if self.type not in OPTION_TYPES:
            shown = ", ".join(t.__name__ for t in OPTION_TYPES)
            raise TypeError(f"option {self.name!r}: type must be one of {shown}, got {self.type}")
        if self.low is not None and (
            self.type not in (int, float)
            or isinstance(self.low, bool)
            or not isinstance(self.low, int | float)
            or not math.isfinite(self.low)
        ):
            raise TypeError(f"option {self.name!r}: low must be a finite number (int/float only)")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
            if not self.choices:
                raise TypeError(f"option {self.name!r}: choices must not be empty")
            for c in self.choices:
                if isinstance(c, bool) != (self.type is bool) or not isinstance(c, self.type):
                    raise TypeError(f"option {self.name!r}: choice {c!r} is not a {self.type}")
        self.check("option spec", self.default)

    def describe(self) -> str:
        """What a valid value is, in words (for messages and help).

        >>> Option("epsilon", 0.01, float, low=0.0, low_open=True).describe()
        'a positive number'
        >>> Option("num_samples", None, int, allow_none=True, low=1).describe()
        'an integer >= 1 or None (auto)'
        """
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.type is bool:
            text = "True or False"
        elif self.type is str:
            text = "a string"
        else:
            text = "an integer" if self.type is int else "a number"
            if self.low == 0 and self.low_open:
                text = f"a positive {text.split()[-1]}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
        return text + (" or None (auto)" if self.allow_none else "")

    def _normalise(self, label: str, value: Any) -> Any:
        """`value` (not None) checked with `ntksap.validate` against type, bounds, choices."""
        if self.type is bool:
            value = validators.boolean(label, value)
        elif self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"{label} must be a string, got {value!r}")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{label} must be an integer, got {value!r}")
            validators.finite_float(label, value, low=self.low, low_open=self.low_open)
        else:  # float: an int is accepted and converted, so the scorer always sees a float
            value = float(
                validators.finite_float(label, value, low=self.low, low_open=self.low_open)
            )
        if self.choices is not None:
            validators.choice(label, value, self.choices)
        return value

    def check(self, method: str, value: Any) -> Any:
        """The validated, normalised `value`; ValueError "<method> <name> must be ..." if not.

        NaN and inf are refused for numbers, bools are never numbers, and an int is accepted
        (as a float) for a float option.
        """
        if value is None and self.allow_none:
            return None
        label = f"{method} {self.name}"
        try:
            if value is None:
                raise ValueError(label)
            return self._normalise(label, value)
        except ValueError:
            # one message shape for every option: "<method> <name> must be <describe>"
            raise ValueError(f"{label} must be {self.describe()}, got {value!r}") from None


@dataclass
class ScoreContext:
    """Everything a scorer may read.

    Attributes:
        model: the loop's private copy of the user's model (mode and buffers may be changed
            by the scorer; the loop restores them).
        params: prunable name -> the copy's parameter (theta), in `named_parameters` order.
        masks: prunable name -> current bool mask (True = kept), same device as `params`.
        data: list of (inputs, targets) batches on the scoring device, or None; floating
            inputs are already in `dtype`.
        input_shape: shape of one input without the batch dimension, e.g. (3, 32, 32).
        device: where to compute.
        round: 1-based index of the pruning round; `rounds` is the total T.
        options: the method's options, checked, defaults filled in.
        dtype: the floating dtype the private copy computes in (its parameters' dtype).
        output_fn: maps the model's raw output to the logits tensor (None: it is one).
        output_width: numbers per input in the logits (from the loop's shape check), or
            None when unknown.
        rank / world_size: this process's place in a distributed scoring job (`prune(...,
            distributed=True)` under torchrun); 0 / 1 otherwise. A scorer that splits its
            work takes its share with `shard` and sums the parts with `all_reduce_`.
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
    dtype: torch.dtype = torch.float32
    output_fn: Callable[[Any], torch.Tensor] | None = None
    output_width: int | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        """Whether the scoring work is split across `world_size` > 1 processes."""
        return self.world_size > 1

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of `items`: those at positions rank, rank + world, ...

        Positions, not contents, decide the share, so every rank computes the same split.

        >>> ScoreContext(None, {}, {}, None, None, torch.device("cpu"), rank=1,
        ...              world_size=2).shard(["a", "b", "c"])
        ['b']
        """
        return list(items)[self.rank :: self.world_size]

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum every tensor over the ranks, in place (nothing to do in one process)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        where = collective_device(self.device)
        for t in tensors:
            if t.device == where:
                dist.all_reduce(t)
            else:  # e.g. gloo with CUDA tensors: reduce a CPU copy
                buf = t.to(where)
                dist.all_reduce(buf)
                t.copy_(buf)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank (a seed drawn once, used by all)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = torch.tensor([value], dtype=torch.int64, device=collective_device(self.device))
        dist.broadcast(box, src=0)
        return int(box.item())

    def mask_float(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Current masks as 0/1 float tensors (dtype of the parameters unless given)."""
        return {n: m.to(dtype or self.params[n].dtype) for n, m in self.masks.items()}

    def forward(
        self, weights: Mapping[str, torch.Tensor], x: torch.Tensor, **extra: torch.Tensor
    ) -> torch.Tensor:
        """The logits of `model(x)` with the prunable weights replaced by `weights`
        (functional, no writes); `output_fn` is applied here, so every method uses it."""
        out = functional_call(self.model, {**weights, **extra}, (x,), strict=False)
        return as_logits(out, self.output_fn)


ScoreFn = Callable[[ScoreContext], Scores]


def collective_device(device: torch.device) -> torch.device:
    """Where a collective's buffer must live: the GPU for nccl, the CPU for gloo."""
    import torch.distributed as dist

    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _output_hint(out: Any) -> str:
    """The `output_fn` that probably picks the logits out of `out`."""
    if hasattr(out, "logits"):
        return "output_fn=lambda out: out.logits"
    if isinstance(out, Mapping):
        key = "logits" if "logits" in out else next(iter(out), None)
        if key is not None:
            return f"output_fn=lambda out: out[{key!r}]"
    if isinstance(out, tuple | list) and out:
        return "output_fn=lambda out: out[0]"
    return "output_fn= (a function that picks the logits tensor out of it)"


def as_logits(out: Any, output_fn: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """`output_fn(out)` (or `out`), checked to be one tensor: what every scorer differentiates.

    Raises:
        TypeError: naming what was returned and the `output_fn` that would fix it.

    Example:
        >>> as_logits((torch.zeros(2, 3), None))
        Traceback (most recent call last):
        ...
        TypeError: the model's forward must return one tensor of logits (batch, outputs); it returned tuple; pass output_fn=lambda out: out[0]
        >>> as_logits((torch.zeros(2, 3), None), lambda out: out[0]).shape
        torch.Size([2, 3])
    """  # noqa: E501
    if output_fn is None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                "the model's forward must return one tensor of logits (batch, outputs); it "
                f"returned {type(out).__name__}; pass {_output_hint(out)}"
            )
        return out
    try:
        logits = output_fn(out)
    except Exception as exc:
        raise TypeError(
            f"output_fn failed on the model's output ({type(out).__name__}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "output_fn must return one tensor of logits (batch, outputs); it returned "
            f"{type(logits).__name__}"
        )
    return logits


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    Attributes:
        name: registry name.
        fn: the scorer.
        needs_data: True for methods that always read real (inputs, targets) batches.
            A method whose need depends on its options (NTK-SAP's `inputs`) leaves it False
            and sets `needs_data_when`; callers that know the options ask `needs_data_for`.
        needs_input_shape: True for data-free methods that feed synthetic inputs.
        default_rounds: the paper's number of pruning rounds T.
        options: option name -> its `Option` spec (type, default, bounds, help).
        summary: one line for `ntksap list`.
        validate: cross-option check of a full, per-option-checked options dict, raising
            ValueError; runs before any work.
        needs_data_when: for a method that is data-free at its defaults but reads real
            batches under some options: full options dict -> whether it reads them.
        floor_when: the method's default selection floor (`ntksap.prune`'s `floor`) as a
            function of its full options dict, e.g. NTK-SAP's robust=True -> 1.0; None: 0.
        pinned: options whose default has changed: a run records their value (the default
            when not given) in its config, so a run made under the old default never
            shares a sweep identity with one made under the new (e.g. px's variant).
        unguarded_when: for a method with a guarded variant (NTK-SAP's robust=True): full
            options dict -> the options of its unguarded first pass, or None where the
            options ask for no guard (see `ntksap.prune`: the guarded pass runs only when
            the first pass starves a layer, `ntksap.pruning.starved_layers`).
        rounds_when: the default number of rounds as a function of the options dict, None
            where they leave it at `default_rounds` (e.g. NTK-SAP: 100 under robust=True).
    """

    name: str
    fn: ScoreFn
    needs_data: bool
    needs_input_shape: bool
    default_rounds: int
    options: Mapping[str, Option]
    summary: str
    validate: Callable[[dict[str, Any]], None] | None = None
    needs_data_when: Callable[[dict[str, Any]], bool] | None = None
    floor_when: Callable[[dict[str, Any]], float] | None = None
    rounds_when: Callable[[dict[str, Any]], int | None] | None = None
    unguarded_when: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
    pinned: tuple[str, ...] = ()

    def unguarded_for(self, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The options of the unguarded first pass `ntksap.prune` runs before the method's
        guarded one, or None when the options ask for no guard.

        >>> get_method("ntksap").unguarded_for() is None
        True
        >>> get_method("ntksap").unguarded_for({"robust": True})["robust"]
        False
        """
        if self.unguarded_when is None:
            return None
        return self.unguarded_when({**self.defaults, **(options or {})})

    def rounds_for(self, options: Mapping[str, Any] | None = None) -> int:
        """The number of rounds T `ntksap.prune` runs when it is given none: `default_rounds`
        unless the method's options choose another (NTK-SAP's robust=True: 100).

        >>> get_method("ntksap").rounds_for(), get_method("ntksap").rounds_for({"robust": True})
        (20, 100)
        """
        chosen = (
            None
            if self.rounds_when is None
            else self.rounds_when({**self.defaults, **(options or {})})
        )
        return self.default_rounds if chosen is None else int(chosen)

    def floor_for(self, options: Mapping[str, Any] | None = None) -> float:
        """The selection floor `ntksap.prune` uses when it is given none (see `prune`'s
        `floor`): 0.0 (no floor) unless the method's options ask for one.

        >>> get_method("ntksap").floor_for(), get_method("ntksap").floor_for({"robust": True})
        (0.0, 1.0)
        """
        if self.floor_when is None:
            return 0.0
        return float(self.floor_when({**self.defaults, **(options or {})}))

    @property
    def defaults(self) -> dict[str, Any]:
        """Option name -> default value."""
        return {n: o.default for n, o in self.options.items()}

    def needs_data_for(self, options: Mapping[str, Any] | None = None) -> bool:
        """Whether the method reads real (inputs, targets) batches with these `options`.

        The one question every caller that supplies data asks (the pruning loop's "needs
        data but none given" check, a run deciding to build its pruning batches), so a
        method whose data need depends on an option is handled in one place. `options` may
        be partial (e.g. only what a user gave): the defaults fill the rest; the values are
        not checked here (`resolve_options` does that).

        >>> get_method("snip").needs_data_for()
        True
        >>> get_method("ntksap").needs_data_for(), get_method("ntksap").needs_data_for(
        ...     {"inputs": "data"})
        (False, True)
        """
        if self.needs_data:
            return True
        if self.needs_data_when is None:
            return False
        return bool(self.needs_data_when({**self.defaults, **(options or {})}))

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """`given` checked option by option, defaults filled in, then `validate` run.

        Raises:
            TypeError: an unknown option name (the message lists the valid ones).
            ValueError: a value its `Option` refuses, or a failed cross-option check.
        """
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise TypeError(f"unknown option(s) {unknown} for method {self.name!r}; valid: {valid}")
        opts = {n: o.check(self.name, given.get(n, o.default)) for n, o in self.options.items()}
        if self.validate is not None:
            self.validate(opts)
        return opts


METHODS: Registry[Method] = Registry("method")


def register_method(
    name: str,
    *,
    needs_data: bool = False,
    needs_input_shape: bool = False,
    default_rounds: int = 1,
    options: Sequence[Option] = (),
    summary: str = "",
    validate: Callable[[dict[str, Any]], None] | None = None,
    needs_data_when: Callable[[dict[str, Any]], bool] | None = None,
    floor_when: Callable[[dict[str, Any]], float] | None = None,
    rounds_when: Callable[[dict[str, Any]], int | None] | None = None,
    unguarded_when: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
    pinned: Sequence[str] = (),
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a scorer under `name`.

    Args:
        needs_data: the method always reads real (inputs, targets) batches.
        options: the method's keyword options, a sequence of `Option` specs.
        validate: optional cross-option check (each option is already checked on its own).
        needs_data_when: for a method data-free by default that reads real batches under
            some options: full options dict -> whether it does (see `Method.needs_data_for`);
            not together with `needs_data=True`.
        floor_when: full options dict -> the method's default selection floor in [0, 1]
            (see `Method.floor_for`).
        rounds_when: full options dict -> the method's default number of rounds, or None for
            `default_rounds` (see `Method.rounds_for`).
        unguarded_when: full options dict -> the options of the unguarded first pass, or
            None for no guard (see `Method.unguarded_for`).
        pinned: names of options whose default changed (see `Method.pinned`).
    """
    if needs_data and needs_data_when is not None:
        raise TypeError(
            f"method {name!r}: needs_data=True already means always; give needs_data_when "
            "only for a method that is data-free at its defaults"
        )
    if isinstance(options, Mapping | str):
        raise TypeError(
            "options must be a sequence of Option specs, e.g. "
            "options=[Option('epsilon', 0.01, float, low=0.0, low_open=True)]; "
            f"got {type(options).__name__}"
        )
    specs: dict[str, Option] = {}
    for opt in options:
        if not isinstance(opt, Option):
            raise TypeError(f"method {name!r}: options must be Option specs, got {opt!r}")
        if opt.name in specs:
            raise ValueError(f"method {name!r}: option {opt.name!r} is declared twice")
        specs[opt.name] = opt
    rounds = validators.positive_int(f"method {name!r} default_rounds", default_rounds)
    unknown = [p for p in pinned if p not in specs]
    if unknown:
        raise ValueError(f"method {name!r}: pinned names no option: {', '.join(unknown)}")

    def deco(fn: ScoreFn) -> ScoreFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS.register(name)(
            Method(
                name=name,
                fn=fn,
                needs_data=needs_data,
                needs_input_shape=needs_input_shape,
                default_rounds=rounds,
                options=specs,
                summary=summary or (doc[0] if doc else ""),
                validate=validate,
                needs_data_when=needs_data_when,
                floor_when=floor_when,
                rounds_when=rounds_when,
                unguarded_when=unguarded_when,
                pinned=tuple(pinned),
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


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def summed_batch_gradients(
    ctx: ScoreContext,
    loss_of_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """sum over the data's batches of d loss_of_batch(x, y) / d inputs, in float64.

    One backward per batch, each gradient added in float64: the batches can be split across
    the ranks of a distributed job (`ctx.shard`: batch b on rank b mod world) and the
    parts summed (`ctx.all_reduce_`), and the total agrees with one process's to float64
    rounding, whatever the number of processes. A rank without batches contributes zeros.
    """
    if not ctx.data:
        raise ValueError("this method needs data: pass data=[(inputs, targets), ...]")
    total = [torch.zeros_like(t, dtype=torch.float64) for t in inputs]
    for x, y in ctx.shard(ctx.data):
        for acc, g in zip(total, torch.autograd.grad(loss_of_batch(x, y), list(inputs))):
            acc.add_(g)
    ctx.all_reduce_(total)
    return total
