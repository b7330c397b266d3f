"""`Masks`: one boolean tensor per prunable parameter, keyed by parameter name.

The effective weight of a pruned network is `theta * m`. Density is always computed from the
masks themselves (kept / total), never from weights, so it stays true when an optimiser
moves the stored tensor at pruned places. `effective(model, masks)` keeps only the weights on
an input-to-output path (the effective density is <= the nominal one).

Example:
    >>> import torch
    >>> m = Masks({"fc.weight": torch.tensor([[True, False], [True, True]])})
    >>> m.density
    0.75
    >>> m.layer_densities()
    {'fc.weight': 0.75}
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ntksap.files import atomic_write, torch_bytes

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth")


class MaskError(ValueError):
    """A mask does not fit a model, or a mask file is malformed."""


#: Types of the metadata entries ntksap reads back (others are free-form).
_METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,),
    "model": (str,),
    "density": (int, float),
    "sparsity": (int, float),
    "seed": (int,),
    "rounds": (int,),
    "targets": (dict,),
    "options": (dict,),
    "input_shape": (list, type(None)),
}


#: The most elements one input example may have when its shape comes from a file (64 MiB of
#: float32; ImageNet's 3x224x224 is 150,528): a shape in a file's metadata is data, and the
#: model and example built from it must not allocate more than a real input needs.
MAX_INPUT_ELEMENTS = 1 << 24


def check_input_shape(
    shape: Any, what: str, error: type[Exception] = ValueError
) -> tuple[int, ...]:
    """`shape` as a tuple of 1 to 4 positive ints whose product is at most
    `MAX_INPUT_ELEMENTS`, else `error` naming `what`, the rule and the value.

    Example:
        >>> check_input_shape([3, 32, 32], "input_shape")
        (3, 32, 32)
    """
    ok = (
        isinstance(shape, list | tuple)
        and 1 <= len(shape) <= 4
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    )
    if not ok:
        raise error(f"{what} must be a list of 1 to 4 positive integers, got {shape!r}")
    n = 1
    for d in shape:
        n *= d
    if n > MAX_INPUT_ELEMENTS:
        raise error(
            f"{what} {list(shape)} has {n} elements per example, more than the "
            f"{MAX_INPUT_ELEMENTS} allowed from a file"
        )
    return tuple(shape)


def check_metadata(metadata: Any, where: str = "masks") -> None:
    """Raise MaskError unless `metadata` is a JSON object whose known entries have their types."""
    if not isinstance(metadata, dict):
        raise MaskError(
            f"{where}: mask metadata must be a JSON object, got {type(metadata).__name__}"
        )
    for key, types in _METADATA_TYPES.items():
        v = metadata.get(key)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            want = " or ".join(t.__name__ for t in types if t is not type(None))
            raise MaskError(
                f"{where}: mask metadata {key!r} must be {want}, got {type(v).__name__} {v!r}"
            )
    shape = metadata.get("input_shape")
    if shape is not None:
        check_input_shape(shape, f"{where}: mask metadata 'input_shape'", MaskError)
    args = metadata.get("model_args")
    if args is not None:
        if not isinstance(args, dict):
            raise MaskError(
                f"{where}: mask metadata 'model_args' must be a JSON object of the zoo model's "
                f"keywords, got {type(args).__name__} {args!r}"
            )
        for key in ("num_classes", "in_channels"):
            v = args.get(key)
            if v is not None and (
                not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_INPUT_ELEMENTS
            ):
                raise MaskError(
                    f"{where}: mask metadata 'model_args.{key}' must be an integer in "
                    f"[1, {MAX_INPUT_ELEMENTS}], got {v!r}"
                )
    targets = metadata.get("targets")
    if targets is not None:
        ok = isinstance(targets.get("include_bias", False), bool) and all(
            isinstance(targets.get(k, []), list)
            and all(isinstance(p, str) for p in targets.get(k, []))
            for k in ("exclude", "include")
        )
        if not ok:
            raise MaskError(
                f"{where}: mask metadata 'targets' must be {{'include_bias': bool, 'exclude': "
                f"[patterns], 'include': [patterns]}}, got {targets!r}"
            )


def model_density(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> float:
    """The real fraction of `model`'s prunable weights that `masks` keep.

    The prunable set is the model's default one plus every masked tensor; a prunable tensor
    without a mask counts as dense (so partial masks do not overstate the sparsity).

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    >>> model_density(net, {"0.weight": torch.zeros(2, 2, dtype=torch.bool)})
    0.5
    """
    from ntksap.targets import named_parameters_canonical, prunable_parameters

    params = named_parameters_canonical(model)
    try:
        names = set(prunable_parameters(model))
    except ValueError:  # no Conv/Linear at all: only the masked tensors
        names = set()
    names |= set(masks)
    total = sum(params[n].numel() for n in names)
    kept = sum(int(masks[n].sum()) if n in masks else params[n].numel() for n in names)
    return kept / total if total else 1.0


class Masks(Mapping[str, torch.Tensor]):
    """An immutable-by-convention mapping `parameter name -> bool tensor`, validated on write.

    `metadata` is a free dict of JSON-serialisable facts (method, seed, ...) saved with the
    file. Two Masks are equal when they have the same names and identical tensors.
    """

    def __init__(
        self, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
    ) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        for name, m in masks.items():
            if not isinstance(name, str) or not name:
                raise MaskError(f"mask names must be non-empty strings, got {name!r}")
            if not isinstance(m, torch.Tensor):
                raise MaskError(f"mask {name!r} must be a torch.Tensor, got {type(m).__name__}")
            if m.dtype != torch.bool:
                if m.is_floating_point() or m.dtype in (torch.uint8, torch.int8, torch.int64):
                    vals = torch.unique(m)
                    if not bool(((vals == 0) | (vals == 1)).all()):
                        raise MaskError(f"mask {name!r} holds values other than 0 and 1")
                    m = m != 0
                else:
                    raise MaskError(f"mask {name!r} has unsupported dtype {m.dtype}")
            self._masks[name] = m.detach()
        if metadata is not None:
            check_metadata(metadata)
        self.metadata: dict[str, Any] = dict(metadata or {})

    # Mapping protocol -------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Masks):
            return NotImplemented
        return self._masks.keys() == other._masks.keys() and all(
            self._masks[k].shape == other._masks[k].shape
            and torch.equal(self._masks[k].cpu(), other._masks[k].cpu())
            for k in self._masks
        )

    __hash__ = None  # type: ignore[assignment]  # mutable contents, like dict

    def __repr__(self) -> str:
        return (
            f"Masks({len(self)} tensors, kept {self.num_kept:,}/{self.num_total:,}, "
            f"density {self.density:.4f})"
        )

    # Counts -------------------------------------------------------------------------------
    @property
    def num_total(self) -> int:
        """Number of prunable weights covered by the masks."""
        return sum(m.numel() for m in self._masks.values())

    @property
    def num_kept(self) -> int:
        """Number of weights the masks keep (True entries)."""
        return sum(int(m.sum()) for m in self._masks.values())

    @property
    def density(self) -> float:
        """Fraction of prunable weights kept, in [0, 1]."""
        total = self.num_total
        return self.num_kept / total if total else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction of prunable weights removed: 1 - density."""
        return 1.0 - self.density

    def layer_densities(self) -> dict[str, float]:
        """Per-tensor density: `{param name: kept / numel}`."""
        return {k: float(m.sum()) / m.numel() for k, m in self._masks.items()}

    def collapsed(self) -> list[str]:
        """Names of tensors pruned to nothing (layer collapse; without a bypass such as a
        residual connection, the network's output no longer depends on its input)."""
        return [k for k, m in self._masks.items() if m.numel() and not bool(m.any())]

    def dead_outputs(self) -> dict[str, int]:
        """Per tensor of two or more dimensions, how many of its output units (rows of a
        Linear weight, output channels of a conv: slices along dim 0) keep no weight at all,
        where any do. Such a unit no longer depends on its input: in the output layer, a
        class that only its bias can predict. A tensor-level check (`collapsed`) misses it.

        >>> Masks({"fc.weight": torch.tensor([[True, False], [False, False]])}).dead_outputs()
        {'fc.weight': 1}
        """
        out = {}
        for k, m in self._masks.items():
            if m.dim() >= 2 and m.numel():
                dead = int((~m.flatten(1).any(dim=1)).sum())
                if dead:
                    out[k] = dead
        return out

    def collapse_warning(self) -> str | None:
        """The layer-collapse warning every command prints, or None when no tensor is
        pruned to nothing."""
        collapsed = self.collapsed()
        if not collapsed:
            return None
        if self.num_kept == 0:
            return "the mask keeps no weight at all: the network cannot learn (chance accuracy)"
        return (
            f"{len(collapsed)} tensor(s) pruned to nothing (layer collapse): "
            f"{', '.join(collapsed)}; without a bypass the network's output no longer depends "
            "on its input"
        )

    def dead_head_warning(self) -> str | None:
        """A warning when output units of the last tensor (the model's output layer, in
        registration order) keep no weight but the tensor is not entirely pruned: e.g.
        classes that only the bias can predict, which caps accuracy however long one trains.
        None otherwise."""
        names = list(self._masks)
        if not names:
            return None
        head = names[-1]
        dead = self.dead_outputs().get(head, 0)
        if not dead or not bool(self._masks[head].any()):  # a collapse is reported as such
            return None
        return (
            f"{dead} of {self._masks[head].shape[0]} outputs of {head} (the last pruned layer) "
            "keep no weight: they no longer depend on the input (for a classifier, classes "
            "predicted from the bias alone); lower the sparsity or exclude the layer (--exclude)"
        )

    def to(self, device: torch.device | str) -> Masks:
        return Masks({k: m.to(device) for k, m in self._masks.items()}, self.metadata)

    # Checks against a model ---------------------------------------------------------------
    def targets(self) -> dict[str, Any]:
        """The prunable-set settings the masks were made with (metadata "targets"; the
        defaults when absent): keywords of `ntksap.prunable_parameters`."""
        t = self.metadata.get("targets") or {}
        return {
            "include_bias": bool(t.get("include_bias", False)),
            "exclude": list(t.get("exclude", [])),
            "include": list(t.get("include", [])),
        }

    def check_covers(self, model: nn.Module) -> None:
        """Raise MaskError unless the masks fit `model` (names, shapes) and cover its whole
        prunable set (as selected by the settings in `targets()`).

        A mask that covers only part of the model (e.g. ResNet-20's masks on a ResNet-32)
        would train the uncovered layers dense and misreport the density.
        """
        from ntksap.targets import prunable_parameters

        self.check_model(model)
        try:
            expected = prunable_parameters(model, **self.targets())
        except ValueError as exc:
            raise MaskError(
                f"the masks' prunable-set settings do not fit the model: {exc}"
            ) from None
        uncovered = [n for n in expected if n not in self._masks]
        if uncovered:
            made_for = self.metadata.get("model")
            hint = f" (they were made for model {made_for!r})" if made_for else ""
            raise MaskError(
                f"the masks cover {len(expected) - len(uncovered)} of the model's "
                f"{len(expected)} prunable tensors{hint}; not covered: "
                f"{', '.join(uncovered[:6])}{' ...' if len(uncovered) > 6 else ''}. Prune "
                "this model (ntksap prune/run), or use masks made for it"
            )

    def build_fitting(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """`factory()`, called first on the meta device (no memory): the masks must fit that
        model (names, shapes, the whole prunable set; `check_covers`) before the real one is
        built. Sizes read from a file (a mask's `model_args`, `input_shape`) thus never
        allocate more than the file's own masks describe.

        Example:
            >>> from torch import nn
            >>> m = Masks({"weight": torch.ones(2, 3, dtype=torch.bool)})
            >>> m.build_fitting(lambda: nn.Linear(3, 2, bias=False)).weight.shape
            torch.Size([2, 3])
        """
        with torch.device("meta"):
            probe = factory()
        self.check_covers(probe)
        return factory()

    def check_model(self, model: nn.Module) -> None:
        """Raise MaskError unless every mask names a parameter of `model` with the same shape."""
        from ntksap.targets import named_parameters_canonical

        params = named_parameters_canonical(model)
        missing = [k for k in self._masks if k not in params]
        if missing:
            shown = ", ".join(sorted(params)[:12]) + (" ..." if len(params) > 12 else "")
            made_for = self.metadata.get("model")
            raise MaskError(
                (f"the masks were made for model {made_for!r}; " if made_for else "")
                + f"they name parameters the model does not have: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; the model's parameters are: {shown}"
            )
        bad = [
            f"{k}: mask {tuple(m.shape)} vs parameter {tuple(params[k].shape)}"
            for k, m in self._masks.items()
            if tuple(m.shape) != tuple(params[k].shape)
        ]
        if bad:
            raise MaskError("mask shapes do not match the model: " + "; ".join(bad[:5]))

    # Files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the masks to `path` (.safetensors, or .pt/.pth read back with weights_only).

        The write is atomic (temp file + rename), so an existing file is never left
        half-written.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        tensors = {k: m.detach().cpu().contiguous() for k, m in self._masks.items()}
        meta = {
            "format": "ntksap.masks/1",
            "metadata": json.dumps(self.metadata, default=str),
            # safetensors lists tensors sorted by name; keep the model's order (tables,
            # collapse lists) across a save/load round trip
            "order": json.dumps(list(self._masks)),
        }
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save

            content = save(tensors, metadata=meta)
        elif suffix in TORCH_SUFFIXES:
            content = torch_bytes({"masks": tensors, **meta})
        else:
            raise MaskError(
                f"unknown mask file suffix {suffix!r} for {path}; "
                f"use one of {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
            )
        atomic_write(path, content)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Masks:
        """Read masks written by `save`. Never unpickles: safetensors or weights_only=True."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file not found: {path}")
        suffix = path.suffix.lower()
        try:
            if suffix in SAFETENSORS_SUFFIXES:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    meta = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            elif suffix in TORCH_SUFFIXES:
                blob = torch.load(path, map_location=device, weights_only=True)
                if not isinstance(blob, dict) or not isinstance(blob.get("masks"), dict):
                    raise MaskError(f"{path} is not an ntksap mask file (no 'masks' dict)")
                tensors, meta = blob["masks"], blob
            else:
                raise MaskError(
                    f"unknown mask file suffix {suffix!r} for {path}; "
                    f"use one of {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
                )
        except MaskError:
            raise
        except Exception as exc:  # corrupt file: say which file, keep the cause
            raise MaskError(f"cannot read mask file {path}: {exc}") from exc
        raw = meta.get("metadata", "{}")
        try:
            metadata = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            raise MaskError(f"{path}: mask metadata is not valid JSON: {exc}") from exc
        check_metadata(metadata, str(path))
        try:
            order = json.loads(meta.get("order", "[]"))
        except (TypeError, json.JSONDecodeError):
            order = []
        if isinstance(order, list) and sorted(map(str, order)) == sorted(tensors):
            tensors = {k: tensors[k] for k in order}
        return cls(tensors, metadata)

    @classmethod
    def ones_like(cls, params: Mapping[str, torch.Tensor]) -> Masks:
        """All-True masks shaped like `params` (the dense network)."""
        return cls({k: torch.ones_like(p, dtype=torch.bool) for k, p in params.items()})


# Effective masks ------------------------------------------------------------------------------

#: Leaf modules treated as a per-channel (per-unit) identity on the path graph: normalisations
#: rescale each channel but never cut or create a path (their weight values, gamma = 0
#: included, are trainable and so do not count), and elementwise activations map a path's
#: signal to a signal (sigmoid(0) = 0.5 would otherwise make a dead unit look alive).
_IDENTITY_ON_PATHS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)


def _as_window_sum(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A max pooling replaced by an average over the same windows (> 0 iff any input in the
    window is > 0, and every input of the window gets gradient: max pooling's gradient
    reaches only the argmax, which would cut the paths through the other inputs).
    """
    import torch.nn.functional as F

    if isinstance(module, nn.modules.pooling._AdaptiveMaxPoolNd):
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
        nd = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}.get(
            type(module), x.dim() - 2
        )
        return pool[nd](x, module.output_size)
    assert isinstance(module, nn.modules.pooling._MaxPoolNd)
    nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}.get(type(module), x.dim() - 2)
    dilation = module.dilation
    if any(d != 1 for d in (dilation if isinstance(dilation, tuple) else (dilation,))):
        raise ValueError(
            f"effective masks: max pooling with dilation {dilation} is not supported "
            "(average pooling, which stands in for it on the path graph, has no dilation)"
        )
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    stride = module.stride if module.stride is not None else module.kernel_size
    # max pooling pads with -inf, average pooling with zeros: both contribute nothing here
    return pool(x, module.kernel_size, stride, module.padding, module.ceil_mode, True)


