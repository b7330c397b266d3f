"""Build and lazy loading of the C++ sparse kernels (`csrc/sparse_kernels.cpp`).

The extension is compiled with `torch.utils.cpp_extension.load` (ninja, -O3 -march=native,
OpenMP through torch's `at::parallel_for`) into a cache folder keyed by the source, the
torch version, the Python version and the CPU model: `-march=native` code only runs on the
CPU it was built for, so a home folder shared between machines gets one build per CPU.

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
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["available", "build", "disabled", "extension", "source_path"]

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


def build_dir() -> Path:
    """The cache folder of this source / torch / Python / CPU combination."""
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                source_path().read_text(),
                torch.__version__,
                sys.version,
                _cpu_model(),
                " ".join(FLAGS),
            )
        )
    ).hexdigest()[:16]
    root = os.environ.get("NTKSAP_EXTENSION_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = str(Path(cache) / "ntksap" / "extensions")
    return Path(root) / f"sparse-{key}"


def build(verbose: bool = False) -> ModuleType:
    """Compile (if needed) and import the extension; raises on any build error."""
    from torch.utils import cpp_extension

    folder = build_dir()
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
