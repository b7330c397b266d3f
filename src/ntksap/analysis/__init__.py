"""NTK analysis: the exact empirical NTK of (pruned) networks and its eigenspectrum.

Example:
    >>> import torch
    >>> from ntksap.analysis import empirical_ntk, spectrum
    >>> net = torch.nn.Linear(3, 2, bias=False)
    >>> s = spectrum(empirical_ntk(net, torch.eye(3)))   # f = W x: NTK = (X X^T) kron I_2
    >>> s.eigenvalues.tolist()
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
"""

from ntksap.analysis.ntk import NTKMemoryError, empirical_ntk, ntk_cost
from ntksap.analysis.spectrum import (
    Spectrum,
    calibrate_batchnorm,
    finite_difference_trace,
    spectrum,
    spectrum_distance,
)

__all__ = [
    "NTKMemoryError",
    "Spectrum",
    "calibrate_batchnorm",
    "empirical_ntk",
    "finite_difference_trace",
    "ntk_cost",
    "spectrum",
    "spectrum_distance",
]
