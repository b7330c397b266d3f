"""`ntksap report`: the results of one or more sweeps (or run folders) as a table and plots.

Reads the run folders (their result.json, metrics.jsonl and masks are the truth), refreshing
each sweep folder's SQLite index on the way (--rebuild: from scratch), and writes into --out
(default SWEEP/report): report.md and results.csv (rows methods, columns sparsities, cells
mean ± std of the final top-1 over seeds with n; best per column in bold, ties within the
seed spread marked), accuracy_vs_sparsity.png (remaining weights on a log axis, as the
paper's figures), layer_density.png (per-layer density per method at one sparsity) and
training_curves.png. With --paper the NTK-SAP paper's published numbers are shown beside
ours where the setting matches.

Examples:
    $ ntksap report sweeps/m5k
    $ ntksap report sweeps/c10-shard0 sweeps/c10-shard1 --out reports/c10 --paper
    $ ntksap report sweeps/m5k --rebuild --layer-sparsity 0.98
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from ntksap.cli.common import UsageError, finite_float
from ntksap.experiments import report
from ntksap.experiments.index import INDEX_FILE, RUNS_DIR, SWEEP_FILE, Index
from ntksap.experiments.records import Record, find_run_folders, read_record


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tables (markdown, CSV) and plots of sweeps, beside the paper's numbers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dirs", nargs="+", type=Path, help="sweep folders or run folders")
    p.add_argument("--out", type=Path, help="report folder (default: FIRST_DIR/report)")
    p.add_argument("--paper", action="store_true", help="the paper's published numbers beside")
    p.add_argument("--rebuild", action="store_true", help="rebuild each sweep's index first")
    p.add_argument(
        "--layer-sparsity",
        type=finite_float,
        metavar="S",
        help="sparsity of the per-layer density plot (default: the highest)",
    )
    p.set_defaults(func=cmd_report)


def is_sweep(folder: Path) -> bool:
    return any((folder / name).exists() for name in (SWEEP_FILE, INDEX_FILE, RUNS_DIR))


def collect(dirs: list[Path], *, rebuild: bool = False) -> list[Record]:
    """The records of every run under `dirs`; each sweep folder's index is brought up to date
    (a read-only one is read from its folders directly, with a note)."""
    folders: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"{d} is not a folder: give sweep folders or run folders")
        if is_sweep(d):
            index = Index(d)
            try:
                n = index.rebuild() if rebuild else index.sync()
                folders += [Path(r["folder"]) for r in index.rows()]
                if rebuild:
                    print(f"rebuilt {index.path} from {n} run folders")
                continue
            except (OSError, sqlite3.Error) as exc:
                print(
                    f"note: cannot update {index.path} ({exc}); reading the folders",
                    file=sys.stderr,
                )
        folders += find_run_folders([d])
    unique = sorted({f.resolve() for f in folders})
    if not unique:
        raise UsageError(f"no run folders (with config.json) in {', '.join(map(str, dirs))}")
    return [read_record(f) for f in unique]


def cmd_report(args: argparse.Namespace) -> int:
    records = collect(args.dirs, rebuild=args.rebuild)
    out = args.out if args.out is not None else args.dirs[0] / "report"
    paths = report.write_report(records, out, paper=args.paper, layer_sparsity=args.layer_sparsity)
    print(paths["report.md"].read_text().split("\n## Figures")[0].rstrip())
    print(f"\nwritten to {out}: " + ", ".join(sorted(p.name for p in paths.values())))
    return 0
