"""`ntksap spectrum`: NTK eigenspectra of dense and pruned networks, table and plot.

Prunes a freshly initialised registered model with each method (or takes mask files),
computes the fixed-weight empirical NTK of the logits on the same inputs for the dense and
every pruned network, and prints trace, top eigenvalue, condition number, effective rank,
the distance of each spectrum to the dense one (mean |log10 eig - log10 eig_dense|, in
decades), and NTK-SAP's finite-difference estimate of the trace next to the exact one.
Writes `spectrum.png` (eigenvalues, descending, log scale) and `spectrum.json` to --out-dir
(never over existing ones without --overwrite).

Data methods (snip, itersnip, grasp) need --dataset; without it the default methods are the
data-free ones. `--dataset synthetic` scores random images, on purpose, and says so.

    ntksap spectrum --model resnet20 --sparsity 0.738 --methods random,magnitude,synflow,ntksap
    ntksap spectrum --model resnet20 --masks a/mask.safetensors b/mask.safetensors
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ntksap import data
from ntksap import validate as v
from ntksap.analysis.compare import BN_STATS, compare_spectra, plot_spectra
from ntksap.cli.common import (
    UsageError,
    add_model_arguments,
    add_progress,
    check_new_file,
    device,
    finite_float,
    model_shape,
    positive_float,
    positive_int,
    progress,
    prune_quietly,
    warn_collapse,
)
from ntksap.files import write_json
from ntksap.masks import Masks
from ntksap.pruning import resolve_density
from ntksap.runs import build_model
from ntksap.scoring import get_method, list_methods

OUT_FILES = ("spectrum.png", "spectrum.json")


def _methods(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in list_methods()]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad or text!r}; valid choices: {', '.join(list_methods())}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is named twice in {text!r}")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spectrum",
        help="NTK eigenspectra of dense and pruned networks: table and log-scale plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=finite_float, help="fraction removed (default 0.738)")
    target.add_argument("--density", type=finite_float, help="fraction kept")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--methods",
        type=_methods,
        help="comma-separated methods to prune with (default: the data-free ones; all with "
        "--dataset)",
    )
    src.add_argument("--masks", type=Path, nargs="+", help="mask files instead of pruning")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="a pruning setting: rounds or a method option, for every method that has it or "
        "for one (e.g. --set rounds=5 --set ntksap.resamples=1)",
    )
    p.add_argument("--samples", type=positive_int, default=100, help="NTK inputs N (default 100)")
    p.add_argument(
        "--dataset",
        type=str.lower,
        choices=data.list_datasets(),
        metavar="NAME",
        help="data for the data methods, and NTK inputs from its test split (class-balanced) "
        "instead of Gaussian noise; 'synthetic' is random images",
    )
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--implementation", choices=("auto", "jacobian", "ntk_vp"), default="auto")
    p.add_argument(
        "--memory-limit-gb", type=positive_float, default=2.0, help="cap on any intermediate"
    )
    p.add_argument(
        "--bn-stats",
        choices=BN_STATS,
        default="calibrate",
        help="BatchNorm statistics in the eval-mode NTK: 'calibrate' (default) measures each "
        "network's statistics on the NTK inputs (NTK-SAP's BN rule); 'init' keeps the initial "
        "running statistics (0, 1), under which BN normalises nothing",
    )
    p.add_argument(
        "--fd-draws", type=positive_int, default=8, help="perturbations for the FD estimate"
    )
    p.add_argument("--epsilon", type=positive_float, default=0.01, help="FD perturbation std")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where the plot/JSON go")
    p.add_argument(
        "--overwrite", action="store_true", help="replace spectrum.png/json in --out-dir"
    )
    add_progress(p)
    p.set_defaults(func=cmd_spectrum)


def mask_labels(paths: list[Path]) -> list[str]:
    """Unique, short row labels for mask files: the stem, else parent/stem, else the path.

    >>> mask_labels([Path("a/mask.safetensors"), Path("b/mask.safetensors")])
    ['a/mask', 'b/mask']
    """
    for label in (lambda p: p.stem, lambda p: f"{p.parent.name}/{p.stem}", str):
        labels = [label(p) for p in paths]
        if len(set(labels)) == len(labels) and "dense" not in labels:
            return labels
    raise UsageError("a mask file is given twice")


def method_settings(methods: list[str], assignments: list[str]) -> dict[str, dict[str, Any]]:
    """Per method, the `prune` keywords of the --set flags: `rounds` and its own options;
    KEY applies to every method that has it, METHOD.KEY to one. Checked before any work.

    >>> method_settings(["snip", "ntksap"], ["rounds=2", "ntksap.resamples=1", "epsilon=0.1"])
    {'snip': {'rounds': 2}, 'ntksap': {'rounds': 2, 'resamples': 1, 'epsilon': 0.1}}
    """
    from ntksap.experiments.sweep import SweepError, parse_assignment

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for text in assignments:
        try:
            key, value = parse_assignment(text, many=False)
        except SweepError as exc:
            raise UsageError(f"--set: {exc}") from None
        owner, dot, rest = key.partition(".")
        targets = [owner.lower()] if dot else methods
        name = (rest if dot else key).replace("-", "_")
        if dot and owner.lower() not in methods:
            raise UsageError(
                f"--set {text}: {owner!r} is not one of --methods ({', '.join(methods)})"
            )
        takers = [m for m in targets if name == "rounds" or name in get_method(m).options]
        if not takers:
            valid = sorted({"rounds", *(o for m in targets for o in get_method(m).options)})
            raise UsageError(
                f"--set {text}: {name!r} is not a setting of {', '.join(targets)}; "
                f"valid: {', '.join(valid)}"
            )
        for m in takers:
            out[m][name] = value
    for m, kw in out.items():
        if "rounds" in kw:
            try:
                v.positive_int("rounds", kw["rounds"])
            except ValueError as exc:
                raise UsageError(f"--set: {exc}") from None
        options = {k: val for k, val in kw.items() if k != "rounds"}
        try:
            get_method(m).resolve_options(options)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--set: {exc}") from None
    return out


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


def cmd_spectrum(args: argparse.Namespace) -> int:
    # --- everything checked before any work -----------------------------------------------
    for name in OUT_FILES:
        check_new_file(args.out_dir / name, args.overwrite, "--out-dir")
    if args.masks is None:
        methods = args.methods or [
            m for m in list_methods() if args.dataset or not get_method(m).needs_data
        ]
        settings = method_settings(methods, args.set)
        # e.g. ntksap with --set inputs=data reads real images too
        needs = [m for m in methods if get_method(m).needs_data_for(settings[m])]
        if needs and args.dataset is None:
            raise UsageError(
                f"{', '.join(needs)} need(s) real data: pass --dataset NAME (or --dataset "
                "synthetic to score random images on purpose), or leave them out of --methods"
            )
        sparsity = 0.738 if args.density is None and args.sparsity is None else args.sparsity
        try:
            d = resolve_density(args.density, sparsity)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif args.density is not None or args.sparsity is not None or args.set:
        raise UsageError("--masks gives the masks: --sparsity/--density/--set would be ignored")
    if args.dataset is not None:
        ds_test = _dataset(args, "test")
        shape, classes = tuple(ds_test.info.input_shape), ds_test.info.num_classes
        if args.samples % classes:
            raise UsageError(
                f"--samples {args.samples} must be a multiple of the {classes} classes"
            )
    else:
        shape, classes = model_shape(args)
    masks: dict[str, Masks] = {}
    if args.masks is not None:
        for label, path in zip(mask_labels(args.masks), args.masks):
            masks[label] = Masks.load(path)
    model = build_model(args.model, classes, shape, args.seed)
    for m in masks.values():
        m.check_covers(model)

    # --- inputs and masks --------------------------------------------------------------------
    if args.dataset is None:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn((args.samples, *shape), generator=g)
        source = "Gaussian N(0, I) inputs"
    else:
        [(x, _)] = data.prune_batches(ds_test, per_class=args.samples // classes, seed=args.seed)
        source = f"{args.dataset} test images ({args.samples // classes} per class)"
        if args.dataset == "synthetic":
            source += ", SYNTHETIC random images, not real data"
    seconds: dict[str, float] = {}
    if args.masks is None:
        train_batches = None
        for name in methods:
            meth = get_method(name)
            reads_data = meth.needs_data_for(settings[name])
            if reads_data and train_batches is None:
                train_batches = data.prune_batches(_dataset(args, "train"), seed=args.seed)
            t0 = time.perf_counter()
            masks[name] = prune_quietly(
                model, name, density=d, input_shape=shape,
                data=train_batches if reads_data else None, seed=args.seed,
                device=args.device, progress=progress(args.progress), **settings[name],
            )  # fmt: skip
            seconds[name] = time.perf_counter() - t0
            print(f"pruned with {name} in {seconds[name]:.1f} s", flush=True)
    for label, m in masks.items():
        warn_collapse(m, label)

    # --- the kernels ---------------------------------------------------------------------------
    rows, spectra = compare_spectra(
        model, x, masks, bn_stats=args.bn_stats, fd_draws=args.fd_draws, epsilon=args.epsilon,
        seed=args.seed, dtype=torch.float64 if args.dtype == "float64" else torch.float32,
        implementation=args.implementation, memory_limit=int(args.memory_limit_gb * 2**30),
        device=args.device, log=lambda msg: print(msg, flush=True),
    )  # fmt: skip
    for r in rows:
        r["prune_seconds"] = seconds.get(r["network"])
    _print_table(args, rows, x.shape[0], source, d if args.masks is None else None)
    n = x.shape[0]
    k = spectra["dense"].eigenvalues.size // n  # logits per input
    title = (
        f"{args.model}, NTK of {n} inputs x {k} logits\n({source}, BN stats {args.bn_stats}), "
        + ("given masks" if args.masks else f"sparsity {100 * (1 - d):.1f}%")
    )
    png = plot_spectra(spectra, args.out_dir / "spectrum.png", title)
    write_json(
        args.out_dir / "spectrum.json",
        {
            "title": title,
            "model": args.model,
            "inputs": source,
            "samples": n,
            "logits": k,
            "dtype": args.dtype,
            "bn_stats": args.bn_stats,
            "masks": {lab: str(p) for lab, p in zip(masks, args.masks)} if args.masks else None,
            "settings": None if args.masks else settings,  # --set, per method
            "rows": rows,
            "eigenvalues": {name: s.eigenvalues.tolist() for name, s in spectra.items()},
        },
    )
    print(f"wrote {png} and {args.out_dir / 'spectrum.json'}", file=sys.stderr)
    return 0


def _dataset(args: argparse.Namespace, split: str):
    if args.dataset == "synthetic":
        shape, classes = model_shape(args)
        return data.create("synthetic", num_classes=classes, input_shape=shape, split=split)
    return data.create(args.dataset, root=args.data_dir, split=split)


def _print_table(
    args: argparse.Namespace, rows: list[dict[str, Any]], n: int, source: str, d: float | None
) -> None:
    header = ("network", "density", "trace", "FD est.", "top eig", "cond. number", "eff. rank",
              "dist. to dense")  # fmt: skip
    table = [
        (r["network"], f"{100 * r['density']:.2f}%", _fmt(r["trace"]),
         _fmt(r["fd_trace_estimate"]), _fmt(r["largest"]), _fmt(r["condition_number"]),
         f"{r['effective_rank']:.1f}", f"{r['distance_to_dense']:.3f}")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
    print(f"{args.model}, {n} inputs ({source}), BN stats {args.bn_stats}")
    for row in (header, *table):
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))  # fmt: skip
    pruned = [r for r in rows if r["network"] != "dense"]
    if pruned:
        best = min(pruned, key=lambda r: r["distance_to_dense"])
        print(f"closest to dense: {best['network']} ({best['distance_to_dense']:.3f} decades)")
    print(
        "dist. to dense: mean |log10 eig - log10 eig_dense| over all eigenvalues (decades); "
        f"FD est.: NTK-SAP's finite-difference trace, {args.fd_draws} draws, eps {args.epsilon}"
    )
