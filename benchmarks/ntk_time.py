"""Wall time of the exact empirical NTK of CIFAR ResNet-20: 100 inputs x 10 logits.

The paper's diagnostic kernel: the (1000, 1000) fixed-weight NTK of ResNet-20's logits on 100
Gaussian inputs 3x32x32, w.r.t. the prunable weights (270,896 Conv/Linear weights), dense and
with a 73.8 %-sparse random mask (`ntksap.prune(net, "random", sparsity=0.738)`), by each
implementation ("jacobian": Jacobian contraction; "ntk_vp": NTK-vector products), in float32
and float64, plus "trace" mode (sum of squared Jacobian rows). Default memory_limit (2 GiB):
the dense float64 Jacobian alone is 2.0 GiB, so the jacobian route runs in panels there.

Each configuration's kernels are checked against each other (relative Frobenius difference
of the two implementations, trace mode vs the trace of the full kernel). The timing of one
`empirical_ntk` call includes its planning forward. On a 2-core CPU one ntk_vp kernel takes
minutes (it costs about N^2*K forward passes, jacobian N*K backward passes plus one GEMM), so
`--repeats` defaults to 1.

    python benchmarks/ntk_time.py                              # everything, CPU (+ cuda)
    python benchmarks/ntk_time.py --implementations jacobian --dtypes float64 --repeats 3

Writes JSON evidence (every run, median, plan, agreement, hardware, versions) to --out,
rewritten after every measurement so that an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name

import ntksap
from ntksap import models
from ntksap.analysis.ntk import empirical_ntk, ntk_cost

SPARSITY = 0.738
SHAPE = (3, 32, 32)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Any) -> tuple[float, torch.Tensor]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=100, help="inputs N (default 100)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per setting (default 1)")
    ap.add_argument("--implementations", default="jacobian,ntk_vp")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--masks", default="dense,sparse", help="dense, sparse or both")
    ap.add_argument("--no-trace", action="store_true", help="skip the trace-mode timings")
    ap.add_argument("--devices", default=None, help="default: cpu, and cuda if available")
    ap.add_argument("--memory-limit-gib", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/ntk_time.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = [s for s in args.implementations.split(",") if s]
    dtypes = [s for s in args.dtypes.split(",") if s]
    mask_kinds = [s for s in args.masks.split(",") if s]
    devices = (
        args.devices.split(",")
        if args.devices
        else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    limit = int(args.memory_limit_gib * 2**30)

    torch.manual_seed(0)
    net = models.create("resnet20", num_classes=10)
    x = torch.randn((args.samples, *SHAPE), generator=torch.Generator().manual_seed(0))
    sparse = ntksap.prune(net, "random", sparsity=SPARSITY, seed=0)
    masks = {"dense": None, "sparse": sparse}

    evidence: dict[str, Any] = {
        "benchmark": "ntk_time",
        "command": "python benchmarks/ntk_time.py "
        + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "out"),
        "settings": {
            "model": "resnet20",
            "samples": args.samples,
            "logits": 10,
            "input_shape": list(SHAPE),
            "sparse_mask": f"random, sparsity {SPARSITY} (kept {sparse.num_kept:,} of "
            f"{sparse.num_total:,})",
            "memory_limit_bytes": limit,
            "repeats": args.repeats,
        },
        "hardware": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": [],
        "agreement": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(evidence, indent=2) + "\n")

    # Warm-up: torch.func's first vjp/jvp imports and traces decompositions (seconds).
    for impl in impls:
        empirical_ntk(net, x[:2], implementation=impl, dtype=torch.float32)

    print(
        f"ResNet-20, N={args.samples} x K=10, memory_limit={args.memory_limit_gib:g} GiB, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}",
        flush=True,
    )
    for device in devices:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for mkind in mask_kinds:
                m = masks[mkind]
                plans = {
                    mode: ntk_cost(
                        net, x, m, mode=mode, dtype=dtype, memory_limit=limit, device=device
                    )
                    for mode in ("full", "trace")
                }
                kernels: dict[str, torch.Tensor] = {}
                todo = [(impl, "full") for impl in impls]
                if not args.no_trace:
                    todo.append(("auto", "trace"))
                for impl, mode in todo:
                    runs = []
                    loads = []
                    out = None
                    for _ in range(args.repeats):
                        call = functools.partial(
                            empirical_ntk,
                            net,
                            x,
                            m,
                            mode=mode,
                            implementation=impl,
                            dtype=dtype,
                            memory_limit=limit,
                            device=device,
                        )
                        loads.append(os.getloadavg()[0])
                        sec, out = timed(device, call)
                        runs.append(sec)
                    assert out is not None
                    kernels[f"{impl}/{mode}"] = out.cpu()
                    plan = plans[mode]
                    key = "jacobian" if mode == "trace" else impl  # trace: the rows plan
                    row = {
                        "device": device,
                        "dtype": dname,
                        "mask": mkind,
                        "mode": mode,
                        "implementation": impl if mode == "full" else "rows (trace)",
                        "runs_s": [round(r, 3) for r in runs],
                        "median_s": round(statistics.median(runs), 3),
                        # 1-min load average just before each run: > threads means another
                        # process shared the cores and the time is inflated
                        "loadavg_before": [round(v, 2) for v in loads],
                        "auto_choice": plan["choice"] if mode == "full" else "rows",
                        "plan": {
                            k: plan[key].get(k)
                            for k in (
                                "chunk_samples",
                                "chunk_logits",
                                "panel_rows",
                                "panels",
                                "jvp_samples",
                                "rows_computed",
                                "peak_bytes",
                                "flops",
                            )
                            if k in plan[key]
                        },
                        "P": plan["P"],
                        "P_kept": plan["P_kept"],
                        "trace": float(out.trace() if out.dim() == 2 else out),
                    }
                    evidence["results"].append(row)
                    save()
                    print(
                        f"{device:5s} {dname:8s} {mkind:6s} {mode:5s} {row['implementation']:13s}"
                        f" {row['median_s']:9.2f} s  runs {row['runs_s']}"
                        f"  load {row['loadavg_before']}",
                        flush=True,
                    )
                agree: dict[str, Any] = {"device": device, "dtype": dname, "mask": mkind}
                if "jacobian/full" in kernels and "ntk_vp/full" in kernels:
                    agree["rel_diff_jacobian_vs_ntk_vp"] = rel(
                        kernels["ntk_vp/full"], kernels["jacobian/full"]
                    )
                full = kernels.get("jacobian/full", kernels.get("ntk_vp/full"))
                if full is not None and "auto/trace" in kernels:
                    t_full = float(full.double().trace())
                    agree["rel_diff_trace_vs_full"] = (
                        abs(float(kernels["auto/trace"]) - t_full) / t_full
                    )
                evidence["agreement"].append(agree)
                save()

    # Table
    print()
    print("| device | dtype | mask | mode | implementation | median (s) | auto picks |")
    print("|---|---|---|---|---|---|---|")
    for r in evidence["results"]:
        print(
            f"| {r['device']} | {r['dtype']} | {r['mask']} | {r['mode']} | "
            f"{r['implementation']} | {r['median_s']:.2f} | {r['auto_choice']} |"
        )
    print()
    by = {
        (r["device"], r["dtype"], r["mask"], r["implementation"]): r["median_s"]
        for r in evidence["results"]
    }
    ratios = []
    for device in devices:
        for dname in dtypes:
            for mkind in mask_kinds:
                a = by.get((device, dname, mkind, "jacobian"))
                b = by.get((device, dname, mkind, "ntk_vp"))
                if a and b:
                    ratios.append({"device": device, "dtype": dname, "mask": mkind, "ratio": b / a})
                    print(f"ntk_vp / jacobian  {device} {dname} {mkind}: {b / a:.1f}x")
    evidence["ratio_ntk_vp_over_jacobian"] = ratios
    for a in evidence["agreement"]:
        print("agreement", a)
    save()
    print(f"evidence: {args.out}")


if __name__ == "__main__":
    main()
