"""The `ntksap` command: `prune` a registered model, `list` what is registered, run a `demo`.

Choices (methods, models) come from the registries, so a newly registered method or model
appears here without touching this file; so do its options (`--<option-name>`).

Examples:
    $ ntksap list
    $ ntksap prune --model resnet20 --num-classes 10 --input-shape 3,32,32 \\
          --method ntksap --sparsity 0.982 --rounds 20 --resamples 5 --out r20.safetensors
    $ ntksap demo                      # every method on LeNet-5, well under a minute on a CPU
    >>> main(["prune", "--model", "lenet5", "--input-shape", "1,28,28",
    ...       "--method", "magnitude", "--sparsity", "0.9"])  # doctest: +SKIP
    0

Exit codes: 0 success; 2 a user error (bad flag or value, unknown name, unusable
combination), printed as `ntksap: error: <message>` without a traceback (`--debug` shows
it); 1 a failure while running (e.g. the model rejects the input shape); 130 interrupted.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ntksap import __version__
from ntksap.masks import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, Masks
from ntksap.models import MODELS, create, list_models
from ntksap.pruning import SCHEDULES, SCOPES, LayerCollapseWarning, resolve_density
from ntksap.pruning import prune as _prune_library
from ntksap.scoring import get_method, list_methods
from ntksap.stats import format_table, human, layer_table

__all__ = ["build_parser", "main"]

DATA_CHOICES = ("synthetic",)
SAMPLES_PER_CLASS = 10  # "10 x classes" images in a data batch, as the paper's setting

# Demo: small, fast settings (the paper's are in each method's default_rounds / options).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "ntksap": {"rounds": 5, "num_samples": 100},
    "synflow": {"rounds": 20},
    "itersnip": {"rounds": 5},
}
DEMO_MAX_ROUNDS = 5  # for methods registered later without a DEMO_SETTINGS entry

# Method options whose default (None) does not tell their type.
_OPTION_TYPES: dict[str, type] = {"num_samples": int}


class UsageError(Exception):
    """A bad combination of flags found by the CLI itself (exit code 2)."""


# ---------------------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------------------
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


def _device(text: str) -> str:
    try:
        dev = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"bad device {text!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: MPS is not available here")
    return text


def _option_flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _method_options() -> dict[str, dict[str, Any]]:
    """option name -> {method name: default} over every registered method."""
    out: dict[str, dict[str, Any]] = {}
    for name in list_methods():
        for opt, default in get_method(name).options.items():
            out.setdefault(opt, {})[name] = default
    return out


def _option_choices(option: str) -> tuple[str, ...] | None:
    """Choices of the string options the library validates against a fixed tuple."""
    if option == "init":
        from ntksap.scoring.ntksap import NTKSAP_INITS

        return tuple(NTKSAP_INITS)
    if option == "precision":
        from ntksap.scoring.synflow import PRECISIONS

        return tuple(PRECISIONS)
    return None


def _add_method_options(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per method option in the registry; returns the option names added."""
    group = parser.add_argument_group(
        "method options (passed only when given, and only to a method that has them)"
    )
    added = []
    taken = {a for action in parser._actions for a in action.option_strings}
    for opt, by_method in _method_options().items():
        flag = _option_flag(opt)
        if flag in taken:  # named like a command flag (e.g. run's --batch-size): prefix it
            flag = "--" + "-".join(by_method) + "-" + opt.replace("_", "-")
        defaults = next(iter(by_method.values()))
        kind = _OPTION_TYPES.get(opt) or type(defaults)
        where = "; ".join(f"{m} (default {_fmt_default(d)})" for m, d in by_method.items())
        kwargs: dict[str, Any] = {"dest": f"opt_{opt}", "default": None, "help": f"for {where}"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            kwargs.update(type=kind, metavar=opt.upper())
        else:
            choices = _option_choices(opt)
            kwargs.update(type=str, metavar=opt.upper() if choices is None else None)
            if choices is not None:
                kwargs["choices"] = choices
        group.add_argument(flag, **kwargs)
        added.append(opt)
    return added


# ---------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser, *, with_shape: bool = True) -> None:
    """--model and --seed; with `with_shape` also --num-classes, --in-channels and
    --input-shape (commands that read a data set take those from it instead)."""
    model_names = list_models()
    p.add_argument(
        "--model",
        required=with_shape,
        default=None,
        type=str.lower,
        choices=model_names,
        metavar="NAME",
        help=f"registered model: {', '.join(model_names)}"
        + ("" if with_shape else " (default: the preset's)"),
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the model's init, the method and the data order"
    )
    if not with_shape:
        return
    p.add_argument("--num-classes", type=int, default=10, help="output width (default 10)")
    p.add_argument(
        "--in-channels",
        type=int,
        default=None,
        help="input channels (default: the first entry of --input-shape)",
    )
    p.add_argument(
        "--input-shape",
        type=parse_shape,
        required=True,
        metavar="C,H,W",
        help="one input's shape without the batch dimension, e.g. 3,32,32",
    )


def add_pruning_arguments(p: argparse.ArgumentParser) -> None:
    """--method, the density (exactly one of three forms), schedule, scope, targets,
    ablations and one flag per method option (shared by `prune` and `run`)."""
    methods = list_methods()
    p.add_argument(
        "--method",
        type=str.lower,
        default="ntksap",
        choices=methods,
        metavar="NAME",
        help=f"pruning method: {', '.join(methods)} (default ntksap)",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="fraction of prunable weights removed")
    target.add_argument("--density", type=float, help="fraction of prunable weights kept")
    target.add_argument(
        "--compression", type=float, metavar="K", help="density 0.8**K (the paper's grid k)"
    )
    p.add_argument("--rounds", type=int, help="pruning rounds T (default: the method's)")
    p.add_argument("--schedule", choices=SCHEDULES, default="exponential")
    p.add_argument("--scope", choices=SCOPES, default="global")
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


def pruning_request(args: argparse.Namespace) -> tuple[Any, float, dict[str, Any]]:
    """(method, density, method options) from parsed flags, validated before any work."""
    meth = get_method(args.method)
    all_options = sorted(o for o in _method_options() if hasattr(args, f"opt_{o}"))
    options = {o: getattr(args, f"opt_{o}") for o in all_options}
    options = {o: v for o, v in options.items() if v is not None}
    wrong = [o for o in options if o not in meth.options]
    if wrong:
        valid = ", ".join(_option_flag(o) for o in meth.options) or "none"
        raise UsageError(
            f"{', '.join(_option_flag(o) for o in wrong)} is not an option of method "
            f"{meth.name!r}; its valid options: {valid} (by method: {_options_help(all_options)})"
        )
    if args.compression is not None:
        if not math.isfinite(args.compression) or args.compression < 0:
            raise UsageError(f"--compression must be a number >= 0, got {args.compression}")
        density, sparsity = 0.8**args.compression, None
    else:
        density, sparsity = args.density, args.sparsity
    return meth, resolve_density(density, sparsity), options


def pruning_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `ntksap.prune` keywords that come straight from the shared pruning flags."""
    return {
        "rounds": args.rounds,
        "schedule": args.schedule,
        "scope": args.scope,
        "seed": args.seed,
        "include_bias": args.include_bias,
        "exclude": args.exclude,
        "include": args.include,
        "invert": args.invert,
        "shuffle": args.shuffle,
    }


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `ntksap` command (choices read from the registries)."""
    methods, model_names = list_methods(), list_models()
    free = [m for m in methods if not get_method(m).needs_data]
    needs_data = [m for m in methods if get_method(m).needs_data]
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
        dest="command", metavar="{prune,train,run,spectrum,list,demo}", required=True
    )

    # --- prune ----------------------------------------------------------------------------
    p = sub.add_parser(
        "prune",
        help="prune a registered model and print per-layer statistics",
        description=(
            "Prune a freshly initialised registered model and print its per-layer density "
            "and FLOPs; save the masks with --out. Data-free methods: "
            f"{', '.join(free)}. The others need --data synthetic for now."
        ),
    )
    add_model_arguments(p)
    add_pruning_arguments(p)
    p.add_argument(
        "--data",
        choices=DATA_CHOICES,
        help=(
            f"data for {', '.join(needs_data)}. 'synthetic' is NOT real data: one class-balanced "
            f"batch of {SAMPLES_PER_CLASS} x num-classes random Gaussian images, labels "
            "cycling over the classes; it only exercises these methods. Real data sets come "
            "with `ntksap train` in a later version."
        ),
    )
    p.add_argument("--device", type=_device, default="cpu", help="where to score (default cpu)")
    p.add_argument("--out", type=Path, help="save the masks here (.safetensors, .pt or .pth)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: on when stderr is a terminal)",
    )
    p.set_defaults(func=cmd_prune)

    # --- train, run -----------------------------------------------------------------------
    from ntksap.training.commands import add_commands

    add_commands(sub)
    from ntksap.analysis.commands import add_commands as add_analysis_commands

    add_analysis_commands(sub)

    # --- list -----------------------------------------------------------------------------
    ls = sub.add_parser("list", help="list the registered methods and models")
    ls.set_defaults(func=cmd_list)

    # --- demo -----------------------------------------------------------------------------
    d = sub.add_parser(
        "demo",
        help="prune LeNet-5 with every method, fast settings (under a minute on a CPU)",
        description=(
            "Prune a small model (num_classes 10, in_channels 1) with every registered method "
            "at small settings and compare. Data-dependent methods use one class-balanced "
            "batch of scikit-learn's 8x8 digits when scikit-learn is installed (then every "
            "method sees 1x8x8 inputs), else random Gaussian 1x28x28 images."
        ),
    )
    d.add_argument(
        "--model",
        type=str.lower,
        default="lenet5",
        choices=model_names,
        metavar="NAME",
        help="registered model, built with 10 classes and 1 input channel (default lenet5)",
    )
    d.add_argument("--sparsity", type=float, default=0.9, help="(default 0.9)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out-dir", type=Path, help="save every method's masks in this folder")
    d.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: on when stderr is a terminal)",
    )
    d.set_defaults(func=cmd_demo)
    return parser


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def prune(*args: Any, **kwargs: Any) -> Masks:
    """`ntksap.prune` without its LayerCollapseWarning: the table reports collapse itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        return _prune_library(*args, **kwargs)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _fmt_default(value: Any) -> str:
    return "auto" if value is None else str(value)


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def _build_model(name: str, num_classes: int, in_channels: int, shape: tuple[int, ...], seed: int):
    """A freshly initialised registered model; torch's global RNG is left as it was.

    Factories taking `input_size` (e.g. the MLP) get the input's side length.
    """
    kwargs: dict[str, Any] = {}
    factory = MODELS.get(name)
    if "input_size" in inspect.signature(factory).parameters and len(shape) >= 2:
        if len(set(shape[1:])) != 1:
            raise UsageError(f"model {name!r} needs a square input, got {_fmt_shape(shape)}")
        kwargs["input_size"] = shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def synthetic_batch(
    num_classes: int, shape: tuple[int, ...], seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One class-balanced batch: 10 x num_classes N(0, 1) images, labels 0, 1, ..., 0, 1, ...

    Random data, not a data set: it only lets the data-dependent methods run.

    >>> [(x, y)] = synthetic_batch(3, (1, 8, 8))
    >>> x.shape, y[:4].tolist()
    (torch.Size([30, 1, 8, 8]), [0, 1, 2, 0])
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat(SAMPLES_PER_CLASS)  # (10 * classes,)
    x = torch.randn((len(y), *shape), generator=gen)  # (10 * classes, *shape)
    return [(x, y)]


def digits_batch() -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """10 images per class of scikit-learn's 8x8 digits, standardised; None without sklearn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)  # (1797, 8, 8), values 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:SAMPLES_PER_CLASS] for c in range(10)])
    x = images[idx].unsqueeze(1)  # (100, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    return [(x, labels[idx])]


