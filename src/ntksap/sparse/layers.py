"""Inference-only Conv2d / Linear layers with CSR weights, a fused epilogue and two modes.

`SparseConv2d` and `SparseLinear` compute `act(op(x, W) + bias [+ residual])` where `act`
is ReLU or nothing and the optional residual is added before it (a ResNet block's
`relu(bn2(conv2(out)) + shortcut)` in one call). `mode` picks the implementation per layer:

- "sparse": the C++ kernels of `csrc/sparse_kernels.cpp` (direct sparse convolution, CSR x
  dense), or when they are not built, the pure-torch fallback (convolution with the dense
  weight rebuilt from CSR once; `torch.sparse.mm` for Linear): correct, not faster.
- "dense": `F.conv2d` / `F.linear` with the (BN-folded, masked) dense weight.

Weights are buffers, never parameters: the layers do not train. CSR: `rowptr` (int32,
out + 1), `col_idx` (int32, nnz; for a conv the column is c * kh * kw + dy * kw + dx),
`values` (float32, nnz), over the weight reshaped to (out_features, fan_in). Constructors
check every invariant the kernels index with (`check_csr`); the C++ kernels check the
index arrays again on every call (a later in-place write raises, never reads out of
bounds).

Inputs are checked as torch's own modules check them (rank, channels / features, dtype,
device; `InputTypeError` / `InputShapeError`, both RuntimeErrors as torch raises), in
every mode. NaN and inf propagate exactly as through the dense masked layer: a sparse
product skips the zero weights, but the dense one multiplies them (0 * NaN = 0 * inf =
NaN), so an input holding NaN / inf is computed densely (the C++ kernels detect it while
they copy or scan their input; the fused ReLU keeps NaN, as torch's).

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 4, 3, padding=1)
    >>> with torch.no_grad():
    ...     _ = conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    >>> sp = SparseConv2d.from_dense(conv.weight, conv.bias, stride=1, padding=1)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(sp(x), conv(x), atol=1e-5)
    True
"""

from __future__ import annotations

import math
import operator
import threading
import warnings
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from ntksap.sparse import _ext

__all__ = [
    "BufferPool",
    "InputShapeError",
    "InputTypeError",
    "SparseChain",
    "SparseConv2d",
    "SparseLinear",
    "check_csr",
    "check_input",
    "to_csr",
]

MODES = ("sparse", "dense")
# "no tensor" for the kernels' optional arguments; never written to (the kernels allocate
# instead of writing into an unusable `out`)
_EMPTY = torch.empty(0)
# readable floats after a padded buffer (>= kSlack in csrc/sparse_kernels.cpp: strips of
# discarded "wide" outputs read a little past the last plane)
PAD_SLACK = 256
# largest stride / padding / kernel size the C++ kernels take (kMaxGeom in the C++)
_MAX_GEOMETRY = 1 << 16
# attribute of a BufferPool buffer: True when the sparse conv that last wrote it had a finite
# input, finite weights and a finite residual (see SparseConv2d.compute)
_FINITE_MARK = "_ntksap_finite"


