"""Atomic, pickle-free checkpoints and small JSON files.

Every write goes through `ntksap.files.atomic_write` (temporary file, then `os.replace`), so
a crash mid-write never corrupts the previous checkpoint. Checkpoints are read back with
`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts only.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
    >>> _ = write_json(p, {"top1": 91.4})
    >>> read_json(p)["top1"]
    91.4
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ntksap.files import atomic_write, read_json, torch_bytes, write_json

CHECKPOINT_FORMAT = "ntksap.checkpoint/1"
#: What a checkpoint must hold to be resumed from.
CHECKPOINT_KEYS = (
    "epoch", "model", "optimizer", "scheduler", "scaler", "masks", "rng", "config",
    "best_top1", "best_epoch",
)  # fmt: skip

__all__ = [
    "CHECKPOINT_FORMAT",
    "load_checkpoint",
    "read_json",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
]


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write a training checkpoint atomically (`state` must be weights_only-loadable)."""
    return atomic_write(path, torch_bytes({"format": CHECKPOINT_FORMAT, **state}))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an ntksap checkpoint ({CHECKPOINT_FORMAT})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"checkpoint {path} is incomplete: missing {', '.join(missing)}; it was not written "
            "by `ntksap train/run` of this version. Delete it to restart the run from epoch 0 "
            "(--resume then re-uses the saved config and mask), or start a new --out"
        )
    return state


def rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA generator states (the data order is derived from the seed)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
