"""Sweeps: the grid, run-folder names, shards, executors, the index, and survival of kills.

The process tests run `python -m ntksap sweep` as a user would, one thread per process so
that every process computes the same numbers (the reference sweep is one uninterrupted,
unsharded run of the same command).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ntksap import runs
from ntksap.cli import main
from ntksap.experiments import report
from ntksap.experiments import sweep as sw
from ntksap.experiments.index import INDEX_FILE, RUNS_DIR, Index, config_hash
from ntksap.experiments.records import find_run_folders, read_record
from ntksap.masks import Masks
from ntksap.runs import CONFIG_FILE, MASK_FILE, RESULT_FILE
from ntksap.scoring import get_method
from ntksap.training.loop import CHECKPOINT_FILE, METRICS_FILE

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# 4 runs: random and NTK-SAP (20 rounds x 5 resamples: pruning lasts ~1 s, a window to kill
# in) at two sparsities, 3 epochs of LeNet-5 on the 8x8 digits.
SWEEP_ARGS = [
    "--dataset", "digits", "--model", "lenet5", "--methods", "random", "ntksap",
    "--sparsities", "0.9", "0.95", "--seeds", "0", "--epochs", "3", "--set", "rounds=20",
    "--quiet", "--no-progress",
]  # fmt: skip
NAMES_ORDER = ["random-s90", "random-s95", "ntksap-s90", "ntksap-s95"]
TIMEOUT_S = 240
POLL_S = 0.002


def spec(**grid: Any) -> sw.Sweep:
    raw = {
        "run": {"dataset": "digits", "model": "lenet5"},
        "train": {"epochs": 1},
        "grid": {"methods": ["random", "snip"], "sparsities": [0.9], "seeds": [0], **grid},
    }
    return sw.Sweep.from_dict(raw)


# ---------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------
def test_plan_names_hashes_and_axes(tmp_path: Path) -> None:
    s = sw.Sweep.from_dict(
        {
            "run": {"dataset": "digits"},
            "train": {"epochs": 1},
            "grid": {
                "methods": ["snip", "ntksap"],
                "compression": [2, 10],
                "seeds": [0, 1],
                "axes": {"resamples": [1, 2], "shuffle": [False, True]},
            },
            "methods": {"ntksap": {"rounds": 3}},
        }
    )
    cells = sw.plan(s, tmp_path)
    # snip: 2 densities x 2 shuffle x 2 seeds; ntksap x 2 resamples on top (snip lacks it)
    assert len(cells) == 8 + 16
    assert len({c.hash for c in cells}) == len(cells)
    assert [c.density for c in cells[:4]] == [round(0.8**2, 12)] * 4
    assert {c.density for c in cells} == {round(0.8**2, 12), round(0.8**10, 12)}
    snip0 = cells[0]
    assert snip0.name == f"snip-s36-shufflefalse-seed0-{snip0.hash}"
    assert snip0.folder == tmp_path / RUNS_DIR / snip0.name
    nt = [c for c in cells if c.method == "ntksap"]
    assert all(c.request.prune_settings["rounds"] == 3 for c in nt)
    assert {c.request.options["resamples"] for c in nt} == {1, 2}
    assert all("resamples" not in c.request.options for c in cells if c.method == "snip")
    # the hash is the settings' (independent of the sweep folder), stable across calls
    again = sw.plan(s, tmp_path / "elsewhere")
    assert [c.hash for c in again] == [c.hash for c in cells]
    assert all(config_hash(c.request.settings()) == c.hash for c in cells)
    # each request is what `ntksap.run` itself would record
    c = nt[-1]
    direct = runs.prepare(
        "x", dataset="digits", method="ntksap", density=c.density, seed=c.seed, rounds=3,
        shuffle=c.axes["shuffle"], options={"resamples": c.axes["resamples"]},
        train={"epochs": 1}, log=lambda _m: None,
    )  # fmt: skip
    assert direct.settings() == c.request.settings()


def test_settings_go_where_they_belong() -> None:
    assert sw.classify("rounds", ["ntksap"]) == ("run", "rounds")
    assert sw.classify("weight-decay", ["ntksap"]) == ("train", "weight_decay")
    assert sw.classify("epsilon", ["ntksap"]) == ("option", "epsilon")
    assert sw.classify("train.batch_size", ["ntksap"]) == ("train", "batch_size")
    assert sw.classify("options.batch_size", ["ntksap"]) == ("option", "batch_size")
    with pytest.raises(sw.SweepError, match=r"train\.batch_size or options\.batch_size"):
        sw.classify("batch_size", ["ntksap"])
    assert sw.classify("batch_size", ["snip"]) == ("train", "batch_size")  # no clash there
    with pytest.raises(sw.SweepError, match=r"unknown setting 'epsilonn'.*valid:.*epsilon"):
        sw.classify("epsilonn", ["ntksap"])
    with pytest.raises(sw.SweepError, match="grid dimension"):
        sw.classify("seed", ["ntksap"])
    assert sw.parse_assignment("rounds=1,5,20", many=True) == ("rounds", [1, 5, 20])
    assert sw.parse_assignment("shuffle=false,true", many=True) == ("shuffle", [False, True])
    with pytest.raises(sw.SweepError, match="KEY=VALUES"):
        sw.parse_assignment("rounds", many=True)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"grid": {"methods": ["snipp"]}}, "snipp.*valid choices"),
        ({"grid": {"sparsities": [1.5]}}, "sparsity"),
        ({"grid": {"sparsities": [0.9], "densities": [0.1]}}, "one of sparsities"),
        ({"grid": {"seeds": [0, 0]}}, "seeds repeated"),
        ({"grid": {"seeds": [-1]}}, "seed"),
        ({"grid": {"axes": {"resamples": [1, 2]}}}, "none of the methods"),
        ({"grid": {"axes": {"rounds": []}}}, "no values"),
        ({"grid": {"axes": {"rounds": [0]}}}, "rounds"),
        ({"grid": {"axes": {"lr": [float("nan")]}}}, "lr"),
        ({"grid": {"sparsity": [0.9]}}, r"unknown \[grid\] key 'sparsity'"),
        ({"train": {"epoch": 3}}, "unknown \\[train\\] setting 'epoch'"),
        ({"options": {"resamples": 2}}, "belongs to none of the methods"),
        ({"methods": {"ntksap": {"rounds": 2}}}, r"\[methods.ntksap\] names a method"),
        ({"executor": {"name": "kubernetes"}}, "executor.*local, slurm"),
        ({"slurm": {"partitions": "gpu"}}, "unknown \\[slurm\\] key"),
        ({"extra": {}}, "unknown top-level table"),
    ],
)
def test_bad_sweeps_are_refused_before_any_work(
    tmp_path: Path, raw: dict[str, Any], message: str
) -> None:
    base: dict[str, Any] = {
        "run": {"dataset": "digits"},
        "grid": {"methods": ["snip"], "sparsities": [0.9]},
    }
    for key, val in raw.items():
        base[key] = {**base.get(key, {}), **val} if isinstance(val, dict) else val
    with pytest.raises((sw.SweepError, ValueError), match=message):
        s = sw.Sweep.from_dict(base)
        sw.run_sweep(s, tmp_path / "sw", log=lambda _m: None)
    assert not (tmp_path / "sw").exists()


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[grid]\nmethods = [snip\n")
    with pytest.raises(sw.SweepError, match=r"bad\.toml is not valid TOML"):
        sw.Sweep.from_toml(path)
    path.write_text('[grid]\nmethods = ["snip"]\nsparsities = [0.9]\nfoo = 1\n')
    with pytest.raises(sw.SweepError, match=r"bad.toml: unknown \[grid\] key 'foo'"):
        sw.Sweep.from_toml(path)


def test_shards_are_disjoint_and_complete(tmp_path: Path) -> None:
    cells = sw.plan(spec(sparsities=[0.5, 0.9, 0.95], seeds=[0, 1, 2]), tmp_path)
    for n in (1, 2, 3, 5, 40):
        parts = [sw.select_shard(cells, (i, n)) for i in range(n)]
        names = [c.name for p in parts for c in p]
        assert sorted(names) == sorted(c.name for c in cells)  # each run exactly once
    assert sw.parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1/0", "-1/2", "a/b", "1"):
        with pytest.raises(sw.SweepError, match="shard"):
            sw.parse_shard(bad)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
    assert sw.shard_from_environment(env) == (2, 4)
    assert sw.shard_from_environment({"SLURM_JOB_ID": "1"}) is None


def test_slurm_parameters_come_from_the_slurm_table() -> None:
    s = spec()
    s.slurm = {"partition": "gpu", "time_minutes": 90, "gpus_per_task": 1, "cpus_per_task": 8}
    params = sw.slurm_parameters(s, jobs=1)
    assert params["slurm_partition"] == "gpu"
    assert params["timeout_min"] == 90
    assert params["gpus_per_node"] == 1 and params["cpus_per_task"] == 8
    submitit = pytest.importorskip("submitit")
    ex = submitit.AutoExecutor(folder="/tmp/unused", cluster="debug")
    ex.update_parameters(**params)  # submitit accepts every name we give it


# ---------------------------------------------------------------------------------------
# Running in this process: skip, resume, failures, divergence, the index
# ---------------------------------------------------------------------------------------
def quiet(_msg: str) -> None:
    pass


def index_matches_folders(out: Path) -> None:
    rows = {r["name"]: r for r in Index(out).rows()}
    folders = {p.name: p for p in find_run_folders([out / RUNS_DIR])}
    assert rows.keys() == folders.keys()
    for name, folder in folders.items():
        rec = read_record(folder)
        assert rows[name]["status"] == rec.status, name
        assert rows[name]["final_top1"] == (rec.result or {}).get("final_top1"), name
        assert rows[name]["hash"] == config_hash(rec.config)


def test_rerun_skips_failed_and_diverged_runs_and_retries_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sw"
    s = spec(methods=["random", "snip"], axes={"lr": [0.05, 1e12]})
    real_train = runs._train

    def broken(req: runs.RunRequest, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if req.method == "snip" and req.train.lr == 0.05:
            raise RuntimeError("simulated crash in this run")
        return real_train(req, *args, **kwargs)

    monkeypatch.setattr(runs, "_train", broken)
    first = sw.run_sweep(s, out, log=quiet, quiet=True)
    cells = {(c.method, c.request.train.lr): c.name for c in sw.plan(s, out)}
    by = {o.name: o for o in first.outcomes}
    assert by[cells["random", 0.05]].status == "finished"
    assert by[cells["random", 1e12]].status == "diverged"
    assert by[cells["snip", 1e12]].status == "diverged"
    assert by[cells["snip", 0.05]].status == "failed"
    assert by[cells["snip", 0.05]].error == "RuntimeError: simulated crash in this run"
    assert not first.ok
    failed = next(c for c in sw.plan(s, out) if c.method == "snip" and c.request.train.lr == 0.05)
    saved = json.loads((failed.folder / RESULT_FILE).read_text())
    assert saved["status"] == "failed" and "simulated crash" in saved["error"]
    index_matches_folders(out)
    row = next(r for r in Index(out).rows() if r["name"] == failed.name)
    assert row["status"] == "failed" and "simulated crash" in row["error"]

    # again: nothing runs (diverged is a result; failed waits for --retry-failed)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob(RESULT_FILE)}
    second = sw.run_sweep(s, out, log=quiet, quiet=True)
    assert {o.status for o in second.outcomes} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob(RESULT_FILE)} == stamps

    monkeypatch.setattr(runs, "_train", real_train)
    third = sw.run_sweep(s, out, log=quiet, quiet=True, retry_failed=True)
    ran = [o for o in third.outcomes if o.status != "skipped"]
    assert [(o.name, o.status, o.before) for o in ran] == [(failed.name, "finished", "failed")]
    index_matches_folders(out)


def test_index_rebuilds_from_the_folders(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    sw.run_sweep(spec(seeds=[0, 1]), out, log=quiet, quiet=True)
    idx = Index(out)
    before = [{k: v for k, v in r.items() if k != "indexed"} for r in idx.rows()]
    assert len(before) == 4
    (out / INDEX_FILE).unlink()
    assert idx.rebuild() == 4
    after = [{k: v for k, v in r.items() if k != "indexed"} for r in idx.rows()]
    assert after == before
    assert idx.counts() == {"finished": 4}
    # a folder deleted by hand disappears from the index on the next full sync
    gone = Path(before[0]["folder"])
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    idx.sync()
    assert len(idx.rows()) == 3
    assert before[0]["axes"] == {}


def test_a_busy_run_is_skipped_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    s = spec()
    cells = sw.plan(s, out)
    with runs.claim(cells[0].folder):
        (cells[0].folder / CONFIG_FILE).write_text("{}")  # another process's run, started
        summary = sw.run_sweep(s, out, log=quiet, quiet=True)
    got = {o.name: o.status for o in summary.outcomes}
    assert got == {cells[0].name: "skipped-busy", cells[1].name: "finished"}
    assert (cells[0].folder / CONFIG_FILE).read_text() == "{}"


# ---------------------------------------------------------------------------------------
# Processes: kills, concurrent shards, submitit
# ---------------------------------------------------------------------------------------
def start(out: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "ntksap", "sweep", *SWEEP_ARGS, "--out", str(out), *extra]
    with log.open("ab") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=ENV)


def finish(proc: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"ntksap sweep took over {TIMEOUT_S} s:\n{log.read_text()}")


def folder_of(out: Path, prefix: str) -> Path | None:
    found = sorted((out / RUNS_DIR).glob(f"{prefix}-*")) if (out / RUNS_DIR).is_dir() else []
    return found[0] if found else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted, unsharded sweep."""
    out = tmp_path_factory.mktemp("reference") / "sw"
    log = out.parent / "log.txt"
    code = finish(start(out, log), log)
    assert code == 0, log.read_text()
    return out


