"""`convert(model)`: a masked dense model -> an inference module with sparse layers.

What happens, in order:

1. A private copy of the model is taken (the user's model is never touched), masks are
   baked into it: the `masks` argument, and/or masks attached by `ntksap.apply_masks`.
2. The copy is traced with `torch.fx`. Where a module cannot be traced (data-dependent
   Python control flow, e.g. the zoo MLP's input check), its children are traced instead,
   recursively, and the module keeps its own Python `forward`.
3. In every traced graph, every `Conv2d` / `Linear` becomes a `SparseConv2d` /
   `SparseLinear`, and where the graph shows it is safe (the producer has exactly one user
   and each module is called once):
   - an eval-mode `BatchNorm2d` right after a conv is folded into the conv's weight and bias;
   - a ReLU right after a layer is fused into its epilogue;
   - `relu(conv(x) + y)` / `conv(x) + y` (a residual add, shapes checked on the example
     input) becomes one call `conv(x, y)` that adds `y` in the epilogue.
   Layers whose output dies inside the graph write into reused buffers (`BufferPool`).
4. Autotune (like cuDNN's benchmark mode): each masked layer (a mask given or attached, or
   exact zeros in its weight) is timed on the input it receives from `example_input`, in
   dense mode (`F.conv2d` / `F.linear`) and in sparse mode (the C++ kernels), a few calls
   each, and keeps the faster. Decisions and timings are in `module.decisions` and
   `module.summary()`. They hold for the example's batch size and the thread count
   (`threads`): convert once per deployment batch size (batch 1 and batch 64 differ: at
   batch 1 the kernels are latency-bound, at batch 64 throughput-bound).

5. Chains: every run of kernel-eligible masked convs (with the identity shortcuts between
   them) that has one input and one output used elsewhere, e.g. ResNet-20's whole
   convolutional trunk or a VGG block between two poolings, becomes one `SparseChain`: the
   C++ executor runs it in one call, 16 images at a time in a batch-interleaved layout
   (aligned AVX-512 strips, epilogue in registers) and any left-over images one by one,
   each group depth-first through the chain in one thread. The autotune times the chain
   against its layers one by one and keeps the faster (`module.summary()` shows both).

Without the C++ kernels (no compiler), sparse mode runs a pure-torch fallback: the result
is the same, and the autotune then mostly keeps dense mode (no chains are formed).

Example:
    >>> import torch, ntksap
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    ...                     nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(torch.rand_like(net[0].weight) < 0.1)
    >>> x = torch.randn(2, 3, 6, 6)
    >>> fast = convert(net, example_input=x, autotune=False)
    >>> torch.allclose(fast(x), net(x), atol=1e-5)
    True
"""

from __future__ import annotations

import functools
import operator
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ntksap.sparse import _ext
from ntksap.sparse.layers import (
    BufferPool,
    InferenceOnly,
    InputTypeError,
    SparseChain,
    SparseConv2d,
    SparseLinear,
    _SparseBase,
    check_input,
)

__all__ = ["LayerDecision", "SparseModel", "convert"]


@dataclass
class LayerDecision:
    """What `convert` did with one Conv2d / Linear (times in ms per call, None if not timed)."""

    name: str
    kind: str  # "conv" or "linear"
    shape: tuple[int, ...]
    density: float
    masked: bool
    bn_folded: bool = False
    fused: str = ""  # "relu", "residual", "residual+relu" or ""
    mode: str = "dense"
    dense_ms: float | None = None
    sparse_ms: float | None = None
    reason: str = ""
    chain: str = ""  # the SparseChain running this layer ("" if none)


@dataclass
class _Context:
    masked: set[str]
    names: dict[int, str]  # id(module) -> qualified name in the model
    root: nn.Module
    example: tuple[Any, ...] | None
    decisions: dict[str, LayerDecision] = field(default_factory=dict)
    untraced: list[str] = field(default_factory=list)
    chains: int = 0  # SparseChains made so far (their names are unique in the model)
    chain: bool = True  # form SparseChains at all