def to_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rowptr int32, col_idx int32, values float32) of `weight` reshaped to (rows, -1);
    exact zeros are dropped.

    Example:
        >>> rp, col, val = to_csr(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
        >>> rp.tolist(), col.tolist(), val.tolist()
        ([0, 1, 2], [1, 0], [2.0, 3.0])
    """
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    keep = w != 0
    rowptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
    rowptr[1:] = keep.sum(1).cumsum(0)
    col = keep.nonzero()[:, 1].to(torch.int32).contiguous()
    return rowptr, col, w[keep].contiguous()


def check_csr(
    rowptr: Any, col_idx: Any, values: Any, weight_shape: tuple[int, ...] | list[int]
) -> None:
    """Raise ValueError unless (rowptr, col_idx, values) is a valid CSR of a weight of
    `weight_shape`, (out, in) or (out, in/groups, kh, kw), reshaped to (out, K) with K the
    product of the other entries: CPU tensors, 1-D and contiguous; int32 indices, float32
    values; len(rowptr) = out + 1, rowptr[0] = 0, never decreasing, rowptr[-1] = nnz =
    len(col_idx) = len(values); 0 <= col < K and strictly increasing within a row (sorted,
    no duplicates: what `to_csr` writes, and what makes the dense and the sparse product
    the same sum). Messages name the array, the rule and the first offending index and
    value, and are self-contained (a loader can prefix the tensor's name in its file).
    O(out + nnz), vectorised.

    Example:
        >>> rp, col, val = to_csr(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
        >>> check_csr(rp, col, val, (2, 2))
        >>> try:
        ...     check_csr(rp, col * 5, val, (2, 2))
        ... except ValueError as e:
        ...     print(e)
        col_idx[0] = 5 is outside [0, 2) (in_features)
    """
    shape = _check_weight_shape(weight_shape)
    for name, t, dtype in (
        ("rowptr", rowptr, torch.int32),
        ("col_idx", col_idx, torch.int32),
        ("values", values, torch.float32),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device.type != "cpu" or t.layout != torch.strided:
            raise ValueError(
                f"{name} must be a dense CPU tensor, got one on {t.device} ({t.layout})"
            )
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(t.shape)}")
    rows, fan_in = shape[0], math.prod(shape[1:])
    if rowptr.numel() != rows + 1:
        raise ValueError(
            f"rowptr must have out + 1 = {rows + 1} entries (weight_shape[0] = {rows}), "
            f"got {rowptr.numel()}"
        )
    nnz = col_idx.numel()
    if values.numel() != nnz:
        raise ValueError(
            f"values has {values.numel()} entries and col_idx {nnz}: one value per column index"
        )
    rp = rowptr.to(torch.int64)
    if int(rp[0]) != 0:
        raise ValueError(f"rowptr[0] = {int(rp[0])}, must be 0")
    steps = rp[1:] - rp[:-1]
    down = (steps < 0).nonzero()
    if down.numel():
        i = int(down[0, 0])
        raise ValueError(
            f"rowptr must never decrease: rowptr[{i}] = {int(rp[i])} > "
            f"rowptr[{i + 1}] = {int(rp[i + 1])}"
        )
    if int(rp[-1]) != nnz:
        raise ValueError(f"rowptr[-1] = {int(rp[-1])} must equal nnz = len(col_idx) = {nnz}")
    if nnz == 0:
        return
    col = col_idx.to(torch.int64)
    outside = ((col < 0) | (col >= fan_in)).nonzero()
    if outside.numel():
        j = int(outside[0, 0])
        raise ValueError(
            f"col_idx[{j}] = {int(col[j])} is outside [0, {fan_in}) ({_fan_in_words(shape)})"
        )
    # within a row, each column exceeds the one before it; a row's first entry may be
    # anything (rowptr[1:-1] are where rows start)
    rising = col[1:] > col[:-1]
    starts = rp[1:-1]
    starts = starts[(starts > 0) & (starts < nnz)]
    rising[starts - 1] = True
    bad = (~rising).nonzero()
    if bad.numel():
        j = int(bad[0, 0]) + 1
        row = int(torch.searchsorted(rp, j, right=True)) - 1
        raise ValueError(
            f"col_idx must increase strictly within a row (sorted, no duplicates): row {row} "
            f"has col_idx[{j}] = {int(col[j])} after col_idx[{j - 1}] = {int(col[j - 1])}"
        )


def _check_weight_shape(weight_shape: Any) -> tuple[int, ...]:
    """`weight_shape` as a tuple of positive ints, (out, in) or (out, in/groups, kh, kw)."""
    if not isinstance(weight_shape, tuple | list | torch.Size) or len(weight_shape) not in (2, 4):
        raise ValueError(
            f"weight_shape must be (out, in) or (out, in/groups, kh, kw), got {weight_shape!r}"
        )
    out = tuple(_as_int(v) for v in weight_shape)
    for i, v in enumerate(out):
        if v is None or v < 1:
            raise ValueError(
                f"weight_shape[{i}] must be a positive int, got {weight_shape[i]!r} "
                f"(weight_shape {list(weight_shape)})"
            )
    return out  # type: ignore[return-value]


def _as_int(v: Any) -> int | None:
    """v as an int if it is one (numpy ints too; never a bool or a float), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _fan_in_words(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "in_features"
    return f"in_channels/groups * kh * kw = {shape[1]} * {shape[2]} * {shape[3]}"


def _from_csr(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """The dense (rows, cols) matrix of a CSR triple (checked first: it may have been
    written to since the layer was built)."""
    check_csr(rowptr, col, values, shape)
    rows = rowptr.numel() - 1
    counts = (rowptr[1:] - rowptr[:-1]).to(torch.int64)
    row_idx = torch.repeat_interleave(torch.arange(rows), counts)
    dense = torch.zeros(rows, int(torch.tensor(shape[1:]).prod()), dtype=torch.float32)
    dense[row_idx, col.to(torch.int64)] = values
    return dense.reshape(shape)


class InferenceOnly(nn.Module):
    """Modules of ntksap.sparse: always in eval mode; `train()` raises."""

    def train(self, mode: bool = True) -> Self:
        if mode:
            raise RuntimeError(
                "ntksap.sparse modules are inference-only and cannot train; train the masked "
                "dense model (ntksap.apply_masks) and convert it again"
            )
        return super().train(False)


class InputTypeError(TypeError, RuntimeError):
    """An input a sparse module cannot take: not a tensor, wrong dtype, device, layout or
    rank. A RuntimeError, as torch's own modules raise for these, and a TypeError."""


class InputShapeError(ValueError, RuntimeError):
    """An input whose channels / features or size do not fit the weights. A RuntimeError,
    as torch's own modules raise for these, and a ValueError."""


def _who(owner: object) -> str:
    """How a message names the module: its class and, when known, its name in the model."""
    if isinstance(owner, str):
        return owner
    name = getattr(owner, "source_name", "") or getattr(owner, "name", "")
    return type(owner).__name__ + (f" {name!r}" if name else "")


def check_input(
    x: Any, owner: object = "ntksap.sparse", name: str = "input", *, meta: bool = True
) -> None:
    """The input checks every sparse module makes (each adds its own rank and shape
    checks): a strided float32 CPU tensor, and no gradient wanted. `owner` (a module or a
    name) and `name` word the message. `meta`: meta tensors pass too (shape dry runs, as
    the loader's); the modules themselves pass meta=False.

    Example:
        >>> check_input(torch.zeros(2, 3))
        >>> try:
        ...     check_input(torch.zeros(2, 3, dtype=torch.float64))
        ... except TypeError as e:  # an InputTypeError: a TypeError and a RuntimeError
        ...     print(e)
        ntksap.sparse computes in float32, got input of dtype torch.float64 (use .float())
    """
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(
            f"{_who(owner)}: {name} must be a torch.Tensor, got {type(x).__name__}"
        )
    if x.dtype is not torch.float32 or x.layout is not torch.strided or not x.is_cpu:
        if x.dtype != torch.float32:
            raise InputTypeError(
                f"{_who(owner)} computes in float32, got {name} of dtype {x.dtype} (use .float())"
            )
        if not x.is_cpu and not (meta and x.is_meta):
            raise InputTypeError(
                f"{_who(owner)} runs on the CPU, got {name} on {x.device} (use .cpu())"
            )
        if x.layout is not torch.strided:
            raise InputTypeError(
                f"{_who(owner)} takes dense (strided) tensors, got {name} with layout "
                f"{x.layout} (use .to_dense())"
            )
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"ntksap.sparse modules are inference-only: the {name} requires grad; run "
            "under torch.no_grad() / torch.inference_mode(), or train the masked dense model"
        )


_F32, _STRIDED = torch.float32, torch.strided


def _plain(x: Any) -> bool:
    """The common case of check_input: a float32 CPU strided tensor wanting no gradient."""
    return (
        type(x) is torch.Tensor
        and x.dtype is _F32
        and x.is_cpu
        and x.layout is _STRIDED
        and not (x.requires_grad and torch.is_grad_enabled())
    )


class BufferPool:
    """Output buffers reused across forward calls, per thread and slot.

    A fresh multi-MB output per layer costs about 1 ms of page faults at batch 64 on a
    2-core VM (more than a 98 %-sparse layer's arithmetic). The converter gives a layer a
    slot only when its output provably dies inside the same forward (every user is a layer
    or op that makes a new tensor, never a view or the model's output), and layers whose
    outputs are alive at the same time get different slots.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, int, torch.Size, int], torch.Tensor] = {}

    def get(self, slot: int, shape: torch.Size, pad: int = -1) -> torch.Tensor:
        """A float32 buffer of `shape` (N, C, H, W) for `slot`; with pad >= 0, the interior
        view [pad : pad + H, pad : pad + W] of a zeroed (N, C, H + 2 pad + 1, W + 2 pad)
        buffer followed by `PAD_SLACK` floats, whose border nobody writes (the C++ kernel
        then reads it in place as a consumer's padded input).

        Example:
            >>> v = BufferPool().get(0, torch.Size((1, 2, 3, 3)), pad=1)
            >>> v.shape, v.stride()
            (torch.Size([1, 2, 3, 3]), (60, 30, 5, 1))
        """
        key = (threading.get_ident(), slot, shape, pad)
        buf = self._bufs.get(key)
        if buf is None:
            if pad < 0:
                buf = torch.empty(shape, dtype=torch.float32)
            else:
                n, c, h, w = shape
                full = (n, c, h + 2 * pad + 1, w + 2 * pad)
                flat = torch.zeros(n * c * full[2] * full[3] + PAD_SLACK, dtype=torch.float32)
                base = flat[: n * c * full[2] * full[3]].view(full)
                buf = base[:, :, pad : pad + h, pad : pad + w]
            self._bufs[key] = buf
        return buf

    def __deepcopy__(self, memo: dict) -> BufferPool:
        return BufferPool()  # buffers are scratch space: a copy starts empty


class _SparseBase(InferenceOnly):
    """Shared parts: CSR buffers, mode, fused ReLU / residual flags, the dense fallback."""

    rowptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    weight: torch.Tensor
    _NDIM = 2  # entries of weight_shape
    _SHAPE_WORDS = "(out, in)"

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        rowptr: torch.Tensor,
        col_idx: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
        relu: bool = False,
        residual: bool = False,
        mode: str = "sparse",
        dense_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        shape = _check_weight_shape(weight_shape)
        if len(shape) != self._NDIM:
            raise ValueError(
                f"{type(self).__name__} needs weight_shape {self._SHAPE_WORDS}, got {list(shape)}"
            )
        check_csr(rowptr, col_idx, values, shape)
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
            if bias.numel() and (
                bias.dtype != torch.float32
                or bias.dim() != 1
                or bias.numel() != shape[0]
                or bias.device.type != "cpu"
                or bias.layout != torch.strided
            ):
                raise ValueError(
                    f"bias must be a 1-D float32 CPU tensor of the {shape[0]} outputs "
                    f"(weight_shape[0]), got {bias.dtype} of shape {list(bias.shape)} on "
                    f"{bias.device}"
                )
        if dense_weight is not None and (
            not isinstance(dense_weight, torch.Tensor) or tuple(dense_weight.shape) != shape
        ):
            got = (
                list(dense_weight.shape) if isinstance(dense_weight, torch.Tensor) else dense_weight
            )
            raise ValueError(f"dense_weight must have weight_shape {list(shape)}, got {got!r}")
        for flag, v in (("relu", relu), ("residual", residual)):
            if not isinstance(v, bool | int) or v not in (0, 1):
                raise ValueError(f"{flag} must be True or False, got {v!r}")
        self.weight_shape = shape
        self.register_buffer("rowptr", rowptr.contiguous())
        self.register_buffer("col_idx", col_idx.contiguous())
        self.register_buffer("values", values.contiguous())
        b = torch.zeros(0) if bias is None else bias.detach().contiguous()
        self.register_buffer("bias", b)
        # The dense weight exists only in dense mode (a sparse model is stored once, as CSR).
        self.register_buffer("weight", torch.zeros(0))
        self.relu = bool(relu)
        self.residual = bool(residual)
        self.pool: BufferPool | None = None
        self.slot: int | None = None
        # Set by the converter for chains of sparse convs (never saved: derived from the
        # graph): out_pad >= 0 writes the output into the interior of a zero-bordered
        # buffer (BufferPool.get(pad=...)), in_padded says the input comes that way, so
        # the kernel reads it in place instead of copying it into padded planes.
        self.out_pad = -1
        self.in_padded = False
        self.kernel_reason = ""  # why the C++ kernel cannot run this layer ("" if it can)
        self.source_name = ""  # the layer's name in the original model
        # input shape -> output shape, for the shapes the input checks accepted
        self._out_shapes: dict[torch.Size, torch.Size] = {}
        self._dense_cache: torch.Tensor | None = None
        # (data_ptr, version, numel) of the CSR tensors when check_csr last passed them
        # (the pure-torch fallback, which indexes with them unchecked)
        self._csr_seen: tuple | None = None
        self.mode = "sparse"
        if dense_weight is not None:
            self._dense_cache = dense_weight.detach().to(torch.float32).contiguous()

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs: Any
    ) -> Self:
        """Build from a dense weight, (out, in/groups, kh, kw) for a conv, (out, in) for a
        Linear; zeros are dropped from CSR. `kwargs`: the other constructor arguments."""
        rowptr, col, val = to_csr(weight)
        if bias is not None:
            bias = bias.detach().to(torch.float32)
        return cls(tuple(weight.shape), rowptr, col, val, bias, dense_weight=weight, **kwargs)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, residual)
        return self.compute(self.mode, x, residual)

    def compute(
        self, mode: str, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output in `mode` ("sparse" or "dense"), whatever the layer's own mode."""
        raise NotImplementedError

    # -- weights ------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        total = 1
        for s in self.weight_shape:
            total *= s
        return self.nnz / max(total, 1)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (built from CSR once and cached)."""
        if self.weight.numel():
            return self.weight
        if self._dense_cache is None:
            self._dense_cache = _from_csr(self.rowptr, self.col_idx, self.values, self.weight_shape)
        return self._dense_cache

    def _exact_weight(self) -> torch.Tensor:
        """The dense weight for an input holding NaN / inf (computed densely): the cached
        one if any, else rebuilt from CSR and NOT kept (a sparse model is stored once)."""
        if self.weight.numel():
            return self.weight
        if self._dense_cache is not None:
            return self._dense_cache
        return _from_csr(self.rowptr, self.col_idx, self.values, self.weight_shape)

    def _checked_csr(self) -> None:
        """check_csr again when a CSR tensor changed (in place or replaced) since the last
        pass: for code that indexes with them unchecked (torch's CSR kernels). Inference
        tensors have no version counter: those are checked every time."""
        try:
            key = tuple(
                (t.data_ptr(), t._version, t.numel())
                for t in (self.rowptr, self.col_idx, self.values)
            )
        except RuntimeError:  # "Inference tensors do not track version counter"
            key = None
        if key is None or key != self._csr_seen:
            check_csr(self.rowptr, self.col_idx, self.values, self.weight_shape)
            self._csr_seen = key

    def drop_dense_copy(self) -> None:
        """Free the cached dense weight of a sparse-mode layer (rebuilt if ever needed)."""
        if self.mode == "sparse":
            self._dense_cache = None

    def set_mode(self, mode: str) -> None:
        """Switch between "sparse" and "dense" (the weight is stored in that mode's form)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "sparse" and self.kernel_reason:
            raise ValueError(f"sparse mode is not available here: {self.kernel_reason}")
        if mode == self.mode and (mode == "sparse" or self.weight.numel()):
            return
        if mode == "dense":
            self.weight = self.dense_weight().contiguous()
        else:
            self.weight = torch.zeros(0)
            if _ext.extension() is not None:
                self._dense_cache = None  # CSR only: the sparse model is stored once
        self.mode = mode

    def _bias(self) -> torch.Tensor | None:
        return self.bias if self.bias.numel() else None

    def _epilogue(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is not None:
            y = y.add_(residual) if y.dtype == residual.dtype else y + residual
        return y.relu_() if self.relu else y  # relu_ keeps NaN

    def _check(self, x: Any, residual: Any) -> None:
        """Torch-like input checks, the same in every mode (a layer's mode is the
        autotune's choice: what it accepts must not depend on it). Written for the common
        case: about 0.4 us per call (0.8 us with a residual) at batch 1."""
        # check_input's common case, inlined (a call costs ~0.1 us)
        if not (
            type(x) is torch.Tensor
            and x.dtype is _F32
            and x.is_cpu
            and x.layout is _STRIDED
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            check_input(x, self, meta=False)  # raises with the reason (or passes a subclass)
        shape = x.shape
        out_shape = self._out_shapes.get(shape)
        if out_shape is None:
            out_shape = self._checked_shape(shape)
            if len(self._out_shapes) < 64:  # input sizes seen; bounded for odd callers
                self._out_shapes[shape] = out_shape
        if residual is None:
            if self.residual:
                raise InputTypeError(
                    f"{_who(self)} built with residual=True was called without a residual input"
                )
            return
        if not self.residual:
            raise InputTypeError(
                f"{_who(self)} built with residual=False was called with a residual input"
            )
        if not _plain(residual):
            check_input(residual, self, "residual", meta=False)
        if residual.shape != out_shape:
            raise InputShapeError(
                f"{_who(self)}: the residual has shape {list(residual.shape)}, the "
                f"output {list(out_shape)} (they are added elementwise)"
            )

    def _checked_shape(self, shape: torch.Size) -> torch.Size:
        """The output shape for an input of `shape`; raises as torch's module would."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The JSON-able constructor settings (for save / load)."""
        return {
            "weight_shape": list(self.weight_shape),
            "relu": self.relu,
            "residual": self.residual,
            "mode": self.mode,
            "has_bias": bool(self.bias.numel()),
        }

    def _extra(self) -> str:
        flags = "+relu" if self.relu else ""
        flags += "+residual" if self.residual else ""
        return f"mode={self.mode}, density={self.density:.4f}{', fused=' + flags if flags else ''}"


def _positive_pair(v: Any, name: str, low: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= low, as a pair (ValueError naming `name`)."""
    pair = (v, v) if _as_int(v) is not None else v
    ints = [_as_int(p) for p in pair] if isinstance(pair, tuple | list) else []
    if len(ints) != 2 or any(p is None or p < low for p in ints):
        raise ValueError(f"{name} must be an int >= {low} or a pair of them, got {v!r}")
    return ints[0], ints[1]  # type: ignore[return-value]


class SparseConv2d(_SparseBase):
    """`act(conv2d(x, W, bias, stride, padding) [+ residual])` with W stored as CSR.

    The C++ kernel handles groups=1, dilation 1, one stride and one zero padding for both
    axes (stride 1 fastest, any stride correct), each at most 65536. Anything else runs in
    dense mode only (`kernel_reason` says why). Inputs are (N, C, H, W).
    """

    _NDIM = 4
    _SHAPE_WORDS = "(out, in/groups, kh, kw)"

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        rowptr: torch.Tensor,
        col_idx: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        relu: bool = False,
        residual: bool = False,
        mode: str = "sparse",
        dense_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            weight_shape, rowptr, col_idx, values, bias, relu, residual, mode, dense_weight
        )
        stride_ = _positive_pair(stride, "stride", 1)
        dilation_ = _positive_pair(dilation, "dilation", 1)
        padding_: tuple[int, int] | str
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints >= 0, got {padding!r}")
            if padding == "same" and stride_ != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            padding_ = padding
        else:
            padding_ = _positive_pair(padding, "padding", 0)
        out = self.weight_shape[0]
        if _as_int(groups) is None or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        groups = int(groups)
        if out % groups:
            raise ValueError(
                f"groups={groups} must divide the {out} output channels (weight_shape[0])"
            )
        reasons = []
        if groups != 1:
            reasons.append(f"groups={groups} (the kernel needs groups=1)")
        if dilation_ != (1, 1):
            reasons.append(f"dilation={dilation_}")
        if stride_[0] != stride_[1]:
            reasons.append(f"stride={stride_} differs between axes")
        if isinstance(padding_, str) or padding_[0] != padding_[1]:
            reasons.append(f"padding={padding_!r} (the kernel needs one int for both axes)")
        geometry = (
            *stride_,
            *self.weight_shape[2:],
            *(() if isinstance(padding_, str) else padding_),
        )
        if max(geometry) > _MAX_GEOMETRY:
            reasons.append(f"stride / padding / kernel size above {_MAX_GEOMETRY}")
        self.stride, self.padding, self.dilation, self.groups = stride_, padding_, dilation_, groups
        self.kernel_reason = "; ".join(reasons)
        self.set_mode("dense" if self.kernel_reason else mode)

    def _checked_shape(self, shape: torch.Size) -> torch.Size:
        if len(shape) != 4:
            raise InputTypeError(
                f"{_who(self)}: expected a 4-D (N, C, H, W) input, got input of size {list(shape)}"
            )
        n, c, h, w = shape
        channels = self.weight_shape[1] * self.groups
        if c != channels:
            raise InputShapeError(
                f"{_who(self)}: given groups={self.groups}, weight of size "
                f"{list(self.weight_shape)}, expected input{list(shape)} to have {channels} "
                f"channels, but got {c} channels instead"
            )
        kh, kw = self.weight_shape[2:]
        if self.padding == "same":
            return (
                torch.Size((n, self.weight_shape[0], h, w)) if h and w else self._too_small(shape)
            )
        ph, pw = (0, 0) if self.padding == "valid" else self.padding  # type: ignore[misc]
        dh, dw = self.dilation
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        if h < 1 or w < 1 or h + 2 * ph < span_h or w + 2 * pw < span_w:
            return self._too_small(shape)
        sh, sw = self.stride
        return torch.Size(
            (
                n,
                self.weight_shape[0],
                (h + 2 * ph - span_h) // sh + 1,
                (w + 2 * pw - span_w) // sw + 1,
            )
        )

    def _too_small(self, shape: torch.Size) -> torch.Size:
        ph, pw = (0, 0) if isinstance(self.padding, str) else self.padding
        kh, kw = self.weight_shape[2:]
        raise InputShapeError(
            f"{_who(self)}: calculated padded input size per channel: "
            f"({shape[2] + 2 * ph} x {shape[3] + 2 * pw}). Kernel size: ({kh} x {kw}). "
            f"Kernel size can't be greater than actual input size (input {list(shape)})"
        )

    def compute(
        self, mode: str, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output in `mode` ("sparse" or "dense"), whatever the layer's own mode (the
        autotune times both this way); no input checks (forward makes them)."""
        if mode == "sparse" and not self.kernel_reason:
            ext = _ext.extension()
            if ext is not None:
                out = _EMPTY
                if self.pool is not None and self.slot is not None:
                    shape = self._out_shapes.get(x.shape)
                    if shape is None:
                        shape = self._out_shapes[x.shape] = self.output_shape(x.shape)
                    out = self.pool.get(self.slot, shape, self.out_pad)
                y, finite, finite_weights = ext.sparse_conv2d(
                    x,
                    self.rowptr,
                    self.col_idx,
                    self.values,
                    self.bias,
                    self.weight_shape[1],
                    self.weight_shape[2],
                    self.weight_shape[3],
                    self.stride[0],
                    self.padding[0],  # type: ignore[index]
                    _EMPTY if residual is None else residual,
                    self.relu,
                    out,
                    self.in_padded,
                    # read in place from a buffer marked below: no NaN / inf scan needed
                    self.in_padded and getattr(x, _FINITE_MARK, False),
                )
                if out is not _EMPTY:
                    # A pool buffer (internal to the model) made from a finite input, finite
                    # weights and a finite residual holds no NaN / inf (float32 overflow
                    # aside): marked, so that a conv reading it in place skips its scan.
                    setattr(
                        out,
                        _FINITE_MARK,
                        finite
                        and finite_weights
                        and (residual is None or getattr(residual, _FINITE_MARK, False)),
                    )
                if finite:
                    return y
                # a NaN / inf in the input: the dense conv also multiplies it by the zero
                # weights (NaN); compute exactly that
                return self._dense(x, self._exact_weight(), residual)
        # dense mode, or the pure-torch fallback of sparse mode (dense too: exact for NaN)
        return self._dense(x, self.dense_weight(), residual)

    def _dense(
        self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        y = F.conv2d(x, weight, self._bias(), self.stride, self.padding, self.dilation, self.groups)
        return self._epilogue(y, residual)

    def output_shape(self, shape: torch.Size) -> torch.Size:
        """(N, out, Ho, Wo) for an (N, C, H, W) input (kernel-eligible layers)."""
        n, _, h, w = shape
        kh, kw = self.weight_shape[2], self.weight_shape[3]
        p, s = self.padding[0], self.stride[0]  # type: ignore[index]
        return torch.Size(
            (n, self.weight_shape[0], (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1)
        )

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight_shape
        geometry = f"kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}"
        return f"{i}, {o}, {geometry}, {self._extra()}"


class SparseLinear(_SparseBase):
    """`act(x @ W.T + bias)` with W (out, in) stored as CSR; x may have extra leading dims."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        rowptr: torch.Tensor,
        col_idx: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
        relu: bool = False,
        residual: bool = False,
        mode: str = "sparse",
        dense_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            weight_shape, rowptr, col_idx, values, bias, relu, residual, mode, dense_weight
        )
        self.set_mode(mode)

    def _checked_shape(self, shape: torch.Size) -> torch.Size:
        out, fan_in = self.weight_shape
        if len(shape) < 1:
            raise InputTypeError(
                f"{_who(self)}: the input must be at least 1-D (..., {fan_in}), got a 0-D tensor"
            )
        if shape[-1] != fan_in:
            rows = math.prod(shape[:-1])
            raise InputShapeError(
                f"{_who(self)}: mat1 and mat2 shapes cannot be multiplied ({rows}x{shape[-1]} "
                f"and {fan_in}x{out}): the input's last dimension is {shape[-1]}, the layer "
                f"has in_features={fan_in}"
            )
        return torch.Size((*shape[:-1], out))

    def compute(
        self, mode: str, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output in `mode` ("sparse" or "dense"), whatever the layer's own mode."""
        if mode == "sparse":
            lead = x.shape[:-1]
            flat = x.reshape(-1, x.shape[-1])
            ext = _ext.extension()
            if ext is not None:
                fuse = self.relu and residual is None
                y, finite = ext.sparse_linear(
                    flat.contiguous(),
                    self.rowptr,
                    self.col_idx,
                    self.values,
                    self.bias,
                    self.weight_shape[1],
                    fuse,
                )
                if finite:
                    y = y.reshape(*lead, self.weight_shape[0])
                    return y if fuse else self._epilogue(y, residual)
            elif bool(torch.isfinite(flat).all()):
                y = self._torch_sparse_mm(flat).reshape(*lead, self.weight_shape[0])
                return self._epilogue(y, residual)
            # a NaN / inf in the input: the dense product also multiplies it by the zero
            # weights (NaN); compute exactly that
            return self._epilogue(F.linear(x, self._exact_weight(), self._bias()), residual)
        return self._epilogue(F.linear(x, self.dense_weight(), self._bias()), residual)

    def _torch_sparse_mm(self, flat: torch.Tensor) -> torch.Tensor:
        """Fallback without the C++ kernels: torch's CSR x dense."""
        self._checked_csr()  # torch's CSR product indexes with them unchecked
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            w = torch.sparse_csr_tensor(
                self.rowptr.to(torch.int64),
                self.col_idx.to(torch.int64),
                self.values,
                size=self.weight_shape,
                check_invariants=False,  # checked just above
            )
        y = torch.sparse.mm(w, flat.t()).t()
        return y + self.bias if self.bias.numel() else y.contiguous()

    def extra_repr(self) -> str:
        o, i = self.weight_shape
        return f"in_features={i}, out_features={o}, {self._extra()}"


POLICIES = ("auto", "blocked", "spatial")
CHAIN_MODES = ("fused", "layers")
# SparseChainExec.forward's status (ChainStatus in the C++)
_EXACT, _NONFINITE, _STALE = 0, 1, 2


class SparseChain(InferenceOnly):
    """A run of `SparseConv2d` layers executed in ONE C++ call (the "chain executor").

    `steps[k] = (in, res)`: layer k reads value `in` and adds value `res` (-1: none) in its
    epilogue; value 0 is the chain's input, value k + 1 is layer k's output; `output` is
    the value returned. The converter builds chains from the fx graph (a ResNet's whole
    convolutional trunk is one chain, a VGG block between two poolings another).

    Modes: "fused" runs the executor: groups of 16 images in a batch-interleaved layout
    (aligned AVX-512 strips, epilogue in registers), images left over one by one with the
    NCHW kernel, every group/image depth-first through the whole chain in one thread (no
    per-layer Python, allocation or fork/join). "layers" calls the layers one by one in
    their own modes (what the autotune compares against; also the path without the C++
    kernels). `policy` ("auto", "blocked", "spatial") forces one layout of the executor
    (tests); "auto" puts full groups of 16 in the blocked layout and the rest spatial.
    Inside a group, consecutive stride-1 convs that keep the map size (a ResNet stage) run
    as a row-band wavefront: each conv computes the next two rows its inputs already have,
    so values are read back while still in L2 (`wavefront = False`: conv after conv).

    The executor checks the layers' arrays once when it is built and copies their index
    arrays; an in-place write to a layer's tensors makes the next call build (and check)
    it again. An input holding NaN / inf, or NaN / inf weights or biases, run layer by
    layer instead (each conv such a value reaches computes densely, as the dense masked
    model); an activation overflowing float32 inside the chain is seen only where it
    reaches the chain's output.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> c1, c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = c2.weight.mul_(torch.rand_like(c2.weight) < 0.2)
        >>> layers = [SparseConv2d.from_dense(c.weight, c.bias, padding=1, relu=True)
        ...           for c in (c1, c2)]
        >>> chain = SparseChain(layers, [(0, -1), (1, -1)], output=2)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> want = c2(c1(x).relu()).relu()
        >>> torch.allclose(chain(x), want, atol=1e-5)
        True
    """

    def __init__(
        self,
        layers: list[SparseConv2d],
        steps: list[tuple[int, int]],
        output: int,
        mode: str = "fused",
    ) -> None:
        super().__init__()
        if len(layers) != len(steps) or not layers:
            raise ValueError("a chain needs one (in, res) step per layer, and at least one layer")
        # channels of each value (value 0, the input: what its readers expect)
        channels: list[int] = [0]
        for k, (layer, step) in enumerate(zip(layers, steps, strict=True)):
            if not isinstance(layer, SparseConv2d) or layer.kernel_reason:
                raise ValueError(f"chain layer {k} is not a kernel-eligible SparseConv2d")
            if (
                not isinstance(step, tuple | list)
                or len(step) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in step)
            ):
                raise ValueError(f"chain step {k} must be a pair of ints (in, res), got {step!r}")
            src, res = step
            if not (0 <= src <= k and -1 <= res <= k):
                raise ValueError(f"chain layer {k} reads a value computed after it: {(src, res)}")
            if layer.residual != (res >= 0):
                raise ValueError(f"chain layer {k}: residual flag and step disagree")
            o, c = layer.weight_shape[:2]
            if src == 0 and not channels[0]:
                channels[0] = c
            if channels[src] != c:
                raise ValueError(
                    f"chain layer {k} reads value {src} ({channels[src]} channels) but its "
                    f"weight {list(layer.weight_shape)} expects {c} input channels"
                )
            if res == 0 and not channels[0]:
                channels[0] = o
            if res >= 0 and channels[res] != o:
                raise ValueError(
                    f"chain layer {k} adds value {res} ({channels[res]} channels) to its {o} "
                    "output channels"
                )
            channels.append(o)
        if isinstance(output, bool) or not isinstance(output, int):
            raise ValueError(f"output must be an int, got {output!r}")
        if not 1 <= output <= len(layers):
            raise ValueError(f"output must name a layer's value (1..{len(layers)}), got {output}")
        self.layers = nn.ModuleList(layers)
        self.steps = [(int(a), int(b)) for a, b in steps]
        self.output = int(output)
        self.policy = "auto"
        # with fewer image groups than threads (batch 1), ops of at least this many MACs
        # split their output channels between threads; -1: never (set by the autotune)
        self.split_work = -1
        # same-size runs of convs as row-band wavefronts (values read back while in L2);
        # False: conv after conv (the same result; for comparison)
        self.wavefront = True
        self.name = ""  # unique in the converted model (LayerDecision.chain refers to it)
        self.fused_ms: float | None = None  # autotune times of the whole chain
        self.layers_ms: float | None = None
        self.mode = "fused"
        self.set_mode(mode)
        self._exec: Any = None
        self._out_shapes: dict[torch.Size, torch.Size] = {}
        # output buffer slot (set by the converter when the output dies inside the graph)
        self.pool: BufferPool | None = None
        self.slot: int | None = None

    def output_shape(self, shape: torch.Size) -> torch.Size:
        """The (N, C, H, W) output shape for an input of `shape`; raises as torch's modules
        would (InputTypeError / InputShapeError) for an input the chain cannot take."""
        out = self._out_shapes.get(shape)
        if out is None:
            if len(shape) != 4:
                raise InputTypeError(
                    f"{_who(self)}: a SparseChain takes one (N, C, H, W) tensor, got input of "
                    f"size {list(shape)}"
                )
            shapes = [shape]
            for layer, (src, res) in zip(self.layers, self.steps, strict=True):
                y = layer._checked_shape(shapes[src])
                if res >= 0 and shapes[res] != y:  # a residual read from the input
                    raise InputShapeError(
                        f"{_who(layer)} in {_who(self)} adds value {res} of shape "
                        f"{list(shapes[res])} to its output of shape {list(y)}"
                    )
                shapes.append(y)
            out = shapes[self.output]
            if len(self._out_shapes) < 64:  # input sizes seen; bounded for odd callers
                self._out_shapes[shape] = out
        return out

    def set_mode(self, mode: str) -> None:
        if mode not in CHAIN_MODES:
            raise ValueError(f"chain mode must be one of {CHAIN_MODES}, got {mode!r}")
        self.mode = mode

    def _executor(self) -> Any:
        ext = _ext.extension()
        if ext is None:
            return None
        if self._exec is None:
            specs, rps, cols, vals, biases = [], [], [], [], []
            for layer, (src, res) in zip(self.layers, self.steps, strict=True):
                o, c, kh, kw = layer.weight_shape
                specs.append(
                    [src, res, o, c, kh, kw, layer.stride[0], layer.padding[0], int(layer.relu)]  # type: ignore[index]
                )
                rps.append(layer.rowptr)
                cols.append(layer.col_idx)
                vals.append(layer.values)
                biases.append(layer.bias)
            # checks every array (and copies the index arrays): raises on bad ones
            self._exec = ext.SparseChainExec(rps, cols, vals, biases, specs, self.output)
        return self._exec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self, meta=False)
        self.output_shape(x.shape)  # rank, channels, sizes (cached per input shape)
        return self.compute(self.mode, x)

    def compute(self, mode: str, x: torch.Tensor) -> torch.Tensor:
        """The output in `mode` ("fused" or "layers"), whatever the chain's own mode."""
        if mode == "fused":
            ex = self._executor()
            if ex is not None:
                if self.policy not in POLICIES:
                    raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
                out = None
                if self.pool is not None and self.slot is not None:
                    out = self.pool.get(self.slot, self.output_shape(x.shape))
                policy = POLICIES.index(self.policy)
                y, status = ex.forward(x, policy, self.split_work, out, self.wavefront)
                if status == _STALE:
                    # a layer's rowptr / col_idx was written in place (or values / bias
                    # moved) since the executor was built: build (and check) it again
                    self._exec = None
                    ex = self._executor()
                    y, status = ex.forward(x, policy, self.split_work, out, self.wavefront)
                if status == _EXACT:
                    return y
                # a NaN / inf reached a conv's input (status _NONFINITE): layer by layer,
                # each computing such an input densely, as the dense masked model does
        values = [x]
        for layer, (src, res) in zip(self.layers, self.steps, strict=True):
            # a module call (not .compute): the autotune's hooks see each layer's input
            values.append(layer(values[src], None if res < 0 else values[res]))
        return values[self.output]

    def __getstate__(self) -> dict[str, Any]:
        # the C++ executor holds raw pointers into this module's tensors: never copied or
        # pickled, rebuilt on the next call (deepcopy and pickle both come through here)
        state = self.__dict__.copy()
        state["_exec"] = None
        return state

    def extra_repr(self) -> str:
        return f"{len(self.layers)} convs, output=value {self.output}, mode={self.mode}"