def _indicator(y: torch.Tensor) -> torch.Tensor:
    """`(y > 0)` as 0/1 values, with the gradient of the identity (straight through), and the
    incoming gradient itself reduced to `(g > 0)`.

    Both the forward signal and the backward gradient are reset to {0, 1} at every leaf
    module: the path counts of a deep network (SynFlow's product, > 1e300 or < 1e-300 in a
    few dozen layers) never build up, so nothing can overflow or underflow; within one module
    the values stay below fan-in x (a few residual additions).
    """
    out = (y > 0).to(y.dtype) + (y - y.detach())
    if out.requires_grad:
        out.register_hook(lambda g: (g > 0).to(g.dtype))
    return out


def _effective_input_shape(
    model: nn.Module, masks: Masks, input_shape: Any | None
) -> tuple[int, ...]:
    """The input shape to use: given, the masks' metadata, the zoo model's default, or the
    in_features of a first Linear layer; a ValueError naming these when none is known."""
    shape = input_shape if input_shape is not None else masks.metadata.get("input_shape")
    if shape is None:
        zoo = getattr(model, "ntksap_model", None)
        if isinstance(zoo, dict) and isinstance(zoo.get("name"), str):
            from ntksap import models

            try:
                shape = (zoo.get("in_channels", 3), *models.defaults(zoo["name"]).input_shape[1:])
            except ValueError:
                shape = None
    if shape is None:
        first = next(
            (m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)),
            None,
        )
        if isinstance(first, nn.Linear):
            shape = (first.in_features,)
    if shape is None:
        raise ValueError(
            "effective masks need the model's input shape (one input, without the batch "
            "dimension, e.g. (3, 32, 32)): pass input_shape=..., or use masks from "
            "ntksap.prune (they record it)"
        )
    if (
        isinstance(shape, str)
        or not hasattr(shape, "__iter__")
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        or not len(shape)
    ):
        raise ValueError(
            f"input_shape must be a sequence of positive ints without the batch dimension, "
            f"e.g. (3, 32, 32); got {shape!r}"
        )
    return tuple(shape)


