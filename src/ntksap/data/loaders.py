"""`make_loader`: per-rank, reproducible batches (x, y) on the device.

Reproducibility contract (the trainer's bit-exact resume relies on it): after
`loader.set_epoch(e)`, iterating the loader yields a batch sequence that is a pure
function of (data set, seed, e, rank, world_size, batch size, options), whatever was
iterated before. Shuffling draws from a generator seeded with (seed, epoch); augmentation
from one seeded with (seed, epoch, rank) (tensor sets) or (seed, epoch, sample index)
(folder sets).

Tensor sets ("tensor" kind) never use worker processes: the whole set is moved to the
device once, and each batch is gathered, augmented (random crop with zero padding +
horizontal flip, vectorised over the batch) and normalised there. Folder sets use a
`torch.utils.data.DataLoader` whose workers decode and transform uint8 images; the
conversion to float and the normalisation happen on the device.

Sharding (world_size > 1) follows `DistributedSampler`: the epoch's index order is padded
by repeating its start until it divides by world_size (or cut, with drop_last), and rank r
takes positions r, r + world_size, ... So ranks see disjoint samples (apart from the
padding) and the same number of batches.

`drop_last` (default None = False, as the reference code: every sample is seen every epoch)
means both: cut the sharded order to a multiple of world_size, and drop a last batch
smaller than batch_size. Note for evaluation with world_size > 1: the padding repeats up
to world_size - 1 samples, so a sum over ranks counts them twice (exact only when
world_size divides the set size, e.g. 10000 CIFAR test images on 2, 4, 5 or 8 ranks).

Example:
    >>> from ntksap import data
    >>> ds = data.create("synthetic", num_classes=4, input_shape=(3, 8, 8), size=10)
    >>> loader = data.make_loader(ds, batch_size=4, seed=1)
    >>> loader.set_epoch(0)
    >>> [tuple(x.shape) for x, y in loader], len(loader)
    ([(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)], 3)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from ntksap.data.base import DatasetInfo, TensorImageDataset, mix_seed, normalize, to_unit_float
from ntksap.data.image_folder import ImageFileDataset
from ntksap.data.transforms import random_crop, random_flip

Batch = tuple[torch.Tensor, torch.Tensor]

# Streams of mix_seed(seed, epoch, STREAM, ...), so shuffling and augmentation never share.
_SHUFFLE, _AUGMENT = 0, 1


def epoch_indices(
    n: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> torch.Tensor:
    """This rank's sample indices for one epoch, in order, as DistributedSampler would shard.

    Returns:
        (n_rank,) int64 on the CPU, n_rank = ceil(n / world_size) (floor with drop_last).

    Example:
        >>> epoch_indices(5, shuffle=False, seed=0, epoch=0, rank=1, world_size=2).tolist()
        [1, 3, 0]
    """
    if shuffle:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, _SHUFFLE))
        order = torch.randperm(n, generator=g)  # (n,)
    else:
        order = torch.arange(n)
    if world_size == 1:
        return order
    if drop_last:
        total = (n // world_size) * world_size
        order = order[:total]
    else:
        total = math.ceil(n / world_size) * world_size
        pad = total - n
        if pad and n:
            order = torch.cat([order, order.repeat(math.ceil(pad / n))[:pad]])
    return order[rank:total:world_size]


def _check_common(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


class TensorLoader:
    """Batches of an in-memory set, made on the device (see the module docstring).

    Attributes:
        dataset, batch_size, shuffle, augment, device, seed, rank, world_size, drop_last.
        epoch: set by `set_epoch`; 0 until then.
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        _check_common(batch_size, rank, world_size)
        self.dataset = dataset
        self.info: DatasetInfo = dataset.info
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.device = device
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (shard padding included)."""
        n, ws = len(self.dataset), self.world_size
        if self.drop_last:
            return len(self) * self.batch_size
        return math.ceil(n / ws)

    def __len__(self) -> int:
        n, ws = len(self.dataset), self.world_size
        per_rank = n // ws if self.drop_last else math.ceil(n / ws)
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        images, targets = self.dataset.to(self.device)  # (N, C, H, W), (N,) on the device
        order = epoch_indices(
            len(self.dataset),
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
        ).to(images.device)
        g = None
        if self.augment:
            g = torch.Generator(device=images.device)
            g.manual_seed(mix_seed(self.seed, self.epoch, _AUGMENT, self.rank))
        pad = self.info.crop_padding
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]  # (B,)
            x = to_unit_float(images[idx])  # (B, C, H, W), 0..1
            if g is not None:
                x = random_flip(random_crop(x, pad, g), g)
            yield normalize(x, self.info), targets[idx]

    def __repr__(self) -> str:
        return (
            f"TensorLoader({self.info.name!r}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, augment={self.augment}, device={self.device}, "
            f"rank={self.rank}/{self.world_size}, batches={len(self)})"
        )


class _EpochTagged(Sampler):
    """Yields (index, epoch) so workers learn the epoch with each index.

    Persistent worker processes hold their own copy of the data set, so an epoch stored on
    the data set in the main process would never reach them; the sampler, iterated in the
    main process, is the reliable channel.
    """

    def __init__(self, base: Sampler) -> None:
        self.base = base
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for i in self.base:
            yield int(i), epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class _FolderView(Dataset):
    """What the workers index: (index, epoch) -> (uint8 (3, S, S), label)."""

    def __init__(self, dataset: ImageFileDataset, augment: bool, seed: int) -> None:
        self.dataset = dataset
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        x = self.dataset.load_uint8(index, self.augment, self.seed, epoch)
        return x, int(self.dataset._labels[index])


class FolderLoader:
    """A DataLoader over image files that moves and normalises batches on the device."""

    def __init__(
        self,
        dataset: ImageFileDataset,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        device: torch.device,
        seed: int = 0,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        _check_common(batch_size, rank, world_size)
        self.dataset = dataset
        self.info = dataset.info
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.device = device
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.epoch = 0
        view = _FolderView(dataset, augment, seed)
        self._generator: torch.Generator | None = None
        base: Sampler
        if world_size > 1:
            base = DistributedSampler(
                view,
                num_replicas=world_size,
                rank=rank,
                shuffle=shuffle,
                seed=seed,
                drop_last=drop_last,
            )
        elif shuffle:
            self._generator = torch.Generator()
            base = RandomSampler(view, generator=self._generator)
        else:
            base = SequentialSampler(view)
        self.sampler = _EpochTagged(base)
        self._loader = DataLoader(
            view,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            drop_last=drop_last,
            persistent_workers=num_workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the sampler's shuffle and every sample's augmentation follow it."""
        self.epoch = int(epoch)
        self.sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        if self._generator is not None:  # reseed, so the order depends on (seed, epoch) only
            self._generator.manual_seed(mix_seed(self.seed, self.epoch, _SHUFFLE))
        for x, y in self._loader:  # (B, 3, S, S) uint8, (B,) int64
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield normalize(to_unit_float(x), self.info), y

    def __repr__(self) -> str:
        return (
            f"FolderLoader({self.info.name!r}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, augment={self.augment}, device={self.device}, "
            f"workers={self.num_workers}, rank={self.rank}/{self.world_size}, batches={len(self)})"
        )


