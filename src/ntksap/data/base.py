"""What every data set shares: `DatasetInfo`, `DatasetError`, the registry and `create`.

Two kinds of data set exist:

- "tensor": every image sits in one tensor `images` (N, C, H, W), uint8 (0..255) or float32
  (0..1), with `targets` (N,) int64. Loaders move it to the device once and make batches
  there, augmentation included (`ntksap.data.loaders`).
- "folder": image files on disk opened with PIL one by one (ImageNet, Tiny-ImageNet), fed
  through a `torch.utils.data.DataLoader` with worker processes.

Example:
    >>> from ntksap import data
    >>> ds = data.create("synthetic", num_classes=3, input_shape=(1, 4, 4), size=6)
    >>> ds.info.kind, ds.info.num_classes, len(ds), ds.targets.tolist()
    ('tensor', 3, 6, [1, 1, 0, 2, 0, 2])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ntksap.registry import Registry

Split = Literal["train", "test"]
Kind = Literal["tensor", "folder"]

#: Environment variable naming the folder that holds the data sets when `root` is None.
DATA_ENV = "NTKSAP_DATA"


class DatasetError(ValueError):
    """A data set is missing, malformed or inconsistent; the message says where and what."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader need to know about a data set.

    Attributes:
        name: registry name ("cifar10", ...).
        num_classes: number of labels; labels are 0..num_classes-1.
        input_shape: (C, H, W) of one image as the model sees it.
        mean, std: per-channel statistics in 0..1 pixel units; loaders output (x - mean) / std.
        kind: "tensor" (whole set in one tensor) or "folder" (files opened with PIL).
        crop_padding: zero padding (pixels) of the random-crop augmentation of tensor sets
            (4 for 32x32 CIFAR, 1 for 8x8 digits).
        augment_train: whether the train split is augmented by default (the paper's standard
            for CIFAR, ImageNet and Tiny-ImageNet; off for digits, MNIST and synthetic data).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: Kind = "tensor"
    crop_padding: int = 4
    augment_train: bool = False

    def __post_init__(self) -> None:
        # Store plain tuples (a list or a tensor shape would break equality and hashing).
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        c = self.input_shape[0] if self.input_shape else 0
        if len(self.input_shape) != 3 or len(self.mean) != c or len(self.std) != c:
            raise ValueError(
                f"DatasetInfo {self.name!r}: input_shape must be (C, H, W) with one mean and "
                f"one std per channel, got {self.input_shape}, mean {self.mean}, std {self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"DatasetInfo {self.name!r}: std must be positive, got {self.std}")


class TensorImageDataset(Dataset):
    """A whole image set held in memory as one tensor.

    Args:
        images: (N, C, H, W) uint8 in 0..255, or float32 in 0..1.
        targets: (N,) integer labels.
        info: the set's `DatasetInfo` (kind "tensor").
        split: "train" or "test".
        classes: one name per label, if known.

    `ds[i]` gives (normalised float32 (C, H, W), int label) without augmentation; the fast
    path is `ntksap.data.make_loader`, which batches on the device.

    Example:
        >>> info = DatasetInfo("toy", 2, (1, 2, 2), mean=(0.0,), std=(1.0,))
        >>> images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)  # (N, C, H, W)
        >>> ds = TensorImageDataset(images, torch.tensor([0, 1]), info, "train")
        >>> x, y = ds[1]
        >>> tuple(x.shape), y
        ((1, 2, 2), 1)
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        info: DatasetInfo,
        split: Split,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(info.input_shape):
            raise DatasetError(
                f"{info.name}: images must be (N, {', '.join(map(str, info.input_shape))}), "
                f"got {tuple(images.shape)}"
            )
        if images.dtype not in (torch.uint8, torch.float32):
            raise DatasetError(f"{info.name}: images must be uint8 or float32, got {images.dtype}")
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if targets.shape != (len(images),):
            raise DatasetError(
                f"{info.name}: {len(images)} images but targets of shape {tuple(targets.shape)}"
            )
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= info.num_classes):
            raise DatasetError(
                f"{info.name}: labels must lie in 0..{info.num_classes - 1}, "
                f"got {int(targets.min())}..{int(targets.max())}"
            )
        self.images = images  # (N, C, H, W)
        self.targets = targets  # (N,)
        self.info = info
        self.split = split
        self.classes = list(classes) if classes is not None else None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_unit_float(self.images[index : index + 1])
        return normalize(x, self.info)[0], int(self.targets[index])

    def to(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) on `device`, copied there once and kept for later loaders."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.images.device:
            return self.images, self.targets
        if device not in self._on_device:
            self._on_device[device] = (self.images.to(device), self.targets.to(device))
        return self._on_device[device]

    def __repr__(self) -> str:
        return f"TensorImageDataset({self.info.name!r}, split={self.split!r}, n={len(self)})"


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (division, as torchvision's ToTensor); float passes through."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def normalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """(x - mean) / std per channel; x is (B, C, H, W) float in 0..1 (modified in place)."""
    mean, std = _stats(info.mean, info.std, x.dtype, x.device)
    return x.sub_(mean).div_(std)


@lru_cache(maxsize=64)
def _stats(
    mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1, C, 1, 1) tensors on `device`, made once (no copy per batch)."""
    m = torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1)
    return m, torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1)


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, rank, ...), well spread.

    Unlike `seed + epoch`, (seed 0, epoch 1) and (seed 1, epoch 0) give different streams.

    Example:
        >>> mix_seed(0, 1) != mix_seed(1, 0)
        True
    """
    words = [int(n) % 2**64 for n in numbers]
    state = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def normalize_split(split: str, name: str, allow_val: bool) -> Split:
    """'train' / 'test' ('val' too, as an alias of 'test', where `allow_val`)."""
    s = str(split).lower()
    if s == "val" and allow_val:
        return "test"
    if s not in ("train", "test"):
        valid = "'train', 'test' or 'val' (= 'test')" if allow_val else "'train' or 'test'"
        raise ValueError(f"{name}: unknown split {split!r}; valid: {valid}")
    return s  # type: ignore[return-value]


def data_home() -> Path:
    """Where data sets live when `root` is None: $NTKSAP_DATA, else ./data."""
    return Path(os.environ.get(DATA_ENV, "data")).expanduser()


def resolve_root(root: str | os.PathLike | None, default_subdir: str = "") -> Path:
    """`root` as a Path; None means `data_home() / default_subdir`."""
    if root is None:
        return data_home() / default_subdir if default_subdir else data_home()
    return Path(root).expanduser()


# --- registry -----------------------------------------------------------------------------

DatasetFactory = Callable[..., Dataset]
DATASETS: Registry[DatasetFactory] = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator: register a factory `fn(root, split, **kw) -> Dataset` under `name`.

    The returned data set must have `.info` (DatasetInfo), `.targets` ((N,) int64) and
    `__len__`; tensor sets are `TensorImageDataset`s.
    """
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Sorted names of every registered data set."""
    return DATASETS.names()


def create(
    name: str, root: str | os.PathLike | None = None, split: str = "train", **kwargs: Any
) -> Dataset:
    """Open the registered data set `name` (never downloads anything).

    Args:
        name: one of `list_datasets()`; an unknown name raises an error listing them.
        root: where the files are; None means $NTKSAP_DATA (default ./data), plus the set's
            usual folder name for Tiny-ImageNet and ImageNet. Ignored by the sets that ship
            inside packages (digits, mnist5k) and by synthetic.
        split: "train" or "test" ("val" is an alias of "test" for the folder sets).
        **kwargs: the set's own options (e.g. synthetic's size, imagenet's image_size).

    Example:
        >>> ds = create("synthetic", split="test", size=20, num_classes=4)
        >>> ds.info.name, ds.split, len(ds)
        ('synthetic', 'test', 20)
    """
    factory = DATASETS.get(name)
    return factory(root, split, **kwargs)
