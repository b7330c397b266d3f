"""Per-layer statistics of a masked model: parameters kept, density and FLOPs.

FLOPs follow the convention of `torch.utils.flop_counter` (the fvcore convention): one
multiply-add counts as 2 FLOPs, and only matrix products and convolutions are counted
(no additions of biases, activations, pooling or normalisation). They are measured on one
forward pass of a batch of ONE input, `torch.zeros(1, *input_shape)`, with the model in eval
mode under `torch.no_grad()`.

Remaining FLOPs of a masked layer are approximated as `dense FLOPs x density of its mask`,
the standard estimate for unstructured sparsity (a sparse kernel skips the multiply-adds of
pruned weights; the count says nothing about wall-clock speed on dense hardware).

Beside the nominal density every row and the totals give the *effective* density: the
fraction of weights on at least one input-to-output path (`ntksap.masks.effective`); the
other kept weights can neither change the output nor learn.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ntksap.masks import Masks
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> masks = Masks({"1.weight": torch.tensor([[1, 0, 0, 0]] * 3, dtype=torch.bool)})
    >>> stats, totals = layer_table(net, masks, (4,))
    >>> stats[0].flops_dense, stats[0].flops_kept, totals.flops_remaining   # 2 * 4 * 3
    (24, 6, 6)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ntksap.masks import Masks, effective

__all__ = [
    "FLOP_CONVENTION",
    "LayerStat",
    "Totals",
    "count_module_flops",
    "format_table",
    "human",
    "layer_table",
]

FLOP_CONVENTION = (
    "FLOPs: torch.utils.flop_counter convention (1 multiply-add = 2 FLOPs; matmuls and convs "
    "only), one forward of 1 input; remaining = dense x mask density per layer"
)

# `a.parametrizations.weight` (a ParametrizationList holding `original`) -> owner `a`
_PARAM_LIST = re.compile(r"(^|\.)parametrizations\.[^.]+$")


@dataclass(frozen=True)
class LayerStat:
    """One masked tensor.

    Attributes:
        name: parameter name, e.g. "layer1.0.conv1.weight".
        shape: the tensor's shape.
        params: number of entries (prunable weights).
        kept: entries the mask keeps.
        density: kept / params, in [0, 1].
        flops_dense: FLOPs of the module(s) using this tensor, all calls summed, for one
            input (multiply-add = 2). 0 for a tensor whose module does no counted op, and for
            a bias whose layer's FLOPs are attributed to its weight.
        flops_kept: round(flops_dense x density), the unstructured-sparsity estimate.
        effective_kept: kept entries on at least one input-to-output path
            (`ntksap.masks.effective`), or None when not computed.
        effective_density: effective_kept / params, or None.

    The effective fields are left out of equality (`==` compares the nominal statistics).
    """

    name: str
    shape: tuple[int, ...]
    params: int
    kept: int
    density: float
    flops_dense: int
    flops_kept: int
    effective_kept: int | None = field(default=None, compare=False)
    effective_density: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Totals:
    """The whole network.

    Attributes:
        params: prunable weights covered by the masks.
        kept: weights the masks keep.
        density: kept / params.
        flops_dense: FLOPs of one forward of the whole (dense) model on 1 input.
        flops_remaining: flops_dense - sum over masked layers of (dense - kept).
        input_shape: the input shape (without batch) the FLOPs were counted on.
        collapsed: names of tensors pruned to zero (`Masks.collapsed()`).
        effective_kept: kept weights on at least one input-to-output path, or None when
            not computed.
        effective_density: effective_kept / params, or None.
    """

    params: int
    kept: int
    density: float
    flops_dense: int
    flops_remaining: int
    input_shape: tuple[int, ...] = ()
    collapsed: list[str] = field(default_factory=list)
    effective_kept: int | None = None
    effective_density: float | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of prunable weights removed: 1 - density."""
        return 1.0 - self.density

    @property
    def effective_sparsity(self) -> float | None:
        """1 - effective density (>= the nominal sparsity), or None when not computed."""
        return None if self.effective_density is None else 1.0 - self.effective_density

    @property
    def flops_ratio(self) -> float:
        """Remaining / dense FLOPs (1.0 for a model with no counted FLOPs)."""
        return self.flops_remaining / self.flops_dense if self.flops_dense else 1.0


# ---------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------
def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_shape, int | str) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape
    ):
        raise ValueError(
            "input_shape must be a sequence of positive ints without the batch dimension, "
            f"e.g. (3, 32, 32); got {input_shape!r}"
        )
    return tuple(input_shape)