def make_loader(
    dataset: Dataset,
    batch_size: int = 128,
    train: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    augment: bool | None = None,
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool | None = None,
) -> TensorLoader | FolderLoader:
    """A per-rank loader of normalised batches (x float32 (B, C, H, W), y int64 (B,)) on `device`.

    Args:
        dataset: from `ntksap.data.create`.
        batch_size: images per batch on this rank.
        train: shuffle each epoch (and, by default, augment the train split).
        device: where batches are made (tensor sets) or delivered (folder sets).
        seed: with the epoch (and rank), fixes order and augmentation.
        augment: None = the data set's default (`info.augment_train`: on for the train split
            of CIFAR, Tiny-ImageNet and ImageNet when train=True; off for digits, mnist5k,
            synthetic and every test split); True/False forces it.
        num_workers: folder sets: DataLoader workers (None = min(8, cpu count)). Tensor sets
            ignore it (their batches are made on the device in this process).
        rank, world_size: this process's shard (see the module docstring); no process
            group is needed.
        drop_last: None = False: pad shards and keep a last partial batch, so every sample is
            seen each epoch (the reference code's choice). True cuts both.

    Call `loader.set_epoch(epoch)` before each epoch: the order and augmentation are pure
    functions of (seed, epoch, rank), which makes a resumed run repeat its batches.
    """
    device = torch.device(device)
    drop = bool(drop_last) if drop_last is not None else False
    info: DatasetInfo | None = getattr(dataset, "info", None)
    if info is None:
        raise TypeError(
            f"make_loader needs a data set from ntksap.data.create, got {type(dataset).__name__}"
        )
    if augment is None:
        augment = train and info.augment_train and getattr(dataset, "split", "train") == "train"
    if isinstance(dataset, TensorImageDataset):
        return TensorLoader(
            dataset,
            batch_size,
            shuffle=train,
            augment=bool(augment),
            device=device,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop,
        )
    if isinstance(dataset, ImageFileDataset):
        workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
        return FolderLoader(
            dataset,
            batch_size,
            shuffle=train,
            augment=bool(augment),
            device=device,
            seed=seed,
            num_workers=workers,
            rank=rank,
            world_size=world_size,
            drop_last=drop,
        )
    raise TypeError(
        f"make_loader: unsupported data set type {type(dataset).__name__} (kind {info.kind!r}); "
        "expected a TensorImageDataset or an ImageFileDataset"
    )
