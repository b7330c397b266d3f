"""A small budget of the structure-aware fuzzer of ntksap.sparse files
(`tests/fuzz_sparse_file.py`; `make fuzz` runs a larger one): forged copies of saved MLP,
LeNet-5 and ResNet-20 files are each either refused with a clear error or load and run,
in a worker subprocess with a memory and a time limit; never a crash, a hang, an
allocation past the limit or code from the file running."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_sparse_file import Fuzzer, Outcome
from sparse_file_forge import forge


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory) -> Iterator[Fuzzer]:
    f = Fuzzer(tmp_path_factory.mktemp("fuzz"), timeout_s=60.0)
    yield f
    f.close()


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    derandomize=True,  # the same cases on every run of the suite
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_forged_files_are_refused_clearly_or_run(fuzzer: Fuzzer, data: Any) -> None:
    outcome = fuzzer.case(data.draw, st)
    assert outcome.ok, (outcome, fuzzer.failures[-1][0])


def test_the_unmodified_files_run_and_equal_their_reference(fuzzer: Fuzzer, tmp_path) -> None:
    for base, path in fuzzer.bases.items():
        copy = forge(path, tmp_path / f"{base}.safetensors", lambda m, t: None)
        assert fuzzer.worker.run(base, copy) == Outcome("equal")


def test_the_worker_reports_code_that_ran_a_crash_and_a_memory_bomb(
    fuzzer: Fuzzer, tmp_path
) -> None:
    # the harness itself: a file whose placeholder would write the marker is refused, a
    # worker that dies on a signal is a "crash" (and restarted), an allocation past the
    # memory limit is a "memory" failure, not a pass
    def inject(meta: dict, _tensors: dict) -> None:
        meta["structure"]["nodes"][0]["target"] = 'x=open("fuzz_pwned", "w")'

    path = forge(fuzzer.bases["lenet5"], tmp_path / "inject.safetensors", inject)
    assert fuzzer.worker.run("lenet5", path).kind == "refused-load"
    assert not (fuzzer.folder / "fuzz_pwned").exists()
    restarts = fuzzer.worker.restarts
    crash = fuzzer.worker.run_raw({"selftest": "crash"})
    assert crash.kind == "crash" and "SIGSEGV" in crash.message and not crash.ok
    assert fuzzer.worker.run("lenet5", path).kind == "refused-load"  # a fresh worker
    assert fuzzer.worker.restarts == restarts + 1
    bomb = fuzzer.worker.run_raw({"selftest": "bomb"})
    assert bomb.kind == "memory" and not bomb.ok, bomb