def results(out: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads((p / RESULT_FILE).read_text())
        for p in find_run_folders([out / RUNS_DIR])
    }


#: (run folder prefix, condition on that folder) -> kill the sweep when it holds
Point = tuple[str, Callable[[Path], bool]]


def started(p: Path) -> bool:
    """Anywhere in the run (pruning or training), before its result: the widest window."""
    return (p / CONFIG_FILE).is_file() and not (p / RESULT_FILE).exists()


def pruning(p: Path) -> bool:
    return (p / CONFIG_FILE).is_file() and not (p / MASK_FILE).exists()


def checkpointed(p: Path) -> bool:
    return (p / CHECKPOINT_FILE).is_file() and not (p / RESULT_FILE).exists()


KILL_POINTS: list[Point] = [
    ("random-s90", started),  # the first run, mid-way
    ("ntksap-s90", pruning),  # NTK-SAP pruning (no mask saved yet)
    ("ntksap-s95", checkpointed),  # the last run, after a checkpoint
]


def kill_at(out: Path, log: Path, point: Point) -> None:
    prefix, cond = point
    proc = start(out, log)
    t0 = time.monotonic()
    while proc.poll() is None:
        folder = folder_of(out, prefix)
        if folder is not None and cond(folder):
            os.kill(proc.pid, signal.SIGKILL)
            break
        if time.monotonic() - t0 > TIMEOUT_S:
            proc.kill()
            pytest.fail(f"kill point {prefix} never came:\n{log.read_text()}")
        time.sleep(POLL_S)
    code = finish(proc, log)
    assert code == -signal.SIGKILL, f"the sweep ended (exit {code}) before {prefix}:\n" + (
        log.read_text()
    )


