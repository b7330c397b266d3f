"""Spectra, their distance, and NTK-SAP's finite-difference trace against an explicit Jacobian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import ntksap
from ntksap.analysis.spectrum import finite_difference_trace, spectrum, spectrum_distance


def test_spectrum_of_a_random_psd_matrix_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 12, generator=g, dtype=torch.float64)
    k = a @ a.T  # rank 12
    s = spectrum(k)
    ref = np.sort(np.linalg.eigvalsh(k.numpy()))[::-1]
    assert np.allclose(s.eigenvalues, ref, atol=1e-10)
    assert s.trace == pytest.approx(float(k.trace()))
    assert s.largest == pytest.approx(ref[0])
    assert math.isinf(s.condition_number) or s.condition_number > 1e10  # rank-deficient
    assert 1.0 <= s.effective_rank <= 12.0 + 1e-9


def test_spectrum_summary_values():
    s = spectrum(torch.eye(5) * 3)
    assert s.condition_number == pytest.approx(1.0)
    assert s.effective_rank == pytest.approx(5.0)
    with pytest.raises(ValueError, match="not symmetric"):
        spectrum(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        spectrum(torch.ones(2, 3))


def test_spectrum_distance_in_decades():
    a = spectrum(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    b = spectrum(torch.diag(torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)))
    assert spectrum_distance(a, a) == 0.0
    assert spectrum_distance(a, b) == pytest.approx(1.0)
    assert spectrum_distance(a, b, top_k=1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_k"):
        spectrum_distance(a, b, top_k=4)
    with pytest.raises(ValueError, match="differ in length"):
        spectrum_distance(a, np.array([1.0, 2.0]))


def _explicit_trace(model, x, masks):
    """||J diag(m)||_F^2 with J = d logits / d (theta * m), by per-output autograd.grad."""
    model = model.double().eval()
    params = ntksap.prunable_parameters(model)
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    out = model(x.double())  # (N, K)
    total = 0.0
    for i in range(out.shape[0]):
        for k in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, k], list(params.values()), retain_graph=True)
            total += sum(float((g * masks[n]).pow(2).sum()) for n, g in zip(params, grads))
    return total


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_finite_difference_trace_tracks_the_exact_trace(density):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    masks = ntksap.prune(net, "random", density=density)
    est, err = finite_difference_trace(net, x, masks, epsilon=1e-3, draws=400, seed=0)
    exact = _explicit_trace(net, x, masks)
    # unbiased to first order in eps: within 4 standard errors (+ a hair of curvature)
    assert abs(est - exact) < 4 * err + 1e-3 * exact, (est, err, exact)
    assert err < 0.1 * exact


def test_finite_difference_trace_leaves_the_model_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    finite_difference_trace(net, torch.randn(5, 4), draws=2)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
