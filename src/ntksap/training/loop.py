"""Training and evaluation of pruned networks.

`fit` trains a model whose masks are attached with `ntksap.apply_masks` (parametrize), so
the effective weights at pruned places are exactly zero at every step, and (because the
stored tensor is zeroed there too and receives a zero gradient) neither weight decay nor
momentum can move them. Each epoch appends a line to `metrics.jsonl` and atomically
rewrites `checkpoint.pt`; `resume=True` continues bit-for-bit on CPU: the data order and
augmentation are functions of (seed, epoch), and model, optimiser, scheduler, scaler and
RNG states are restored.

Example:
    >>> result = fit(model, train_loader, test_loader, TrainConfig(epochs=2))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ntksap.attach import get_masks
from ntksap.files import write_text
from ntksap.masks import model_density
from ntksap.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ntksap.training.config import TrainConfig
from ntksap.training.distributed import DistEnv, all_reduce_sum

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"


class DivergedError(ArithmeticError):
    """The training loss became NaN or infinite: the run stopped (its last good checkpoint
    is kept); retrying the same settings would diverge the same way."""

    def __init__(self, epoch: int, loss: float) -> None:
        super().__init__(
            f"training diverged in epoch {epoch}: the loss became {loss} (lower --lr, add "
            "--warmup-epochs, or check the mask for collapsed layers)"
        )
        self.epoch = epoch
        self.loss = loss


#: Steps between checks of the running loss for NaN/inf (each check is one device sync).
DIVERGENCE_CHECK_STEPS = 50


class Loader(Protocol):
    """What `fit` needs of a data loader (see `ntksap.data.make_loader`)."""

    def __iter__(self) -> Any: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class EpochStats:
    loss: float
    correct: float
    count: float

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.count, 1)


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CPU and on GPUs that support it (no loss scaling needed), else float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=amp_dtype(device))


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def train_one_epoch(
    model: nn.Module,
    loader: Loader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    progress: bool = False,
    desc: str = "train",
) -> EpochStats:
    """One pass over `loader`; the scheduler steps per iteration (smooth warm-up)."""
    model.train()
    # Sums stay on the device: no host sync per step.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for step, (x, y) in enumerate(_progress(loader, len(loader), desc, progress)):
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            out = model(x)  # (B, classes)
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (out.detach().argmax(1) == y).sum()
        count += len(y)
        # stop early on NaN/inf rather than spend the rest of a long epoch on it
        if (step + 1) % DIVERGENCE_CHECK_STEPS == 0 and not math.isfinite(float(loss_sum)):
            break
    return EpochStats(float(loss_sum), float(correct), float(count))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, amp: bool = False
) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) over `loader`, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0.0, 0.0, 0
    for x, y in loader:
        with _autocast(device, amp):
            out = model(x).float()  # (B, classes)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        k = min(5, out.shape[1])
        best = out.topk(k, dim=1).indices  # (B, k)
        hit = best == y[:, None]
        top1 += float(hit[:, 0].sum())
        top5 += float(hit.any(dim=1).sum())
        count += len(y)
    model.train(was_training)
    n = max(count, 1)
    return {"test_loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that is not a JSON object (a torn last line of a
    killed write) is skipped: the checkpoint, not this log, is the truth on resume."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep the metric rows up to the checkpoint's epoch (later ones were written before a
    crash and are redone), dropping torn lines; atomic."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("epoch", 0) <= last_epoch]
    write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _finite_or_none(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: such a value (e.g. a test loss of inf) is written as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def fit(
    model: nn.Module,
    train_loader: Loader,
    test_loader: Iterable | None,
    cfg: TrainConfig,
    *,
    env: DistEnv | None = None,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = False,
    sync_bn: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `model` (masks already attached, or dense) and return the final summary.

    Args:
        model: on any device; moved to `env.device`.
        train_loader / test_loader: per-rank loaders yielding (x, y) on the device.
        cfg: the training settings.
        env: the DDP environment (`distributed.setup()`); None means one process.
        out_dir: where metrics.jsonl and checkpoint.pt go (main rank only); None: nowhere.
        resume: continue from out_dir/checkpoint.pt.
        sync_bn: convert BatchNorm to SyncBatchNorm under DDP.
        on_epoch_end: called with each epoch's metrics dict (main rank).

    Returns:
        {"final_top1", "best_top1", "best_epoch", "epochs", "density", ...}
    """
    env = env or DistEnv()
    device = env.device
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    # NHWC convolutions are faster in oneDNN (CPU) and cuDNN alike: on by default.
    channels_last = True if cfg.channels_last is None else cfg.channels_last
    masks = get_masks(model)
    density = model_density(model, masks)  # uncovered prunable tensors count as dense

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        with torch.no_grad():
            for p in model.parameters():
                # (O, 1, kh, kw): NHWC and NCHW are the same bytes but nominally different
                # strides, which DDP's gradient buckets reject (a warning and a slow path)
                if p.dim() == 4 and p.shape[1] == 1:
                    p.data = p.data.clone(memory_format=torch.contiguous_format)
    if env.distributed and sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = (
        nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if env.distributed
        else model
    )
    optimizer = torch.optim.SGD(
        net.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
    steps = len(train_loader)
    if steps == 0:
        raise ValueError("the training loader yields no batches (batch size larger than the data?)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cfg.lr_factor(step / steps)
    )
    fp16 = amp and amp_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    start, best_top1, best_epoch = 0, float("-inf"), 0
    ckpt_path = out_dir / CHECKPOINT_FILE if out_dir is not None else None
    metrics_path = out_dir / METRICS_FILE if out_dir is not None else None
    if resume:
        if ckpt_path is None:
            raise ValueError("resume needs out_dir (the run folder holding checkpoint.pt)")
        state = load_checkpoint(ckpt_path, map_location=device)
        if state["config"] != cfg.to_dict():
            diff = {
                k: (state["config"].get(k), v)
                for k, v in cfg.to_dict().items()
                if state["config"].get(k) != v
            }
            raise ValueError(f"resume with a different config (checkpoint vs now): {diff}")
        saved_masks = state["masks"]
        if saved_masks.keys() != masks.keys() or not all(
            torch.equal(saved_masks[k].cpu(), masks[k].cpu()) for k in masks
        ):
            raise ValueError(f"resume with different masks than the checkpoint {ckpt_path}")
        _unwrap(net).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start, best_top1, best_epoch = state["epoch"], state["best_top1"], state["best_epoch"]
        if env.is_main and metrics_path is not None:
            _truncate_metrics(metrics_path, start)
        log(f"resumed from {ckpt_path} after epoch {start}")

    last: dict[str, Any] = {}
    if start >= cfg.epochs and metrics_path is not None and metrics_path.exists():
        lines = read_metrics(metrics_path)
        last = lines[-1] if lines else {}
        log(f"the run in {out_dir} is already complete ({cfg.epochs} epochs)")
    for epoch in range(start, cfg.epochs):
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        st = train_one_epoch(
            net, train_loader, optimizer, scheduler, scaler, cfg, device, amp, channels_last,
            progress=progress and env.is_main, desc=f"epoch {epoch + 1}/{cfg.epochs}",
        )  # fmt: skip
        loss, correct, count = all_reduce_sum([st.loss, st.correct, st.count], env)
        seconds = time.perf_counter() - t0
        if not math.isfinite(loss):  # every rank sees the same reduced sum: all stop
            raise DivergedError(epoch + 1, loss / max(count, 1))
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss / max(count, 1),
            "train_acc": 100 * correct / max(count, 1),
            "lr": lr,
            "seconds": seconds,
            "images_per_s": count / seconds if seconds > 0 else None,
            "density": density,
        }
        due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        # the full test set on the main rank only: sharding would pad it with duplicates
        if test_loader is not None and due and env.is_main:
            row.update(evaluate(_unwrap(net), test_loader, device, amp))
            if row["top1"] > best_top1:
                best_top1, best_epoch = row["top1"], epoch + 1
        row["wall_seconds"] = time.perf_counter() - t0  # train + evaluation
        row = _finite_or_none(row)
        if env.is_main:
            msg = " ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
            log(msg)
            if metrics_path is not None:
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if ckpt_path is not None:
                save_checkpoint(
                    ckpt_path,
                    {
                        "epoch": epoch + 1,
                        "model": _unwrap(net).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "masks": dict(masks),
                        "rng": rng_state(),
                        "config": cfg.to_dict(),
                        "best_top1": best_top1,
                        "best_epoch": best_epoch,
                    },
                )
            if on_epoch_end is not None:
                on_epoch_end(row)
        last = row
    return {
        "final_top1": last.get("top1"),
        "final_top5": last.get("top5"),
        "best_top1": best_top1 if best_epoch else None,
        "best_epoch": best_epoch or None,
        "epochs": cfg.epochs,
        "density": density,
    }
