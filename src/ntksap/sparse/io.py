"""`save` / `load` of a converted `SparseModel` as one safetensors file (no pickle).

The tensors: per sparse layer its CSR arrays (`rowptr`, `col_idx`, `values`) and `bias`
(a dense-mode layer is stored as CSR too and densified on load), plus the state of every
other module (BatchNorm that was not folded, ...). The safetensors metadata holds, under
"ntksap.sparse", a JSON description of the structure:

- `{"kind": "conv" | "linear", "config": {...}}` for `SparseConv2d` / `SparseLinear`;
- `{"kind": "chain", "layers": [...], "steps": [[in, res], ...], "output": k, ...}` for a
  `SparseChain` (its convs, how they connect, the autotuned mode);
- `{"kind": "graph", "nodes": [...], "modules": {target: spec}}` for a traced part: the
  torch.fx graph, node by node (op, target, args);
- `{"kind": "torch", "class": "MaxPool2d", "init": {...}}` for an allow-listed torch.nn
  module (pooling, activations, BatchNorm, Flatten, Dropout, Identity, Conv2d, Linear);
- `{"kind": "python", "children": {...}}` for a module torch.fx could not trace (it keeps its
  own Python forward, e.g. the zoo MLP with its input check). Such a model can only be
  rebuilt from the zoo: the file then records the `ntksap.models` name and keywords, and
  `load` builds that model and puts the converted children in. `save` refuses (with a clear
  error) a non-zoo model that needs this.

The decisions of the autotune are kept too (`module.summary()` after load shows them); the
layers keep the mode (sparse / dense) chosen at conversion.

`load` treats the file as data, never as code, and checks every size before allocating:

- the JSON is checked field by field (types, ranges, unknown keys, nesting depth, list
  lengths); every tensor in the file must be one the structure names, with the dtype and
  shape that structure implies (a CSR triple must agree with its `weight_shape`: rowptr
  starts at 0, never decreases and ends at nnz, 0 <= column < fan-in, columns increase
  within a row);
- a graph is rebuilt through torch.fx's Graph API from validated parts only: node names,
  placeholder names, module / attribute paths and keyword names are plain identifiers,
  functions come from an allow-list by name, tensor methods from an allow-list of methods
  that take no sizes from the file (no `new_ones`, `repeat`, `expand`, ...), `getattr` only
  reads `shape` / `ndim` / `dtype`, arguments are numbers, short identifier-like strings,
  dtypes, slices and references to earlier nodes. The code torch.fx generates from such a
  graph contains only those identifiers;
- "torch" modules are built on the meta device and their parameter / buffer shapes compared
  with the stored tensors before these are put in; the zoo model of a "python" part is built
  on the meta device (its keywords allocate nothing, whatever sizes they name), its class,
  children and own tensors compared with the file's, and it is then given the file's
  tensors and converted children: the zoo's own layers are never allocated, so a compacted
  model (narrower than its zoo keywords say) loads too;
- what load allocates beyond the stored tensors (dense weights of dense-mode layers) is at
  most max(`LOAD_FLOOR`, `LOAD_FACTOR` x the stored elements);
- at the first call with each input signature, the loaded model is run once on the meta
  device: every node's output (and the im2col buffer of every conv) counts, and the peak of
  what is alive at once must stay below max(`CALL_FLOOR`, `CALL_FACTOR` x (input elements +
  stored elements)), so no graph can amplify its input into an allocation bomb. Later calls
  with the same shapes only look the signature up (about 1 us per call; the first check in
  a process also imports torch's meta kernels, about 1 s once). The check sits on the
  loaded root, or, for a zoo model's own Python forward, on each module that forward calls.

Every malformed file is a ValueError naming the field or tensor and the rule (or a
FileNotFoundError); a call that the check refuses is a ValueError, a shape mismatch the
RuntimeError / TypeError torch would give.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from ntksap.sparse.convert import convert
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    >>> fast = convert(net, example_input=torch.randn(2, 4), autotune=False)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     back = load(save(fast, f"{d}/net.safetensors"))
    >>> x = torch.randn(5, 4)
    >>> torch.equal(back(x), fast(x))
    True
"""

from __future__ import annotations

import builtins
import inspect
import itertools
import json
import keyword
import math
import operator
import os
import re
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import fx, nn

from ntksap.sparse import _ext
from ntksap.sparse.convert import LayerDecision, SparseModel, _assign_buffers, decisions_json
from ntksap.sparse.layers import (
    CHAIN_MODES,
    MODES,
    POLICIES,
    SparseChain,
    SparseConv2d,
    SparseLinear,
    _SparseBase,
    check_input,
)

__all__ = ["CALL_FACTOR", "CALL_FLOOR", "FORMAT", "LOAD_FACTOR", "LOAD_FLOOR", "load", "save"]

FORMAT = "ntksap.sparse/1"
_META_KEY = "ntksap.sparse"

# -- limits on what a file may describe ----------------------------------------------------
# elements (not bytes) load may allocate beyond the stored tensors: the larger of the floor
# and the factor times the file's stored elements (a 99 %-sparse dense-mode layer needs
# ~50x: values + col_idx per non-zero against the whole dense weight)
LOAD_FLOOR = 1 << 24
LOAD_FACTOR = 64
# peak elements alive in one call: the larger of the floor and the factor times (input
# elements + stored elements); VGG on 32x32 images peaks near 200x its input (im2col)
CALL_FLOOR = 1 << 24
CALL_FACTOR = 256
_MAX_META_CHARS = 16 << 20  # ResNet-110 needs ~0.1 MB
_MAX_JSON_DEPTH = 48
_MAX_JSON_VALUES = 1_000_000
_MAX_LIST = 100_000  # nodes, layers, decisions, children, ...
_MAX_ARG_LIST = 4096  # one list / tuple inside a node's arguments
_MAX_ARG_DEPTH = 12
_MAX_INT = 1 << 62  # ints in graph arguments (fx writes them as literals)
_MAX_DIM = (1 << 31) - 1  # one size: int32 column indices in the kernels
_MAX_TEXT = 1000  # free text (reasons, source names)
_MAX_ZOO_LIST = 64
_SIGNATURES_KEPT = 64  # input signatures a loaded module remembers as checked

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
_PATH_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}|[0-9]{1,9}")
_DATA_STR = re.compile(r"[A-Za-z0-9_]{0,64}")

_FUNCTIONS: dict[str, Any] = {
    "operator.add": operator.add,
    "operator.iadd": operator.iadd,
    "operator.mul": operator.mul,
    "operator.getitem": operator.getitem,
    "builtins.getattr": builtins.getattr,
    "torch.add": torch.add,
    "torch.mul": torch.mul,
    "torch.cat": torch.cat,
    "torch.flatten": torch.flatten,
    "torch.reshape": torch.reshape,
    "torch.relu": torch.relu,
    "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh,
    "torch.mean": torch.mean,
    "torch.sum": torch.sum,
    "F.relu": F.relu,
    "F.gelu": F.gelu,
    "F.softmax": F.softmax,
    "F.log_softmax": F.log_softmax,
    "F.dropout": F.dropout,
    "F.max_pool2d": F.max_pool2d,
    "F.avg_pool2d": F.avg_pool2d,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.adaptive_max_pool2d": F.adaptive_max_pool2d,
}
_FUNCTION_NAMES = {id(f): name for name, f in _FUNCTIONS.items()}
# what `getattr(tensor, name)` may read (torch.fx records `x.shape` that way)
_GETATTR_NAMES = frozenset({"shape", "ndim", "dtype"})
# Tensor methods a graph may call: shape changes that keep the element count, elementwise
# maths, reductions, splits. Nothing that takes a size to allocate (new_ones, new_zeros,
# new_empty, new_full, repeat, expand, resize_, ...), changes device, or reads raw memory.
_METHODS = frozenset(
    {
        "size", "dim", "numel", "view", "reshape", "flatten", "unflatten", "squeeze",
        "unsqueeze", "permute", "transpose", "t", "contiguous", "chunk", "split", "view_as",
        "reshape_as", "expand_as", "relu", "relu_", "sigmoid", "tanh", "softmax",
        "log_softmax", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "pow", "clamp",
        "clamp_min", "clamp_max", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
        "mean", "sum", "amax", "amin", "float",
    }
)  # fmt: skip
_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
        "uint8", "bool",
    )
}  # fmt: skip
# safetensors' dtype names
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_TORCH_MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.GELU,
        nn.Sigmoid,
        nn.Tanh,
        nn.Softmax,
        nn.Identity,
        nn.Flatten,
        nn.Dropout,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.Conv2d,
        nn.Linear,
    )
}
_CONTAINERS = {"Sequential": nn.Sequential, "ModuleList": nn.ModuleList}
_GRAPH_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
# names a placeholder (a parameter of the generated forward) must not shadow: globals and
# builtins the code torch.fx generates refers to (fx's own namespace keeps node names apart)
_RESERVED = frozenset(
    {
        "self", "torch", "inf", "nan", "device", "NoneType", "fx_pytree", "pytree",
        "operator", "builtins", "getattr", "slice", "Ellipsis",
    }
)  # fmt: skip


