"""`ntksap spectrum`: NTK eigenspectra of dense and pruned networks, table and plot.

Prunes a freshly initialised registered model with each method (or takes mask files),
computes the fixed-weight empirical NTK of the logits on the same inputs for the dense and
every pruned network (N inputs x K logits: an NK x NK matrix, eval mode), and prints
trace, top eigenvalue, condition number, effective rank, the distance of each spectrum to
the dense one (mean |log10 eig - log10 eig_dense|, in decades), and NTK-SAP's
finite-difference estimate of the trace next to the exact one. Writes `spectrum.png`
(eigenvalues, descending, log scale) and `spectrum.json` to --out-dir.

    ntksap spectrum --model resnet20 --num-classes 10 --input-shape 3,32,32 \\
        --sparsity 0.738 --methods random,magnitude,snip,grasp,synflow,ntksap --samples 100
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ntksap.analysis.spectrum import (
    Spectrum,
    calibrate_batchnorm,
    finite_difference_trace,
    spectrum,
    spectrum_distance,
)
from ntksap.masks import Masks


def _methods(text: str) -> list[str]:
    from ntksap.scoring import list_methods

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in list_methods()]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad or text!r}; valid choices: {', '.join(list_methods())}"
        )
    return names


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `spectrum` on the `ntksap` command's subparsers."""
    from ntksap import data
    from ntksap.cli import _device, add_model_arguments

    p = sub.add_parser(
        "spectrum",
        help="NTK eigenspectra of dense and pruned networks: table and log-scale plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="fraction removed (default 0.738)")
    target.add_argument("--density", type=float, help="fraction kept")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--methods",
        type=_methods,
        help="comma-separated methods to prune with (default: all registered)",
    )
    src.add_argument("--masks", type=Path, nargs="+", help="mask files instead of pruning")
    p.add_argument("--samples", type=int, default=100, help="NTK inputs N (default 100)")
    p.add_argument(
        "--dataset",
        type=str.lower,
        choices=data.list_datasets(),
        metavar="NAME",
        help="use a data set's test images (class-balanced) instead of Gaussian inputs",
    )
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--implementation", choices=("auto", "jacobian", "ntk_vp"), default="auto")
    p.add_argument(
        "--memory-limit-gb", type=float, default=2.0, help="cap on any intermediate (GiB)"
    )
    p.add_argument(
        "--bn-stats",
        choices=("calibrate", "init"),
        default="calibrate",
        help="BatchNorm statistics in the eval-mode NTK: 'calibrate' (default) measures each "
        "network's statistics on the NTK inputs (NTK-SAP's BN rule); 'init' keeps the initial "
        "running statistics (0, 1), under which BN normalises nothing",
    )
    p.add_argument("--fd-draws", type=int, default=8, help="perturbations for the FD estimate")
    p.add_argument("--epsilon", type=float, default=0.01, help="FD perturbation std")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where the plot/JSON go")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: on when stderr is a terminal)",
    )
    p.set_defaults(func=cmd_spectrum)


