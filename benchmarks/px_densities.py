"""Per-layer densities of CIFAR ResNet-20 pruned to 98.2 % sparsity by PX, NTK-SAP and SynFlow.

ResNet-20 (10 classes, 3x32x32 inputs, the zoo's Kaiming init, seeded by `--seeds`) pruned
to density 0.8**18 (sparsity 98.20 %, the paper grid's highest) by:

- px: the defaults (100 rounds, exponential, global; jvf and pk in eval mode, BatchNorm
  with its running statistics, an affine identity at init) on 100 class-balanced images
  (10 per class, one batch);
- px norm_stats=batch: the same with jvf and pk in train mode (batch statistics), as the
  released code does;
- ntksap: the paper's CIFAR-10 defaults (T = 20, R = 5, 100 noise images, data-free);
- synflow: T = 100 (data-free).

No CIFAR-10 ships with the package, so the images are `ntksap.data`'s `synthetic` set
(class templates + uniform noise, 3x32x32, normalised) through `prune_batches` (10 per
class), as a run would read them; say so when quoting the numbers.

The script also measures, once per seed, how much of px's first-round score is float
rounding: the same scores computed in float32 and in float64 (see the BatchNorm caveat in
`ntksap.scoring.px`); `f64_over_f32` near 1 means a real signal, about 1e-9 means noise.

    python benchmarks/px_densities.py                      # 3 seeds, about 10 min on 2 cores
    python benchmarks/px_densities.py --seeds 0 --out /tmp/px.json

Writes JSON (per method and seed: per-layer kept/total/density, seconds; the precision check;
settings, hardware, versions) to --out and prints the markdown table of mean densities.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name

import ntksap
from ntksap import data
from ntksap.runs import build_model

MODEL, CLASSES, SHAPE = "resnet20", 10, (3, 32, 32)
DENSITY = 0.8**18  # sparsity 98.20 %

#: label -> (method, prune keywords)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "px": ("px", {"norm_stats": "running"}),  # the default, spelt out
    "px (norm_stats=batch)": ("px", {"norm_stats": "batch"}),
    "ntksap": ("ntksap", {}),
    "synflow": ("synflow", {}),
}


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """100 class-balanced synthetic CIFAR-shaped training images, one batch."""
    ds = data.create("synthetic", split="train", num_classes=CLASSES, input_shape=SHAPE)
    return data.prune_batches(ds, per_class=10, seed=seed)


def precision_check(seed: int, batch: list) -> dict[str, float]:
    """Per layer: mean px round-1 score in float64 / in float32 (1 = signal, ~0 = noise),
    with the released BatchNorm rule (norm_stats="batch"), the one that loses the signal."""
    net = build_model(MODEL, CLASSES, SHAPE, seed)
    s32 = ntksap.compute_scores(net, "px", data=batch, seed=seed, norm_stats="batch")
    b64 = [(x.double(), y) for x, y in batch]
    s64 = ntksap.compute_scores(net.double(), "px", data=b64, seed=seed, norm_stats="batch")
    return {n: float(s64[n].mean() / s32[n].mean()) for n in s32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "px_densities.json"
    )
    args = ap.parse_args()
    result: dict[str, Any] = {
        "model": MODEL,
        "input_shape": list(SHAPE),
        "num_classes": CLASSES,
        "density": DENSITY,
        "sparsity": 1 - DENSITY,
        "data": "ntksap.data synthetic (3x32x32, 10 classes), prune_batches per_class=10",
        "methods": {k: {"method": m, "options": kw} for k, (m, kw) in METHODS.items()},
        "seeds": args.seeds,
        "runs": {},
        "precision_check": {},
        "hardware": {"cpu": cpu_name(), "threads": torch.get_num_threads()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ntksap": ntksap.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        batch = batches(seed)
        result["precision_check"][str(seed)] = precision_check(seed, batch)
        for label in args.methods:
            method, kw = METHODS[label]
            net = build_model(MODEL, CLASSES, SHAPE, seed)
            started = time.perf_counter()
            masks = ntksap.prune(
                net,
                method,
                density=DENSITY,
                data=batch if ntksap.get_method(method).needs_data_for(kw) else None,
                input_shape=SHAPE,
                seed=seed,
                **kw,
            )
            seconds = time.perf_counter() - started
            layers = {
                n: {"kept": int(m.sum()), "total": m.numel(), "density": float(m.sum()) / m.numel()}
                for n, m in masks.items()
            }
            result["runs"].setdefault(label, {})[str(seed)] = {
                "seconds": round(seconds, 2),
                "num_kept": masks.num_kept,
                "layers": layers,
                "dead_outputs": masks.dead_outputs(),
                "options": masks.metadata["options"],
            }
            print(f"seed {seed} {label}: {seconds:.1f} s", flush=True)
            args.out.write_text(json.dumps(result, indent=1))  # keep what is measured so far
    print(table(result))


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per prunable tensor, mean density (%) over the seeds per method."""
    labels = list(result["runs"])
    first = next(iter(result["runs"][labels[0]].values()))["layers"]
    head = "| layer | weights | " + " | ".join(labels) + " |"
    rows = [head, "|---|---:|" + "---:|" * len(labels)]
    for name, info in first.items():
        cells = []
        for label in labels:
            vals = [r["layers"][name]["density"] for r in result["runs"][label].values()]
            cells.append(f"{100 * statistics.mean(vals):.2f}")
        rows.append(f"| {name} | {info['total']:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
