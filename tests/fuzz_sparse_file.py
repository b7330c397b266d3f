"""Structure-aware fuzzer of the ntksap.sparse file format (`ntksap.sparse.load`).

It starts from real saved models: the zoo MLP (an untraceable "python" part), LeNet-5 (a
traced graph with pooling modules) and ResNet-20 (its convolutional trunk one SparseChain
when the C++ kernels are built), converted without the autotune. Each case forges one to
three things in a copy: a value anywhere in the metadata JSON (nasty integers, sizes,
strings with code in them, other parts of the same file, deleted or added keys, shuffled
lists) or a tensor (values poked into rowptr / col_idx / values, dtypes, shapes, missing,
extra or renamed tensors). Hypothesis draws the cases (and shrinks a failing one).

Every case is loaded and run on the base model's input in a worker subprocess with a
memory limit (RLIMIT_DATA: the heap and anonymous mappings, not the address space torch
reserves; the worker checks at start that a 2 GiB allocation is refused) and a time limit.
One worker takes case after case and is restarted after a crash or a hang. A case passes
when it is refused with a clear error (load: ValueError; the call: ValueError / TypeError /
RuntimeError, with a message) or loads and runs (equal to the original output, or a
different but valid model: a flipped `relu` flag is a different model). It fails on a
signal, a hang, an allocation past the limit, code from the file running (a marker file),
or another exception class (KeyError, AttributeError, RecursionError, IndexError, ...).

Usage (`make fuzz`):
    python tests/fuzz_sparse_file.py --examples 2000

prints how many files were tried, how many loaded and ran equal (or different), how many
were refused and with which error classes, and every failing case (exit status 1).

Example:
    >>> Outcome("refused-load", "ValueError", "bad").ok, Outcome("crash", "", "SIGSEGV").ok
    (True, False)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BASES = ("mlp", "lenet5", "resnet20")
MARKER = "fuzz_pwned"  # created by the injected code if it ever runs (worker's folder)
MEMORY_LIMIT_MIB = 1536  # beyond what torch and the models use at start
CALL_ERRORS = ("ValueError", "TypeError", "RuntimeError", "NotImplementedError")
LOAD_ERRORS = ("ValueError", "FileNotFoundError")


@dataclass
class Outcome:
    """What one case did: kind in equal / different / refused-load / refused-call (fine),
    or memory / crash / hang / code-ran / unclear-load / unclear-call (failures)."""

    kind: str
    error: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in ("equal", "different", "refused-load", "refused-call")


# -- worker (the subprocess) ----------------------------------------------------------------


def _worker_main(limit_mib: int) -> None:
    """Read case lines from stdin, answer one JSON line each on stdout."""
    import torch

    import ntksap.sparse as sp

    torch.set_num_threads(1)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not break the protocol
    data_now = _vm_data_mib()
    limit = (data_now + limit_mib) << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:  # the limit must really stop an allocation bomb
        torch.empty((limit_mib + 512) << 18)
        raise SystemExit("the memory limit did not stop a large allocation")
    except RuntimeError:
        pass
    refs: dict[str, tuple[Any, Any]] = {}

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True, "vm_data_mib": data_now})
    for line in sys.stdin:
        case = json.loads(line)
        if case.get("selftest") == "crash":  # the harness's own tests: a dying worker,
            os.kill(os.getpid(), signal.SIGSEGV)
        if case.get("selftest") == "bomb":  # an allocation past the limit
            try:
                torch.ones((limit_mib + 256) << 18)
                reply({"kind": "equal"})
            except Exception as exc:
                reply(_error("refused-call", exc))
            continue
        if case.get("base_file"):  # the unmodified files: their outputs are the reference
            model = sp.load(case["base_file"])
            x = _input(case["base"])
            with torch.no_grad():
                refs[case["base"]] = (x, model(x))
            reply({"kind": "ready"})
            continue
        x, want = refs[case["base"]]
        reply(_run_case(sp, torch, case["path"], x, want))


def _run_case(sp: Any, torch: Any, path: str, x: Any, want: Any) -> dict[str, str]:
    with contextlib.suppress(FileNotFoundError):
        os.remove(MARKER)
    result = _load_and_call(sp, torch, path, x, want)
    if os.path.exists(MARKER):
        return {"kind": "code-ran", "error": "", "message": "the marker file appeared"}
    return result


def _load_and_call(sp: Any, torch: Any, path: str, x: Any, want: Any) -> dict[str, str]:
    try:
        model = sp.load(path)
    except Exception as exc:
        return _error("refused-load" if type(exc).__name__ in LOAD_ERRORS else "unclear-load", exc)
    try:
        with torch.no_grad():
            got = model(x)
            again = model(x)
    except Exception as exc:
        return _error("refused-call" if type(exc).__name__ in CALL_ERRORS else "unclear-call", exc)
    if not torch.is_tensor(got):
        return {"kind": "different", "error": "", "message": type(got).__name__}
    stable = torch.is_tensor(again) and got.shape == again.shape
    if stable and not torch.equal(got.nan_to_num(0.0), again.nan_to_num(0.0)):
        return {"kind": "unclear-call", "error": "", "message": "two calls differ"}
    same = (
        got.shape == want.shape
        and got.dtype == want.dtype
        and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    )
    return {"kind": "equal" if same else "different", "error": "", "message": ""}


def _error(kind: str, exc: BaseException) -> dict[str, str]:
    message = str(exc)
    if isinstance(exc, MemoryError) or "can't allocate memory" in message:
        kind = "memory"
    elif not message.strip():
        kind = kind.replace("refused", "unclear")
    return {"kind": kind, "error": type(exc).__name__, "message": message[:400]}


def _vm_data_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) // 1024
    return 0


def _input(base: str) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    shape = {"mlp": (2, 1, 28, 28), "lenet5": (2, 1, 28, 28), "resnet20": (17, 3, 32, 32)}
    return torch.randn(shape[base], generator=gen)


# -- the parent side ------------------------------------------------------------------------


class Worker:
    """The worker subprocess: one case at a time, restarted after a crash or a hang."""

    def __init__(self, folder: Path, bases: dict[str, Path], timeout_s: float = 30.0) -> None:
        self.folder = folder
        self.bases = bases
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.restarts = 0

    def _start(self) -> None:
        log = open(self.folder / "worker.log", "a")  # noqa: SIM115 (the worker keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(MEMORY_LIMIT_MIB)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=self.folder,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        log.close()
        first = self._read(120.0)
        if first is None or not first.get("ready"):
            raise RuntimeError(f"the fuzz worker did not start: {self._log_tail()}")
        for base, path in self.bases.items():
            answer = self._ask({"base": base, "base_file": str(path)}, 120.0)
            if answer is None or answer.get("kind") != "ready":
                raise RuntimeError(f"the fuzz worker could not load {path}: {self._log_tail()}")

    def _log_tail(self) -> str:
        text = (self.folder / "worker.log").read_text(errors="replace")
        return text[-2000:]

    def _read(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:  # the worker closed its output: it died
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            return None
        return json.loads(line)

    def _ask(self, case: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        return self._read(timeout)

    def run(self, base: str, path: Path) -> Outcome:
        """Load `path` and call it on `base`'s input, in the worker."""
        return self.run_raw({"base": base, "path": str(path)})

    def run_raw(self, case: dict[str, Any]) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        answer = self._ask(case, self.timeout_s)
        if answer is not None:
            return Outcome(answer["kind"], answer.get("error", ""), answer.get("message", ""))
        assert self.proc is not None
        if self.proc.poll() is None:  # still running: a hang
            self.stop()
            self.restarts += 1
            return Outcome("hang", "", f"no answer within {self.timeout_s:.0f} s")
        code = self.proc.returncode
        tail = self._log_tail()[-600:]
        self.proc = None
        self.restarts += 1
        what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        return Outcome("crash", "", f"worker died ({what}); log tail: {tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait()
        self.proc = None


def build_bases(folder: Path) -> dict[str, Path]:
    """Save the three base models (small, no autotune) into `folder`."""
    import torch

    import ntksap.sparse as sp
    from ntksap import models
    from ntksap.masks import Masks

    out = {}
    for name in BASES:
        torch.manual_seed(0)
        net = models.create(name, **({"hidden": (32,)} if name == "mlp" else {}))
        gen = torch.Generator().manual_seed(1)
        masks = Masks(
            {
                n: torch.rand(p.shape, generator=gen) >= 0.9
                for n, p in net.named_parameters()
                if n.endswith("weight") and p.dim() in (2, 4)
            }
        )
        fast = sp.convert(net, masks, example_input=_input(name), autotune=False)
        if name == "lenet5":  # a dense-mode layer too (densified on load)
            fast.layers()["fc2"].set_mode("dense")
        out[name] = sp.save(fast, folder / f"{name}.safetensors")
    return out


# -- mutations ------------------------------------------------------------------------------

INJECTIONS = [
    f'x=open("{MARKER}", "w")',
    f'a") if open("{MARKER}", "w") else getattr(self, "a',
    f'start_dim=1 if open("{MARKER}", "w") else 0, end_dim',
    f"__import__('os').system('touch {MARKER}')",
    f'x; open("{MARKER}", "w")',
    "__class__",
    "__globals__",
    "__init__",
    "forward",
    "new_ones",
    "repeat",
    "expand",
    "builtins.eval",
    "os.system",
    "torch.load",
    "../../etc/passwd",
    "net.",
    "",
    "x" * 5000,
    "é\n\x00",
]
NASTY_INTS = [0, -1, 1, 2, 3, 7, 16, 30000, 2**31 - 1, 2**31, -(2**31) - 1, 2**53, 2**63, 10**30]
NASTY_FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e308, 0.5, -1.5]


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _pool(meta: Any) -> list[Any]:
    """Values seen in the file (other node names, targets, specs, sizes), copied: swapping
    them around makes structurally plausible forgeries."""
    return [copy.deepcopy(_get(meta, p)) for p in _paths(meta)[1:]]


