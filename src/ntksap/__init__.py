"""ntksap: neural network pruning at initialisation, NTK-SAP and the standard baselines.

Three lines prune any PyTorch model:

    >>> import ntksap, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    >>> masks = ntksap.prune(net, "ntksap", sparsity=0.9, input_shape=(3, 32, 32), rounds=2)
    >>> net = ntksap.apply_masks(net, masks)   # effective weight = w * m, via parametrize
"""

from ntksap._version import __version__
from ntksap.attach import apply_masks, export_to_torch_prune, get_masks, remove_masks
from ntksap.masks import MaskError, Masks
from ntksap.masks import effective as effective_masks
from ntksap.pruning import (
    LayerCollapseWarning,
    compute_scores,
    prune,
    resolve_density,
    schedule_densities,
    select,
    shuffle_masks,
)
from ntksap.registry import UnknownNameError
from ntksap.reinit import reinitialize
from ntksap.scoring import Option, get_method, list_methods, register_method
from ntksap.targets import prunable_parameters

#: Deployment submodules, imported on first use (`ntksap.sparse.convert(model, masks)`
#: works after a plain `import ntksap`): they pull in optional dependencies (onnx,
#: torch-pruning) or compile C++ kernels, which pruning alone does not need.
_LAZY_SUBMODULES = ("compact", "export", "sparse")


def __getattr__(name: str):
    # `ntksap.run` (prune + train into a run folder) is imported on first use: it pulls in
    # the data and training modules, which pruning alone does not need.
    if name == "run":
        from ntksap.runs import run

        return run
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"ntksap.{name}")
    raise AttributeError(f"module 'ntksap' has no attribute {name!r}")


__all__ = [
    "LayerCollapseWarning",
    "MaskError",
    "Masks",
    "Option",
    "UnknownNameError",
    "__version__",
    "apply_masks",
    "compute_scores",
    "effective_masks",
    "export_to_torch_prune",
    "get_masks",
    "get_method",
    "list_methods",
    "prunable_parameters",
    "prune",
    "register_method",
    "reinitialize",
    "remove_masks",
    "resolve_density",
    "run",
    "schedule_densities",
    "select",
    "shuffle_masks",
]
