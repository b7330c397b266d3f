"""CIFAR-10 and CIFAR-100 from the official python-pickle archives, read offline.

Accepted layouts (nothing is downloaded; `root` None means $NTKSAP_DATA, default ./data):

- `root/cifar-10-python.tar.gz` (resp. `cifar-100-python.tar.gz`), read in memory with
  `tarfile`, no extraction;
- the extracted folder `root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`
  (resp. `root/cifar-100-python/{train, test, meta}`);
- `root` pointing at that extracted folder itself, or at the .tar.gz file.

Each batch is a pickle of a dict: b"data" a (N, 3072) uint8 array whose rows are 1024 red,
then 1024 green, then 1024 blue values (row-major 32x32), so `data.reshape(N, 3, 32, 32)` is
already (N, C, H, W); labels are b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100).

Security: pickles can run code. They are read with `RestrictedUnpickler`, which builds
only dicts, lists, bytes, numbers and numpy arrays, and refuses every other global.

Example (with the archive in ./data):
    >>> from ntksap import data
    >>> ds = data.create("cifar10", root="data", split="test")  # doctest: +SKIP
    >>> len(ds), ds.images.shape                                  # doctest: +SKIP
    (10000, torch.Size([10000, 3, 32, 32]))
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntksap.data.base import (
    DatasetError,
    DatasetInfo,
    Split,
    TensorImageDataset,
    normalize_split,
    register_dataset,
    resolve_root,
)

# --- restricted unpickling ------------------------------------------------------------------

# numpy's array rebuilder, taken from a live array so that numpy 2 does not warn about the
# deprecated `numpy.core` module name that the official (numpy 1, Python 2) files use.
_reconstruct = np.empty(0).__reduce__()[0]

#: The only globals a CIFAR pickle may name: what a numpy ndarray pickles into.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1 name (official files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2 name
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global outside `ALLOWED_GLOBALS` (e.g. os.system)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only numpy's ndarray globals and refuses everything else.

    Example:
        >>> evil = io.BytesIO(b"cos\\nsystem\\n(S'true'\\ntR.")  # calls os.system("true")
        >>> RestrictedUnpickler(evil).load()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ntksap.data.cifar.RefusedGlobalError: refused to unpickle the global os.system ...
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            raise RefusedGlobalError(
                f"refused to unpickle the global {module}.{name} (a CIFAR batch holds only "
                f"dicts, lists, bytes, numbers and numpy arrays; allowed globals: {allowed})"
            ) from None


def restricted_loads(payload: bytes, where: str) -> Any:
    """Unpickle `payload` (read from `where`) with `RestrictedUnpickler`, encoding="bytes"."""
    try:
        return RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except RefusedGlobalError as err:
        raise DatasetError(
            f"{where}: {err}; the file is not a CIFAR batch and may be malicious"
        ) from None
    except Exception as err:  # truncated or garbage pickles raise many types
        raise DatasetError(
            f"{where}: not a readable CIFAR pickle ({type(err).__name__}: {err}); the file is "
            "corrupt or truncated: replace it with the one from the official archive"
        ) from None


# --- the two data sets ----------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    archive: str  # the official archive's file name
    folder: str  # the folder the archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]  # reference code's values (0..1 units)
    std: tuple[float, float, float]

    def layout(self, root: Path) -> str:
        files = ", ".join([*self._short(self.train_files), *self.test_files, self.meta_file])
        return (
            f"expected {root / self.archive} (the official archive), or the extracted folder "
            f"{root / self.folder}/{{{files}}}; root may also be that folder itself"
        )

    @staticmethod
    def _short(names: tuple[str, ...]) -> list[str]:
        if len(names) > 2 and names[0].endswith("_1"):
            return [f"{names[0]}..{names[-1].rsplit('_', 1)[1]}"]
        return list(names)


_SPECS = {
    "cifar10": _CifarSpec(
        name="cifar10",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=(0.491, 0.482, 0.447),
        std=(0.247, 0.243, 0.262),
    ),
    "cifar100": _CifarSpec(
        name="cifar100",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=(0.507, 0.487, 0.441),
        std=(0.267, 0.256, 0.276),
    ),
}


def _get(d: dict, key: str, where: str) -> Any:
    """d[b"key"] (the official files, encoding="bytes"), or d["key"] (a Python 3 re-pickle)."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(f"{where}: the pickled dict has no {key!r} entry; keys: {list(d)!r}")


