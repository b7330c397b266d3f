"""Compaction: remove dead channels and units of a pruned network, keeping its outputs.

At high sparsity some channels (units) of a pruned network lie on no input-to-output path
(`ntksap.masks.effective`): a channel with no kept output path cannot change the output,
and a channel with no kept input path outputs a constant (its bias, BatchNorm's beta after
the running statistics, through the activation). `compact` deletes such channels and gives
a smaller DENSE model (fewer conv filters, narrower Linear layers) that computes the same
function as the masked dense model in eval mode; pruned weights of what remains stay exact
zeros, so the result can still be run by a sparse kernel (`ntksap.sparse`) or exported.

What is removed, and why the outputs do not change. The channels of one "group" are the
channels of a feature map that several layers share: a conv's output channels, the
BatchNorm after it, and the input channels of every layer that reads it; in a residual
stream, every block that writes into it or reads from it (a stream channel can go only if
it is dead in every one of them). A group's channel is dead when no effective weight writes
it or reads it. When it is removed, what it fed into each consumer layer (a conv or
Linear reading it) is computed on a reference input: zero (the usual case, e.g. at
initialisation, or a channel with no output path, whose consumers are dead too), or a
constant that is the same at every position, folded into the consumer's bias (a bias is
created where the layer had none). A constant that differs between positions, as a
constant channel read by a zero-padded conv gives near the borders, cannot be folded:
such a channel is KEPT (with whatever feeds it), so the outputs stay equal; the
`CompactionResult` counts them. After the surgery the compacted model is checked against
the masked model on two random inputs; a difference above 1e-5 (relative to the largest
output) raises `CompactionError` rather than returning a wrong model.

Which models. The zoo models (`ntksap.models`: CIFAR and ImageNet ResNets, VGG-BN, LeNet-5,
MLP) are handled with their known block structure and need nothing beyond torch. Any other
model is traced by Torch-Pruning's dependency graph (`torch_pruning`, the `deploy` extra),
which finds the coupled layers (residual additions, concatenations, flatten); groups that
hold a layer this module cannot cut exactly (depthwise or grouped convs, LayerNorm,
GroupNorm, transposed convs, embeddings, bare parameters), or that produce the model's
output, are left whole.

The compacted model is for inference: BatchNorm keeps its running statistics and the model
is returned in eval mode (in train mode BatchNorm uses batch statistics, which a folded
constant does not follow). It is exact for inputs of the example input's spatial size:
which conv taps only ever read zero padding, and so which channels are dead, can depend
on it (e.g. a 3x3 conv on a 1x1 map uses only its centre tap).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ntksap.masks import Masks
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> keep = torch.ones(3, 4, dtype=torch.bool)
    >>> keep[1] = False                       # hidden unit 1 keeps no input weight ...
    >>> masks = Masks({"0.weight": keep, "2.weight": torch.ones(2, 3, dtype=torch.bool)})
    >>> small = compact(net, masks, example_input=torch.randn(2, 4))
    >>> small[0], small[2]                    # ... so it goes, its bias folded into layer 2
    (Linear(in_features=4, out_features=2, bias=True), Linear(in_features=2, out_features=2, bias=True))
    >>> report = compaction_report(net, masks, small, example_input=torch.randn(2, 4), repeats=2)
    >>> report.params_before, report.params_after
    (23, 16)
"""  # noqa: E501

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ntksap.attach import private_copy, remove_masks
from ntksap.masks import Masks
from ntksap.targets import named_parameters_canonical

__all__ = [
    "CompactionError",
    "CompactionResult",
    "compact",
    "compact_with_masks",
    "compaction_report",
    "relative_error",
]

#: Largest max|compacted - masked| / max|masked| that `compact` accepts.
TOLERANCE = 1e-5

OUTPUT_GROUP = "it produces the model's output"

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm


class CompactionError(ValueError):
    """The model cannot be compacted exactly (or the outputs did not match)."""


# ---------------------------------------------------------------------------------------
# Channel groups
# ---------------------------------------------------------------------------------------
@dataclass
class _Member:
    """One layer's share of a channel group.

    role: "out" (a conv's output channels / a Linear's rows, and their bias), "in" (a conv's
    input channels / a Linear's columns), "bn" (a BatchNorm's per-channel entries).
    local[r]: the layer-local indices of the group's channel r (a Linear after a flatten
    reads several columns per channel).
    """

    module: nn.Module
    role: str
    local: list[list[int]]