def _forged_value(st: Any, original: Any, pool: list[Any]) -> Any:
    """Mostly a value of the original's type (so the forgery gets past the type checks and
    into the sizes and the call), sometimes anything."""
    same = [v for v in pool if type(v) is type(original)][:200] or [original]
    anything = st.one_of(
        st.sampled_from(NASTY_INTS),
        st.sampled_from(NASTY_FLOATS),
        st.sampled_from(INJECTIONS),
        st.sampled_from([None, True, False, [], {}, [[[[1]]]], {"__node__": "x"}]),
        st.sampled_from(pool),
    )
    if isinstance(original, bool):
        typed = st.just(not original)
    elif isinstance(original, int):
        near = [original + 1, original - 1, -original, 2 * original, original * 1000, 0]
        typed = st.one_of(st.sampled_from(near), st.sampled_from(NASTY_INTS), st.sampled_from(same))
    elif isinstance(original, float):
        typed = st.sampled_from([*NASTY_FLOATS, original * 2, -original])
    elif isinstance(original, str):
        typed = st.one_of(st.sampled_from(same), st.sampled_from(INJECTIONS), st.text(max_size=12))
    elif isinstance(original, list):
        typed = st.one_of(
            st.sampled_from([original[::-1], original[:-1], [*original, *original], []]),
            st.sampled_from(same),
        )
    elif isinstance(original, dict):
        typed = st.sampled_from(same)
    else:
        return anything
    return st.one_of(typed, typed, typed, anything)


