"""Image-file data sets opened with PIL: `imagenet` (ImageFolder layout) and `tinyimagenet`.

Layouts (nothing is downloaded; `root` None means $NTKSAP_DATA/imagenet, resp.
$NTKSAP_DATA/tiny-imagenet-200, with $NTKSAP_DATA defaulting to ./data):

- imagenet: `root/train/<class>/*` and `root/val/<class>/*` (sub-folders allowed). Class
  index = position in the sorted train folder names, for both splits; a val class that
  train lacks is an error. Extensions: jpg jpeg png ppm bmp pgm tif tiff webp, any case.
- tinyimagenet: `root/train/<wnid>/images/*.JPEG`, `root/val/images/*.JPEG` labelled by
  `root/val/val_annotations.txt` (filename, wnid, x, y, w, h, tab-separated), class order
  from `root/wnids.txt` (else the sorted train folder names). A val folder already sorted
  into `root/val/<wnid>/[images/]*` is accepted too. `root` may also be the parent folder
  of `tiny-imagenet-200`.

The "test" split is the labelled val folder ("val" is accepted as its alias).

`ds[i]` is (normalised float (3, S, S), label) with the eval transform; loaders use
`ds.load_uint8(i, augment, seed, epoch)` and normalise on the device.

Example (with ImageNet in ./data/imagenet):
    >>> from ntksap import data
    >>> ds = data.create("imagenet", split="val")        # doctest: +SKIP
    >>> ds.info.num_classes, ds.info.input_shape          # doctest: +SKIP
    (1000, (3, 224, 224))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ntksap.data.base import (
    DatasetError,
    DatasetInfo,
    Split,
    data_home,
    normalize,
    normalize_split,
    register_dataset,
    to_unit_float,
)
from ntksap.data.transforms import (
    Compose,
    imagenet_transforms,
    pil_to_uint8,
    sample_rng,
    tinyimagenet_transforms,
)

#: Image file extensions recognised (compared lower-case), as torchvision's ImageFolder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_MEAN, TINY_STD = (0.480, 0.448, 0.397), (0.276, 0.269, 0.282)  # reference code's values


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


class ImageFileDataset(Dataset):
    """Labelled image files, decoded with PIL (RGB) on access.

    Paths are kept as one numpy bytes array relative to `root` (not a list of Python
    strings), so forked DataLoader workers share the memory instead of copying it.

    Args:
        root: the folder the relative paths start from.
        files: relative paths, one per sample.
        labels: class index per sample.
        info: kind "folder".
        split: "train" or "test".
        classes: class names (folder names / wnids) in label order.
        transforms: (train, eval) PIL transforms to info.input_shape's size.
    """

    def __init__(
        self,
        root: Path,
        files: Sequence[str],
        labels: Sequence[int],
        info: DatasetInfo,
        split: Split,
        classes: Sequence[str],
        transforms: tuple[Compose, Compose],
    ) -> None:
        self.root = Path(root)
        self._files = np.array([f.encode() for f in files], dtype=np.bytes_)  # (N,)
        self._labels = np.asarray(labels, dtype=np.int64)  # (N,)
        self.targets = torch.from_numpy(self._labels)  # (N,) int64, shares memory
        self.info = info
        self.split = split
        self.classes = list(classes)
        self.train_transform, self.eval_transform = transforms

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, index: int) -> Path:
        return self.root / self._files[index].decode()

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """(path, label) for every sample."""
        return [(self.path(i), int(y)) for i, y in enumerate(self._labels)]

    def open(self, index: int) -> Image.Image:
        """The decoded RGB image of sample `index`."""
        p = self.path(index)
        try:
            with Image.open(p) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"{self.info.name}: cannot read image {p}: {err}") from None

    def load_uint8(self, index: int, augment: bool, seed: int = 0, epoch: int = 0) -> torch.Tensor:
        """Sample `index` transformed to uint8 (3, S, S); random only via (seed, epoch, index)."""
        transform = self.train_transform if augment else self.eval_transform
        img = transform(self.open(index), sample_rng(seed, epoch, index))
        return pil_to_uint8(img)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_unit_float(self.load_uint8(index, augment=False)[None])  # (1, 3, S, S)
        return normalize(x, self.info)[0], int(self._labels[index])

    def __repr__(self) -> str:
        name, split = self.info.name, self.split
        return f"ImageFileDataset({name!r}, {split=}, n={len(self)}, root={str(self.root)!r})"


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path, start: Path) -> list[str]:
    """Image files below `folder` (recursively, sorted), as paths relative to `start`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, start)
        out.extend(os.path.join(rel, f) for f in sorted(filenames) if is_image(f))
    return out


