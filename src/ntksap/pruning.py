"""The pruning loop: score, select exactly k, repeat over a density schedule.

    m = all ones
    for t in 1..T:
        S = score(model, m);  S[m == 0] = -inf       # a pruned weight never comes back
        d_t = d ** (t / T)                            # or linear: 1 - (1 - d) * t / T
        m = keep exactly round(d_t * N) largest S     # global, or per tensor ("local")

Ties are broken by flat index (a stable sort), so the kept count is exact every round.

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
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ntksap.attach import private_copy
from ntksap.masks import Masks
from ntksap.scoring import Method, ScoreContext, get_method, list_methods
from ntksap.targets import prunable_parameters

SCHEDULES = ("exponential", "linear")


class LayerCollapseWarning(UserWarning):
    """A prunable tensor was pruned to nothing (on a layer without a bypass, the network
    can no longer pass signal: its output no longer depends on the input)."""


SCOPES = ("global", "local")


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


def select(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    density: float,
    scope: str = "global",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """New masks keeping exactly round(density * N) of the highest scores.

    Only currently kept entries (mask True) compete, so pruned ones never come back;
    N counts all entries. `scope="global"` ranks across all tensors, `"local"` within each.
    Exact ties at the cut go to the lower flat index, or are drawn with `generator`.
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
        out = {}
        for n, s in scores.items():
            m = masks[n]
            k = min(kept_count(density, s.numel()), int(m.sum()))
            out[n] = _keep_top_among(s.flatten(), m.flatten(), k, generator).view_as(s)
        return out
    names = list(scores)
    flat = torch.cat([scores[n].flatten().to(dtype or torch.float32) for n in names])
    alive = torch.cat([masks[n].flatten() for n in names])
    k = min(kept_count(density, flat.numel()), int(alive.sum()))
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
        if isinstance(input_shape, int | str) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape
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


def _materialise(data: Iterable | None, device: torch.device) -> list | None:
    """The data as a list of (inputs, targets) on `device` (iterative methods re-read it)."""
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be an iterable of (inputs, targets) batches, not a tensor")
    batches = []
    for i, batch in enumerate(data):
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise TypeError(f"data batch {i} must be an (inputs, targets) pair, got {type(batch)}")
        x, y = batch[0], batch[1]
        batches.append((x.to(device), y.to(device)))
    if not batches:
        raise ValueError("data is empty: give at least one (inputs, targets) batch")
    return batches


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
    check: Callable[[dict[str, nn.Parameter]], None] | None = None,
) -> _Setup:
    """Validate everything (before any work), then deep-copy the model to score on."""
    meth = get_method(method)
    unknown = sorted(set(options) - set(meth.options))
    if unknown:
        valid = ", ".join(meth.options) or "none"
        raise TypeError(f"unknown option(s) {unknown} for method {meth.name!r}; valid: {valid}")
    opts = {**meth.options, **options}
    if meth.validate is not None:
        meth.validate(opts)
    if meth.needs_data and data is None:
        free = [n for n in list_methods() if not get_method(n).needs_data]
        raise ValueError(
            f"method {meth.name!r} needs data=[(inputs, targets), ...]; "
            f"the data-free methods are: {', '.join(free)}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = prunable_parameters(
        model, include_bias=include_bias, exclude=exclude, include=include
    )
    for name in targets:
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
    dev = torch.device(device) if device is not None else first.device
    batches = _materialise(data, dev)
    shape = _input_shape(input_shape, batches)
    if meth.needs_input_shape and shape is None:
        raise ValueError(
            f"method {meth.name!r} needs input_shape=(C, H, W) (one input, no batch "
            "dimension), or data to read it from"
        )
    # Work on a private copy: the user's model is never touched.
    work = private_copy(model)
    work = work.to(dev)
    work_params = dict(work.named_parameters())
    for p in work.parameters():
        p.requires_grad_(False)  # scorers differentiate w.r.t. masks or weight copies only
    return _Setup(meth, opts, work, {n: work_params[n] for n in targets}, dev, batches, shape)


def _context(st: _Setup, masks: dict[str, torch.Tensor], t: int, rounds: int) -> ScoreContext:
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
    )


