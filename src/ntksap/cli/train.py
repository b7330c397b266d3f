"""`ntksap train` and `ntksap run`: train a pruned network into a run folder.

A run folder holds config.json (written first), mask.safetensors, layers.txt,
metrics.jsonl, checkpoint.pt and result.json (status "finished" or "diverged", top-1,
density, collapsed layers). The folder is claimed for the run: a second command on the same
--out stops at once. An existing folder is never overwritten: --resume continues it from
whatever it saved, with the same settings only. See `ntksap.runs`.

Under `torchrun --nproc_per_node=N -m ntksap train|run ...` every rank trains with DDP and
rank 0 alone writes.

Exit codes: 0 finished, 3 diverged (loss NaN/inf), 2 bad input, 1 failure.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ntksap import data, runs
from ntksap.cli.common import (
    add_effective_arguments,
    add_model_arguments,
    add_progress,
    add_pruning_arguments,
    device,
    effective_kwargs_from,
    finite_float,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    progress,
    pruning_request,
)
from ntksap.training.config import SCHEDULES, list_presets


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad list {text!r}: give comma-separated epochs, e.g. 80,120"
        ) from None


def add_training_arguments(p: argparse.ArgumentParser, *, run_folder: bool = True) -> None:
    """Data, preset, every TrainConfig field as a flag, run folder (`run_folder`: --out,
    --resume, --device, --progress), distributed options."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        type=str.lower,
        choices=data.list_datasets(),
        metavar="NAME",
        help=f"data set: {', '.join(data.list_datasets())} (default: the preset's)",
    )
    g.add_argument("--data-dir", type=Path, help="where the data set lives (none is downloaded)")
    g.add_argument("--workers", type=nonneg_int, help="DataLoader workers for folder data sets")
    t = p.add_argument_group("training (each flag overrides the preset)")
    t.add_argument("--preset", choices=list_presets(), help="the paper's settings for a setting")
    t.add_argument("--epochs", type=positive_int)
    t.add_argument("--batch-size", type=positive_int, help="global batch, split over DDP ranks")
    t.add_argument("--lr", type=positive_float)
    t.add_argument("--momentum", type=nonneg_float)
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--weight-decay", type=nonneg_float)
    t.add_argument("--lr-schedule", choices=SCHEDULES, help="multistep or cosine")
    t.add_argument("--milestones", type=_int_list, help="epochs of the lr drops, e.g. 80,120")
    t.add_argument("--gamma", type=finite_float, help="multistep drop factor")
    t.add_argument("--warmup-epochs", type=nonneg_float)
    t.add_argument("--label-smoothing", type=nonneg_float)
    t.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 mixed precision (default: on with CUDA)",
    )
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--eval-every", type=positive_int, help="evaluate every k epochs (and last)")
    t.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    t.add_argument(
        "--reinit", action="store_true", help="re-initialise weights after pruning (ablation)"
    )
    if not run_folder:
        return
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True, help="the run folder")
    o.add_argument(
        "--resume", action="store_true", help="continue the run in --out from what it saved"
    )
    o.add_argument(
        "--device",
        dest="train_device",
        type=device,
        metavar="DEVICE",
        help="default: cuda:LOCAL_RANK, else cpu",
    )
    add_progress(o)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig overrides from the flags (None: the preset's value)."""
    changes = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "nesterov": args.nesterov,
        "weight_decay": args.weight_decay,
        "schedule": args.lr_schedule,
        "milestones": args.milestones,
        "gamma": args.gamma,
        "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "eval_every": args.eval_every,
    }
    return {k: val for k, val in changes.items() if val is not None}


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "preset": args.preset,
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "train": train_overrides(args),
        "seed": args.seed,
        "reinit": args.reinit,
        "resume": args.resume,
        "device": args.train_device,
        "workers": args.workers,
        "sync_bn": args.sync_bn,
        "progress": progress(args.progress),
    }


def _exit_code(result: dict[str, Any]) -> int:
    return runs.EXIT_CODES.get(result.get("status", "finished"), 1)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a registered model with masks from --mask (or dense)."""
    result = runs.run(args.out, method=None, mask=args.mask, **_common(args))
    return _exit_code(result)


def cmd_run(args: argparse.Namespace) -> int:
    """Prune (rank 0, broadcast) then train, into one run folder."""
    meth, density, options = pruning_request(args)
    effective = effective_kwargs_from(args)
    result = runs.run(
        args.out,
        method=meth.name,
        density=density,
        rounds=args.rounds,
        schedule=args.schedule,
        scope=args.scope,
        floor=args.floor,
        include_bias=args.include_bias,
        exclude=args.exclude,
        include=args.include,
        invert=args.invert,
        shuffle=args.shuffle,
        options=options,
        **effective,
        **_common(args),
    )
    return _exit_code(result)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `train` and `run` on the `ntksap` command's subparsers."""
    t = sub.add_parser(
        "train",
        help="train a registered model with a mask file (or dense) into a run folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(t, with_shape=False)
    t.add_argument("--mask", type=Path, help="masks from `ntksap prune --out` (omit: dense)")
    add_training_arguments(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser(
        "run",
        help="prune then train in one command, into one run folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(r, with_shape=False)
    add_training_arguments(r)
    add_pruning_arguments(r)
    add_effective_arguments(r)
    r.set_defaults(func=cmd_run)
