"""What the commands share: argument types, the model and pruning flags, output checks.

Every value is checked by argparse or right after parsing, before any work: a bad value is
`ntksap: error: ...` naming the flag and the valid choices, exit code 2.

Method options are generated from the registry: every `Option` a method declares (name,
type, choices, help) becomes a flag `--<option-name>`, so a newly registered method needs no
change here.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ntksap import files
from ntksap import validate as v
from ntksap.masks import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, Masks
from ntksap.models import list_models
from ntksap.pruning import SCHEDULES, SCOPES, LayerCollapseWarning, prune, resolve_density
from ntksap.scoring import Method, get_method, list_methods
from ntksap.training.distributed import resolve_device


class UsageError(Exception):
    """A bad combination of flags found by the CLI itself (exit code 2)."""


# ---------------------------------------------------------------------------------------
# Argument types (argparse turns their ArgumentTypeError into a usage error, exit 2)
# ---------------------------------------------------------------------------------------
def finite_float(text: str) -> float:
    """A finite number: "nan" and "inf" are refused.

    >>> finite_float("0.5")
    0.5
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    try:
        return v.seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seed must be an integer in [0, {v.SEED_MAX}], got {text!r}"
        ) from None


def parse_shape(text: str) -> tuple[int, ...]:
    """ "3,32,32" -> (3, 32, 32): one input's shape without the batch dimension.

    >>> parse_shape("1, 28,28")
    (1, 28, 28)
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")] if text.strip() else []
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(
            f"bad input shape {text!r}: give positive integers separated by commas, "
            "without the batch dimension, e.g. 3,32,32 (channels, height, width)"
        )
    return shape


def device(text: str) -> str:
    """A device that exists here (cuda without CUDA is refused before any work)."""
    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def progress(flag: bool | None) -> bool:
    """--progress / --no-progress; default: on when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: on when stderr is a terminal)",
    )


# ---------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------
def check_new_file(path: Path | None, overwrite: bool, flag: str = "--out") -> None:
    """Refuse to replace an existing file unless --overwrite (checked before any work)."""
    if path is None:
        return
    try:
        files.check_new_file(path, overwrite, flag, "pass --overwrite to replace it")
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None


def check_mask_suffix(path: Path | None) -> None:
    suffixes = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
    if path is not None and path.suffix.lower() not in suffixes:
        raise UsageError(f"--out {path}: unknown suffix; use one of {', '.join(suffixes)}")


