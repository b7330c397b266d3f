"""Pruning wall time. Two suites:

--suite ntksap (default): NTK-SAP against its plain reference procedure
(`ntksap_reference.py`, the baseline, run through the same pruning loop in the same run) on
CIFAR ResNet-20 (10 classes: T=20, R=5, 100 noise images) and CIFAR VGG-16-BN (100 classes:
T=100, R=1, 1000 noise images in batches of 256), 98.2 % sparsity. For each variant:
seconds, FLOPs per noise batch (counted with torch.utils.flop_counter), achieved GFLOP/s,
and the ratio baseline / variant; as the ceiling, a plain forward + backward of the same
network on one noise batch (the best of NCHW and channels_last). Every round costs the
same (dense compute whatever the mask), so `--rounds K` times K rounds and the full-T time
is K rounds x T / K (stated as such).

    python benchmarks/prune_time.py                           # both networks
    python benchmarks/prune_time.py --networks resnet20 --rounds 5

--suite methods: every pruning method on ResNet-20 at paper settings.

Settings (algorithm.md): ntksap T=20, R=5, 100 Gaussian noise images in one batch;
synflow T=100; itersnip T=100 and snip/grasp T=1 on a class-balanced batch of 100
CIFAR-shaped images (10 x classes; synthetic here: the timing does not depend on pixel values);
random and magnitude T=1.

The baseline, measured in the same run, is one dense training step of ResNet-20 on the same
100 images (forward + backward, train mode). Each method's time is printed as a ratio to it
("dense-step equivalents"), which is comparable across machines.

    python benchmarks/prune_time.py --suite methods         # all methods, 1 run each
    python benchmarks/prune_time.py --suite methods --repeats 3 --methods ntksap,synflow

Writes JSON evidence (runs, mean, spread, hardware, versions) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import ntksap_reference
import torch
from _common import cpu_name, write_evidence

import ntksap
from ntksap import heap, models

PAPER = {
    "ntksap": {"rounds": 20, "resamples": 5, "num_samples": 100, "batch_size": 256},
    "synflow": {"rounds": 100},
    "itersnip": {"rounds": 100},
    "snip": {"rounds": 1},
    "grasp": {"rounds": 1},
    "random": {"rounds": 1},
    "magnitude": {"rounds": 1},
    "px": {"rounds": 100},
}
SPARSITY = 0.982
SHAPE = (3, 32, 32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_step_seconds(net, x, y, device, repeats: int = 5) -> list[float]:
    """Forward + backward of the dense model on the batch (the baseline unit of work)."""
    net = net.to(device).train()
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        _sync(device)
        if i:  # the first call warms up
            times.append(time.perf_counter() - t)
        net.zero_grad(set_to_none=True)
    return times


# ---------------------------------------------------------------------------------------
# Suite "ntksap": the reference procedure vs ntksap, with counted FLOPs
# ---------------------------------------------------------------------------------------
NETWORKS = {
    # name: (classes, the paper's NTK-SAP settings for it)
    "resnet20": (10, {"rounds": 20, "resamples": 5, "num_samples": 100, "batch_size": 256}),
    "vgg16_bn": (100, {"rounds": 100, "resamples": 1, "num_samples": 1000, "batch_size": 256}),
}
DEFAULT_TIMED_ROUNDS = {"resnet20": None, "vgg16_bn": 2}

#: variant -> (method, extra options, autocast dtype, heap reuse). The baseline runs
#: without ntksap's allocator policy (`ntksap.heap`), which is part of "ours".
VARIANTS = {
    "baseline": ("ntksap_reference", {}, None, False),
    "ntksap": ("ntksap", {}, None, True),
    "ntksap_separate": ("ntksap", {"bn_pass": "separate"}, None, True),
    "ntksap_no_heap_reuse": ("ntksap", {}, None, False),
    "ntksap_bf16": ("ntksap", {"precision": "bfloat16"}, None, True),
}


def _flops_per_batch(net, variant: str, settings: dict, device: torch.device) -> int:
    """FLOPs of one full noise batch (theta draw, statistics, clean + perturbed forward,
    backward) of `variant`, counted by torch.utils.flop_counter on one round of one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from ntksap.pruning import _context, _setup

    method, extra, _, _ = VARIANTS[variant]
    one = {**{k: v for k, v in settings.items() if k != "rounds"}, **extra}
    one.update(resamples=1, num_samples=settings["batch_size"] if settings["num_samples"]
               > settings["batch_size"] else settings["num_samples"])  # fmt: skip
    with ntksap_reference.registered():
        st = _setup(
            net, method, data=None, input_shape=SHAPE, device=device, include_bias=False,
            exclude=(), include=(), options=one, output_fn=None,
        )  # fmt: skip
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in st.params.items()}
        with FlopCounterMode(display=False) as counter:
            st.method.fn(_context(st, masks, 1, 1))
    return int(counter.get_total_flops())