def _read_archive(
    archive: Path, names: list[str], spec: _CifarSpec, root: Path
) -> dict[str, bytes]:
    """Read the members `folder/name` for `names` (+ the meta file, if there) in one pass."""
    wanted = {f"{spec.folder}/{n}": n for n in [*names, spec.meta_file]}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                key = wanted.get(member.name.removeprefix("./"))
                if key is None or not member.isfile():
                    continue
                f = tar.extractfile(member)
                assert f is not None
                out[key] = f.read()
                if len(out) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DatasetError(
            f"{spec.name}: cannot read the archive {archive} ({type(err).__name__}: {err}); it "
            f"is truncated or corrupt. {spec.layout(root)}"
        ) from None
    missing = [m for m, n in wanted.items() if n not in out and n != spec.meta_file]
    if missing:
        raise DatasetError(
            f"{spec.name}: the archive {archive} lacks {', '.join(missing)}; {spec.layout(root)}"
        )
    return out


def _locate(spec: _CifarSpec, root: Path, files: list[str]) -> tuple[str, Path]:
    """('folder', path) or ('archive', path) holding `files`, else FileNotFoundError.

    A folder qualifies when it holds every batch file of the split; a folder holding only
    some of them is reported as such (unless the archive is there to fall back on).
    """
    folders = [root / spec.folder, root]
    archives = [root / spec.archive, root]
    partial = None
    for p in folders:
        present = [(p / f).is_file() for f in files]
        if all(present):
            return "folder", p
        if any(present) or (p / spec.meta_file).is_file():
            partial = partial or p / files[present.index(False)]
    for p in archives:
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
            return "archive", p
    if partial is not None:
        raise FileNotFoundError(f"{spec.name}: missing {partial}; {spec.layout(root)}")
    looked = ", ".join(str(p) for p in [folders[0] / files[0], root / files[0], archives[0]])
    raise FileNotFoundError(
        f"{spec.name}: no data set found under {root} (looked for {looked}); "
        f"{spec.layout(root)}. Nothing is downloaded: copy the archive there."
    )


def load_cifar(spec: _CifarSpec, root: Path, split: Split) -> TensorImageDataset:
    """Read one split of CIFAR-10/100 from `root` (see the module docstring for layouts)."""
    files = list(spec.train_files if split == "train" else spec.test_files)
    kind, where = _locate(spec, root, files)
    if kind == "folder":
        raw = {n: (where / n).read_bytes() for n in files}
        meta_path = where / spec.meta_file
        if meta_path.is_file():
            raw[spec.meta_file] = meta_path.read_bytes()
        base = str(where)
    else:
        raw = _read_archive(where, files, spec, root)
        base = f"{where}:{spec.folder}"

    images, labels = [], []
    for n in files:
        src = f"{base}/{n}"
        batch = restricted_loads(raw[n], src)
        if not isinstance(batch, dict):
            raise DatasetError(f"{src}: expected a pickled dict, got {type(batch).__name__}")
        data = _get(batch, "data", src)
        y = np.asarray(_get(batch, spec.label_key, src))
        if not (
            isinstance(data, np.ndarray)
            and data.dtype == np.uint8
            and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32
        ):
            raise DatasetError(
                f"{src}: 'data' must be a (N, 3072) uint8 array, got "
                f"{getattr(data, 'shape', None)} {getattr(data, 'dtype', type(data).__name__)}"
            )
        if y.shape != (len(data),) or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(
                f"{src}: {len(data)} images but labels of shape {y.shape}, {y.dtype}"
            )
        # Rows are 1024 R, 1024 G, 1024 B, each row-major 32x32: already (C, H, W) order.
        images.append(torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32)))
        labels.append(torch.from_numpy(y.astype(np.int64)))

    classes = None
    if spec.meta_file in raw:
        src = f"{base}/{spec.meta_file}"
        names = _get(restricted_loads(raw[spec.meta_file], src), spec.names_key, src)
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        if len(classes) != spec.num_classes:
            raise DatasetError(f"{src}: {len(classes)} class names, expected {spec.num_classes}")

    info = DatasetInfo(
        name=spec.name,
        num_classes=spec.num_classes,
        input_shape=(3, 32, 32),
        mean=spec.mean,
        std=spec.std,
        kind="tensor",
        crop_padding=4,
        augment_train=True,
    )
    try:
        return TensorImageDataset(torch.cat(images), torch.cat(labels), info, split, classes)
    except DatasetError as err:
        raise DatasetError(f"{base}: {err}") from None


def _factory(name: str):
    spec = _SPECS[name]

    def factory(root: str | os.PathLike | None = None, split: str = "train") -> TensorImageDataset:
        split_ = normalize_split(split, name, allow_val=False)
        return load_cifar(spec, resolve_root(root).absolute(), split_)

    factory.__name__ = name
    factory.__doc__ = f"{name}: 32x32 RGB, {spec.num_classes} classes, from {spec.archive}."
    return factory


cifar10 = register_dataset("cifar10")(_factory("cifar10"))
cifar100 = register_dataset("cifar100")(_factory("cifar100"))