def count_module_flops(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward of `torch.zeros(1, *input_shape)`: (total, per module).

    The per-module dict is keyed by the module's name in `model.named_modules()` ("" for
    the root) and counts the FLOPs of that module's forward calls, children included, all
    calls summed (a Linear called twice counts twice). Modules that did no counted op are
    absent. The model runs in eval mode under no_grad; every module's training flag is put
    back afterwards, and nothing else is changed (eval-mode BatchNorm writes no buffers).

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3))
    >>> count_module_flops(net, (1, 5, 5))   # 2 * (2 * 3 * 3 outputs) * (1 * 3 * 3) MACs
    (324, {'': 324, '0': 324})
    """
    shape = _check_shape(input_shape)
    first = next(iter(model.parameters()), None)
    floats = [p for p in model.parameters() if p.is_floating_point()]
    device = first.device if first is not None else torch.device("cpu")
    dtype = floats[0].dtype if floats else torch.get_default_dtype()
    x = torch.zeros((1, *shape), device=device, dtype=dtype)  # (1, *input_shape)

    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    total = counts.get("Global", 0)

    # torch's ModuleTracker names the root by its class name and every other module
    # "<RootClass>.<path>", e.g. "ResNet.layer1.0.conv1" (torch 2.1 .. 2.13). Map those keys
    # back to named_modules() names; a module reachable by several paths is looked up under
    # every path (the tracker uses one of them).
    root = type(model).__name__
    per_module: dict[str, int] = {}
    if root in counts:
        per_module[""] = counts[root]
    paths: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
    for name, mod in model.named_modules():
        if not name:
            continue
        flops = sum(counts.get(f"{root}.{p}", 0) for p in paths[id(mod)] if p)
        if flops:
            per_module[name] = flops
    return total, per_module


def _own_flops(model: nn.Module, per_module: Mapping[str, int], name: str) -> int:
    """FLOPs of module `name` excluding those of its direct children (>= 0)."""
    mod = model.get_submodule(name) if name else model
    prefix = f"{name}." if name else ""
    children = sum(per_module.get(prefix + c, 0) for c, _ in mod.named_children())
    return max(0, per_module.get(name, 0) - children)


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> names of every module holding it as a parameter (tied weights: several).

    A parametrized tensor (`a.parametrizations.weight.original`) is attributed to `a`.
    """
    out: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules():
        owner = _PARAM_LIST.sub("", mod_name) if _PARAM_LIST.search(mod_name) else mod_name
        for p in mod._parameters.values():
            if p is not None and owner not in out.setdefault(id(p), []):
                out[id(p)].append(owner)
    return out


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
def layer_table(
    model: nn.Module,
    masks: Masks | Mapping[str, torch.Tensor],
    input_shape: Sequence[int],
    effective_density: bool = True,
) -> tuple[list[LayerStat], Totals]:
    """Per-tensor statistics of `model` pruned by `masks`, and the totals.

    With `effective_density` (default) the rows and totals also give the effective counts
    (`ntksap.masks.effective` on `input_shape`); a model that the path analysis cannot read
    (e.g. max pooling with dilation) gets a warning and None there instead of an error.

    `model` is the dense model or one with the masks attached (`apply_masks`); it is not
    modified. A module's FLOPs are attributed to its masked `weight` (or, if its weight is not
    masked, to its first masked tensor); other masked tensors of the same module (e.g. a
    bias under `include_bias`) get 0 FLOPs, since a bias add is not counted anyway. A
    tensor shared by several modules (tied weights) gets the FLOPs of all of them.

    Raises:
        MaskError: a mask names no parameter of `model` or has the wrong shape.
        ValueError: a bad input_shape.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3))
        >>> masks = Masks.ones_like({"0.weight": net[0].weight})
        >>> stats, totals = layer_table(net, masks, (1, 5, 5))
        >>> stats[0].flops_dense, totals.density, totals.effective_density
        (324, 1.0, 1.0)
    """
    masks = masks if isinstance(masks, Masks) else Masks(masks)
    masks.check_model(model)
    shape = _check_shape(input_shape)
    total, per_module = count_module_flops(model, shape)

    from ntksap.targets import named_parameters_canonical

    params = named_parameters_canonical(model)
    holders = _holders(model)
    # module name -> the masked tensor its FLOPs go to ("weight" preferred)
    flops_owner: dict[str, str] = {}
    for name in masks:
        for mod in holders.get(id(params[name]), []):
            current = flops_owner.get(mod)
            if current is None or (
                name.rpartition(".")[2] == "weight" and current.rpartition(".")[2] != "weight"
            ):
                flops_owner[mod] = name

    eff: Masks | None = None
    if effective_density:
        try:
            eff = effective(model, masks, input_shape=shape)
        except Exception as exc:  # the table itself must not fail on an unusual forward
            warnings.warn(
                f"effective density not computed ({type(exc).__name__}: {exc})", stacklevel=2
            )

    stats: list[LayerStat] = []
    removed = 0  # FLOPs removed by the masks, summed over layers
    for name, m in masks.items():
        n = m.numel()
        kept = int(m.sum())
        density = kept / n if n else 1.0
        mods = [mod for mod, owner in flops_owner.items() if owner == name]
        dense = sum(_own_flops(model, per_module, mod) for mod in mods)
        flops_kept = round(dense * density)
        removed += dense - flops_kept
        e_kept = int(eff[name].sum()) if eff is not None else None
        e_density = (e_kept / n if n else 1.0) if e_kept is not None else None
        stats.append(
            LayerStat(name, tuple(m.shape), n, kept, density, dense, flops_kept, e_kept, e_density)
        )
    totals = Totals(
        params=masks.num_total,
        kept=masks.num_kept,
        density=masks.density,
        flops_dense=total,
        flops_remaining=total - removed,
        input_shape=shape,
        collapsed=masks.collapsed(),
        effective_kept=eff.num_kept if eff is not None else None,
        effective_density=eff.density if eff is not None else None,
    )
    return stats, totals