class SparseModel(InferenceOnly):
    """The inference-only module `convert` returns: `net` (the converted network) and the
    per-layer `decisions`. Always in eval mode; `train()` raises, and so does an input that
    requires grad while grad mode is on."""

    def __init__(
        self,
        net: nn.Module,
        decisions: list[LayerDecision],
        batch_size: int | None = None,
        threads: int | None = None,
        source: dict[str, Any] | None = None,
        autotuned: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.autotuned = autotuned
        self.decisions = decisions
        self.batch_size = batch_size
        self.threads = threads
        self.source = source or {}  # zoo model facts (for load), if any
        super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # What torch's dense model would refuse too: a floating input that is not float32,
        # any tensor off the CPU or not strided, an input that requires grad. Integer
        # tensors (indices) go to the network as they are; each sparse layer and chain
        # checks rank, channels and size of its own input.
        for i, a in enumerate((*args, *kwargs.values())):
            if isinstance(a, torch.Tensor):
                name = f"input {i}" if i < len(args) else f"input {list(kwargs)[i - len(args)]!r}"
                if a.is_floating_point() or a.is_complex():
                    check_input(a, "SparseModel", name, meta=False)
                elif not a.is_cpu or a.layout is not torch.strided:
                    raise InputTypeError(
                        f"SparseModel runs on dense CPU tensors, got {name} on {a.device} "
                        f"({a.layout})"
                    )
        with torch.no_grad():
            return self.net(*args, **kwargs)

    def layers(self) -> dict[str, _SparseBase]:
        """Converted layers by their name in the original model."""
        out = {}
        for m in self.net.modules():
            if isinstance(m, _SparseBase):
                out[m.source_name] = m
        return out

    def summary(self) -> str:
        """A per-layer table: shape, density, folding/fusion, mode and the autotune times."""
        tuned = (
            f"autotuned at batch {self.batch_size}, {self.threads} thread(s)"
            if self.autotuned
            else "not autotuned"
        )
        rows = [
            f"ntksap.sparse model: {tuned}, C++ kernels {'on' if _ext.available() else 'off'}",
            f"{'layer':<28} {'shape':<18} {'density':>8} {'fused':<16} {'mode':<7} "
            f"{'dense ms':>9} {'sparse ms':>9}  note",
        ]
        chains = self.chains()
        modes = self.layer_modes()
        for d in self.decisions:
            fused = "+".join(x for x in ("bn" if d.bn_folded else "", d.fused) if x)
            chain = chains.get(d.chain)
            mode = modes[d.name]
            note = f"in {d.chain}; {d.reason}" if chain is not None else d.reason
            rows.append(
                f"{d.name:<28} {'x'.join(map(str, d.shape)):<18} {d.density:>8.4f} "
                f"{fused or '-':<16} {mode:<7} {_ms(d.dense_ms):>9} {_ms(d.sparse_ms):>9}  "
                f"{note.rstrip('; ')}"
            )
        for name, chain in chains.items():
            rows.append(
                f"{name}: {len(chain.layers)} convs in one C++ call, mode {chain.mode}, "
                f"layout {chain.policy}"
                + (f", ops of >= {chain.split_work} MACs split" if chain.split_work >= 0 else "")
                + f" (whole chain: fused {_ms(chain.fused_ms)} ms, layer by layer "
                f"{_ms(chain.layers_ms)} ms)"
            )
        return "\n".join(rows)

    def chains(self) -> dict[str, SparseChain]:
        """The `SparseChain`s by name."""
        return {m.name: m for m in self.net.modules() if isinstance(m, SparseChain)}

    def layer_modes(self) -> dict[str, str]:
        """How each converted layer runs: "chain" (inside a fused SparseChain, always with the
        sparse kernel), "sparse" or "dense" (its own call)."""
        chains = self.chains()
        out = {}
        for d in self.decisions:
            chain = chains.get(d.chain)
            out[d.name] = "chain" if chain is not None and chain.mode == "fused" else d.mode
        return out

    def extra_repr(self) -> str:
        modes = list(self.layer_modes().values())
        n_sparse = sum(m in ("sparse", "chain") for m in modes)
        n_chain = sum(m == "chain" for m in modes)
        return (
            f"{n_sparse} of {len(modes)} layers sparse, {n_chain} of them in "
            f"{len(self.chains())} chain(s) (batch {self.batch_size}); see .summary()"
        )


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


# -- graph patterns -------------------------------------------------------------------------

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
# Ops that read a layer's output and return a NEW tensor (never a view or the same tensor),
# so the output's buffer may be reused once they ran.
_FRESH_MODULES = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.BatchNorm2d,
    _SparseBase,
    SparseChain,
)
_FRESH_FUNCTIONS = (
    operator.add,
    torch.add,
    F.relu,
    torch.relu,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    torch.cat,
)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _shape(node: Any) -> tuple | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return None
    return (tuple(meta.shape), meta.dtype)


