"""ntksap.sparse: the kernels against torch's own conv / linear, converted models against the
masked dense model (1e-5 relative), save / load, and the errors.

Every check runs with the C++ kernels (when they are built here) and with the pure-torch
fallback (`extension_disabled()`), so the package works either way.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
import ntksap.sparse as sp
from ntksap import models
from ntksap.masks import MaskError, Masks
from ntksap.sparse.layers import SparseConv2d, SparseLinear, to_csr

BACKENDS = ["cpp", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once with the C++ kernels and once with the pure-torch fallback."""
    if request.param == "cpp":
        if not sp.extension_available():
            pytest.skip("C++ kernels not built on this machine")
        yield "cpp"
    else:
        with sp.extension_disabled():
            yield "torch"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def sparse_weight(shape, density, gen):
    w = torch.randn(shape, generator=gen)
    return w * (torch.rand(shape, generator=gen) < density)


# -- kernels ------------------------------------------------------------------------------

CONV_CASES = [
    # (N, C, H, W, O, k, stride, pad)
    (1, 3, 7, 9, 5, 3, 1, 1),
    (2, 4, 8, 8, 6, 3, 2, 1),
    (3, 5, 11, 10, 7, 1, 2, 0),
    (2, 3, 9, 9, 4, 3, 2, 0),
    (1, 2, 5, 6, 3, 5, 1, 2),
    (4, 16, 13, 13, 8, 3, 1, 0),
    (1, 1, 1, 1, 2, 1, 1, 0),
    (2, 3, 6, 7, 3, 3, 3, 1),
    # batches large enough that small planes are grouped several images per strip, with a
    # shorter last group
    (23, 5, 6, 7, 6, 3, 1, 1),
    (23, 4, 9, 9, 5, 3, 2, 1),
    (17, 3, 5, 5, 4, 1, 2, 0),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_sparse_conv_matches_conv2d(backend, case, density):
    n, c, h, w, o, k, s, p = case
    gen = torch.Generator().manual_seed(hash((case, density)) % 2**31)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = sparse_weight((o, c, k, k), density, gen)
    bias = torch.randn(o, generator=gen)
    ref = F.conv2d(x, weight, bias, s, p)
    layer = SparseConv2d.from_dense(weight, bias, stride=s, padding=p)
    assert layer.mode == "sparse"
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # fused epilogue: relu(conv + residual)
    res = torch.randn(ref.shape, generator=gen)
    fused = SparseConv2d.from_dense(weight, bias, stride=s, padding=p, relu=True, residual=True)
    torch.testing.assert_close(fused(x, res), (ref + res).relu(), rtol=1e-5, atol=1e-5)


def test_buffer_pool_padded_view_hand_worked():
    from ntksap.sparse.layers import PAD_SLACK, BufferPool

    pool = BufferPool()
    v = pool.get(0, torch.Size((2, 3, 4, 5)), pad=1)
    # interior of a (2, 3, 4 + 2 + 1, 5 + 2) buffer: rows of 7, planes of 7 * 7 = 49
    assert v.shape == (2, 3, 4, 5) and v.stride() == (147, 49, 7, 1)
    assert v.untyped_storage().nbytes() == 4 * (2 * 147 + PAD_SLACK)
    v.fill_(1.0)
    full = torch.as_strided(v, (2, 3, 7, 7), (147, 49, 7, 1), v.storage_offset() - 8)
    assert full.sum() == v.numel()  # only the interior was written: the border is zero
    assert pool.get(0, torch.Size((2, 3, 4, 5)), pad=1) is v  # reused
    assert pool.get(0, torch.Size((2, 3, 4, 5))).is_contiguous()  # pad -1: plain buffer


@pytest.mark.parametrize(("k", "pad", "size"), [(3, 1, (3, 4, 9, 7)), (5, 2, (2, 3, 6, 6))])
def test_conv_chain_through_padded_buffers(backend, k, pad, size):
    """A conv writing into a zero-bordered buffer (out_pad) and the next reading it in
    place (in_padded), with a strided residual, equal torch; a contiguous input given to a
    layer marked in_padded is still read correctly (the kernel checks the strides)."""
    from ntksap.sparse.layers import BufferPool

    n, c, h, w = size
    gen = torch.Generator().manual_seed(k)
    w1, w2 = sparse_weight((c, c, k, k), 0.4, gen), sparse_weight((c, c, k, k), 0.4, gen)
    b1, b2 = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    x, res = torch.randn(size, generator=gen), torch.randn(size, generator=gen)
    first = SparseConv2d.from_dense(w1, b1, padding=pad, relu=True)
    second = SparseConv2d.from_dense(w2, b2, padding=pad, relu=True, residual=True)
    pool = BufferPool()
    first.pool, first.slot, first.out_pad = pool, 0, pad
    second.pool, second.slot, second.in_padded = pool, 1, True
    strided_res = torch.randn(n, c, h + 3, w + 2, generator=gen)[:, :, 1 : h + 1, 1 : w + 1]
    strided_res.copy_(res)
    mid_ref = F.conv2d(x, w1, b1, padding=pad).relu()
    ref = (F.conv2d(mid_ref, w2, b2, padding=pad) + res).relu()
    for _ in range(2):  # the second call reuses the buffers: borders must still be zero
        mid = first(x)
        if backend == "cpp":
            assert not mid.is_contiguous() and mid.stride(2) == w + 2 * pad
        torch.testing.assert_close(mid, mid_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second(mid, strided_res), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second(mid_ref, res), ref, rtol=1e-5, atol=1e-5)


def test_convert_chains_resnet_convs_through_padded_buffers():
    if not sp.extension_available():
        pytest.skip("C++ kernels not built on this machine")
    net = randomise_bn(models.create("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    fast = check_equal(net, masks_for(net, 0.9), x, autotune=False, chain=False)
    layers = {m.source_name: m for m in fast.layers().values()}
    # block outputs pass through identity shortcuts and still get a padded buffer
    assert layers["conv1"].out_pad == 1 and layers["layer1.0.conv1"].in_padded
    assert layers["layer1.0.conv1"].out_pad == 1 and layers["layer1.0.conv2"].in_padded
    # stride-2 readers copy (polyphase planes): no in-place read
    assert not layers["layer2.0.conv1"].in_padded and not layers["layer2.0.shortcut.0"].in_padded


@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
def test_sparse_linear_matches_linear(backend, n, density):
    gen = torch.Generator().manual_seed(n * 7 + int(density * 100))
    weight = sparse_weight((13, 29), density, gen)
    bias = torch.randn(13, generator=gen)
    x = torch.randn(n, 29, generator=gen)
    ref = F.linear(x, weight, bias)
    torch.testing.assert_close(SparseLinear.from_dense(weight, bias)(x), ref, rtol=1e-5, atol=1e-5)
    relu = SparseLinear.from_dense(weight, None, relu=True)
    torch.testing.assert_close(relu(x), F.linear(x, weight).relu(), rtol=1e-5, atol=1e-5)


def test_to_csr_hand_worked():
    w = torch.tensor([[[[0.0, 1.5]], [[0.0, 0.0]]], [[[2.0, 0.0]], [[0.0, -1.0]]]])  # (2,2,1,2)
    rowptr, col, val = to_csr(w)
    # row 0: c=0 dx=1 -> column 1; row 1: c=0 dx=0 -> 0, c=1 dx=1 -> 3
    assert rowptr.tolist() == [0, 1, 3]
    assert col.tolist() == [1, 0, 3]
    assert val.tolist() == [1.5, 2.0, -1.0]


def test_groups_and_dilation_fall_back_to_dense(backend):
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)
    layer = SparseConv2d.from_dense(
        conv.weight, conv.bias, stride=1, padding=2, dilation=2, groups=2
    )
    assert layer.mode == "dense" and "groups=2" in layer.kernel_reason
    with pytest.raises(ValueError, match="groups=2"):
        layer.set_mode("sparse")
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


# -- conversion -----------------------------------------------------------------------------


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


def masks_for(model: nn.Module, sparsity: float, kill: str | None = None, seed: int = 0) -> Masks:
    """Random masks over every Conv2d / Linear weight; `kill` names a layer pruned to 0 %."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() in (2, 4):
            out[name] = torch.rand(p.shape, generator=gen) >= sparsity
    if kill is not None:
        out[kill] = torch.zeros_like(out[kill])
    return Masks(out)


def check_equal(model, masks, x, **kwargs):
    dense = ntksap.apply_masks(copy.deepcopy(model), masks).eval()
    with torch.no_grad():
        ref = dense(x)
    fast = sp.convert(model, masks, example_input=x, **kwargs)
    assert rel_err(fast(x), ref) <= 1e-5
    return fast


@pytest.mark.parametrize(
    ("sparsity", "kill"), [(0.0, None), (0.9, None), (0.982, "layer2.1.conv1.weight")]
)
def test_convert_resnet20(backend, sparsity, kill):
    net = randomise_bn(models.create("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    fast = check_equal(net, masks_for(net, sparsity, kill), x, autotune=False)
    d = {d.name: d for d in fast.decisions}
    # BN folded everywhere, residual + ReLU fused into every block's second conv
    assert d["layer1.0.conv2"].bn_folded and d["layer1.0.conv2"].fused == "residual+relu"
    assert d["conv1"].fused == "relu" and d["layer2.0.shortcut.0"].bn_folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    if kill:
        assert d["layer2.1.conv1"].density == 0.0


def test_convert_vgg16_bn(backend):
    net = randomise_bn(models.create("vgg16_bn"))
    x = torch.randn(2, 3, 32, 32)
    fast = check_equal(net, masks_for(net, 0.956, "features.10.weight"), x, autotune=False)
    assert all(d.bn_folded for d in fast.decisions if d.kind == "conv")


@pytest.mark.parametrize("sparsity", [0.0, 0.95])
def test_convert_mlp_untraceable_root(backend, sparsity):
    # The zoo MLP checks its input size in Python: torch.fx cannot trace the root, so its
    # children are converted (and ReLU fused) inside it.
    net = models.create("mlp", hidden=(64, 32))
    x = torch.randn(3, 1, 28, 28)
    fast = check_equal(net, masks_for(net, sparsity, "layers.3.weight"), x, autotune=False)
    assert fast.source["untraced"] == ["<model>: TraceError"]
    assert {d.fused for d in fast.decisions} == {"relu", ""}


class Arbitrary(nn.Module):
    """Conv stride 1 / 2, padding 0 / 1, BN, a residual with a projection, functional ReLU,
    a broadcasting add (must not be fused), pooling and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(8, 8, 1, stride=2, padding=0)
        self.c = nn.Conv2d(8, 6, 3, stride=1, padding=0)
        self.scale = nn.Parameter(torch.randn(6, 1, 1))
        self.fc1 = nn.Linear(6 * 3 * 3, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        y = F.relu(self.bn_a(self.a(x)))  # (N, 8, 9, 9)
        y = torch.relu(self.b(y) + self.proj(y))  # (N, 8, 5, 5): residual + relu fused
        y = self.c(y) + self.scale  # (N, 6, 3, 3): broadcasting add, not fused
        y = torch.flatten(y, 1)
        return self.fc2(F.relu(self.fc1(y)))


@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.99])
def test_convert_arbitrary_model(backend, sparsity):
    torch.manual_seed(0)
    net = randomise_bn(Arbitrary().eval())
    x = torch.randn(4, 3, 9, 9)
    fast = check_equal(net, masks_for(net, sparsity, "proj.weight"), x, autotune=False)
    d = {d.name: d for d in fast.decisions}
    assert d["a"].bn_folded and d["a"].fused == "relu"
    assert d["b"].fused == "residual+relu" or d["proj"].fused == "residual+relu"
    assert d["c"].fused == "" and d["fc1"].fused == "relu"


def test_attached_masks_and_exact_zeros(backend):
    torch.manual_seed(1)
    net = Arbitrary().eval()
    masks = masks_for(net, 0.8)
    x = torch.randn(2, 3, 9, 9)
    masked = ntksap.apply_masks(copy.deepcopy(net), masks).eval()
    with torch.no_grad():
        ref = masked(x)
    fast = sp.convert(masked, example_input=x, autotune=False)  # masks read off the model
    assert rel_err(fast(x), ref) <= 1e-5
    assert all(d.masked and d.mode == "sparse" for d in fast.decisions)
    baked = ntksap.remove_masks(copy.deepcopy(masked))  # exact zeros only
    fast = sp.convert(baked, example_input=x, autotune=False)
    assert rel_err(fast(x), ref) <= 1e-5 and all(d.masked for d in fast.decisions)
    assert ntksap.get_masks(masked)  # the user's model keeps its masks


def test_autotune_records_and_keeps_outputs(backend):
    net = randomise_bn(models.create("resnet20"))
    masks = masks_for(net, 0.95)
    x = torch.randn(2, 3, 32, 32)
    fast = check_equal(net, masks, x, autotune=True, threads=1)
    timed = [d for d in fast.decisions if d.masked]
    assert timed and all(d.dense_ms > 0 and d.sparse_ms > 0 for d in timed)
    assert all(d.mode == ("sparse" if d.sparse_ms < d.dense_ms else "dense") for d in timed)
    modes = {name: layer.mode for name, layer in fast.layers().items()}
    assert modes == {d.name: d.mode for d in fast.decisions}
    text = fast.summary()
    assert "layer3.2.conv2" in text and "autotuned at batch 2, 1 thread(s)" in text


def test_reused_buffers_never_change_a_returned_output():
    net = randomise_bn(models.create("resnet20"))
    fast = sp.convert(net, masks_for(net, 0.9), example_input=torch.randn(2, 3, 32, 32))
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    y1 = fast(x1)
    keep = y1.clone()
    y2 = fast(x2)
    assert torch.equal(y1, keep) and not torch.equal(y1, y2)
    assert torch.equal(fast(x1), keep)


# -- save / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "mlp", "arbitrary"])
def test_save_load_round_trip(tmp_path, name):
    if name == "arbitrary":
        net, x = randomise_bn(Arbitrary().eval()), torch.randn(2, 3, 9, 9)
    elif name == "mlp":
        net, x = models.create("mlp", hidden=(32,)), torch.randn(2, 1, 28, 28)
    else:
        net, x = randomise_bn(models.create("resnet20")), torch.randn(2, 3, 32, 32)
    fast = sp.convert(net, masks_for(net, 0.9), example_input=x, autotune=False)
    fast.layers()[fast.decisions[-1].name].set_mode("dense")  # one dense layer as well
    path = sp.save(fast, tmp_path / "model.safetensors")
    assert path == tmp_path / "model.safetensors"
    back = sp.load(path)
    assert torch.equal(back(x), fast(x))
    assert {n: m.mode for n, m in back.layers().items()} == {
        n: m.mode for n, m in fast.layers().items()
    }
    assert back.summary().splitlines()[1:] == fast.summary().splitlines()[1:]


def test_save_refuses_untraceable_non_zoo_model(tmp_path):
    class Checks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace it
                raise ValueError("too large")
            return self.fc(x)

    x = torch.randn(3, 4)
    fast = sp.convert(Checks(), example_input=x, autotune=False)
    torch.testing.assert_close(fast(x), fast.net.fc(x))
    with pytest.raises(ValueError, match="could not be traced"):
        sp.save(fast, tmp_path / "m.safetensors")


def test_load_rejects_other_files(tmp_path):
    masks = masks_for(nn.Linear(3, 2), 0.5)
    path = masks.save(tmp_path / "masks.safetensors")
    with pytest.raises(ValueError, match=r"not an ntksap\.sparse file"):
        sp.load(path)
    with pytest.raises(FileNotFoundError):
        sp.load(tmp_path / "missing.safetensors")


# -- errors ---------------------------------------------------------------------------------


def test_inference_only_errors():
    net = nn.Sequential(nn.Linear(4, 3))
    fast = sp.convert(net, example_input=torch.randn(2, 4), autotune=False)
    with pytest.raises(RuntimeError, match="inference-only"):
        fast.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        fast(torch.randn(2, 4, requires_grad=True))
    fast.eval()  # fine
    with torch.no_grad():
        fast(torch.randn(2, 4, requires_grad=True))  # fine without grad mode


def test_bad_input_errors():
    net = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"torch.nn.Module"):
        sp.convert("not a model")
    with pytest.raises(TypeError, match="float32"):
        sp.convert(copy.deepcopy(net).double(), autotune=False)
    with pytest.raises(MaskError, match=r"0\.nope"):
        sp.convert(net, {"0.nope": torch.ones(3, 4, dtype=torch.bool)}, autotune=False)
    with pytest.raises(ValueError, match="example_input"):
        sp.convert(net)  # autotune needs an example for a non-zoo model
    with pytest.raises(ValueError, match="threads"):
        sp.convert(net, autotune=False, threads=0)
    with pytest.raises(TypeError, match="convert returns"):
        sp.save(net, "x.safetensors")
    fast = sp.convert(net, autotune=False)
    with pytest.raises(TypeError, match="float32"):
        fast(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="mode must be one of"):
        next(iter(fast.layers().values())).set_mode("fast")


def test_kernel_shapes_many_random(backend):
    """Random small geometries, batch 1 and > 1, against F.conv2d."""
    gen = torch.Generator().manual_seed(123)
    for _, (n, s, p, k) in zip(
        range(12), itertools.cycle(itertools.product([1, 3], [1, 2], [0, 1], [1, 3]))
    ):
        c, o = (
            int(torch.randint(1, 6, (1,), generator=gen)),
            int(torch.randint(1, 6, (1,), generator=gen)),
        )
        h, w = (
            int(torch.randint(k, 12, (1,), generator=gen)),
            int(torch.randint(k, 12, (1,), generator=gen)),
        )
        x = torch.randn(n, c, h, w, generator=gen)
        weight = sparse_weight((o, c, k, k), 0.4, gen)
        layer = SparseConv2d.from_dense(weight, None, stride=s, padding=p)
        torch.testing.assert_close(layer(x), F.conv2d(x, weight, None, s, p), rtol=1e-5, atol=1e-5)
