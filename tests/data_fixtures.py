"""Writers of tiny fake data sets in the REAL on-disk formats, for the data-layer tests.

- CIFAR-10/100: pickles byte-compatible with the official Python 2 files (protocol 2,
  Python-2 `str` opcodes for bytes and str, numpy 1's `numpy.core.multiarray._reconstruct`
  global), in the extracted folder and as the .tar.gz; or, with `dumps=py3_pickle(p)`, as a
  Python 3 re-export pickled with protocol p (numpy 2 or numpy 1 global names).
- Tiny-ImageNet: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt, wnids.txt.
- ImageFolder: train/<class>/*, val/<class>/* with JPEG and PNG files, mixed-case extensions.

Every writer returns what it wrote (pixels as uint8 (N, C, H, W), labels) so tests can
compare the loaders' output with the truth.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# --- Python 2 style pickles -----------------------------------------------------------------

_reconstruct = np.empty(0).__reduce__()[0]
_PY2_GLOBALS = {
    id(_reconstruct): b"numpy.core.multiarray\n_reconstruct\n",
    id(np.ndarray): b"numpy\nndarray\n",
    id(np.dtype): b"numpy\ndtype\n",
}


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us change opcodes
    """Protocol 2, writing bytes and str as Python 2 `str` (SHORT_BINSTRING / BINSTRING) and
    numpy's globals under their numpy 1 names, as cPickle did for the official CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if id(obj) not in _PY2_GLOBALS:
            raise pickle.PicklingError(f"fixture pickler: unexpected global {obj!r}")
        self.write(pickle.GLOBAL + _PY2_GLOBALS[id(obj)])
        self.memoize(obj)


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


class Numpy1Pickler(pickle._Pickler):
    """Python 3's pickler naming numpy's globals as numpy 1.x did (`numpy.core.*`), so the
    files a numpy 1 install writes can be made with numpy 2 installed."""

    def save_global(self, obj, name=None) -> None:
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core", 1)
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            if self.proto < 3 and module == "builtins":
                module = "__builtin__"  # what fix_imports writes for Python 2 readers
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def py3_pickle(protocol: int, numpy1: bool = False) -> Callable[[object], bytes]:
    """`pickle.dumps(obj, protocol)`: what a Python 3 re-export of a batch holds; with
    `numpy1`, numpy's globals under their numpy 1.x names."""

    def dumps(obj: object) -> bytes:
        if not numpy1:
            return pickle.dumps(obj, protocol=protocol)
        buf = io.BytesIO()
        Numpy1Pickler(buf, protocol=protocol).dump(obj)
        return buf.getvalue()

    return dumps


# --- CIFAR ----------------------------------------------------------------------------------


@dataclass
class FakeCifar:
    folder: Path  # the extracted folder (cifar-10-batches-py / cifar-100-python)
    train_x: np.ndarray  # (N, 3, 32, 32) uint8, in file order
    train_y: np.ndarray  # (N,)
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def cifar_image(i: int, rng: np.random.Generator) -> np.ndarray:
    """A (3, 32, 32) uint8 image whose channels differ and whose rows differ from columns."""
    img = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    img[0, 0, :] = np.arange(32) * 8  # red top row: a horizontal gradient
    img[1, :, 0] = 255 - np.arange(32) * 8  # green left column: a vertical gradient
    img[2, 0, 0] = i % 256
    return img


