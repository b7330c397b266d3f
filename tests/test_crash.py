"""Crash test: SIGKILL a real `python -m ntksap run` at chosen moments, resume it with
`--resume` (killing a resume too), and check that the run ends exactly as an uninterrupted
run: same final weights, mask, metrics (timings aside), result, and no stray files.

Kill points, each recorded from the files present once the process is dead:
    start  before config.json (imports, the claim)
    a      pruning: config.json written, mask.safetensors not yet
    b      mask.safetensors saved, no checkpoint.pt yet
    c      training: checkpoint.pt written, result.json not yet
    done   result.json written, the process not yet exited (the resume must change nothing)
with "+tmp" when a killed write left its temporary file (`.NAME.tmp<pid>`) behind.
A kill point that the process ran past (it wrote the next file first, or finished) is
noticed and tried again in a fresh folder; the last test asserts that stages a, b and c
were each hit.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ntksap.masks import Masks
from ntksap.runs import CONFIG_FILE, LAYERS_FILE, LOCK_FILE, MASK_FILE, RESULT_FILE
from ntksap.training.checkpoint import load_checkpoint
from ntksap.training.loop import CHECKPOINT_FILE, METRICS_FILE

# Pruning (20 rounds x 5 resamples) lasts about 1-2 s here, an epoch about 0.05-0.2 s.
ARGS = [
    "--dataset", "digits", "--model", "lenet5", "--method", "ntksap", "--sparsity", "0.9",
    "--epochs", "4", "--no-progress", "--rounds", "20", "--resamples", "5",
]  # fmt: skip
EPOCHS = 4
# One thread per process: identical numbers whatever the thread count, and no OpenMP
# spin-waits fighting other processes for the 2 cores (which makes timings erratic).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMING_KEYS = {"seconds", "wall_seconds", "images_per_s"}
TEMPORARY = re.compile(r"^\..+\.tmp\d+$")  # ntksap.files.temporary_path
POLL_S = 0.002
PROCESS_TIMEOUT_S = 120
ATTEMPTS = 3  # tries at a kill point the process may run past
RANDOM_SEED = 20240611

#: case -> the stages its kills hit (filled by the parametrised cases, read by the last test)
HITS: dict[str, list[str]] = {}


# ---------------------------------------------------------------------------------------
# Processes and kills
# ---------------------------------------------------------------------------------------
def start(out: Path, log: Path, resume: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "ntksap", "run", *ARGS, "--out", str(out)]
    with log.open("wb") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [*argv, "--resume"] if resume else argv, stdout=f, stderr=subprocess.STDOUT, env=ENV
        )


def wait(proc: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return proc.wait(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"ntksap run took over {PROCESS_TIMEOUT_S} s:\n{log.read_text()}")


def stage(out: Path) -> str:
    """How far the run in `out` got, from the files it holds."""
    names = set(os.listdir(out)) if out.is_dir() else set()
    if RESULT_FILE in names:
        return "done"
    if CHECKPOINT_FILE in names:
        return "c"
    if MASK_FILE in names:
        return "b"
    if CONFIG_FILE in names:
        return "a"
    return "start"


#: (run folder, seconds since the process started) -> kill now?
When = Callable[[Path, float], bool]


def pruning(out: Path, _t: float) -> bool:
    return (out / CONFIG_FILE).is_file() and not (out / MASK_FILE).is_file()


def mask_saved(out: Path, _t: float) -> bool:
    return (out / MASK_FILE).is_file()


def checkpointed(out: Path, _t: float) -> bool:
    return (out / CHECKPOINT_FILE).is_file()


def writing_checkpoint(out: Path, _t: float) -> bool:
    names = os.listdir(out) if out.is_dir() else []
    return any(n.startswith(f".{CHECKPOINT_FILE}.tmp") for n in names)


def after(seconds: float) -> When:
    return lambda _out, t: t >= seconds


def kill_when(proc: subprocess.Popen[bytes], out: Path, when: When, log: Path) -> str | None:
    """SIGKILL `proc` as soon as `when` holds; the stage it died in, or None if it exited
    by itself first (finished: the kill point was missed)."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            break
        t = time.monotonic() - t0
        if when(out, t):
            os.kill(proc.pid, signal.SIGKILL)  # not yet reaped: the pid is still ours
            break
        if t > PROCESS_TIMEOUT_S:
            proc.kill()
            pytest.fail(f"the kill point never came within {PROCESS_TIMEOUT_S} s")
        time.sleep(POLL_S)
    code = wait(proc, log)
    if code == -signal.SIGKILL:
        return stage(out) + ("+tmp" if leftovers(out) else "")
    assert code == 0, f"ntksap run failed before the kill point (exit {code}):\n{log.read_text()}"
    return None


