"""The one atomic-write helper, and small JSON files.

Every file ntksap writes goes to a temporary file in the same folder (`.NAME.tmp<pid>`),
then `os.replace`s the target, so a crash mid-write never leaves a half-written file and the
previous version survives. A killed writer leaves only its temporary file behind, which
`remove_stale_temporaries` deletes (run folders call it when they are claimed). A full disk
is reported as `DiskFullError` ("no space left on device while writing PATH"): content is
serialised in memory and written by Python, so the error always carries its errno (torch's
own C++ writer would report it as an unrelated-looking RuntimeError).

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
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from ntksap.validate import all_finite

_TEMP = re.compile(r"^\..+\.tmp\d+$")


class DiskFullError(OSError):
    """No space left on the device while writing a file (the previous version is intact)."""


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` writes `path` first: `.NAME.tmp<pid>` in the same folder."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def check_new_file(
    path: str | os.PathLike[str], overwrite: bool, label: str, how_to_replace: str
) -> Path:
    """Raise before any work unless a file may be written at `path`: not a folder, and not
    an existing file unless `overwrite`. `label` names the path in the message ("--out",
    "output"), `how_to_replace` says how to allow replacing it.

    Example:
        >>> str(check_new_file("no/such/m.onnx", False, "output", "pass --force"))
        'no/such/m.onnx'

    Raises:
        ValueError: `path` is a folder.
        FileExistsError: `path` exists and not `overwrite`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{label} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{label} {path} already exists; {how_to_replace}, or choose another name "
            "(nothing was changed)"
        )
    return path


def atomic_write(path: str | os.PathLike[str], content: bytes | str) -> Path:
    """Write `content` to a temporary file, flush it to the disk, then move it to `path`.

    Callers serialise in memory first (torch.save / safetensors / savefig into bytes), so
    the only disk writes are Python's, whose errors carry errno: a full disk is always
    recognised, whatever library produced the bytes.

    Raises:
        DiskFullError: the disk filled up (`path`, if it existed, is unchanged).
        PermissionError: the folder is not writable.
    """
    path = Path(path)
    data = content.encode() if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on device while writing {path} ({len(data):,} bytes; nothing "
                "was changed there): free some space and run again (--resume continues a run)",
            ) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def torch_bytes(obj: Any) -> bytes:
    """`torch.save(obj)` into memory (for `atomic_write`)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` atomically."""
    return atomic_write(path, text)


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
