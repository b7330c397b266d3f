"""`ntksap sweep`: methods x sparsities x seeds (x any setting), resumable, from a laptop to Slurm.

Every (cell, seed) is one run folder under SWEEP/runs/, exactly as `ntksap run` writes it,
named by a readable label and a hash of its settings. Running the same command again skips
finished runs, resumes interrupted ones and (with --retry-failed) re-runs failed ones; a run
that crashes or diverges is recorded with its error and the sweep goes on.

Examples:
    $ ntksap sweep configs/cifar10-resnet20.toml --out sweeps/c10 --data-dir data/cifar10
    $ ntksap sweep --dataset mnist5k --methods random snip ntksap --sparsities 0.95 0.98 \\
          --seeds 0 1 2 --epochs 10 --out sweeps/m5k
    $ ntksap sweep configs/cifar10-resnet20-ablations.toml --axis rounds=1,5,20 --out sweeps/T
    $ ntksap sweep CONFIG --out DIR --shard 0/4           # one of 4 disjoint slices
    $ ntksap sweep CONFIG --out DIR --executor local --jobs 4
    $ ntksap sweep CONFIG --out DIR --executor slurm --partition gpu --time 1440
    $ ntksap report DIR

Flags override the config file: a flag that names a setting (--lr, --axis lr=..., --set
train.lr=...) replaces whatever the file gives for it, however the file spells it; two flags
for one setting are an error. --axis KEY=V1,V2 adds an axis (a pruning setting such as
rounds, schedule, scope, shuffle, invert, reinit; a method option such as resamples or
epsilon; or a training setting such as lr); --set KEY=VALUE fixes one (METHOD.KEY for one
method only, e.g. --set ntksap.rounds=20; a list as [a,b], e.g. --set exclude=[fc*]). Under a
Slurm job array (sbatch --array) the shard is read from SLURM_ARRAY_TASK_ID /
SLURM_ARRAY_TASK_COUNT.

A run folder whose config.json was edited by hand is listed as "edited" and left alone.

Exit codes: 0 every run of this invocation finished or diverged, 1 some failed, were busy or
were edited by hand, 2 bad input (nothing was run).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ntksap.cli.common import (
    UsageError,
    add_progress,
    device,
    finite_float,
    nonneg_float,
    nonneg_int,
    positive_int,
    progress,
    seed,
)
from ntksap.cli.train import add_training_arguments, train_overrides
from ntksap.experiments import sweep as sw
from ntksap.models import list_models
from ntksap.scoring import list_methods


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="methods x sparsities x seeds into run folders; resumable, sharded, Slurm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", type=Path, help="sweep file (TOML), e.g. configs/*.toml")
    p.add_argument("--out", type=Path, required=True, help="the sweep folder")
    g = p.add_argument_group("grid (each replaces the config file's)")
    g.add_argument("--methods", nargs="+", type=str.lower, choices=list_methods(), metavar="M")
    d = g.add_mutually_exclusive_group()
    d.add_argument("--sparsities", nargs="+", type=finite_float, metavar="S")
    d.add_argument("--densities", nargs="+", type=finite_float, metavar="D")
    d.add_argument(
        "--compression",
        nargs="+",
        metavar="K",
        help="densities 0.8**K; a range as in the paper's grid: 2 4 .. 18",
    )
    g.add_argument("--seeds", nargs="+", type=seed, metavar="N")
    g.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a further axis, e.g. rounds=1,5,20 or epsilon=1e-3,1e-2 or shuffle=false,true",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a fixed setting for every run (METHOD.KEY: for one method), e.g. resamples=1",
    )
    m = p.add_argument_group("setting")
    m.add_argument(
        "--model", type=str.lower, choices=list_models(), metavar="NAME", help="registered model"
    )
    add_training_arguments(p, run_folder=False)
    e = p.add_argument_group("execution")
    e.add_argument("--shard", type=str, metavar="I/N", help="run only slice I of N (0-based)")
    e.add_argument("--executor", choices=sw.EXECUTORS, help="default local (or the config's)")
    e.add_argument("--jobs", type=positive_int, help="runs at a time (local executors)")
    e.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    e.add_argument("--wait", action="store_true", help="slurm: wait for the jobs to end")
    e.add_argument("--dry-run", action="store_true", help="list the runs and their state only")
    e.add_argument("--quiet", action="store_true", help="one line per run, not per epoch")
    e.add_argument(
        "--device", dest="train_device", type=device, metavar="DEVICE", help="default: cuda, cpu"
    )
    add_progress(e)
    s = p.add_argument_group("slurm (or the config's [slurm] table)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--constraint")
    s.add_argument("--gpus-per-task", type=nonneg_int)
    s.add_argument("--cpus-per-task", type=positive_int)
    s.add_argument("--mem-gb", type=positive_int)
    s.add_argument("--time", dest="time_minutes", type=positive_int, metavar="MINUTES")
    s.add_argument("--array-parallelism", type=positive_int, metavar="N")
    p.set_defaults(func=cmd_sweep)


def expand_range(tokens: list[str]) -> list[float]:
    """Numbers, where "a b .. c" is a, a + (b - a), ... up to c (inclusive).

    >>> expand_range(["2", "4", "..", "18"])
    [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0]
    >>> expand_range(["2", "6", "10"])
    [2.0, 6.0, 10.0]
    """

    def number(text: str) -> float:
        try:
            return nonneg_float(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--compression: {exc}") from None

    if ".." not in tokens:
        return [number(t) for t in tokens]
    k = tokens.index("..")
    if k < 2 or k != len(tokens) - 2 or tokens.count("..") > 1:
        raise UsageError(
            f"bad range {' '.join(tokens)!r}: write FIRST SECOND .. LAST, e.g. 2 4 .. 18"
        )
    head = [number(t) for t in tokens[:k]]
    last = number(tokens[-1])
    step = head[-1] - head[-2]
    if step <= 0 or last < head[-1]:
        raise UsageError(f"bad range {' '.join(tokens)!r}: it must increase, e.g. 2 4 .. 18")
    values = list(head)
    while values[-1] + step <= last + 1e-9:
        values.append(round(values[-1] + step, 9))
    return values


def spec_from_args(args: argparse.Namespace) -> sw.Sweep:
    """The sweep: the config file (if any), then every flag given on top of it."""
    spec = sw.Sweep.from_toml(args.config) if args.config is not None else sw.Sweep()
    for key in ("preset", "model", "dataset"):
        if getattr(args, key) is not None:
            spec.base[key] = getattr(args, key)
    if args.data_dir is not None:
        spec.base["data_dir"] = str(args.data_dir)
    if args.sync_bn:
        raise UsageError("--sync-bn is for one run under torchrun; a sweep's runs are single")
    if args.methods:
        spec.methods = list(args.methods)
    flagged: dict[tuple[str, str], str] = {}  # setting -> the flag that gave it

    def take(key: tuple[str, str], flag: str) -> None:
        """A flag gives the setting `key`: the file's entries for it go, a second flag is an
        error."""
        if key in flagged:
            raise UsageError(f"{flagged[key]} and {flag} both set {key[1]}: give one")
        flagged[key] = flag
        spec.drop(key)

    flag_names = {"schedule": "lr-schedule"}
    for name, value in train_overrides(args).items():
        take(("train", name), f"--{flag_names.get(name, name).replace('_', '-')}")
        spec.train[name] = value
    if args.reinit:
        take(("run", "reinit"), "--reinit")
        spec.run["reinit"] = True
    if args.sparsities or args.densities or args.compression:
        spec.set_density_grid(
            sparsities=args.sparsities,
            densities=args.densities,
            compression=expand_range(args.compression) if args.compression else None,
        )
    if args.seeds:
        spec.seeds = list(args.seeds)
    for text in args.axis:
        key, values = sw.parse_assignment(text, many=True)
        values = sw.none_as_choice(key, values, spec.methods)
        take(sw.classify_axis(key, spec.methods), f"--axis {key}")
        spec.axes[key] = values
    for text in args.set:
        key, value = sw.parse_assignment(text, many=False)
        value = sw.none_as_choice(key, value, spec.methods)
        method, dot, rest = key.partition(".")
        if dot and method.lower() in list_methods():
            table = spec.per_method.setdefault(method.lower(), {})
            canon = sw.classify(rest, [method.lower()])
            for k in [k for k in table if _classified(k, method.lower()) == canon]:
                del table[k]  # the file's value for this method, however spelled
            table[rest] = value
            continue
        kind, name = sw.classify(key, spec.methods)
        take((kind, name), f"--set {key}")
        if kind == "option":
            spec.options[name] = value
        elif kind == "train":
            spec.train[name] = value
        else:
            spec.run[name] = value
    slurm = {
        k: getattr(args, k)
        for k in (
            "partition",
            "account",
            "qos",
            "constraint",
            "gpus_per_task",
            "cpus_per_task",
            "mem_gb",
            "time_minutes",
            "array_parallelism",
        )
        if getattr(args, k) is not None
    }
    spec.slurm.update(slurm)
    spec.validate()
    return spec


def _classified(key: str, method: str) -> tuple[str, str] | None:
    try:
        return sw.classify(key, [method])
    except sw.SweepError:
        return None  # validate names it


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    shard = sw.parse_shard(args.shard) if args.shard else None
    if args.dry_run:
        return _dry_run(spec, args.out, shard)
    summary = sw.run_sweep(
        spec, args.out, shard=shard, executor=args.executor, jobs=args.jobs,
        retry_failed=args.retry_failed, wait=args.wait, device=args.train_device,
        workers=args.workers, quiet=args.quiet, progress=progress(args.progress),
    )  # fmt: skip
    print(sw.describe(summary))
    if shard is None and sw.shard_from_environment() is None and not summary.pending:
        _print_table(args.out)
    else:
        print(f"`ntksap report {args.out}` gathers the results of every shard and job")
    return 0 if summary.ok else 1


def _dry_run(spec: sw.Sweep, out: Path, shard: tuple[int, int] | None) -> int:
    cells = sw.plan(spec, out)
    mine = sw.select_shard(cells, shard)
    states: dict[str, int] = {}
    for c in mine:
        state = sw.cell_status(c)
        states[state] = states.get(state, 0) + 1
        print(f"{state:11s} {c.folder}")
    print(f"{len(mine)} of {len(cells)} runs: " + ", ".join(f"{n} {k}" for k, n in states.items()))
    return 0


def _print_table(out: Path) -> None:
    """The results table of the sweep (all its runs, this invocation's and earlier ones)."""
    from ntksap.experiments import report
    from ntksap.experiments.index import Index

    table: Any = report.build_table(Index(out).records())
    print()
    print(report.to_markdown(table))
    print(f"\n`ntksap report {out}` writes this table as CSV and markdown, and the plots")