def effective(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    input_shape: Any | None = None,
    output_fn: Any | None = None,
) -> Masks:
    """The kept weights that lie on at least one input-to-output path of `model` under
    `masks` (Vysogorets and Kempe, "Connectivity Matters", JMLR 2023). The others can
    neither change the output nor learn; the effective density is <= the nominal one.

    What counts as a path. The network is read as a graph of units (a Linear's features, a
    conv's channels at each position) joined by the kept weights; tensors without a mask are
    dense. A path starts at an input unit, follows kept weights through every layer, and
    ends at an output unit (any entry of the model's output, or of `output_fn(output)`).
    Only the masks matter, never the weight values:
      * biases (and BatchNorm's beta) are not path sources: a unit with a bias but no kept
        input outputs a constant that carries no information about the input, so its
        outgoing weights are not effective. A masked bias (`include_bias`) is effective when
        it is kept and its unit reaches the output (its constant can still shift the
        output), whether or not the unit has an input;
      * normalisation layers (BatchNorm in eval, LayerNorm, GroupNorm, ...) and elementwise
        activations are per-unit maps that neither cut nor join paths; a BatchNorm channel
        with gamma = 0 (e.g. zero-initialised residual branches) still counts as connected,
        because gamma is trainable;
      * max pooling joins every input of its window to the output (as average pooling does):
        training can make any of them the maximum;
      * convolution taps that only ever multiply zero padding at this input shape are not
        on a path (e.g. the corner taps of a 3x3 conv on a 1x1 feature map).
    A kept weight is effective iff its input unit is reachable from the input and its output
    unit reaches the output (at one position, for a conv).

    How. A private float64 copy of the model in eval mode, its masked weights set to the
    0/1 mask, other weights to 1 and all biases to 0, is fed an all-ones input (SynFlow's path
    count, > 0 exactly on effective weights). Both the signal and the gradient of the output
    sum are reset to 0/1 indicators after every leaf module, so path counts never overflow
    or underflow however deep the network (float32 SynFlow products do, beyond a few dozen
    layers). The model must be a composition of leaf modules and non-negative operations
    (additions, concatenation, pooling, flatten, ReLU): functional activations such as
    `torch.sigmoid` called inside `forward` map 0 to a non-zero value and would make a dead
    unit look alive. The model and `masks` are left untouched.

    Args:
        model: the network the masks were made for (masks attached by `apply_masks` or not).
        masks: `Masks` or a dict `name -> bool tensor`, a subset of the parameters.
        input_shape: one input's shape without the batch dimension; default: the masks'
            metadata "input_shape", the zoo model's default shape, or a first Linear's
            `in_features`.
        output_fn: for a forward returning a tuple/dict: maps it to the output tensor.

    Returns:
        `Masks` with the same names and shapes, kept = effective; metadata: the input masks'
        plus "effective": True, "nominal_density" and "effective_density".

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> m = Masks({"0.weight": torch.tensor([[True, True], [False, False]]),
        ...            "2.weight": torch.tensor([[False, True]])})
        >>> eff = effective(net, m)  # hidden unit 0 has no output, unit 1 no input
        >>> eff.num_kept, eff["0.weight"].tolist(), eff.metadata["effective_density"]
        (0, [[False, False], [False, False]], 0.0)
    """
    from ntksap.scoring.base import as_logits
    from ntksap.targets import named_parameters_canonical

    masks = masks if isinstance(masks, Masks) else Masks(masks)
    masks.check_model(model)
    shape = _effective_input_shape(model, masks, input_shape)
    try:
        work = copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(
            f"cannot deep-copy the model ({exc}); models with torch.nn.utils.prune hooks "
            "cannot be copied: call torch.nn.utils.prune.remove on them first"
        ) from exc
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    if device.type == "meta":
        raise ValueError("effective masks need a model with real tensors, not on the meta device")
    work = work.to(torch.float64).eval()
    params = named_parameters_canonical(work)
    with torch.no_grad():
        for name, p in params.items():
            if not p.is_floating_point():
                continue
            if "bias" in name.rpartition(".")[2]:
                p.fill_(0.0)  # biases are no path sources, masked (include_bias) or not
            elif name in masks:
                p.copy_(masks[name].to(device=p.device, dtype=p.dtype))
            else:
                p.fill_(1.0)  # an unmasked weight is a kept one
    for p in work.parameters():
        p.requires_grad_(False)
    wanted = {name: params[name] for name in masks}
    for p in wanted.values():
        p.requires_grad_(True)

    handles = []
    for mod_name, module in work.named_modules():
        inside_parametrization = mod_name == "parametrizations" or (
            ".parametrizations." in f".{mod_name}."
        )
        if next(module.children(), None) is not None or inside_parametrization:
            continue

        def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if isinstance(mod, _IDENTITY_ON_PATHS) and x is not None and x.shape == out.shape:
                out = x
            elif (
                isinstance(
                    mod, nn.modules.pooling._MaxPoolNd | nn.modules.pooling._AdaptiveMaxPoolNd
                )
                and x is not None
                and isinstance(out, torch.Tensor)
            ):
                out = _as_window_sum(mod, x)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                return _indicator(out)
            return out

        handles.append(module.register_forward_hook(hook))
    x = torch.ones((1, *shape), dtype=torch.float64, device=device)
    try:
        with torch.enable_grad():
            out = as_logits(work(x), output_fn)
            total = out.double().sum()
            grads = (
                torch.autograd.grad(total, list(wanted.values()), allow_unused=True)
                if total.requires_grad
                else [None] * len(wanted)
            )
    finally:
        for h in handles:
            h.remove()
    # d(sum of outputs)/dw = sum over positions of (input unit reachable) x (output unit
    # reaches the output): > 0 exactly on the weights of some input-to-output path
    eff = {
        name: masks[name]
        & (g.detach().cpu() > 0 if g is not None else torch.zeros_like(masks[name]))
        for name, g in zip(wanted, grads)
    }
    result = Masks(eff, masks.metadata)
    result.metadata.update(
        effective=True, nominal_density=masks.density, effective_density=result.density
    )
    return result
