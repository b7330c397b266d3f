"""Per-layer kept weights of the masks in sweep folders at one sparsity: where a method breaks.

For every variant (method + the options and pruning settings its runs were given) at the
chosen sparsity, reads the run folders' own files (mask.safetensors, config.json,
result.json): the mean over seeds of the weights kept per prunable tensor, the output units
of the last tensor (the classifier) that keep no weight, the collapsed tensors, the
effective sparsity and the final top-1, and for robust NTK-SAP in how many masks the guarded
pass ran. Prints one markdown table, layers as rows.

    python benchmarks/extreme_layers.py /work/sweeps/extreme-lenet5 \\
        /work/sweeps/extreme-lenet5-robust --sparsity 0.993 --methods ntksap synflow

benchmarks/quality_extreme.md quotes its tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from ntksap.masks import Masks


def variant(config: dict) -> str:
    """'ntksap' or 'ntksap robust=true' / 'ntksap floor=1 init=none': the method and what the
    run set beyond its defaults."""
    prune = config["prune"]
    extra = {**prune.get("options", {})}
    if prune.get("floor") is not None:
        extra["floor"] = prune["floor"]
    words = [f"{k}={str(v).lower()}" for k, v in sorted(extra.items())]
    return " ".join([prune["method"], *words])


def collect(dirs: list[Path], sparsity: float, methods: set[str] | None) -> dict[str, list]:
    runs: dict[str, list] = defaultdict(list)
    for d in dirs:
        folders = sorted((d / "runs").iterdir()) if (d / "runs").is_dir() else [d]
        for run in folders:
            cfg_file, res_file = run / "config.json", run / "result.json"
            if not (cfg_file.is_file() and res_file.is_file()):
                continue
            cfg = json.loads(cfg_file.read_text())
            res = json.loads(res_file.read_text())
            if res.get("status") != "finished" or "prune" not in cfg:
                continue
            if abs(cfg["prune"]["density"] - (1.0 - sparsity)) > 1e-9:
                continue
            if methods and cfg["prune"]["method"] not in methods:
                continue
            masks = Masks.load(run / "mask.safetensors")
            runs[variant(cfg)].append((masks, res))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep folders or run folders")
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--methods", nargs="+", help="only these methods (default: all)")
    args = ap.parse_args()
    runs = collect(args.dirs, args.sparsity, set(args.methods) if args.methods else None)
    if not runs:
        raise SystemExit(f"no finished run at sparsity {args.sparsity} in {args.dirs}")
    names = sorted(runs)
    first = runs[names[0]][0][0]
    layers = list(first.keys())
    print(f"Sparsity {100 * args.sparsity:.2f} %: weights kept per layer, mean over seeds (n)\n")
    print("| layer | size | " + " | ".join(f"{n} (n={len(runs[n])})" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for layer in layers:
        cells = [f"{statistics.mean(int(m[layer].sum()) for m, _ in runs[n]):.0f}" for n in names]
        print(f"| {layer} | {first[layer].numel():,} | " + " | ".join(cells) + " |")
    head = layers[-1]
    rows = {
        "classifier units with no weight": lambda m, r: int((~m[head].flatten(1).any(1)).sum()),
        "collapsed tensors": lambda m, r: len(r.get("collapsed") or []),
        "effective sparsity (%)": lambda m, r: 100 * r["effective_sparsity"],
        "final top-1 (%)": lambda m, r: r["final_top1"],
    }
    for label, fn in rows.items():
        cells = [f"{statistics.mean(fn(m, r) for m, r in runs[n]):.2f}" for n in names]
        print(f"| {label} | | " + " | ".join(cells) + " |")
    # robust NTK-SAP: in how many of the masks the published pass starved a layer, so that
    # the guarded pass made the mask (metadata "guard"; "-" where the masks have none)
    guards = [[m.metadata.get("guard") for m, _ in runs[n]] for n in names]
    if any(g for gs in guards for g in gs):
        cells = [
            f"{sum(bool(g and g['guarded']) for g in gs)} of {len(gs)}" if any(gs) else "-"
            for gs in guards
        ]
        print("| guarded pass ran | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
