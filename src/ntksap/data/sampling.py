"""`prune_batches`: the class-balanced sample that data-dependent pruning methods score on.

SNIP, iterative SNIP and GraSP use 10 x classes training images (10 per class); this picks
them at random but deterministically for a seed, normalises them like the loaders do, and
never augments.

Example:
    >>> from ntksap import data
    >>> ds = data.create("synthetic", num_classes=5, input_shape=(3, 8, 8), size=100)
    >>> [(x, y)] = data.prune_batches(ds, per_class=10)
    >>> tuple(x.shape), y.bincount().tolist()
    ((50, 3, 8, 8), [10, 10, 10, 10, 10])
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset

from ntksap.data.base import DatasetError, TensorImageDataset, mix_seed, normalize, to_unit_float
from ntksap.data.image_folder import ImageFileDataset

_PRUNE_STREAM = 2  # mix_seed stream id, distinct from the loaders' shuffle/augment streams


def balanced_indices(
    targets: torch.Tensor, num_classes: int, per_class: int, seed: int = 0
) -> torch.Tensor:
    """`per_class` random indices of every class, in a random order (deterministic for seed).

    Raises:
        DatasetError: a class has fewer than per_class samples.

    Example:
        >>> balanced_indices(torch.tensor([0, 1, 0, 1, 1]), 2, 2).sort().values.tolist() in (
        ...     [0, 1, 2, 3], [0, 1, 2, 4], [0, 2, 3, 4])
        True
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    targets = torch.as_tensor(targets, dtype=torch.int64).cpu()  # (N,)
    counts = torch.bincount(targets, minlength=num_classes)  # (num_classes,)
    short = (counts < per_class).nonzero().flatten().tolist()
    if short:
        shown = ", ".join(f"class {c}: {int(counts[c])}" for c in short[:10])
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        raise DatasetError(
            f"cannot draw {per_class} images per class: {len(short)} class(es) have fewer "
            f"({shown}{more})"
        )
    g = torch.Generator().manual_seed(mix_seed(seed, _PRUNE_STREAM))
    perm = torch.randperm(len(targets), generator=g)  # (N,) random order ...
    by_class = perm[torch.argsort(targets[perm], stable=True)]  # ... grouped by class
    starts = torch.cumsum(counts, 0) - counts  # (num_classes,) first position of each class
    pos = (starts[:, None] + torch.arange(per_class)).flatten()  # (num_classes * per_class,)
    chosen = by_class[pos]
    return chosen[torch.randperm(len(chosen), generator=g)]


def _load(ds: Dataset, idx: torch.Tensor) -> torch.Tensor:
    """Normalised float32 (K, C, H, W) of the samples idx, without augmentation."""
    if isinstance(ds, TensorImageDataset):
        return normalize(to_unit_float(ds.images[idx]), ds.info)
    if isinstance(ds, ImageFileDataset):
        threads = min(8, os.cpu_count() or 1)  # PIL decodes outside the GIL
        with ThreadPoolExecutor(threads) as pool:
            images = list(pool.map(lambda i: ds.load_uint8(i, augment=False), idx.tolist()))
        return normalize(to_unit_float(torch.stack(images)), ds.info)
    raise TypeError(
        f"prune_batches needs a data set from ntksap.data.create, got {type(ds).__name__}"
    )


def prune_batches(
    ds: Dataset, per_class: int = 10, batch_size: int | None = None, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A class-balanced sample of `ds` (per_class x classes images) for pruning, on the CPU.

    Args:
        ds: a data set from `ntksap.data.create` (normally the train split).
        per_class: images per class (the paper: 10).
        batch_size: None = one batch; else chunks of batch_size (the last may be smaller).
        seed: which images; the same seed gives the same batches.

    Returns:
        [(x float32 (B, C, H, W) normalised, y int64 (B,)), ...], classes mixed in each batch.

    Raises:
        DatasetError: a class has fewer than per_class images.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    info = getattr(ds, "info", None)
    if info is None:
        raise TypeError(
            f"prune_batches needs a data set from ntksap.data.create, got {type(ds).__name__}"
        )
    try:
        idx = balanced_indices(ds.targets, info.num_classes, per_class, seed)  # type: ignore[attr-defined]
    except DatasetError as err:
        raise DatasetError(f"{info.name} ({getattr(ds, 'split', '?')} split): {err}") from None
    x = _load(ds, idx)  # (K, C, H, W)
    y = ds.targets[idx].clone()  # type: ignore[attr-defined]  # (K,)
    if batch_size is None:
        return [(x, y)]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