def _check_out_suffix(path: Path | None) -> None:
    suffixes = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
    if path is not None and path.suffix.lower() not in suffixes:
        raise UsageError(f"--out {path}: unknown suffix; use one of {', '.join(suffixes)}")


def _options_help(option_names: Sequence[str]) -> str:
    parts = []
    for name in list_methods():
        opts = [o for o in get_method(name).options if o in option_names]
        parts.append(f"{name}: {' '.join(_option_flag(o) for o in opts) or 'none'}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------
def cmd_prune(args: argparse.Namespace) -> int:
    """`ntksap prune`: prune, print the table, save the masks."""
    meth, d, options = pruning_request(args)  # validated before any work
    shape: tuple[int, ...] = args.input_shape
    in_channels = shape[0] if args.in_channels is None else args.in_channels
    if in_channels != shape[0]:
        raise UsageError(
            f"--in-channels {in_channels} differs from the first entry of --input-shape "
            f"{','.join(map(str, shape))} (channels)"
        )
    data = None
    if meth.needs_data:
        if args.data is None:
            free = [m for m in list_methods() if not get_method(m).needs_data]
            raise UsageError(
                f"method {meth.name!r} needs data: pass --data synthetic (random Gaussian "
                "images, not a real data set; real data comes with `ntksap train` in a later "
                f"version), or use a data-free method: {', '.join(free)}"
            )
        data = synthetic_batch(args.num_classes, shape, args.seed)
    elif args.data is not None:
        print(f"note: --data is ignored: {meth.name} is data-free", file=sys.stderr)
    _check_out_suffix(args.out)

    model = _build_model(args.model, args.num_classes, in_channels, shape, args.seed)
    rounds = args.rounds if args.rounds is not None else meth.default_rounds
    print(
        f"pruning {args.model} ({args.num_classes} classes, input {_fmt_shape(shape)}) "
        f"with {meth.name}: density {100 * d:.2f}% (sparsity {100 * (1 - d):.2f}%), "
        f"{rounds} round(s), {args.scope} {args.schedule}"
        + (", synthetic data" if data is not None else ""),
        flush=True,
    )
    started = time.perf_counter()
    masks = prune(
        model,
        meth.name,
        density=d,
        input_shape=shape,
        data=data,
        device=args.device,
        **pruning_kwargs(args),
        progress=_progress(args.progress),
        **options,
    )
    seconds = time.perf_counter() - started
    masks = Masks(
        masks,
        {
            **masks.metadata,
            "model": args.model,
            "num_classes": args.num_classes,
            "in_channels": in_channels,
            "data": args.data if data is not None else None,
        },
    )
    stats, totals = layer_table(model, masks, shape)
    print(format_table(stats, totals))
    print(f"pruning time {seconds:.1f} s (wall)")
    if args.out is not None:
        path = masks.save(args.out)
        print(f"saved masks to {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """`ntksap list`: methods (data needs, rounds, options, summary) and models."""
    names = list_methods()
    width = max(len(n) for n in names)
    print("methods (ntksap prune --method NAME):")
    print(f"  {'name'.ljust(width)}  {'input'.ljust(9)}  rounds  summary")
    for name in names:
        m = get_method(name)
        kind = "data" if m.needs_data else "data-free"
        print(f"  {name.ljust(width)}  {kind.ljust(9)}  {m.default_rounds:>6}  {m.summary}")
        if m.options:
            opts = ", ".join(f"{_option_flag(o)} {_fmt_default(v)}" for o, v in m.options.items())
            print(f"  {''.ljust(width)}  options: {opts}")
    models = list_models()
    width = max(len(n) for n in models)
    print("models (ntksap prune --model NAME):")
    for name in models:
        doc = (MODELS.get(name).__doc__ or "").strip().splitlines()
        print(f"  {name.ljust(width)}  {doc[0] if doc else ''}".rstrip())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`ntksap demo`: every method on a small model at fast settings, then a summary."""
    resolve_density(sparsity=args.sparsity)
    num_classes, in_channels = 10, 1
    data = digits_batch()
    if data is not None:
        shape: tuple[int, ...] = (1, 8, 8)
        print("data-dependent methods use one class-balanced batch of 100 sklearn digits (8x8)")
    else:
        shape = (1, 28, 28)
        data = synthetic_batch(num_classes, shape, args.seed)
        print(
            "note: scikit-learn is not installed, so the data-dependent methods get one "
            f"class-balanced batch of {len(data[0][1])} random Gaussian 1x28x28 images "
            "(synthetic, not real data)"
        )
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for name in list_methods():
        meth = get_method(name)
        fallback = {"rounds": min(meth.default_rounds, DEMO_MAX_ROUNDS)}
        settings = dict(DEMO_SETTINGS.get(name, fallback))
        rounds = settings.pop("rounds")
        model = _build_model(args.model, num_classes, in_channels, shape, args.seed)
        started = time.perf_counter()
        masks = prune(
            model,
            name,
            sparsity=args.sparsity,
            input_shape=shape,
            data=data if meth.needs_data else None,
            rounds=rounds,
            seed=args.seed,
            progress=_progress(args.progress),
            **settings,
        )
        seconds = time.perf_counter() - started
        stats, totals = layer_table(model, masks, shape)
        extra = ", ".join(f"{k} {v}" for k, v in settings.items())
        extra = f", {extra}" if extra else ""
        print(f"\n=== {name}: {rounds} round(s){extra}, {seconds:.2f} s ===")
        print(format_table(stats, totals))
        if args.out_dir is not None:
            file = f"{args.model}-{name}-sparsity{args.sparsity:g}.safetensors"
            path = masks.save(args.out_dir / file)
            print(f"saved masks to {path}")
        summary.append((name, seconds, totals))

    print(
        f"\nsummary: {args.model}, sparsity {100 * args.sparsity:.2f}%, input {_fmt_shape(shape)}"
    )
    header = ("method", "seconds", "density", "remaining FLOPs", "collapsed layers")
    rows = [
        (
            name,
            f"{sec:.2f}",
            f"{100 * t.density:.2f}%",
            f"{human(t.flops_remaining)} ({100 * t.flops_ratio:.1f}%)",
            ", ".join(t.collapsed) if t.collapsed else "none",
        )
        for name, sec, t in summary
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:4], widths[1:4])), r[4]]
        print("  ".join(cells))
    return 0


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the `ntksap` command with `argv` (default: sys.argv[1:]); returns the exit code.

    Bad flags make argparse raise SystemExit(2) with a usage message; errors found later
    (bad values, unusable combinations) print `ntksap: error: ...` and return 2.

    >>> main(["list"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("ntksap: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError) as exc:
        # ValueError covers MaskError and UnknownNameError from the library
        if args.debug:
            raise
        print(f"ntksap: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, ArithmeticError) as exc:  # e.g. the model rejects the input shape
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"ntksap: error: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1