def mutate_json(draw: Any, st: Any, meta: dict[str, Any]) -> str:
    paths = _paths(meta)[1:]
    path = draw(st.sampled_from(paths))
    parent = _get(meta, path[:-1])
    key = path[-1]
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "swap"]))
    if op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["extra", "__node__", "kind", "exec"]))] = draw(
            _forged_value(st, None, _pool(meta))
        )
    elif op == "add":
        parent.insert(key, draw(_forged_value(st, parent[key], _pool(meta))))
    elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
        other = draw(st.integers(0, len(parent) - 1))
        parent[key], parent[other] = parent[other], parent[key]
    else:
        parent[key] = draw(_forged_value(st, parent[key], _pool(meta)))
    return f"json {op} at {'/'.join(map(str, path))}"


def mutate_tensor(draw: Any, st: Any, tensors: dict[str, Any]) -> str:
    import torch

    key = draw(st.sampled_from(sorted(tensors)))
    t = tensors[key]
    ops = ["poke", "poke", "poke", "dtype", "truncate", "extend", "reshape", "delete", "extra"]
    op = draw(st.sampled_from([*ops, "rename", "empty", "swap"]))
    if op == "poke" and t.numel():
        i = draw(st.integers(0, t.numel() - 1))
        flat = t.reshape(-1).clone()
        if flat.dtype.is_floating_point:
            value: Any = draw(st.sampled_from(NASTY_FLOATS))
        elif flat.dtype == torch.bool:
            value = not bool(flat[i])
        else:
            big = torch.iinfo(flat.dtype).max
            value = draw(st.sampled_from([-1, 0, 1, int(flat.max()) + 1, big, -big - 1, 7]))
        with contextlib.suppress(RuntimeError, OverflowError):  # not representable: skip
            flat[i] = value
        tensors[key] = flat.reshape(t.shape)
    elif op == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float64, torch.float16,
                                      torch.float32, torch.uint8, torch.bool]))  # fmt: skip
        tensors[key] = t.to(dtype)
    elif op == "truncate":
        tensors[key] = t.reshape(-1)[: draw(st.integers(0, max(t.numel() - 1, 0)))].clone()
    elif op == "extend":
        fill = draw(st.sampled_from([0, 1, -1, 100000]))
        extra = torch.full((draw(st.integers(1, 5)),), fill).to(t.dtype)
        tensors[key] = torch.cat([t.reshape(-1), extra])
    elif op == "reshape":
        tensors[key] = t.reshape(1, -1).clone()
    elif op == "delete":
        del tensors[key]
    elif op == "extra":
        tensors[key + draw(st.sampled_from(["x", ".extra", "_0"]))] = t.clone()
    elif op == "rename":
        other = draw(st.sampled_from(sorted(tensors)))
        tensors[other] = tensors.pop(key)
    elif op == "empty":
        tensors[key] = t.reshape(-1)[:0].clone()
    elif op == "swap":
        other = draw(st.sampled_from(sorted(tensors)))
        tensors[key], tensors[other] = tensors[other], tensors[key]
    return f"tensor {op} of {key}"


