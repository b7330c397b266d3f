"""Build and lazy loading of the C++ sparse kernels (`csrc/sparse_kernels.cpp`).

The extension is compiled with `torch.utils.cpp_extension.load` (ninja, -O3 -march=native,
OpenMP through torch's `at::parallel_for`) into a cache folder keyed by everything the build
depends on: the source, the torch installation (version and folder: its headers and libraries
are in the compile and link commands, so two environments with the same torch version are two
builds, not one rebuilt alternately), the Python version and include folder, the compiler (its
`--version`), the flags and the CPU model (`-march=native` code only runs on the CPU it was
built for, so a home folder shared between machines gets one build per CPU). One build at a
time per folder: an exclusive file lock (`sparse-<key>.lock` beside the folder) is held while
compiling, so a second process waits for the first and then loads its result.

Folder: `$NTKSAP_EXTENSION_DIR` if set, else `$XDG_CACHE_HOME/ntksap/extensions` (default
`~/.cache/ntksap/extensions`). Set `NTKSAP_SPARSE_EXTENSION=0` to never build or load it
(the pure-torch fallback is used); `make` builds it ahead of time
(`python -m ntksap.sparse.build`), otherwise the first use builds it (about a minute).

Example:
    >>> from ntksap.sparse import _ext
    >>> isinstance(_ext.source_path().name, str)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "available",
    "build",
    "build_dir",
    "build_key",
    "build_lock",
    "disabled",
    "extension",
    "source_path",
]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "module": ModuleType | None, "error": str
_FORCED_OFF = threading.local()
FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-ffast-math",
    "-fno-finite-math-only",
    # keep short row loops inline: GCC turns them into memset / memcpy calls otherwise,
    # whose call overhead dominated the 8x8 layers
    "-fno-tree-loop-distribute-patterns",
]


def source_path() -> Path:
    """The C++ source shipped with the package."""
    return Path(__file__).with_name("csrc") / "sparse_kernels.cpp"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    """The C++ compiler torch will call (`$CXX`, else `c++`) and the first line of its
    `--version`: a compiler upgrade is a new build."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{cxx}: {out.splitlines()[0] if out.strip() else 'not found'}"


def build_key() -> str:
    """The 16-hex-digit key of this build: source, torch installation, Python, compiler,
    flags and CPU (see the module doc).

    Example:
        >>> len(build_key())
        16
    """
    parts = (
        source_path().read_text(),
        torch.__version__,
        str(Path(torch.__file__).resolve().parent),  # which installation: headers, libraries
        sys.version,
        sysconfig.get_paths().get("include", ""),
        _compiler(),
        " ".join(FLAGS),
        _cpu_model(),
    )
    return hashlib.sha256(b"\0".join(s.encode() for s in parts)).hexdigest()[:16]


def build_dir() -> Path:
    """The cache folder of this build (see `build_key`)."""
    root = os.environ.get("NTKSAP_EXTENSION_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = str(Path(cache) / "ntksap" / "extensions")
    return Path(root) / f"sparse-{build_key()}"


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder`'s build (`<folder>.lock`, released when the process
    ends, even by a kill). Inside it no other process is building into `folder`, so a
    `lock` file that torch's own build baton left there is stale (a build killed half-way)
    and is removed: torch would otherwise wait for it forever."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: torch's baton alone serialises builds
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            with contextlib.suppress(FileNotFoundError):
                (folder / "lock").unlink()
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build(verbose: bool = False) -> ModuleType:
    """Compile (if needed) and import the extension; raises on any build error."""
    from torch.utils import cpp_extension

    folder = build_dir()
    with build_lock(folder):
        folder.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(
            name="ntksap_sparse_kernels",
            sources=[str(source_path())],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=verbose,
        )


def _env_disabled() -> bool:
    return os.environ.get("NTKSAP_SPARSE_EXTENSION", "1").strip().lower() in ("0", "false", "no")


def extension() -> ModuleType | None:
    """The loaded extension, building it on first use; None (with one warning) if it cannot
    be built, or when disabled by `NTKSAP_SPARSE_EXTENSION=0` or `disabled()`."""
    if getattr(_FORCED_OFF, "on", False) or _env_disabled():
        return None
    if "module" in _STATE:  # fast path: every layer call asks
        return _STATE["module"]  # type: ignore[return-value]
    with _LOCK:
        if "module" not in _STATE:
            try:
                _STATE["module"] = build()
            except Exception as exc:  # no compiler, no ninja, no headers, ...
                _STATE["module"] = None
                _STATE["error"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    "ntksap.sparse: the C++ sparse kernels could not be built "
                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                    "using the pure-torch fallback (correct, not faster than dense)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _STATE["module"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the C++ kernels are in use (building them if needed)."""
    return extension() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the pure-torch fallback inside the block (this thread), e.g. to test it.

    Example:
        >>> with disabled():
        ...     available()
        False
    """
    before = getattr(_FORCED_OFF, "on", False)
    _FORCED_OFF.on = True
    try:
        yield
    finally:
        _FORCED_OFF.on = before
