"""The chain executor's parts, each against its own switch-off in the same run.

One converted model (NTK-SAP mask, autotuned for that batch), timed in alternating blocks
(10 rounds x 30 calls by default, median per block, median of the blocks) with:

- wavefront on (default) vs off: same-size runs of convs as a row-band wavefront in the
  blocked layout vs conv after conv (`SparseChain.wavefront`);
- blocked layout (default for batches >= 16) vs the NCHW kernel for every image
  (`SparseChain.policy = "spatial"`), batch >= 16 only;
- the chain vs its layers one by one (`convert(chain=False)`).

    flock /tmp/ntksap-cpu.lock .venv/bin/python benchmarks/chain_executor.py
    python benchmarks/chain_executor.py --network vgg16_bn --sparsity 0.982 --batch 16

Masks come from benchmarks/results/sparse_masks (made by sparse_inference.py when missing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from sparse_inference import SHAPES, build, get_masks

import ntksap.sparse as sp

HERE = Path(__file__).resolve().parent


def blocks(fns: dict[str, Any], rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of each function's median ms per call (functions alternate)."""
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(3):
                fn()
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                fn()
                ts.append(1e3 * (time.perf_counter() - t))
            per[k].append(statistics.median(ts))
    return {k: statistics.median(v) for k, v in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--network", default="resnet20", choices=sorted(SHAPES))
    p.add_argument("--sparsity", type=float, default=0.982)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--masks-dir", type=Path, default=HERE / "results" / "sparse_masks")
    args = p.parse_args()
    if not sp.extension_available():
        raise SystemExit("the C++ kernels are not built here: nothing to compare")
    torch.set_num_threads(args.threads)
    args.masks_dir.mkdir(parents=True, exist_ok=True)
    masks = get_masks(args.network, args.sparsity, args.masks_dir)
    net = build(args.network).eval()
    x = torch.randn(args.batch, *SHAPES[args.network])
    fast = sp.convert(net, masks, example_input=x, threads=args.threads)
    plain = sp.convert(net, masks, example_input=x, threads=args.threads, chain=False)
    chains = list(fast.chains().values())
    if not chains:
        raise SystemExit(f"{args.network} has no chain of sparse convs: nothing to compare")
    print(
        f"{args.network} {args.sparsity:.1%} batch {args.batch}, {args.threads} threads: "
        f"{len(chains)} chain(s) of {[len(c.layers) for c in chains]} convs"
    )

    def setting(wavefront: bool, policy: str) -> Any:
        def call() -> Any:
            for c in chains:
                c.wavefront, c.policy = wavefront, policy
            return fast(x)

        return call

    fns = {
        "chains (wavefront, auto layout)": setting(True, "auto"),
        "chains, wavefront off": setting(False, "auto"),
    }
    if args.batch >= 16:
        fns["chains, NCHW kernel for every image"] = setting(True, "spatial")
    fns["layer by layer (chain=False)"] = lambda: plain(x)
    with torch.no_grad():
        ref = fns["layer by layer (chain=False)"]()
        for name, fn in fns.items():
            err = float((fn() - ref).abs().max() / ref.abs().max())
            assert err <= 1e-5, f"{name}: output differs by {err:.1e}"
        times = blocks(fns, args.rounds, args.calls)
    base = times["chains (wavefront, auto layout)"]
    for name, ms in times.items():
        print(f"  {name:<38} {ms:8.3f} ms   {ms / base:5.2f}x the default's time")


if __name__ == "__main__":
    main()
