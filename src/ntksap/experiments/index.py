"""The results index of a sweep folder: one SQLite row per run, rebuilt from the run folders.

The run folders are the truth; `index.sqlite` (stdlib sqlite3, write-ahead log) is a
queryable copy of what they say: config hash, method, density, seed, the sweep's axes, status,
error, times and results (with the effective sparsity: weights on no input-to-output path
count as pruned; an index written before that column existed gains it on the next sync, its
rows' values when they are re-read or rebuilt). It is refreshed from the folders
(`Index.sync`) by the process that drives a sweep on one machine and by `ntksap report`, and
can be deleted and rebuilt at any time (`Index.rebuild`, `ntksap report --rebuild`). Shard
processes and cluster jobs never write it: they write only their own run folders (SQLite over
a network file system is not safe with several writers), and the next sync merges them.

Being a cache, it never stops the work: a corrupt index (not a database, truncated,
malformed) is moved aside (`index.sqlite.corrupt-<time>`, never deleted) and rebuilt from the
folders with a one-line note; one that cannot be used now (locked by another connection past
`BUSY_TIMEOUT_S`, unreadable) raises `IndexUnavailable`, and callers read the folders instead
(`Index.records` does so itself).

Example:
    >>> idx = Index("sweeps/m5k")  # doctest: +SKIP
    >>> idx.sync()  # doctest: +SKIP
    18
    >>> [r["status"] for r in idx.rows()][:2]  # doctest: +SKIP
    ['finished', 'finished']
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ntksap.experiments.records import (
    NOT_HASHED,
    RUNS_DIR,
    SWEEP_FILE,
    Record,
    config_hash,
    find_run_folders,
    read_record,
    run_identity,
)
from ntksap.files import read_json
from ntksap.runs import CONFIG_FILE, IDENTITY_FILE, METRICS_FILE, RESULT_FILE

INDEX_FILE = "index.sqlite"
SCHEMA_VERSION = 1
#: Seconds to wait for another connection's lock before giving up on the index for now.
BUSY_TIMEOUT_S = 10.0

_T = TypeVar("_T")


class IndexUnavailable(sqlite3.OperationalError):
    """The index cannot be used now (locked by another connection, or unreadable); the run
    folders are the results, so callers read them instead. A sqlite3 error, so code that
    already falls back on sqlite3.Error copes."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _unusable(exc: sqlite3.Error) -> bool:
    """Whether an error says the index is out of reach now (not that its bytes are bad)."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in text for word in ("locked", "busy", "unable to open", "readonly", "disk i/o")
    )


_COLUMNS = {
    "name": "TEXT PRIMARY KEY",
    "folder": "TEXT NOT NULL",
    "hash": "TEXT",
    "method": "TEXT",
    "density": "REAL",
    "sparsity": "REAL",
    "seed": "INTEGER",
    "axes": "TEXT",  # JSON object: the sweep's axis values of this run
    "status": "TEXT NOT NULL",
    "error": "TEXT",
    "started": "REAL",  # unix time config.json was written
    "ended": "REAL",  # unix time result.json was written
    "prune_seconds": "REAL",
    "train_seconds": "REAL",
    "epochs_done": "INTEGER",
    "final_top1": "REAL",
    "best_top1": "REAL",
    "measured_density": "REAL",
    "effective_sparsity": "REAL",  # 1 - density of the weights on an input-output path
    "config": "TEXT",  # JSON
    "result": "TEXT",  # JSON or NULL
    "signature": "TEXT",  # file mtimes and sizes when read: unchanged -> not re-read
    "indexed": "REAL",
}


def _signature(folder: Path) -> str:
    parts = []
    for name in (CONFIG_FILE, RESULT_FILE, METRICS_FILE, IDENTITY_FILE):
        try:
            st = (folder / name).stat()
            parts.append(f"{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append("-")
    return "|".join(parts)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def axis_keys(sweep_dir: Path) -> list[str]:
    """The axis names recorded in the sweep folder's sweep.json ([] when there is none)."""
    try:
        spec = read_json(sweep_dir / SWEEP_FILE)
    except (OSError, ValueError):
        return []
    return list(spec.get("axis_paths", {}).values()) if isinstance(spec, dict) else []


