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
only dicts, lists, bytes, numbers and numpy arrays and scalars of numeric dtypes (as numpy
1.x and 2.x write them with pickle protocols 2 to 5), and refuses every other global and
every object, structured or forged dtype.

Example (with the archive in ./data):
    >>> from ntksap import data
    >>> ds = data.create("cifar10", root="data", split="test")  # doctest: +SKIP
    >>> len(ds), ds.images.shape                                  # doctest: +SKIP
    (10000, torch.Size([10000, 3, 32, 32]))
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
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

#: numpy dtype kinds a CIFAR pickle may hold: bool, signed and unsigned integers, floats,
#: complex. Object ("O") dtypes are refused because an object array's pickle carries other
#: objects; structured/void, string and datetime dtypes never occur in a batch.
NUMERIC_KINDS = frozenset("biufc")

# How numpy names those dtypes in a pickle: np.dtype("u1", False, True), "i8", "f4", "b1",
# "c16", ... Anything else ("O8", "V8", "<U3", "M8") is refused before numpy parses it.
_DTYPE_CODE = re.compile(r"[biufc][0-9]{1,2}")

_MAX_DIMS = 64  # numpy 2's NPY_MAXDIMS

#: The only globals a CIFAR pickle may name, and the `RestrictedUnpickler` attribute each
#: resolves to: what numpy 1.x and 2.x write for numeric ndarrays and scalars with pickle
#: protocols 0-5, plus what Python 3 writes for bytes with protocol 2. Every one is a pure
#: data constructor that checks its arguments; none is the real global itself.
ALLOWED_GLOBALS: dict[tuple[str, str], str] = {
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",  # numpy 1 (official files)
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",  # numpy 2
    ("numpy", "ndarray"): "_ndarray",  # only as _reconstruct's argument
    ("numpy", "dtype"): "_dtype",
    ("numpy.core.multiarray", "scalar"): "_scalar",  # numpy scalars, e.g. np.int64 labels
    ("numpy._core.multiarray", "scalar"): "_scalar",
    ("numpy.core.numeric", "_frombuffer"): "_frombuffer",  # arrays with protocol 5
    ("numpy._core.numeric", "_frombuffer"): "_frombuffer",
    ("_codecs", "encode"): "_encode",  # non-empty bytes with protocol 2 (Python 3)
    ("__builtin__", "bytes"): "_bytes",  # empty bytes with protocol 2 (Python 3)
    ("builtins", "bytes"): "_bytes",
}


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global outside `ALLOWED_GLOBALS` (e.g. os.system), or gave an
    allowed one anything but plain numeric data (an object dtype, a forged dtype state)."""


class _NdarrayToken:
    """What `numpy.ndarray` resolves to: accepted as `_reconstruct`'s first argument, but
    not callable, since `ndarray(shape, dtype, buffer)` would build from any dtype."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RefusedGlobalError(
            "refused to call numpy.ndarray directly (a pickled array names it only as the "
            "argument of numpy's _reconstruct)"
        )

    def __repr__(self) -> str:
        return "numpy.ndarray"


def _clean_dtype(dt: Any) -> np.dtype:
    """A fresh dtype equal to `dt`, which must be a plain numeric one.

    Rebuilt from its type string, so whatever flags a pickled dtype state carried are
    dropped: numpy trusts them (a "holds objects" flag on int64 data makes numpy treat
    the data as object pointers).
    """
    if not (
        isinstance(dt, np.dtype)
        and dt.kind in NUMERIC_KINDS
        and dt.fields is None
        and dt.subdtype is None
        and not dt.hasobject
        and dt.metadata is None
    ):
        raise RefusedGlobalError(
            f"refused the numpy dtype {dt!r}: a CIFAR batch holds only numeric arrays "
            "(bool, integer, float, complex)"
        )
    return np.dtype(dt.str)


def _shape(shape: Any) -> tuple[int, ...]:
    if not (
        isinstance(shape, tuple | list)
        and len(shape) <= _MAX_DIMS
        and all(type(n) is int and n >= 0 for n in shape)
    ):
        raise RefusedGlobalError(f"refused the array shape {shape!r}: not a tuple of sizes")
    return tuple(shape)


def _raw_bytes(raw: Any, nbytes: int, what: str) -> bytes | bytearray:
    """`raw` as bytes of length `nbytes`; a str is a Python 2 string read with latin-1."""
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if not isinstance(raw, bytes | bytearray):
        raise RefusedGlobalError(
            f"refused {what} built from a {type(raw).__name__}: numeric data comes as bytes"
        )
    if len(raw) != nbytes:
        raise pickle.UnpicklingError(f"{what}: {len(raw)} bytes of data where {nbytes} belong")
    return raw


