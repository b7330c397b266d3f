"""Forged ntksap.sparse files for the tests: read a saved file's metadata and tensors, write
them back changed, and small hand-built files that need no model (no module is called, so
the bad-input table can use them).

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     meta, tensors = read(linear_file(f"{d}/a.safetensors"))
    >>> meta["structure"]["modules"]["fc"]["config"]["weight_shape"], sorted(tensors)[0]
    ([3, 4], 'net.fc.bias')
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

META_KEY = "ntksap.sparse"


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata JSON, tensors) of an ntksap.sparse file."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return meta, tensors


def write(
    path: str | os.PathLike[str], meta: Any, tensors: dict[str, torch.Tensor], raw: str = ""
) -> Path:
    """Write `meta` (or the raw metadata text `raw`) and `tensors` as a safetensors file."""
    text = raw or json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), {META_KEY: text})
    return Path(path)


def forge(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    change: Callable[[dict[str, Any], dict[str, torch.Tensor]], Any],
) -> Path:
    """Copy `src` to `dst` with `change(meta, tensors)` applied in place (a returned str
    replaces the metadata text)."""
    meta, tensors = read(src)
    raw = change(meta, tensors)
    return write(dst, meta, tensors, raw if isinstance(raw, str) else "")


def linear_spec(prefix: str, shape: list[int], source: str = "fc") -> dict[str, Any]:
    return {
        "kind": "linear",
        "prefix": prefix,
        "config": {
            "weight_shape": shape,
            "relu": False,
            "residual": False,
            "mode": "sparse",
            "has_bias": True,
            "source_name": source,
        },
    }


def csr(prefix: str, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    from ntksap.sparse.layers import to_csr

    rowptr, col, values = to_csr(weight)
    return {
        prefix + "rowptr": rowptr,
        prefix + "col_idx": col,
        prefix + "values": values,
        prefix + "bias": bias,
    }


def node(name: str, op: str, target: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {
        "name": name,
        "op": op,
        "target": target,
        "args": {"__tuple__": list(args)},
        "kwargs": {"__dict__": kwargs},
    }


def ref(name: str) -> dict[str, str]:
    return {"__node__": name}


def linear_meta() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A graph x -> fc (SparseLinear 4 -> 3) -> output, as `save` writes it."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=gen) * (torch.rand(3, 4, generator=gen) < 0.6)
    tensors = csr("net.fc.", w, torch.randn(3, generator=gen))
    meta = {
        "format": "ntksap.sparse/1",
        "structure": {
            "kind": "graph",
            "prefix": "net.",
            "nodes": [
                node("x", "placeholder", "x"),
                node("fc", "call_module", "fc", ref("x")),
                node("output", "output", "output", ref("fc")),
            ],
            "modules": {"fc": linear_spec("net.fc.", [3, 4])},
            "attrs": [],
        },
        "zoo_model": None,
        "decisions": [],
        "batch_size": 2,
        "threads": 1,
        "autotuned": False,
        "untraced": [],
    }
    return meta, tensors


def linear_file(
    path: str | os.PathLike[str],
    change: Callable[[dict[str, Any], dict[str, torch.Tensor]], Any] | None = None,
) -> Path:
    """`linear_meta()` written to `path`, with `change(meta, tensors)` applied first."""
    meta, tensors = linear_meta()
    raw = change(meta, tensors) if change else None
    return write(path, meta, tensors, raw if isinstance(raw, str) else "")


def mlp_bomb(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The zoo MLP as a "python" part (its forward checks the input size, so torch.fx cannot
    trace it) with keywords that name two 30000-wide layers (3.6 GB of weights, if the
    zoo model were built for real) and one stored 784 -> 10 layer in their place."""
    gen = torch.Generator().manual_seed(1)
    tensors.clear()
    tensors.update(csr("net.layers.", torch.randn(10, 784, generator=gen), torch.zeros(10)))
    meta["zoo_model"] = {"name": "mlp", "num_classes": 10, "in_channels": 1,
                         "hidden": [30000, 30000]}  # fmt: skip
    meta["structure"] = {
        "kind": "python",
        "class": "MLP",
        "prefix": "net.",
        "own": [],
        "children": {"layers": linear_spec("net.layers.", [10, 784], source="layers.1")},
    }


_FORGED_DIR: list[Path] = []


def forged(name: str, change: Callable[[dict[str, Any], dict[str, torch.Tensor]], Any]) -> Path:
    """A forged copy of `linear_meta()` in a private temporary folder (not the working
    folder: the bad-input table checks that nothing is written there)."""
    if not _FORGED_DIR:
        _FORGED_DIR.append(Path(tempfile.mkdtemp(prefix="ntksap-forged-")))
    return linear_file(_FORGED_DIR[0] / f"{name}.safetensors", change)


def deep(levels: int) -> str:
    """JSON text of a value nested `levels` lists deep (json.dumps itself would recurse)."""
    return "[" * levels + "1" + "]" * levels


def nested_metadata(meta: dict[str, Any], _tensors: dict[str, torch.Tensor]) -> str:
    """A change for `forge` / `forged`: the metadata text with the first node's name
    replaced by a list nested 5000 deep."""
    return json.dumps(meta).replace('"x"', deep(5000), 1)