@dataclass
class _Group:
    """The channels of one feature map and every layer that writes or reads them."""

    size: int
    members: list[_Member] = field(default_factory=list)

    def add(self, module: nn.Module, role: str, per: int = 1) -> None:
        local = [list(range(r * per, (r + 1) * per)) for r in range(self.size)]
        self.members.append(_Member(module, role, local))


def _chain(producers: Sequence[nn.Module], size: int) -> _Group:
    g = _Group(size)
    for p in producers:
        g.add(p, "bn" if isinstance(p, _BN) else "out")
    return g


def _zoo_groups(model: nn.Module) -> list[_Group] | None:
    """The channel groups of a zoo model from its known structure; None for other models."""
    from ntksap.models import cifar_resnet, imagenet_resnet, small, vgg

    if isinstance(model, cifar_resnet.CifarResNet | imagenet_resnet.ImageNetResNet):
        groups: list[_Group] = []
        stream = _chain([model.conv1, model.bn1], model.conv1.out_channels)
        stages = [model.layer1, model.layer2, model.layer3]
        if isinstance(model, imagenet_resnet.ImageNetResNet):
            stages.append(model.layer4)
        for stage in stages:
            for block in stage:
                convs = [block.conv1, block.conv2] + (
                    [block.conv3] if hasattr(block, "conv3") else []
                )
                bns = [block.bn1, block.bn2] + ([block.bn3] if hasattr(block, "bn3") else [])
                proj = getattr(block, "shortcut", None) or getattr(block, "downsample", None)
                if isinstance(proj, nn.Identity):
                    proj = None
                stream.add(convs[0], "in")
                if proj is not None:  # the stream ends here; the projection starts the next
                    stream.add(proj[0], "in")
                    groups.append(stream)
                    stream = _chain([proj[0], proj[1]], proj[0].out_channels)
                for k in range(len(convs) - 1):  # block-internal feature maps
                    inner = _chain([convs[k], bns[k]], convs[k].out_channels)
                    inner.add(convs[k + 1], "in")
                    groups.append(inner)
                stream.add(convs[-1], "out")
                stream.add(bns[-1], "bn")
        stream.add(model.fc, "in")
        groups.append(stream)
        return groups
    if isinstance(model, vgg.VGG):
        layers = [m for m in model.features if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
        groups, current = [], None
        for m in layers:
            if isinstance(m, nn.Conv2d):
                if current is not None:
                    current.add(m, "in")
                    groups.append(current)
                current = _chain([m], m.out_channels)
            else:
                assert current is not None
                current.add(m, "bn")
        assert current is not None
        current.add(model.classifier, "in")
        groups.append(current)
        return groups
    if isinstance(model, small.LeNet5):
        c1, c2 = model.features[0], model.features[3]
        g1 = _chain([c1], c1.out_channels)
        g1.add(c2, "in")
        g2 = _chain([c2], c2.out_channels)
        out = model.pool.output_size
        per = out * out if isinstance(out, int) else int(torch.tensor(out).prod())
        g2.add(model.fc1, "in", per)  # channel c -> columns c*per ... c*per + per - 1
        g3 = _chain([model.fc1], model.fc1.out_features)
        g3.add(model.fc2, "in")
        g4 = _chain([model.fc2], model.fc2.out_features)
        g4.add(model.fc3, "in")
        return [g1, g2, g3, g4]
    if isinstance(model, small.MLP):
        linears = [m for m in model.layers if isinstance(m, nn.Linear)]
        groups = []
        for a, b in itertools.pairwise(linears):
            g = _chain([a], a.out_features)
            g.add(b, "in")
            groups.append(g)
        return groups
    return None


def _output_layers(model: nn.Module, x: torch.Tensor) -> set[int]:
    """id() of the conv/Linear layers whose output IS (a view of) a model output: their
    output channels are the model's interface and are never cut."""
    outs: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out: outs.__setitem__(id(mod), out))
        for m in model.modules()
        if isinstance(m, _CONV | nn.Linear)
    ]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    found: list[torch.Tensor] = []

    def collect(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, Mapping):
            for u in v.values():
                collect(u)
        elif isinstance(v, list | tuple):
            for u in v:
                collect(u)

    collect(y)
    ptrs = {t.untyped_storage().data_ptr() for t in found}
    return {
        key
        for key, out in outs.items()
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() in ptrs
    }