def _ceiling(net, batch: int, classes: int, device: torch.device) -> dict:
    """GFLOP/s of a plain train-mode forward + backward (cross-entropy) of the network on
    one batch of noise, the best of NCHW and channels_last (median of 5 after a warm-up)."""
    from torch.utils.flop_counter import FlopCounterMode

    best: dict = {}
    x0 = torch.randn((batch, *SHAPE), device=device)
    y = torch.arange(batch, device=device) % classes
    for fmt in ("contiguous", "channels_last"):
        m = copy.deepcopy(net).to(device).train()
        x = x0.contiguous(memory_format=getattr(torch, f"{fmt}_format", torch.channels_last))
        with FlopCounterMode(display=False) as counter:
            torch.nn.functional.cross_entropy(m(x), y).backward()
        flops = counter.get_total_flops()
        times = []
        for i in range(6):
            m.zero_grad(set_to_none=True)
            _sync(device)
            t = time.perf_counter()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            _sync(device)
            if i:
                times.append(time.perf_counter() - t)
        gflops = flops / statistics.median(times) / 1e9
        if not best or gflops > best["gflop_per_s"]:
            best = {"format": fmt, "flops": flops, "median_s": statistics.median(times),
                    "gflop_per_s": round(gflops, 1)}  # fmt: skip
    return best


def ntksap_suite(args: argparse.Namespace) -> None:
    from ntksap.scoring import ntksap as fast

    device = torch.device(args.device)
    warnings.simplefilter("ignore", ntksap.LayerCollapseWarning)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    if "baseline" not in variants:
        variants.insert(0, "baseline")  # every ratio is against the baseline of this run
    rows = []
    for name in [n.strip() for n in args.networks.split(",") if n.strip()]:
        classes, paper = NETWORKS[name]
        net = models.create(name, num_classes=classes).to(device)
        timed = args.rounds or DEFAULT_TIMED_ROUNDS[name] or paper["rounds"]
        timed = min(timed, paper["rounds"])
        sizes = fast.noise_batch_sizes(paper["num_samples"], paper["batch_size"])
        batch = sizes[0]
        ceiling = _ceiling(net, batch, classes, device)
        print(f"{name}: T={paper['rounds']} R={paper['resamples']} noise "
              f"{paper['num_samples']} in batches {sizes}; timing {timed} round(s); ceiling "
              f"(plain fwd+bwd, batch {batch}, {ceiling['format']}) "
              f"{ceiling['gflop_per_s']} GFLOP/s", flush=True)  # fmt: skip
        # total FLOPs of one round: per-batch FLOPs scale with the batch size
        flops = {v: _flops_per_batch(net, v, paper, device) for v in variants}
        runs: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit all alike
            for v in variants:
                method, extra, _, reuse = VARIANTS[v]
                kw = {**paper, **extra, "rounds": timed}
                heap.ENABLED = reuse
                # the schedule of a T-round run, cut after `timed` rounds: same work per round
                with ntksap_reference.registered():
                    try:
                        _sync(device)
                        t = time.perf_counter()
                        ntksap.prune(net, method, sparsity=SPARSITY, input_shape=SHAPE, seed=0,
                                     **kw)  # fmt: skip
                        _sync(device)
                        runs[v].append(time.perf_counter() - t)
                    finally:
                        heap.ENABLED = True
                print(f"  {v:16s} {runs[v][-1]:8.2f} s for {timed} round(s)", flush=True)
        base = statistics.median(runs["baseline"])
        draws_per_round = paper["resamples"] * len(sizes)
        for v in variants:
            sec = statistics.median(runs[v])
            # FLOPs of the timed work: per-batch FLOPs x batches, scaled by batch size
            work = flops[v] * sum(sizes) / batch * paper["resamples"] * timed
            row = {
                "network": name, "variant": v, "settings": paper, "timed_rounds": timed,
                "runs_s": [round(x, 3) for x in runs[v]], "median_s": round(sec, 3),
                "full_T_s": round(sec * paper["rounds"] / timed, 1),
                "flops_per_noise_batch": flops[v], "noise_batch": batch,
                "draws_per_round": draws_per_round,
                "gflop_per_s": round(work / sec / 1e9, 1),
                "ceiling_gflop_per_s": ceiling["gflop_per_s"],
                "speedup_vs_baseline": round(base / sec, 2),
            }  # fmt: skip
            rows.append(row)
            print(f"  {v:16s} median {sec:8.2f} s  full T {row['full_T_s']:8.1f} s  "
                  f"{flops[v] / 1e9:7.1f} GFLOP/batch  {row['gflop_per_s']:6.1f} GFLOP/s "
                  f"(ceiling {ceiling['gflop_per_s']})  x{row['speedup_vs_baseline']:.2f}",
                  flush=True)  # fmt: skip
    evidence = {"benchmark": "prune_time ntksap", "sparsity": SPARSITY, "results": rows}
    write_evidence(args.out, evidence, str(device))