def _dig(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def row_of(rec: Record, axis_paths: Iterable[str] = ()) -> dict[str, Any]:
    """The index row of one run record (`axis_paths`: dotted config keys of the sweep's axes)."""
    res = rec.result or {}
    return {
        "name": rec.name,
        "folder": str(rec.folder),
        "hash": config_hash(rec.config) if rec.config else None,
        "method": rec.method if rec.config else None,
        "density": rec.density if rec.config else None,
        "sparsity": rec.sparsity if rec.config else None,
        "seed": rec.seed if rec.config else None,
        "axes": json.dumps({p: _dig(rec.config, p) for p in axis_paths}, default=str),
        "status": rec.status,
        "error": res.get("error"),
        "started": _mtime(rec.folder / CONFIG_FILE),
        "ended": _mtime(rec.folder / RESULT_FILE) if rec.result is not None else None,
        "prune_seconds": res.get("prune_seconds"),
        "train_seconds": res.get("train_seconds"),
        "epochs_done": res.get("epochs_done"),
        "final_top1": res.get("final_top1"),
        "best_top1": res.get("best_top1"),
        "measured_density": res.get("density"),
        "effective_sparsity": rec.effective_sparsity if rec.config else None,
        "config": json.dumps(rec.config, sort_keys=True),
        "result": json.dumps(rec.result, sort_keys=True) if rec.result is not None else None,
        "signature": _signature(rec.folder),
        "indexed": time.time(),
    }


class Index:
    """The SQLite index of one sweep folder (created on first use).

    Concurrent readers and writers on one machine are fine (WAL; a lock held longer than
    `BUSY_TIMEOUT_S` makes the index unavailable for that call, not the work fail).
    `note` receives the one-line notes (a corrupt index moved aside; default: stderr).
    """

    def __init__(
        self, sweep_dir: str | os.PathLike[str], *, note: Callable[[str], None] = _stderr
    ) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.path = self.sweep_dir / INDEX_FILE
        self.note = note

    def _guard(self, work: Callable[[], _T]) -> _T:
        """`work()` (one or more transactions); a corrupt index is moved aside and `work`
        runs again on a fresh one, rebuilt first from every folder; an index out of reach
        raises `IndexUnavailable` naming it and the way out."""
        try:
            return work()
        except IndexUnavailable:
            raise
        except sqlite3.Error as exc:
            if _unusable(exc):
                raise IndexUnavailable(
                    f"the index {self.path} cannot be used now ({exc}); the run folders are "
                    "the results (`ntksap report --rebuild` rebuilds it later)"
                ) from None
            moved = self._move_aside()
            self.note(
                f"note: the index {self.path} was corrupt ({exc}): moved to {moved.name}, "
                "rebuilding it from the run folders"
            )
        try:
            self._sync()
            return work()
        except IndexUnavailable:
            raise
        except sqlite3.Error as exc:  # the fresh one failed too: leave it to the folders
            raise IndexUnavailable(f"the index {self.path} cannot be rebuilt ({exc})") from None

    def _move_aside(self) -> Path:
        """Rename the index (and its -wal/-shm) to index.sqlite.corrupt-<time>[-wal|-shm]."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{INDEX_FILE}.corrupt-{stamp}")
        k = 1
        while target.exists():
            k += 1
            target = self.path.with_name(f"{INDEX_FILE}.corrupt-{stamp}.{k}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                try:
                    src.rename(Path(str(target) + suffix))
                except OSError as exc:
                    raise IndexUnavailable(
                        f"the index {self.path} is corrupt and cannot be moved aside ({exc})"
                    ) from None
        return target

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():  # sqlite3 would say only "unable to open database file"
            raise IndexUnavailable(
                f"the index {self.path} cannot be used now (it is a folder, not a file); the "
                "run folders are the results"
            )
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            cols = ", ".join(f"{k} {t}" for k, t in _COLUMNS.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            # an index made by an older version lacks the newer columns: add them, and
            # forget every row's signature so that the next sync re-reads every run folder
            # (the new columns would stay NULL otherwise)
            have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            added = [key for key in _COLUMNS if key not in have]
            for key in added:
                con.execute(f"ALTER TABLE runs ADD COLUMN {key} {_COLUMNS[key]}")
            if added:
                con.execute("UPDATE runs SET signature = NULL")
                con.commit()
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            with con:  # one transaction per `with` block of the caller
                yield con
        finally:
            con.close()

    def folders(self) -> list[Path]:
        """The run folders of this sweep (under runs/)."""
        runs_dir = self.sweep_dir / RUNS_DIR
        return find_run_folders([runs_dir]) if runs_dir.is_dir() else []

    def sync(self, folders: Iterable[str | os.PathLike[str]] | None = None) -> int:
        """Bring the rows of `folders` (default: every run folder of the sweep, and rows of
        folders that no longer exist are dropped) up to date; returns how many were re-read.

        Raises:
            IndexUnavailable: the index cannot be used now (see the module docstring).
        """
        chosen = None if folders is None else list(folders)
        return self._guard(lambda: self._sync(chosen))

    def _sync(self, folders: Iterable[str | os.PathLike[str]] | None = None) -> int:
        everything = folders is None
        paths = self.folders() if folders is None else [Path(f).resolve() for f in folders]
        axis_paths = axis_keys(self.sweep_dir)
        changed = 0
        with self.connect() as con:
            known = {
                r["folder"]: r["signature"]
                for r in con.execute("SELECT folder, signature FROM runs")
            }
            for folder in paths:
                if known.get(str(folder)) == _signature(folder) and folder.is_dir():
                    continue
                row = row_of(read_record(folder), axis_paths)
                keys = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                sql = f"INSERT OR REPLACE INTO runs ({keys}) VALUES ({marks})"
                con.execute(sql, tuple(row.values()))
                changed += 1
            if everything:
                present = {str(p) for p in paths}
                for gone in set(known) - present:
                    con.execute("DELETE FROM runs WHERE folder = ?", (gone,))
        return changed

    def rebuild(self) -> int:
        """Delete the index and build it again from the run folders; returns the row count.
        A corrupt index is moved aside (index.sqlite.corrupt-<time>), not deleted."""
        if self.path.is_file() and not self._healthy():
            moved = self._move_aside()
            self.note(f"note: the index {self.path} was corrupt: moved to {moved.name}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(self.path) + suffix).unlink()
        return self.sync()

    def _healthy(self) -> bool:
        """Whether the index file reads as a sound SQLite database (PRAGMA quick_check)."""
        try:
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
            try:
                return con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            finally:
                con.close()
        except sqlite3.Error as exc:
            return _unusable(exc)  # locked is not corrupt: deleting it is what was asked

    def rows(self, where: str = "", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows as dicts (axes, config and result decoded), ordered by name.

        Raises:
            IndexUnavailable: the index cannot be used now.
        """
        if not self.path.exists():
            return []

        def read() -> list[dict[str, Any]]:
            with self.connect() as con:
                cur = con.execute(f"SELECT * FROM runs {where} ORDER BY name", params)
                return [dict(r) for r in cur]

        out = self._guard(read)
        for r in out:
            for key in ("axes", "config", "result"):
                r[key] = json.loads(r[key]) if r[key] is not None else None
        return out

    def records(self) -> list[Record]:
        """Every run of the sweep: the index brought up to date, each run read from its folder
        (the numbers of a table come from the result files, not from the index's copy). An
        index that cannot be used now is passed by with a note: the folders are read."""
        try:
            self.sync()
            folders = [Path(r["folder"]) for r in self.rows()]
        except IndexUnavailable as exc:
            self.note(f"note: {exc}; reading the run folders")
            folders = self.folders()
        return [read_record(f) for f in folders]

    def counts(self) -> dict[str, int]:
        """Number of runs per status."""
        if not self.path.exists():
            return {}

        def read() -> dict[str, int]:
            with self.connect() as con:
                sql = "SELECT status, COUNT(*) FROM runs GROUP BY status"
                return dict(con.execute(sql).fetchall())

        return self._guard(read)


__all__ = [
    "BUSY_TIMEOUT_S",
    "INDEX_FILE",
    "NOT_HASHED",
    "RUNS_DIR",
    "SWEEP_FILE",
    "Index",
    "IndexUnavailable",
    "axis_keys",
    "config_hash",
    "row_of",
    "run_identity",
]
