"""`save` / `load` of a converted `SparseModel` as one safetensors file (no pickle).

The tensors: per sparse layer its CSR arrays (`rowptr`, `col_idx`, `values`) and `bias`
(a dense-mode layer is stored as CSR too and densified on load), plus the state of every
other module (BatchNorm that was not folded, ...). The safetensors metadata holds, under
"ntksap.sparse", a JSON description of the structure:

- `{"kind": "conv" | "linear", "config": {...}}` for `SparseConv2d` / `SparseLinear`;
- `{"kind": "chain", "layers": [...], "steps": [[in, res], ...], "output": k, ...}` for a
  `SparseChain` (its convs, how they connect, the autotuned mode);
- `{"kind": "graph", "nodes": [...], "modules": {target: spec}}` for a traced part: the
  torch.fx graph, node by node (op, target, args); functions and tensor methods come from an
  allow-list, so loading never runs code from the file;
- `{"kind": "torch", "class": "MaxPool2d", "init": {...}}` for an allow-listed torch.nn
  module (pooling, activations, BatchNorm, Flatten, Dropout, Identity, Conv2d, Linear);
- `{"kind": "python", "children": {...}}` for a module torch.fx could not trace (it keeps its
  own Python forward, e.g. the zoo MLP with its input check). Such a model can only be
  rebuilt from the zoo: the file then records the `ntksap.models` name and keywords, and
  `load` builds that model and puts the converted children in. `save` refuses (with a clear
  error) a non-zoo model that needs this.

The decisions of the autotune are kept too (`module.summary()` after load shows them); the
layers keep the mode (sparse / dense) chosen at conversion.

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
import json
import operator
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ntksap.sparse.convert import LayerDecision, SparseModel, _assign_buffers, decisions_json
from ntksap.sparse.layers import POLICIES, SparseChain, SparseConv2d, SparseLinear, _SparseBase

__all__ = ["FORMAT", "load", "save"]

FORMAT = "ntksap.sparse/1"
_META_KEY = "ntksap.sparse"

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
        if p == "bias" and isinstance(module, nn.Conv2d | nn.Linear):
            v = v is not None
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


def _decode_arg(a: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_decode_arg(x, env) for x in a]
    if isinstance(a, dict):
        if "__node__" in a:
            return env[a["__node__"]]
        if "__tuple__" in a:
            return tuple(_decode_arg(x, env) for x in a["__tuple__"])
        if "__dict__" in a:
            return {k: _decode_arg(v, env) for k, v in a["__dict__"].items()}
        if "__slice__" in a:
            return slice(*(_decode_arg(x, env) for x in a["__slice__"]))
        if "__dtype__" in a:
            dtype = getattr(torch, a["__dtype__"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {a['__dtype__']!r} in the file")
            return dtype
        if "__ellipsis__" in a:
            return Ellipsis
        raise ValueError(f"unknown argument encoding {sorted(a)} in the file")
    return a


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
    return {
        "name": n.name,
        "op": n.op,
        "target": target,
        "args": _encode_arg(tuple(n.args)),
        "kwargs": _encode_arg(dict(n.kwargs)),
    }


class _Reader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"the file lacks tensor {key!r}: not a complete ntksap.sparse file")
        return self.tensors[key]

    def build(self, spec: dict[str, Any], existing: nn.Module | None = None) -> nn.Module:
        kind = spec.get("kind")
        if kind in ("conv", "linear"):
            cfg = dict(spec["config"])
            p = spec["prefix"]
            common = {
                "weight_shape": tuple(cfg["weight_shape"]),
                "rowptr": self.get(p + "rowptr"),
                "col_idx": self.get(p + "col_idx"),
                "values": self.get(p + "values"),
                "bias": self.get(p + "bias") if cfg["has_bias"] else None,
                "relu": cfg["relu"],
                "residual": cfg["residual"],
                "mode": cfg["mode"],
            }
            layer: _SparseBase
            if kind == "conv":
                pad = cfg["padding"]
                layer = SparseConv2d(
                    **common,
                    stride=tuple(cfg["stride"]),
                    padding=pad if isinstance(pad, str) else tuple(pad),
                    dilation=tuple(cfg["dilation"]),
                    groups=cfg["groups"],
                )
            else:
                layer = SparseLinear(**common)
            layer.source_name = cfg.get("source_name", "")
            return layer.eval()
        if kind == "chain":
            layers = [self.build(spec_) for spec_ in spec["layers"]]
            if not all(isinstance(layer, SparseConv2d) for layer in layers):
                raise ValueError("a chain in the file holds something other than convs")
            chain = SparseChain(
                layers,  # type: ignore[arg-type]
                [(int(a), int(b)) for a, b in spec["steps"]],
                int(spec["output"]),
                spec.get("mode", "fused"),
            )
            chain.name = str(spec.get("name", ""))
            chain.split_work = int(spec.get("split_work", -1))
            policy = spec.get("policy", "auto")
            if policy not in POLICIES:
                raise ValueError(f"chain policy {policy!r} in the file is not one of {POLICIES}")
            chain.policy = policy
            chain.fused_ms, chain.layers_ms = spec.get("fused_ms"), spec.get("layers_ms")
            return chain.eval()
        if kind == "graph":
            graph = fx.Graph()
            env: dict[str, fx.Node] = {}
            for nd in spec["nodes"]:
                op, target = nd["op"], nd["target"]
                if op == "call_function":
                    if target not in _FUNCTIONS:
                        raise ValueError(f"function {target!r} in the file is not allowed")
                    target = _FUNCTIONS[target]
                elif op == "call_method":
                    if not isinstance(target, str) or target.startswith("_"):
                        raise ValueError(f"method {target!r} in the file is not allowed")
                    if not hasattr(torch.Tensor, target):
                        raise ValueError(f"{target!r} in the file is not a torch.Tensor method")
                elif op not in ("placeholder", "get_attr", "call_module", "output"):
                    raise ValueError(f"unknown graph op {op!r} in the file")
                args = _decode_arg(nd["args"], env)
                kwargs = _decode_arg(nd["kwargs"], env)
                env[nd["name"]] = graph.create_node(op, target, args, kwargs, name=nd["name"])
            root: dict[str, Any] = {t: self.build(s) for t, s in spec["modules"].items()}
            for t in spec.get("attrs", []):
                root[t] = self.get(spec["prefix"] + t)
            gm = fx.GraphModule(root, graph)
            _assign_buffers(gm)
            return gm.eval()
        if kind == "torch":
            cls = _TORCH_MODULES.get(spec["class"])
            if cls is None:
                raise ValueError(f"module class {spec['class']!r} in the file is not allowed")
            module = cls(**{k: _decode_arg(v, {}) for k, v in spec["init"].items()})
            state = {
                k: self.get(spec["prefix"] + k)
                for k in module.state_dict()
                if spec["prefix"] + k in self.tensors
            }
            module.load_state_dict(state, strict=True)
            return module.eval()
        if kind == "container":
            cls = _CONTAINERS.get(spec["class"])
            if cls is None:
                raise ValueError(f"container class {spec['class']!r} in the file is not allowed")
            children = [self.build(s) for s in spec["children"].values()]
            return cls(children).eval()
        if kind == "python":
            if existing is None:
                raise ValueError(
                    f"the file needs the Python class {spec['class']!r} (an untraceable module) "
                    "but names no zoo model to rebuild it from"
                )
            for name, child_spec in spec["children"].items():
                child = getattr(existing, name)
                if child_spec["kind"] == "python":
                    self.build(child_spec, child)
                else:
                    setattr(existing, name, self.build(child_spec))
            with torch.no_grad():
                for k in spec["own"]:
                    getattr(existing, k).copy_(self.get(spec["prefix"] + k))
            return existing.eval()
        raise ValueError(f"unknown module kind {kind!r} in the file")


def save(module: SparseModel, path: str | os.PathLike[str]) -> Path:
    """Write a converted model to `path` (safetensors) and return the path.

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
    # serialised in memory, then written atomically: an existing file is never left
    # half-written (a full disk leaves it unchanged)
    content = save_bytes(writer.tensors, metadata={_META_KEY: json.dumps(meta)})
    return atomic_write(Path(path), content)