def _tp_groups(model: nn.Module, x: torch.Tensor) -> tuple[list[_Group], list[str]]:
    """Channel groups of any model from Torch-Pruning's dependency graph, and notes on the
    groups left whole (with the reason)."""
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise CompactionError(
            f"compacting a model outside the ntksap zoo ({type(model).__name__}) needs "
            "Torch-Pruning's dependency graph: pip install 'ntksap[deploy]' "
            f"(or torch-pruning); import failed: {exc}"
        ) from None
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        raw = list(graph.get_all_groups(root_module_types=(_CONV, nn.Linear)))
    except Exception as exc:
        raise CompactionError(
            f"Torch-Pruning cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "compaction needs a model it can trace with example_input"
        ) from exc
    names = {id(m): n for n, m in model.named_modules()}
    heads = _output_layers(model, x)
    groups: list[_Group] = []
    notes: list[str] = []
    for tg in raw:
        root = tg.items[0].dep.target.module
        where = names.get(id(root), type(root).__name__)
        size = len(tg.items[0].idxs)
        group = _Group(size)
        problem = None
        for item in tg.items:
            mod = item.dep.target.module
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(mod, tp.ops._OutputOp) or (is_out and id(mod) in heads):
                problem = OUTPUT_GROUP
            elif isinstance(mod, tp.ops._CustomizedOp | nn.Parameter):
                problem = f"it holds {type(mod).__name__}, which cannot be cut here"
            elif type(mod).__module__.startswith("torch_pruning"):
                continue  # index-only ops: elementwise, reshape, concat, split, ...
            elif isinstance(mod, _CONV) and (mod.groups != 1 or mod.transposed):
                problem = f"{names.get(id(mod), '?')} is a grouped or transposed conv"
            elif isinstance(mod, _BN):
                if mod.running_mean is None:
                    problem = f"{names.get(id(mod), '?')} has no running statistics"
            elif not isinstance(mod, _CONV | nn.Linear):
                problem = f"{names.get(id(mod), '?')} is a {type(mod).__name__}"
            if problem:
                break
            role = "bn" if isinstance(mod, _BN) else "out" if is_out else "in"
            local: list[list[int]] = [[] for _ in range(size)]
            for i, r in zip(item.idxs, item.root_idxs):
                if r is None:
                    problem = "its index mapping is not one-to-one"
                    break
                local[int(r)].append(int(i))
            if problem:
                break
            group.members.append(_Member(mod, role, local))
        if problem == OUTPUT_GROUP:
            continue  # the model's outputs are never cut: nothing to report
        if problem:
            notes.append(f"group of {where} left whole: {problem}")
        elif group.members:
            groups.append(group)
    return groups, notes


# ---------------------------------------------------------------------------------------
# The plan: which channels go, what is folded
# ---------------------------------------------------------------------------------------
def _conv_like(module: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`module`'s linear map (no bias) with weight `w` applied to `x`: (N, out, *spatial) for
    a conv, (rows, out) for a Linear (leading dims flattened)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]) @ w.t()
    assert isinstance(module, _CONV)
    nd = w.dim() - 2
    if module.padding_mode != "zeros":
        pad = module._reversed_padding_repeated_twice
        x = F.pad(x, pad, mode=module.padding_mode)
        padding: Any = 0
    else:
        padding = module.padding
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, w, None, module.stride, padding, module.dilation, 1)


@dataclass
class _Plan:
    removed: list[set[int]]  # per group, the root channels that go
    folds: dict[int, dict[int, torch.Tensor]]  # group -> id(consumer) -> float64 bias (all rows)
    kept_constant: int  # dead channels kept because their constant cannot be folded