def _rows(x: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> (N, 3072) rows of 1024 R, 1024 G, 1024 B, as the official files."""
    return np.ascontiguousarray(x.reshape(len(x), 3072))


def write_cifar10(
    root: Path,
    per_batch: int = 3,
    n_test: int = 4,
    seed: int = 0,
    dumps: Callable[[object], bytes] = py2_pickle,
    labels: Callable[[list[int]], object] = list,
) -> FakeCifar:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}.

    `dumps` pickles each file (default: as the official Python 2 files); `labels` turns
    a batch's label list into what is stored (e.g. `np.array`).
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in classes]}
    meta[b"num_vis"] = 3072
    (folder / "batches.meta").write_bytes(dumps(meta))
    xs, ys = [], []
    count = 0
    for b in range(1, 6):
        x = np.stack([cifar_image(count + i, rng) for i in range(per_batch)])
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        count += per_batch
        batch = {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": labels(y),
            b"data": _rows(x),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / f"data_batch_{b}").write_bytes(dumps(batch))
        xs.append(x)
        ys.extend(y)
    tx = np.stack([cifar_image(1000 + i, rng) for i in range(n_test)])
    ty = [int(v) for v in rng.integers(0, 10, n_test)]
    test = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": labels(ty),
        b"data": _rows(tx),
        b"filenames": [f"test_{i}.png".encode() for i in range(n_test)],
    }
    (folder / "test_batch").write_bytes(dumps(test))
    return FakeCifar(folder, np.concatenate(xs), np.array(ys), tx, np.array(ty), classes)


def write_cifar100(
    root: Path,
    n_train: int = 6,
    n_test: int = 3,
    seed: int = 1,
    dumps: Callable[[object], bytes] = py2_pickle,
    labels: Callable[[list[int]], object] = list,
) -> FakeCifar:
    """root/cifar-100-python/{train, test, meta} with fine and coarse labels (`dumps` and
    `labels` as for `write_cifar10`)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"fine{i:02d}" for i in range(100)]
    meta = {
        b"fine_label_names": [c.encode() for c in fine],
        b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(dumps(meta))
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = np.stack([cifar_image(i, rng) for i in range(n)])
        y = [int(v) for v in rng.integers(0, 100, n)]
        d = {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": labels(y),
            b"coarse_labels": labels([v // 5 for v in y]),
            b"data": _rows(x),
        }
        (folder / name).write_bytes(dumps(d))
        out[name] = (x, np.array(y))
    return FakeCifar(folder, *out["train"], *out["test"], fine)


def tar_gz(folder: Path, archive: Path) -> Path:
    """Pack `folder` as archive (its top-level entry named like the folder), as distributed."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


# --- image folders --------------------------------------------------------------------------


def rgb_image(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth (H, W, 3) uint8 image (JPEG keeps it nearly intact) with a random tint."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 128, 3)
    img = np.stack([base[0] + xx * 2, base[1] + yy * 2, base[2] + (xx + yy)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class FakeFolder:
    root: Path
    classes: list[str]
    files: dict[str, list[tuple[Path, int]]]  # split -> [(path, label)] in the expected order


def write_tinyimagenet(
    root: Path, wnids: tuple[str, ...] = ("n02", "n01", "n03"), train_per_class: int = 3
) -> FakeFolder:
    """root/{wnids.txt, train/<wnid>/images/<wnid>_<i>.JPEG, val/images, val_annotations.txt}.

    wnids.txt deliberately lists the classes in a non-sorted order: it defines the labels.
    """
    (root / "train").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    seed = 0
    for k, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(train_per_class):
            p = d / f"{w}_{i}.JPEG"
            Image.fromarray(rgb_image((64, 64), seed)).save(p, quality=95)
            seed += 1
            files["train"].append((p, k))
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    val_labels = [2, 0, 1, 0, 2]  # indices into wnids
    for i, k in enumerate(val_labels):
        name = f"val_{i}.JPEG"
        p = root / "val" / "images" / name
        Image.fromarray(rgb_image((64, 64), 100 + i)).save(p, quality=95)
        lines.append(f"{name}\t{wnids[k]}\t0\t0\t63\t63")
        files["test"].append((p, k))
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return FakeFolder(root, list(wnids), files)


def write_image_folder(root: Path, size: tuple[int, int] = (40, 36)) -> FakeFolder:
    """root/train/<class>/... and root/val/<class>/... : JPEG and PNG, mixed-case extensions.

    Classes "bee", "ant", "cat": sorted, so ant = 0, bee = 1, cat = 2. A non-image file and
    a nested sub-folder are included to check the scan.
    """
    classes = ["ant", "bee", "cat"]
    names = {
        "train": {
            "ant": ["a1.jpg", "a2.PNG", "sub/a3.JPEG"],
            "bee": ["b1.Jpeg", "b2.png", "b3.jpg", "b4.png"],
            "cat": ["c1.JPG", "c2.png"],
        },
        "val": {"ant": ["v1.png"], "bee": ["v2.JPG"], "cat": ["v3.PNG", "v4.jpeg"]},
    }
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    seed = 0
    for split, per_class in names.items():
        for c in ["bee", "ant", "cat"]:  # write order does not matter
            d = root / split / c
            d.mkdir(parents=True)
            (d / "notes.txt").write_text("not an image")
            for n in per_class[c]:
                p = d / n
                p.parent.mkdir(parents=True, exist_ok=True)
                fmt = "PNG" if n.lower().endswith(".png") else "JPEG"
                Image.fromarray(rgb_image(size, seed)).save(p, format=fmt)
                seed += 1
        key = "train" if split == "train" else "test"
        for c in classes:  # expected order: class, then sorted path within the class folder
            d = root / split / c
            found = sorted(
                (p for p in d.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
                key=lambda p: (len(p.relative_to(d).parts), str(p)),
            )
            files[key].extend((p, classes.index(c)) for p in found)
    return FakeFolder(root, classes, files)


def decoded(path: Path) -> np.ndarray:
    """The file's pixels as PIL decodes them: (3, H, W) uint8."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy()
