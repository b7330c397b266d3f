"""The cost of the sparse layers' bounds and input checks: timing of a converted ResNet-20
(98.2 % synflow mask, fused chains and chain=False, batch 64 and 1) and a standalone 98 %-sparse
SparseLinear(1024, 1024), per call, median of ROUNDS rounds. Run it once per package version
(PYTHONPATH selects it) and compare; usage:

    PYTHONPATH=OLD/src T=2 python benchmarks/bounds_checks_cost.py 5
    PYTHONPATH=src T=2 python benchmarks/bounds_checks_cost.py 5
"""

import os
import statistics
import sys
import time
import warnings

import torch

import ntksap
import ntksap.sparse as sp
from ntksap import models
from ntksap.sparse.layers import SparseLinear

warnings.simplefilter("ignore")
torch.set_num_threads(int(os.environ.get("T", "2")))
torch.manual_seed(0)
net = models.create("resnet20", num_classes=10).eval()
masks = ntksap.prune(net, "synflow", sparsity=0.982, input_shape=(3, 32, 32))
for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 2)
        m.weight.data.uniform_(0.5, 1.5)
fns = {}
for b in (64, 1):
    x = torch.randn(b, 3, 32, 32)
    fused = sp.convert(net, masks, example_input=x, autotune=False)
    layers = sp.convert(net, masks, example_input=x, autotune=False, chain=False)
    fns[f"fused b{b}"] = (fused, x)
    fns[f"layers b{b}"] = (layers, x)
w = torch.randn(1024, 1024) * (torch.rand(1024, 1024) < 0.02)
lin = SparseLinear.from_dense(w, torch.randn(1024), relu=True)
for b in (1, 64):
    fns[f"linear1024 b{b}"] = (lin, torch.randn(b, 1024))
res = {k: [] for k in fns}
with torch.no_grad():
    for _round in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        for k, (f, x) in fns.items():
            calls = 300 if k.endswith("b1") else 30
            for _ in range(3):
                f(x)
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                f(x)
                ts.append(time.perf_counter() - t)
            res[k].append(1e3 * statistics.median(ts))
print(sp.__file__)
for k, v in res.items():
    print(f"{k:18s} {statistics.median(v):8.4f} ms  (rounds: {' '.join(f'{t:.4f}' for t in v)})")