def _plan(
    groups: list[_Group],
    eff: Mapping[int, torch.Tensor],
    inputs: Mapping[int, torch.Tensor],
    weights: Mapping[int, torch.Tensor],
    varying: Mapping[int, list[bool]],
    align: int = 1,
) -> _Plan:
    """Which channels to remove (dead ones, minus those whose constant cannot be folded) and
    the bias each consumer gets. Keyed by id(module): `eff` the effective mask of a layer's
    weight, `inputs` a consumer's input on the reference batch and `weights` its weight
    (both float64 on the CPU), `varying` per input column whether its value changes with
    the input.

    A dead channel whose value changes with the input has an input path, so it has no output
    path: every row it reaches is dead too (else it would be on a path), and what it adds
    there does not matter. A dead channel with a constant value (no input path) may reach
    rows that matter: its contribution is folded into their bias when it is the same at
    every position, else the channel is kept."""
    removed: list[set[int]] = []
    for g in groups:
        touched = [False] * g.size
        for mem in g.members:
            e = eff.get(id(mem.module))
            if e is None or mem.role == "bn":
                continue
            # per layer-local index: does any effective weight write (row) or read (column) it
            any_at = (e if mem.role == "out" else e.transpose(0, 1)).flatten(1).any(1).tolist()
            for r, idx in enumerate(mem.local):
                touched[r] = touched[r] or any(any_at[i] for i in idx)
        dead = {r for r in range(g.size) if not touched[r]}
        if len(dead) == g.size and g.size:
            dead.discard(0)  # a layer needs at least one channel; this one stays, exactly
        removed.append(dead)

    def realign() -> bool:
        """Keep a multiple of `align` channels per group (dead ones stay, exactly, as any
        kept channel); True if a channel was kept."""
        changed = False
        for g, dead in zip(groups, removed):
            keep = g.size - len(dead)
            extra = min(g.size, -(-keep // align) * align) - keep
            for r in sorted(dead)[:extra]:
                dead.discard(r)
                changed = True
        return changed

    # consumers: id(module) -> (module, [(group index, member)])
    consumers: dict[int, tuple[nn.Module, list[tuple[int, _Member]]]] = {}
    for gi, g in enumerate(groups):
        for mem in g.members:
            if mem.role == "in":
                consumers.setdefault(id(mem.module), (mem.module, []))[1].append((gi, mem))
    producer_of: dict[int, tuple[int, _Member]] = {}
    for gi, g in enumerate(groups):
        for mem in g.members:
            if mem.role == "out":
                producer_of[id(mem.module)] = (gi, mem)

    realign()
    kept_constant = 0
    while True:
        changed = False
        folds: dict[int, dict[int, torch.Tensor]] = {}
        for key, (module, mems) in consumers.items():
            w = weights[key]
            rows = torch.ones(w.shape[0], dtype=torch.bool)
            if key in producer_of:  # rows that go anyway: what they receive does not matter
                gi, mem = producer_of[key]
                for r in removed[gi]:
                    rows[mem.local[r]] = False
            x = inputs[key]
            # per input column: is it non-zero anywhere / read by a kept row
            x_nonzero = (
                x.transpose(0, 1) if isinstance(module, _CONV) else x.reshape(-1, x.shape[-1]).t()
            )
            x_nonzero = x_nonzero.reshape(x_nonzero.shape[0], -1).any(1).tolist()
            read = w[rows].transpose(0, 1).flatten(1).any(1).tolist()
            for gi, mem in mems:
                for r in sorted(removed[gi]):
                    cols = mem.local[r]
                    if any(varying[key][c] for c in cols):
                        continue  # input-dependent: reaches dead rows only
                    if not any(x_nonzero[c] and read[c] for c in cols):
                        continue  # 0 here, or read by no kept row: nothing to fold
                    xr = x[:, cols] if isinstance(module, _CONV) else x[..., cols]
                    # what channel r alone adds to every output: (N, out, *spatial) for a
                    # conv, (leading dims, out) for a Linear
                    contribution = _conv_like(module, xr, w[:, cols])
                    per_row = contribution.transpose(0, 1).reshape(w.shape[0], -1)[rows]
                    lo, hi = per_row.min(dim=1).values, per_row.max(dim=1).values
                    scale = per_row.abs().max().clamp_min(1e-300)
                    if bool(((hi - lo) > 1e-9 * scale).any()):
                        removed[gi].discard(r)  # position-dependent: keep the channel
                        kept_constant += 1
                        changed = True
                    else:
                        total = folds.setdefault(gi, {}).setdefault(
                            key, torch.zeros(w.shape[0], dtype=torch.float64)
                        )
                        total[rows] += per_row.mean(dim=1)
        if not changed:
            break
        realign()  # channels kept for their constant may break the alignment
    return _Plan(removed, folds, kept_constant)


# ---------------------------------------------------------------------------------------
# The surgery
# ---------------------------------------------------------------------------------------
def _slice_param(module: nn.Module, attr: str, dim: int, keep: torch.Tensor) -> None:
    p = getattr(module, attr)
    if p is None:
        return
    new = p.detach().index_select(dim, keep.to(p.device)).clone()
    if isinstance(p, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=p.requires_grad))
    else:
        setattr(module, attr, new)


class _Surgeon:
    """Cuts channels out of a model's layers, by ORIGINAL layer-local index (a layer cut for
    one group keeps its indices for the next), and folds constants into biases; with
    snapshots, so a group whose cut breaks the model can be undone."""

    def __init__(self, model: nn.Module, masks: Masks) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.masks = {k: v.clone() for k, v in masks.items()}
        self.present: dict[tuple[int, str], list[int]] = {}  # original indices still there

    def _size(self, module: nn.Module, role: str) -> int:
        if role == "bn":
            return module.num_features
        return module.weight.shape[1 if role == "in" else 0]

    def fold(self, module: nn.Module, bias: torch.Tensor) -> None:
        """Add `bias` (float64, one entry per ORIGINAL output row) to the layer's bias."""
        rows = self.present.get((id(module), "out"))
        add = bias if rows is None else bias[rows]
        add = add.to(module.weight.device, module.weight.dtype)
        with torch.no_grad():
            if module.bias is None:
                module.bias = nn.Parameter(add.clone())
            else:
                module.bias.add_(add)

    def cut(self, module: nn.Module, role: str, drop: set[int]) -> None:
        """Remove the original layer-local indices `drop` along the `role` dimension, and the
        same entries of the layer's masks."""
        key = (id(module), role)
        present = self.present.setdefault(key, list(range(self._size(module, role))))
        if not drop & set(present):
            return
        keep_pos = [pos for pos, orig in enumerate(present) if orig not in drop]
        self.present[key] = [present[pos] for pos in keep_pos]
        keep = torch.tensor(keep_pos, dtype=torch.long)
        name = self.names[id(module)]
        prefix = f"{name}." if name else ""
        if role == "bn":
            for attr in ("weight", "bias"):
                _slice_param(module, attr, 0, keep)
            for attr in ("running_mean", "running_var"):
                buf = getattr(module, attr)
                if buf is not None:
                    module._buffers[attr] = buf.index_select(0, keep.to(buf.device)).clone()
            module.num_features = len(keep)
            return
        dim = 1 if role == "in" else 0
        _slice_param(module, "weight", dim, keep)
        if f"{prefix}weight" in self.masks:
            self.masks[f"{prefix}weight"] = self.masks[f"{prefix}weight"].index_select(dim, keep)
        if role == "out":
            _slice_param(module, "bias", 0, keep)
            if f"{prefix}bias" in self.masks:
                self.masks[f"{prefix}bias"] = self.masks[f"{prefix}bias"].index_select(0, keep)
        if isinstance(module, nn.Linear):
            module.in_features, module.out_features = module.weight.shape[1], module.weight.shape[0]
        else:
            module.in_channels, module.out_channels = module.weight.shape[1], module.weight.shape[0]

    _ATTRS = (
        "in_channels", "out_channels", "in_features", "out_features", "num_features"
    )  # fmt: skip

    def snapshot(self, modules: Sequence[nn.Module]) -> Any:
        """What `restore` needs to undo cuts and folds of `modules`."""
        state = []
        for m in modules:
            params = {
                k: (v, None if v is None else v.detach().clone()) for k, v in m._parameters.items()
            }
            attrs = {a: getattr(m, a) for a in self._ATTRS if hasattr(m, a)}
            state.append((m, params, dict(m._buffers), attrs))
        return state, dict(self.present), dict(self.masks)

    def restore(self, snap: Any) -> None:
        state, self.present, self.masks = snap[0], dict(snap[1]), dict(snap[2])
        with torch.no_grad():
            for m, params, buffers, attrs in state:
                m._parameters.clear()
                for k, (p, value) in params.items():
                    if p is not None:
                        p.copy_(value)
                    m._parameters[k] = p
                m._buffers.clear()
                m._buffers.update(buffers)
                for a, v in attrs.items():
                    setattr(m, a, v)


def relative_error(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over every tensor of two model outputs (tensor, tuple or dict).

    >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
    0.5
    """
    if isinstance(b, torch.Tensor):
        a_t, b_t = a.detach().double(), b.detach().double()
        if a_t.shape != b_t.shape:
            return float("inf")
        scale = float(b_t.abs().max()) if b_t.numel() else 0.0
        diff = float((a_t - b_t).abs().max()) if b_t.numel() else 0.0
        return diff / scale if scale > 0 else diff
    if isinstance(b, Mapping):
        return max((relative_error(a[k], b[k]) for k in b), default=0.0)
    if isinstance(b, list | tuple):
        return max((relative_error(u, v) for u, v in zip(a, b)), default=0.0)
    return 0.0


def _input_for(
    model: nn.Module, masks: Masks, example_input: torch.Tensor | None, batch: int = 2
) -> torch.Tensor:
    """A random float batch shaped like `example_input` (or the masks' / zoo's input shape)."""
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(
                f"example_input must be a tensor (batch, *input_shape), got "
                f"{type(example_input).__name__}"
            )
        shape = tuple(example_input.shape[1:])
        dtype = example_input.dtype if example_input.is_floating_point() else torch.float32
    else:
        shape = masks.metadata.get("input_shape")
        if shape is None:
            zoo = getattr(model, "ntksap_model", None)
            if isinstance(zoo, dict) and isinstance(zoo.get("name"), str):
                from ntksap import models

                default = models.defaults(zoo["name"]).input_shape
                side = zoo.get("input_size")  # e.g. the MLP's image side
                spatial = (side, side) if isinstance(side, int) else default[1:]
                shape = (zoo.get("in_channels", default[0]), *spatial)
        if shape is None:
            raise ValueError(
                "compaction needs an example input: pass example_input=torch.randn(1, *shape) "
                "(or masks from ntksap.prune, which record the input shape)"
            )
        shape, dtype = tuple(shape), None
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=gen, dtype=torch.float64).to(device, dtype)


def _prepared(model: nn.Module, masks: Masks) -> nn.Module:
    """A private eval-mode copy of `model` with the masks baked in (pruned weights = 0)."""
    work = private_copy(model)
    if any(parametrize.is_parametrized(m) for m in work.modules()):
        remove_masks(work)
        if any(parametrize.is_parametrized(m) for m in work.modules()):
            raise CompactionError(
                "the model has parametrizations other than ntksap masks; remove them first"
            )
    params = named_parameters_canonical(work)
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m.to(params[name].device, params[name].dtype))
    return work.eval()


def compact_with_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    example_input: torch.Tensor | None = None,
    *,
    verify: bool = True,
    align: int = 1,
) -> tuple[nn.Module, Masks, list[str]]:
    """`compact`, also returning the masks of the compacted model (the input masks with the
    removed rows/columns cut away; same names) and notes (groups left whole, channels kept
    for an unfoldable constant)."""
    from ntksap.validate import positive_int

    positive_int("align", align)
    masks = masks if isinstance(masks, Masks) else Masks(masks)
    masks.check_model(model)
    work = _prepared(model, masks)
    x = _input_for(work, masks, example_input)
    with torch.no_grad():
        reference = work(x)

    notes: list[str] = []
    groups = _zoo_groups(work)
    zoo = groups is not None
    if groups is None:
        groups, notes = _tp_groups(work, x)

    from ntksap.masks import effective

    # every conv/Linear weight takes part; the unmasked ones count as dense
    names = {id(m): n for n, m in work.named_modules()}
    full = dict(masks)
    for mod_name, mod in work.named_modules():
        if isinstance(mod, _CONV | nn.Linear):
            wname = f"{mod_name}.weight" if mod_name else "weight"
            full.setdefault(wname, torch.ones_like(mod.weight, dtype=torch.bool))
    eff_masks = effective(work, Masks(full), input_shape=tuple(x.shape[1:]))
    eff: dict[int, torch.Tensor] = {}
    for g in groups:
        for mem in g.members:
            if mem.role != "bn":
                name = names[id(mem.module)]
                eff[id(mem.module)] = eff_masks[f"{name}.weight" if name else "weight"]

    # the input of every consumer on two reference batches (float64 for exact folds)
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = x2.to(x.device, x.dtype)
    consumers = {
        id(mem.module): mem.module for g in groups for mem in g.members if mem.role == "in"
    }
    seen: list[dict[int, torch.Tensor]] = [{}, {}]
    outputs = []
    for batch, store in zip((x, x2), seen):
        hooks = [
            m.register_forward_hook(
                lambda mod, args, out, key=key, store=store: store.__setitem__(
                    key, args[0].detach().double().cpu()
                )
            )
            for key, m in consumers.items()
        ]
        try:
            with torch.no_grad():
                outputs.append(work(batch))
        finally:
            for h in hooks:
                h.remove()
    inputs, reference2 = seen[0], outputs[1]
    varying = {}  # per consumer column: does its value depend on the input
    for key, a in seen[0].items():
        b = seen[1][key]
        cols = (lambda t: t.transpose(0, 1).flatten(1)) if a.dim() > 2 else (lambda t: t.t())
        if isinstance(consumers[key], nn.Linear):
            cols = lambda t: t.reshape(-1, t.shape[-1]).t()  # noqa: E731
        diff = (cols(a) - cols(b)).abs().amax(1)
        varying[key] = (diff > 1e-6 * (cols(a).abs().max() + 1e-30)).tolist()
    weights = {key: m.weight.detach().double().cpu() for key, m in consumers.items()}
    plan = _plan(groups, eff, inputs, weights, varying, align)
    if plan.kept_constant:
        notes.append(
            f"{plan.kept_constant} dead channel(s) kept: their constant output reaches a "
            "zero-padded conv, where it differs between positions and cannot be folded"
        )

    surgeon = _Surgeon(work, masks)

    def apply(gi: int) -> None:
        for key, bias in plan.folds.get(gi, {}).items():
            surgeon.fold(consumers[key], bias)
        for mem in groups[gi].members:
            drop = {i for r in plan.removed[gi] for i in mem.local[r]}
            surgeon.cut(mem.module, mem.role, drop)

    def error() -> float:
        with torch.no_grad():
            return max(relative_error(work(x), reference), relative_error(work(x2), reference2))

    if zoo:  # the structure is known: cut everything, check once
        for gi in range(len(groups)):
            apply(gi)
    else:  # the traced graph may misdescribe a group: cut group by group, undo what breaks
        for gi, g in enumerate(groups):
            if not plan.removed[gi]:
                continue
            snap = surgeon.snapshot(
                [m.module for m in g.members] + [consumers[k] for k in plan.folds.get(gi, {})]
            )
            apply(gi)
            try:
                bad = not error() <= TOLERANCE
            except RuntimeError:  # e.g. shapes no longer fit
                bad = True
            if bad:
                surgeon.restore(snap)
                notes.append(
                    f"group of {surgeon.names[id(g.members[0].module)]} left whole: cutting it "
                    "changed the outputs (the traced dependency graph does not describe it "
                    "exactly)"
                )
    if verify:
        err = error()
        if not err <= TOLERANCE:
            raise CompactionError(
                f"the compacted {type(model).__name__} differs from the masked model by "
                f"{err:.3g} (relative to the largest output; limit {TOLERANCE:g}). "
                + ("; ".join(notes) if notes else "")
            )
    out_masks = surgeon.masks
    return work, Masks(out_masks, masks.metadata), notes


def compact(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    example_input: torch.Tensor | None = None,
    *,
    verify: bool = True,
    align: int = 1,
) -> nn.Module:
    """A smaller dense copy of `model` pruned by `masks`, with the same outputs (eval mode).

    Dead channels and units (no effective weight writes or reads them: no kept input path or
    no kept output path) are cut out; constants they fed forward are folded into the next
    layer's bias; pruned weights of what remains are exact zeros. See the module docstring
    for what is kept and why.

    Args:
        model: a zoo model or any model Torch-Pruning can trace; masks attached
            (`apply_masks`) or not. It is not modified.
        masks: `Masks` (or a dict name -> bool tensor) of `model`.
        example_input: a batch (N, *input_shape) showing the input shape (its values are not
            used); default: the masks' metadata "input_shape" or the zoo model's default.
        verify: check the compacted model against the masked one on two random batches and
            raise `CompactionError` on a relative difference above 1e-5.
        align: keep a multiple of `align` channels in every group (some dead ones stay):
            CPU conv kernels work on blocks of 8 or 16 channels, and onnxruntime runs a conv
            with, say, 61 channels slower than one with 64 (measured on ResNet-20: 30 %
            slower after removing 10 % of the channels of four layers). 1: remove all.

    Returns:
        The compacted `nn.Module`, in eval mode.

    Raises:
        MaskError: the masks do not fit the model.
        CompactionError: the model cannot be traced, Torch-Pruning is missing for a model
            outside the zoo, or the check failed.

    Example:
        >>> import ntksap
        >>> from ntksap import models
        >>> net = models.create("resnet20")
        >>> masks = ntksap.prune(net, "magnitude", sparsity=0.98, input_shape=(3, 32, 32))
        >>> small = compact(net, masks)
        >>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
        True
    """
    return compact_with_masks(model, masks, example_input, verify=verify, align=align)[0]


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompactionResult:
    """Sizes and speed of a masked model before and after compaction (print it).

    Attributes:
        params_before / params_after: all parameters of the model (dense storage).
        kept_before / kept_after: non-zero entries of the masked tensors (the weights a sparse
            kernel would store); kept_after <= kept_before (dead kept weights go).
        flops_before / flops_after: FLOPs of one forward of the dense structure on one input
            (`ntksap.stats` convention: multiply-add = 2, convs and matmuls only).
        latency_ms_before / latency_ms_after: median eager forward time of a batch of
            `batch_size` in eval mode under `torch.inference_mode` (masked model: weights with
            the masks baked in, the same cost as dense).
        batch_size, input_shape: what was timed.
        max_relative_error: max |compacted - masked| / max |masked| on a random batch.
        notes: groups left whole, dead channels kept (with the reason).
    """

    params_before: int
    params_after: int
    kept_before: int
    kept_after: int
    flops_before: int
    flops_after: int
    latency_ms_before: float
    latency_ms_after: float
    batch_size: int
    input_shape: tuple[int, ...]
    max_relative_error: float
    notes: tuple[str, ...] = ()

    @property
    def speedup(self) -> float:
        """latency before / after."""
        return self.latency_ms_before / self.latency_ms_after if self.latency_ms_after else 0.0

    def __str__(self) -> str:
        from ntksap.stats import human

        shape = "x".join(map(str, self.input_shape))

        def row(what: str, a: float, b: float, fmt: Any = human) -> str:
            ratio = f"{b / a:.3f}" if a else "-"
            return f"{what:<22}{fmt(a):>12}{fmt(b):>12}{ratio:>9}"

        lines = [
            f"{'':<22}{'before':>12}{'after':>12}{'after/b':>9}",
            row("parameters", self.params_before, self.params_after),
            row("kept weights", self.kept_before, self.kept_after),
            row(f"FLOPs (1x{shape})", self.flops_before, self.flops_after),
            row(
                f"latency ms (batch {self.batch_size})",
                self.latency_ms_before,
                self.latency_ms_after,
                lambda v: f"{v:.3f}",
            ),
            f"max relative output difference {self.max_relative_error:.2e}",
            *self.notes,
        ]
        return "\n".join(lines)


def _latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of `model(x)` in ms after two warm-up calls."""
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compaction_report(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    compacted: nn.Module | None = None,
    example_input: torch.Tensor | None = None,
    *,
    batch_size: int = 64,
    repeats: int = 20,
) -> CompactionResult:
    """Parameters, kept weights, FLOPs and latency of `model` under `masks` before and after
    compaction (`compacted`: the result of `compact`; computed when None).

    Example: see the module docstring.
    """
    from ntksap.stats import count_module_flops
    from ntksap.validate import positive_int

    positive_int("batch_size", batch_size)
    positive_int("repeats", repeats)
    masks = masks if isinstance(masks, Masks) else Masks(masks)
    notes: list[str] = []
    compacted_masks = None
    if compacted is None:
        compacted, compacted_masks, notes = compact_with_masks(model, masks, example_input)
    before = _prepared(model, masks)
    x = _input_for(before, masks, example_input, batch=batch_size)
    shape = tuple(x.shape[1:])
    with torch.no_grad():
        err = relative_error(compacted.eval()(x), before(x))
    kept_after = (
        compacted_masks.num_kept
        if compacted_masks is not None
        else sum(
            int((p != 0).sum())
            for n, p in named_parameters_canonical(compacted).items()
            if n in masks
        )
    )
    return CompactionResult(
        params_before=sum(p.numel() for p in before.parameters()),
        params_after=sum(p.numel() for p in compacted.parameters()),
        kept_before=masks.num_kept,
        kept_after=kept_after,
        flops_before=count_module_flops(before, shape)[0],
        flops_after=count_module_flops(compacted, shape)[0],
        latency_ms_before=_latency_ms(before, x, repeats),
        latency_ms_after=_latency_ms(compacted, x, repeats),
        batch_size=batch_size,
        input_shape=shape,
        max_relative_error=err,
        notes=tuple(notes),
    )
