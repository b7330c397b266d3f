"""The exact fixed-weight empirical NTK of a (pruned) network's logits.

Definition
----------
For inputs x_1..x_N and a model f with K logits per input, let w be the *prunable* weights
(the same selection as `ntksap.prunable_parameters`: Conv/Linear weights by default; biases
and norm-layer affine parameters are held fixed and do not contribute) evaluated at the
effective values w = theta * m, and J = df/dw the (N*K, P) Jacobian. The kernel counts only
kept weights:

    Theta = J diag(m) J^T            (the Jacobian with the pruned columns deleted, J_m J_m^T)

Modes (all symmetric, positive semi-definite):

- `"full"`: the (N*K, N*K) matrix, rows and columns sample-major: index n*K + k.
- `"diagonal"`: the per-logit kernels Theta_k(x_i, x_j) = <df_k(x_i)/dw, df_k(x_j)/dw>, shape
  (K, N, N); entry [k] is the k-th diagonal (k, k) block of "full" read with stride K.
- `"trace"`: a 0-dim tensor, sum_i sum_k ||df_k(x_i)/dw||^2 = ||J_m||_F^2 = trace("full").
  This is the SUM over logits and samples; conventions that average over the logits (or
  over the samples) divide it by K (or N). NTK-SAP's finite-difference estimate
  E||f(w) - f(w + delta*m)||^2 / eps^2 estimates exactly this sum.

Masks
-----
`masks` maps prunable parameter names (the plain names, e.g. `"layer1.0.conv1.weight"`) to
bool tensors; a prunable tensor it does not name is dense. A name that is not a parameter, or
a wrong shape, raises `MaskError` (`Masks.check_model`); a parameter that is not prunable with
the given `include_bias`/`exclude`/`include` raises ValueError. A model with masks attached by
`ntksap.apply_masks` works as is: `masks=None` then means "the attached masks"; masks given as
well are combined with the attached ones (a weight counts when both keep it).

Model state
-----------
The kernel is computed on a private deep copy of the model, in **eval mode**: BatchNorm
normalises with its *running statistics* (at initialisation mean 0, variance 1, i.e. only the
affine part), dropout is off. Train-mode BatchNorm couples the samples of a batch (the NTK of
one input would depend on the others) and updates its running statistics in place, which
`torch.func` transforms cannot do; a BatchNorm without running statistics
(`track_running_stats=False`) is rejected for the same reason. The user's model (mode,
parameters, buffers, requires_grad, attached masks) is never touched.

dtype
-----
The copy's floating parameters and buffers and the (floating) inputs are cast to `dtype`
(float32 or float64, default float64: the eigenvalues of a 1000 x 1000 NTK span many decades);
the result has that dtype.

Implementations
---------------
Both are exact and chunked over "rows" (one row = one (sample, logit) pair). Rows of J come
from `torch.func`: `vmap` over samples of (`vjp` of that sample's logits, `vmap`-ed over the
unit cotangents), i.e. `vmap(jacrev(f))`, a (rows, P) chunk at a time.

- `"jacobian"`: Jacobian contraction. Row chunks, their pruned columns deleted, are gathered
  into a "panel" of up to R rows (R*P_kept values); Theta blocks are panel @ chunk^T, only
  blocks on or above the diagonal (symmetry), then mirrored. If the whole J_m fits the memory
  limit there is one panel and every row is computed once; otherwise each further panel
  recomputes the rows after it (the price of the cap).
- `"ntk_vp"`: NTK-vector products, J is never held whole. For each chunk of rows b, the
  tangents v = diag(m) J_b^T e (rows of J_b, masked) are pushed forward by `jvp` through the
  samples from b's first sample on (`vmap` over the tangents): J diag(m) J_b^T, a block column
  of Theta. It cannot exploit sparsity (tangents are dense tensors) but never needs the
  (rows x P) panel, and wins when a forward pass is cheap relative to K*P_kept (MLPs).
- `"trace"` mode always sums the squared masked rows of J chunk by chunk (the cheapest exact
  route, N*K backward passes); `implementation` has no effect on it.

Cost model (used by `"auto"` and reported by `ntk_cost`; FP = forward flops of one sample,
counted by `torch.utils.flop_counter` on one forward; a multiply-add counts 2):

    rows      : 2*FP per row computed (one backward) + FP per (sample, chunk) forward
    jacobian  : rows(N*K, plus recomputed panels) + (N*K)^2 * P_kept       ("full")
                                                   + N^2 * K * P_kept      ("diagonal")
    ntk_vp    : rows(N*K) + sum over row chunks b of rows_b * (samples from b on) * 2*FP
                (about N^2 * K * FP)

so jacobian is cheaper when K*P_kept < FP (conv nets: FP is ~300 x P for ResNet-20 at 32x32)
and ntk_vp when the forward is cheap (MLPs, FP ~ 2P). `"auto"` takes the cheaper of those
that fit the memory limit; an explicit `implementation=` overrides it (and raises if its plan
cannot fit).

Memory model (`memory_limit` bytes, a soft cap on what is alive at once; None = no cap; A and
A_max are the summed and the largest module-output sizes of one sample, measured with hooks
on the same forward; s = itemsize):

    row chunk of c rows over n samples : c*(P + 2*A_max)*s + n*A*s  (raw Jacobian rows: c*P*s)
    jacobian                           : + R*P_kept*s (panel) + c*P_kept*s (a gathered chunk)
    ntk_vp                             : max(row chunk, c*P*s + n_jvp*(3c + 2)*A_max*s)

Row chunks are whole samples (c = chunk_samples*K) when one sample's rows fit; when even one
sample's K Jacobian rows (K*P*s) exceed the cap, chunks split that sample's logits into groups
of t < K rows (both implementations support it). Only when a single row does not fit is the
kernel refused. Within the cap, chunks are kept small on purpose: at most
`TARGET_CHUNK_BYTES` (128 MiB) of raw rows, but at least one sample (on CPU, 100-sample chunks
of ResNet-20 rows ran 3x slower than 10-sample ones); ntk_vp takes one sample's K rows per
tangent chunk (then symmetry saves half the jvp work) and jvp batches of <= 512 MiB
(estimated). `chunk_size` overrides the chunk (whole samples); the panel still follows the cap.

The result must fit as well (it is checked against the cap on its own, apart from the working
memory above): (N*K)^2*s ("full") or K*N^2*s ("diagonal")
larger than `memory_limit` raises `NTKMemoryError` (a ValueError and a MemoryError) before
any work. Backward-pass temporaries of torch itself are not counted exactly: the cap is soft.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 2, bias=False)  # f(x) = W x: Theta(x_i, x_j) = (x_i . x_j) I_2
    >>> x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    >>> empirical_ntk(net, x)
    tensor([[1., 0., 1., 0.],
            [0., 1., 0., 1.],
            [1., 0., 2., 0.],
            [0., 1., 0., 2.]], dtype=torch.float64)
    >>> m = {"weight": torch.tensor([[True, False, True], [True, True, True]])}
    >>> empirical_ntk(net, x, m, mode="diagonal")  # logit 0 no longer sees x[:, 1]
    tensor([[[1., 1.],
             [1., 1.]],
    <BLANKLINE>
            [[1., 1.],
             [1., 2.]]], dtype=torch.float64)
    >>> float(empirical_ntk(net, x, m, mode="trace"))  # 1 + 1 + 1 + 2
    5.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode

from ntksap.attach import get_masks, private_copy, remove_masks
from ntksap.masks import Masks
from ntksap.targets import prunable_parameters

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "DTYPES",
    "IMPLEMENTATIONS",
    "MODES",
    "NTKMemoryError",
    "empirical_ntk",
    "ntk_cost",
]

MODES = ("full", "diagonal", "trace")
IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vp")
DTYPES = (torch.float32, torch.float64)
DEFAULT_MEMORY_LIMIT = 2 * 2**30  # bytes
# Preferred size of one raw chunk of Jacobian rows (and a quarter of one jvp batch), bytes:
# larger chunks are no faster (measured on CPU: 100-sample chunks of ResNet-20 rows were 3x
# slower than 10-sample ones, page faults of the huge temporaries), so the planner stops here
# even when the memory limit would allow more.
TARGET_CHUNK_BYTES = 2**27

# Debug/instrumentation hook: called as hook(kind, nbytes) each time a Jacobian tensor is
# materialised. kind: "rows" (a raw chunk of J rows, dense), "panel" (the gathered panel),
# "column" (a gathered chunk outside the panel), "tangents" (ntk_vp's masked rows).
_debug_hook: Callable[[str, int], None] | None = None


class NTKMemoryError(ValueError, MemoryError):
    """The NTK (or its smallest chunk) cannot be computed within `memory_limit`."""


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _report(kind: str, nbytes: int) -> None:
    if _debug_hook is not None:
        _debug_hook(kind, nbytes)


# ---------------------------------------------------------------------------------------
# The problem: a private eval-mode copy, the effective prunable weights and their masks
# ---------------------------------------------------------------------------------------
@dataclass
class _Problem:
    work: nn.Module  # private eval-mode copy, cast to dtype, masks baked in
    names: list[str]  # prunable names, in `prunable_parameters` order
    params: dict[str, Tensor]  # name -> effective weight theta * m (dtype)
    masks: dict[str, Tensor]  # name -> bool mask (all True where dense)
    index: dict[str, Tensor | None]  # name -> flat indices of kept entries (None: all kept)
    x: Tensor  # (N, *input_shape) on the device, floating inputs cast to dtype
    N: int
    K: int
    P: int  # prunable weights
    P_kept: int  # kept prunable weights
    itemsize: int  # bytes per value
    forward_flops: int  # one sample's forward, flops (multiply-add = 2)
    act: int  # summed module-output elements of one sample
    act_max: int  # largest module-output elements of one sample

    def f_batch(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Logits of a batch with the prunable weights replaced: (n, K)."""
        out = functional_call(self.work, dict(params), (x,))
        return out.reshape(x.shape[0], -1)

    def f_single(self, params: Mapping[str, Tensor], xi: Tensor) -> Tensor:
        """Logits of one sample (no batch dim): (K,)."""
        return self.f_batch(params, xi.unsqueeze(0))[0]