# -- save -----------------------------------------------------------------------------------


class _Writer:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, key: str, t: torch.Tensor) -> str:
        self.tensors[key] = t.detach().cpu().contiguous().clone()
        return key

    def spec(self, module: nn.Module, prefix: str, zoo: bool) -> dict[str, Any]:
        if isinstance(module, _SparseBase):
            for name in ("rowptr", "col_idx", "values", "bias"):
                self.put(prefix + name, getattr(module, name))
            kind = "conv" if isinstance(module, SparseConv2d) else "linear"
            return {
                "kind": kind,
                "prefix": prefix,
                "config": {**module.config(), "source_name": module.source_name},
            }
        if isinstance(module, SparseChain):
            return {
                "kind": "chain",
                "name": module.name,
                "layers": [
                    self.spec(layer, f"{prefix}layers.{i}.", zoo)
                    for i, layer in enumerate(module.layers)
                ],
                "steps": [list(step) for step in module.steps],
                "output": module.output,
                "mode": module.mode,
                "split_work": module.split_work,
                "policy": module.policy,
                "fused_ms": module.fused_ms,
                "layers_ms": module.layers_ms,
            }
        if isinstance(module, fx.GraphModule):
            nodes = [_encode_node(n) for n in module.graph.nodes]
            targets = {n.target for n in module.graph.nodes if n.op == "call_module"}
            attrs = {n.target for n in module.graph.nodes if n.op == "get_attr"}
            for t in attrs:
                value = _get_path(module, t)
                if not torch.is_tensor(value):
                    raise ValueError(f"cannot save graph attribute {t!r} ({type(value).__name__})")
                self.put(prefix + t, value)
            return {
                "kind": "graph",
                "prefix": prefix,
                "nodes": nodes,
                "modules": {
                    t: self.spec(module.get_submodule(t), f"{prefix}{t}.", zoo) for t in targets
                },
                "attrs": sorted(attrs),
            }
        name = type(module).__name__
        if type(module) in _TORCH_MODULES.values():
            for k, v in module.state_dict().items():
                self.put(prefix + k, v)
            return {"kind": "torch", "class": name, "init": _init_args(module), "prefix": prefix}
        children = {n: self.spec(c, f"{prefix}{n}.", zoo) for n, c in module.named_children()}
        if type(module) in _CONTAINERS.values():
            return {"kind": "container", "class": name, "children": children}
        if not zoo:
            raise ValueError(
                f"cannot save: module {prefix.rstrip('.') or '<model>'} of class "
                f"{type(module).__qualname__} could not be traced by torch.fx, so rebuilding it "
                "needs its Python class; this works only for ntksap.models zoo models. Make "
                "its forward traceable (no data-dependent Python control flow) and convert again"
            )
        own = {**module._parameters, **module._buffers}
        for k, v in own.items():
            if v is not None:
                self.put(prefix + k, v)
        return {
            "kind": "python",
            "class": type(module).__qualname__,
            "children": children,
            "own": sorted(k for k, v in own.items() if v is not None),
            "prefix": prefix,
        }


def _get_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _init_args(module: nn.Module) -> dict[str, Any]:
    """The constructor keywords of an allow-listed torch.nn module, read off its attributes."""
    out: dict[str, Any] = {}
    for p in list(inspect.signature(type(module).__init__).parameters)[1:]:
        if p in ("device", "dtype") or not hasattr(module, p):
            continue
        v = getattr(module, p)
        if p == "bias" and (v is None or torch.is_tensor(v)):
            v = v is not None  # Conv2d / Linear / BatchNorm take bias as a flag
        out[p] = _encode_arg(v)
    return out


def _encode_arg(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"__node__": a.name}
    if isinstance(a, tuple):
        return {"__tuple__": [_encode_arg(x) for x in a]}
    if isinstance(a, list):
        return [_encode_arg(x) for x in a]
    if isinstance(a, dict):
        return {"__dict__": {k: _encode_arg(v) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"__slice__": [_encode_arg(a.start), _encode_arg(a.stop), _encode_arg(a.step)]}
    if isinstance(a, torch.dtype):
        return {"__dtype__": str(a).removeprefix("torch.")}
    if a is Ellipsis:
        return {"__ellipsis__": True}
    if a is None or isinstance(a, bool | int | float | str):
        return a
    raise ValueError(f"cannot save an argument of type {type(a).__name__} in the graph: {a!r}")


def _encode_node(n: fx.Node) -> dict[str, Any]:
    target: Any = n.target
    if n.op == "call_function":
        name = _FUNCTION_NAMES.get(id(n.target))
        if name is None:
            raise ValueError(
                f"cannot save the graph: function {getattr(n.target, '__name__', n.target)!r} "
                f"is not in the allow-list ({', '.join(sorted(_FUNCTIONS))})"
            )
        target = name
    elif n.op == "call_method" and target not in _METHODS:
        raise ValueError(
            f"cannot save the graph: tensor method {target!r} (node {n.name}) is not in the "
            f"allow-list ({', '.join(sorted(_METHODS))})"
        )
    return {
        "name": n.name,
        "op": n.op,
        "target": target,
        "args": _encode_arg(tuple(n.args)),
        "kwargs": _encode_arg(dict(n.kwargs)),
    }


def save(module: SparseModel, path: str | os.PathLike[str]) -> Path:
    """Write a converted model to `path` (safetensors) and return the path.

    The file is read back in memory with `load`'s checks before it is written, so a model
    that would not load is refused here.

    Raises:
        TypeError: `module` is not what `ntksap.sparse.convert` returns.
        ValueError: a part of the model cannot be described safely (see the module doc).
    """
    from safetensors.torch import save as save_bytes

    from ntksap.files import atomic_write

    if not isinstance(module, SparseModel):
        raise TypeError(
            f"ntksap.sparse.save takes the module ntksap.sparse.convert returns, got "
            f"{type(module).__name__}"
        )
    zoo = module.source.get("model")
    writer = _Writer()
    spec = writer.spec(module.net, "net.", zoo=bool(zoo))
    meta = {
        "format": FORMAT,
        "structure": spec,
        "zoo_model": zoo,
        "decisions": decisions_json(module.decisions),
        "batch_size": module.batch_size,
        "threads": module.threads,
        "autotuned": module.autotuned,
        "untraced": module.source.get("untraced", []),
    }
    text = json.dumps(meta)
    try:
        _read(text, _DictTensors(writer.tensors))
    except ValueError as exc:
        raise ValueError(f"cannot save: the file would not load back: {exc}") from exc
    # serialised in memory, then written atomically: an existing file is never left
    # half-written (a full disk leaves it unchanged)
    content = save_bytes(writer.tensors, metadata={_META_KEY: text})
    return atomic_write(Path(path), content)


# -- load: tensors --------------------------------------------------------------------------


class _Tensors:
    """The file's tensors: dtype and shape from the header, data read only once checked."""

    def __init__(self, header: dict[str, tuple[torch.dtype | str, tuple[int, ...]]]) -> None:
        self.header = header
        self.used: set[str] = set()
        self.stored = sum(math.prod(shape) for _, shape in header.values())

    def _read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def get(
        self,
        key: str,
        dtype: torch.dtype | tuple[torch.dtype, ...],
        shape: tuple[int | None, ...] | None,
        what: str,
    ) -> torch.Tensor:
        """The tensor `key`, after checking it exists and has `dtype` and `shape` (None: any
        size along that axis; shape None: any shape)."""
        if key not in self.header:
            raise ValueError(f"tensor {key!r} ({what}) is missing from the file")
        if key in self.used:
            raise ValueError(f"tensor {key!r} is claimed twice by the structure")
        got_dtype, got_shape = self.header[key]
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if got_dtype not in dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"tensor {key!r} ({what}) must be {want}, got {got_dtype}")
        if shape is not None and (
            len(got_shape) != len(shape)
            or any(w is not None and g != w for g, w in zip(got_shape, shape))
        ):
            want_s = _shape_text(shape)
            raise ValueError(
                f"tensor {key!r} ({what}) must have shape {want_s}, got {_shape_text(got_shape)}"
            )
        self.used.add(key)
        return self._read(key)

    def shape(self, key: str) -> tuple[int, ...] | None:
        entry = self.header.get(key)
        return None if entry is None else tuple(entry[1])

    def check_all_used(self) -> None:
        extra = sorted(set(self.header) - self.used)
        if extra:
            shown = ", ".join(repr(k) for k in extra[:5])
            raise ValueError(
                f"{len(extra)} tensor(s) in the file are not part of the structure: {shown}"
                + (" ..." if len(extra) > 5 else "")
            )


