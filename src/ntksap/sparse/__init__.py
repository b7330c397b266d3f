"""Sparse inference: pruned networks that run faster than dense on a CPU.

`convert(model)` turns a masked dense model into an inference-only module whose masked
Conv2d / Linear layers store their weights as CSR and run a direct sparse convolution
(Park et al., ICLR 2017) or CSR x dense product in C++ where the per-layer autotune
measures that faster than dense; BatchNorm is folded into the preceding conv, ReLU and
residual adds are fused into the layer's epilogue. Runs of sparse convs with one input and
one output (a ResNet's trunk, a VGG block) become one `SparseChain`: a C++ executor runs
the whole run in one call, 16 images at a time in a batch-interleaved layout (aligned
AVX-512 strips), each group depth-first through the run. `save` / `load` write and read it
as safetensors (no pickle).

The C++ kernels are built by `make` (`python -m ntksap.sparse.build`) or on first use;
without a compiler a pure-torch fallback gives the same results (not faster).

Example:
    >>> import torch, ntksap, ntksap.sparse
    >>> from ntksap import models
    >>> net = models.create("resnet20")
    >>> masks = ntksap.prune(net, "magnitude", sparsity=0.9, input_shape=(3, 32, 32))
    >>> x = torch.randn(2, 3, 32, 32)
    >>> fast = ntksap.sparse.convert(net, masks, example_input=x, autotune=False)
    >>> ref = ntksap.apply_masks(net, masks).eval()(x)
    >>> bool((fast(x) - ref).abs().max() <= 1e-5 * ref.abs().max())
    True
"""

from ntksap.sparse._ext import available as extension_available
from ntksap.sparse._ext import disabled as extension_disabled
from ntksap.sparse.convert import LayerDecision, SparseModel, convert
from ntksap.sparse.io import load, save
from ntksap.sparse.layers import (
    InputShapeError,
    InputTypeError,
    SparseChain,
    SparseConv2d,
    SparseLinear,
    check_csr,
)

__all__ = [
    "InputShapeError",
    "InputTypeError",
    "LayerDecision",
    "SparseChain",
    "SparseConv2d",
    "SparseLinear",
    "SparseModel",
    "check_csr",
    "convert",
    "extension_available",
    "extension_disabled",
    "load",
    "save",
]
