"""NTK eigenspectra, their summary statistics, distances, and NTK-SAP's trace estimate.

`spectrum(K)` sorts the eigenvalues of a symmetric kernel matrix (float64 `eigvalsh`),
`spectrum_distance(a, b)` compares two spectra on a log scale, and
`calibrate_batchnorm(...)` sets a (pruned) network's BatchNorm statistics on the NTK inputs,
and `finite_difference_trace(...)` is the quantity NTK-SAP scores with,
R / eps^2 = E_delta ||f(x; theta*m) - f(x; (theta+delta)*m)||^2 / eps^2, an unbiased estimate
(to first order in eps) of the exact trace ||J diag(m)||_F^2 at fixed weights and inputs,
for comparison with `empirical_ntk(..., mode="trace")`.

Example:
    >>> import torch
    >>> s = spectrum(torch.diag(torch.tensor([4.0, 1.0, 2.0])))
    >>> s.eigenvalues.tolist(), s.trace, s.condition_number
    ([4.0, 2.0, 1.0], 7.0, 4.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ntksap.attach import apply_masks, get_masks, private_copy, remove_masks
from ntksap.scoring.base import batchnorms
from ntksap.targets import prunable_parameters


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues (descending, float64) of a kernel and their summary.

    Attributes:
        eigenvalues: (M,) descending. Tiny negative values from round-off are kept as
            computed (a PSD kernel's true eigenvalues are >= 0).
        trace: sum of eigenvalues (= trace of the kernel).
        largest / smallest: extreme eigenvalues.
        condition_number: largest / smallest, inf when the smallest is <= 0
            (a rank-deficient kernel, common in heavily pruned networks).
        effective_rank: exp(entropy of eigenvalues / trace), between 1 and M.
    """

    eigenvalues: np.ndarray
    trace: float
    largest: float
    smallest: float
    condition_number: float
    effective_rank: float


def spectrum(kernel: torch.Tensor | np.ndarray) -> Spectrum:
    """Eigen-decomposition summary of a symmetric (M, M) kernel matrix."""
    k = torch.as_tensor(kernel, dtype=torch.float64).cpu()
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"kernel must be a square matrix, got shape {tuple(k.shape)}")
    asym = float((k - k.T).abs().max()) if k.numel() else 0.0
    scale = float(k.abs().max()) if k.numel() else 0.0
    if asym > 1e-6 * max(scale, 1e-300):
        raise ValueError(f"kernel is not symmetric (max |K - K^T| = {asym:.3g}, scale {scale:.3g})")
    eig = torch.linalg.eigvalsh(0.5 * (k + k.T)).flip(0).numpy()  # descending
    largest, smallest = float(eig[0]), float(eig[-1])
    pos = np.clip(eig, 0.0, None)
    total = float(pos.sum())
    p = pos[pos > 0] / total if total > 0 else np.array([1.0])
    return Spectrum(
        eigenvalues=eig,
        trace=float(eig.sum()),
        largest=largest,
        smallest=smallest,
        condition_number=largest / smallest if smallest > 0 else math.inf,
        effective_rank=float(np.exp(-(p * np.log(p)).sum())),
    )


def spectrum_distance(
    a: Spectrum | np.ndarray, b: Spectrum | np.ndarray, top_k: int | None = None
) -> float:
    """Mean |log10 eig_a - log10 eig_b| over the top-k eigenvalues (all by default).

    Both spectra are sorted descending and compared index by index; eigenvalues are floored
    at 1e-12 x the larger spectrum's top eigenvalue so that zeros (rank deficiency) count
    as a large but finite distance. Units: decades (1.0 = a factor of 10 on average).
    """
    ea = a.eigenvalues if isinstance(a, Spectrum) else np.sort(np.asarray(a))[::-1]
    eb = b.eigenvalues if isinstance(b, Spectrum) else np.sort(np.asarray(b))[::-1]
    if len(ea) != len(eb):
        raise ValueError(f"spectra differ in length: {len(ea)} vs {len(eb)}")
    k = len(ea) if top_k is None else top_k
    if not 1 <= k <= len(ea):
        raise ValueError(f"top_k must be in [1, {len(ea)}], got {top_k}")
    floor = 1e-12 * max(float(ea[0]), float(eb[0]), 1e-300)
    la = np.log10(np.clip(ea[:k], floor, None))
    lb = np.log10(np.clip(eb[:k], floor, None))
    return float(np.abs(la - lb).mean())


