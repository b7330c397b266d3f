"""Launch a 2-process CPU (gloo) job with torch.distributed.run for the tests.

gloo occasionally aborts a rank while the process group is torn down at the end of an
otherwise finished job ("terminate called without an active exception", the rank dies of
SIGABRT, the launcher then stops the other with SIGTERM): seen once in about 100 runs of
tests/ddp_worker.py on the 2-core CI machine. That is a crash of the transport, not a
wrong result, so `torchrun` launches the job once more when, and only when, a rank died of
a signal; any other failure (a Python exception, a wrong value, a timeout) fails at once.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

#: The launcher's error report names a rank killed by a signal as "Signal 6 (SIGABRT)";
#: a Python exception in a rank is reported with exit code 1 and its traceback instead.
_TEARDOWN_CRASH = ("Signal 6 (SIGABRT)", "Signal 11 (SIGSEGV)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    args: Sequence[str],
    env: dict[str, str],
    timeout: float = 300,
    reset: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m torch.distributed.run --nproc_per_node=2 ARGS`, output captured.

    Returns the completed process of the last attempt (its returncode is for the caller
    to check); a second attempt only after a rank died of SIGABRT/SIGSEGV, after `reset()`
    (e.g. removing the first attempt's output folder).
    """
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args],
            env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        crashed = any(s in proc.stderr for s in _TEARDOWN_CRASH)
        if proc.returncode == 0 or not crashed or attempt == 1:
            return proc
        print(f"torchrun: a rank died of a signal, launching again:\n{proc.stderr[-3000:]}")
        if reset is not None:
            reset()
    raise AssertionError("unreachable")