def methods_suite(args: argparse.Namespace) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        ntksap.get_method(m)  # unknown names fail here, before any timing
    device = torch.device(args.device)
    # collapse is recorded per method in the JSON ("collapsed"); no need to warn as well
    warnings.simplefilter("ignore", ntksap.LayerCollapseWarning)

    net = models.create("resnet20", num_classes=10).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((100, *SHAPE), generator=g).to(device)
    y = torch.arange(10).repeat(10).to(device)  # class-balanced: 10 per class
    base = dense_step_seconds(copy.deepcopy(net), x, y, device)
    base_s = statistics.median(base)
    print(f"baseline: dense ResNet-20 fwd+bwd on 100 images: {base_s * 1e3:.1f} ms (median of 5)")

    rows = []
    for m in methods:
        kw = dict(PAPER[m])
        if ntksap.get_method(m).needs_data:
            kw["data"] = [(x, y)]
        runs = []
        for r in range(args.repeats):
            _sync(device)
            t = time.perf_counter()
            masks = ntksap.prune(net, m, sparsity=SPARSITY, input_shape=SHAPE, seed=r, **kw)
            _sync(device)
            runs.append(time.perf_counter() - t)
        mean = statistics.fmean(runs)
        row = {
            "method": m,
            "settings": PAPER[m],
            "runs_s": [round(v, 4) for v in runs],
            "mean_s": round(mean, 4),
            "stdev_s": round(statistics.stdev(runs), 4) if len(runs) > 1 else None,
            "dense_step_equivalents": round(mean / base_s, 1),
            "kept": masks.num_kept,
            "collapsed": masks.collapsed(),
        }
        rows.append(row)
        print(
            f"{m:10s} {mean:9.2f} s  = {row['dense_step_equivalents']:8.1f} x dense step"
            f"  (runs {row['runs_s']}, kept {masks.num_kept:,})",
            flush=True,
        )

    evidence = {
        "benchmark": "prune_time",
        "model": "resnet20 (CIFAR, 10 classes)",
        "sparsity": SPARSITY,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "baseline_dense_step_s": [round(v, 5) for v in base],
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(evidence, indent=2) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--suite", choices=("ntksap", "methods"), default="ntksap")
    ap.add_argument("--methods", default=",".join(ntksap.list_methods()), help="(methods)")
    ap.add_argument("--networks", default="resnet20,vgg16_bn", help="(ntksap) comma list")
    ap.add_argument(
        "--rounds", type=int, default=None,
        help="(ntksap) rounds to time per network (default: all T for ResNet-20, 2 for VGG)",
    )  # fmt: skip
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"(ntksap) of {', '.join(VARIANTS)}"
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON evidence file")
    args = ap.parse_args()
    results = Path(__file__).with_name("results")
    if args.suite == "methods":
        args.out = args.out or results / "prune_time.json"
        methods_suite(args)
    else:
        args.out = args.out or results / "prune_time_ntksap.json"
        ntksap_suite(args)


if __name__ == "__main__":
    main()