def load(path: str | os.PathLike[str]) -> SparseModel:
    """Read a model written by `save` (no pickle; only allow-listed modules and functions).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ntksap.sparse file, or one naming something not allowed.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ntksap.sparse file at {path}")
    with safe_open(str(path), framework="pt") as f:  # one open: metadata, then tensors
        raw = (f.metadata() or {}).get(_META_KEY)
        if raw is None:
            raise ValueError(f"{path} is not an ntksap.sparse file (no {_META_KEY!r} metadata)")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path}: unsupported format {meta.get('format')!r}, expected {FORMAT}"
            )
        # safe_open handles are not iterable: .keys() is needed
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    reader = _Reader(tensors)
    spec = meta["structure"]
    existing = None
    zoo = meta.get("zoo_model")
    if spec["kind"] == "python":
        if not zoo:
            raise ValueError(f"{path}: an untraceable model without a zoo name cannot be rebuilt")
        from ntksap import models

        kwargs = dict(zoo)
        existing = models.create(kwargs.pop("name"), **kwargs)
    net = reader.build(spec, existing)
    decisions = [
        LayerDecision(**{**d, "shape": tuple(d["shape"])}) for d in meta.get("decisions", [])
    ]
    return SparseModel(
        net,
        decisions,
        batch_size=meta.get("batch_size"),
        threads=meta.get("threads"),
        autotuned=bool(meta.get("autotuned")),
        source={"model": zoo, "untraced": meta.get("untraced", [])}
        if zoo
        else {"untraced": meta.get("untraced", [])},
    )
