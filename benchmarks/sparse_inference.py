"""Sparse inference: pruned networks on a CPU, four runtimes, one run.

For CIFAR ResNet-20, CIFAR VGG-16-BN (10 classes, 32x32) and an MLP (784-1024-1024-10) at
90 / 95.6 / 98.2 / 99.3 % sparsity with NTK-SAP masks, batch 1 and 64, float32:

- torch dense: the masked model (pruned weights exact zeros), eval, channels_last;
- onnxruntime dense: `torch.onnx.export(dynamo=False)` of the same model, all graph
  optimisations (the best dense runtime measured in the issue);
- compacted: `ntksap.compact.compact(model, masks)` (dead channels removed), exported and run
  in onnxruntime the same way (n/a when ntksap.compact is missing);
- ntksap layers: `ntksap.sparse.convert(..., chain=False)`: every layer its own call (the
  converter before the chain executor; kept as a same-run baseline);
- ntksap sparse: `ntksap.sparse.convert(model, masks, example_input=<that batch>)` (runs of
  sparse convs in one C++ call: `SparseChain`).

Milliseconds per batch (median of the timed calls; each runtime timed in blocks, over 3
rounds) and each runtime's speed-up over onnxruntime dense (ort ms / runtime ms). Every
output is checked against the masked torch model. The per-layer autotune table of
ntksap.sparse for ResNet-20 at 98.2 % is printed too.

Masks: `ntksap.prune(model, "ntksap", ...)` with the paper's settings for ResNet-20 and the
MLP (T=20 rounds, R=5 resamples, 100 noise images); VGG-16-BN with reduced settings (T=5,
R=1, 100 noise images) to fit this CPU. Cached in --masks-dir (reused when present).
Weights are the untrained initialisation (BatchNorm: running mean 0, variance 1): the
timings do not depend on the values.

    flock /tmp/ntksap-cpu.lock .venv/bin/python benchmarks/sparse_inference.py
    python benchmarks/sparse_inference.py --networks resnet20 --sparsities 0.982 --batches 64

Writes JSON evidence to --out (default benchmarks/results/sparse_inference.json).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import write_evidence
from torch import nn

import ntksap
import ntksap.sparse as sp
from ntksap import models

HERE = Path(__file__).resolve().parent
SHAPES = {"resnet20": (3, 32, 32), "vgg16_bn": (3, 32, 32), "mlp": (1, 28, 28)}
NTKSAP_SETTINGS = {
    "resnet20": {"rounds": 20, "resamples": 5, "num_samples": 100},
    "vgg16_bn": {"rounds": 5, "resamples": 1, "num_samples": 100},  # reduced (CPU time)
    "mlp": {"rounds": 20, "resamples": 5, "num_samples": 100},
}
RUNTIMES = ("torch dense", "ort dense", "compacted", "ntksap layers", "ntksap sparse")


def build(name: str) -> nn.Module:
    if name == "mlp":
        return models.create("mlp", hidden=(1024, 1024))
    return models.create(name, num_classes=10)


def get_masks(name: str, sparsity: float, folder: Path) -> ntksap.Masks:
    path = folder / f"{name}_ntksap_{sparsity:.3f}.safetensors"
    if path.exists():
        return ntksap.Masks.load(path)
    t = time.perf_counter()
    masks = ntksap.prune(
        build(name),
        "ntksap",
        sparsity=sparsity,
        input_shape=SHAPES[name],
        seed=0,
        **NTKSAP_SETTINGS[name],
    )
    print(f"  masks {name} {sparsity:.1%}: {time.perf_counter() - t:.1f} s (cached in {path})")
    masks.save(path)
    return masks


def ort_session(model: nn.Module, x: torch.Tensor, threads: int, folder: Path) -> Any:
    import onnxruntime as ort

    path = folder / f"m{id(model)}_{x.shape[0]}.onnx"
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamo=False,
        opset_version=17,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess


def time_blocks(
    fns: dict[str, Any], min_calls: int, budget_s: float, rounds: int = 3
) -> dict[str, dict]:
    """Per runtime: median / min ms per call. `rounds` rounds; in each, every runtime runs a
    block (2 warm-up calls, then >= min_calls / rounds calls and its share of the budget).
    Blocks, not call-by-call alternation: onnxruntime's and OpenMP's worker threads spin for
    a while after each call and would steal the cores from the next runtime's call; the
    rounds still spread slow phases of a shared machine over all runtimes."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    share = budget_s / (rounds * len(fns))
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            fn()
            start = time.perf_counter()
            n = 0
            while n < max(1, min_calls // rounds) or time.perf_counter() - start < share:
                t = time.perf_counter()
                fn()
                times[k].append(1e3 * (time.perf_counter() - t))
                n += 1
                if n >= 400:
                    break
    return {
        k: {"median_ms": statistics.median(v), "min_ms": min(v), "calls": len(v)}
        for k, v in times.items()
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--networks", default="resnet20,vgg16_bn,mlp")
    p.add_argument("--sparsities", default="0.9,0.956,0.982,0.993")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case")
    p.add_argument("--masks-dir", type=Path, default=HERE / "results" / "sparse_masks")
    p.add_argument("--out", type=Path, default=HERE / "results" / "sparse_inference.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.masks_dir.mkdir(parents=True, exist_ok=True)
    try:
        from ntksap.compact import compact
    except ImportError:
        compact = None
        print("ntksap.compact not present: the compacted column is n/a")
    print(f"C++ kernels: {'on' if sp.extension_available() else 'OFF (pure-torch fallback)'}")

    rows: list[dict] = []
    profiles: dict[str, str] = {}
    decisions: dict[str, list] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ntksap-sparse-bench-"))
    for name in args.networks.split(","):
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            masks = get_masks(name, sparsity, args.masks_dir)
            net = build(name).eval()
            masked = ntksap.remove_masks(ntksap.apply_masks(copy.deepcopy(net), masks)).eval()
            for batch in [int(b) for b in args.batches.split(",")]:
                x = torch.randn(batch, *SHAPES[name])
                with torch.no_grad():
                    ref = masked(x)
                fns: dict[str, Any] = {}
                errors: dict[str, float] = {}
                # torch dense, channels_last (MLP: plain)
                cl = name != "mlp"
                tnet = copy.deepcopy(masked)
                xt = x
                if cl:
                    tnet = tnet.to(memory_format=torch.channels_last)
                    xt = x.contiguous(memory_format=torch.channels_last)

                def torch_dense(tnet=tnet, xt=xt):
                    with torch.no_grad():
                        return tnet(xt)

                fns["torch dense"] = torch_dense
                sess = ort_session(masked, x, args.threads, tmp)
                xn = x.numpy()
                fns["ort dense"] = lambda sess=sess, xn=xn: sess.run(None, {"x": xn})
                errors["ort dense"] = rel_err(torch.from_numpy(fns["ort dense"]()[0]), ref)
                compact_info: dict[str, Any] = {}
                if compact is not None:
                    small = compact(net, masks, example_input=x)
                    csess = ort_session(small, x, args.threads, tmp)
                    fns["compacted"] = lambda s=csess, xn=xn: s.run(None, {"x": xn})
                    errors["compacted"] = rel_err(torch.from_numpy(fns["compacted"]()[0]), ref)
                    compact_info = {
                        "params": sum(q.numel() for q in small.parameters()),
                        "params_before": sum(q.numel() for q in net.parameters()),
                    }
                if sp.extension_available():
                    plain = sp.convert(
                        net, masks, example_input=x, threads=args.threads, chain=False
                    )
                    fns["ntksap layers"] = lambda plain=plain, x=x: plain(x)
                    errors["ntksap layers"] = rel_err(plain(x), ref)
                t = time.perf_counter()
                fast = sp.convert(net, masks, example_input=x, threads=args.threads)
                convert_s = time.perf_counter() - t
                fns["ntksap sparse"] = lambda fast=fast, x=x: fast(x)
                errors["ntksap sparse"] = rel_err(fast(x), ref)
                timing = time_blocks(fns, min_calls=10 if batch > 1 else 50, budget_s=args.budget)
                ort_ms = timing["ort dense"]["median_ms"]
                row = {
                    "network": name,
                    "sparsity": sparsity,
                    "density": masks.density,
                    "batch": batch,
                    "timing": timing,
                    "speedup_vs_ort": {k: ort_ms / v["median_ms"] for k, v in timing.items()},
                    "rel_error_vs_masked_torch": errors,
                    "sparse_layers": sum(
                        m in ("sparse", "chain") for m in fast.layer_modes().values()
                    ),
                    "layers": len(fast.decisions),
                    "convert_seconds": convert_s,
                    "compacted": compact_info,
                }
                rows.append(row)
                key = f"{name} {sparsity:.1%} batch {batch}"
                decisions[key] = [
                    {
                        "name": d.name,
                        "density": d.density,
                        "mode": d.mode,
                        "fused": ("bn+" if d.bn_folded else "") + d.fused,
                        "dense_ms": d.dense_ms,
                        "sparse_ms": d.sparse_ms,
                        "chain": d.chain,
                    }
                    for d in fast.decisions
                ]
                row["chains"] = [
                    {
                        "name": c.name,
                        "convs": len(c.layers),
                        "mode": c.mode,
                        "fused_ms": c.fused_ms,
                        "layers_ms": c.layers_ms,
                        "split_work": c.split_work,
                    }
                    for c in fast.modules()
                    if isinstance(c, sp.SparseChain)
                ]
                if name == "resnet20" and abs(sparsity - 0.982) < 1e-9:
                    profiles[key] = fast.summary()
                cells = "  ".join(
                    f"{k} {timing[k]['median_ms']:.2f} ms ({ort_ms / timing[k]['median_ms']:.2f}x)"
                    if k in timing
                    else f"{k} n/a"
                    for k in RUNTIMES
                )
                print(f"{key}: {cells}  max rel err {max(errors.values()):.1e}", flush=True)

    print("\n| network | sparsity | batch | " + " | ".join(RUNTIMES) + " |")
    print("|---|---:|---:|" + "---:|" * len(RUNTIMES))
    for r in rows:
        cells = []
        for k in RUNTIMES:
            if k in r["timing"]:
                ms = r["timing"][k]["median_ms"]
                cells.append(f"{ms:.2f} ms ({r['speedup_vs_ort'][k]:.2f}x)")
            else:
                cells.append("n/a")
        print(
            f"| {r['network']} | {r['sparsity']:.1%} | {r['batch']} | " + " | ".join(cells) + " |"
        )
    for key, text in profiles.items():
        print(f"\nPer-layer autotune, {key}:\n{text}")
    write_evidence(
        args.out,
        {
            "benchmark": "sparse_inference",
            "threads": args.threads,
            "cpp_kernels": sp.extension_available(),
            "ntksap_settings": NTKSAP_SETTINGS,
            "rows": rows,
            "per_layer": decisions,
            "profiles": profiles,
            "numpy": np.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
        },
    )


if __name__ == "__main__":
    main()