def test_sigkill_during_a_sweep_then_rerun(tmp_path: Path, reference: Path) -> None:
    out, log = tmp_path / "sw", tmp_path / "log.txt"
    finished_once: dict[str, tuple[bytes, int]] = {}  # result.json bytes and mtime when seen
    masks_seen: dict[str, int] = {}
    for point in KILL_POINTS:
        kill_at(out, log, point)
        for p in find_run_folders([out / RUNS_DIR]):
            if (p / RESULT_FILE).exists():
                res = p / RESULT_FILE
                finished_once.setdefault(p.name, (res.read_bytes(), res.stat().st_mtime_ns))
            elif (p / MASK_FILE).exists():
                masks_seen.setdefault(p.name, (p / MASK_FILE).stat().st_mtime_ns)
    # the kills hit what they aimed at
    assert folder_of(out, "ntksap-s90") is not None
    assert not (folder_of(out, "ntksap-s95") / RESULT_FILE).exists()  # type: ignore[operator]
    # random-s90 (resumed after kill 1), random-s95, ntksap-s90 (resumed after kill 2)
    assert len(finished_once) == 3, finished_once.keys()
    killed_with_mask = {folder_of(out, p).name for p in ("random-s90", "ntksap-s95")}  # type: ignore[union-attr]
    assert folder_of(out, "ntksap-s95").name in masks_seen  # type: ignore[union-attr]
    assert masks_seen.keys() <= killed_with_mask

    code = finish(start(out, log), log)
    assert code == 0, log.read_text()
    starts = [x for x in log.read_text().splitlines() if "already done" in x]
    assert len(starts) == 4
    assert "0 already done" in starts[0] and "3 already done, 1 to run" in starts[-1]

    # no finished run recomputed, the interrupted ones resumed (mask not re-pruned)
    for name, (content, mtime) in finished_once.items():
        path = out / RUNS_DIR / name / RESULT_FILE
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, name
    for name, mtime in masks_seen.items():
        assert (out / RUNS_DIR / name / MASK_FILE).stat().st_mtime_ns == mtime, name
    # nothing lost: every run ends exactly as in the uninterrupted sweep
    got, ref = results(out), results(reference)
    assert got.keys() == ref.keys() and len(got) == 4
    for name in ref:
        for key in ("status", "final_top1", "best_top1", "density", "epochs_done"):
            assert got[name][key] == ref[name][key], (name, key)
        assert Masks.load(out / RUNS_DIR / name / MASK_FILE) == Masks.load(
            reference / RUNS_DIR / name / MASK_FILE
        )
        rows = [
            json.loads(x) for x in (out / RUNS_DIR / name / METRICS_FILE).read_text().splitlines()
        ]
        assert [r["epoch"] for r in rows] == [1, 2, 3], name
    index_matches_folders(out)