def _shape_text(shape: tuple[int | None, ...]) -> str:
    """(3,) / (n, 4): a shape as Python writes a tuple, n for any size."""
    parts = ["n" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


class _DictTensors(_Tensors):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
        self.tensors = tensors

    def _read(self, key: str) -> torch.Tensor:
        return self.tensors[key].clone()


class _FileTensors(_Tensors):
    def __init__(self, handle: Any) -> None:
        header = {}
        for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            sl = handle.get_slice(key)
            code = sl.get_dtype()
            header[key] = (_ST_DTYPES.get(code, code), tuple(int(s) for s in sl.get_shape()))
        super().__init__(header)
        self.handle = handle

    def _read(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)


# -- load: JSON checks ----------------------------------------------------------------------


def _fail(where: str, message: str) -> NoReturn:
    raise ValueError(f"{where}: {message}")


def _kind_of(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(v), "a list" if isinstance(v, list) else "an object"
    )


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _obj(v: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()) -> dict:
    if not isinstance(v, dict):
        _fail(where, f"must be a JSON object, got {_kind_of(v)}")
    missing = sorted(required - v.keys())
    if missing:
        _fail(where, f"lacks the field(s) {', '.join(missing)}")
    unknown = sorted(set(v) - required - optional)
    if unknown:
        _fail(
            where,
            f"unknown field(s) {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(sorted(required | optional))}",
        )
    return v


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(where, f"must be an integer, got {_kind_of(v)} {_show(v)}")
    if not lo <= v <= hi:
        _fail(where, f"must be in [{lo}, {hi}], got {v}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        _fail(where, f"must be true or false, got {_kind_of(v)} {_show(v)}")
    return v


def _str(
    v: Any,
    where: str,
    choices: tuple[str, ...] | None = None,
    pattern: re.Pattern[str] | None = None,
    max_len: int = _MAX_TEXT,
) -> str:
    if not isinstance(v, str):
        _fail(where, f"must be a string, got {_kind_of(v)} {_show(v)}")
    if choices is not None and v not in choices:
        _fail(where, f"must be one of {', '.join(map(repr, choices))}, got {_show(v)}")
    if pattern is not None and not pattern.fullmatch(v):
        _fail(where, f"must match {pattern.pattern}, got {_show(v)}")
    if len(v) > max_len or not v.isprintable():
        _fail(where, f"must be printable text of at most {max_len} characters, got {_show(v)}")
    return v


def _ms(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        _fail(where, f"must be null or a finite number >= 0 (milliseconds), got {_show(v)}")
    return float(v)


def _list(v: Any, where: str, max_len: int = _MAX_LIST, length: int | None = None) -> list:
    if not isinstance(v, list):
        _fail(where, f"must be a JSON list, got {_kind_of(v)}")
    if length is not None and len(v) != length:
        _fail(where, f"must have {length} entries, got {len(v)}")
    if len(v) > max_len:
        _fail(where, f"must have at most {max_len} entries, got {len(v)}")
    return v


def _ident(v: Any, where: str) -> str:
    """A Python identifier that is not a keyword and not a dunder name."""
    s = _str(v, where, pattern=_IDENT)
    if keyword.iskeyword(s) or s.startswith("__"):
        _fail(where, f"must not be a Python keyword or start with '__', got {s!r}")
    return s


def _module_path(v: Any, where: str) -> str:
    """A dotted attribute path of plain identifiers (or Sequential indices) that shadows no
    attribute of nn.Module / fx.GraphModule."""
    s = _str(v, where, max_len=300)
    for part in s.split("."):
        if not _PATH_PART.fullmatch(part) or keyword.iskeyword(part) or part.startswith("__"):
            _fail(where, f"{s!r} is not a dotted path of plain identifiers or indices")
        if part in _MODULE_ATTRIBUTES:
            _fail(where, f"{s!r} would shadow the module attribute {part!r}")
    return s


def _module_attributes() -> frozenset[str]:
    """Names of nn.Module / fx.GraphModule attributes (class and instance) that a submodule
    or stored tensor must not replace (`forward`, `training`, `graph`, `_modules`, ...)."""
    instance = fx.GraphModule(nn.Module(), fx.Graph())
    return frozenset(dir(fx.GraphModule)) | frozenset(vars(instance))


_MODULE_ATTRIBUTES = _module_attributes()


def _parse_json(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, str):
        raise ValueError(f"the {_META_KEY!r} metadata must be a string")
    if len(raw) > _MAX_META_CHARS:
        raise ValueError(
            f"the {_META_KEY!r} metadata has {len(raw)} characters, at most "
            f"{_MAX_META_CHARS} are read"
        )
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise ValueError(f"the {_META_KEY!r} metadata is nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"the {_META_KEY!r} metadata is not valid JSON: {exc}") from None
    # depth and size, iteratively (the checks below recurse)
    stack: list[tuple[Any, int]] = [(meta, 1)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if depth > _MAX_JSON_DEPTH:
            raise ValueError(f"the metadata JSON is nested deeper than {_MAX_JSON_DEPTH} levels")
        if count > _MAX_JSON_VALUES:
            raise ValueError(f"the metadata JSON has more than {_MAX_JSON_VALUES} values")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return _obj(
        meta,
        "metadata",
        {"format", "structure"},
        frozenset({"zoo_model", "decisions", "batch_size", "threads", "autotuned", "untraced"}),
    )


# -- load: graph arguments ------------------------------------------------------------------


def _decode_arg(a: Any, env: dict[str, fx.Node], where: str, depth: int = 0) -> Any:
    if depth > _MAX_ARG_DEPTH:
        _fail(where, f"arguments nested deeper than {_MAX_ARG_DEPTH} levels")
    if a is None or isinstance(a, bool):
        return a
    if isinstance(a, int):
        return _int(a, where, -_MAX_INT, _MAX_INT)
    if isinstance(a, float):
        if math.isnan(a):
            _fail(where, "NaN is not allowed as an argument")
        return a
    if isinstance(a, str):
        return _str(a, where, pattern=_DATA_STR)
    if isinstance(a, list):
        _list(a, where, _MAX_ARG_LIST)
        return [_decode_arg(x, env, f"{where}[{i}]", depth + 1) for i, x in enumerate(a)]
    if not isinstance(a, dict) or len(a) != 1:
        _fail(
            where,
            "an encoded argument is an object with exactly one of __node__, __tuple__, "
            f"__dict__, __slice__, __dtype__, __ellipsis__; got {_show(a)}",
        )
    ((tag, v),) = a.items()
    if tag == "__node__":
        name = _str(v, f"{where}.__node__", pattern=_IDENT)
        if name not in env:
            _fail(where, f"refers to node {name!r}, which is not an earlier node of the graph")
        return env[name]
    if tag == "__tuple__":
        _list(v, f"{where}.__tuple__", _MAX_ARG_LIST)
        return tuple(
            _decode_arg(x, env, f"{where}.__tuple__[{i}]", depth + 1) for i, x in enumerate(v)
        )
    if tag == "__dict__":
        if not isinstance(v, dict) or len(v) > _MAX_ARG_LIST:
            _fail(where, f"__dict__ must hold an object of at most {_MAX_ARG_LIST} entries, "
                  f"got {_show(v)}")  # fmt: skip
        return {
            _ident(k, f"{where}.__dict__ key"): _decode_arg(x, env, f"{where}.{k}", depth + 1)
            for k, x in v.items()
        }
    if tag == "__slice__":
        _list(v, f"{where}.__slice__", length=3)
        return slice(*(_decode_arg(x, env, f"{where}.__slice__", depth + 1) for x in v))
    if tag == "__dtype__":
        return _DTYPES[_str(v, f"{where}.__dtype__", choices=tuple(_DTYPES))]
    if tag == "__ellipsis__":
        if v is not True:
            _fail(where, "__ellipsis__ must be true")
        return Ellipsis
    _fail(where, f"unknown argument encoding {tag!r}")


# -- load: building -------------------------------------------------------------------------


class _Reader:
    def __init__(self, tensors: _Tensors) -> None:
        self.tensors = tensors
        self.load_budget = max(LOAD_FLOOR, LOAD_FACTOR * tensors.stored)
        self.allocated = 0
        self.python_parts: set[int] = set()  # id() of the modules built from "python" parts

    def charge(self, elements: int, where: str, what: str) -> None:
        """Count `elements` that load allocates beyond the stored tensors."""
        self.allocated += elements
        if self.allocated > self.load_budget:
            _fail(
                where,
                f"{what} would make load allocate {self.allocated} elements beyond the "
                f"{self.tensors.stored} stored ones; a file may make load allocate at most "
                f"max({LOAD_FLOOR}, {LOAD_FACTOR} x stored) = {self.load_budget}",
            )

    def build(
        self, spec: Any, where: str, prefix: str, zoo: nn.Module | None, in_graph: bool
    ) -> nn.Module:
        """The module `spec` describes. `prefix`: its tensors' key prefix; `zoo`: the meta
        zoo module at this position (under a "python" part), else None."""
        if not isinstance(spec, dict) or "kind" not in spec:
            _fail(where, f"must be a JSON object with a 'kind', got {_show(spec)}")
        kind = spec["kind"]
        kinds = ("conv", "linear", "chain", "graph", "torch", "container", "python")
        _str(kind, f"{where}.kind", choices=kinds)
        prefix_given = spec.get("prefix")
        if kind in ("conv", "linear", "graph", "torch", "python") and prefix_given != prefix:
            _fail(f"{where}.prefix", f"must be {prefix!r} (the module's position), got "
                  f"{_show(prefix_given)}")  # fmt: skip
        if kind in ("conv", "linear"):
            return self.layer(spec, where, prefix, kind)
        if kind == "chain":
            return self.chain(spec, where, prefix)
        if kind == "graph":
            return self.graph(spec, where, prefix)
        if kind == "torch":
            return self.torch_module(spec, where, prefix)
        if kind == "container":
            return self.container(spec, where, prefix, zoo, in_graph)
        if zoo is None or in_graph:
            _fail(
                where,
                "a 'python' part (an untraceable module) is only possible at the root or "
                "inside another 'python' part of a zoo model",
            )
        return self.python(spec, where, prefix, zoo)

    # -- sparse layers ------------------------------------------------------------------
    def layer(self, spec: dict, where: str, prefix: str, kind: str) -> _SparseBase:
        _obj(spec, where, {"kind", "prefix", "config"})
        w = f"{where}.config"
        conv_keys = {"stride", "padding", "dilation", "groups"} if kind == "conv" else set()
        cfg = _obj(
            spec["config"],
            w,
            {"weight_shape", "relu", "residual", "mode", "has_bias", *conv_keys},
            frozenset({"source_name"}),
        )
        ndim = 4 if kind == "conv" else 2
        shape = tuple(
            _int(s, f"{w}.weight_shape[{i}]", 1, _MAX_DIM)
            for i, s in enumerate(_list(cfg["weight_shape"], f"{w}.weight_shape", length=ndim))
        )
        fan_in = math.prod(shape[1:])
        if fan_in > _MAX_DIM or shape[0] >= _MAX_DIM:
            _fail(f"{w}.weight_shape", f"{list(shape)} is too large (fan-in {fan_in} must fit "
                  "an int32 column index)")  # fmt: skip
        relu = _bool(cfg["relu"], f"{w}.relu")
        residual = _bool(cfg["residual"], f"{w}.residual")
        has_bias = _bool(cfg["has_bias"], f"{w}.has_bias")
        mode = _str(cfg["mode"], f"{w}.mode", choices=MODES)
        source = _str(cfg.get("source_name", ""), f"{w}.source_name", max_len=300)
        conv: dict[str, Any] = {}
        if kind == "conv":
            conv["stride"] = self.pair(cfg["stride"], f"{w}.stride", 1, 1 << 16)
            conv["dilation"] = self.pair(cfg["dilation"], f"{w}.dilation", 1, 1 << 16)
            pad = cfg["padding"]
            conv["padding"] = (
                _str(pad, f"{w}.padding", choices=("same", "valid"))
                if isinstance(pad, str)
                else self.pair(pad, f"{w}.padding", 0, 1 << 16)
            )
            groups = conv["groups"] = _int(cfg["groups"], f"{w}.groups", 1, shape[0])
            if shape[0] % groups:
                _fail(f"{w}.groups", f"{groups} must divide the {shape[0]} output channels")
        rowptr, col, values, bias = self.csr(prefix, shape, has_bias)
        densify = mode == "dense" or (kind == "conv" and not _ext.available())
        if kind == "conv" and (
            conv["groups"] != 1
            or conv["dilation"] != (1, 1)
            or isinstance(conv["padding"], str)
            or conv["padding"][0] != conv["padding"][1]
            or conv["stride"][0] != conv["stride"][1]
        ):
            densify = True  # the kernel cannot run it: dense mode
        if densify:
            self.charge(math.prod(shape), where, f"the dense weight {list(shape)}")
        common = {
            "weight_shape": shape,
            "rowptr": rowptr,
            "col_idx": col,
            "values": values,
            "bias": bias,
            "relu": relu,
            "residual": residual,
            "mode": mode,
        }
        try:
            layer: _SparseBase = (
                SparseConv2d(**common, **conv) if kind == "conv" else SparseLinear(**common)
            )
        except (ValueError, TypeError) as exc:  # the layer's own checks (check_csr first)
            msg = str(exc)  # its messages start with the array or setting they are about
            arr = next(
                (a for a in ("rowptr", "col_idx", "values", "bias") if msg.startswith(a)), None
            )
            _fail(f"tensor {prefix + arr!r}" if arr else where, msg)
        layer.source_name = source
        return layer.eval()

    @staticmethod
    def pair(v: Any, where: str, lo: int, hi: int) -> tuple[int, int]:
        a, b = _list(v, where, length=2)
        return _int(a, f"{where}[0]", lo, hi), _int(b, f"{where}[1]", lo, hi)

    def csr(
        self, prefix: str, shape: tuple[int, ...], has_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The CSR triple and bias of a layer of weight `shape`, checked: shapes and dtypes
        from the header first (nothing read yet), then the invariants."""
        rows, fan_in = shape[0], math.prod(shape[1:])
        t = self.tensors
        nnz_shape = t.shape(prefix + "col_idx")
        nnz = nnz_shape[0] if nnz_shape is not None and len(nnz_shape) == 1 else None
        if nnz is not None and nnz > rows * fan_in:
            _fail(
                f"tensor {prefix + 'col_idx'!r}",
                f"{nnz} non-zeros exceed the {rows} x {fan_in} weight",
            )
        rowptr = t.get(prefix + "rowptr", torch.int32, (rows + 1,), f"CSR row pointers of a "
                       f"{list(shape)} weight: out + 1 entries")  # fmt: skip
        col = t.get(prefix + "col_idx", torch.int32, (None,), "CSR column indices")
        values = t.get(prefix + "values", torch.float32, (col.shape[0],), "CSR values, one per "
                       "column index")  # fmt: skip
        bias = t.get(prefix + "bias", torch.float32, (rows if has_bias else 0,),
                     "bias" if has_bias else "empty bias (has_bias is false)")  # fmt: skip
        # the CSR invariants are the layer constructor's `check_csr` (run first thing, before
        # any densifying); `layer` names its errors by the tensors' keys
        return rowptr, col, values, bias if has_bias else None

    # -- chains -------------------------------------------------------------------------
    def chain(self, spec: dict, where: str, prefix: str) -> SparseChain:
        _obj(
            spec,
            where,
            {"kind", "layers", "steps", "output"},
            frozenset({"name", "mode", "split_work", "policy", "fused_ms", "layers_ms"}),
        )
        specs = _list(spec["layers"], f"{where}.layers")
        if not specs:
            _fail(f"{where}.layers", "a chain needs at least one layer")
        layers = []
        for i, s in enumerate(specs):
            w = f"{where}.layers[{i}]"
            if not isinstance(s, dict) or s.get("kind") != "conv":
                _fail(w, f"a chain holds convs only (kind 'conv'), got {_show(s)[:60]}")
            layers.append(self.layer(s, w, f"{prefix}layers.{i}.", "conv"))
        steps = []
        for i, st in enumerate(_list(spec["steps"], f"{where}.steps", length=len(layers))):
            a, b = _list(st, f"{where}.steps[{i}]", length=2)
            steps.append(
                (_int(a, f"{where}.steps[{i}][0]", 0, i), _int(b, f"{where}.steps[{i}][1]", -1, i))
            )
        output = _int(spec["output"], f"{where}.output", 1, len(layers))
        mode = _str(spec.get("mode", "fused"), f"{where}.mode", choices=CHAIN_MODES)
        channels: dict[int, int] = {}  # value -> its channels (value 0: the chain's input)
        for k, (layer, (src, res)) in enumerate(zip(layers, steps, strict=True)):
            o, c = layer.weight_shape[0], layer.weight_shape[1]
            if layer.kernel_reason:
                _fail(f"{where}.layers[{k}]", f"a chain layer must be kernel-eligible, but "
                      f"{layer.kernel_reason}")  # fmt: skip
            if channels.setdefault(src, c) != c:
                _fail(f"{where}.steps[{k}]", f"layer {k} reads value {src} with {channels[src]} "
                      f"channels but its weight takes {c}")  # fmt: skip
            if layer.residual != (res >= 0):
                _fail(f"{where}.steps[{k}]", f"layer {k}: residual flag {layer.residual} and "
                      f"residual value {res} disagree")  # fmt: skip
            if res >= 0 and channels.setdefault(res, o) != o:
                _fail(f"{where}.steps[{k}]", f"layer {k} adds value {res} with "
                      f"{channels[res]} channels to its {o} output channels")  # fmt: skip
            channels[k + 1] = o
        try:
            chain = SparseChain(layers, steps, output, mode)
        except ValueError as exc:
            _fail(where, str(exc))
        chain.name = _str(spec.get("name", ""), f"{where}.name", max_len=200)
        chain.split_work = _int(spec.get("split_work", -1), f"{where}.split_work", -1, _MAX_INT)
        chain.policy = _str(spec.get("policy", "auto"), f"{where}.policy", choices=POLICIES)
        chain.fused_ms = _ms(spec.get("fused_ms"), f"{where}.fused_ms")
        chain.layers_ms = _ms(spec.get("layers_ms"), f"{where}.layers_ms")
        return chain.eval()

    # -- torch.nn modules ---------------------------------------------------------------
    def torch_module(self, spec: dict, where: str, prefix: str) -> nn.Module:
        _obj(spec, where, {"kind", "class", "init", "prefix"})
        name = _str(spec["class"], f"{where}.class", choices=tuple(sorted(_TORCH_MODULES)))
        cls = _TORCH_MODULES[name]
        params = [
            p for p in list(inspect.signature(cls.__init__).parameters)[1:] if p not in
            ("device", "dtype")
        ]  # fmt: skip
        init = spec["init"]
        if not isinstance(init, dict):
            _fail(f"{where}.init", f"must be a JSON object, got {_kind_of(init)}")
        kwargs = {}
        for k, v in init.items():
            w = f"{where}.init.{k}"
            if k not in params:
                _fail(w, f"{name} has no argument {k!r}; valid: {', '.join(params)}")
            kwargs[k] = _init_value(_decode_arg(v, {}, w), w)
        try:
            with torch.device("meta"):  # sizes are compared with the file before allocating
                module = cls(**kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            _fail(f"{where}.init", f"{name}({_show(init)}) is refused by torch: {exc}")
        state = {}
        for key, t in module.state_dict().items():
            state[key] = self.tensors.get(
                prefix + key, t.dtype, tuple(t.shape), f"{name}.{key} of {name}{_show(init)}"
            )
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    # -- containers and Python modules --------------------------------------------------
    def children(
        self, spec: Any, where: str, prefix: str, zoo: nn.Module | None, in_graph: bool
    ) -> dict[str, nn.Module]:
        if not isinstance(spec, dict) or len(spec) > _MAX_LIST:
            _fail(where, f"must be a JSON object of at most {_MAX_LIST} entries")
        zoo_children = dict(zoo.named_children()) if zoo is not None else None
        out = {}
        for name, child in spec.items():
            w = f"{where}[{name!r}]"
            if not _PATH_PART.fullmatch(name) or name in _MODULE_ATTRIBUTES:
                _fail(w, "a child name must be an identifier or an index and shadow no "
                      "module attribute")  # fmt: skip
            if keyword.iskeyword(name) or name.startswith("__"):
                _fail(w, "a child name must not be a keyword or start with '__'")
            sub = None
            if zoo_children is not None:
                if name not in zoo_children:
                    _fail(w, f"the zoo model has no child {name!r} here; its children: "
                          f"{', '.join(zoo_children) or 'none'}")  # fmt: skip
                sub = zoo_children[name]
            out[name] = self.build(child, w, f"{prefix}{name}.", sub, in_graph)
        if zoo_children is not None and set(out) != set(zoo_children):
            _fail(where, f"must describe every child of the zoo module: "
                  f"{', '.join(sorted(zoo_children))}")  # fmt: skip
        return out

    def container(
        self, spec: dict, where: str, prefix: str, zoo: nn.Module | None, in_graph: bool
    ) -> nn.Module:
        _obj(spec, where, {"kind", "class", "children"})
        name = _str(spec["class"], f"{where}.class", choices=tuple(_CONTAINERS))
        if zoo is not None and type(zoo).__name__ != name:
            _fail(f"{where}.class", f"the zoo model has a {type(zoo).__name__} here")
        children = self.children(spec["children"], f"{where}.children", prefix, zoo, in_graph)
        if name == "ModuleList" and list(children) != [str(i) for i in range(len(children))]:
            _fail(f"{where}.children", "a ModuleList's children are named 0, 1, 2, ...")
        if name == "Sequential":
            from collections import OrderedDict

            return nn.Sequential(OrderedDict(children)).eval()
        return nn.ModuleList(list(children.values())).eval()

    def python(self, spec: dict, where: str, prefix: str, zoo: nn.Module) -> nn.Module:
        _obj(spec, where, {"kind", "class", "children", "own", "prefix"})
        cls = _str(spec["class"], f"{where}.class", max_len=200)
        if cls != type(zoo).__qualname__:
            _fail(f"{where}.class", f"the zoo model has a {type(zoo).__qualname__} here, the "
                  f"file says {cls!r}")  # fmt: skip
        own = {k: v for k, v in {**zoo._parameters, **zoo._buffers}.items() if v is not None}
        listed = _list(spec["own"], f"{where}.own")
        if sorted(listed) != sorted(own) or len(set(listed)) != len(listed):
            _fail(f"{where}.own", f"must list the module's own tensors {sorted(own)}, got "
                  f"{_show(listed)}")  # fmt: skip
        children = self.children(spec["children"], f"{where}.children", prefix, zoo, False)
        for k, meta_t in own.items():
            t = self.tensors.get(
                prefix + k, meta_t.dtype, tuple(meta_t.shape), f"{cls}.{k} of the zoo model"
            )
            if k in zoo._parameters:
                zoo._parameters[k] = nn.Parameter(t, requires_grad=False)
            else:
                zoo._buffers[k] = t
        for name, child in children.items():
            setattr(zoo, name, child)
        self.python_parts.add(id(zoo))
        return zoo.eval()

    # -- graphs -------------------------------------------------------------------------
    def graph(self, spec: dict, where: str, prefix: str) -> fx.GraphModule:
        _obj(spec, where, {"kind", "prefix", "nodes", "modules"}, frozenset({"attrs"}))
        nodes = _list(spec["nodes"], f"{where}.nodes")
        mod_specs = spec["modules"]
        if not isinstance(mod_specs, dict) or len(mod_specs) > _MAX_LIST:
            _fail(f"{where}.modules", f"must be an object of at most {_MAX_LIST} entries")
        attrs = [
            _module_path(a, f"{where}.attrs[{i}]")
            for i, a in enumerate(_list(spec.get("attrs", []), f"{where}.attrs"))
        ]
        targets = [_module_path(t, f"{where}.modules key") for t in mod_specs]
        paths = sorted([*targets, *attrs])
        for a, b in itertools.pairwise(paths):
            if b == a or b.startswith(a + "."):
                _fail(where, f"module / attribute paths {a!r} and {b!r} overlap")
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        placeholders: set[str] = set()
        used_modules: set[str] = set()
        used_attrs: set[str] = set()
        seen_output = False
        for i, nd in enumerate(nodes):
            w = f"{where}.nodes[{i}]"
            _obj(nd, w, {"name", "op", "target", "args", "kwargs"})
            if seen_output:
                _fail(w, "the output node must be the last node")
            name = _ident(nd["name"], f"{w}.name")
            if name in env:
                _fail(f"{w}.name", f"node name {name!r} is used twice")
            op = _str(nd["op"], f"{w}.op", choices=_GRAPH_OPS)
            args = _decode_arg(nd["args"], env, f"{w}.args")
            kwargs = _decode_arg(nd["kwargs"], env, f"{w}.kwargs")
            if not isinstance(args, tuple):
                _fail(f"{w}.args", "must be an encoded tuple ({'__tuple__': [...]})")
            if not isinstance(kwargs, dict):
                _fail(f"{w}.kwargs", "must be an encoded dict ({'__dict__': {...}})")
            if "out" in kwargs:
                _fail(f"{w}.kwargs", "'out=' (writing into another tensor) is not allowed")
            target: Any = nd["target"]
            tw = f"{w}.target"
            if op == "placeholder":
                if len(env) != len(placeholders):
                    _fail(w, "placeholders (the inputs) must come before every other node")
                target = _ident(target, tw)
                if target in _RESERVED or target in placeholders:
                    _fail(tw, f"input name {target!r} is reserved or used twice")
                if args or kwargs:
                    _fail(w, "a placeholder takes no arguments (no defaults)")
                placeholders.add(target)
            elif op == "get_attr":
                target = _module_path(target, tw)
                if target not in attrs:
                    _fail(tw, f"{target!r} is not one of the graph's stored attributes "
                          f"({', '.join(attrs) or 'none'})")  # fmt: skip
                if args or kwargs:
                    _fail(w, "get_attr takes no arguments")
                used_attrs.add(target)
            elif op == "call_module":
                target = _module_path(target, tw)
                if target not in mod_specs:
                    _fail(tw, f"{target!r} is not one of the graph's modules "
                          f"({', '.join(targets) or 'none'})")  # fmt: skip
                used_modules.add(target)
            elif op == "call_function":
                fname = _str(target, tw, choices=tuple(sorted(_FUNCTIONS)))
                target = _FUNCTIONS[fname]
                if fname == "builtins.getattr" and (
                    len(args) != 2
                    or kwargs
                    or not isinstance(args[0], fx.Node)
                    or args[1] not in _GETATTR_NAMES
                ):
                    _fail(w, f"getattr may only read {', '.join(sorted(_GETATTR_NAMES))} "
                          "of an earlier node")  # fmt: skip
            elif op == "call_method":
                target = _str(target, tw, choices=tuple(sorted(_METHODS)))
                if not args or not isinstance(args[0], fx.Node):
                    _fail(w, "a method call needs the node it is called on as first argument")
            else:
                if target != "output" or len(args) != 1 or kwargs:
                    _fail(w, "the output node has target 'output' and one argument")
                seen_output = True
            env[name] = graph.create_node(op, target, args, kwargs, name=name)
        if not seen_output:
            _fail(f"{where}.nodes", "the graph has no output node")
        if used_modules != set(targets) or used_attrs != set(attrs):
            unused = sorted((set(targets) - used_modules) | (set(attrs) - used_attrs))
            _fail(where, f"modules / attributes not used by any node: {unused}")
        try:
            graph.lint()
            code_globals = graph.python_code("self").globals  # the source, not run
        except Exception as exc:  # fx's own consistency check: any failure is a bad file
            _fail(where, f"the graph is inconsistent: {exc}")
        clash = placeholders & set(code_globals)
        if clash:
            _fail(where, f"input name(s) {sorted(clash)} would shadow the generated code's globals")
        root: dict[str, Any] = {
            t: self.build(s, f"{where}.modules[{t!r}]", f"{prefix}{t}.", None, True)
            for t, s in mod_specs.items()
        }
        for t in attrs:
            key = prefix + t
            shape = self.tensors.shape(key)
            root[t] = self.tensors.get(
                key, tuple(_DTYPES.values()), shape, f"graph attribute {t!r}"
            )
        gm = fx.GraphModule(root, graph)
        _assign_buffers(gm)
        return gm.eval()

    def guard(self, module: nn.Module) -> None:
        """Check each call's sizes on the meta device first (see `_CallGuard`): on the root,
        or, under a "python" part (whose own forward is the zoo's code), on each module it
        may call; a container there may be called whole or child by child."""
        python = id(module) in self.python_parts
        if not python:
            if not isinstance(module, nn.ModuleList):
                hook = _CallGuard(self.tensors.stored)
                module.register_forward_pre_hook(hook, with_kwargs=True)
            if not isinstance(module, nn.Sequential | nn.ModuleList):
                return
        for child in module.children():
            self.guard(child)


def _init_value(v: Any, where: str) -> Any:
    """A torch.nn constructor argument: numbers, booleans, short strings, tuples of ints."""
    if isinstance(v, tuple):
        return tuple(_init_value(x, where) for x in v)
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return _int(v, where, -_MAX_DIM, _MAX_DIM)
    if isinstance(v, float):
        if not math.isfinite(v):
            _fail(where, f"must be finite, got {v}")
        return v
    _fail(where, f"a module argument must be a number, boolean, string or tuple, got {_show(v)}")


# -- the call guard -------------------------------------------------------------------------


def _numel(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, list | tuple):
        return sum(_numel(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_numel(x) for x in obj.values())
    return 0


def _to_meta(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
    if isinstance(obj, list | tuple):
        return type(obj)(_to_meta(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


def _signature(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return (tuple(obj.shape), obj.dtype, obj.device.type, obj.requires_grad)
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, *(_signature(x) for x in obj))
    if isinstance(obj, dict):
        return ("dict", *((k, _signature(v)) for k, v in sorted(obj.items(), key=str)))
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return type(obj).__name__


class _CallGuard:
    """Forward pre-hook of a loaded module: before the first call with an input signature
    (shapes, dtypes), the module runs on meta tensors (no data, no kernels) and the peak of
    the elements alive at once, counting every node's output and every conv's im2col /
    padded-input buffer, must stay within max(CALL_FLOOR, CALL_FACTOR x (input + stored
    elements)). Checked signatures are remembered (at most `_SIGNATURES_KEPT`)."""

    def __init__(self, stored: int) -> None:
        self.stored = stored
        self.checked: set[Any] = set()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # the common case, one tensor: its shape and dtype are the whole signature
        if not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor:
            key: Any = (args[0].shape, args[0].dtype, args[0].device)
        else:
            key = (_signature(args), _signature(kwargs))
        if key in self.checked or getattr(_CHECKING, "active", False):
            return  # checked before, or a module called by the meta run itself
        limit = max(CALL_FLOOR, CALL_FACTOR * (_numel(args) + _numel(kwargs) + self.stored))
        _CHECKING.active = True
        try:
            with torch.no_grad():
                _meta_call(module, _to_meta(args), _to_meta(kwargs), limit, 0, "<model>")
        except (ValueError, TypeError, RuntimeError):
            raise
        except Exception as exc:  # a module of the file given arguments it cannot take
            raise TypeError(
                f"the loaded model cannot run on this input: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            _CHECKING.active = False
        if len(self.checked) >= _SIGNATURES_KEPT:
            self.checked.clear()
        self.checked.add(key)


_CHECKING = threading.local()  # set while a guard's meta run is in progress (this thread)


def _over(where: str, need: int, limit: int) -> NoReturn:
    raise ValueError(
        f"ntksap.sparse: this loaded model would keep {need} elements alive at {where} for "
        f"this input; a model loaded from a file may use at most {limit} (max({CALL_FLOOR}, "
        f"{CALL_FACTOR} x (input + stored elements)))"
    )


def _conv_meta(
    layer: nn.Module, x: Any, weight_shape: tuple[int, ...], sparse_kernel: bool
) -> tuple[torch.Tensor, int]:
    """A conv's meta output and its scratch: im2col for F.conv2d, padded planes for the
    sparse kernel."""
    w = torch.empty(weight_shape, device="meta")
    y = F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if sparse_kernel:
        p = layer.padding[0]
        scratch = x.shape[0] * x.shape[1] * (x.shape[2] + 2 * p + 1) * (x.shape[3] + 2 * p)
    else:
        scratch = y.shape[0] * math.prod(weight_shape[1:]) * y.shape[2] * y.shape[3]
    return y, scratch


def _sparse_layer_meta(
    layer: _SparseBase, args: tuple, kwargs: dict, where: str
) -> tuple[Any, int]:
    if len(args) + len(kwargs) not in (1, 2) or set(kwargs) - {"x", "residual"}:
        raise TypeError(f"{where}: {type(layer).__name__} takes (x, residual=None)")
    x = args[0] if args else kwargs.get("x")
    residual = args[1] if len(args) > 1 else kwargs.get("residual")
    if not torch.is_tensor(x):
        raise TypeError(f"{where}: {type(layer).__name__} takes a tensor, got {type(x).__name__}")
    check_input(x)
    if layer.residual != (residual is not None):
        raise TypeError(
            f"{type(layer).__name__} built with residual={layer.residual} was called "
            f"{'without' if residual is None else 'with'} a residual input"
        )
    if isinstance(layer, SparseConv2d):
        if x.dim() != 4:
            raise RuntimeError(f"{where}: SparseConv2d takes (N, C, H, W), got {tuple(x.shape)}")
        kernel = layer.mode == "sparse" and not layer.kernel_reason and _ext.available()
        y, scratch = _conv_meta(layer, x, layer.weight_shape, kernel)
    else:
        y = F.linear(x, torch.empty(layer.weight_shape, device="meta"))
        scratch = 0
    if residual is not None and (not torch.is_tensor(residual) or residual.shape != y.shape):
        got = tuple(residual.shape) if torch.is_tensor(residual) else type(residual).__name__
        raise RuntimeError(f"{where}: the residual {got} must have the output's shape "
                           f"{tuple(y.shape)}")  # fmt: skip
    return y, y.numel() + scratch


def _meta_call(
    module: nn.Module, args: tuple, kwargs: dict, limit: int, base: int, where: str
) -> tuple[Any, int]:
    """Run `module` on meta tensors: (its meta output, the peak elements it allocates),
    raising once `base` (what the caller keeps alive) + that peak passes `limit`."""
    if isinstance(module, _SparseBase):
        out, peak = _sparse_layer_meta(module, args, kwargs, where)
    elif isinstance(module, SparseChain):
        if len(args) != 1 or kwargs or not torch.is_tensor(args[0]) or args[0].dim() != 4:
            raise TypeError("a SparseChain takes one (N, C, H, W) tensor")
        check_input(args[0])
        values = [args[0]]
        peak = 0
        for k, (layer, (src, res)) in enumerate(zip(module.layers, module.steps, strict=True)):
            y, scratch = _conv_meta(layer, values[src], layer.weight_shape, _ext.available())
            if res >= 0 and values[res].shape != y.shape:
                raise RuntimeError(f"{where}: chain layer {k} adds a {tuple(values[res].shape)} "
                                   f"value to its {tuple(y.shape)} output")  # fmt: skip
            values.append(y)
            peak = max(peak, sum(v.numel() for v in values[1:]) + scratch)
            if base + peak > limit:
                _over(f"{where} layer {k}", base + peak, limit)
        out = values[module.output]
    elif isinstance(module, fx.GraphModule):
        out, peak = _graph_meta(module, args, kwargs, limit, base, where)
    elif isinstance(module, nn.Sequential):
        if len(args) != 1 or kwargs:
            raise TypeError(f"{where}: a Sequential takes one input")
        out, peak, live = args[0], 0, 0
        for name, child in module.named_children():
            out, inner = _meta_call(child, (out,), {}, limit, base + live, f"{where}.{name}")
            peak = max(peak, live + inner)
            live = _numel(out)
    elif type(module) in _TORCH_MODULES.values():
        state = {k: _to_meta(v) for k, v in module.state_dict(keep_vars=True).items()}
        out = torch.func.functional_call(module, state, args, kwargs)
        peak = _numel(out)
        if isinstance(module, nn.Conv2d):
            peak += _conv_meta(module, args[0], tuple(module.weight.shape), False)[1]
    else:
        raise TypeError(f"{where}: a {type(module).__name__} cannot be called here")
    if base + peak > limit:
        _over(where, base + peak, limit)
    return out, peak


def _graph_meta(
    gm: fx.GraphModule, args: tuple, kwargs: dict, limit: int, base: int, where: str
) -> tuple[Any, int]:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    env: dict[fx.Node, Any] = {}
    live: dict[fx.Node, int] = {}
    peak = 0
    positional = list(args)
    for i, n in enumerate(nodes):
        here = f"{where}:{n.name}"
        if n.op == "placeholder":
            if positional:
                env[n] = positional.pop(0)
            elif n.target in kwargs:
                env[n] = kwargs[n.target]
            else:
                raise TypeError(f"{where}: missing input {n.target!r}")
            continue
        if n.op == "output":
            if positional:
                raise TypeError(f"{where}: {len(positional)} input(s) too many")
            return fx.node.map_arg(n.args[0], env.__getitem__), peak
        a = fx.node.map_arg(n.args, env.__getitem__)
        kw = fx.node.map_arg(n.kwargs, env.__getitem__)
        inner = None
        try:
            if n.op == "get_attr":
                value, inner = _to_meta(_get_path(gm, n.target)), 0  # stored: not new
            elif n.op == "call_module":
                value, inner = _meta_call(
                    gm.get_submodule(n.target), a, kw, limit, base + sum(live.values()), here
                )
            elif n.op == "call_function":
                value = n.target(*a, **kw)
            else:
                value = getattr(a[0], n.target)(*a[1:], **kw)
        except (ValueError, TypeError, RuntimeError) as exc:
            exc.add_note(f"(checking the loaded model's node {here} on the meta device)")
            raise
        except Exception as exc:  # e.g. an AttributeError from an argument of the wrong type
            raise TypeError(
                f"the loaded model cannot run node {here} on this input: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if inner is None:
            inner = _numel(value)
        need = sum(live.values()) + inner
        peak = max(peak, need)
        if base + need > limit:
            _over(here, base + need, limit)
        env[n] = value
        live[n] = _numel(value) if n.op != "get_attr" else 0
        for m in [m for m in live if last_use[m] <= i]:
            del live[m]
    raise ValueError(f"{where}: the graph has no output node")


# -- load -----------------------------------------------------------------------------------


def _zoo_keywords(zoo: Any) -> dict[str, Any]:
    w = "metadata.zoo_model"
    if not isinstance(zoo, dict):
        _fail(w, f"must be null or an object with the zoo model's name, got {_kind_of(zoo)}")
    from ntksap import models

    _str(zoo.get("name"), f"{w}.name", choices=tuple(models.list_models()))
    for k, v in zoo.items():
        _ident(k, f"{w} key")
        if isinstance(v, list):
            for i, x in enumerate(_list(v, f"{w}.{k}", _MAX_ZOO_LIST)):
                _int(x, f"{w}.{k}[{i}]", 1, _MAX_DIM)
        elif isinstance(v, int) and not isinstance(v, bool):
            _int(v, f"{w}.{k}", 1, _MAX_DIM)
        elif not isinstance(v, bool | str) and v is not None:
            _fail(f"{w}.{k}", f"must be an integer, boolean, string or list, got {_show(v)}")
        elif isinstance(v, str):
            _str(v, f"{w}.{k}", max_len=100)
    return zoo


def _zoo_meta(zoo: dict[str, Any]) -> nn.Module:
    """The zoo model on the meta device: no memory, whatever its keywords say."""
    from ntksap import models

    kwargs = dict(zoo)
    name = kwargs.pop("name")
    try:
        with torch.device("meta"):
            return models.create(name, **kwargs)
    except Exception as exc:  # the zoo's own keyword checks: any refusal is a bad file
        _fail("metadata.zoo_model", f"models.create({_show(zoo)}) failed: {exc}")


def _decisions(raw: Any) -> list[LayerDecision]:
    out = []
    names = set()
    known = {f.name for f in fields(LayerDecision)}
    for i, d in enumerate(_list(raw, "metadata.decisions")):
        w = f"metadata.decisions[{i}]"
        _obj(d, w, {"name", "kind", "shape", "density", "masked"}, frozenset(known))
        name = _str(d["name"], f"{w}.name", max_len=300)
        if name in names:
            _fail(f"{w}.name", f"layer {name!r} has two decisions")
        names.add(name)
        density = d["density"]
        if (
            isinstance(density, bool)
            or not isinstance(density, int | float)
            or not (0 <= density <= 1)
        ):
            _fail(f"{w}.density", f"must be a number in [0, 1], got {_show(density)}")
        out.append(
            LayerDecision(
                name=name,
                kind=_str(d["kind"], f"{w}.kind", choices=("conv", "linear")),
                shape=tuple(
                    _int(s, f"{w}.shape[{j}]", 0, _MAX_DIM)
                    for j, s in enumerate(_list(d["shape"], f"{w}.shape", 8))
                ),
                density=float(density),
                masked=_bool(d["masked"], f"{w}.masked"),
                bn_folded=_bool(d.get("bn_folded", False), f"{w}.bn_folded"),
                fused=_str(
                    d.get("fused", ""),
                    f"{w}.fused",
                    choices=("", "relu", "residual", "residual+relu"),
                ),
                mode=_str(d.get("mode", "dense"), f"{w}.mode", choices=MODES),
                dense_ms=_ms(d.get("dense_ms"), f"{w}.dense_ms"),
                sparse_ms=_ms(d.get("sparse_ms"), f"{w}.sparse_ms"),
                reason=_str(d.get("reason", ""), f"{w}.reason"),
                chain=_str(d.get("chain", ""), f"{w}.chain", max_len=200),
            )
        )
    return out


def _read(raw: Any, tensors: _Tensors) -> SparseModel:
    """The model that metadata `raw` and `tensors` describe, every part checked."""
    meta = _parse_json(raw)
    fmt = meta["format"]
    if fmt != FORMAT:
        _fail("metadata.format", f"unsupported format {_show(fmt)}, expected {FORMAT!r}")
    zoo = meta.get("zoo_model")
    if zoo is not None:
        zoo = _zoo_keywords(zoo)
    spec = meta["structure"]
    zoo_root = None
    if isinstance(spec, dict) and spec.get("kind") == "python":
        if zoo is None:
            _fail("metadata.structure", "an untraceable model (kind 'python') can only be "
                  "rebuilt from the zoo, but metadata.zoo_model is null")  # fmt: skip
        zoo_root = _zoo_meta(zoo)
    reader = _Reader(tensors)
    net = reader.build(spec, "metadata.structure", "net.", zoo_root, False)
    if zoo_root is not None:
        left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if left:
            _fail("metadata.structure", f"the zoo model's tensors {left[:5]} are not in the file")
    tensors.check_all_used()
    reader.guard(net)
    decisions = _decisions(meta.get("decisions", []))
    layers = {m.source_name: m for m in net.modules() if isinstance(m, _SparseBase)}
    for i, d in enumerate(decisions):
        layer = layers.get(d.name)
        if layer is not None and (d.kind, d.shape) != (
            "conv" if isinstance(layer, SparseConv2d) else "linear",
            layer.weight_shape,
        ):
            _fail(f"metadata.decisions[{i}]", f"kind / shape {d.kind} {list(d.shape)} differ "
                  f"from layer {d.name!r} in the structure")  # fmt: skip
    batch = meta.get("batch_size")
    threads = meta.get("threads")
    untraced = [
        _str(u, f"metadata.untraced[{i}]", max_len=300)
        for i, u in enumerate(_list(meta.get("untraced", []), "metadata.untraced", 10_000))
    ]
    return SparseModel(
        net,
        decisions,
        batch_size=None if batch is None else _int(batch, "metadata.batch_size", 1, _MAX_DIM),
        threads=None if threads is None else _int(threads, "metadata.threads", 1, 1 << 16),
        autotuned=_bool(meta.get("autotuned", False), "metadata.autotuned"),
        source={"model": zoo, "untraced": untraced} if zoo else {"untraced": untraced},
    )


def load(path: str | os.PathLike[str]) -> SparseModel:
    """Read a model written by `save`, treating the file as data (see the module doc for
    every check): no pickle, no code from the file, no size from the file that was not
    compared with the stored tensors or bounded first.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ntksap.sparse file, or a malformed one (the message names the
            field or tensor and the rule).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ntksap.sparse file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:  # tensors are read once checked
            raw = (f.metadata() or {}).get(_META_KEY)
            if raw is None:
                raise ValueError(f"{path} is not an ntksap.sparse file (no {_META_KEY!r} metadata)")
            return _read(raw, _FileTensors(f))
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {exc}") from exc
    except Exception as exc:
        # safetensors' own error type (SafetensorError) derives from Exception only
        if type(exc).__name__ == "SafetensorError":
            raise ValueError(f"{path}: not a readable safetensors file: {exc}") from exc
        raise