def forge_case(draw: Any, st: Any, base: Path, dst: Path) -> str:
    """Write a forged copy of `base` to `dst`; the description of what was forged."""
    sys.path.insert(0, str(HERE))
    from sparse_file_forge import read, write

    meta, tensors = read(base)
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0 and tensors:
            steps.append(mutate_tensor(draw, st, tensors))
        else:
            steps.append(mutate_json(draw, st, meta))
    write(dst, None, tensors, json.dumps(meta))
    return "; ".join(steps)


# -- running --------------------------------------------------------------------------------


class Fuzzer:
    """Bases, the worker and the tallies of one fuzz run."""

    def __init__(self, folder: Path, timeout_s: float = 30.0) -> None:
        self.folder = folder
        self.bases = build_bases(folder)
        self.worker = Worker(folder, self.bases, timeout_s)
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.failures: list[tuple[str, str, Outcome]] = []
        self.reasons: collections.Counter[str] = collections.Counter()
        self.tried = 0

    def case(self, draw: Any, st: Any) -> Outcome:
        base = draw(st.sampled_from(BASES))
        path = self.folder / "case.safetensors"
        what = forge_case(draw, st, self.bases[base], path)
        outcome = self.worker.run(base, path)
        self.tried += 1
        self.counts[outcome.kind] += 1
        if outcome.error:
            self.errors[f"{outcome.kind}: {outcome.error}"] += 1
            # the rule, without the file name and the numbers
            rule = re.sub(r"\d+", "N", outcome.message.split(".safetensors: ")[-1])
            self.reasons[f"{outcome.kind}: {rule[:110]}"] += 1
        if not outcome.ok:
            keep = self.folder / f"failure-{len(self.failures)}.safetensors"
            path.replace(keep)
            self.failures.append((f"{base}: {what}", str(keep), outcome))
        return outcome

    def report(self) -> str:
        lines = [
            f"files tried: {self.tried} (worker restarts: {self.worker.restarts})",
            f"loaded and ran, equal output: {self.counts['equal']}",
            f"loaded and ran, different output (a valid other model): {self.counts['different']}",
            f"refused by load: {self.counts['refused-load']}",
            f"refused at the call: {self.counts['refused-call']}",
            "error classes:",
            *(f"  {k}: {v}" for k, v in sorted(self.errors.items())),
            "most common reasons:",
            *(f"  {v:5d}  {k}" for k, v in self.reasons.most_common(12)),
            f"failures: {len(self.failures)}",
        ]
        for what, keep, outcome in self.failures:
            lines.append(f"  [{outcome.kind}] {what} -> {keep}: {outcome.error} "
                         f"{outcome.message[:300]}")  # fmt: skip
        return "\n".join(lines)

    def close(self) -> None:
        self.worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--keep", type=Path, default=None, help="folder for failing files")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker_main(args.worker)
        return 0
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    folder = args.keep or Path(tempfile.mkdtemp(prefix="ntksap-fuzz-"))
    folder.mkdir(parents=True, exist_ok=True)
    fuzzer = Fuzzer(folder, args.timeout)
    start = time.perf_counter()

    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # every failure is kept and listed; no shrinking here
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def run(data: Any) -> None:
        fuzzer.case(data.draw, st)

    if args.seed is not None:
        run = seed(args.seed)(run)
    try:
        run()
    finally:
        fuzzer.close()
    print(fuzzer.report())
    print(f"({time.perf_counter() - start:.0f} s; files in {folder})")
    return 1 if fuzzer.failures else 0


if __name__ == "__main__":
    sys.exit(main())