# ---------------------------------------------------------------------------------------
# What a run folder holds
# ---------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    result: dict[str, Any]
    masks: Masks
    model: dict[str, torch.Tensor]
    epoch: int
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    layers: str


def metric_rows(out: Path) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl, parsed strictly (a torn line left behind is an error)."""
    path = out / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(out: Path) -> Snapshot:
    state = load_checkpoint(out / CHECKPOINT_FILE)
    return Snapshot(
        result=json.loads((out / RESULT_FILE).read_text()),
        masks=Masks.load(out / MASK_FILE),
        model=state["model"],
        epoch=state["epoch"],
        metrics=metric_rows(out),
        config=json.loads((out / CONFIG_FILE).read_text()),
        layers=(out / LAYERS_FILE).read_text(),
    )


def leftovers(out: Path) -> list[str]:
    names = os.listdir(out) if out.is_dir() else []  # killed before the claim: no folder
    return sorted(n for n in names if TEMPORARY.match(n))


def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_run(out: Path, ref: Snapshot) -> None:
    got = snapshot(out)
    assert got.result["status"] == "finished", got.result
    for key in ("final_top1", "best_top1", "density"):
        assert got.result[key] == ref.result[key], key
    assert got.result["epochs_done"] == EPOCHS
    assert got.masks == ref.masks
    assert got.epoch == EPOCHS
    assert got.model.keys() == ref.model.keys()
    differ = [k for k in ref.model if not torch.equal(got.model[k], ref.model[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ}"
    assert [r["epoch"] for r in got.metrics] == list(range(1, EPOCHS + 1))
    assert untimed(got.metrics) == untimed(ref.metrics)
    assert got.config == ref.config
    assert got.layers == ref.layers  # same rows in the model's order (mask order kept)
    assert leftovers(out) == []


@dataclass
class Reference:
    snap: Snapshot
    seconds: float  # wall time of the uninterrupted process


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One uninterrupted run, shared by every case."""
    base = tmp_path_factory.mktemp("reference")
    out, log = base / "run", base / "run.log"
    t0 = time.monotonic()
    code = wait(start(out, log, resume=False), log)
    seconds = time.monotonic() - t0
    assert code == 0, log.read_text()
    assert leftovers(out) == []
    snap = snapshot(out)
    assert snap.result["status"] == "finished"
    assert [r["epoch"] for r in snap.metrics] == list(range(1, EPOCHS + 1))
    return Reference(snap, seconds)


