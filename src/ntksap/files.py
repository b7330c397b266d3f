"""The one atomic-write helper, and small JSON files.

Every file ntksap writes goes to a temporary file in the same folder (`.NAME.tmp<pid>`),
then `os.replace`s the target, so a crash mid-write never leaves a half-written file and the
previous version survives. A killed writer leaves only its temporary file behind, which
`remove_stale_temporaries` deletes (run folders call it when they are claimed). A full disk
is reported as `DiskFullError` ("no space left on device ... writing PATH"), whatever layer
noticed it (torch.save reports it as a RuntimeError from its C++ writer).

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
    >>> _ = write_json(p, {"top1": 91.4})
    >>> read_json(p)["top1"]
    91.4
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ntksap.validate import all_finite

_TEMP = re.compile(r"^\..+\.tmp\d+$")


class DiskFullError(OSError):
    """No space left on the device while writing a file (the previous version is intact)."""


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` writes `path` first: `.NAME.tmp<pid>` in the same folder."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _looks_like_disk_full(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    if "no space left" in text or "file write failed" in text or "disk quota" in text:
        return True
    try:  # a writer that hides errno (torch's C++ stream writer): look at the disk itself
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to fill a temporary file, then atomically move it to `path`.

    Raises:
        DiskFullError: the disk filled up (`path`, if it existed, is unchanged).
        PermissionError: the folder is not writable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        if not isinstance(exc, PermissionError) and _looks_like_disk_full(exc, path.parent):
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on device while writing {path} (nothing was changed there; "
                "free some space and run again, or pass --resume to continue a run)",
            ) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` atomically."""
    return atomic_write(path, lambda t: t.write_text(text))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically. NaN/inf anywhere is a ValueError (not JSON)."""
    all_finite(Path(path).name, obj)
    text = json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n"
    return write_text(path, text)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a clear ValueError naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in `folder`; returns them.

    Only call it while holding the folder (e.g. a claimed run folder): a live writer's
    temporary file looks the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.is_file() and _TEMP.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create `folder` if needed and prove it is writable (before any long work).

    Raises PermissionError / OSError naming the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".ntksap-write-test.tmp{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise NotADirectoryError(f"{folder} exists and is not a folder") from None
    except PermissionError:
        raise PermissionError(f"cannot write to {folder}: permission denied") from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write to {folder}: {exc.strerror or exc}") from None
    return folder
