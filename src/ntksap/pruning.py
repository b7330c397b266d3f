"""The pruning loop: score, select exactly k, repeat over a density schedule.

    m = all ones
    for t in 1..T:
        S = score(model, m);  S[m == 0] = -inf       # a pruned weight never comes back
        d_t = d ** (t / T)                            # or linear: 1 - (1 - d) * t / T
        m = keep exactly round(d_t * N) largest S     # global, or per tensor ("local")

Exact ties at the cut are drawn at random (seeded by `seed`), so the kept count is exact
every round and no layer is systematically favoured; `select` without a generator breaks them
by flat index instead.

The model is never touched: everything runs on a private deep copy. Models in float16 or
bfloat16 are scored on a float32 copy, on any device: half-precision kernels are partly
missing on the CPU, and scores built from small differences (NTK-SAP's finite difference) or
long products (SynFlow) lose their meaning in 8-11 bit mantissas.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import ntksap
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> masks = ntksap.prune(net, "ntksap", density=0.1, input_shape=(1, 8, 8), rounds=2)
    >>> masks.num_kept == round(0.1 * (64 * 32 + 32 * 10))
    True
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ntksap import validate
from ntksap.attach import private_copy
from ntksap.heap import reuse_freed_memory
from ntksap.masks import Masks
from ntksap.masks import effective as effective_masks
from ntksap.models.base import MODEL_ATTRIBUTE
from ntksap.scoring import Method, ScoreContext, get_method, list_methods
from ntksap.scoring.base import as_logits, collective_device
from ntksap.targets import prunable_parameters

SCHEDULES = ("exponential", "linear")
SCOPES = ("global", "local")

#: Dtypes a model may have but is never scored in (see the module docstring).
LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Inputs in the one forward pass that checks the input shape before any scoring.
SHAPE_CHECK_BATCH = 2


class LayerCollapseWarning(UserWarning):
    """A prunable tensor was pruned to nothing (on a layer without a bypass, the network
    can no longer pass signal: its output no longer depends on the input)."""


# ---------------------------------------------------------------------------------------
# Densities and counts
# ---------------------------------------------------------------------------------------
def resolve_density(density: float | None = None, sparsity: float | None = None) -> float:
    """The density from exactly one of `density` / `sparsity`; checks 0 < density <= 1."""
    if (density is None) == (sparsity is None):
        raise ValueError(
            "give exactly one of density (fraction kept) or sparsity (fraction removed), "
            f"got density={density!r}, sparsity={sparsity!r}"
        )
    value, what = (density, "density") if density is not None else (sparsity, "sparsity")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    d = float(value) if density is not None else 1.0 - float(value)
    if not 0.0 < d <= 1.0:
        valid = "(0, 1]" if what == "density" else "[0, 1)"
        raise ValueError(f"{what} must be in {valid}, got {value!r}")
    return d


def schedule_densities(density: float, rounds: int, schedule: str = "exponential") -> list[float]:
    """Target density after each of `rounds` rounds; the last is exactly `density`.

    >>> schedule_densities(0.25, 2)
    [0.5, 0.25]
    """
    if schedule == "exponential":
        ds = [density ** (t / rounds) for t in range(1, rounds + 1)]
    elif schedule == "linear":
        ds = [1.0 - (1.0 - density) * t / rounds for t in range(1, rounds + 1)]
    else:
        raise ValueError(f"unknown schedule {schedule!r}; valid choices: {', '.join(SCHEDULES)}")
    ds[-1] = density  # no float drift in the final count
    return ds


def kept_count(density: float, n: int) -> int:
    """round(density * n): the number of weights a tensor (or the network) keeps."""
    return round(density * n)


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------
def _keep_top(flat: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask of the k largest entries of 1-D `flat`, exactly k of them.

    O(N): the k-th largest value by selection (`kthvalue`), everything above it, then
    entries equal to it until exactly k are kept: the lowest flat indices without
    `generator` (same result as a stable descending sort, tested), or a seeded random choice
    with one. Random tie-breaking matters when many scores tie exactly (e.g. zero scores of
    weights next to units that are dead for the whole scoring batch): by flat index those
    ties would always be cut from the last layers first, a systematic layer bias.
    """
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    threshold = flat.kthvalue(n - k + 1).values  # the k-th largest
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        ties = torch.nonzero(flat == threshold).flatten()  # ascending flat index
        if generator is not None and ties.numel() > missing:
            pick = torch.randperm(ties.numel(), generator=generator)[:missing]
            ties = ties[pick.to(ties.device)]
        keep[ties[:missing]] = True
    return keep


def _keep_top_among(
    scores: torch.Tensor, alive: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bool mask (flat) keeping the k best-scored entries among those with `alive` True.

    Only alive entries are candidates, so a pruned weight never comes back, even when a
    kept one scores -inf.
    """
    idx = torch.nonzero(alive).flatten()  # ascending flat index
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[idx[_keep_top(scores[idx], k, generator)]] = True
    return keep


def _top_per_row(
    scores: torch.Tensor, mask: torch.Tensor, j: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Bool mask of each row's (output unit's) j best-scored alive entries (fewer where the
    row has fewer alive). Ties are broken by a seeded column permutation (by column index
    without `generator`); one sort of the whole tensor, no loop over rows."""
    rows = scores.shape[0]
    s2, m2 = scores.reshape(rows, -1), mask.reshape(rows, -1)
    cols = s2.shape[1]
    perm = (
        torch.randperm(cols, generator=generator) if generator is not None else torch.arange(cols)
    ).to(s2.device)
    ranked = torch.where(m2, s2.double(), -math.inf)[:, perm]
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, : min(j, cols)]
    picked = perm[order]  # (rows, j) column indices, best first
    valid = m2.gather(1, picked)  # a row with fewer than j alive entries picks dead ones last
    keep = torch.zeros_like(m2)
    keep[torch.arange(rows, device=s2.device).unsqueeze(1).expand_as(picked)[valid],
         picked[valid]] = True  # fmt: skip
    return keep.view_as(mask)