def _fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight/bias with an eval-mode BN folded in: y = (conv(x) - mean) / std * g + b."""
    std = torch.sqrt(bn.running_var + bn.eps)  # type: ignore[operator]
    scale = bn.weight / std if bn.affine else 1.0 / std
    shift = bn.bias if bn.affine else torch.zeros_like(std)
    b0 = bias if bias is not None else torch.zeros_like(std)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return w, (b0 - bn.running_mean) * scale + shift  # type: ignore[operator]


def _foldable(bn: nn.Module, conv: nn.Module) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and isinstance(conv, nn.Conv2d)
        and not bn.training
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _make_layer(
    ctx: _Context, module: nn.Module, bn: nn.BatchNorm2d | None = None
) -> _SparseBase | None:
    """The Sparse* replacement of a Conv2d / Linear (BN folded in), or None to keep it."""
    name = ctx.names.get(id(module), "?")
    if module.weight.dtype != torch.float32:
        raise TypeError(
            f"ntksap.sparse converts float32 models; {name}.weight is {module.weight.dtype} "
            "(call model.float() first)"
        )
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return None
    w = module.weight.detach().clone()
    b = None if module.bias is None else module.bias.detach().clone()
    masked = f"{name}.weight" in ctx.masked or bool((w == 0).any())
    if bn is not None:
        w, b = _fold_bn(w, b, bn)
        w, b = w.detach(), b.detach()
    mode = "sparse" if masked else "dense"
    layer: _SparseBase
    if isinstance(module, nn.Conv2d):
        layer = SparseConv2d.from_dense(
            w,
            b,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            mode=mode,
        )
        kind = "conv"
    else:
        layer = SparseLinear.from_dense(w, b, mode=mode)
        kind = "linear"
    layer.source_name = name
    reason = "" if masked else "no mask and no zeros: dense"
    if masked and layer.kernel_reason:
        reason = f"kernel cannot run it: {layer.kernel_reason}"
    ctx.decisions[name] = LayerDecision(
        name=name,
        kind=kind,
        shape=tuple(w.shape),
        density=layer.density,
        masked=masked,
        bn_folded=bn is not None,
        mode=layer.mode,
        reason=reason,
    )
    return layer


# -- lowering -------------------------------------------------------------------------------


def _capture_args(ctx: _Context, module: nn.Module) -> tuple[Any, ...] | None:
    """The positional inputs `module` receives when the model runs on the example."""
    if ctx.example is None:
        return None
    if module is ctx.root:
        return ctx.example
    got: list[tuple[Any, ...]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        if not got:
            got.append(args)

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            ctx.root(*ctx.example)
    finally:
        handle.remove()
    return got[0] if got else None


def _lower(ctx: _Context, module: nn.Module, path: str) -> nn.Module:
    """`module` with its Conv2d / Linear converted (and fused where its graph allows)."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        return _make_layer(ctx, module) or module
    if not any(True for _ in module.children()):
        return module
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # data-dependent control flow, ModuleList without forward, ...
        ctx.untraced.append(f"{path or '<model>'}: {type(exc).__name__}")
        for name, child in list(module.named_children()):
            setattr(module, name, _lower(ctx, child, f"{path}.{name}" if path else name))
        return module
    args = _capture_args(ctx, module)
    if args is not None:
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*args)
        except Exception:  # shapes only enable the residual fusion: go on without
            pass
    _fuse(ctx, gm)
    return gm