def prune_quietly(*args: Any, **kwargs: Any) -> Masks:
    """`ntksap.prune` without its LayerCollapseWarning: the commands print their own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        return prune(*args, **kwargs)


def warn_collapse(masks: Masks, where: str = "") -> list[str]:
    """Print the layer-collapse warning and the dead-output-layer warning (every command
    does); returns the collapsed names."""
    prefix = f"{where}: " if where else ""
    for msg in (masks.collapse_warning(), masks.dead_head_warning()):
        if msg:
            print(f"warning: {prefix}{msg}", file=sys.stderr, flush=True)
    return masks.collapsed()


# ---------------------------------------------------------------------------------------
# Model flags
# ---------------------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser, *, with_shape: bool = True) -> None:
    """--model and --seed; with `with_shape` also --num-classes, --in-channels and
    --input-shape (default: the registered model's own); commands that read a data set take
    those from it instead."""
    names = list_models()
    p.add_argument(
        "--model",
        required=with_shape,
        default=None,
        type=str.lower,
        choices=names,
        metavar="NAME",
        help=f"registered model: {', '.join(names)}"
        + ("" if with_shape else " (default: the preset's)"),
    )
    p.add_argument(
        "--seed", type=seed, default=0, help="seeds the model's init, the method and the data"
    )
    if not with_shape:
        return
    p.add_argument(
        "--num-classes", type=positive_int, help="output width (default: the model's, or 10)"
    )
    p.add_argument(
        "--in-channels", type=positive_int, help="input channels (default: from --input-shape)"
    )
    p.add_argument(
        "--input-shape",
        type=parse_shape,
        metavar="C,H,W",
        help="one input's shape without the batch dimension (default: the model's, e.g. "
        "3,32,32 for resnet20)",
    )


def model_shape(args: argparse.Namespace) -> tuple[tuple[int, ...], int]:
    """(input shape, num classes) from the flags, defaulting to the registered model's."""
    from ntksap.models import defaults

    d = defaults(args.model)
    shape = args.input_shape or (d.input_shape if d is not None else None)
    if shape is None:
        raise UsageError(f"model {args.model!r} has no default input shape: pass --input-shape")
    if args.in_channels is not None and args.in_channels != shape[0]:
        if args.input_shape is not None:
            raise UsageError(
                f"--in-channels {args.in_channels} differs from the first entry of "
                f"--input-shape {','.join(map(str, shape))} (channels)"
            )
        shape = (args.in_channels, *shape[1:])
    classes = args.num_classes or (d.num_classes if d is not None else 10)
    return tuple(shape), classes


# ---------------------------------------------------------------------------------------
# Pruning flags, generated from the registry
# ---------------------------------------------------------------------------------------
def _option_flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _options_by_name() -> dict[str, dict[str, Any]]:
    """option name -> {method name: Option} over every registered method."""
    out: dict[str, dict[str, Any]] = {}
    for name in list_methods():
        for opt, spec in get_method(name).options.items():
            out.setdefault(opt, {})[name] = spec
    return out


def _fmt_default(value: Any) -> str:
    return "auto" if value is None else str(value)


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per method option; the flag of each option is stored in `_option_flags`."""
    group = parser.add_argument_group(
        "method options (each passed only when given, and only to a method that has it)"
    )
    taken = {a for action in parser._actions for a in action.option_strings}
    flags: dict[str, str] = {}
    for opt, by_method in _options_by_name().items():
        flag = _option_flag(opt)
        if flag in taken:  # named like a command flag (e.g. run's --batch-size): prefix it
            flag = "--" + "-".join(by_method) + "-" + opt.replace("_", "-")
        spec = next(iter(by_method.values()))
        where = "; ".join(f"{m} default {_fmt_default(s.default)}" for m, s in by_method.items())
        kwargs: dict[str, Any] = {
            "dest": f"opt_{opt}",
            "default": None,
            "help": f"{spec.help} ({where})" if spec.help else f"({where})",
        }
        if spec.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.choices is not None:
            kwargs.update(type=spec.type, choices=spec.choices)
        elif spec.type is int:
            kwargs.update(type=positive_int if (spec.low or 0) >= 0 else int, metavar="N")
        elif spec.type is float:
            kwargs.update(type=finite_float, metavar="X")
        else:
            kwargs.update(type=spec.type, metavar=opt.upper())
        group.add_argument(flag, **kwargs)
        flags[opt] = flag
    parser.set_defaults(_option_flags=flags)


def add_pruning_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--method, the density (exactly one of three forms), schedule, scope, targets,
    ablations and one flag per method option."""
    methods = list_methods()
    p.add_argument(
        "--method",
        type=str.lower,
        default="ntksap",
        choices=methods,
        metavar="NAME",
        help=f"pruning method: {', '.join(methods)} (default ntksap)",
    )
    target = p.add_mutually_exclusive_group(required=required)
    target.add_argument(
        "--sparsity", type=finite_float, help="fraction of prunable weights removed"
    )
    target.add_argument("--density", type=finite_float, help="fraction of prunable weights kept")
    target.add_argument(
        "--compression", type=nonneg_float, metavar="K", help="density 0.8**K (the paper's k)"
    )
    p.add_argument("--rounds", type=positive_int, help="pruning rounds T (default: the method's)")
    p.add_argument("--schedule", choices=SCHEDULES, default="exponential")
    p.add_argument("--scope", choices=SCOPES, default="global")
    p.add_argument(
        "--floor",
        type=finite_float,
        metavar="F",
        help="selection floor in [0, 1]: every layer keeps at least F x its balanced share "
        "k/L each round, every output unit one weight (default: the method's; 1 for "
        "ntksap --robust)",
    )
    p.add_argument(
        "--exclude",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="glob patterns of parameter names to keep dense, e.g. 'fc.*'",
    )
    p.add_argument(
        "--include",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="glob patterns of further parameters to prune",
    )
    p.add_argument("--include-bias", action="store_true", help="prune Conv/Linear biases too")
    p.add_argument("--invert", action="store_true", help="keep the lowest scores (ablation)")
    p.add_argument("--shuffle", action="store_true", help="shuffle masks per layer (ablation)")
    _add_method_options(p)


def _tolerance(text: str) -> float:
    """A relative tolerance in (0, 1].

    >>> _tolerance("0.02")
    0.02
    """
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def add_effective_arguments(p: argparse.ArgumentParser) -> None:
    """--effective and --effective-tolerance (`ntksap prune`, `ntksap run`)."""
    p.add_argument(
        "--effective",
        action="store_true",
        help="the density/sparsity is the effective one (weights on an input-to-output path "
        "only): the nominal density is searched, one full prune per probe",
    )
    p.add_argument(
        "--effective-tolerance",
        type=_tolerance,
        metavar="REL",
        help="with --effective: accept |effective - target| <= REL x target or one weight "
        "(default 0.01)",
    )


def effective_kwargs_from(args: argparse.Namespace) -> dict[str, Any]:
    """The effective-density keywords of `ntksap.prune` / `ntksap.run` (none without
    --effective; without --effective-tolerance the library's default applies)."""
    if not args.effective:
        if args.effective_tolerance is not None:
            raise UsageError("--effective-tolerance needs --effective")
        return {}
    if args.effective_tolerance is None:
        return {"effective": True}
    return {"effective": True, "effective_tolerance": args.effective_tolerance}


def pruning_request(args: argparse.Namespace) -> tuple[Method, float, dict[str, Any]]:
    """(method, density, method options) from parsed flags, validated before any work."""
    meth = get_method(args.method)
    flags: dict[str, str] = args._option_flags
    given = {o: getattr(args, f"opt_{o}") for o in flags}
    given = {o: val for o, val in given.items() if val is not None}
    wrong = [o for o in given if o not in meth.options]
    if wrong:
        valid = ", ".join(flags[o] for o in meth.options) or "none"
        raise UsageError(
            f"{', '.join(flags[o] for o in wrong)} is not an option of method {meth.name!r}; "
            f"its options: {valid}"
        )
    options = {}
    for o, val in given.items():
        try:
            options[o] = meth.options[o].check(meth.name, val)
        except ValueError as exc:
            raise UsageError(f"{flags[o]}: {exc}") from None
    if args.compression is not None:
        density, sparsity = 0.8**args.compression, None
    else:
        density, sparsity = args.density, args.sparsity
    try:
        d = resolve_density(density, sparsity)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if meth.validate is not None:
        meth.validate({**meth.defaults, **options})
    return meth, d, options


def pruning_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `ntksap.prune` keywords that come straight from the shared pruning flags."""
    return {
        "rounds": args.rounds,
        "schedule": args.schedule,
        "scope": args.scope,
        "floor": args.floor,
        "seed": args.seed,
        "include_bias": args.include_bias,
        "exclude": args.exclude,
        "include": args.include,
        "invert": args.invert,
        "shuffle": args.shuffle,
    }


def fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)
