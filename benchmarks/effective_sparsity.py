"""Effective vs nominal sparsity of every pruning method, CIFAR ResNet-20 and VGG-16-BN.

A kept weight is *effective* when it lies on at least one input-to-output path
(`ntksap.masks.effective`); the others can neither change the output nor learn. At equal
nominal sparsity a method that leaves many dead weights trains a sparser network than its
label says. For every registered method (`ntksap.list_methods()`), each model and each
sparsity of the paper's grid (density 0.8**k: 89.26, 95.60, 98.20, 99.26 %), this script
prunes a freshly initialised zoo model (seeded), measures the effective density of the
masks, and ranks the methods by effective density at equal nominal sparsity.

Models: resnet20 (10 classes) and vgg16_bn (100 classes, as in the paper's CIFAR-100
setting), 3x32x32 inputs. The data methods (snip, itersnip, grasp, px) read 100
class-balanced images of `ntksap.data`'s `synthetic` set (class templates + uniform noise,
CIFAR-shaped; no CIFAR ships with the package): 10 per class for ResNet-20, 1 per class for
VGG-16-BN. Rounds are reduced from the paper's to fit a CPU budget (see ROUNDS; the exact
settings are written to the JSON): iterative methods with fewer rounds prune less
progressively, which can change how many weights they leave dead.

    python benchmarks/effective_sparsity.py                       # both models, seed 0
    python benchmarks/effective_sparsity.py --models resnet20 --seeds 0 1 2
    python benchmarks/effective_sparsity.py --runs SWEEP_DIR --out X.json   # trained runs

With --runs it prunes nothing: it reads the run folders of finished sweeps (their masks and
final top-1), computes each mask's effective sparsity, and prints top-1 beside nominal and
effective sparsity per method and sparsity.

Writes JSON (per model, method, sparsity, seed: nominal and effective density, collapsed
tensors, seconds; settings, hardware, versions) to --out (default
benchmarks/results/effective_sparsity.json) and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import write_evidence

import ntksap
from ntksap import data
from ntksap.masks import effective
from ntksap.runs import build_model

#: model -> (classes, input shape, images per class for the data methods)
MODELS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "resnet20": (10, (3, 32, 32), 10),
    "vgg16_bn": (100, (3, 32, 32), 1),
}
#: The paper's grid, density 0.8**k.
KS = (10, 14, 18, 22)

#: model -> method -> prune keywords (reduced from the paper's defaults where marked).
ROUNDS: dict[str, dict[str, dict[str, Any]]] = {
    "resnet20": {
        "ntksap": {"rounds": 20, "resamples": 1},  # paper: T=20, R=5
        "synflow": {"rounds": 100},  # paper
        "itersnip": {"rounds": 20},  # paper: 100
        "px": {"rounds": 20},  # paper: 100
    },
    "vgg16_bn": {
        "ntksap": {"rounds": 5, "resamples": 1, "num_samples": 20},  # paper: T=20, R=5, 100
        "synflow": {"rounds": 20},  # paper: 100
        "itersnip": {"rounds": 5},  # paper: 100
        "px": {"rounds": 5},  # paper: 100
    },
}


def batches(model: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Class-balanced synthetic CIFAR-shaped training images (one batch)."""
    classes, shape, per_class = MODELS[model]
    ds = data.create("synthetic", split="train", num_classes=classes, input_shape=shape)
    return data.prune_batches(ds, per_class=per_class, seed=seed)


