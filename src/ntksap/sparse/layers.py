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
`values` (float32, nnz), over the weight reshaped to (out_features, fan_in).

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

import threading
import warnings
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from ntksap.sparse import _ext

__all__ = ["BufferPool", "SparseChain", "SparseConv2d", "SparseLinear", "to_csr"]

MODES = ("sparse", "dense")
# "no tensor" for the kernels' optional arguments; never written to (the kernels allocate
# instead of writing into an unusable `out`)
_EMPTY = torch.empty(0)
# readable floats after a padded buffer (>= kSlack in csrc/sparse_kernels.cpp: strips of
# discarded "wide" outputs read a little past the last plane)
PAD_SLACK = 256


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


def _from_csr(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """The dense (rows, cols) matrix of a CSR triple."""
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


def check_input(x: torch.Tensor) -> None:
    """The input checks of the sparse layers: float32, and no gradient wanted."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "ntksap.sparse modules are inference-only: the input requires grad; run "
            "under torch.no_grad() / torch.inference_mode(), or train the masked dense model"
        )
    if x.dtype != torch.float32:
        raise TypeError(f"ntksap.sparse computes in float32, got input of dtype {x.dtype}")


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
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.register_buffer("rowptr", rowptr.to(torch.int32).contiguous())
        self.register_buffer("col_idx", col_idx.to(torch.int32).contiguous())
        self.register_buffer("values", values.to(torch.float32).contiguous())
        b = torch.zeros(0) if bias is None else bias.detach().to(torch.float32).contiguous()
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
        self._out_shapes: dict[torch.Size, torch.Size] = {}
        self._dense_cache: torch.Tensor | None = None
        self.mode = "sparse"
        if dense_weight is not None:
            self._dense_cache = dense_weight.detach().to(torch.float32).contiguous()
        self.set_mode(mode)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs: Any
    ) -> Self:
        """Build from a dense weight, (out, in/groups, kh, kw) for a conv, (out, in) for a
        Linear; zeros are dropped from CSR. `kwargs`: the other constructor arguments."""
        rowptr, col, val = to_csr(weight)
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
        return y.relu_() if self.relu else y

    def _check(self, x: torch.Tensor, residual: torch.Tensor | None) -> None:
        check_input(x)
        if self.residual != (residual is not None):
            raise TypeError(
                f"{type(self).__name__} built with residual={self.residual} was called "
                f"{'without' if residual is None else 'with'} a residual input"
            )

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


class SparseConv2d(_SparseBase):
    """`act(conv2d(x, W, bias, stride, padding) [+ residual])` with W stored as CSR.

    The C++ kernel handles groups=1, dilation 1, one stride and one zero padding for both
    axes (stride 1 fastest, any stride correct). Anything else runs in dense mode only
    (`kernel_reason` says why).
    """

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
        stride_ = tuple(int(s) for s in _pair(stride))
        padding_ = padding if isinstance(padding, str) else tuple(int(p) for p in _pair(padding))
        dilation_ = tuple(int(d) for d in _pair(dilation))
        reasons = []
        if groups != 1:
            reasons.append(f"groups={groups} (the kernel needs groups=1)")
        if dilation_ != (1, 1):
            reasons.append(f"dilation={dilation_}")
        if stride_[0] != stride_[1]:
            reasons.append(f"stride={stride_} differs between axes")
        if isinstance(padding_, str) or padding_[0] != padding_[1]:
            reasons.append(f"padding={padding_!r} (the kernel needs one int for both axes)")
        reason = "; ".join(reasons)
        super().__init__(
            weight_shape,
            rowptr,
            col_idx,
            values,
            bias,
            relu,
            residual,
            "dense" if reason else mode,
            dense_weight,
        )
        self.stride, self.padding, self.dilation, self.groups = stride_, padding_, dilation_, groups
        self.kernel_reason = reason

    def compute(
        self, mode: str, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output in `mode` ("sparse" or "dense"), whatever the layer's own mode (the
        autotune times both this way); no input checks."""
        if mode == "sparse" and not self.kernel_reason:
            ext = _ext.extension()
            if ext is not None:
                out = _EMPTY
                if self.pool is not None and self.slot is not None:
                    shape = self._out_shapes.get(x.shape)
                    if shape is None:
                        shape = self._out_shapes[x.shape] = self.output_shape(x.shape)
                    out = self.pool.get(self.slot, shape, self.out_pad)
                return ext.sparse_conv2d(
                    x,
                    self.rowptr,
                    self.col_idx,
                    self.values,
                    self.bias,
                    self.weight_shape[2],
                    self.weight_shape[3],
                    self.stride[0],
                    self.padding[0],  # type: ignore[index]
                    _EMPTY if residual is None else residual,
                    self.relu,
                    out,
                    self.in_padded,
                )
        # dense mode, or the pure-torch fallback of sparse mode
        y = F.conv2d(
            x,
            self.dense_weight(),
            self._bias(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
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
                y = ext.sparse_linear(
                    flat.contiguous(), self.rowptr, self.col_idx, self.values, self.bias, fuse
                ).reshape(*lead, self.weight_shape[0])
                return y if fuse else self._epilogue(y, residual)
            y = self._torch_sparse_mm(flat).reshape(*lead, self.weight_shape[0])
            return self._epilogue(y, residual)
        return self._epilogue(F.linear(x, self.dense_weight(), self._bias()), residual)

    def _torch_sparse_mm(self, flat: torch.Tensor) -> torch.Tensor:
        """Fallback without the C++ kernels: torch's CSR x dense."""
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            w = torch.sparse_csr_tensor(
                self.rowptr.to(torch.int64),
                self.col_idx.to(torch.int64),
                self.values,
                size=self.weight_shape,
                check_invariants=False,  # built by to_csr: valid by construction
            )
        y = torch.sparse.mm(w, flat.t()).t()
        return y + self.bias if self.bias.numel() else y.contiguous()

    def extra_repr(self) -> str:
        o, i = self.weight_shape
        return f"in_features={i}, out_features={o}, {self._extra()}"


def _pair(v: Any) -> tuple:
    if isinstance(v, str):
        return (v, v)
    if isinstance(v, int):
        return (v, v)
    return tuple(v)


POLICIES = ("auto", "blocked", "spatial")
CHAIN_MODES = ("fused", "layers")


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
        for k, (layer, (src, res)) in enumerate(zip(layers, steps, strict=True)):
            if not isinstance(layer, SparseConv2d) or layer.kernel_reason:
                raise ValueError(f"chain layer {k} is not a kernel-eligible SparseConv2d")
            if not (0 <= src <= k and -1 <= res <= k):
                raise ValueError(f"chain layer {k} reads a value computed after it: {(src, res)}")
            if layer.residual != (res >= 0):
                raise ValueError(f"chain layer {k}: residual flag and step disagree")
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
        """The (N, C, H, W) output shape for an input of `shape`."""
        out = self._out_shapes.get(shape)
        if out is None:
            shapes = [shape]
            for layer, (src, _res) in zip(self.layers, self.steps, strict=True):
                shapes.append(layer.output_shape(shapes[src]))
            out = self._out_shapes[shape] = shapes[self.output]
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
            self._exec = ext.SparseChainExec(rps, cols, vals, biases, specs, self.output)
        return self._exec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() != 4:
            raise TypeError("a SparseChain takes one (N, C, H, W) tensor")
        check_input(x)
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
                return ex.forward(
                    x, POLICIES.index(self.policy), self.split_work, out, self.wavefront
                )
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