@torch.no_grad()
def finite_difference_trace(
    model: nn.Module,
    x: torch.Tensor,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    epsilon: float = 0.01,
    draws: int = 10,
    seed: int = 0,
    include_bias: bool = False,
) -> tuple[float, float]:
    """NTK-SAP's finite-difference estimate of the NTK trace, and its standard error.

    For `draws` perturbations delta ~ N(0, eps^2) on the prunable weights,
    R = ||f(x; theta*m) - f(x; (theta+delta)*m)||^2 summed over samples and logits; the
    estimate is mean(R) / eps^2, to be compared with `empirical_ntk(..., mode="trace")`
    (same weights theta, same inputs x, eval mode, float64). Returns (estimate, std error).
    """
    if epsilon <= 0 or draws < 1:
        raise ValueError(f"epsilon must be > 0 and draws >= 1, got {epsilon}, {draws}")
    targets = prunable_parameters(model, include_bias=include_bias)
    masks = dict(masks or {})
    unknown = sorted(set(masks) - set(targets))
    if unknown:
        raise ValueError(f"masks name tensors that are not prunable here: {unknown[:5]}")
    attached = get_masks(model)  # plain names, as `targets`; empty when nothing is attached
    net = model
    if len(attached):
        # Masks attached with apply_masks rename the parameters ("a.parametrizations.weight
        # .original"); on a baked copy the names are the plain ones and the weights are the
        # effective theta * m. The attached masks also keep the perturbation off pruned
        # entries, so they are combined with `masks` below.
        net = remove_masks(private_copy(model))
    was_training = net.training
    net.eval()
    try:
        dev = next(iter(targets.values())).device
        state = {
            n: t.detach().to(torch.float64)
            for n, t in [*net.named_parameters(), *net.named_buffers()]
            if t.is_floating_point()
        }
        m = {}
        for n, p in targets.items():
            m[n] = torch.ones(p.shape, dtype=torch.bool, device=dev)
            for source in (masks, attached):
                if n in source:
                    m[n] = m[n] & source[n].to(dev, torch.bool)
        theta = {n: state[n] * m[n] for n in targets}
        xx = x.to(dev, torch.float64)
        clean = functional_call(net, {**state, **theta}, (xx,))
        gen = torch.Generator(device=dev).manual_seed(seed)
        values = []
        for _ in range(draws):
            pert = {
                n: (state[n] + epsilon * torch.randn(state[n].shape, generator=gen, device=dev,
                                                     dtype=torch.float64)) * m[n]
                for n in targets
            }  # fmt: skip
            out = functional_call(net, {**state, **pert}, (xx,))
            values.append(float((clean - out).pow(2).sum()) / epsilon**2)
    finally:
        net.train(was_training)
    arr = np.asarray(values)
    err = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan
    return float(arr.mean()), err


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module, x: torch.Tensor, masks: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """A copy of `model` with `masks` baked in and BatchNorm statistics measured on `x`.

    Every BatchNorm's running mean and (unbiased) variance become this (pruned) network's
    batch statistics on `x`: one no-grad train-mode pass with momentum 1, NTK-SAP's own BN
    rule. At initialisation the running statistics are (0, 1), so in eval mode BatchNorm
    normalises nothing; pruning then shrinks activations layer after layer and the NTK
    measures that loss of scale rather than the network that will be trained (where
    BatchNorm does normalise). Masks attached to `model` count too. The copy is returned in
    eval mode, with plain parameters; `model` is untouched.
    """
    # Masks already attached are baked first: apply_masks refuses a tensor masked twice.
    net = remove_masks(private_copy(model))
    if masks:
        remove_masks(apply_masks(net, masks))  # pruned weights exactly 0, plain parameters
    bns = batchnorms(net)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0
    net.train()
    net(x.to(next(net.parameters()).device))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    return net.eval()
