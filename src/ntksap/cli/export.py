"""`ntksap export`: a pruned network as an ONNX file or an ntksap sparse model, checked.

MASK_OR_RUN is a mask file (`ntksap prune --out`: the zoo model is rebuilt from its metadata
with its initial weights) or a run folder (`ntksap run/train --out`: the trained weights of
its checkpoint, else the initial ones). The model is compacted first (dead channels
removed, constants folded into biases, pruned weights exact zeros; --no-compact exports it
as it is), written, then checked: onnxruntime (or the sparse loader) runs it on a random
batch and must agree with torch (rtol 1e-4, atol 1e-5), else the file is removed and the
command fails. An existing output file is never replaced without --force.

Examples:
    $ ntksap export r20.safetensors                       # -> r20.onnx
    $ ntksap export runs/m5k --format onnx --out m5k.onnx
    $ ntksap export runs/m5k --format sparse              # -> runs/m5k/model.sparse.safetensors

Exit codes: 0 written and checked; 2 bad input, or a model that cannot be compacted exactly
(nothing written); 1 the export failed or did not match torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ntksap import export as exporting
from ntksap.cli.common import UsageError, positive_int
from ntksap.models import list_models


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `export` on the `ntksap` command's subparsers."""
    p = sub.add_parser(
        "export",
        help="write a pruned network as ONNX or an ntksap sparse model (compacted, checked)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, metavar="MASK_OR_RUN", help="a mask file or run folder")
    p.add_argument(
        "--format",
        default="onnx",
        choices=list(exporting.FORMATS),
        help="onnx (any runtime) or sparse (ntksap.sparse.load); default onnx",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output file (default: MASK.onnx / MASK.sparse.safetensors, or RUN/model.onnx)",
    )
    p.add_argument(
        "--no-compact",
        dest="compact",
        action="store_false",
        help="export the masked model as it is (dead channels stay)",
    )
    p.add_argument(
        "--model",
        choices=list_models(),
        metavar="NAME",
        help="the zoo model the masks must be for (default: the one their metadata names)",
    )
    p.add_argument(
        "--force",
        "--overwrite",
        dest="force",
        action="store_true",
        help="replace an existing output file",
    )
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (>= 17)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="batch of the check (and of the sparse format's per-layer autotune); default 1",
    )
    p.add_argument(
        "--align",
        type=positive_int,
        default=8,
        help="keep a multiple of N channels per layer when compacting (CPU conv kernels are "
        "slower on other counts); 1 removes every dead channel; default 8",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Check every input, then compact, write and check the export."""
    if args.opset < 17:
        raise UsageError(f"--opset {args.opset}: ONNX export needs opset 17 or newer")
    if not args.source.exists():
        raise UsageError(f"{args.source}: no mask file or run folder there")
    out = args.out or exporting.default_output(args.source, args.format)
    try:
        exporting.check_output(out, args.format, args.force)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    src = exporting.load_source(args.source, args.model)
    print(f"exporting {src.description}")
    try:
        result = exporting.export(
            src.model,
            src.masks,
            out,
            args.format,
            example_input=torch.zeros(1, *src.input_shape),
            compact=args.compact,
            overwrite=args.force,
            opset=args.opset,
            batch_size=args.batch_size,
            align=args.align,
        )
    except ImportError as exc:  # onnx / onnxruntime missing: the message names the fix
        raise UsageError(str(exc)) from None
    print(result)
    return 0