# The pure-Python Unpickler (pickle._Unpickler, stable since Python 3.0) because only its
# opcode table can be changed: BUILD must be checked, since a numpy dtype's __setstate__
# trusts its state (flags, fields) and the C Unpickler calls it unchecked.
class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """An Unpickler that builds only plain data: dicts, lists, tuples, str, bytes, numbers,
    and numpy arrays and scalars of numeric dtypes. Every other global is refused, and so
    is every numpy dtype but bool / int / uint / float / complex (no object arrays).

    Example:
        >>> evil = io.BytesIO(b"cos\\nsystem\\n(S'true'\\ntR.")  # calls os.system("true")
        >>> RestrictedUnpickler(evil).load()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ntksap.data.cifar.RefusedGlobalError: refused to unpickle the global os.system ...
        >>> RestrictedUnpickler(io.BytesIO(pickle.dumps([np.int64(3)], protocol=5))).load()
        [np.int64(3)]
    """

    dispatch = pickle._Unpickler.dispatch.copy()  # type: ignore[attr-defined]
    _ndarray = _NdarrayToken()

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        # Arrays and dtypes made here that a BUILD opcode may still complete, by id (the
        # dict keeps them alive, so an id cannot be reused by another object meanwhile).
        self._pending: dict[int, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        attr = ALLOWED_GLOBALS.get((module, name))
        if attr is None:
            allowed = ", ".join(sorted({f"{m}.{n}" for m, n in ALLOWED_GLOBALS}))
            raise RefusedGlobalError(
                f"refused to unpickle the global {module}.{name} (a CIFAR batch holds only "
                f"dicts, lists, bytes, numbers and numpy arrays; allowed globals: {allowed})"
            )
        return getattr(self, attr)

    # -- the allowed globals -----------------------------------------------------------------

    def _dtype(self, code: Any, align: Any = False, copy: Any = False) -> np.dtype:
        """numpy.dtype(code, align, copy), for numeric type codes only ("u1", "i8", ...)."""
        text = code.decode("ascii", "replace") if isinstance(code, bytes) else code
        if not (isinstance(text, str) and _DTYPE_CODE.fullmatch(text)) or align:
            raise RefusedGlobalError(
                f"refused numpy.dtype({code!r}): a CIFAR batch holds only numeric arrays "
                "(bool, integer, float, complex)"
            )
        # Always a copy: the BUILD that follows sets its byte order, and must not change
        # numpy's shared singleton for the type.
        dt = np.dtype(text, copy=True)
        self._pending[id(dt)] = dt
        return dt

    def _reconstruct(self, subtype: Any, shape: Any = None, typecode: Any = None) -> np.ndarray:
        """numpy's `_reconstruct(ndarray, (0,), b"b")`: an empty array that BUILD fills."""
        if subtype is not self._ndarray:
            raise RefusedGlobalError(
                f"refused numpy's _reconstruct of {subtype!r}: only numpy.ndarray is rebuilt"
            )
        arr = np.empty(0, dtype=np.int8)  # numpy's placeholder too; shape/typecode unused
        self._pending[id(arr)] = arr
        return arr

    def _scalar(self, dtype: Any, raw: Any = None) -> np.generic:
        """numpy's `scalar(dtype, raw)`: one value of a numeric dtype from its bytes."""
        dt = _clean_dtype(dtype)
        return np.frombuffer(_raw_bytes(raw, dt.itemsize, "a numpy scalar"), dtype=dt)[0]

    def _frombuffer(
        self, buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None
    ) -> np.ndarray:
        """numpy's protocol-5 `_frombuffer(buf, dtype, shape, order[, axis_order])`."""
        dt = _clean_dtype(dtype)
        shape = _shape(shape)
        raw = _raw_bytes(buf, math.prod(shape) * dt.itemsize, "a numpy array")
        arr = np.frombuffer(raw, dtype=dt)
        if not arr.flags.writeable:  # in-band read-only buffers arrive as bytes
            arr = arr.copy()
        if order == "K" and axis_order is not None:  # numpy 2: an axis-permuted layout
            axes = tuple(axis_order) if isinstance(axis_order, tuple | list) else None
            if axes is None or sorted(axes) != list(range(len(shape))):
                raise RefusedGlobalError(f"refused the axis order {axis_order!r}")
            return arr.reshape(shape, order="C").transpose(axes)
        if order not in ("C", "F"):
            raise RefusedGlobalError(f"refused the array order {order!r}")
        return arr.reshape(shape, order=order)

    def _encode(self, text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
        """`_codecs.encode(text, "latin1")`: how Python 3 writes bytes with protocol 2."""
        if not (isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict"):
            raise RefusedGlobalError(
                f"refused _codecs.encode with encoding {encoding!r}: protocol 2 bytes use latin1"
            )
        return text.encode("latin-1")

    def _bytes(self, *args: Any) -> bytes:
        """`bytes()`: how Python 3 writes b"" with protocol 2."""
        if args:
            raise RefusedGlobalError("refused bytes(...) with arguments")
        return b""

    # -- opcodes -----------------------------------------------------------------------------

    def load_build(self) -> None:
        """BUILD, only to complete an array or dtype made above, with a checked state."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if self._pending.pop(id(inst), None) is not inst:
            raise RefusedGlobalError(
                f"refused to set the state of a {type(inst).__name__} (only numpy arrays "
                "and dtypes take a state in a CIFAR batch)"
            )
        if isinstance(inst, np.dtype):
            self._set_dtype_state(inst, state)
        else:
            self._set_array_state(inst, state)

    dispatch[pickle.BUILD[0]] = load_build

    def load_newobj(self) -> None:
        raise RefusedGlobalError("refused to create a class instance (NEWOBJ)")

    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj

    @staticmethod
    def _set_dtype_state(dt: np.dtype, state: Any) -> None:
        """Accept only the state numpy writes for a plain numeric dtype, e.g.
        (3, "<", None, None, None, -1, -1, 0): a byte order and nothing else."""
        order = state[1] if isinstance(state, tuple) and len(state) == 8 else None
        order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        flags = np.dtype(dt.str).flags
        orders = ("|",) if dt.itemsize == 1 else ("<", ">", "=")
        if (
            order not in orders
            or state[0] != 3
            or state[2:] != (None, None, None, -1, -1, flags)
            or type(state[7]) is not int
        ):
            raise RefusedGlobalError(
                f"refused the numpy dtype state {state!r} for {dt}: only a byte order may be "
                "set on a numeric dtype (no fields, sizes or flags)"
            )
        dt.__setstate__((3, order, None, None, None, -1, -1, flags))

    @staticmethod
    def _set_array_state(arr: np.ndarray, state: Any) -> None:
        """ndarray.__setstate__((1, shape, dtype, is_fortran, raw bytes)), checked."""
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise RefusedGlobalError(f"refused the numpy array state of type {type(state)}")
        shape, dtype, fortran, raw = state
        dt = _clean_dtype(dtype)
        shape = _shape(shape)
        if fortran not in (True, False):
            raise RefusedGlobalError(f"refused the array order flag {fortran!r}")
        raw = _raw_bytes(raw, math.prod(shape) * dt.itemsize, "a numpy array")
        # numpy copies the bytes into a writable array of its own (it takes bytes only)
        np.ndarray.__setstate__(arr, (1, shape, dt, bool(fortran), bytes(raw)))


def restricted_loads(payload: bytes, where: str) -> Any:
    """Unpickle `payload` (read from `where`) with `RestrictedUnpickler`, encoding="bytes".

    Example:
        >>> restricted_loads(pickle.dumps({b"labels": np.arange(3)}, protocol=2), "x")
        {b'labels': array([0, 1, 2])}
    """
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


def _labels(raw: Any, n: int, src: str) -> torch.Tensor:
    """A batch's labels as an (n,) int64 tensor: a list or tuple of Python or numpy integers
    (the official files: a list of int), or an integer numpy array.

    Example:
        >>> _labels([np.int64(2), 7, np.uint8(1)], 3, "x")
        tensor([2, 7, 1])
    """
    if isinstance(raw, list | tuple):
        # Element by element: np.asarray would turn a mix of int64 and uint64 into float64.
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in raw):
            kinds = sorted({type(v).__name__ for v in raw})
            raise DatasetError(f"{src}: labels must be integers, got {', '.join(kinds)}")
        try:
            y = np.array([int(v) for v in raw], dtype=np.int64)
        except OverflowError:
            raise DatasetError(f"{src}: a label does not fit in int64") from None
    elif isinstance(raw, np.ndarray) and np.issubdtype(raw.dtype, np.integer):
        y = raw.astype(np.int64)  # a copy, so the tensor owns writable memory
    else:
        what = f"{raw.dtype} array" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise DatasetError(f"{src}: labels must be a list or an integer array, got a {what}")
    if y.shape != (n,):
        raise DatasetError(f"{src}: {n} images but labels of shape {y.shape}, {y.dtype}")
    return torch.from_numpy(y)


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
        y = _labels(_get(batch, spec.label_key, src), len(data), src)
        # Rows are 1024 R, 1024 G, 1024 B, each row-major 32x32: already (C, H, W) order.
        images.append(torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32)))
        labels.append(y)

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
