"""`Masks`: one boolean tensor per prunable parameter, keyed by parameter name.

The effective weight of a pruned network is `theta * m`. Density is always computed from the
masks themselves (kept / total), never from weights, so it stays true when an optimiser
moves the stored tensor at pruned places.

Example:
    >>> import torch
    >>> m = Masks({"fc.weight": torch.tensor([[True, False], [True, True]])})
    >>> m.density
    0.75
    >>> m.layer_densities()
    {'fc.weight': 0.75}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
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