def _fuse(ctx: _Context, gm: fx.GraphModule) -> None:
    graph = gm.graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")

    # 1. Conv2d / Linear -> Sparse*, with a following BN folded in.
    for node in list(graph.nodes):
        mod = _module(gm, node)
        if not isinstance(mod, nn.Conv2d | nn.Linear):
            continue
        users = list(node.users)
        bn_node = None
        if calls[node.target] == 1 and len(users) == 1 and users[0].op == "call_module":
            cand = _module(gm, users[0])
            if calls[users[0].target] == 1 and cand is not None and _foldable(cand, mod):
                bn_node = users[0]
        layer = _make_layer(ctx, mod, _module(gm, bn_node) if bn_node is not None else None)
        if layer is None:
            continue
        _set_submodule(gm, node.target, layer)  # type: ignore[arg-type]
        if bn_node is not None:
            bn_node.replace_all_uses_with(node)
            graph.erase_node(bn_node)

    def fusable(node: fx.Node) -> _SparseBase | None:
        mod = _module(gm, node)
        ok = isinstance(mod, _SparseBase) and calls[node.target] == 1 and len(node.users) == 1
        return mod if ok and not mod.relu and not mod.residual else None  # type: ignore[return-value]

    # 2. layer -> ReLU: fused into the layer's epilogue.
    for node in list(graph.nodes):
        layer = fusable(node)
        if layer is None or node.kwargs or len(node.args) != 1:
            continue
        user = next(iter(node.users))
        if _is_relu(gm, user):
            layer.relu = True
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            ctx.decisions[layer.source_name].fused = "relu"

    # 3. conv(x) + y [-> ReLU]: one call conv(x, y), when the shapes say no broadcasting.
    for node in list(graph.nodes):
        layer = fusable(node)
        if not isinstance(layer, SparseConv2d) or node.kwargs or len(node.args) != 1:
            continue
        add = next(iter(node.users))
        if not (
            add.op == "call_function"
            and add.target in _ADD_FUNCTIONS
            and len(add.args) == 2
            and not add.kwargs
        ):
            continue
        other = add.args[1] if add.args[0] is node else add.args[0]
        if not isinstance(other, fx.Node) or other is node:
            continue
        s_out, s_other, s_add = _shape(node), _shape(other), _shape(add)
        if s_out is None or not (s_out == s_other == s_add) or s_out[1] != torch.float32:
            continue
        with graph.inserting_before(add):
            fused = graph.call_module(node.target, args=(node.args[0], other))  # type: ignore[arg-type]
        fused.meta = dict(add.meta)
        layer.residual = True
        tag = "residual"
        end = add
        relu = next(iter(add.users)) if len(add.users) == 1 else None
        if relu is not None and _is_relu(gm, relu):
            layer.relu = True
            tag = "residual+relu"
            end = relu
        end.replace_all_uses_with(fused)
        if end is not add:
            graph.erase_node(end)
        graph.erase_node(add)
        graph.erase_node(node)
        ctx.decisions[layer.source_name].fused = tag

    if ctx.chain and _ext.available():
        _form_chains(ctx, gm)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    _assign_buffers(gm)


def _form_chains(ctx: _Context, gm: fx.GraphModule) -> None:
    """Replace every run of kernel-eligible sparse convs (and identity shortcuts between
    them) that has ONE input from outside and ONE value used outside by a `SparseChain`
    call: the C++ executor then runs the run in one call (see SparseChain). Runs with
    several inputs or outputs (feature pyramids, dense connections) stay layer by layer."""
    graph = gm.graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    order = {n: i for i, n in enumerate(graph.nodes)}

    def conv_of(n: fx.Node) -> SparseConv2d | None:
        mod = _module(gm, n)
        if not isinstance(mod, SparseConv2d) or mod.kernel_reason or calls[n.target] != 1:
            return None
        d = ctx.decisions.get(mod.source_name)
        if d is None or not d.masked or n.kwargs or len(n.args) != 1 + int(mod.residual):
            return None
        return mod if all(isinstance(a, fx.Node) for a in n.args) else None

    def member(n: fx.Node) -> bool:
        if n.op != "call_module":
            return False
        if _is_identity(gm, n):
            return len(n.args) == 1 and not n.kwargs and isinstance(n.args[0], fx.Node)
        return conv_of(n) is not None

    members = [n for n in graph.nodes if member(n)]
    parent = {n: n for n in members}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in members:
        for a in n.args:
            if a in parent:
                parent[find(a)] = find(n)  # type: ignore[index]
    comps: dict[fx.Node, list[fx.Node]] = {}
    for n in members:
        comps.setdefault(find(n), []).append(n)
    for nodes in sorted(comps.values(), key=lambda c: order[c[0]]):
        inside = set(nodes)
        convs = [n for n in nodes if conv_of(n) is not None]
        external = {a for n in nodes for a in n.args if a not in inside}
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if (
            len(convs) < 2
            or len(external) != 1
            or len(outputs) != 1
            or conv_of(outputs[0]) is None
            or any(not n.users for n in nodes)
        ):
            continue
        (source,) = external
        value: dict[fx.Node, int] = {source: 0}  # type: ignore[dict-item]
        layers: list[SparseConv2d] = []
        steps: list[tuple[int, int]] = []
        for n in nodes:  # graph order is a topological order
            if _is_identity(gm, n):
                value[n] = value[n.args[0]]  # type: ignore[index]
                continue
            layer = conv_of(n)
            assert layer is not None
            res = value[n.args[1]] if len(n.args) == 2 else -1  # type: ignore[index]
            steps.append((value[n.args[0]], res))  # type: ignore[index]
            layers.append(layer)
            value[n] = len(layers)
        chain = SparseChain(layers, steps, output=value[outputs[0]])
        name = chain.name = f"sparse_chain_{ctx.chains}"
        ctx.chains += 1
        gm.add_submodule(name, chain)
        with graph.inserting_after(outputs[0]):
            new = graph.call_module(name, args=(source,))
        new.meta = dict(outputs[0].meta)
        outputs[0].replace_all_uses_with(new)
        for n in reversed(nodes):
            graph.erase_node(n)
        for layer in layers:
            ctx.decisions[layer.source_name].chain = name


