"""Compaction: parameters, FLOPs and latency of masked dense vs compacted models.

For CIFAR ResNet-20 and VGG-16-BN (10 classes, 3x32x32, untrained initial weights, seed 0)
at 98.2 % sparsity with NTK-SAP and SynFlow masks:

- masked: the dense model with the pruned weights set to zero (what every tool runs);
- align 1: `ntksap.compact.compact_with_masks(..., align=1)`, every dead channel removed;
- align 8: the same keeping a multiple of 8 channels per layer (the export default).

Reported: parameters, FLOPs of one input (`ntksap.stats.count_module_flops`), and median
latency in ms at batch 64 and 1 in torch eager and in onnxruntime (TorchScript ONNX export),
2 threads. Each variant is timed in blocks of calls, the variants in turn, 3 rounds (median of
all calls); torch and onnxruntime run in separate phases (onnxruntime's spinning worker threads
slow whatever runs right after them). Every compacted model is checked equal to the masked one
(`compact_with_masks` verifies 1e-5 relative; the max error is recorded).

Masks: NTK-SAP from `benchmarks/sparse_inference.py`'s cache (ResNet-20 with the paper's
T=20, R=5, 100 noise images; VGG-16-BN reduced to T=5, R=1), SynFlow T=100, made and cached
in benchmarks/results/sparse_masks/ on first use.

    python benchmarks/compaction.py            # about 5 min on 2 cores (masks cached)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import write_evidence
from sparse_inference import SHAPES, build, get_masks

import ntksap
from ntksap.compact import compact_with_masks, relative_error
from ntksap.export import _onnx_bytes
from ntksap.stats import count_module_flops

HERE = Path(__file__).parent
MASKS = HERE / "results" / "sparse_masks"
SPARSITY = 0.982


def synflow_masks(name: str) -> ntksap.Masks:
    path = MASKS / f"{name}_synflow_{SPARSITY:.3f}.safetensors"
    if path.exists():
        return ntksap.Masks.load(path)
    masks = ntksap.prune(build(name), "synflow", sparsity=SPARSITY, input_shape=SHAPES[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    masks.save(path)
    return masks


def blocks(fns: dict[str, Callable[[], Any]], n: int, rounds: int = 3) -> dict[str, float]:
    """Median ms per call of each function: `rounds` rounds, each calling every function
    n times in a block (blocks, not call-by-call alternation: one onnxruntime session's
    spinning worker threads slow the next session's call), the functions in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(3):
                f()  # warm-up of this block
            for _ in range(n):
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def measure(name: str, method: str, masks: ntksap.Masks) -> dict[str, Any]:
    import onnxruntime as ort

    model = build(name).eval()
    shape = SHAPES[name]
    t = time.perf_counter()
    align1, _, notes = compact_with_masks(model, masks, align=1)
    seconds = time.perf_counter() - t
    align8, _, _ = compact_with_masks(model, masks, align=8)
    masked = ntksap.remove_masks(ntksap.apply_masks(copy.deepcopy(model), masks)).eval()
    variants = {"masked": masked, "align 1": align1, "align 8": align8}
    x1 = torch.randn(1, *shape)
    row: dict[str, Any] = {
        "model": name,
        "method": method,
        "nominal_density": masks.density,
        "effective_density": ntksap.effective_masks(model, masks).density,
        "compact_seconds": round(seconds, 2),
        "notes": notes,
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in variants.items()},
        "flops": {k: count_module_flops(m, shape)[0] for k, m in variants.items()},
    }
    sessions = {
        k: ort.InferenceSession(_onnx_bytes(m, x1, 17)[0], providers=["CPUExecutionProvider"])
        for k, m in variants.items()
    }
    for batch, n in ((64, 10), (1, 100)):
        x = torch.randn(batch, *shape)
        xn = x.numpy()
        with torch.inference_mode():
            row[f"torch_ms_b{batch}"] = blocks(
                {k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}, n
            )
        time.sleep(0.5)
        row[f"ort_ms_b{batch}"] = blocks(
            {k: (lambda s=s, xn=xn: s.run(None, {"input": xn})) for k, s in sessions.items()},
            n,
        )
    with torch.no_grad():
        xr = torch.randn(8, *shape)
        ref = variants["masked"](xr)
        row["max_relative_error"] = max(
            relative_error(variants[k](xr), ref) for k in ("align 1", "align 8")
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compaction.json")
    ap.add_argument("--models", nargs="+", default=["resnet20", "vgg16_bn"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    rows = []
    for name in args.models:
        for method in ("ntksap", "synflow"):
            masks = get_masks(name, SPARSITY, MASKS) if method == "ntksap" else synflow_masks(name)
            row = measure(name, method, masks)
            rows.append(row)
            p, f = row["params"], row["flops"]
            print(
                f"{name} {method}: params {p['masked']:,} -> {p['align 1']:,} / {p['align 8']:,}"
                f"; MFLOPs {f['masked'] / 1e6:.1f} -> {f['align 1'] / 1e6:.1f}; ort b64 ms "
                f"{row['ort_ms_b64']}; torch b64 ms {row['torch_ms_b64']}",
                flush=True,
            )
    write_evidence(args.out, {"sparsity": SPARSITY, "threads": 2, "rows": rows})


if __name__ == "__main__":
    main()
