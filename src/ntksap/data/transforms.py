"""Image transforms, written with PIL, numpy and torch only (no torchvision).

Two families:

1. Batched tensor augmentation for the in-memory ("tensor") sets, run on the device:
   `random_crop` (zero padding, then a random window per image) and `random_flip`, both
   vectorised over the batch and driven by a `torch.Generator`.
2. Per-image PIL transforms for the file ("folder") sets, each taking the image and a
   `numpy.random.Generator` created per sample from (seed, epoch, index), so a sample's
   augmentation never depends on which worker process made it or what it made before:
   `RandomResizedCrop`, `RandomHorizontalFlip`, `Resize`, `CenterCrop`, `PadRandomCrop`.

The PIL transforms follow torchvision's definitions (same parameter sampling, bilinear
antialiased resizing, zero padding), so training matches the reference pipelines.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(4, 3, 8, 8)                     # (B, C, H, W)
    >>> random_flip(random_crop(x, 2, g), g).shape
    torch.Size([4, 3, 8, 8])
    >>> img = Image.new("RGB", (100, 80))
    >>> t = Compose([Resize(73), CenterCrop(64)])
    >>> t(img, np.random.default_rng(0)).size
    (64, 64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# --- batched tensor augmentation (tensor sets) ----------------------------------------------


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad every image with `padding` zero pixels, then cut a random (H, W) window from each.

    The shift is uniform in -padding..+padding pixels, drawn independently per image and
    axis (torchvision's RandomCrop(size, padding) per image, vectorised: no loop).

    Args:
        x: (B, C, H, W) float, in pixel units before normalisation (so padding is black).
        padding: pixels of zero padding on each side; 0 returns x unchanged.
        generator: on x's device.

    Returns:
        (B, C, H, W), a new tensor.
    """
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    p = int(padding)
    xp = F.pad(x, (p, p, p, p))  # (B, C, H + 2p, W + 2p), zeros outside
    dy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=x.device)  # top, pixels
    dx = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=x.device)  # left, pixels
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))  # (B, C, H, W + 2p)
    return xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability p (one draw per image, no loop).

    Args:
        x: (B, C, H, W).
        generator: on x's device.
    """
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# --- per-image PIL transforms (folder sets) -------------------------------------------------


class Transform(Protocol):
    """A PIL image transform; randomness comes only from `rng`."""

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image: ...


@dataclass(frozen=True)
class Compose:
    """Apply `transforms` in order, all drawing from the same per-sample rng."""

    transforms: Sequence[Transform]

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for t in self.transforms:
            img = t(img, rng)
        return img


@dataclass(frozen=True)
class RandomResizedCrop:
    """Crop a random area fraction (`scale`) and aspect ratio (`ratio`), resize to size x size.

    torchvision's algorithm: up to 10 tries of area ~ U(scale) * image area and log-aspect
    ~ U(log ratio); if none fits, a central crop clamped to `ratio`. Bilinear, antialiased.

    Example:
        >>> RandomResizedCrop(32)(Image.new("RGB", (50, 40)), np.random.default_rng(1)).size
        (32, 32)
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def params(
        self, width: int, height: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) in pixels."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height  # fallback: the central crop with a valid aspect ratio
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        top, left, h, w = self.params(img.width, img.height, rng)
        box = (left, top, left + w, top + h)
        return img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Mirror left-right with probability p."""

    p: float = 0.5

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


@dataclass(frozen=True)
class Resize:
    """Resize so the shorter side is `size` pixels, keeping the aspect ratio (bilinear).

    The longer side is int(size * long / short), as torchvision's Resize(int).
    """

    size: int

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        w, h = img.size
        short_is_w = w <= h
        new = (
            (self.size, int(self.size * h / w))
            if short_is_w
            else (int(self.size * w / h), self.size)
        )
        if new == (w, h):
            return img
        return img.resize(new, Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class CenterCrop:
    """The central size x size window (zero-filled where the image is smaller)."""

    size: int

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        w, h = img.size
        top = round((h - self.size) / 2.0)
        left = round((w - self.size) / 2.0)
        if (top, left, w, h) == (0, 0, self.size, self.size):
            return img
        return img.crop((left, top, left + self.size, top + self.size))


@dataclass(frozen=True)
class PadRandomCrop:
    """Zero-pad by `padding` pixels, then a random size x size window (RandomCrop with padding)."""

    size: int
    padding: int = 4

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = img.size
        p = self.padding
        if w + 2 * p < self.size or h + 2 * p < self.size:
            raise ValueError(f"image {w}x{h} + padding {p} is smaller than the crop {self.size}")
        top = int(rng.integers(0, h + 2 * p - self.size + 1)) - p
        left = int(rng.integers(0, w + 2 * p - self.size + 1)) - p
        # PIL's crop fills the area outside the image with zeros: that is the padding.
        return img.crop((left, top, left + self.size, top + self.size))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 tensor (C, H, W), values 0..255."""
    a = np.asarray(img, dtype=np.uint8)  # (H, W, C)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.transpose(2, 0, 1).copy())  # (C, H, W)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: a pure function of the three numbers."""
    return np.random.default_rng([int(seed) % 2**64, int(epoch) % 2**64, int(index) % 2**64])


def imagenet_transforms(size: int = 224) -> tuple[Compose, Compose]:
    """(train, eval) for ImageNet-style sets: RandomResizedCrop + flip; Resize + CenterCrop.

    The eval resize is size * 256 / 224 (256 for 224), the standard ratio.
    """
    train = Compose([RandomResizedCrop(size), RandomHorizontalFlip()])
    evaluate = Compose([Resize(round(size * 256 / 224)), CenterCrop(size)])
    return train, evaluate


def tinyimagenet_transforms(size: int = 64, padding: int = 4) -> tuple[Compose, Compose]:
    """(train, eval) for Tiny-ImageNet, as the reference: random crop with padding + flip; none.

    Eval resizes/crops only images that are not already size x size (the real ones are).
    """
    train = Compose(
        [Resize(size), CenterCrop(size), PadRandomCrop(size, padding), RandomHorizontalFlip()]
    )
    evaluate = Compose([Resize(size), CenterCrop(size)])
    return train, evaluate
