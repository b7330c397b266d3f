"""Training settings: a typed dataclass, the paper's presets, and validated overrides.

A preset is a complete `TrainConfig`; every field can be overridden (`with_overrides`,
or one CLI flag per field). A run writes its resolved config next to its results.

Example:
    >>> cfg = preset("cifar10-resnet20").with_overrides(epochs=2)
    >>> cfg.epochs, cfg.lr, cfg.milestones
    (2, 0.1, (80, 120))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ntksap import validate as v

SCHEDULES = ("multistep", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How a pruned network is trained. Defaults are no-ops or PyTorch's defaults.

    Attributes:
        epochs: passes over the training set.
        batch_size: global batch (split evenly over DDP ranks).
        lr: peak learning rate (after warm-up).
        momentum / nesterov: SGD momentum and Nesterov flag.
        weight_decay: L2 penalty on every parameter (as the reference code).
        schedule: "multistep" (lr x gamma at each milestone epoch) or "cosine" (to 0).
        milestones / gamma: multistep drops.
        warmup_epochs: linear warm-up length in epochs (fractional allowed), see `lr_factor`.
        label_smoothing: cross-entropy label smoothing.
        amp: mixed precision: bfloat16 autocast (float16 with loss scaling on GPUs without
            bfloat16); None: on when CUDA is used. On a CPU with AVX-512 BF16 it can pay off.
        channels_last: NHWC memory format for 4-D inputs (None: on; 1.3x on a 2-core CPU).
        seed: seeds model init, data order and augmentation.
        eval_every: evaluate every k epochs (and always after the last).
    """

    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool | None = None
    channels_last: bool | None = None
    seed: int = 0
    eval_every: int = 1
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what is valid (NaN/inf never pass)."""
        for name in ("epochs", "batch_size", "eval_every"):
            v.positive_int(name, getattr(self, name))
        v.positive_float("lr", self.lr)
        v.finite_float("momentum", self.momentum, low=0.0, high=1.0)
        v.finite_float("weight_decay", self.weight_decay, low=0.0)
        v.finite_float("gamma", self.gamma, low=0.0, high=1.0)
        v.finite_float("warmup_epochs", self.warmup_epochs, low=0.0, high=float(self.epochs))
        v.finite_float("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        v.choice("schedule", self.schedule, SCHEDULES)
        v.boolean("nesterov", self.nesterov)
        for name in ("amp", "channels_last"):
            if getattr(self, name) is not None:
                v.boolean(name, getattr(self, name))
        v.seed(self.seed)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        ms = self.milestones
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms) or list(
            ms
        ) != sorted(set(ms)):
            raise ValueError(f"milestones must be increasing positive epochs, got {ms!r}")

    def with_overrides(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied (None values are ignored); unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"unknown training setting(s) {unknown}; valid: {', '.join(sorted(names))}"
            )
        changes = {k: v for k, v in changes.items() if v is not None}
        if "milestones" in changes:
            changes["milestones"] = tuple(changes["milestones"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls().with_overrides(**d)

    def lr_factor(self, epoch: float) -> float:
        """Multiplier of `lr` at fractional epoch `epoch` (0 at the start of training).

        Warm-up ramps linearly from 1/steps to 1 over `warmup_epochs`; then multistep drops
        (x gamma at each milestone passed) or a cosine from 1 to 0 over the remaining epochs.
        """
        if self.warmup_epochs and epoch < self.warmup_epochs:
            return max(epoch / self.warmup_epochs, 1e-3)
        if self.schedule == "multistep":
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        t = min(max((epoch - self.warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))


# The paper's training settings (algorithm.md, "Training after pruning").
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10-resnet20": {
        "train": TrainConfig(
            epochs=160, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
            milestones=(80, 120), preset="cifar10-resnet20",
        ),
        "model": "resnet20", "dataset": "cifar10",
    },
    "cifar100-vgg16": {
        "train": TrainConfig(
            epochs=160, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
            weight_decay=5e-4, milestones=(60, 120), preset="cifar100-vgg16",
        ),
        "model": "vgg16_bn", "dataset": "cifar100",
    },
    "tinyimagenet-resnet18": {
        "train": TrainConfig(
            epochs=200, batch_size=256, lr=0.2, momentum=0.9, weight_decay=1e-4,
            milestones=(100, 150), preset="tinyimagenet-resnet18",
        ),
        "model": "resnet18", "dataset": "tinyimagenet",
    },
    "imagenet-resnet": {
        "train": TrainConfig(
            epochs=90, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
            milestones=(30, 60, 80), preset="imagenet-resnet",
        ),
        "model": "resnet50", "dataset": "imagenet",
    },
    # Small settings for the embedded data sets (not from the paper): a few CPU minutes.
    "mnist5k-lenet5": {
        "train": TrainConfig(
            epochs=20, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
            schedule="cosine", preset="mnist5k-lenet5",
        ),
        "model": "lenet5", "dataset": "mnist5k",
    },
    "digits-lenet5": {
        "train": TrainConfig(
            epochs=30, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
            schedule="cosine", preset="digits-lenet5",
        ),
        "model": "lenet5", "dataset": "digits",
    },
}  # fmt: skip


def preset_for_dataset(dataset: str) -> str | None:
    """The preset whose data set is `dataset` (the default when no preset is named)."""
    return next((k for k, v in PRESETS.items() if v["dataset"] == dataset), None)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset(name: str) -> TrainConfig:
    """The paper's TrainConfig for `name` (ValueError listing the presets otherwise)."""
    try:
        return PRESETS[name]["train"]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; valid choices: {', '.join(list_presets())}"
        ) from None
