"""The `ntksap` command line: one module per command, shared flags in `common`.

The library never imports this package (a test checks the import graph): everything a
command does is a library call (`ntksap.prune`, `ntksap.runs.run`, `ntksap.analysis`), so
sweeps and notebooks get the same behaviour without argparse.

Examples:
    $ ntksap list
    $ ntksap prune --model resnet20 --method ntksap --sparsity 0.982 --out r20.safetensors
    $ ntksap run --dataset mnist5k --model lenet5 --method ntksap --sparsity 0.9 --out runs/m5k
    $ ntksap demo
    >>> main(["list"])  # doctest: +SKIP
    0

Exit codes: 0 success; 2 a user error (bad flag or value, unknown name, unusable
combination, a run folder in use or already there), printed as `ntksap: error: <message>`
without a traceback (`--debug` shows it); 3 a run whose training diverged (loss NaN/inf);
1 a failure while running (e.g. the model rejects the input); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ntksap import __version__
from ntksap.cli import demo, export, listing, prune, report, spectrum, sweep, train
from ntksap.cli.common import UsageError

__all__ = ["UsageError", "build_parser", "main"]

COMMANDS = (prune, train, sweep, report, spectrum, export, listing, demo)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `ntksap` command (choices read from the registries)."""
    parser = argparse.ArgumentParser(
        prog="ntksap",
        description="Prune neural networks at initialisation: NTK-SAP and the standard baselines.",
    )
    parser.add_argument(
        "--version", action="version", version=f"ntksap {__version__} (torch {torch.__version__})"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="{prune,train,run,sweep,report,spectrum,export,list,demo}",
        required=True,
    )
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `ntksap` command with `argv` (default: sys.argv[1:]); returns the exit code.

    Bad flags make argparse raise SystemExit(2) with a usage message; errors found later
    (bad values, unusable combinations) print `ntksap: error: ...` and return 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("ntksap: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError) as exc:
        # ValueError covers MaskError, DatasetError, RunFolderError and UnknownNameError;
        # OSError a full disk or an unwritable folder
        if args.debug:
            raise
        print(f"ntksap: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, ArithmeticError) as exc:  # e.g. the model rejects the input
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"ntksap: error: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1
