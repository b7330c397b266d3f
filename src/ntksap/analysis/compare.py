"""Compare the NTK spectra of a dense network and its pruned versions: rows and a plot.

For each network (dense, then each labelled mask) on the same inputs: the fixed-weight
empirical NTK of the logits (N inputs x K logits: an NK x NK matrix, eval mode), its trace,
top eigenvalue, condition number, effective rank, the distance of its spectrum to the dense
one (mean |log10 eig - log10 eig_dense|, in decades) and NTK-SAP's finite-difference estimate
of the trace.

Example:
    >>> import torch, ntksap
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    >>> x = torch.randn(5, 1, 4, 4)
    >>> m = ntksap.prune(net, "magnitude", density=0.5, input_shape=(1, 4, 4))
    >>> rows, spectra = compare_spectra(net, x, {"magnitude": m}, bn_stats="init")
    >>> [r["network"] for r in rows]
    ['dense', 'magnitude']
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ntksap import validate as v
from ntksap.analysis.ntk import empirical_ntk
from ntksap.analysis.spectrum import (
    Spectrum,
    calibrate_batchnorm,
    finite_difference_trace,
    spectrum,
    spectrum_distance,
)
from ntksap.files import atomic_write
from ntksap.masks import Masks

BN_STATS = ("calibrate", "init")


def compare_spectra(
    model: nn.Module,
    x: torch.Tensor,
    masks: Mapping[str, Masks],
    *,
    bn_stats: str = "calibrate",
    fd_draws: int = 8,
    epsilon: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    implementation: str = "auto",
    memory_limit: int = 2 * 2**30,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[list[dict[str, Any]], dict[str, Spectrum]]:
    """One row per network ("dense" first, then each label of `masks`) and its spectrum.

    Args:
        bn_stats: "calibrate" measures each network's BatchNorm statistics on `x` (NTK-SAP's
            rule); "init" keeps the initial running statistics.
        fd_draws / epsilon: draws and perturbation std of the finite-difference trace.
    """
    v.choice("bn_stats", bn_stats, BN_STATS)
    v.positive_int("fd_draws", fd_draws)
    v.positive_float("epsilon", epsilon)
    v.seed(seed)
    if "dense" in masks:
        raise ValueError("'dense' is the unpruned network's label; name the masks otherwise")
    for m in masks.values():
        m.check_covers(model)
    rows, spectra, dense = [], {}, None
    for label, m in [("dense", None), *masks.items()]:
        t0 = time.perf_counter()
        net = calibrate_batchnorm(model, x, m) if bn_stats == "calibrate" else model
        kernel = empirical_ntk(
            net, x, m, mode="full", implementation=implementation, dtype=dtype,
            memory_limit=memory_limit, device=device,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        s = spectrum(kernel)
        dense = dense or s
        fd, fd_err = finite_difference_trace(net, x, m, epsilon=epsilon, draws=fd_draws, seed=seed)
        spectra[label] = s
        rows.append(
            {
                "network": label,
                "density": 1.0 if m is None else m.density,
                "trace": s.trace,
                "fd_trace_estimate": fd,
                # one draw has no spread: None (JSON null), not NaN
                "fd_std_error": fd_err if math.isfinite(fd_err) else None,
                "largest": s.largest,
                "smallest": s.smallest,
                "condition_number": s.condition_number,
                "effective_rank": s.effective_rank,
                "distance_to_dense": spectrum_distance(s, dense),
                "ntk_seconds": seconds,
            }
        )
        log(f"NTK {label}: {tuple(kernel.shape)} in {seconds:.1f} s")
    return rows, spectra


def plot_spectra(spectra: Mapping[str, Spectrum], path: Path, title: str) -> Path:
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
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


__all__ = ["BN_STATS", "compare_spectra", "plot_spectra"]