def floor_reserve(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    k: int,
    floor: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The entries a selection floor keeps whatever the global ranking says (bool per tensor).

    With L tensors and k weights kept this round, the share is floor(floor x k / L). The last
    tensor (the output layer, in registration order) first gives each output unit (row) its
    best max(1, share // rows) weights, so no class is left to its bias alone, then tops up
    to its share; every other tensor keeps its best min(alive, share) weights (`floor` = 1:
    no layer below a balanced share k / L unless it is smaller), the share lowered when the
    output units took more than it, so at most k entries are reserved whenever k >= rows.
    Only alive entries (mask True) are reserved; ties at a cut are broken as `select` does.

    >>> s = {"a": torch.tensor([[9.0, 8, 7, 6]]), "b": torch.tensor([[1.0, 0], [0, 2]])}
    >>> m = {n: torch.ones_like(v, dtype=torch.bool) for n, v in s.items()}
    >>> r = floor_reserve(s, m, k=4, floor=1.0)
    >>> r["a"].int().tolist(), r["b"].int().tolist()
    ([[1, 1, 0, 0]], [[1, 0], [0, 1]])
    """
    names = list(scores)
    if not names or floor <= 0:
        return {n: torch.zeros_like(masks[n]) for n in names}
    share = math.floor(floor * k / len(names))
    out: dict[str, torch.Tensor] = {}

    def best(n: str, count: int, taken: torch.Tensor | None = None) -> torch.Tensor:
        alive = masks[n].flatten() if taken is None else masks[n].flatten() & ~taken
        count = min(count, int(alive.sum()))
        return _keep_top_among(scores[n].flatten(), alive, count, generator)

    # the output layer first: one weight per unit at least, then the rest of its share
    head = names[-1]
    keep = torch.zeros_like(masks[head].flatten())
    if scores[head].dim() >= 2:
        per_row = max(1, share // scores[head].shape[0])
        keep = _top_per_row(scores[head], masks[head], per_row, generator).flatten()
    keep |= best(head, share - int(keep.sum()), keep)
    out[head] = keep.view_as(masks[head])
    # the other layers: their share, lowered if the units' floor took more than the share
    others = names[:-1]
    if others:
        share = min(share, (k - int(keep.sum())) // len(others))
    for n in others:
        out[n] = best(n, max(share, 0)).view_as(masks[n])
    return {n: out[n] for n in names}


def starved_layers(masks: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors of `masks` (2-d or more) that keep fewer weights than they have output
    units (rows; output channels of a conv), so that some unit has no input weight, and the
    last tensor (the output layer) when one of its units keeps none (a class predicted from
    its bias alone): a starved mask, which robust NTK-SAP prunes again with its guards.

    >>> starved_layers({"a": torch.ones(4, 3, dtype=torch.bool),
    ...                 "b": torch.tensor([[True, False], [False, False]])})
    ['b']
    >>> starved_layers({"a": torch.eye(3, dtype=torch.bool)[:2], "b": torch.ones(2, 1).bool()})
    []
    """
    names = [n for n, m in masks.items() if m.dim() >= 2]
    out = [n for n in names if int(masks[n].sum()) < masks[n].shape[0]]
    if names and names[-1] not in out:
        head = masks[names[-1]]
        if not bool(head.reshape(head.shape[0], -1).any(1).all()):
            out.append(names[-1])
    return out


def select(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    density: float,
    scope: str = "global",
    generator: torch.Generator | None = None,
    floor: float = 0.0,
) -> dict[str, torch.Tensor]:
    """New masks keeping exactly round(density * N) of the highest scores.

    Only currently kept entries (mask True) compete, so pruned ones never come back;
    N counts all entries. `scope="global"` ranks across all tensors, `"local"` within each.
    Exact ties at the cut go to the lower flat index, or are drawn with `generator`.
    `floor` > 0 (global scope only): the entries `floor_reserve` names are kept first, then
    the rest of the k by the global ranking (if the reserved entries alone exceed k, k of
    them are kept, drawn as ties).
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid choices: {', '.join(SCOPES)}")
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else None
    for n, s in scores.items():
        m = masks[n]
        if s.shape != m.shape:
            raise RuntimeError(
                f"score for {n} has shape {tuple(s.shape)}, expected {tuple(m.shape)}"
            )
        if bool(torch.isnan(s[m]).any()):
            raise FloatingPointError(f"scores for {n} contain NaN")
    if scope == "local":
        if floor:
            raise ValueError("floor needs scope='global' (a local scope keeps every layer's share)")
        out = {}
        for n, s in scores.items():
            m = masks[n]
            k = min(kept_count(density, s.numel()), int(m.sum()))
            out[n] = _keep_top_among(s.flatten(), m.flatten(), k, generator).view_as(s)
        return out
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    alive = torch.cat([masks[n].flatten() for n in names])
    k = min(kept_count(density, total), int(alive.sum()))
    parts = [scores[n].flatten().to(dtype or torch.float32) for n in names]
    if floor:
        reserved = floor_reserve(scores, masks, k, floor, generator)
        # reserved entries rank first (+inf); a -inf score elsewhere stays last
        parts = [p.masked_fill(reserved[n].flatten(), math.inf) for p, n in zip(parts, names)]
    flat = torch.cat(parts)
    keep = _keep_top_among(flat, alive, k, generator)
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[offset : offset + size].view_as(scores[n])
        offset += size
    return out


# ---------------------------------------------------------------------------------------
# Ablations (standard sanity checks in the field)
# ---------------------------------------------------------------------------------------
def shuffle_masks(masks: Masks, seed: int = 0) -> Masks:
    """Layer-wise shuffle: each tensor keeps its count, at uniformly random positions.

    >>> m = Masks({"w": torch.tensor([True, True, False, False, False, False])})
    >>> int(shuffle_masks(m, seed=1)["w"].sum())
    2
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in masks.items():
        perm = torch.randperm(m.numel(), generator=gen).to(m.device)
        out[n] = m.flatten()[perm].view_as(m)
    return Masks(out, {**masks.metadata, "ablation": "shuffle", "shuffle_seed": seed})


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
class _Snapshot:
    """Everything a scorer may change on the private model copy, to restore after a round."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.momenta = {
            n: m.momentum
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)
        mods = dict(model.named_modules())
        for n, training in self.modes.items():
            mods[n].training = training
        for n, mom in self.momenta.items():
            mods[n].momentum = mom


def _input_shape(input_shape: Sequence[int] | None, data: list | None) -> tuple[int, ...] | None:
    if input_shape is not None:
        if (
            not isinstance(input_shape, Sequence)
            or isinstance(input_shape, str)
            or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape
            )
        ):
            raise ValueError(
                f"input_shape must be a sequence of positive ints without the batch "
                f"dimension, e.g. (3, 32, 32); got {input_shape!r}"
            )
        shape = tuple(input_shape)
        if data:
            seen = tuple(data[0][0].shape[1:])
            if seen != shape:
                raise ValueError(f"input_shape {shape} differs from the data's {seen}")
        return shape
    if data:
        return tuple(data[0][0].shape[1:])
    return None


def _materialise(data: Iterable | None, device: torch.device, dtype: torch.dtype) -> list | None:
    """The data as a list of (inputs, targets) on `device` (iterative methods re-read it).

    Floating inputs and targets are cast to the compute `dtype`; integer ones (class labels,
    token ids) are kept. Every batch is checked here, before any forward pass.
    """
    if data is None:
        return None
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of (inputs, targets) batches, not {type(data).__name__}"
        )
    batches = []
    for i, batch in enumerate(data):
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise TypeError(f"data batch {i} must be an (inputs, targets) pair, got {type(batch)}")
        x, y = batch[0], batch[1]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(
                f"data batch {i} must hold tensors, got ({type(x).__name__}, {type(y).__name__})"
            )
        if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"data batch {i}: inputs {tuple(x.shape)} and targets {tuple(y.shape)} must "
                "have the same, non-zero batch size (first dimension)"
            )
        if batches and x.shape[1:] != batches[0][0].shape[1:]:
            raise ValueError(
                f"data batch {i} has inputs of shape {tuple(x.shape[1:])}, batch 0 has "
                f"{tuple(batches[0][0].shape[1:])}: every input must have the same shape"
            )
        batches.append((_cast(x, device, dtype), _cast(y, device, dtype)))
    if not batches:
        raise ValueError("data is empty: give at least one (inputs, targets) batch")
    return batches


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _device(device: str | torch.device | None, default: torch.device) -> torch.device:
    if device is None:
        return default
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)  # an unavailable device (no CUDA build, no GPU) fails here
    except (RuntimeError, TypeError, AssertionError) as exc:
        raise ValueError(
            f"device must be an available device, e.g. 'cpu' or 'cuda:0'; got {device!r} ({exc})"
        ) from None
    return dev


def _dtype_name(dtypes: Iterable[torch.dtype]) -> str:
    """'float32', or e.g. 'bfloat16+float32' for a mix."""
    return "+".join(sorted({str(d).removeprefix("torch.") for d in dtypes}))


def _compute_dtype(
    model: nn.Module, targets: Mapping[str, nn.Parameter]
) -> tuple[torch.dtype, bool]:
    """The dtype the private copy computes in, and whether the copy must be converted to it.

    float32/float64 models compute in their own dtype, unconverted. A model with any
    float16/bfloat16 tensor is converted to float32 (float64 if it also holds float64
    tensors): CPU kernels for half precision are partly missing, and scores built from small
    differences or long products (NTK-SAP's finite difference, SynFlow) lose all meaning in
    8-11 bit mantissas.
    """
    found = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    if found & set(LOW_PRECISION):
        return (torch.float64 if torch.float64 in found else torch.float32), True
    first = next(iter(targets.values()))
    return (first.dtype if first.is_floating_point() else torch.float32), False


def _one_input_check(model: nn.Module) -> None:
    """TypeError unless `model.forward` can be called with one tensor (what prune feeds)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins and odd callables: let the forward tell
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty
        and (p.kind in positional or p.kind is inspect.Parameter.KEYWORD_ONLY)
    ]
    if len(required) > 1:
        raise TypeError(
            "prune feeds the model one tensor x of shape (batch, *input_shape), as model(x); "
            f"its forward requires {len(required)} inputs ({', '.join(required)}). Wrap the "
            "model in a module whose forward(x) takes one tensor (fixing or deriving the "
            "other inputs), and prune the wrapper"
        )


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first Conv or Linear in module order (lazy ones, not yet sized, excluded)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            return None
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            return name, m
    return None


def _expected_input(model: nn.Module, shape: tuple[int, ...]) -> tuple[str, bool] | None:
    """(what the first layer expects, whether `shape` fits it), or None when unknown."""
    found = _first_layer(model)
    if found is None:
        return None
    name, m = found
    if isinstance(m, nn.Linear):
        text = (
            f"its first layer {name!r} (Linear, in_features {m.in_features}) expects "
            f"{m.in_features} features per input (after flattening)"
        )
        return text, shape[-1] == m.in_features or math.prod(shape) == m.in_features
    assert isinstance(m, nn.modules.conv._ConvNd)
    spatial = {1: "L", 2: "H, W", 3: "D, H, W"}.get(len(m.kernel_size), "...")
    text = (
        f"its first layer {name!r} ({type(m).__name__}, in_channels {m.in_channels}) "
        f"expects ({m.in_channels}, {spatial}) inputs"
    )
    return text, len(shape) == len(m.kernel_size) + 1 and shape[0] == m.in_channels


def _check_shape_and_output(
    work: nn.Module,
    shape: tuple[int, ...],
    x_dtype: torch.dtype,
    device: torch.device,
    output_fn: Callable[[Any], Any] | None,
    source: str,
) -> int:
    """One no-grad eval-mode forward of zeros through the private copy; its output width.

    Turns a shape mismatch deep inside the model into a ValueError naming `shape` and what
    the first layer expects, and checks the output is (or `output_fn` makes it) one tensor
    (batch, ...). Eval mode leaves BatchNorm statistics alone; the modes are restored.
    """
    modes = {m: m.training for m in work.modules()}
    x = torch.zeros((SHAPE_CHECK_BATCH, *shape), dtype=x_dtype, device=device)
    work.eval()
    try:
        with torch.no_grad():
            out = work(x)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as exc:
        expected = _expected_input(work, shape)
        if expected is not None and not expected[1]:
            head = f"{source} {shape} does not fit the model: {expected[0]}"
        else:
            fits = f" ({expected[0]}, which {source} matches)" if expected else ""
            head = f"the model cannot run on {source} {shape}{fits}"
        raise ValueError(
            f"{head}. One forward of zeros of shape {tuple(x.shape)} failed with "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    except TypeError as exc:
        raise TypeError(
            f"prune feeds the model one tensor x of shape (batch, *input_shape), as model(x); "
            f"model(x) with x of shape {tuple(x.shape)} failed with TypeError: {exc}. If the "
            "forward takes more inputs, wrap the model in a module whose forward(x) takes one"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training
    logits = as_logits(out, output_fn)
    if logits.dim() < 1 or logits.shape[0] != SHAPE_CHECK_BATCH:
        raise ValueError(
            "the model's logits must be (batch, outputs) with the batch first; for "
            f"{SHAPE_CHECK_BATCH} inputs it returned shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"the model's logits must be floating point, got {logits.dtype}")
    return logits[0].numel()


def _jsonable(obj: Any) -> Any:
    """`obj` with tuples as lists and anything JSON cannot hold (or non-finite) as str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def _model_facts(model: nn.Module) -> tuple[str, dict[str, Any] | None]:
    """(name, constructor arguments): the zoo name and arguments recorded by
    `ntksap.models.create`, or the class name and None for any other model."""
    info = getattr(model, MODEL_ATTRIBUTE, None)
    if isinstance(info, Mapping) and isinstance(info.get("name"), str):
        return info["name"], _jsonable({k: v for k, v in info.items() if k != "name"})
    return type(model).__name__, None


def _missing_data_message(meth: Method, opts: dict[str, Any]) -> str:
    """Why `meth` with the resolved `opts` needs data, and the fix.

    A method that reads data only because of some options (NTK-SAP's inputs="data") names
    those options and their data-free defaults, since dropping them is the other fix.
    """
    if not meth.needs_data:
        culprits = [
            o for o in meth.options if not meth.needs_data_for({**opts, o: meth.options[o].default})
        ]
        if culprits:
            given = ", ".join(f"{o}={opts[o]!r}" for o in culprits)
            back = ", ".join(f"{o}={meth.options[o].default!r}" for o in culprits)
            return (
                f"method {meth.name!r} with {given} reads real inputs: pass "
                "data=[(inputs, targets), ...] (e.g. ntksap.data.prune_batches(ds)), or use "
                f"{back} (the default) to run without data"
            )
    free = [n for n in list_methods() if not get_method(n).needs_data_for()]
    return (
        f"method {meth.name!r} needs data=[(inputs, targets), ...]; "
        f"the data-free methods are: {', '.join(free)}"
    )


@dataclass
class _Setup:
    """Validated inputs of one pruning job, and the private model copy it works on."""

    method: Method
    options: dict[str, Any]
    work: nn.Module
    params: dict[str, nn.Parameter]
    device: torch.device
    data: list | None
    input_shape: tuple[int, ...] | None
    compute_dtype: torch.dtype
    output_fn: Callable[[Any], Any] | None
    output_width: int | None
    snapshot: _Snapshot
    metadata: dict[str, Any]  # facts about the model and the prunable set, for the masks
    group: tuple[int, int] = (0, 1)  # (rank, world size) of distributed scoring


def _setup(
    model: nn.Module,
    method: str,
    *,
    data: Iterable | None,
    input_shape: Sequence[int] | None,
    device: str | torch.device | None,
    include_bias: bool,
    exclude: Sequence[str],
    include: Sequence[str],
    options: dict[str, Any],
    output_fn: Callable[[Any], Any] | None,
    check: Callable[[dict[str, nn.Parameter]], None] | None = None,
    distributed: bool = False,
) -> _Setup:
    """Validate everything, deep-copy the model, then check the input shape with one forward
    of the copy (the only forward before scoring, and only after every other check)."""
    meth = get_method(method)
    opts = meth.resolve_options(options)
    group = _process_group(distributed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    validate.boolean("include_bias", include_bias)
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be a function of the model's output, got {output_fn!r}")
    if data is None and meth.needs_data_for(opts):
        raise ValueError(_missing_data_message(meth, opts))
    targets = prunable_parameters(
        model, include_bias=include_bias, exclude=exclude, include=include
    )
    for name, p in targets.items():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{name} is an uninitialised lazy parameter: run one forward pass of the model "
                "on a real input first, so lazy layers know their sizes"
            )
        mod_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(mod_name) if mod_name else model
        if parametrize.is_parametrized(owner, attr):
            raise ValueError(
                f"{name} is already parametrized (masks attached?); prune the unmasked model, "
                "or call ntksap.remove_masks(model) first"
            )
    if check is not None:
        check(targets)
    first = next(iter(targets.values()))
    dev = _device(device, first.device)
    compute, convert = _compute_dtype(model, targets)
    batches = _materialise(data, dev, compute)
    shape = _input_shape(input_shape, batches)
    if meth.needs_input_shape and shape is None:
        raise ValueError(
            f"method {meth.name!r} needs input_shape=(C, H, W) (one input, no batch "
            "dimension), or data to read it from"
        )
    if shape is not None:
        _one_input_check(model)
    name, model_args = _model_facts(model)
    metadata = {
        "model": name,
        "model_args": model_args,
        "targets": {
            "include_bias": include_bias,
            "exclude": list(exclude),
            "include": list(include),
        },
        "num_total": sum(p.numel() for p in targets.values()),
        "dtype": _dtype_name(p.dtype for p in targets.values()),
        "compute_dtype": _dtype_name([compute]),
        "output_fn": output_fn is not None,
    }

    # Work on a private copy: the user's model is never touched (nor converted).
    work = private_copy(model)
    work = work.to(dev, compute) if convert else work.to(dev)
    work_params = dict(work.named_parameters())
    for p in work.parameters():
        p.requires_grad_(False)  # scorers differentiate w.r.t. masks or weight copies only
    if group[1] > 1:
        _broadcast_state(work, dev)  # every rank scores rank 0's model
        metadata["processes"] = group[1]
    snapshot = _Snapshot(work)  # taken before the shape check, restored after every round
    width = None
    if shape is not None:
        source = "input_shape" if input_shape is not None else "the data's input shape"
        x_dtype = batches[0][0].dtype if batches else compute
        width = _check_shape_and_output(work, shape, x_dtype, dev, output_fn, source)
    return _Setup(
        method=meth,
        options=opts,
        work=work,
        params={n: work_params[n] for n in targets},
        device=dev,
        data=batches,
        input_shape=shape,
        compute_dtype=compute,
        output_fn=output_fn,
        output_width=width,
        snapshot=snapshot,
        metadata=metadata,
        group=group,
    )


def _process_group(distributed: bool) -> tuple[int, int]:
    """(rank, world size) for `distributed` scoring; (0, 1) without it.

    Raises:
        ValueError: distributed=True outside an initialised torch.distributed job.
    """
    validate.boolean("distributed", distributed)
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True splits the scoring across the processes of a torch.distributed "
            "job: launch with torchrun and call torch.distributed.init_process_group first "
            "(every rank must call prune with the same arguments), or use distributed=False"
        )
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def _broadcast_state(model: nn.Module, device: torch.device) -> None:
    """Rank 0's parameters and floating buffers on every rank (in place)."""
    import torch.distributed as dist

    where = collective_device(device)
    for t in [*model.parameters(), *model.buffers()]:
        buf = t.detach().to(where)
        dist.broadcast(buf, src=0)
        t.copy_(buf)


def _broadcast_masks(masks: dict[str, torch.Tensor], device: torch.device) -> None:
    """Rank 0's masks on every rank (in place): the selection is made once for all.

    The summed scores agree across ranks to the last bit in practice; broadcasting makes
    every rank continue from exactly the same mask even at a float tie of the threshold.
    """
    import torch.distributed as dist

    where = collective_device(device)
    for n, m in masks.items():
        buf = m.to(where, torch.uint8)
        dist.broadcast(buf, src=0)
        masks[n] = buf.to(m.device).bool()


def _context(st: _Setup, masks: dict[str, torch.Tensor], t: int, rounds: int) -> ScoreContext:
    rank, world = st.group
    return ScoreContext(
        model=st.work,
        params=st.params,
        masks=masks,
        data=st.data,
        input_shape=st.input_shape,
        device=st.device,
        round=t,
        rounds=rounds,
        options=st.options,
        dtype=st.compute_dtype,
        output_fn=st.output_fn,
        output_width=st.output_width,
        rank=rank,
        world_size=world,
    )


def _seeded(st: _Setup, seed: int) -> contextlib.AbstractContextManager:
    """Fork torch's RNG (restored on exit) and seed it: same seed, same draws."""
    cuda = [st.device.index or 0] if st.device.type == "cuda" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=cuda))
    torch.manual_seed(seed)
    return stack


def _check_masks(
    masks: Mapping[str, torch.Tensor] | None,
) -> Callable[[dict[str, nn.Parameter]], None]:
    """A `_setup` check: `masks` (if given) name exactly the prunable tensors, same shapes."""

    def check(targets: dict[str, nn.Parameter]) -> None:
        if masks is None:
            return
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must map parameter names to bool tensors, got {masks!r}")
        given = masks if isinstance(masks, Masks) else Masks(masks)
        if set(given) != set(targets):
            raise ValueError(
                f"masks must cover exactly the prunable parameters {sorted(targets)}, "
                f"got {sorted(given)}"
            )
        bad = [
            f"{n}: mask {tuple(given[n].shape)} vs parameter {tuple(p.shape)}"
            for n, p in targets.items()
            if given[n].shape != p.shape
        ]
        if bad:
            raise ValueError("mask shapes do not match the model: " + "; ".join(bad))

    return check


def compute_scores(
    model: nn.Module,
    method: str = "ntksap",
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    data: Iterable | None = None,
    seed: int = 0,
    include_bias: bool = False,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    device: str | torch.device | None = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    distributed: bool = False,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """One round of `method`'s raw scores (higher = keep) at `masks` (default: dense).

    Scores are separate from masks: use this to inspect, combine or plot them. The model is
    left untouched. Arguments as `prune`; entries where `masks` is False are not meaningful
    (`prune` sets them to -inf). Scores are on the CPU, in the compute dtype (float32 for
    float16/bfloat16 models; random scores are always float32).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> {n: tuple(s.shape) for n, s in compute_scores(net, "magnitude").items()}
        {'0.weight': (3, 4), '2.weight': (2, 3)}
    """
    seed = validate.seed(seed)
    st = _setup(
        model,
        method,
        data=data,
        input_shape=input_shape,
        device=device,
        include_bias=include_bias,
        exclude=exclude,
        include=include,
        options=options,
        output_fn=output_fn,
        check=_check_masks(masks),
        distributed=distributed,
    )
    if masks is None:
        cur = {n: torch.ones_like(p, dtype=torch.bool) for n, p in st.params.items()}
    else:
        given = masks if isinstance(masks, Masks) else Masks(masks)
        cur = {n: given[n].to(st.device) for n in st.params}
    with _seeded(st, seed), reuse_freed_memory(st.device.type == "cpu"):
        scores = st.method.fn(_context(st, cur, 1, 1))
    return {n: s.detach().cpu() for n, s in scores.items()}


def prune(
    model: nn.Module,
    method: str = "ntksap",
    *,
    density: float | None = None,
    sparsity: float | None = None,
    input_shape: Sequence[int] | None = None,
    data: Iterable | None = None,
    rounds: int | None = None,
    schedule: str = "exponential",
    scope: str = "global",
    seed: int = 0,
    include_bias: bool = False,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    invert: bool = False,
    shuffle: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    distributed: bool = False,
    effective: bool = False,
    effective_tolerance: float = 0.01,
    floor: float | None = None,
    _guard: bool = True,  # private: False runs one pass of a guarded method (its own use)
    **options: Any,
) -> Masks:
    """Compute pruning masks for `model` at initialisation. The model is left untouched.

    Every argument is checked before any work. Then, when the input shape is known, one
    no-grad eval-mode forward of two zero inputs through a private copy checks that the
    shape fits the model and that the output is one logits tensor; only then does scoring
    start. The user's model never runs a forward pass.

    Args:
        model: any `nn.Module` taking one tensor (batch, *input_shape). Its prunable
            parameters are Conv/Linear weights by default. float32 and float64 models are
            scored in their dtype; float16 and bfloat16 models on a float32 copy (recorded
            as metadata "compute_dtype"); the model itself keeps its dtype.
        method: one of `ntksap.list_methods()`.
        density / sparsity: exactly one; density = fraction of prunable weights kept.
        input_shape: one input's shape without batch dim, e.g. (3, 32, 32). Needed by the
            data-free methods that feed inputs (ntksap, synflow) unless `data` is given.
        data: iterable of (inputs, targets) batches; needed by snip, itersnip, grasp, px, and
            by ntksap with inputs="data" (which reads only the inputs). (Data-free methods
            only read the input shape from it.) Floating batches are cast to the compute
            dtype.
        rounds: pruning rounds T (default: the method's paper value, e.g. ntksap 20; 100 for
            ntksap with robust=True: `Method.rounds_for`).
        schedule: "exponential" (d_t = d^(t/T)) or "linear".
        scope: "global" (one ranking over all tensors) or "local" (per tensor).
        seed: seeds every random draw, including the draw among exactly tied scores at the
            cut; torch's global RNG state is restored afterwards.
        include_bias / exclude / include: which parameters are prunable (see `targets`).
        invert: keep the *lowest* scores (score-inversion ablation).
        shuffle: shuffle the final mask within each tensor (layer-wise shuffle ablation).
        device: where to score (default: the model's device).
        progress: show a progress bar over rounds.
        output_fn: for a model whose forward returns a tuple, dict or output object: maps
            that output to the logits tensor (batch, outputs), e.g.
            `output_fn=lambda out: out.logits`. Every method scores through it.
        distributed: split the scoring across the processes of an initialised
            torch.distributed job (torchrun): every rank calls `prune` with the same
            arguments and gets the same masks. NTK-SAP splits its (resample, noise batch)
            draws, each seeded by its index, so the result does not depend on the number of
            processes (up to float64 rounding of the summed gradients); snip, itersnip and
            grasp split their data batches (batch b on rank b mod world) and sum the
            gradients; the other methods are cheap and computed on every rank. Rank 0's
            model is used (broadcast) and its mask selection is broadcast every round.
        effective: `density` / `sparsity` is the *effective* one: the fraction of weights
            on at least one input-to-output path (`ntksap.masks.effective`), which is <=
            the nominal (kept) fraction. The nominal density is searched: each probe is a
            full prune at a nominal density (same seed and settings), until the effective
            density is within `effective_tolerance` of the target (at most
            EFFECTIVE_MAX_PROBES probes; otherwise the closest probe is returned, with a
            warning). The masks returned are the nominal ones of that probe (their dead
            weights included: `ntksap.masks.effective` removes them); metadata "density" is
            the nominal density found, "effective_target", "effective_density",
            "effective_probes" ([nominal, effective] pairs), "effective_converged".
        effective_tolerance: relative tolerance of `effective` (default 1 %): the probe is
            accepted when |effective - target| <= max(tolerance x target, 1 weight).
        floor: selection floor in [0, 1] (global scope): every round, each of the L prunable
            tensors keeps at least its best min(alive, floor(floor x k_t / L)) weights (k_t:
            the round's kept count), and the output layer (the last tensor) spreads that
            share over its output units, each keeping at least one weight; the rest of k_t
            goes by the global ranking. 0 = no floor; 1 = no layer below a balanced share.
            Default: the method's (`Method.floor_for`): 0, except NTK-SAP with robust=True
            (1.0). Recorded as metadata "floor".
        **options: method options, e.g. ntksap `epsilon`, `resamples`, `num_samples`,
            `batch_size`, `init`, `inputs`; grasp `temperature`; synflow `precision` (see
            `ntksap.get_method(name).options` for types, defaults and help).

    Returns:
        `Masks` keyed by parameter name, on the CPU. `.metadata` (JSON) holds the request
        (method, density, rounds, schedule, scope, seed, options with "auto" resolved,
        invert, input_shape, targets), the model ("model": zoo name or class name,
        "model_args", "num_total" prunable weights, "dtype", "compute_dtype", "output_fn":
        whether one was given), and "seconds" and "torch". A method with a guarded variant
        (ntksap `robust=True`) prunes as published first and again with its guards only
        when that mask starves a layer (`starved_layers`); "guard" then says which layers
        were starved and whether the guarded pass made the mask.

    Example:
        >>> masks = prune(net, "ntksap", sparsity=0.982, input_shape=(3, 32, 32))  # doctest: +SKIP
    """
    d = resolve_density(density, sparsity)
    if validate.boolean("effective", effective):
        validate.finite_float(
            "effective_tolerance", effective_tolerance, low=0.0, high=1.0, low_open=True
        )
        return _prune_to_effective(
            model, method, d, effective_tolerance, input_shape=input_shape, data=data,
            rounds=rounds, schedule=schedule, scope=scope, seed=seed,
            include_bias=include_bias, exclude=exclude, include=include, invert=invert,
            shuffle=shuffle, device=device, progress=progress, output_fn=output_fn,
            distributed=distributed, **options,
        )  # fmt: skip
    meth = get_method(method)
    resolved = meth.resolve_options(options)  # checked before any work, as every argument
    first_pass = meth.unguarded_for(resolved) if _guard else None
    if first_pass is not None:  # e.g. ntksap robust=True: as published, guarded if starved
        if data is not None:
            data = list(data)  # both passes read the batches
        call = dict(
            model=model, method=method, density=d, input_shape=input_shape, data=data,
            rounds=rounds, schedule=schedule, scope=scope, seed=seed,
            include_bias=include_bias, exclude=exclude, include=include, invert=invert,
            shuffle=shuffle, device=device, progress=progress, output_fn=output_fn,
            distributed=distributed, floor=floor, _guard=False,
        )  # fmt: skip
        with warnings.catch_warnings():  # a starved first pass is redone, not reported
            warnings.simplefilter("ignore", LayerCollapseWarning)
            first = prune(**call, **first_pass)
        starved = starved_layers(first)
        if not starved:
            # the first pass ran with the guard switched off: record the options as asked
            asked = {k: v for k, v in resolved.items() if first_pass.get(k) != v}
            options_used = {**first.metadata["options"], **asked}
            guard = {"starved": [], "guarded": False}
            return Masks(dict(first), {**first.metadata, "options": options_used, "guard": guard})
        second = prune(**call, **options)
        guard = {
            "starved": starved,
            "guarded": True,
            "first_pass_seconds": first.metadata["seconds"],
        }
        return Masks(dict(second), {**second.metadata, "guard": guard})
    if rounds is None:
        rounds = meth.rounds_for(options)  # e.g. ntksap robust=True: 100
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid choices: {', '.join(SCHEDULES)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid choices: {', '.join(SCOPES)}")
    seed = validate.seed(seed)
    for flag, value in (("invert", invert), ("shuffle", shuffle), ("progress", progress)):
        validate.boolean(flag, value)
    if floor is not None:
        floor = validate.finite_float("floor", floor, low=0.0, high=1.0)
        if floor and scope != "global":
            raise ValueError(
                f"floor={floor:g} needs scope='global' (scope='local' already keeps every "
                "tensor's share)"
            )

    def check_count(targets: dict[str, nn.Parameter]) -> None:
        n_total = sum(p.numel() for p in targets.values())
        if scope == "global" and kept_count(d, n_total) == 0:
            raise ValueError(f"density {d:g} keeps 0 of the {n_total:,} prunable weights")

    st = _setup(
        model,
        method,
        data=data,
        input_shape=input_shape,
        device=device,
        include_bias=include_bias,
        exclude=exclude,
        include=include,
        options=options,
        output_fn=output_fn,
        check=check_count,
        distributed=distributed,
    )

    if floor is None:
        floor = st.method.floor_for(st.options) if scope == "global" else 0.0
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in st.params.items()}
    densities = schedule_densities(d, rounds, schedule)
    started = time.perf_counter()
    rounds_iter: Iterable[int] = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds_iter = tqdm(rounds_iter, desc=f"prune {st.method.name}", unit="round", leave=False)
    # Exact ties at the cut are drawn at random (seeded): no bias towards any layer.
    ties = torch.Generator().manual_seed(seed)
    # every round allocates the same activations again: keep freed CPU memory for reuse
    with _seeded(st, seed), reuse_freed_memory(st.device.type == "cpu"):
        for t in rounds_iter:
            scores = st.method.fn(_context(st, masks, t + 1, rounds))
            st.snapshot.restore(st.work)
            if set(scores) != set(st.params):
                raise RuntimeError(f"method {st.method.name} returned scores for the wrong tensors")
            if invert:
                scores = {n: -s for n, s in scores.items()}
            masks = select(scores, masks, densities[t], scope, ties, floor)
            if st.group[1] > 1:
                _broadcast_masks(masks, st.device)
    result = Masks(
        {n: m.cpu() for n, m in masks.items()},
        {
            "method": st.method.name,
            "density": d,
            "sparsity": 1.0 - d,
            "rounds": rounds,
            "schedule": schedule,
            "scope": scope,
            "floor": floor,
            "seed": seed,
            "options": st.options,
            "invert": invert,
            "input_shape": list(st.input_shape) if st.input_shape else None,
            **st.metadata,
            "seconds": round(time.perf_counter() - started, 3),
            "torch": torch.__version__,
        },
    )
    if shuffle:
        result = shuffle_masks(result, seed)
    collapsed = result.collapsed()
    if collapsed:
        warnings.warn(
            f"{st.method.name} at density {d:.4g} pruned {len(collapsed)} tensor(s) to zero "
            f"(layer collapse): {', '.join(collapsed)}",
            LayerCollapseWarning,
            stacklevel=2,
        )
    return result


#: Most full prunes `prune(..., effective=True)` runs to find the nominal density.
EFFECTIVE_MAX_PROBES = 12


def _prune_to_effective(
    model: nn.Module,
    method: str,
    target: float,
    tolerance: float,
    *,
    data: Iterable | None,
    output_fn: Callable[[Any], torch.Tensor] | None,
    **kwargs: Any,
) -> Masks:
    """`prune` to an effective density `target` (see `prune`'s `effective`).

    e(d), the effective density of the masks pruned at nominal density d, is <= d and grows
    with d (not strictly: each d is another prune). The search starts at d = target, then
    steps d by the log-log secant through the bracketing probes (e ~ c d^k locally), falling
    back to the geometric midpoint of the bracket when the secant leaves it; the dense
    network (d = 1) closes the bracket from above.
    """
    if data is not None:
        data = list(data)  # every probe reads the batches again
    probes: list[list[float]] = []
    best: tuple[float, Masks] | None = None  # (|e - target|, masks)
    started = time.perf_counter()

    def probe(d: float) -> float:
        nonlocal best
        with warnings.catch_warnings():  # a collapse is reported once, for the result
            warnings.simplefilter("ignore", LayerCollapseWarning)
            masks = prune(model, method, density=d, data=data, output_fn=output_fn, **kwargs)
        shape = masks.metadata.get("input_shape")
        e = effective_masks(model, masks, input_shape=shape, output_fn=output_fn).density
        probes.append([d, e])
        if best is None or abs(e - target) < best[0]:
            best = (abs(e - target), masks)
        return e

    e = probe(target)
    assert best is not None
    n_total = best[1].num_total
    tol = max(tolerance * target, 1.0 / n_total)
    lo: tuple[float, float] = (target, e)
    hi: tuple[float, float] | None = None
    if abs(e - target) > tol:
        ones = Masks({k: torch.ones_like(m) for k, m in best[1].items()})
        shape = best[1].metadata.get("input_shape")
        e_dense = effective_masks(model, ones, input_shape=shape, output_fn=output_fn).density
        if e_dense < target - tol:
            raise ValueError(
                f"effective density {target:.6g} is out of reach: even the dense network has "
                f"effective density {e_dense:.6g} (weights that only ever multiply zero "
                "padding, or that reach no output, are on no input-to-output path)"
            )
        hi = (1.0, e_dense)
    sides: list[str] = []  # which end of the bracket each probe replaced
    while abs(e - target) > tol and hi is not None and len(probes) < EFFECTIVE_MAX_PROBES:
        (d_lo, e_lo), (d_hi, e_hi) = lo, hi
        if kept_count(d_hi, n_total) - kept_count(d_lo, n_total) <= 1:
            break  # the bracket holds no other kept count
        mid = math.sqrt(d_lo * d_hi)
        if len(probes) == 1 and e_lo > 0:
            d = d_lo * target / e_lo  # first step: dead fraction unchanged nearby
        elif e_lo > 0 and e_hi > e_lo:
            # log-log secant: the d where the line through the two ends meets the target
            k = (math.log(d_hi) - math.log(d_lo)) / (math.log(e_hi) - math.log(e_lo))
            d = math.exp(math.log(d_lo) + k * (math.log(target) - math.log(e_lo)))
        else:
            d = mid
        # bisect when the step leaves the bracket, or when one end has stayed put for two
        # probes (a secant creeping towards the root from one side)
        if not d_lo < d < d_hi or sides[-2:] in (["lo", "lo"], ["hi", "hi"]):
            d = mid
        e = probe(d)
        if e < target:
            lo = (d, e)
            sides.append("lo")
        else:
            hi = (d, e)
            sides.append("hi")
    _, result = best
    d_found, e_found = min(probes, key=lambda p: abs(p[1] - target))
    converged = abs(e_found - target) <= tol
    if not converged:
        warnings.warn(
            f"prune(effective=True): effective density {e_found:.6g} (nominal {d_found:.6g}) "
            f"after {len(probes)} probes is the closest to the target {target:.6g} "
            f"(tolerance {tol:.3g}); e(d) is not monotone here or needs more probes",
            stacklevel=3,
        )
    result = Masks(dict(result), result.metadata)
    result.metadata.update(
        density=d_found,
        sparsity=1.0 - d_found,
        effective_target=target,
        effective_density=e_found,
        effective_tolerance=tol,
        effective_probes=probes,
        effective_converged=converged,
        seconds=round(time.perf_counter() - started, 3),
    )
    collapsed = result.collapsed()
    if collapsed:
        warnings.warn(
            f"{method} at nominal density {d_found:.4g} pruned {len(collapsed)} tensor(s) to "
            f"zero (layer collapse): {', '.join(collapsed)}",
            LayerCollapseWarning,
            stacklevel=3,
        )
    return result
