"""Sweeps never lose, double or mislabel a run, and the index is only a cache.

- every cell gets its own folder (identity by the full sha256 of the canonical settings, not
  by the 8 hex digits in the folder name);
- one setting has one name (`lr` and `train.lr` are one key), one number one value (1 == 1.0);
- a run folder whose config.json was edited by hand is reported as "edited", left alone;
- local pool workers die with the sweep process, even when it is SIGKILLed;
- a corrupt, locked or unreadable index.sqlite never stops the work;
- type errors in a sweep file name the key, the expected type and the value.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ntksap import runs
from ntksap.cli import main
from ntksap.experiments import index as index_module
from ntksap.experiments import records
from ntksap.experiments import sweep as sw
from ntksap.experiments.index import INDEX_FILE, RUNS_DIR, Index
from ntksap.runs import CONFIG_FILE, RESULT_FILE

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = {"run": {"dataset": "digits", "model": "mlp"}, "train": {"epochs": 1}}


def tiny(**grid: Any) -> sw.Sweep:
    """A sweep of 1-epoch MLP runs on the 8x8 digits (about a second each)."""
    raw = {**TINY, "grid": {"methods": ["random"], "sparsities": [0.5], "seeds": [0], **grid}}
    return sw.Sweep.from_dict(raw)


def quiet(_msg: str) -> None:
    pass


def settings_sha256(config: dict[str, Any]) -> str:
    """The folder-name hash as every version computes it (independent of the package)."""
    kept = {k: v for k, v in config.items() if k not in ("versions", "world_size", "data_dir")}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------
# Runs are never dropped: folder names may share 8 hex digits, identities never
# ---------------------------------------------------------------------------------------
def test_cells_whose_short_hashes_collide_are_all_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With today's settings format, random-s64-seed2307 and magnitude-s52-seed3742 share
    the 8 hex digits 87453381 (a real 32-bit collision); every run is planned regardless."""
    out = tmp_path / "sw"
    argv = ["sweep", "--dataset", "digits", "--model", "mlp", "--methods", "random",
            "magnitude", "--sparsities", "0.64", "0.52", "--seeds", "2307", "3742",
            "--epochs", "1", "--out", str(out), "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    listed = capsys.readouterr().out
    assert "8 of 8 runs: 8 new" in listed, listed
    cells = sw.plan(sw.Sweep.from_dict({
        "run": {"dataset": "digits", "model": "mlp"}, "train": {"epochs": 1},
        "grid": {"methods": ["random", "magnitude"], "sparsities": [0.64, 0.52],
                 "seeds": [2307, 3742]},
    }), out)  # fmt: skip
    assert len({c.name for c in cells}) == len({c.folder for c in cells}) == 8
    short = [c.name.rsplit("-", 1)[1] for c in cells]
    full = [settings_sha256(c.request.settings()) for c in cells]
    assert len(set(full)) == 8 and all(f.startswith(s) for f, s in zip(full, short))
    assert len({c.identity for c in cells}) == 8


def test_cells_with_one_label_and_one_short_hash_get_longer_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Densities 0.36 and 0.3600001 are both labelled s64; with every hash starting with the
    same 8 digits (a stand-in for a 32-bit collision) the second run takes 16 digits."""

    def colliding(config: dict[str, Any], length: int = 8) -> str:
        return ("deadbeef" + settings_sha256(config))[:length]

    monkeypatch.setattr(sw, "config_hash", colliding)
    s = sw.Sweep.from_dict(
        {**TINY, "grid": {"methods": ["random"], "densities": [0.36, 0.3600001]}}
    )
    cells = sw.plan(s, tmp_path)
    assert len(cells) == 2, [c.name for c in cells]
    assert cells[0].name == "random-s64-seed0-deadbeef"
    assert (
        cells[1].name.startswith("random-s64-seed0-deadbeef")
        and len(cells[1].name) == len(cells[0].name) + 8
    )
    assert cells[0].folder != cells[1].folder


def test_a_folder_made_for_other_settings_is_never_taken_over(tmp_path: Path) -> None:
    """An existing folder with this run's name whose recorded identity is another's (a
    collision in the 8 digits, or a folder copied in) is left alone: the run takes a longer
    name, and the other folder keeps every byte."""
    out = tmp_path / "sw"
    s = tiny()
    first = sw.plan(s, out)[0]
    first.folder.mkdir(parents=True)
    other = {**first.request.config(1), "train": {**first.request.train.to_dict(), "lr": 0.02}}
    (first.folder / CONFIG_FILE).write_text(json.dumps(other))
    (first.folder / RESULT_FILE).write_text(json.dumps({"status": "finished", "final_top1": 1.0}))
    (first.folder / runs.IDENTITY_FILE).write_text(
        json.dumps({"sha256": records.run_identity(other)})
    )
    before = snapshot(first.folder)
    again = sw.plan(s, out)[0]
    assert again.folder != first.folder and again.name.startswith(first.name)
    summary = sw.run_sweep(s, out, log=quiet, quiet=True)
    assert [(o.name, o.status) for o in summary.outcomes] == [(again.name, "finished")]
    assert snapshot(first.folder) == before
    config = json.loads((again.folder / CONFIG_FILE).read_text())
    assert records.run_identity(config) == again.identity
    assert json.loads((again.folder / runs.IDENTITY_FILE).read_text())["sha256"] == (
        records.run_identity(config)
    )


# ---------------------------------------------------------------------------------------
# One setting, one name; one number, one value
# ---------------------------------------------------------------------------------------
def test_identity_is_the_canonical_settings() -> None:
    ident = records.run_identity
    base = {"model": "mlp", "train": {"lr": 1, "milestones": [80, 120]}}
    assert ident(base) == ident({"train": {"milestones": (80.0, 120), "lr": 1.0}, "model": "mlp"})
    assert ident(base) == ident({**base, "versions": {"torch": "9"}, "data_dir": "/elsewhere"})
    assert len(ident(base)) == 64
    assert ident({"prune": {"shuffle": True}}) != ident({"prune": {"shuffle": 1}})
    assert ident({"train": {"lr": 0.1}}) != ident({"train": {"lr": 0.1000001}})
    assert ident({"x": [1, 2]}) != ident({"x": [2, 1]})


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"grid": {"axes": {"train.lr": [0.1, 0.2], "lr": [0.3]}}},
         ["train.lr", "lr", "same training setting lr"]),
        ({"grid": {"axes": {"lr": [0.1, 0.2]}}, "run": {"train.lr": 0.3}},
         ["[grid.axes] lr", "[run] train.lr", "two spellings"]),
        ({"train": {"lr": 0.3}, "run": {"lr": 0.2}}, ["[train] lr", "[run] lr", "give it once"]),
        ({"grid": {"axes": {"lr": [1, 1.0]}}}, ["repeats a value", "1 and 1.0"]),
        ({"grid": {"axes": {"milestones": [[1], [1.0]]}}}, ["repeats a value"]),
    ],
)  # fmt: skip
def test_one_setting_given_twice_is_an_error_naming_both(
    tmp_path: Path, raw: dict[str, Any], words: list[str]
) -> None:
    full: dict[str, Any] = {**TINY, "grid": {"methods": ["random"], "sparsities": [0.5]}}
    for key, val in raw.items():
        full[key] = {**full.get(key, {}), **val}
    with pytest.raises(sw.SweepError) as info:
        sw.plan(sw.Sweep.from_dict(full), tmp_path / "sw")
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_an_axis_overrides_the_fixed_setting_of_the_same_name(tmp_path: Path) -> None:
    """The documented order (fixed < per method < axis), with one spelling: each run is
    labelled with the value it trains with."""
    s = tiny(axes={"lr": [0.01, 0.02]})
    s.train["lr"] = 0.3
    cells = sw.plan(s, tmp_path)
    assert [(c.name.split("-")[2], c.request.train.lr) for c in cells] == [
        ("lr0.01", 0.01),
        ("lr0.02", 0.02),
    ]


def test_cli_flags_replace_the_files_setting_however_spelled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "s.toml"
    config.write_text(
        '[run]\ndataset = "digits"\n"train.lr" = 0.3\n[grid]\nmethods = ["random"]\n'
        'sparsities = [0.5]\n[grid.axes]\n"train.epochs" = [1, 2]\n'
    )
    base = ["sweep", str(config), "--out", str(tmp_path / "sw"), "--dry-run"]
    assert main([*base, "--axis", "lr=0.01,0.02", "--epochs", "1"]) == 0
    listed = capsys.readouterr().out
    assert "random-s50-lr0.01-seed0-" in listed and "random-s50-lr0.02-seed0-" in listed
    assert "epochs" not in listed and "2 of 2 runs" in listed
    assert main([*base, "--lr", "0.1", "--axis", "lr=0.2,0.3"]) == 2
    assert "--lr and --axis lr both set lr" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# A folder edited by hand: reported, never counted as done, never run over
# ---------------------------------------------------------------------------------------
def test_a_run_whose_config_was_edited_is_reported_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    s = tiny(seeds=[0, 1])
    first = sw.run_sweep(s, out, log=quiet, quiet=True)
    assert [o.status for o in first.outcomes] == ["finished", "finished"]
    edited, kept = sw.plan(s, out)
    config = json.loads((edited.folder / CONFIG_FILE).read_text())
    config["train"]["lr"] = 0.5  # not the setting it was trained with
    (edited.folder / CONFIG_FILE).write_text(json.dumps(config))
    before = snapshot(edited.folder)

    second = sw.run_sweep(s, out, log=quiet, quiet=True)
    got = {o.name: o for o in second.outcomes}
    assert got[edited.name].status == "edited" and got[edited.name].before == "finished"
    assert "config.json" in (got[edited.name].error or "")
    assert got[kept.name].status == "skipped"
    assert not second.ok
    assert snapshot(edited.folder) == before  # every file kept as it was
    assert "edited" in sw.describe(second)

    rows = {r["name"]: r for r in Index(out).rows()}
    assert rows[edited.name]["status"] == "edited" and rows[kept.name]["status"] == "finished"
    assert records.read_record(edited.folder).top1 is None  # not a result of any setting
    assert main(["sweep", "--dataset", "digits", "--model", "mlp", "--methods", "random",
                 "--sparsities", "0.5", "--seeds", "0", "1", "--epochs", "1",
                 "--out", str(out), "--dry-run"]) == 0  # fmt: skip
    assert f"edited      {edited.folder}" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "1 finished" in text and "config.json was changed after the run" in text


def test_folders_of_the_previous_version_are_recognised(tmp_path: Path) -> None:
    """A run folder without identity.json (written before it existed) is done when its
    config is unchanged, and edited when its settings no longer hash to its name."""
    out = tmp_path / "sw"
    s = tiny(seeds=[0, 1])
    sw.run_sweep(s, out, log=quiet, quiet=True)
    cells = sw.plan(s, out)
    for c in cells:
        (c.folder / runs.IDENTITY_FILE).unlink(missing_ok=True)
        # the folder name is the settings' hash, as the previous version named it
        config = json.loads((c.folder / CONFIG_FILE).read_text())
        assert c.name.endswith("-" + settings_sha256(config)[:8])
    config = json.loads((cells[1].folder / CONFIG_FILE).read_text())
    config["prune"]["scope"] = "local"
    (cells[1].folder / CONFIG_FILE).write_text(json.dumps(config))
    again = sw.run_sweep(s, out, log=quiet, quiet=True)
    assert [(o.name, o.status) for o in again.outcomes] == [
        (cells[0].name, "skipped"),
        (cells[1].name, "edited"),
    ]
    assert [r.status for r in Index(out).records()] == ["finished", "edited"]


# ---------------------------------------------------------------------------------------
# Pool workers die with the sweep
# ---------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    """ppid -> pids of the live (not zombie) processes, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_pool_workers_die_when_the_sweep_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    argv = [sys.executable, "-m", "ntksap", "sweep", "--dataset", "digits", "--model", "mlp",
            "--methods", "random", "magnitude", "--sparsities", "0.5", "0.6", "0.7",
            "--seeds", "0", "--epochs", "30", "--jobs", "2", "--quiet", "--no-progress",
            "--out", str(out)]  # fmt: skip
    log = (tmp_path / "log.txt").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both workers started and running a run
            started = list((out / RUNS_DIR).glob(f"*/{CONFIG_FILE}")) if out.exists() else []
            workers = _descendants(proc.pid)
            if len(started) >= 2 and len(workers) >= 2:
                break
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()
            time.sleep(0.05)
        else:
            pytest.fail("the workers did not start:\n" + (tmp_path / "log.txt").read_text())
        workers = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        left = sorted(p for p in workers if _alive(p))
        assert not left, f"processes of the killed sweep still alive: {left}"
    finally:
        for pid in workers:  # only the processes this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------
# The index is a cache
# ---------------------------------------------------------------------------------------
def _valid_index(out: Path) -> bytes:
    """The bytes of a real index of `out`, one sweep run in."""
    sw.run_sweep(tiny(), out, log=quiet, quiet=True)
    with sqlite3.connect(out / INDEX_FILE) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return (out / INDEX_FILE).read_bytes()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_index_is_moved_aside_and_rebuilt(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    good = _valid_index(out)
    for suffix in ("-wal", "-shm"):
        Path(str(out / INDEX_FILE) + suffix).unlink(missing_ok=True)
    bad = b"this is not a database " * 300 if damage == "garbage" else good[: len(good) // 2]
    (out / INDEX_FILE).write_bytes(bad)
    notes: list[str] = []
    summary = sw.run_sweep(tiny(seeds=[0, 1]), out, log=notes.append, quiet=True)
    assert [o.status for o in summary.outcomes] == ["skipped", "finished"]
    moved = sorted(out.glob(f"{INDEX_FILE}.corrupt-*"))
    assert [p.read_bytes() for p in moved if not p.name.endswith(("-wal", "-shm"))] == [bad]
    assert sum("was corrupt" in n for n in notes) == 1, notes
    rows = Index(out).rows()
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert {r["folder"] for r in rows} == {
        str(p) for p in records.find_run_folders([out / RUNS_DIR])
    }
    # `ntksap report` on a corrupt index: the same
    (out / INDEX_FILE).write_bytes(bad)
    for suffix in ("-wal", "-shm"):
        Path(str(out / INDEX_FILE) + suffix).unlink(missing_ok=True)
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "2 runs: 2 finished" in (tmp_path / "rep" / "report.md").read_text()
    assert "Traceback" not in capsys.readouterr().err
    # --rebuild of a corrupt index: moved aside too, never deleted
    (out / INDEX_FILE).write_bytes(bad)
    assert Index(out, note=notes.append).rebuild() == 2
    aside = [
        p for p in out.glob(f"{INDEX_FILE}.corrupt-*") if not p.name.endswith(("-wal", "-shm"))
    ]
    assert len(aside) == 3 and all(p.read_bytes() == bad for p in aside)


def test_a_locked_index_is_passed_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    _valid_index(out)
    monkeypatch.setattr(index_module, "BUSY_TIMEOUT_S", 0.2, raising=False)
    holder = sqlite3.connect(out / INDEX_FILE, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        notes: list[str] = []
        started = time.monotonic()
        summary = sw.run_sweep(tiny(seeds=[0, 1]), out, log=notes.append, quiet=True)
        assert time.monotonic() - started < 30
        assert [o.status for o in summary.outcomes] == ["skipped", "finished"]
        assert sum("cannot be used now" in n for n in notes) == 1, notes
        recs = Index(out).records()  # the listing reads the folders
        assert [r.status for r in recs] == ["finished", "finished"]
        assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
        assert "2 runs: 2 finished" in (tmp_path / "rep" / "report.md").read_text()
    finally:
        holder.rollback() if holder.in_transaction else None
        holder.close()
    assert "Traceback" not in capsys.readouterr().err
    assert len(Index(out).rows()) == 1 and Index(out).sync() == 1  # usable again, caught up


def test_an_unreadable_index_is_passed_by(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    (out / INDEX_FILE).mkdir(parents=True)  # not a file: sqlite3 cannot open it
    notes: list[str] = []
    summary = sw.run_sweep(tiny(), out, log=notes.append, quiet=True)
    assert [o.status for o in summary.outcomes] == ["finished"]
    assert any("cannot be used now" in n for n in notes), notes
    assert (out / INDEX_FILE).is_dir()  # nothing deleted
    assert [r.status for r in Index(out, note=notes.append).records()] == ["finished"]


# ---------------------------------------------------------------------------------------
# Type errors in a sweep file name the key, the type and the value
# ---------------------------------------------------------------------------------------
RUN = '[run]\ndataset = "digits"\n'
GRID = '[grid]\nmethods = ["random"]\nsparsities = [0.5]\n'
BAD_TOML = [
    (RUN + '[grid]\nmethods = "random"\nsparsities = [0.5]',
     ["[grid] methods", "list", "'random'"]),
    (RUN + 'exclude = "layers.5*"\n' + GRID, ["[run] exclude", "list of patterns", "'layers.5*'"]),
    (RUN + '[grid]\nmethods = ["random"]\nsparsities = 0.5', ["[grid] sparsities", "list", "0.5"]),
    (RUN + GRID + "seeds = 3", ["[grid] seeds", "list", "3"]),
    ('run = ["digits"]\n' + GRID, ["[run] must be a table", "a list"]),
    (RUN + GRID + "[grid.axes.rounds]\nfirst = 1",
     ["[grid.axes] rounds must be a list", "a table"]),
    (RUN + '[grid]\nmethods = ["random"]\nsparsities = ["0.5"]',
     ["[grid] sparsities", "numbers", "a string", "'0.5'"]),
    (RUN + '[grid]\nmethods = ["random"]\ndensities = [true]', ["[grid] densities", "true/false"]),
    (RUN + '[grid]\nmethods = ["random"]\ncompression = [nan]', ["[grid] compression", "finite"]),
    (RUN + GRID + "seeds = [1.5]", ["seeds", "1.5"]),
    (RUN + GRID + "seeds = [true]", ["seeds", "True"]),
    (RUN + "[train]\nlr = inf\n" + GRID, ["[train] lr", "finite", "inf"]),
    (RUN + "rounds = [1, 5]\n" + GRID,
     ["[run] rounds must be one value", "[grid.axes] rounds = [1, 5]"]),
    (RUN + GRID + '[grid.axes]\nexclude = ["a*", "b*"]',
     ["[grid.axes] exclude", "list of patterns", "'a*'"]),
    (RUN + GRID + "[methods]\nrandom = 3", ["[methods.random]", "table", "a number"]),
    (RUN + GRID + '[slurm]\ntime_minutes = "1h"', ["[slurm] time_minutes", "'1h'"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "words"), BAD_TOML, ids=[str(k) for k in range(len(BAD_TOML))])
def test_sweep_file_type_errors_name_key_type_and_value(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:  # SweepError, or ntksap.validate's ValueError
        spec = sw.Sweep.from_toml(path)
        sw.run_sweep(spec, tmp_path / "sw", log=quiet)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert not (tmp_path / "sw").exists()


def test_a_changed_default_is_recorded_so_old_runs_keep_their_own_identity(tmp_path):
    """px's default variant changed (code-2025 -> code-2024): a px run records the variant
    it used even when not given, so a run folder made before (no variant in its config)
    is not taken for a run of the new default, and a sweep plans a new folder beside it."""
    req = runs.prepare(tmp_path / "r", dataset="digits", method="px", density=0.5,
                       log=lambda _m: None)  # fmt: skip
    assert req.options == {"variant": "code-2024"}
    settings = req.settings()
    old = json.loads(json.dumps(settings))
    old["prune"]["options"] = {}  # how a run made before the change recorded it
    assert records.run_identity(old) != records.run_identity(settings)
    given = runs.prepare(tmp_path / "r", dataset="digits", method="px", density=0.5,
                         options={"variant": "code-2025"}, log=lambda _m: None)  # fmt: skip
    assert given.options == {"variant": "code-2025"}
    # the other methods record only what was given
    plain = runs.prepare(tmp_path / "r", dataset="digits", method="ntksap", density=0.5,
                         log=lambda _m: None)  # fmt: skip
    assert plain.options == {}