def _inputs(args: argparse.Namespace, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """(N, *shape) inputs: Gaussian, or a data set's class-balanced test images."""
    if args.dataset is None:
        g = torch.Generator().manual_seed(args.seed)
        return torch.randn((args.samples, *shape), generator=g), "Gaussian N(0, I)"
    from ntksap import data

    ds = data.create(args.dataset, root=args.data_dir, split="test")
    if tuple(ds.info.input_shape) != tuple(shape):
        raise ValueError(
            f"--dataset {args.dataset} has inputs {ds.info.input_shape}, but --input-shape is "
            f"{shape}"
        )
    k = ds.info.num_classes
    if args.samples % k:
        raise ValueError(f"--samples {args.samples} must be a multiple of the {k} classes")
    [(x, _)] = data.prune_batches(ds, per_class=args.samples // k, seed=args.seed)
    return x, f"{args.dataset} test images ({args.samples // k} per class)"


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.4g}"


def plot_spectra(spectra: dict[str, Spectrum], path: Path, title: str) -> Path:
    """Eigenvalues (descending) of each spectrum on a log scale, dense in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, s in spectra.items():
        eig = s.eigenvalues.clip(min=1e-12 * max(s.largest, 1e-300))
        style = {"color": "black", "lw": 2.2} if name == "dense" else {"lw": 1.3}
        ax.plot(range(1, len(eig) + 1), eig, label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue of the empirical NTK")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def cmd_spectrum(args: argparse.Namespace) -> int:
    from ntksap.analysis.ntk import empirical_ntk
    from ntksap.cli import _build_model, _progress, prune, synthetic_batch
    from ntksap.pruning import resolve_density
    from ntksap.scoring import get_method, list_methods
    from ntksap.training.checkpoint import write_json

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    shape = args.input_shape
    if args.masks is None:
        sparsity = 0.738 if args.density is None and args.sparsity is None else args.sparsity
        d = resolve_density(args.density, sparsity)
    elif args.density is not None or args.sparsity is not None:
        raise ValueError("--masks gives the masks: --sparsity/--density would be ignored")
    in_ch = shape[0] if args.in_channels is None else args.in_channels
    model = _build_model(args.model, args.num_classes, in_ch, shape, args.seed)
    x, source = _inputs(args, shape)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    ntk_kw = dict(
        mode="full", implementation=args.implementation, dtype=dtype,
        memory_limit=int(args.memory_limit_gb * 2**30), device=args.device,
    )  # fmt: skip

    masks: dict[str, Masks] = {}
    seconds: dict[str, float] = {}
    if args.masks is not None:
        for path in args.masks:
            m = Masks.load(path)
            m.check_model(model)
            masks[path.stem] = m
    else:
        for name in args.methods or list_methods():
            meth = get_method(name)
            batches = None
            if meth.needs_data:
                if args.dataset is not None:
                    from ntksap import data

                    ds = data.create(args.dataset, root=args.data_dir, split="train")
                    batches = data.prune_batches(ds, per_class=10, seed=args.seed)
                else:
                    batches = synthetic_batch(args.num_classes, shape, args.seed)
            t0 = time.perf_counter()
            masks[name] = prune(
                model, name, density=d, input_shape=shape, data=batches, seed=args.seed,
                device=args.device, progress=_progress(args.progress),
            )  # fmt: skip
            seconds[name] = time.perf_counter() - t0
            print(f"pruned with {name} in {seconds[name]:.1f} s", flush=True)

    kernels_s: dict[str, float] = {}
    spectra: dict[str, Spectrum] = {}
    fd: dict[str, tuple[float, float]] = {}
    for name, m in [("dense", None), *masks.items()]:
        t0 = time.perf_counter()
        net = calibrate_batchnorm(model, x, m) if args.bn_stats == "calibrate" else model
        kernel = empirical_ntk(net, x, m, **ntk_kw)
        kernels_s[name] = time.perf_counter() - t0
        spectra[name] = spectrum(kernel)
        fd[name] = finite_difference_trace(
            net, x, m, epsilon=args.epsilon, draws=args.fd_draws, seed=args.seed
        )
        print(f"NTK {name}: {tuple(kernel.shape)} in {kernels_s[name]:.1f} s", flush=True)

    dense = spectra["dense"]
    rows = []
    for name, s in spectra.items():
        rows.append(
            {
                "network": name,
                "density": 1.0 if name == "dense" else masks[name].density,
                "trace": s.trace,
                "fd_trace_estimate": fd[name][0],
                "fd_std_error": fd[name][1],
                "largest": s.largest,
                "smallest": s.smallest,
                "condition_number": s.condition_number,
                "effective_rank": s.effective_rank,
                "distance_to_dense": spectrum_distance(s, dense),
                "ntk_seconds": kernels_s[name],
                "prune_seconds": seconds.get(name),
            }
        )
    header = ("network", "density", "trace", "FD est.", "top eig", "cond. number", "eff. rank",
              "dist. to dense")  # fmt: skip
    table = [
        (r["network"], f"{100 * r['density']:.2f}%", _fmt(r["trace"]),
         _fmt(r["fd_trace_estimate"]), _fmt(r["largest"]), _fmt(r["condition_number"]),
         f"{r['effective_rank']:.1f}", f"{r['distance_to_dense']:.3f}")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in (header, *table)]  # fmt: skip
    n = x.shape[0]
    k = dense.eigenvalues.size // n  # logits per input
    title = (
        f"{args.model}, NTK of {n} inputs x {k} logits\n({source}, BN stats {args.bn_stats}), "
        f"{'given masks' if args.masks else f'sparsity {100 * (1 - d):.1f}%'}"
    )
    print(title)
    print("\n".join(lines))
    pruned = [r for r in rows if r["network"] != "dense"]
    if pruned:
        best = min(pruned, key=lambda r: r["distance_to_dense"])
        print(f"closest to dense: {best['network']} ({best['distance_to_dense']:.3f} decades)")
    print(
        "dist. to dense: mean |log10 eig - log10 eig_dense| over all eigenvalues (decades); "
        f"FD est.: NTK-SAP's finite-difference trace, {args.fd_draws} draws, eps {args.epsilon}"
    )
    out = args.out_dir
    png = plot_spectra(spectra, out / "spectrum.png", title)
    write_json(
        out / "spectrum.json",
        {
            "title": title,
            "model": args.model,
            "inputs": source,
            "samples": n,
            "logits": k,
            "dtype": args.dtype,
            "bn_stats": args.bn_stats,
            "rows": rows,
            "eigenvalues": {name: s.eigenvalues.tolist() for name, s in spectra.items()},
        },
    )
    print(f"wrote {png} and {out / 'spectrum.json'}", file=sys.stderr)
    return 0


__all__ = ["add_commands", "cmd_spectrum", "plot_spectra"]
