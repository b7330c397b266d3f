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

from ntksap.files import atomic_write

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth")


class MaskError(ValueError):
    """A mask does not fit a model, or a mask file is malformed."""


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

    def to(self, device: torch.device | str) -> Masks:
        return Masks({k: m.to(device) for k, m in self._masks.items()}, self.metadata)

    # Checks against a model ---------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise MaskError unless every mask names a parameter of `model` with the same shape."""
        from ntksap.targets import named_parameters_canonical

        params = named_parameters_canonical(model)
        missing = [k for k in self._masks if k not in params]
        if missing:
            shown = ", ".join(sorted(params)[:12]) + (" ..." if len(params) > 12 else "")
            raise MaskError(
                f"the masks name parameters the model does not have: {missing[:5]}"
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
        meta = {"format": "ntksap.masks/1", "metadata": json.dumps(self.metadata, default=str)}
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            def write(tmp: Path) -> None:
                save_file(tensors, str(tmp), metadata=meta)
        elif suffix in TORCH_SUFFIXES:

            def write(tmp: Path) -> None:
                torch.save({"masks": tensors, **meta}, tmp)
        else:
            raise MaskError(
                f"unknown mask file suffix {suffix!r} for {path}; "
                f"use one of {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
            )
        atomic_write(path, write)
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
        try:
            metadata = json.loads(meta.get("metadata", "{}"))
        except json.JSONDecodeError as exc:
            raise MaskError(f"{path}: mask metadata is not valid JSON: {exc}") from exc
        return cls(tensors, metadata)

    @classmethod
    def ones_like(cls, params: Mapping[str, torch.Tensor]) -> Masks:
        """All-True masks shaped like `params` (the dense network)."""
        return cls({k: torch.ones_like(p, dtype=torch.bool) for k, p in params.items()})