def _seeded(st: _Setup, seed: int) -> contextlib.AbstractContextManager:
    """Fork torch's RNG (restored on exit) and seed it: same seed, same draws."""
    cuda = [st.device.index or 0] if st.device.type == "cuda" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=cuda))
    torch.manual_seed(seed)
    return stack


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
    **options: Any,
) -> dict[str, torch.Tensor]:
    """One round of `method`'s raw scores (higher = keep) at `masks` (default: dense).

    Scores are separate from masks: use this to inspect, combine or plot them. The model is
    left untouched. Arguments as `prune`; entries where `masks` is False are not meaningful
    (`prune` sets them to -inf).

    Example:
        >>> s = compute_scores(net, "magnitude")  # doctest: +SKIP
    """
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
    )
    if masks is None:
        cur = {n: torch.ones_like(p, dtype=torch.bool) for n, p in st.params.items()}
    else:
        given = masks if isinstance(masks, Masks) else Masks(masks)
        if set(given) != set(st.params):
            raise ValueError(
                f"masks must cover exactly the prunable parameters {sorted(st.params)}, "
                f"got {sorted(given)}"
            )
        cur = {n: given[n].to(st.device) for n in st.params}
    with _seeded(st, seed):
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
    **options: Any,
) -> Masks:
    """Compute pruning masks for `model` at initialisation. The model is left untouched.

    Args:
        model: any `nn.Module`. Its prunable parameters are Conv/Linear weights by default.
        method: one of `ntksap.list_methods()`.
        density / sparsity: exactly one; density = fraction of prunable weights kept.
        input_shape: one input's shape without batch dim, e.g. (3, 32, 32). Needed by the
            data-free methods that feed inputs (ntksap, synflow) unless `data` is given.
        data: iterable of (inputs, targets) batches; needed by snip, itersnip, grasp.
            (Data-free methods only read the input shape from it.)
        rounds: pruning rounds T (default: the method's paper value, e.g. ntksap 20).
        schedule: "exponential" (d_t = d^(t/T)) or "linear".
        scope: "global" (one ranking over all tensors) or "local" (per tensor).
        seed: seeds every random draw; torch's global RNG state is restored afterwards.
        include_bias / exclude / include: which parameters are prunable (see `targets`).
        invert: keep the *lowest* scores (score-inversion ablation).
        shuffle: shuffle the final mask within each tensor (layer-wise shuffle ablation).
        device: where to score (default: the model's device).
        progress: show a progress bar over rounds.
        **options: method options, e.g. ntksap `epsilon`, `resamples`, `num_samples`,
            `batch_size`, `init`; grasp `temperature`; synflow `precision`.

    Returns:
        `Masks` keyed by parameter name, on the CPU, with the settings in `.metadata`.

    Example:
        >>> masks = prune(net, "ntksap", sparsity=0.982, input_shape=(3, 32, 32))  # doctest: +SKIP
    """
    d = resolve_density(density, sparsity)
    if rounds is None:
        rounds = get_method(method).default_rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid choices: {', '.join(SCHEDULES)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid choices: {', '.join(SCOPES)}")

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
        check=check_count,
    )
    snapshot = _Snapshot(st.work)

    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in st.params.items()}
    densities = schedule_densities(d, rounds, schedule)
    started = time.perf_counter()
    rounds_iter: Iterable[int] = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds_iter = tqdm(rounds_iter, desc=f"prune {st.method.name}", unit="round", leave=False)
    # Exact ties at the cut are drawn at random (seeded): no bias towards any layer.
    ties = torch.Generator().manual_seed(seed)
    with _seeded(st, seed):
        for t in rounds_iter:
            scores = st.method.fn(_context(st, masks, t + 1, rounds))
            snapshot.restore(st.work)
            if set(scores) != set(st.params):
                raise RuntimeError(f"method {st.method.name} returned scores for the wrong tensors")
            if invert:
                scores = {n: -s for n, s in scores.items()}
            masks = select(scores, masks, densities[t], scope, ties)
    result = Masks(
        {n: m.cpu() for n, m in masks.items()},
        {
            "method": st.method.name,
            "density": d,
            "sparsity": 1.0 - d,
            "rounds": rounds,
            "schedule": schedule,
            "scope": scope,
            "seed": seed,
            "options": st.options,
            "invert": invert,
            "input_shape": list(st.input_shape) if st.input_shape else None,
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