def human(n: float) -> str:
    """A count in human units, about 3 significant digits: 40_800_000 -> "40.8M".

    >>> human(999), human(1234), human(40_812_000), human(2.5e9)
    ('999', '1.23K', '40.8M', '2.50G')
    """
    units = ["", "K", "M", "G", "T", "P"]
    v = float(n)
    i = 0
    while abs(v) >= 999.5 and i < len(units) - 1:
        v /= 1000.0
        i += 1
    if i == 0:
        return f"{round(v):d}"
    decimals = 2 if abs(v) < 9.995 else 1 if abs(v) < 99.95 else 0
    return f"{v:.{decimals}f}{units[i]}"


def _percent(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def format_table(stats: Sequence[LayerStat], totals: Totals) -> str:
    """An aligned plain-text table of `stats`, a totals block, and a collapse warning.

    The "effective" column is the effective density (weights on an input-to-output path),
    "n/a" where not computed.

    Example:
        >>> s = [LayerStat("fc.weight", (3, 4), 12, 6, 0.5, 24, 12, 3, 0.25)]
        >>> t = Totals(12, 6, 0.5, 24, 12, (4,), effective_kept=3, effective_density=0.25)
        >>> print(format_table(s, t))  # doctest: +ELLIPSIS
        name       shape  params  kept  density  effective  FLOPs kept
        fc.weight  3x4        12     6   50.00%     25.00%          12
        <BLANKLINE>
        prunable params  12
        kept             6
        density          50.00% (sparsity 50.00%)
        effective        25.00% (effective sparsity 75.00%): 3 kept weights on no ...
        ...
    """
    header = ("name", "shape", "params", "kept", "density", "effective", "FLOPs kept")
    rows = [
        (
            s.name,
            "x".join(str(d) for d in s.shape) or "scalar",
            f"{s.params:,}",
            f"{s.kept:,}",
            f"{100 * s.density:.2f}%",
            _percent(s.effective_density),
            human(s.flops_kept),
        )
        for s in stats
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = (True, True, False, False, False, False, False)  # text left-aligned, numbers right

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left)]
        return "  ".join(out).rstrip()

    lines = [line(header), *(line(r) for r in rows)]
    shape = "x".join(str(d) for d in totals.input_shape) or "?"
    lines += [
        "",
        f"prunable params  {totals.params:,}",
        f"kept             {totals.kept:,}",
        f"density          {100 * totals.density:.2f}% (sparsity {100 * totals.sparsity:.2f}%)",
        _effective_line(totals),
        f"dense FLOPs      {human(totals.flops_dense)} ({totals.flops_dense:,}) per {shape} input",
        f"remaining FLOPs  {human(totals.flops_remaining)} ({totals.flops_remaining:,}), "
        f"{100 * totals.flops_ratio:.2f}% of dense",
        FLOP_CONVENTION,
    ]
    if totals.collapsed:
        lines.append(
            f"WARNING: layer collapse: {len(totals.collapsed)} tensor(s) pruned to zero "
            "(no signal passes through them; without a bypass such as a residual "
            f"connection the network is disconnected): {', '.join(totals.collapsed)}"
        )
    return "\n".join(lines)


def _effective_line(totals: Totals) -> str:
    """The totals line of the effective density ("n/a" when not computed)."""
    if totals.effective_density is None or totals.effective_kept is None:
        return "effective        n/a"
    dead = totals.kept - totals.effective_kept
    return (
        f"effective        {100 * totals.effective_density:.2f}% (effective sparsity "
        f"{100 * (1 - totals.effective_density):.2f}%): {dead:,} kept weights on no "
        "input-output path"
    )
