"""`ntksap train` and `ntksap run`: train a pruned network into a run folder.

A run folder holds everything needed to trust and reproduce a number:

    config.json     the resolved settings (model, data, pruning, training, world size, versions)
    mask.safetensors  the masks trained with
    layers.txt      per-layer table: shape, params, kept, density, FLOPs kept
    metrics.jsonl   one line per epoch (train loss/acc, test loss, top-1, top-5, lr, s, img/s)
    checkpoint.pt   the last epoch, atomically rewritten (resume with --resume)
    result.json     final and best top-1, density, FLOPs

Under `torchrun --nproc_per_node=N -m ntksap train|run ...` every rank trains with DDP and
rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ntksap import __version__, data
from ntksap.attach import apply_masks
from ntksap.masks import Masks
from ntksap.reinit import reinitialize
from ntksap.stats import format_table, layer_table
from ntksap.training import distributed
from ntksap.training.checkpoint import read_json, write_json
from ntksap.training.config import (
    PRESETS,
    SCHEDULES,
    TrainConfig,
    list_presets,
    preset_for_dataset,
)
from ntksap.training.loop import CHECKPOINT_FILE, fit

MASK_FILE = "mask.safetensors"


class RunFolderError(ValueError):
    """The run folder is in a state the command cannot use (exists, or nothing to resume)."""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad list {text!r}: give comma-separated epochs, e.g. 80,120"
        ) from None


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Data, preset, every TrainConfig field as a flag, run folder, distributed options."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        type=str.lower,
        choices=data.list_datasets(),
        metavar="NAME",
        help=f"data set: {', '.join(data.list_datasets())} (default: the preset's)",
    )
    g.add_argument("--data-dir", type=Path, help="where the data set lives (none is downloaded)")
    g.add_argument("--workers", type=int, help="DataLoader workers for folder data sets")
    t = p.add_argument_group("training (each flag overrides the preset)")
    t.add_argument("--preset", choices=list_presets(), help="the paper's settings for a setting")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="global batch, split over DDP ranks")
    t.add_argument("--lr", type=float)
    t.add_argument("--momentum", type=float)
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--lr-schedule", choices=SCHEDULES, help="multistep or cosine")
    t.add_argument("--milestones", type=_int_list, help="epochs of the lr drops, e.g. 80,120")
    t.add_argument("--gamma", type=float, help="multistep drop factor")
    t.add_argument("--warmup-epochs", type=float)
    t.add_argument("--label-smoothing", type=float)
    t.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 mixed precision (default: on with CUDA)",
    )
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--eval-every", type=int, help="evaluate every k epochs (and at the end)")
    t.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    t.add_argument(
        "--reinit", action="store_true", help="re-initialise weights after pruning (ablation)"
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True, help="the run folder")
    o.add_argument("--resume", action="store_true", help="continue the run in --out")
    o.add_argument(
        "--device", dest="train_device", metavar="DEVICE", help="default: cuda:LOCAL_RANK, else cpu"
    )
    o.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: on when stderr is a terminal)",
    )


def resolve_training(args: argparse.Namespace) -> tuple[TrainConfig, str, str]:
    """(TrainConfig, model name, dataset name) from the preset and the override flags."""
    name = args.preset
    if name is None and args.dataset is not None:
        name = preset_for_dataset(args.dataset)
        if name is not None:
            print(f"no --preset: using {name!r}, the preset for {args.dataset}; flags override it")
    base = PRESETS[name] if name else None
    cfg = base["train"] if base else TrainConfig()
    cfg = cfg.with_overrides(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        schedule=args.lr_schedule,
        milestones=args.milestones,
        gamma=args.gamma,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        amp=args.amp,
        channels_last=args.channels_last,
        seed=args.seed,
        eval_every=args.eval_every,
    )
    model = args.model or (base["model"] if base else None)
    dataset = args.dataset or (base["dataset"] if base else None)
    if model is None or dataset is None:
        raise ValueError(
            "give --model and --dataset, or a --preset that names them: "
            + ", ".join(f"{k} ({v['model']} on {v['dataset']})" for k, v in PRESETS.items())
        )
    return cfg, model, dataset


def _check_run_folder(out: Path, resume: bool) -> None:
    ckpt = out / CHECKPOINT_FILE
    if resume and not ckpt.exists():
        raise RunFolderError(f"--resume: no checkpoint to resume at {ckpt}")
    if not resume and out.exists() and any(out.iterdir()):
        raise RunFolderError(
            f"run folder {out} already exists and is not empty; pass --resume to continue "
            "it, or choose another --out (nothing there was changed)"
        )


def _versions() -> dict[str, str]:
    return {"ntksap": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _train_and_report(
    args: argparse.Namespace,
    env: distributed.DistEnv,
    model: torch.nn.Module,
    masks: Masks | None,
    cfg: TrainConfig,
    train_ds: Any,
    test_ds: Any,
    config: dict[str, Any],
    prune_seconds: float | None,
) -> int:
    out: Path = args.out
    info = train_ds.info
    if masks is not None:
        apply_masks(model, masks)
    if env.is_main:
        if not args.resume:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", config)
            if masks is not None:
                masks.save(out / MASK_FILE)
                stats, totals = layer_table(model, masks, info.input_shape)
                (out / "layers.txt").write_text(format_table(stats, totals) + "\n")
        elif read_json(out / "config.json") != config:
            raise RunFolderError(
                f"--resume with settings that differ from {out / 'config.json'}; resume with "
                "the same flags (nothing was changed)"
            )
    distributed.barrier(env)
    if cfg.batch_size % env.world_size:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is not divisible by the {env.world_size} ranks"
        )
    per_rank = cfg.batch_size // env.world_size
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    train_loader = data.make_loader(
        train_ds, batch_size=per_rank, train=True, device=env.device, seed=cfg.seed,
        num_workers=args.workers, rank=env.rank, world_size=env.world_size,
    )  # fmt: skip
    test_loader = (
        data.make_loader(
            test_ds,
            batch_size=per_rank,
            train=False,
            device=env.device,
            seed=cfg.seed,
            num_workers=args.workers,
        )
        if env.is_main
        else None
    )
    log = print if env.is_main else (lambda _msg: None)
    started = time.perf_counter()
    summary = fit(
        model, train_loader, test_loader, cfg, env=env, out_dir=out if env.is_main else None,
        resume=args.resume, progress=progress, sync_bn=args.sync_bn, log=log,
    )  # fmt: skip
    if env.is_main:
        flops: dict[str, Any] = {}
        if masks is not None:
            _, totals = layer_table(model, masks, info.input_shape)
            flops = {
                "flops_dense": totals.flops_dense,
                "flops_remaining": totals.flops_remaining,
                "params_prunable": totals.params,
                "params_kept": totals.kept,
            }
        result = {
            **summary,
            **flops,
            "sparsity": 1.0 - summary["density"],
            "train_seconds": round(time.perf_counter() - started, 2),
            "prune_seconds": prune_seconds,
            "world_size": env.world_size,
        }
        write_json(out / "result.json", result)
        log(
            f"done: final top-1 {summary['final_top1']}, best {summary['best_top1']} "
            f"(epoch {summary['best_epoch']}), density {summary['density']:.4f}; "
            f"results in {out}"
        )
    return 0


def _datasets(name: str, root: Path | None) -> tuple[Any, Any]:
    return data.create(name, root=root, split="train"), data.create(name, root=root, split="test")


def _model(name: str, info: Any, seed: int) -> torch.nn.Module:
    from ntksap.cli import _build_model

    return _build_model(name, info.num_classes, info.input_shape[0], info.input_shape, seed)


def cmd_train(args: argparse.Namespace) -> int:
    """`ntksap train`: train a registered model with masks from --mask (or dense)."""
    cfg, model_name, dataset = resolve_training(args)
    _check_run_folder(args.out, args.resume)
    masks = Masks.load(args.mask) if args.mask is not None else None
    if masks is not None:
        made_for = masks.metadata.get("model")
        if made_for is not None and made_for != model_name:
            raise ValueError(
                f"--mask {args.mask} was made for model {made_for!r}, not {model_name!r}"
            )
    env = distributed.setup(args.train_device)
    try:
        train_ds, test_ds = _datasets(dataset, args.data_dir)
        model = _model(model_name, train_ds.info, cfg.seed)
        if masks is not None:
            masks.check_model(model)
        else:
            print("no --mask: training the dense network", file=sys.stderr)
        if args.reinit:
            reinitialize(model, "kaiming", seed=cfg.seed + 1)
        config = {
            "command": "train",
            "model": model_name,
            "dataset": dataset,
            "data_dir": str(args.data_dir) if args.data_dir else None,
            "mask": str(args.mask) if args.mask else None,
            "mask_metadata": masks.metadata if masks is not None else None,
            "reinit": args.reinit,
            "train": cfg.to_dict(),
            "world_size": env.world_size,
            "versions": _versions(),
        }
        return _train_and_report(args, env, model, masks, cfg, train_ds, test_ds, config, None)
    finally:
        distributed.cleanup()


def cmd_run(args: argparse.Namespace) -> int:
    """`ntksap run`: prune (rank 0, broadcast) then train, into one run folder."""
    from ntksap.cli import prune, pruning_kwargs, pruning_request

    cfg, model_name, dataset = resolve_training(args)
    meth, density, options = pruning_request(args)
    _check_run_folder(args.out, args.resume)
    env = distributed.setup(args.train_device)
    try:
        train_ds, test_ds = _datasets(dataset, args.data_dir)
        info = train_ds.info
        model = _model(model_name, info, cfg.seed)
        prune_seconds = None
        if args.resume:
            masks = Masks.load(args.out / MASK_FILE)
        else:
            local = None
            if env.is_main:
                batches = (
                    data.prune_batches(train_ds, per_class=10, seed=cfg.seed)
                    if meth.needs_data
                    else None
                )
                t0 = time.perf_counter()
                local = prune(
                    model, meth.name, density=density, input_shape=info.input_shape,
                    data=batches, device=env.device,
                    progress=sys.stderr.isatty() if args.progress is None else args.progress,
                    **pruning_kwargs(args), **options,
                )  # fmt: skip
                prune_seconds = round(time.perf_counter() - t0, 2)
            shapes = {n: p.shape for n, p in _prunable(model, args).items()}
            masks = Masks(
                distributed.broadcast_masks(dict(local) if local else None, shapes, env),
                local.metadata if local is not None else {},
            )
        if args.reinit:
            reinitialize(model, "kaiming", seed=cfg.seed + 1)
        config = {
            "command": "run",
            "model": model_name,
            "dataset": dataset,
            "data_dir": str(args.data_dir) if args.data_dir else None,
            "prune": {
                "method": meth.name,
                "density": density,
                "options": options,
                **{k: v for k, v in pruning_kwargs(args).items()},
            },
            "reinit": args.reinit,
            "train": cfg.to_dict(),
            "world_size": env.world_size,
            "versions": _versions(),
        }
        return _train_and_report(
            args, env, model, masks, cfg, train_ds, test_ds, config, prune_seconds
        )
    finally:
        distributed.cleanup()


def _prunable(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    from ntksap.targets import prunable_parameters

    return prunable_parameters(
        model, include_bias=args.include_bias, exclude=args.exclude, include=args.include
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `train` and `run` on the `ntksap` command's subparsers."""
    from ntksap.cli import add_model_arguments, add_pruning_arguments

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
    r.set_defaults(func=cmd_run)
