"""Do fast NTK-SAP's masks agree with the reference procedure's as well as seeds agree?

For a network at 98.2 % sparsity, prunes with each variant and seeds 0..S-1, then reports:
- per-layer densities: the baseline's seed-to-seed range (min..max over seeds) and mean,
  and each variant's mean, with whether it lies inside the baseline's range and the Welch
  t of the two means; "baseline_b" (the baseline at seeds 100..) calibrates both: it is
  what chance alone gives;
- kept-set overlap |A & B| / |A| (A, B keep the same count): between two seeds of the same
  variant (the seed-to-seed agreement), and between a variant and float32 ntksap at the
  same seed (same draws: only the arithmetic differs, e.g. bf16 autocast).

Variants: baseline (the plain reference procedure, `ntksap_reference.py`), ntksap (float32,
defaults), ntksap_separate (bn_pass="separate"), ntksap_bf16 (bf16 autocast).

    python benchmarks/ntksap_agreement.py --network resnet20            # T=20, R=5, 100 noise
    python benchmarks/ntksap_agreement.py --network vgg16_bn --rounds 20 --resamples 1 \\
        --num-samples 100                                               # reduced (stated)

Masks are cached as .pt files under --cache (re-runs reuse them); JSON evidence goes to
benchmarks/results/ntksap_agreement_<network>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from itertools import combinations
from pathlib import Path

import ntksap_reference
import torch

import ntksap
from ntksap import models

CLASSES = {"resnet20": 10, "vgg16_bn": 100}
PAPER = {  # the paper's settings (algorithm.md)
    "resnet20": {"rounds": 20, "resamples": 5, "num_samples": 100, "batch_size": 256},
    "vgg16_bn": {"rounds": 100, "resamples": 1, "num_samples": 1000, "batch_size": 256},
}
#: variant -> (method, extra options, autocast dtype); "baseline_b" is the baseline again
#: at other seeds (100, 101, ...): how often the criterion flags a layer by chance alone.
VARIANTS = {
    "baseline": ("ntksap_reference", {}, None),
    "baseline_b": ("ntksap_reference", {}, None),
    "ntksap": ("ntksap", {}, None),
    "ntksap_separate": ("ntksap", {"bn_pass": "separate"}, None),
    "ntksap_bf16": ("ntksap", {"precision": "bfloat16"}, None),
}
SPARSITY = 0.982


def masks_for(net_name: str, variant: str, seed: int, settings: dict, cache: Path) -> dict:
    """The variant's masks at `seed` (cached as a .pt of bool tensors)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(settings.items()))
    stem = "baseline" if variant == "baseline_b" else variant  # same runs, other seeds
    path = cache / f"{net_name}_{stem}_{tag}_seed{seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    method, extra, _ = VARIANTS[variant]
    net = models.create(net_name, num_classes=CLASSES[net_name])
    t = time.perf_counter()
    with ntksap_reference.registered():
        m = ntksap.prune(net, method, sparsity=SPARSITY, input_shape=(3, 32, 32), seed=seed,
                         **settings, **extra)  # fmt: skip
    print(f"  {variant} seed {seed}: {time.perf_counter() - t:.1f} s", flush=True)
    out = dict(m)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def overlap(a: dict, b: dict) -> float:
    """|A & B| / |A| over all tensors (A and B keep the same number of weights)."""
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    return both / sum(int(a[n].sum()) for n in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--network", choices=sorted(CLASSES), default="resnet20")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--variants", default="baseline,baseline_b,ntksap,ntksap_separate,ntksap_bf16")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--resamples", type=int)
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/ntksap_agreement"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    warnings.simplefilter("ignore", ntksap.LayerCollapseWarning)
    settings = dict(PAPER[args.network])
    for key in ("rounds", "resamples", "num_samples"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    seeds = list(range(args.seeds))
    print(f"{args.network} at {SPARSITY:.1%} sparsity, {settings}", flush=True)
    masks = {
        v: [
            masks_for(args.network, v, s + (100 if v == "baseline_b" else 0), settings, args.cache)
            for s in seeds
        ]
        for v in variants
    }
    names = list(masks[variants[0]][0])
    dens = {v: {n: [float(m[n].float().mean()) for m in masks[v]] for n in names} for v in variants}
    layers = []
    inside = {v: 0 for v in variants}
    for n in names:
        base = dens["baseline"][n]
        row = {"layer": n, "baseline_min": min(base), "baseline_max": max(base),
               "baseline_mean": statistics.fmean(base)}  # fmt: skip
        for v in variants:
            mean = statistics.fmean(dens[v][n])
            ok = min(base) <= mean <= max(base)
            inside[v] += ok
            row[f"{v}_mean"] = mean
            row[f"{v}_inside"] = ok
            # Welch t of the two means (5 + 5 seeds): |t| > 2.3 is p < 0.05 per layer
            se = math.sqrt(statistics.variance(base) / len(base)
                           + statistics.variance(dens[v][n]) / len(base))  # fmt: skip
            row[f"{v}_t"] = (mean - row["baseline_mean"]) / se if se > 0 else 0.0
        layers.append(row)
    seed_pairs = list(combinations(range(len(seeds)), 2))
    agreement = {
        v: {
            "seed_to_seed_overlap": statistics.fmean(
                overlap(masks[v][i], masks[v][j]) for i, j in seed_pairs
            ),
            "layers_inside_baseline_range": f"{inside[v]}/{len(names)}",
            "layers_with_abs_t_over_2.3": sum(abs(r[f"{v}_t"]) > 2.3 for r in layers),
            "max_abs_t": max(abs(r[f"{v}_t"]) for r in layers),
        }
        for v in variants
    }
    if "ntksap" in variants:
        for v in variants:
            if v not in ("ntksap", "baseline"):
                agreement[v]["same_seed_overlap_with_ntksap_fp32"] = statistics.fmean(
                    overlap(masks[v][i], masks["ntksap"][i]) for i in range(len(seeds))
                )
                # largest per-layer density gap to fp32 ntksap at the same seed, vs the
                # largest gap between two fp32 seeds
                agreement[v]["max_layer_density_gap_same_seed"] = max(
                    abs(a - b) for n in names for a, b in zip(dens[v][n], dens["ntksap"][n])
                )
        agreement["ntksap"]["max_layer_density_gap_between_seeds"] = max(
            abs(dens["ntksap"][n][i] - dens["ntksap"][n][j]) for n in names for i, j in seed_pairs
        )
    for v, a in agreement.items():
        shown = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in a.items()}
        print(f"{v:16s} {json.dumps(shown)}")
    print(f"{'layer':24s} {'baseline min..max':>20s} " + " ".join(f"{v:>14s}" for v in variants))
    for r in layers:
        cells = " ".join(
            f"{r[f'{v}_mean']:13.4f}{'' if r[f'{v}_inside'] else '*'}" for v in variants
        )
        print(f"{r['layer']:24s} {r['baseline_min']:9.4f}..{r['baseline_max']:<9.4f} {cells}")
    out = args.out or Path(__file__).with_name("results") / f"ntksap_agreement_{args.network}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    evidence = {"network": args.network, "sparsity": SPARSITY, "settings": settings,
                "seeds": seeds, "agreement": agreement, "layers": layers,
                "torch": torch.__version__}  # fmt: skip
    out.write_text(json.dumps(evidence, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