def _fresh_user(gm: fx.GraphModule, user: fx.Node) -> bool:
    if user.op == "call_module":
        mod = _module(gm, user)
        if isinstance(mod, nn.ReLU):
            return not mod.inplace
        return isinstance(mod, _FRESH_MODULES)
    if user.op == "call_function":
        return user.target in _FRESH_FUNCTIONS and not user.kwargs.get("inplace", False)
    return False


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An identity module call (nn.Identity, an empty nn.Sequential: a ResNet's shortcut),
    which returns its input tensor itself."""
    mod = _module(gm, node)
    return isinstance(mod, nn.Identity) or (isinstance(mod, nn.Sequential) and len(mod) == 0)


def _readers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes that read `node`'s tensor, looking through identity module calls (their
    output is the same tensor, so it stays alive as long as their users)."""
    out: list[fx.Node] = []
    for u in node.users:
        if u.op == "call_module" and _is_identity(gm, u) and len(u.args) == 1:
            out.extend(_readers(gm, u))
        else:
            out.append(u)
    return out


def _assign_buffers(gm: fx.GraphModule) -> None:
    """Give conv layers whose output dies inside this graph a reusable output buffer slot
    (interval colouring: values alive at the same time never share a slot)."""
    pool = BufferPool()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    slot_free_after: list[int] = []  # slot -> position of its current value's last reader
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if not isinstance(mod, SparseConv2d | SparseChain) or not node.users:
            continue
        readers = _readers(gm, node)
        if not readers or not all(_fresh_user(gm, u) for u in readers):
            continue
        here, dies = order[node], max(order[u] for u in readers)
        slot = next((s for s, free in enumerate(slot_free_after) if free < here), None)
        if slot is None:
            slot = len(slot_free_after)
            slot_free_after.append(dies)
        slot_free_after[slot] = dies
        mod.pool, mod.slot = pool, slot
    _assign_padding(gm)


def _assign_padding(gm: fx.GraphModule) -> None:
    """Chain sparse convs through zero-bordered buffers: a sparse-mode conv with a buffer
    slot whose conv users (sparse mode, stride 1, reading it as their input) all use the
    same padding p writes its output into the interior of a buffer with a p-wide zero
    border (`out_pad`), and those users read it in place (`in_padded`) instead of copying
    it into padded planes first (that copy was ~20 % of ResNet-20's batch-64 time). Other
    users see an ordinary strided tensor. Depends on the layers' modes: run again after
    they change (the autotune)."""
    convs = {n: m for n in gm.graph.nodes if isinstance(m := _module(gm, n), SparseConv2d)}
    for mod in convs.values():
        mod.out_pad, mod.in_padded = -1, False

    def sparse(m: SparseConv2d) -> bool:
        return m.mode == "sparse" and not m.kernel_reason

    for node, mod in convs.items():
        if mod.slot is None or not sparse(mod):
            continue
        readers = [
            convs[u]
            for u in node.users
            if u in convs and u.args and u.args[0] is node and sparse(convs[u])
        ]
        readers = [m for m in readers if tuple(m.stride) == (1, 1)]
        pads = {m.padding[0] for m in readers}  # type: ignore[index]
        if len(pads) == 1:
            mod.out_pad = int(pads.pop())
            for m in readers:
                m.in_padded = True


# -- autotune -------------------------------------------------------------------------------


def _time_pair_ms(
    fns: dict[str, Callable[[], Any]], min_calls: int = 5, min_seconds: float = 0.03
) -> dict[str, float]:
    """Per-call wall time in ms of each function: 2 warm-up calls each, then calls
    alternating between them (so both see the same machine load) until each has
    >= min_calls and all together >= min_seconds (at most 100 each); the lower quartile,
    which resists the spikes other processes cause on a shared machine."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while True:
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
        n = len(times[next(iter(fns))])
        if n >= 100 or (n >= min_calls and time.perf_counter() - start >= min_seconds):
            break
    return {k: 1e3 * statistics.quantiles(v, n=4)[0] for k, v in times.items()}


def _autotune(ctx: _Context, model: SparseModel, example: tuple[Any, ...]) -> None:
    layers = [m for m in model.net.modules() if isinstance(m, _SparseBase)]
    chains = [m for m in model.net.modules() if isinstance(m, SparseChain)]
    inputs: dict[int, tuple[Any, ...]] = {}

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        inputs.setdefault(id(m), tuple(a.clone() if torch.is_tensor(a) else a for a in args))

    # chains run layer by layer once, so that every layer's own input is seen
    for chain in chains:
        chain.set_mode("layers")
    handles = [m.register_forward_pre_hook(hook) for m in [*layers, *chains]]
    try:
        model(*example)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for layer in layers:
            d = ctx.decisions[layer.source_name]
            args = inputs.get(id(layer))
            if args is None:
                d.reason = d.reason or "not reached by the example input"
                continue
            if not d.masked or layer.kernel_reason:
                continue

            def run(mode: str, layer: _SparseBase = layer, args: tuple = args) -> Any:
                return layer.compute(mode, *args)

            times = _time_pair_ms({m: functools.partial(run, m) for m in ("dense", "sparse")})
            d.dense_ms, d.sparse_ms = times["dense"], times["sparse"]
            best = min(times, key=times.get)  # type: ignore[arg-type]
            layer.set_mode(best)
            d.mode = best
            if not _ext.available() and best == "sparse":
                d.reason = "pure-torch fallback (no C++ kernels)"
        # then each chain: the executor vs its layers one by one (in their tuned modes)
        for chain in chains:
            args = inputs.get(id(chain))
            if args is None:
                chain.set_mode("fused")
                continue

            def run_chain(mode: str, chain: SparseChain = chain, args: tuple = args) -> Any:
                return chain.compute(mode, *args)

            # The executor's settings, by measurement: the blocked layout for full groups of
            # 16 images ("auto") or the NCHW kernel for every image ("spatial", better when
            # groups cannot keep every thread busy, e.g. batch 16 on 2 threads); and with
            # fewer images than threads, whether big ops split their output channels
            # between the threads (-1: never).
            x = args[0]
            small = torch.is_tensor(x) and x.dim() == 4 and x.shape[0] < torch.get_num_threads()
            settings = [("auto", -1), ("spatial", -1)]
            if torch.is_tensor(x) and x.dim() == 4 and x.shape[0] // 16 < torch.get_num_threads():
                settings += [("auto", 1 << 16), ("auto", 1 << 19)]
            if small:
                settings += [("spatial", 1 << 16), ("spatial", 1 << 19)]
            tried = {}
            for policy, work in settings:
                chain.policy, chain.split_work = policy, work
                tried[(policy, work)] = _time_pair_ms(
                    {"fused": functools.partial(run_chain, "fused")}
                )["fused"]
            chain.policy, chain.split_work = min(tried, key=tried.get)  # type: ignore[arg-type]
            times = _time_pair_ms({m: functools.partial(run_chain, m) for m in ("fused", "layers")})
            chain.fused_ms, chain.layers_ms = times["fused"], times["layers"]
            chain.set_mode(min(times, key=times.get))  # type: ignore[arg-type]


# -- entry point ----------------------------------------------------------------------------


def _default_example(model: nn.Module) -> tuple[torch.Tensor] | None:
    from ntksap.models.base import MODEL_ATTRIBUTE, defaults

    info = getattr(model, MODEL_ATTRIBUTE, None)
    if not isinstance(info, dict) or "name" not in info:
        return None
    shape = list(defaults(info["name"]).input_shape)
    shape[0] = int(info.get("in_channels", shape[0]))
    if "input_size" in info:
        shape[1:] = [int(info["input_size"])] * 2
    return (torch.randn(1, *shape),)


def convert(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    example_input: torch.Tensor | tuple[Any, ...] | None = None,
    autotune: bool = True,
    threads: int | None = None,
    chain: bool = True,
) -> SparseModel:
    """An inference-only copy of `model` whose masked Conv2d / Linear run sparse where that
    is faster (see the module docstring for every step).

    Args:
        model: a float32 `nn.Module` (left untouched). BatchNorm layers are used in eval mode.
        masks: `Masks` (or dict) param name -> bool mask, applied on top of masks attached
            with `ntksap.apply_masks` (if any). Without either, exact zeros in the weights
            mark the sparse layers.
        example_input: one input batch (or a tuple of positional inputs) with the shapes and
            batch size the model will serve; used for the autotune and to check residual
            shapes. Default for zoo models: one random image of the model's input shape.
        autotune: time dense vs sparse per layer and keep the faster; False: every masked
            layer the kernel can run is sparse.
        threads: torch threads during the autotune (default: the current setting); use the
            count the model will run with.
        chain: run each run of sparse convs (one input, one output: a ResNet trunk, a VGG
            block) in one C++ call (`SparseChain`, see step 5 above); False: layer by layer.

    Raises:
        ValueError: autotune without an example input for a non-zoo model.
        TypeError: not an nn.Module, or a non-float32 weight.
        ntksap.MaskError: masks that do not fit the model.
    """
    from ntksap.attach import get_masks, private_copy, remove_masks
    from ntksap.masks import Masks
    from ntksap.models.base import MODEL_ATTRIBUTE

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    work = private_copy(model)
    attached = get_masks(work)
    remove_masks(work)
    masked = set(attached)
    if masks is not None:
        masks = masks if isinstance(masks, Masks) else Masks(dict(masks))
        masks.check_model(work)
        params = dict(work.named_parameters())
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask.to(params[name].dtype))
        masked |= set(masks)
    work.eval().requires_grad_(False)

    if example_input is None:
        example = _default_example(model)
        if example is None and autotune:
            raise ValueError(
                "convert(autotune=True) needs example_input (one batch of the shape and batch "
                "size the model will serve) for a model not built by ntksap.models; or pass "
                "autotune=False"
            )
    else:
        example = example_input if isinstance(example_input, tuple) else (example_input,)

    ctx = _Context(
        masked=masked,
        names={id(m): n for n, m in work.named_modules()},
        root=work,
        example=example,
        chain=bool(chain),
    )
    net = _lower(ctx, work, "")
    net.eval()
    info = getattr(model, MODEL_ATTRIBUTE, None)
    batch = None
    if example is not None and torch.is_tensor(example[0]) and example[0].dim() > 0:
        batch = int(example[0].shape[0])
    used_threads = threads or torch.get_num_threads()
    result = SparseModel(
        net,
        list(ctx.decisions.values()),
        batch_size=batch,
        threads=used_threads,
        source={"model": info, "untraced": ctx.untraced} if info else {"untraced": ctx.untraced},
    )
    if autotune and example is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(used_threads)
        try:
            _autotune(ctx, result, example)
            result.autotuned = True
        finally:
            torch.set_num_threads(before)
        for gm in result.modules():
            if isinstance(gm, fx.GraphModule):
                _assign_padding(gm)  # the modes may have changed
    if _ext.available():
        for layer in result.layers().values():
            layer.drop_dense_copy()
    return result


def decisions_json(decisions: list[LayerDecision]) -> list[dict[str, Any]]:
    """The decisions as JSON-able dicts (for save and benchmark evidence)."""
    return [asdict(d) for d in decisions]