def measure(model: str, method: str, k: int, seed: int, batch: list) -> dict[str, Any]:
    classes, shape, _ = MODELS[model]
    kw = ROUNDS[model].get(method, {})
    net = build_model(model, classes, shape, seed)
    options = {key: v for key, v in kw.items() if key != "rounds"}
    needs = ntksap.get_method(method).needs_data_for(options)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collapse is recorded below
        masks = ntksap.prune(
            net, method, density=0.8**k, input_shape=shape, data=batch if needs else None,
            seed=seed, **kw,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    eff = effective(net, masks)
    return {
        "density": masks.density,
        "effective_density": eff.density,
        "num_kept": masks.num_kept,
        "num_effective": eff.num_kept,
        "num_total": masks.num_total,
        "collapsed": masks.collapsed(),
        "effective_collapsed": eff.collapsed(),
        "prune_seconds": round(seconds, 2),
        "effective_seconds": round(time.perf_counter() - t0, 3),
        "settings": {k2: v for k2, v in kw.items()},
    }


def tables(result: dict[str, Any]) -> str:
    """Markdown per model: effective sparsity (%) per method and sparsity (mean over seeds,
    with the fraction of kept weights that are dead), and the ranking by effective density."""
    out = []
    for model, per_method in result["runs"].items():
        ks = sorted({int(k) for runs in per_method.values() for k in runs}, key=int)
        head = " | ".join(f"{100 * (1 - 0.8**k):.2f} %" for k in ks)
        out += [
            f"**{model}**: effective sparsity (%) at each nominal sparsity (dead = kept "
            "weights on no input-output path, % of kept)",
            "",
            f"| method | {head} |",
            "|---|" + "---:|" * len(ks),
        ]
        means: dict[str, dict[int, float]] = {}
        for method, runs in per_method.items():
            cells = []
            for k in ks:
                rs = list(runs.get(str(k), {}).values())
                if not rs:
                    cells.append("")
                    continue
                e = statistics.fmean(r["effective_density"] for r in rs)
                dead = statistics.fmean(1 - r["num_effective"] / max(r["num_kept"], 1) for r in rs)
                means.setdefault(method, {})[k] = e
                cells.append(f"{100 * (1 - e):.2f} (dead {100 * dead:.1f})")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out += ["", f"**{model}**: ranking by effective density at equal nominal sparsity "
                "(fewest dead weights first; = where the dead fractions shown are equal)",
                ""]  # fmt: skip
        for k in ks:
            dead = {m: round(100 * (1 - means[m][k] / 0.8**k), 1) for m in means if k in means[m]}
            out.append(f"- {100 * (1 - 0.8**k):.2f} %: " + ranking(dead))
        out.append("")
    return "\n".join(out)


def ranking(values: dict[str, float], reverse: bool = False) -> str:
    """Methods ordered by value (ascending, or descending with `reverse`), equal values
    joined by "=".

    >>> ranking({"a": 0.1, "b": 0.0, "c": 0.1})
    'b > a = c'
    """
    order = sorted(values, key=lambda m: (-values[m] if reverse else values[m], m))
    text = order[0] if order else ""
    for prev, m in itertools.pairwise(order):
        text += (" = " if values[m] == values[prev] else " > ") + m
    return text


def trained_runs(dirs: list[Path]) -> dict[str, Any]:
    """Per (method, nominal sparsity) of finished runs: mean effective sparsity of their
    masks and mean final top-1, with n."""
    from ntksap.experiments.records import find_run_folders, read_record

    cells: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for folder in find_run_folders(dirs):
        rec = read_record(folder)
        if rec.top1 is None or rec.effective_sparsity is None:
            continue
        # px was run with both BatchNorm rules: keep them apart
        stats = (rec.config.get("prune") or {}).get("options", {}).get("norm_stats")
        label = rec.method + (f" norm_stats={stats}" if stats else "")
        key = (label, round(rec.sparsity, 4))
        cells.setdefault(key, []).append((rec.effective_sparsity, rec.top1))
    return {
        f"{m} {s}": {
            "method": m,
            "sparsity": s,
            "n": len(v),
            "effective_sparsity": statistics.fmean(e for e, _ in v),
            "top1": statistics.fmean(t for _, t in v),
        }
        for (m, s), v in sorted(cells.items())
    }


def trained_table(cells: dict[str, Any]) -> str:
    """Markdown: top-1 and mean effective sparsity per method (rows) and sparsity (columns)."""
    sps = sorted({c["sparsity"] for c in cells.values()})
    methods = list(dict.fromkeys(c["method"] for c in cells.values()))
    rows = [
        "| method | " + " | ".join(f"{100 * s:.1f} %: top-1 (eff. sparsity)" for s in sps) + " |",
        "|---|" + "---:|" * len(sps),
    ]
    for m in methods:
        shown = []
        for s in sps:
            c = cells.get(f"{m} {s}")
            shown.append(
                "" if c is None else f"{c['top1']:.1f} ({100 * c['effective_sparsity']:.2f} %)"
            )
        rows.append(f"| {m} | " + " | ".join(shown) + " |")
    return "\n".join(rows)


def at_effective(cells: dict[str, Any], method: str, sparsity: float) -> float | None:
    """`method`'s top-1 at effective sparsity `sparsity`: linear in log(effective density)
    between its two runs' cells that bracket it; None outside its measured range."""
    pts = sorted(
        (math.log(1 - c["effective_sparsity"]), c["top1"])
        for c in cells.values()
        if c["method"] == method and c["effective_sparsity"] < 1
    )
    x = math.log(1 - sparsity)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def rank_changes(cells: dict[str, Any]) -> str:
    """Markdown: per nominal sparsity, the ranking by top-1 at equal nominal sparsity and at
    equal effective sparsity (each method's top-1 interpolated at the nominal value)."""
    sps = sorted({c["sparsity"] for c in cells.values()})
    methods = list(dict.fromkeys(c["method"] for c in cells.values()))
    lines = [
        "| sparsity | ranking at equal nominal sparsity | ranking at equal effective "
        "sparsity (interpolated top-1) |",
        "|---|---|---|",
    ]
    for s in sps:
        nominal = {m: round(cells[f"{m} {s}"]["top1"], 1) for m in methods if f"{m} {s}" in cells}
        matched = {m: v for m in methods if (v := at_effective(cells, m, s)) is not None}
        shown = {m: f"{m} {v:.1f}" for m, v in matched.items()}
        eff = ranking({shown[m]: round(v, 1) for m, v in matched.items()}, reverse=True)
        missing = sorted(set(nominal) - set(matched))
        if not matched:
            eff = "n/a: effective >= nominal sparsity, no run below this one to interpolate from"
        elif missing:
            eff += f" (out of range: {', '.join(missing)})"
        nom = ranking({f"{m} {v:.1f}": v for m, v in nominal.items()}, reverse=True)
        lines.append(f"| {100 * s:.1f} % | {nom} | {eff} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=ntksap.list_methods(),
                    choices=ntksap.list_methods())  # fmt: skip
    ap.add_argument("--ks", nargs="+", type=int, default=list(KS), help="density 0.8**k")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "effective_sparsity.json"
    )
    ap.add_argument("--runs", nargs="+", type=Path, help="report trained run folders instead")
    ap.add_argument(
        "--merge", action="store_true", help="add to the runs already in --out (more seeds)"
    )
    args = ap.parse_args()
    if args.runs:
        cells = trained_runs(args.runs)
        what = "trained runs: effective sparsity of their masks, final top-1"
        write_evidence(
            args.out, {"what": what, "runs": [str(d) for d in args.runs], "cells": cells}
        )
        print(trained_table(cells))
        print()
        print(rank_changes(cells))
        return
    result: dict[str, Any] = {
        "what": "nominal vs effective density (ntksap.masks.effective) per method",
        "models": {
            m: {"num_classes": c, "input_shape": list(s), "images_per_class": p}
            for m, (c, s, p) in MODELS.items()
            if m in args.models
        },
        "data": "ntksap.data synthetic (class templates + uniform noise), prune_batches",
        "settings": {m: ROUNDS[m] for m in args.models},
        "seeds": args.seeds,
        "ntksap": ntksap.__version__,
        "runs": {},
    }
    if args.merge and args.out.is_file():
        old = json.loads(args.out.read_text())
        result["runs"] = old["runs"]
        result["seeds"] = sorted(set(old["seeds"]) | set(args.seeds))
        result["settings"] = {**old["settings"], **result["settings"]}
        result["models"] = {**old["models"], **result["models"]}
        result["earlier_wall_seconds"] = old.get("wall_seconds", 0) + old.get(
            "earlier_wall_seconds", 0
        )
    started = time.perf_counter()
    for model in args.models:
        for seed in args.seeds:
            batch = batches(model, seed)
            for method in args.methods:
                for k in args.ks:
                    r = measure(model, method, k, seed, batch)
                    runs = result["runs"].setdefault(model, {}).setdefault(method, {})
                    runs.setdefault(str(k), {})[str(seed)] = r
                    print(
                        f"{model} {method} sparsity {100 * (1 - 0.8**k):.2f} % seed {seed}: "
                        f"effective sparsity {100 * (1 - r['effective_density']):.2f} % "
                        f"({r['prune_seconds']} s)",
                        flush=True,
                    )
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_evidence(args.out, result)
    print(tables(result))


if __name__ == "__main__":
    main()