def _check_choices(mode: str, implementation: str, dtype: torch.dtype) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; valid choices: "
            f"{', '.join(IMPLEMENTATIONS)}"
        )
    if dtype not in DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype!r}; valid choices: torch.float32, torch.float64"
        )


def _check_limits(memory_limit: int | None, chunk_size: int | None) -> None:
    for what, v in (("memory_limit", memory_limit), ("chunk_size", chunk_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{what} must be a positive integer or None, got {v!r}")


def _prepare(
    model: nn.Module,
    x: Tensor,
    masks: Mapping[str, Tensor] | None,
    dtype: torch.dtype,
    include_bias: bool,
    exclude: Sequence[str],
    include: Sequence[str],
    device: str | torch.device | None,
) -> _Problem:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a tensor of shape (N, *input_shape) with N >= 1")
    targets = prunable_parameters(
        model, include_bias=include_bias, exclude=exclude, include=include
    )
    attached = get_masks(model)  # plain names; empty when nothing is attached
    given: Masks | None = None
    if masks is not None:
        given = masks if isinstance(masks, Masks) else Masks(masks)
        given.check_model(model)  # MaskError: unknown name or wrong shape
        extra = sorted(set(given) - set(targets))
        if extra:
            raise ValueError(
                f"masks name parameters that are not prunable with these settings: {extra[:5]}; "
                "pass include_bias=True or include=[...] to count them"
            )
    for name, mod in model.named_modules():
        if isinstance(mod, _BatchNorm) and (mod.running_mean is None or mod.running_var is None):
            raise ValueError(
                f"{name or 'model'} is a BatchNorm without running statistics "
                "(track_running_stats=False): it normalises with batch statistics even in eval "
                "mode, so one input's logits depend on the other inputs and the per-sample "
                "NTK is undefined"
            )
    work = private_copy(model)
    if len(attached):
        remove_masks(work)  # bake theta * m into plain parameters (on the copy only)
    dev = torch.device(device) if device is not None else next(iter(targets.values())).device
    work = work.to(device=dev, dtype=dtype).eval()
    for p in work.parameters():
        p.requires_grad_(False)
        p.grad = None  # a copied .grad would only cost memory
    params: dict[str, Tensor] = {}
    mask_of: dict[str, Tensor] = {}
    index: dict[str, Tensor | None] = {}
    for name in targets:
        mod_name, _, attr = name.rpartition(".")
        owner = work.get_submodule(mod_name) if mod_name else work
        w = getattr(owner, attr).detach()  # the effective value (other parametrizations applied)
        m = torch.ones_like(w, dtype=torch.bool)
        if given is not None and name in given:
            m &= given[name].to(dev)
        if name in attached:
            m &= attached[name].to(dev)
        params[name] = w * m
        mask_of[name] = m
        index[name] = None if bool(m.all()) else m.flatten().nonzero().flatten()
    xs = x.detach().to(dev)
    if xs.is_floating_point():
        xs = xs.to(dtype)
    pb = _Problem(
        work=work,
        names=list(targets),
        params=params,
        masks=mask_of,
        index=index,
        x=xs,
        N=int(xs.shape[0]),
        K=0,
        P=sum(p.numel() for p in params.values()),
        P_kept=sum(int(m.sum()) for m in mask_of.values()),
        itemsize=torch.empty((), dtype=dtype).element_size(),
        forward_flops=0,
        act=0,
        act_max=0,
    )
    _measure(pb)
    return pb


def _measure(pb: _Problem) -> None:
    """K, forward flops and activation sizes of one sample, from one no-grad forward."""
    sizes: list[int] = []

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel())

    leaves = [m for m in pb.work.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = functional_call(pb.work, pb.params, (pb.x[:1],))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != 1:
        raise TypeError(
            "the model must return one tensor of logits with the batch dimension first; "
            f"got {type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}"
        )
    pb.K = int(out[0].numel())
    pb.forward_flops = int(counter.get_total_flops())
    sizes.append(int(pb.x[:1].numel()))
    pb.act = sum(sizes)
    pb.act_max = max(sizes)


# ---------------------------------------------------------------------------------------
# Planning: chunk sizes, memory and flops of each implementation
# ---------------------------------------------------------------------------------------
Chunk = tuple[int, int, int, int]  # samples [i0, i1) x logits [k0, k1)


def _chunks(N: int, K: int, s: int, t: int, logit_major: bool = False) -> list[Chunk]:
    """Row chunks: s whole samples (t == K), or one sample's logits in groups of t.

    Sample-major order (every chunk is a contiguous range of the flat row n*K + k), or, with
    `logit_major` and t < K, grouped by logit range (for "diagonal": only equal groups pair).
    """
    if t >= K:
        return [(i, min(i + s, N), 0, K) for i in range(0, N, s)]
    groups = [(k, min(k + t, K)) for k in range(0, K, t)]
    if logit_major:
        return [(i, i + 1, k0, k1) for k0, k1 in groups for i in range(N)]
    return [(i, i + 1, k0, k1) for i in range(N) for k0, k1 in groups]


def _rows_of(c: Chunk) -> int:
    return (c[1] - c[0]) * (c[3] - c[2])


def _row_stage_bytes(pb: _Problem, c: int, n: int) -> int:
    """Memory of computing c Jacobian rows over n samples: raw rows + backward temporaries."""
    s = pb.itemsize
    return c * (pb.P + 2 * pb.act_max) * s + n * pb.act * s


def _fit_rows(pb: _Problem, budget: float, extra_per_row: int = 0) -> int:
    """Largest row count c (<= N*K) whose row stage plus c*extra_per_row fits `budget`."""
    total = pb.N * pb.K
    if math.isinf(budget):
        return total
    lo, hi = 0, total
    while lo < hi:  # binary search: the bytes grow monotonically with c
        mid = (lo + hi + 1) // 2
        n = -(-mid // pb.K)
        if _row_stage_bytes(pb, mid, n) + mid * extra_per_row <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _split(pb: _Problem, c: int) -> tuple[int, int]:
    """Row budget c -> (samples per chunk s, logits per chunk t), chunks aligned.

    A budget above the preferred chunk size (`TARGET_CHUNK_BYTES` of raw rows, but at least
    one sample's K rows) is cut down to it.
    """
    prefer = max(pb.K, TARGET_CHUNK_BYTES // max(1, pb.P * pb.itemsize))
    c = min(c, prefer)
    if c >= pb.K:
        return min(pb.N, c // pb.K), pb.K
    return 1, max(1, c)


def _row_flops(pb: _Problem, chunks: Sequence[Chunk]) -> float:
    """Flops of computing the rows of `chunks`: a backward (2 FP) per row + the forwards."""
    rows = sum(_rows_of(c) for c in chunks)
    samples = sum(c[1] - c[0] for c in chunks)
    return float(rows * 2 * pb.forward_flops + samples * pb.forward_flops)


def _panels(chunks: Sequence[Chunk], per_panel: int) -> list[tuple[int, int]]:
    """Consecutive chunk index ranges [a, b) of at most `per_panel` chunks."""
    return [(a, min(a + per_panel, len(chunks))) for a in range(0, len(chunks), per_panel)]


def _plan_rows_only(pb: _Problem, cap: float, chunk_size: int | None) -> dict[str, Any]:
    """Trace: row chunks only."""
    s_item = pb.itemsize
    if chunk_size is not None:
        s, t = min(chunk_size, pb.N), pb.K
    else:
        c = _fit_rows(pb, cap)
        if c < 1:
            return {
                "feasible": False,
                "reason": f"one Jacobian row needs {_gib(_row_stage_bytes(pb, 1, 1))}",
            }
        s, t = _split(pb, c)
    peak = _row_stage_bytes(pb, s * t, s)
    chunks = _chunks(pb.N, pb.K, s, t)
    out = {
        "feasible": peak <= cap,
        "reason": None if peak <= cap else f"a chunk of {s} samples needs {_gib(peak)}",
        "chunk_samples": s,
        "chunk_logits": t,
        "peak_bytes": peak,
        "jacobian_bytes": s * t * pb.P * s_item,
        "rows_computed": pb.N * pb.K,
        "flops": _row_flops(pb, chunks) + 2.0 * pb.N * pb.K * pb.P_kept,
    }
    return out


def _plan_jacobian(pb: _Problem, mode: str, cap: float, chunk_size: int | None) -> dict[str, Any]:
    s_item, NK = pb.itemsize, pb.N * pb.K
    kept_row = pb.P_kept * s_item  # one gathered row, bytes
    whole = NK * kept_row  # J_m, bytes

    def one_row() -> dict[str, Any]:
        need = _row_stage_bytes(pb, 1, 1) + 2 * kept_row
        return {"feasible": False, "reason": f"one Jacobian row and its panel need {_gib(need)}"}

    if chunk_size is not None:
        s, t = min(chunk_size, pb.N), pb.K
        single = whole + _row_stage_bytes(pb, s * t, s) <= cap
    else:
        c1 = _fit_rows(pb, cap - whole)  # chunks gathered straight into one panel
        single = c1 >= min(NK, pb.K)
        if not single:
            # Several panels: a quarter of the cap for the row chunks (at least one row).
            c = max(_fit_rows(pb, cap / 4, kept_row), min(1, _fit_rows(pb, cap, 2 * kept_row)))
            if c < 1:
                if c1 < 1:
                    return one_row()
                single, c = True, c1  # J_m fits, only with chunks of fewer than K rows
        s, t = _split(pb, c1 if single else c)
    c = s * t
    chunks = _chunks(pb.N, pb.K, s, t, logit_major=mode == "diagonal")
    stage = _row_stage_bytes(pb, c, s)
    if single:
        per_panel, panel_rows, peak = len(chunks), NK, whole + stage
    elif kept_row == 0:  # everything pruned: nothing to store
        per_panel, panel_rows, peak = len(chunks), NK, stage
    else:
        room = cap - stage - c * kept_row
        per_panel = int(room // (c * kept_row)) if room > 0 else 0
        panel_rows = per_panel * c
        peak = panel_rows * kept_row + stage + c * kept_row
        if per_panel < 1:
            return {
                "feasible": False,
                "reason": f"a panel of one chunk ({c} rows) and one more chunk need "
                f"{_gib(stage + 2 * c * kept_row)}",
                "chunk_samples": s,
                "chunk_logits": t,
            }
    computed: list[Chunk] = []
    for a, b in _panels(chunks, per_panel):
        computed += chunks[a:b]
        groups = {(ch[2], ch[3]) for ch in chunks[a:b]}
        computed += [ch for ch in chunks[b:] if mode == "full" or (ch[2], ch[3]) in groups]
    if mode == "full":
        contraction = float(NK) * NK * pb.P_kept  # 2 flops per MAC, half by symmetry
    else:
        contraction = float(pb.N) * pb.N * pb.K * pb.P_kept
    return {
        "feasible": peak <= cap,
        "reason": None if peak <= cap else f"chunks of {s} samples need {_gib(peak)}",
        "chunk_samples": s,
        "chunk_logits": t,
        "panel_rows": panel_rows,
        "panels": len(_panels(chunks, per_panel)),
        "peak_bytes": int(peak),
        "jacobian_bytes": int(
            panel_rows * kept_row + c * pb.P * s_item + (0 if single else c * kept_row)
        ),
        "rows_computed": sum(_rows_of(ch) for ch in computed),
        "flops": _row_flops(pb, computed) + contraction,
    }


def _jvp_bytes(pb: _Problem, c: int, n: int) -> int:
    """Memory of pushing c tangents through n samples (tangent activations + primals)."""
    return n * (3 * c + 2) * pb.act_max * pb.itemsize


def _plan_ntk_vp(pb: _Problem, cap: float, chunk_size: int | None) -> dict[str, Any]:
    s_item = pb.itemsize
    tan_row = pb.P * s_item
    n_min = min(pb.N, 8)
    if chunk_size is not None:
        s, t = min(chunk_size, pb.N), pb.K
    else:
        lo = 0
        for n_need in dict.fromkeys((n_min, 1)):  # prefer room for n_min jvp samples
            lo, hi = 0, pb.N * pb.K
            while lo < hi:  # largest c whose row stage and jvp of n_need samples fit
                mid = (lo + hi + 1) // 2
                ok = _row_stage_bytes(pb, mid, -(-mid // pb.K)) <= cap
                ok = ok and mid * tan_row + _jvp_bytes(pb, mid, n_need) <= cap
                lo, hi = (mid, hi) if ok else (lo, mid - 1)
            if lo >= 1:
                break
        if lo < 1:
            need = max(_row_stage_bytes(pb, 1, 1), tan_row + _jvp_bytes(pb, 1, 1))
            return {
                "feasible": False,
                "reason": f"one tangent row and its forward need {_gib(need)}",
            }
        s, t = _split(pb, min(lo, pb.K))  # one sample's rows: small blocks, most symmetry
    c = s * t
    if math.isinf(cap):
        n_jvp = pb.N
    else:
        n_jvp = int((cap - c * tan_row) // max(1, _jvp_bytes(pb, c, 1)))
        n_jvp = min(pb.N, n_jvp)
    prefer = 4 * TARGET_CHUNK_BYTES // max(1, _jvp_bytes(pb, c, 1))
    n_jvp = min(n_jvp, max(1, prefer))
    peak = max(_row_stage_bytes(pb, c, s), c * tan_row + _jvp_bytes(pb, c, max(n_jvp, 1)))
    chunks = _chunks(pb.N, pb.K, s, t)
    jvp_flops = 0.0
    for ch in chunks:
        later = pb.N - ch[0]  # samples from the chunk's first one on
        jvp_flops += _rows_of(ch) * later * 2.0 * pb.forward_flops + later * pb.forward_flops
    feasible = n_jvp >= 1 and peak <= cap
    return {
        "feasible": feasible,
        "reason": None if feasible else f"chunks of {c} rows need {_gib(peak)}",
        "chunk_samples": s,
        "chunk_logits": t,
        "jvp_samples": max(n_jvp, 1),
        "peak_bytes": int(peak),
        "jacobian_bytes": int(c * tan_row),
        "rows_computed": pb.N * pb.K,
        "flops": _row_flops(pb, chunks) + jvp_flops,
    }


def _plan(
    pb: _Problem, mode: str, implementation: str, memory_limit: int | None, chunk_size: int | None
) -> dict[str, Any]:
    cap = math.inf if memory_limit is None else float(memory_limit)
    s_item = pb.itemsize
    if mode == "full":
        result_bytes = (pb.N * pb.K) ** 2 * s_item
    elif mode == "diagonal":
        result_bytes = pb.K * pb.N**2 * s_item
    else:
        result_bytes = s_item
    plan: dict[str, Any] = {
        "mode": mode,
        "N": pb.N,
        "K": pb.K,
        "P": pb.P,
        "P_kept": pb.P_kept,
        "dtype": str(pb.params[pb.names[0]].dtype).replace("torch.", ""),
        "itemsize": s_item,
        "forward_flops": pb.forward_flops,
        "activation_elements": pb.act,
        "max_activation_elements": pb.act_max,
        "result_bytes": result_bytes,
        "full_jacobian_bytes": pb.N * pb.K * pb.P * s_item,
        "memory_limit": memory_limit,
    }
    if mode == "trace":
        rows = _plan_rows_only(pb, cap, chunk_size)
        plan["jacobian"] = rows
        plan["ntk_vp"] = rows
        plan["choice"] = "jacobian" if rows["feasible"] else None
        plan["why"] = "trace: sum of squared masked Jacobian rows (implementation not used)"
        return plan
    plan["jacobian"] = _plan_jacobian(pb, mode, cap, chunk_size)
    plan["ntk_vp"] = _plan_ntk_vp(pb, cap, chunk_size)
    fits = [k for k in ("jacobian", "ntk_vp") if plan[k]["feasible"]]
    if implementation != "auto":
        plan["choice"] = implementation if implementation in fits else None
        plan["why"] = "explicit"
    elif fits:
        plan["choice"] = min(fits, key=lambda k: plan[k]["flops"])
        other = next(k for k in ("jacobian", "ntk_vp") if k != plan["choice"])
        plan["why"] = (
            f"fewer estimated flops ({plan[plan['choice']]['flops']:.3g} vs "
            f"{plan[other]['flops']:.3g})"
            if other in fits
            else f"{other} does not fit the memory limit"
        )
    else:
        plan["choice"], plan["why"] = None, "neither fits the memory limit"
    return plan


def ntk_cost(
    model: nn.Module,
    x: Tensor,
    masks: Mapping[str, Tensor] | None = None,
    *,
    mode: str = "full",
    implementation: str = "auto",
    dtype: torch.dtype = torch.float64,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
    chunk_size: int | None = None,
    include_bias: bool = False,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The estimates `empirical_ntk` plans with (one forward of one sample; no NTK work).

    Returns a dict: `N`, `K`, `P` (prunable weights), `P_kept`, `itemsize`, `forward_flops`
    (one sample), `activation_elements` / `max_activation_elements` (one sample),
    `result_bytes`, `full_jacobian_bytes` (N*K*P*itemsize), and for each of `"jacobian"` and
    `"ntk_vp"` a dict with `feasible`, `flops`, `peak_bytes` (the memory model's peak),
    `jacobian_bytes` (the largest Jacobian data alive at once), `chunk_samples`,
    `chunk_logits`, `rows_computed` (and `panel_rows`/`panels`, resp. `jvp_samples`);
    `choice` is the implementation `empirical_ntk` would run (None: nothing fits) and `why`.
    Arguments as `empirical_ntk`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> c = ntk_cost(net, torch.randn(4, 8))
        >>> c["P"], c["K"], c["result_bytes"], c["forward_flops"]  # FP = 2 * P for an MLP
        (1152, 10, 12800, 2304)
        >>> c["choice"], c["ntk_vp"]["flops"] < c["jacobian"]["flops"]  # as K * P > FP
        ('ntk_vp', True)
    """
    _check_choices(mode, implementation, dtype)
    _check_limits(memory_limit, chunk_size)
    pb = _prepare(model, x, masks, dtype, include_bias, exclude, include, device)
    return _plan(pb, mode, implementation, memory_limit, chunk_size)


# ---------------------------------------------------------------------------------------
# Computation
# ---------------------------------------------------------------------------------------
def _raw_rows(pb: _Problem, ch: Chunk) -> dict[str, Tensor]:
    """Rows of J (dense, unmasked) for chunk `ch`: name -> (rows, *param_shape)."""
    i0, i1, k0, k1 = ch
    eye = torch.eye(pb.K, dtype=pb.params[pb.names[0]].dtype, device=pb.x.device)[k0:k1]  # (t, K)

    def one(xi: Tensor) -> dict[str, Tensor]:
        _, pull = vjp(lambda p: pb.f_single(p, xi), pb.params)
        return vmap(pull)(eye)[0]  # name -> (t, *shape)

    rows = vmap(one)(pb.x[i0:i1])  # name -> (n, t, *shape)
    out = {n: rows[n].reshape(-1, *rows[n].shape[2:]) for n in pb.names}
    _report("rows", sum(v.numel() * v.element_size() for v in out.values()))
    return out


def _gather_into(pb: _Problem, raw: dict[str, Tensor], out: Tensor) -> None:
    """Write the kept columns of the raw rows into `out` (rows, P_kept), freeing raw."""
    off = 0
    for name in pb.names:
        v = raw.pop(name)
        v = v.reshape(v.shape[0], -1)  # (rows, numel)
        idx = pb.index[name]
        if idx is not None:
            v = v.index_select(1, idx)  # (rows, kept)
        out[:, off : off + v.shape[1]] = v
        off += v.shape[1]
        del v


def _gathered(pb: _Problem, ch: Chunk, dtype: torch.dtype) -> Tensor:
    block = torch.empty(_rows_of(ch), pb.P_kept, dtype=dtype, device=pb.x.device)
    _gather_into(pb, _raw_rows(pb, ch), block)
    return block


def _segments(chunks: Sequence[Chunk]) -> list[tuple[int, int, int, int, int]]:
    """Merge consecutive chunks with the same logits and consecutive samples.

    Returns (i0, i1, k0, k1, local_row_offset); a segment's rows are (n, t) sample-major.
    """
    segs: list[list[int]] = []
    off = 0
    for i0, i1, k0, k1 in chunks:
        last = segs[-1] if segs else None
        if last is not None and last[2] == k0 and last[3] == k1 and last[1] == i0:
            last[1] = i1
        else:
            segs.append([i0, i1, k0, k1, off])
        off += (i1 - i0) * (k1 - k0)
    return [tuple(s) for s in segs]  # type: ignore[misc]


def _run_jacobian(pb: _Problem, mode: str, plan: dict[str, Any]) -> Tensor:
    dtype, dev, N, K = pb.params[pb.names[0]].dtype, pb.x.device, pb.N, pb.K
    s, t = plan["chunk_samples"], plan["chunk_logits"]
    chunks = _chunks(N, K, s, t, logit_major=mode == "diagonal")
    per_panel = max(1, plan["panel_rows"] // (s * t))
    if mode == "full":
        res = torch.zeros(N * K, N * K, dtype=dtype, device=dev)  # (N*K, N*K)
    else:
        res = torch.zeros(K, N, N, dtype=dtype, device=dev)  # (K, N, N)
    blk = max(s, 64)  # samples per triangular block in "diagonal"
    for a, b in _panels(chunks, per_panel):
        mine = chunks[a:b]
        rows = sum(_rows_of(ch) for ch in mine)
        panel = torch.empty(rows, pb.P_kept, dtype=dtype, device=dev)  # (R, P_kept)
        _report("panel", panel.numel() * panel.element_size())
        off = 0
        for ch in mine:
            _gather_into(pb, _raw_rows(pb, ch), panel[off : off + _rows_of(ch)])
            off += _rows_of(ch)
        if mode == "full":
            r_start = mine[0][0] * K + mine[0][2]  # flat row of the panel's first row
            off = 0
            for ch in mine:  # triangular by chunk: rows of ch x columns from ch on
                r = _rows_of(ch)
                g0 = r_start + off
                res[g0 : g0 + r, g0 : r_start + rows] = panel[off : off + r] @ panel[off:].T
                off += r
            for ch in chunks[b:]:
                col = _gathered(pb, ch, dtype)  # (r, P_kept)
                _report("column", col.numel() * col.element_size())
                c0 = ch[0] * K + ch[2]
                res[r_start : r_start + rows, c0 : c0 + col.shape[0]] = panel @ col.T
                del col
        else:
            segs = _segments(mine)
            for i0, i1, k0, k1, lo in segs:  # same-logit pairs inside the panel
                n, tt = i1 - i0, k1 - k0
                v = panel[lo : lo + n * tt].view(n, tt, -1)  # (n, t, P_kept)
                for q0 in range(0, n, blk):
                    q1 = min(q0 + blk, n)
                    for kk in range(tt):
                        res[k0 + kk, i0 + q0 : i0 + q1, i0 + q0 : i1] = v[q0:q1, kk] @ v[q0:, kk].T
            for ch in chunks[b:]:
                same = [sg for sg in segs if (sg[2], sg[3]) == (ch[2], ch[3])]
                if not same:
                    continue
                col = _gathered(pb, ch, dtype)
                _report("column", col.numel() * col.element_size())
                w = col.view(ch[1] - ch[0], ch[3] - ch[2], -1)  # (n_b, t, P_kept)
                for i0, i1, k0, k1, lo in same:
                    v = panel[lo : lo + (i1 - i0) * (k1 - k0)].view(i1 - i0, k1 - k0, -1)
                    for kk in range(k1 - k0):
                        res[k0 + kk, i0:i1, ch[0] : ch[1]] = v[:, kk] @ w[:, kk].T
                del col
        del panel
    return _mirror(res)


def _mirror(res: Tensor) -> Tensor:
    """Upper triangle (of the last two dims) -> the whole symmetric matrix, in place."""
    lower = torch.triu(res, 1).transpose(-1, -2)
    res.triu_()
    res.add_(lower)
    return res


def _run_ntk_vp(pb: _Problem, mode: str, plan: dict[str, Any]) -> Tensor:
    dtype, dev, N, K = pb.params[pb.names[0]].dtype, pb.x.device, pb.N, pb.K
    s, t, n_jvp = plan["chunk_samples"], plan["chunk_logits"], plan["jvp_samples"]
    if mode == "full":
        res = torch.zeros(N * K, N * K, dtype=dtype, device=dev)  # (N*K, N*K)
    else:
        res = torch.zeros(K, N, N, dtype=dtype, device=dev)  # (K, N, N)
    for ch in _chunks(N, K, s, t):
        i0, i1, k0, k1 = ch
        tangents = _raw_rows(pb, ch)  # name -> (c, *shape): rows of J_b
        for name in pb.names:
            if pb.index[name] is not None:
                tangents[name].mul_(pb.masks[name])  # diag(m) J_b^T e
        _report("tangents", sum(v.numel() * v.element_size() for v in tangents.values()))
        c = _rows_of(ch)
        r0 = i0 * K + k0
        for a0 in range(i0, N, n_jvp):
            a1 = min(a0 + n_jvp, N)
            xa = pb.x[a0:a1]

            def push(tan: dict[str, Tensor], xa: Tensor = xa) -> Tensor:
                return jvp(lambda p: pb.f_batch(p, xa), (pb.params,), (tan,))[1]  # (n_a, K)

            out = vmap(push)(tangents)  # (c, n_a, K) = J_a diag(m) J_b^T
            if mode == "full":
                res[r0 : r0 + c, a0 * K : a1 * K] = out.reshape(c, -1)
            else:
                o = out.view(i1 - i0, k1 - k0, a1 - a0, K)[..., k0:k1]  # (n_b, t, n_a, t)
                d = torch.diagonal(o, dim1=1, dim2=3)  # (n_b, n_a, t): same logit only
                res[k0:k1, i0:i1, a0:a1] = d.permute(2, 0, 1)
            del out
        del tangents
    return _mirror(res)


def _run_trace(pb: _Problem, plan: dict[str, Any]) -> Tensor:
    dtype = pb.params[pb.names[0]].dtype
    total = torch.zeros((), dtype=dtype, device=pb.x.device)
    for ch in _chunks(pb.N, pb.K, plan["chunk_samples"], plan["chunk_logits"]):
        raw = _raw_rows(pb, ch)
        for name in pb.names:
            v = raw.pop(name)
            if pb.index[name] is not None:
                v.mul_(pb.masks[name])
            flat = v.reshape(-1)
            total += torch.dot(flat, flat)  # sum of squares of the masked rows
            del v, flat
    return total


def empirical_ntk(
    model: nn.Module,
    x: Tensor,
    masks: Mapping[str, Tensor] | None = None,
    *,
    mode: str = "full",
    implementation: str = "auto",
    dtype: torch.dtype = torch.float64,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
    chunk_size: int | None = None,
    include_bias: bool = False,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    device: str | torch.device | None = None,
) -> Tensor:
    """The exact empirical NTK J diag(m) J^T of `model`'s logits w.r.t. its prunable weights.

    See the module docstring for the definition, layouts, eval-mode rule and cost model.

    Args:
        model: any `nn.Module` returning (N, K) logits (or (N, ...) flattened to K); left
            untouched (a private eval-mode copy is used). Masks attached with
            `ntksap.apply_masks` are honoured.
        x: inputs (N, *input_shape).
        masks: bool tensor per prunable parameter name (True = kept); None = dense (or the
            attached masks). Unnamed prunable tensors are dense.
        mode: "full" -> (N*K, N*K), index n*K + k; "diagonal" -> (K, N, N); "trace" ->
            0-dim tensor, the sum over samples and logits of squared gradient norms.
        implementation: "auto" (cheapest that fits), "jacobian" or "ntk_vp".
        dtype: torch.float32 or torch.float64 (computation and result).
        memory_limit: bytes, soft cap on the memory alive at once (None: unlimited).
        chunk_size: samples per row chunk (default: derived from `memory_limit`).
        include_bias / exclude / include: which parameters are prunable (see
            `ntksap.prunable_parameters`).
        device: where to compute (default: the device of the model's prunable weights).

    Raises:
        ValueError: a bad mode, implementation, dtype or limit; masks naming non-prunable
            tensors; BatchNorm without running statistics.
        MaskError: masks that do not fit the model.
        NTKMemoryError: the result, or the smallest chunk of the chosen implementation, does
            not fit `memory_limit`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x = torch.randn(5, 4)
        >>> full = empirical_ntk(net, x)
        >>> full.shape, empirical_ntk(net, x, mode="diagonal").shape
        (torch.Size([15, 15]), torch.Size([3, 5, 5]))
        >>> bool(torch.allclose(full.trace(), empirical_ntk(net, x, mode="trace")))
        True
    """
    _check_choices(mode, implementation, dtype)
    _check_limits(memory_limit, chunk_size)
    pb = _prepare(model, x, masks, dtype, include_bias, exclude, include, device)
    plan = _plan(pb, mode, implementation, memory_limit, chunk_size)
    if memory_limit is not None and plan["result_bytes"] > memory_limit:
        shape = f"({pb.N * pb.K}, {pb.N * pb.K})" if mode == "full" else f"({pb.K}, {pb.N}, {pb.N})"
        raise NTKMemoryError(
            f"the {mode!r} NTK result alone needs {_gib(plan['result_bytes'])} ({shape} "
            f"{plan['dtype']}), more than memory_limit = {_gib(memory_limit)}; use fewer "
            "samples, mode='diagonal' or 'trace', or raise memory_limit"
        )
    choice = plan["choice"]
    if choice is None:
        want = "jacobian" if implementation == "auto" or mode == "trace" else implementation
        raise NTKMemoryError(
            f"implementation {implementation!r} cannot compute the {mode!r} NTK within "
            f"memory_limit = {_gib(memory_limit or 0)}: {plan[want]['reason']}"
            + ("" if chunk_size is None else " (try chunk_size=None)")
        )
    with torch.no_grad():  # torch.func transforms do their own differentiation
        if mode == "trace":
            return _run_trace(pb, plan["jacobian"])
        if choice == "jacobian":
            return _run_jacobian(pb, mode, plan["jacobian"])
        return _run_ntk_vp(pb, mode, plan["ntk_vp"])
