"""`ntksap prune`: prune a registered model, print per-layer statistics, save the masks.

ntksap prune --model resnet20 --method ntksap --sparsity 0.98           # model's shape
ntksap prune --model resnet20 --method snip --sparsity 0.98 --dataset cifar10 --data-dir ~/data
ntksap prune --model lenet5 --method grasp --sparsity 0.9 --dataset mnist5k --out m.safetensors
ntksap prune --model resnet20 --method snip --sparsity 0.982 --effective --dataset synthetic

With --effective the density or sparsity counts only the weights on an input-to-output path
(`ntksap.masks.effective`): the nominal density is searched by repeated prunes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ntksap import data
from ntksap.cli.common import (
    UsageError,
    add_effective_arguments,
    add_model_arguments,
    add_progress,
    add_pruning_arguments,
    check_mask_suffix,
    check_new_file,
    device,
    effective_kwargs_from,
    fmt_shape,
    model_shape,
    progress,
    prune_quietly,
    pruning_kwargs,
    pruning_request,
    warn_collapse,
)
from ntksap.masks import Masks
from ntksap.runs import build_model
from ntksap.scoring import get_method, list_methods
from ntksap.stats import format_table, layer_table

SAMPLES_PER_CLASS = 10  # "10 x classes" images in a data batch, as the paper's setting


def add_parser(sub: argparse._SubParsersAction) -> None:
    free = [m for m in list_methods() if not get_method(m).needs_data]
    p = sub.add_parser(
        "prune",
        help="prune a registered model and print per-layer statistics",
        description=(
            "Prune a freshly initialised registered model and print its per-layer density "
            f"and FLOPs; save the masks with --out. Data-free methods: {', '.join(free)}; "
            "the others read --dataset (10 images per class of its train split)."
        ),
    )
    add_model_arguments(p)
    add_pruning_arguments(p)
    p.add_argument(
        "--dataset",
        type=str.lower,
        choices=data.list_datasets(),
        metavar="NAME",
        help=f"data for the data methods: {', '.join(data.list_datasets())} ('synthetic' is "
        "random images, not real data); sets the input shape and class count",
    )
    p.add_argument("--data-dir", type=Path, help="where the data set lives (none is downloaded)")
    p.add_argument("--device", type=device, default="cpu", help="where to score (default cpu)")
    p.add_argument("--out", type=Path, help="save the masks here (.safetensors, .pt or .pth)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_effective_arguments(p)
    add_progress(p)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune, print the table, save the masks."""
    meth, d, options = pruning_request(args)  # validated before any work
    effective_kwargs = effective_kwargs_from(args)
    check_mask_suffix(args.out)
    check_new_file(args.out, args.overwrite)
    needs_data = meth.needs_data_for(options)  # e.g. ntksap --inputs data
    if needs_data and args.dataset is None:
        free = [m for m in list_methods() if not get_method(m).needs_data]
        raise UsageError(
            f"method {meth.name!r} needs data: pass --dataset NAME "
            f"({', '.join(data.list_datasets())}; 'synthetic' is random images, not real "
            "data), or use a data-free method: "
            f"{', '.join(free)}"
        )
    batches = None
    if args.dataset is not None:
        ds = _dataset(args)
        shape, classes = _dataset_shape(args, ds.info)
        if needs_data:
            batches = data.prune_batches(ds, per_class=SAMPLES_PER_CLASS, seed=args.seed)
        else:
            print(f"note: {meth.name} is data-free: --dataset only sets the input shape")
    else:
        shape, classes = model_shape(args)

    model = build_model(args.model, classes, shape, args.seed)
    rounds = args.rounds if args.rounds is not None else meth.rounds_for(options)
    first = meth.unguarded_for(meth.resolve_options(options))
    if first is not None:  # robust NTK-SAP: as published, again with guards if starved
        plain = args.rounds if args.rounds is not None else meth.rounds_for(first)
        rounds_text = f"{plain} round(s) ({rounds} with guards if that mask starves a layer)"
    else:
        rounds_text = f"{rounds} round(s)"
    print(
        f"pruning {args.model} ({classes} classes, input {fmt_shape(shape)}) with {meth.name}: "
        f"{'effective ' if args.effective else ''}density {100 * d:.2f}% "
        f"(sparsity {100 * (1 - d):.2f}%), {rounds_text}, "
        f"{args.scope} {args.schedule}"
        + (f", data: {args.dataset}" if batches is not None else ""),
        flush=True,
    )
    started = time.perf_counter()
    masks = prune_quietly(
        model, meth.name, density=d, input_shape=shape, data=batches, device=args.device,
        progress=progress(args.progress), **pruning_kwargs(args), **options,
        **effective_kwargs,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    guard = masks.metadata.get("guard")
    if guard:
        print(
            "the published mask starved "
            + ", ".join(guard["starved"])
            + f": pruned again with the guards ({masks.metadata['rounds']} rounds, floor "
            f"{masks.metadata['floor']:g}, theta fixed)"
            if guard["guarded"]
            else "the published mask starves no layer: kept as is (no guarded pass)"
        )
    masks = Masks(masks, {**masks.metadata, "dataset": args.dataset if batches else None})
    stats, totals = layer_table(model, masks, shape)
    print(format_table(stats, totals))
    print(f"pruning time {seconds:.1f} s (wall)")
    if args.effective:
        meta = masks.metadata
        print(
            f"effective density {100 * meta['effective_density']:.3f}% (target "
            f"{100 * meta['effective_target']:.3f}%) at nominal density "
            f"{100 * meta['density']:.3f}%, {len(meta['effective_probes'])} prune(s)"
            + ("" if meta["effective_converged"] else "; NOT within the tolerance")
        )
    warn_collapse(masks)
    if args.out is not None:
        print(f"saved masks to {masks.save(args.out)}")
    return 0


def _dataset(args: argparse.Namespace):
    """The train split of --dataset ('synthetic' is shaped like the model's input)."""
    if args.dataset == "synthetic":
        shape, classes = model_shape(args)
        if len(shape) != 3:
            raise UsageError(f"--dataset synthetic makes (C, H, W) images; the input is {shape}")
        return data.create("synthetic", num_classes=classes, input_shape=shape, split="train")
    return data.create(args.dataset, root=args.data_dir, split="train")


def _dataset_shape(args: argparse.Namespace, info: data.DatasetInfo) -> tuple[tuple[int, ...], int]:
    """The data set's input shape and class count; flags that contradict it are errors."""
    shape, classes = tuple(info.input_shape), info.num_classes
    if args.input_shape is not None and tuple(args.input_shape) != shape:
        raise UsageError(
            f"--input-shape {fmt_shape(args.input_shape)} differs from {args.dataset}'s "
            f"{fmt_shape(shape)}; drop --input-shape"
        )
    if args.num_classes is not None and args.num_classes != classes:
        raise UsageError(
            f"--num-classes {args.num_classes} differs from {args.dataset}'s {classes}; "
            "drop --num-classes"
        )
    return shape, classes