# ---------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------
def crash_and_resume(folder: Path, kills: list[When], ref: Reference) -> list[str] | None:
    """Start the run, SIGKILL it when kills[0] holds, resume it and SIGKILL the resume when
    kills[1] holds, ...; then resume to the end and compare with the reference.

    Returns the stages the kills hit, or None if the process finished before a kill point
    (nothing is checked then: the caller tries again).
    """
    folder.mkdir(parents=True)
    out = folder / "run"
    hit = []
    for i, when in enumerate(kills):
        log = folder / f"kill{i}.log"
        died = kill_when(start(out, log, resume=i > 0), out, when, log)
        if died is None:
            return None
        hit.append(died)
        if died.startswith("done"):  # killed after result.json, while exiting: nothing left to kill
            break
    # what the resume must keep: the saved mask file and the epochs of the checkpoint
    mask = out / MASK_FILE
    mask_id = (mask.stat().st_ino, mask.stat().st_mtime_ns) if mask.exists() else None
    ckpt = out / CHECKPOINT_FILE
    done = load_checkpoint(ckpt)["epoch"] if ckpt.exists() else 0
    kept_rows = [r for r in metric_rows_lenient(out) if r["epoch"] <= done]
    assert [r["epoch"] for r in kept_rows] == list(range(1, done + 1))

    finished = contents(out) if hit[-1].startswith("done") else None

    log = folder / "resume.log"
    code = wait(start(out, log, resume=True), log)
    assert code == 0, f"--resume failed after kills at {hit}:\n{log.read_text()}"
    assert_same_run(out, ref.snap)
    if finished is not None:  # a finished run is left untouched
        assert contents(out) == finished
    if mask_id is not None:
        now = (mask.stat().st_ino, mask.stat().st_mtime_ns)
        assert now == mask_id, "the saved mask was rewritten: pruned again instead of re-used"
    # continued after the checkpoint's epoch: the rows before it are the killed run's own
    assert metric_rows(out)[:done] == kept_rows
    return hit


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE}


def metric_rows_lenient(out: Path) -> list[dict[str, Any]]:
    """The rows of a killed run's metrics.jsonl (its last line may be torn)."""
    rows = []
    path = out / METRICS_FILE
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


#: case -> (the stage each kill aims at, see `reached`; when each kill happens)
TARGETED: dict[str, tuple[list[str], list[When]]] = {
    "a-during-pruning": (["a"], [pruning]),
    "b-mask-saved-no-checkpoint": (["b"], [mask_saved]),
    "c-after-first-checkpoint": (["c"], [checkpointed]),
    # kill while pruning, then kill the resume (which prunes again) while it writes a
    # checkpoint: usually its first (the epoch's metrics row is on disk, the checkpoint is
    # not), leaving the temporary file behind for the next resume to remove
    "e-double-kill-pruning-then-writing-checkpoint": (["a", "+tmp"], [pruning, writing_checkpoint]),
}
CASES = [*TARGETED, "d-random-moment"]


def reached(hit: str, target: str) -> bool:
    """Stage `hit` is the one aimed at: "b" is met by "b" or "b+tmp", "b+tmp" by itself,
    "+tmp" by any stage with a temporary file left."""
    if target.startswith("+"):
        return hit.endswith(target)
    return hit == target or ("+" not in target and hit.partition("+")[0] == target)


def run_case(name: str, folder: Path, ref: Reference) -> list[str]:
    tries: list[str] = []
    if name == "d-random-moment":
        rng = random.Random(RANDOM_SEED)
        for attempt in range(2 * ATTEMPTS):
            seconds = rng.uniform(0.0, ref.seconds)
            hit = crash_and_resume(folder / f"try{attempt}", [after(seconds)], ref)
            tries.append(f"kill at {seconds:.2f} s of {ref.seconds:.2f} s: {hit or 'finished'}")
            if hit is not None:
                return hit
        pytest.fail(f"every random kill came after the run finished: {tries}")
    targets, kills = TARGETED[name]
    for attempt in range(ATTEMPTS):
        hit = crash_and_resume(folder / f"try{attempt}", kills, ref)
        tries.append(f"{hit or 'finished first'}")
        if hit is not None and len(hit) == len(targets) and all(map(reached, hit, targets)):
            return hit
    pytest.fail(f"{name}: aimed at stages {targets}, hit {tries} in {ATTEMPTS} tries")


@pytest.mark.parametrize("name", CASES)
def test_killed_run_resumes_to_the_same_result(
    name: str, tmp_path: Path, reference: Reference
) -> None:
    HITS[name] = run_case(name, tmp_path, reference)


def test_stages_a_b_c_were_each_hit(tmp_path: Path, reference: Reference) -> None:
    for name in CASES:  # cases deselected in this session: run them here
        if name not in HITS:
            HITS[name] = run_case(name, tmp_path / name, reference)
    print("stages hit:", HITS)  # shown with -s / -rP
    hit = {s.partition("+")[0] for stages in HITS.values() for s in stages}
    assert {"a", "b", "c"} <= hit, HITS