def test_two_shards_at_once_equal_one_unsharded_sweep(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "sw"
    logs = [tmp_path / "0.txt", tmp_path / "1.txt"]
    procs = [start(out, logs[i], "--shard", f"{i}/2") for i in range(2)]
    codes = [finish(p, log) for p, log in zip(procs, logs)]
    assert codes == [0, 0], [log.read_text() for log in logs]
    assert not (out / INDEX_FILE).exists()  # shards write only their run folders
    names = [{n.split("-seed0")[0] for n in log.read_text().split() if "-seed0-" in n}
             for log in logs]  # fmt: skip
    assert names[0] and names[1] and not names[0] & names[1]
    # `ntksap report` on the sharded folder gives the unsharded table
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert main(["report", str(reference), "--out", str(tmp_path / "ref")]) == 0
    assert (tmp_path / "rep" / "results.csv").read_text() == (
        tmp_path / "ref" / "results.csv"
    ).read_text()
    index_matches_folders(out)
    got, ref = results(out), results(reference)
    assert got.keys() == ref.keys()
    for name in ref:
        for key in ("status", "final_top1", "best_top1", "density"):
            assert got[name][key] == ref[name][key], (name, key)


def test_submitit_local_executor_end_to_end(tmp_path: Path, reference: Path) -> None:
    pytest.importorskip("submitit")
    out = tmp_path / "sw"
    argv = [*SWEEP_ARGS, "--out", str(out), "--executor", "submitit-local", "--jobs", "2"]
    code = main(["sweep", *argv])
    assert code == 0
    got, ref = results(out), results(reference)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name]["status"] == "finished"
        assert got[name]["final_top1"] == ref[name]["final_top1"], name
    assert len(list((out / "submitit").rglob("*_log.out"))) == 4  # one submitit job per run
    index_matches_folders(out)


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------
def test_cli_sweep_flags_dry_run_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    base = ["sweep", "--dataset", "digits", "--methods", "random", "magnitude",
            "--sparsities", "0.9", "0.95", "--seeds", "0", "1", "--epochs", "1",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*base, "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "8 of 8 runs: 8 new" in listed and not out.exists()
    assert main([*base, "--dry-run", "--shard", "1/3"]) == 0
    assert "3 of 8 runs: 3 new" in capsys.readouterr().out  # runs 1, 4 and 7 of 0..7
    assert main(base) == 0
    printed = capsys.readouterr().out
    assert "| random |" in printed and "| magnitude |" in printed
    # report numbers equal the result files
    assert main(["report", str(out)]) == 0
    rows = (out / "report" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    for line in rows[1:]:
        cells = dict(zip(header, line.split(",")))
        tops = [
            json.loads((p / RESULT_FILE).read_text())["final_top1"]
            for p in (out / RUNS_DIR).glob(
                f"{cells['method']}-s{float(cells['sparsity']) * 100:.4g}-*"
            )
        ]
        assert int(cells["n"]) == len(tops) == 2
        assert float(cells["mean"]) == pytest.approx(np.mean(tops), abs=1e-9)
        assert float(cells["std"]) == pytest.approx(np.std(tops, ddof=1), abs=1e-9)
    for name in ("accuracy_vs_sparsity.png", "layer_density.png", "training_curves.png"):
        assert (out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # flags that make no sense are refused before any work
    bad = [
        (["--axis", "resamples=1,2"], "none of the methods"),
        (["--axis", "rounds"], "KEY=VALUES"),
        (["--set", "epsilonn=1"], "unknown setting 'epsilonn'"),
        (["--shard", "2/2"], "bad shard"),
        (["--axis", "lr=0.1,nan"], "lr"),
    ]
    for extra, message in bad:
        out2 = tmp_path / "bad"
        argv = [*base[:-3], "--out", str(out2), *extra]
        assert main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out2.exists()
    table = report.build_table([read_record(p) for p in find_run_folders([out])])
    assert len(table.rows) == 2


def test_local_executor_runs_jobs_in_parallel_processes(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    summary = sw.run_sweep(spec(seeds=[0, 1]), out, jobs=2, quiet=True, log=quiet)
    assert [o.status for o in summary.outcomes] == ["finished"] * 4
    index_matches_folders(out)
    spans = sorted(
        (r["started"], r["ended"]) for r in Index(out).rows()
    )  # config.json written .. result.json written
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans  # two ran at once
    again = sw.run_sweep(spec(seeds=[0, 1]), out, jobs=2, quiet=True, log=quiet)
    assert {o.status for o in again.outcomes} == {"skipped"}


CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_plan(path: Path, tmp_path: Path) -> None:
    """Each paper setting and ablation parses, names real methods/options, and plans runs
    with the paper's settings (no data is read by planning)."""
    s = sw.Sweep.from_toml(path)
    cells = sw.plan(s, tmp_path)
    assert cells and len({c.hash for c in cells}) == len(cells)
    assert {c.seed for c in cells} >= {0}
    for c in cells:
        assert c.request.train.preset is not None  # a paper preset, not ad-hoc training
        if c.method == "ntksap":
            rounds = c.request.prune_settings["rounds"]  # None: the method's (the paper's) T
            assert (rounds or get_method("ntksap").default_rounds) in (1, 5, 10, 20, 100)
    if path.stem.startswith("cifar10-resnet20"):
        assert all(c.request.model == "resnet20" and c.request.dataset == "cifar10" for c in cells)
        densities = sorted({round(c.density, 4) for c in cells})
        assert round(0.8**18, 4) in densities  # the paper's 98.2 % sparsity


def test_shipped_configs_cover_the_paper_settings() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"cifar10-resnet20", "cifar100-vgg16", "tinyimagenet-resnet18", "imagenet-resnet18",
            "imagenet-resnet50"} <= names  # fmt: skip
    ablations = {n.rsplit("-", 1)[-1] for n in names if n.startswith("cifar10-resnet20-")}
    assert {"rounds", "resamples", "epsilon", "weights", "inputs"} <= ablations


def test_each_local_worker_gets_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs N on a machine with several GPUs: worker k trains on cuda:(k mod GPUs)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [sw._gpu_for_slot(k) for k in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sw._gpu_for_slot(1) is None  # CPU: the run's own default


def test_cli_compression_range_is_the_papers_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sweep", "--dataset", "digits", "--methods", "snip", "--out", str(tmp_path / "s"),
            "--dry-run", "--compression", "2", "4", "..", "18"]  # fmt: skip
    assert main(argv) == 0
    listed = capsys.readouterr().out
    assert "9 of 9 runs" in listed
    for k in range(2, 19, 2):
        assert f"snip-s{100 * (1 - 0.8**k):.4g}-seed0-" in listed, k
    assert main([*argv[:-4], "2", "..", "18"]) == 2
    assert "write FIRST SECOND .. LAST" in capsys.readouterr().err


def test_slurm_executor_submits_one_job_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Slurm path up to the scheduler: a fake `sbatch` records the script submitit writes
    for our job array (one task per pending run) and answers with a job id."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "submitted.sh"
    fake = bin_dir / "sbatch"
    s = spec(seeds=[0, 1])
    out = tmp_path / "sw"
    system_path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(bin_dir))  # no Slurm: a clear error, nothing written
    with pytest.raises(sw.SweepError, match="sbatch and srun not found"):
        sw.run_sweep(s, out, executor="slurm", log=quiet)
    assert not out.exists()
    fake.write_text(f'#!/bin/sh\ncp "$1" {script}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in (fake, bin_dir / "srun"):
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{system_path}")
    s.slurm = {"partition": "gpu", "time_minutes": 90, "gpus_per_task": 1,
               "array_parallelism": 2}  # fmt: skip
    summary = sw.run_sweep(s, out, executor="slurm", log=quiet)
    assert summary.pending and summary.submitted == [f"4242_{k}" for k in range(4)]
    text = script.read_text()
    for flag in ("--array=0-3%2", "--partition=gpu", "--time=90", "--gpus-per-node=1",
                 "--job-name=ntksap-sw"):  # fmt: skip
        assert f"#SBATCH {flag}" in text, flag
    assert not (out / INDEX_FILE).exists()  # cluster jobs never share the index
    assert all(runs.status(c.folder) == "new" for c in sw.plan(s, out))  # nothing ran here


def test_a_missing_data_set_is_one_error_before_any_work(tmp_path: Path) -> None:
    s = sw.Sweep.from_dict(
        {
            "run": {"dataset": "cifar10", "model": "resnet20", "data_dir": str(tmp_path / "no")},
            "grid": {"methods": ["random", "snip"], "sparsities": [0.9, 0.95], "seeds": [0]},
        }
    )
    with pytest.raises(sw.SweepError, match=r"data set 'cifar10' cannot be read: .*no data set"):
        sw.run_sweep(s, tmp_path / "sw", log=quiet)
    assert not (tmp_path / "sw").exists()  # no failed run folders to clean up


def test_flag_value_none_is_the_choice_none_where_an_option_has_it(tmp_path, capsys):
    """--axis init=auto,none / --set ntksap.init=none: "none" is ntksap's init choice, not
    None (which the option refuses); elsewhere "none" still reads as None."""
    out = tmp_path / "sw"
    base = ["sweep", "--dataset", "digits", "--methods", "ntksap", "--sparsities", "0.9",
            "--out", str(out), "--dry-run"]  # fmt: skip
    assert main([*base, "--axis", "init=auto,none"]) == 0
    printed = capsys.readouterr().out
    assert "initnone" in printed and "initauto" in printed
    assert main([*base, "--set", "ntksap.init=none"]) == 0
    assert sw.none_as_choice("num_samples", None, ["ntksap"]) is None  # allow_none: stays None
    assert sw.none_as_choice("ntksap.init", "none", []) == "none"
