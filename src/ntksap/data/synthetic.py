"""`synthetic`: random uint8 images with class-balanced labels, for smoke tests and timing.

Each class has a random template image; an image is the mean of its class template and
independent uniform noise, so a network can learn the task (a smoke test can see the loss
fall) while nothing is read from disk. The same (seed, split) always gives the same set.

Example:
    >>> from ntksap import data
    >>> ds = data.create("synthetic", num_classes=10, input_shape=(3, 32, 32), size=1000)
    >>> ds.images.shape, ds.images.dtype, ds.targets.bincount().tolist() == [100] * 10
    (torch.Size([1000, 3, 32, 32]), torch.uint8, True)
"""

from __future__ import annotations

import torch

from ntksap.data.base import (
    DatasetInfo,
    TensorImageDataset,
    mix_seed,
    normalize_split,
    register_dataset,
)

# Pixel = (template + noise) / 2 with both uniform on 0..255: mean 127.5 / 255 = 0.5,
# std sqrt(2 * (256**2 - 1) / 12) / 2 / 255 = 0.2049 (0..1 units), whatever the class.
_MEAN, _STD = 0.5, 0.2049


@register_dataset("synthetic")
def synthetic(
    root: object = None,
    split: str = "train",
    *,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    size: int = 1000,
    seed: int = 0,
    augment: bool = False,
) -> TensorImageDataset:
    """`size` images of `input_shape` in the requested split (root is ignored).

    Labels are `arange(size) % num_classes`, shuffled: every class has size // num_classes
    or one more image. Train and test share the class templates but not the noise.
    `augment=True` turns on crop + flip by default for the train split.
    """
    split = normalize_split(split, "synthetic", allow_val=False)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"synthetic: input_shape must be (C, H, W), got {input_shape}")
    if num_classes < 1 or size < 0:
        raise ValueError(
            f"synthetic: need num_classes >= 1 and size >= 0, got {num_classes}, {size}"
        )
    c, h, w = input_shape
    g = torch.Generator().manual_seed(mix_seed(seed, 0))
    templates = torch.randint(0, 256, (num_classes, c, h, w), generator=g, dtype=torch.int32)
    g.manual_seed(mix_seed(seed, 1 if split == "train" else 2))
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=g)]  # (N,)
    noise = torch.randint(0, 256, (size, c, h, w), generator=g, dtype=torch.int32)
    images = ((templates[labels] + noise + 1) // 2).to(torch.uint8)  # (N, C, H, W), 0..255
    info = DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        input_shape=(c, h, w),
        mean=(_MEAN,) * c,
        std=(_STD,) * c,
        kind="tensor",
        crop_padding=max(1, min(h, w) // 8),
        augment_train=augment,
    )
    return TensorImageDataset(images, labels, info, split, [str(i) for i in range(num_classes)])
