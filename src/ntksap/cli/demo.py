"""`ntksap demo`: every method on a small model at fast settings, then a summary table.

Data methods read one class-balanced batch (10 per class) of scikit-learn's 8x8 digits,
real data that ships with scikit-learn; every method then sees 1x8x8 inputs.
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="prune a small model with every method, fast settings (under a minute on a CPU)",
        description=__doc__,
    )
    d.add_argument(
        "--model",
        type=str.lower,
        default="lenet5",
        choices=list_models(),
        metavar="NAME",
        help="registered model, built for 10 classes of 1x8x8 digits (default lenet5)",
    )
    d.add_argument("--sparsity", type=finite_float, default=0.9, help="(default 0.9)")
    d.add_argument("--seed", type=seed, default=0)
    d.add_argument("--out-dir", type=Path, help="save every method's masks in this folder")
    d.add_argument("--overwrite", action="store_true", help="replace mask files in --out-dir")
    add_progress(d)
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
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