# --- imagenet -------------------------------------------------------------------------------


def _imagenet_layout(root: Path) -> str:
    exts = " ".join(e[1:] for e in IMG_EXTENSIONS)
    return (
        f"expected the ImageFolder layout {root}/train/<class>/<image> and "
        f"{root}/val/<class>/<image> (extensions {exts}, any case); a flat val folder "
        "must first be sorted into class folders (e.g. with the usual valprep.sh)"
    )


@register_dataset("imagenet")
def imagenet(
    root: str | os.PathLike | None = None, split: str = "train", *, image_size: int = 224
) -> ImageFileDataset:
    """ImageNet (or any ImageFolder set) at `image_size` (224: crops of 224, eval resize 256)."""
    split = normalize_split(split, "imagenet", allow_val=True)
    root = (Path(root).expanduser() if root is not None else data_home() / "imagenet").absolute()
    train_dir = root / "train"
    split_dir = root / ("train" if split == "train" else "val")
    for d in (train_dir, split_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"imagenet: folder {d} not found; {_imagenet_layout(root)}")
    classes = _subdirs(train_dir)
    if not classes:
        raise DatasetError(f"imagenet: no class folders in {train_dir}; {_imagenet_layout(root)}")
    split_classes = _subdirs(split_dir)
    unknown = sorted(set(split_classes) - set(classes))
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise DatasetError(
            f"imagenet: {split_dir} has {len(unknown)} class folder(s) that {train_dir} lacks: "
            f"{shown}; class indices come from the train folders, so both splits must use the "
            f"same class names. {_imagenet_layout(root)}"
        )
    if not split_classes:
        raise DatasetError(f"imagenet: no class folders in {split_dir}; {_imagenet_layout(root)}")
    index = {c: k for k, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for c in split_classes:
        found = _images_under(split_dir / c, root)
        if not found:
            raise DatasetError(
                f"imagenet: class folder {split_dir / c} holds no image files; "
                f"{_imagenet_layout(root)}"
            )
        files.extend(found)
        labels.extend([index[c]] * len(found))
    info = DatasetInfo(
        name="imagenet",
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        kind="folder",
        crop_padding=0,
        augment_train=True,
    )
    return ImageFileDataset(
        root, files, labels, info, split, classes, imagenet_transforms(image_size)
    )


# --- tinyimagenet ---------------------------------------------------------------------------


def _tiny_layout(root: Path) -> str:
    return (
        f"expected {root}/train/<wnid>/images/*.JPEG, {root}/val/images/*.JPEG with "
        f"{root}/val/val_annotations.txt (lines: filename<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h) and "
        f"{root}/wnids.txt (one wnid per line, the class order)"
    )


def _tiny_root(root: str | os.PathLike | None) -> Path:
    base = (Path(root).expanduser() if root is not None else data_home()).absolute()
    candidates = (
        [base, base / "tiny-imagenet-200"] if root is not None else [base / "tiny-imagenet-200"]
    )
    for c in candidates:
        if (c / "train").is_dir() or (c / "val").is_dir():
            return c
    looked = ", ".join(str(c / "train") for c in candidates)
    raise FileNotFoundError(
        f"tinyimagenet: no data set found (looked for {looked}); {_tiny_layout(candidates[0])}"
    )


def _tiny_classes(root: Path) -> list[str]:
    wnids = root / "wnids.txt"
    if wnids.is_file():
        classes = [line.strip() for line in wnids.read_text().splitlines() if line.strip()]
        if len(set(classes)) != len(classes):
            raise DatasetError(f"tinyimagenet: {wnids} lists a wnid twice")
    elif (root / "train").is_dir():
        classes = _subdirs(root / "train")
    else:
        raise FileNotFoundError(
            f"tinyimagenet: neither {wnids} nor {root / 'train'} exists, so the class order is "
            f"unknown; {_tiny_layout(root)}"
        )
    if not classes:
        raise DatasetError(f"tinyimagenet: no classes found in {wnids}; {_tiny_layout(root)}")
    return classes


def _tiny_train(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"tinyimagenet: folder {train} not found; {_tiny_layout(root)}")
    extra = sorted(set(_subdirs(train)) - set(classes))
    if extra:
        raise DatasetError(
            f"tinyimagenet: {train} has folders not listed in {root / 'wnids.txt'}: "
            f"{', '.join(extra[:10])}; {_tiny_layout(root)}"
        )
    files: list[str] = []
    labels: list[int] = []
    for k, wnid in enumerate(classes):
        folder = train / wnid / "images"
        if not folder.is_dir():
            folder = train / wnid
        if not folder.is_dir():
            raise FileNotFoundError(
                f"tinyimagenet: class folder {train / wnid / 'images'} not found; "
                f"{_tiny_layout(root)}"
            )
        found = _images_under(folder, root)
        if not found:
            raise DatasetError(f"tinyimagenet: {folder} holds no image files; {_tiny_layout(root)}")
        files.extend(found)
        labels.extend([k] * len(found))
    return files, labels


def _tiny_val(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    val = root / "val"
    ann = val / "val_annotations.txt"
    index = {w: k for k, w in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    if ann.is_file():
        images = val / "images"
        present = {e.name for e in os.scandir(images)} if images.is_dir() else set()
        for n, line in enumerate(ann.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise DatasetError(
                    f"tinyimagenet: {ann} line {n} is {line!r}, not filename<TAB>wnid<TAB>...; "
                    f"{_tiny_layout(root)}"
                )
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise DatasetError(
                    f"tinyimagenet: {ann} line {n} names wnid {wnid!r}, which is not a train "
                    f"class ({root / 'wnids.txt'}); {_tiny_layout(root)}"
                )
            if name not in present:
                raise FileNotFoundError(
                    f"tinyimagenet: {ann} line {n} names {images / name}, which does not exist; "
                    f"{_tiny_layout(root)}"
                )
            files.append(os.path.join("val", "images", name))
            labels.append(index[wnid])
        return files, labels
    sorted_dirs = _subdirs(val) if val.is_dir() else []
    if not sorted_dirs or sorted_dirs == ["images"]:
        raise FileNotFoundError(f"tinyimagenet: {ann} not found; {_tiny_layout(root)}")
    unknown = sorted(set(sorted_dirs) - set(index))
    if unknown:
        raise DatasetError(
            f"tinyimagenet: {val} has class folder(s) that are not train classes: "
            f"{', '.join(unknown[:10])}; {_tiny_layout(root)}"
        )
    for wnid in sorted_dirs:
        found = _images_under(val / wnid, root)
        files.extend(found)
        labels.extend([index[wnid]] * len(found))
    return files, labels


@register_dataset("tinyimagenet")
def tinyimagenet(
    root: str | os.PathLike | None = None, split: str = "train", *, image_size: int = 64
) -> ImageFileDataset:
    """Tiny-ImageNet (200 classes of 64x64 RGB; 100000 train, 10000 labelled val images)."""
    split = normalize_split(split, "tinyimagenet", allow_val=True)
    base = _tiny_root(root)
    classes = _tiny_classes(base)
    files, labels = (_tiny_train if split == "train" else _tiny_val)(base, classes)
    if not files:
        raise DatasetError(f"tinyimagenet: no {split} images found; {_tiny_layout(base)}")
    info = DatasetInfo(
        name="tinyimagenet",
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
        mean=TINY_MEAN,
        std=TINY_STD,
        kind="folder",
        crop_padding=4,
        augment_train=True,
    )
    transforms = tinyimagenet_transforms(image_size, padding=4)
    return ImageFileDataset(base, files, labels, info, split, classes, transforms)
