"""ntksap.sparse chains: the C++ executor that runs a run of sparse convs in one call.

Checked against torch's own `F.conv2d` chain (hand-built chains covering strides, paddings,
1x1 shortcuts, residuals from the input and from earlier values, dead and dense layers,
non-square maps), over batch sizes that exercise the blocked layout (groups of 16 images),
the spatial path (left-over images) and both mixed, with 1 and 2 threads and with ops split
between threads; then through `convert` on zoo models, save / load, and the errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
import ntksap.sparse as sp
from ntksap import models
from ntksap.sparse.layers import SparseChain, SparseConv2d
from test_sparse import masks_for, randomise_bn, rel_err

pytestmark = pytest.mark.skipif(
    not sp.extension_available(), reason="C++ kernels not built on this machine"
)

# (in, res, out_channels, in_channels, kernel, stride, pad, relu, density)
STEPS = [
    (0, -1, 8, 3, 3, 1, 1, True, 0.5),  # value 1
    (1, -1, 8, 8, 3, 1, 1, True, 0.2),  # value 2
    (2, 1, 8, 8, 3, 1, 1, True, 0.2),  # value 3: residual from value 1
    (3, -1, 12, 8, 3, 2, 1, True, 0.15),  # value 4: stride 2
    (3, -1, 12, 8, 1, 2, 0, False, 0.4),  # value 5: 1x1 stride-2 shortcut
    (4, 5, 12, 12, 3, 1, 1, True, 0.1),  # value 6: residual from the shortcut
    (6, -1, 12, 12, 5, 1, 2, False, 0.05),  # value 7: 5x5, pad 2 (border 2)
    (7, 6, 12, 12, 1, 1, 0, True, 0.0),  # value 8: dead layer (bias only) + residual
    (8, -1, 6, 12, 3, 1, 0, False, 1.0),  # value 9: dense, no padding (shrinks the map)
]


def build_chain(seed: int = 0, steps=STEPS, output: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    weights, biases, layers = [], [], []
    for _src, res, o, c, k, s, p, relu, density in steps:
        w = torch.randn(o, c, k, k, generator=gen)
        w = w * (torch.rand(w.shape, generator=gen) < density)
        b = torch.randn(o, generator=gen)
        weights.append(w)
        biases.append(b)
        layers.append(
            SparseConv2d.from_dense(w, b, stride=s, padding=p, relu=relu, residual=res >= 0)
        )
    out = output or len(steps)
    chain = SparseChain(layers, [(st[0], st[1]) for st in steps], output=out)

    def reference(x: torch.Tensor) -> torch.Tensor:
        values = [x.double()]
        for step, w, b, layer in zip(steps, weights, biases, layers, strict=True):
            src, res, relu = step[0], step[1], step[7]
            y = F.conv2d(values[src], w.double(), b.double(), layer.stride, layer.padding)
            if res >= 0:
                y = y + values[res]
            values.append(y.relu() if relu else y)
        return values[out].float()

    return chain, reference


@pytest.mark.parametrize("n", [1, 5, 16, 21, 37])
@pytest.mark.parametrize("policy", ["auto", "blocked", "spatial", "blocked-no-wavefront"])
def test_chain_matches_conv2d(n, policy):
    """Ops 0-2 and 5-7 are same-size segments (row-band wavefront in the blocked layout:
    3x3, 5x5 (two rows of look-ahead) and 1x1 convs, residuals from inside and outside the
    segment); ops 3, 4 (stride 2) and 8 (shrinks the map) run alone."""
    chain, reference = build_chain()
    chain.policy = policy.removesuffix("-no-wavefront")
    chain.wavefront = not policy.endswith("-no-wavefront")
    x = torch.randn(n, 3, 13, 11)  # non-square, odd sizes: partial chunks everywhere
    with torch.no_grad():
        got = chain(x)
    assert got.shape == (n, 6, 5, 4)  # 13x11 -> stride 2: 7x6 -> 3x3 unpadded: 5x4
    assert rel_err(got, reference(x)) <= 1e-5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("split_work", [-1, 0])
@pytest.mark.parametrize("n", [1, 16])
def test_chain_threads_and_split_ops(threads, split_work, n):
    """split_work=0: every op splits its output channels between the threads (small
    batches); the result must not depend on how the work is divided."""
    chain, reference = build_chain(seed=1)
    chain.split_work = split_work
    x = torch.randn(n, 3, 16, 16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = chain(x)
    finally:
        torch.set_num_threads(before)
    assert rel_err(got, reference(x)) <= 1e-5


def test_chain_output_is_an_inner_value_and_repeat_calls_agree():
    """The chain's output may be any value (here value 3), and repeated calls (scratch
    reused, borders zeroed once) give the same result; other sizes get their own plan."""
    chain, reference = build_chain(steps=STEPS[:3], output=3)
    for shape in [(17, 3, 9, 9), (2, 3, 12, 7), (17, 3, 9, 9)]:
        x = torch.randn(shape)
        with torch.no_grad():
            first, second = chain(x), chain(x)
        assert torch.equal(first, second)
        assert rel_err(first, reference(x)) <= 1e-5


def test_chain_layers_mode_equals_fused():
    chain, reference = build_chain(seed=2)
    x = torch.randn(18, 3, 10, 10)
    with torch.no_grad():
        fused = chain.compute("fused", x)
        layers = chain.compute("layers", x)
    assert rel_err(fused, layers) <= 1e-5 and rel_err(layers, reference(x)) <= 1e-5


def _chains(model: nn.Module) -> list[SparseChain]:
    return [m for m in model.modules() if isinstance(m, SparseChain)]


@pytest.mark.parametrize("n", [1, 3, 16, 20])
def test_convert_resnet20_one_chain(n):
    net = randomise_bn(models.create("resnet20"))
    masks = masks_for(net, 0.95)
    x = torch.randn(n, 3, 32, 32)
    fast = sp.convert(net, masks, example_input=x, autotune=False)
    (chain,) = _chains(fast)  # the whole trunk: conv1, 9 blocks, 2 shortcuts
    assert len(chain.layers) == 21 and chain.mode == "fused"
    dense = ntksap.apply_masks(copy.deepcopy(net), masks).eval()
    with torch.no_grad():
        assert rel_err(fast(x), dense(x)) <= 1e-5
    decisions = {d.name: d for d in fast.decisions}
    assert decisions["layer2.0.shortcut.0"].chain == chain.name
    assert decisions["fc"].chain == ""
    assert "sparse_chain_0: 21 convs in one C++ call, mode fused, layout auto" in fast.summary()
    # chain=False: layer by layer, same result
    plain = sp.convert(net, masks, example_input=x, autotune=False, chain=False)
    assert not _chains(plain)
    with torch.no_grad():
        assert rel_err(plain(x), dense(x)) <= 1e-5


def test_convert_vgg_chains_between_poolings():
    net = randomise_bn(models.create("vgg11_bn"))
    masks = masks_for(net, 0.95)
    x = torch.randn(2, 3, 32, 32)
    fast = sp.convert(net, masks, example_input=x, autotune=False)
    sizes = sorted(len(c.layers) for c in _chains(fast))
    # VGG-11: conv blocks of 1, 1, 2, 2, 2 convs between poolings; single convs stay layers
    assert sizes == [2, 2, 2]
    dense = ntksap.apply_masks(copy.deepcopy(net), masks).eval()
    with torch.no_grad():
        assert rel_err(fast(x), dense(x)) <= 1e-5


def test_convert_imagenet_resnet_border_three():
    """ResNet-18 (ImageNet stem: 7x7 stride-2 pad-3 conv, then max pool): the stem conv is
    alone before the pool, the residual stages form one chain."""
    net = randomise_bn(models.create("resnet18", num_classes=10))
    masks = masks_for(net, 0.9)
    x = torch.randn(2, 3, 64, 64)
    fast = sp.convert(net, masks, example_input=x, autotune=False)
    assert [len(c.layers) for c in _chains(fast)] == [19]
    dense = ntksap.apply_masks(copy.deepcopy(net), masks).eval()
    with torch.no_grad():
        assert rel_err(fast(x), dense(x)) <= 1e-5


class TwoOutputs(nn.Module):
    """conv -> conv -> conv where the middle value is also used outside: a run with two
    outputs, which must not become a chain (the convs then run layer by layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return torch.cat([h, self.c(h)], dim=1)


def test_convert_rejects_runs_with_two_outputs():
    net = TwoOutputs().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand_like(m.weight) < 0.3)
    x = torch.randn(3, 3, 8, 8)
    fast = sp.convert(net, example_input=x, autotune=False)
    assert not _chains(fast)
    with torch.no_grad():
        assert rel_err(fast(x), net(x)) <= 1e-5


def test_autotune_times_the_chain_and_save_load_keeps_it(tmp_path):
    net = randomise_bn(models.create("resnet20"))
    masks = masks_for(net, 0.98)
    x = torch.randn(4, 3, 32, 32)
    fast = sp.convert(net, masks, example_input=x)
    (chain,) = _chains(fast)
    assert chain.fused_ms is not None and chain.layers_ms is not None
    assert chain.mode == ("fused" if chain.fused_ms <= chain.layers_ms else "layers")
    back = sp.load(sp.save(fast, tmp_path / "r20.safetensors"))
    (chain2,) = _chains(back)
    assert chain.policy in ("auto", "spatial")  # chosen by the autotune
    assert (chain2.mode, chain2.steps, chain2.split_work, chain2.policy, chain2.name) == (
        chain.mode,
        chain.steps,
        chain.split_work,
        chain.policy,
        chain.name,
    )
    with torch.no_grad():
        assert torch.equal(back(x), fast(x))
    # a file with chains still loads and runs without the C++ kernels (layer by layer)
    with sp.extension_disabled():
        back2 = sp.load(tmp_path / "r20.safetensors")
        with torch.no_grad():
            assert rel_err(back2(x), fast(x)) <= 1e-5


def test_no_chains_without_the_kernels():
    net = randomise_bn(models.create("resnet20"))
    with sp.extension_disabled():
        fast = sp.convert(net, masks_for(net, 0.9), example_input=torch.randn(1, 3, 32, 32))
    assert not _chains(fast)


def test_chain_errors():
    chain, _ = build_chain()
    with pytest.raises(TypeError, match="float32"):
        chain(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"\(N, C, H, W\)"):
        chain(torch.randn(3, 8, 8))
    with pytest.raises(RuntimeError, match="inference-only"):
        chain(torch.randn(2, 3, 8, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match="channels"):
        chain(torch.randn(2, 4, 8, 8))  # 4 channels where the first conv expects 3
    chain.policy = "fastest"
    with pytest.raises(ValueError, match="policy must be one of"):
        chain(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="chain mode must be one of"):
        chain.set_mode("sparse")
    layer = chain.layers[0]
    with pytest.raises(ValueError, match="computed after it"):
        SparseChain([layer], [(1, -1)], output=1)
    with pytest.raises(ValueError, match="output must name"):
        SparseChain([layer], [(0, -1)], output=2)
    with pytest.raises(RuntimeError, match="inference-only"):
        chain.train()


def test_chain_copies_and_pickles_after_use():
    """The executor (raw pointers into the chain's tensors) is never copied: deepcopy and
    pickle of a used chain rebuild it on their first call, on their own tensors."""
    import pickle

    chain, reference = build_chain(seed=3)
    x = torch.randn(17, 3, 9, 9)
    with torch.no_grad():
        want = chain(x)
        twin = copy.deepcopy(chain)
        thawed = pickle.loads(pickle.dumps(chain))
        assert torch.equal(twin(x), want) and torch.equal(thawed(x), want)
        twin.layers[0].values.zero_()  # the copy's weights are its own
        assert torch.equal(chain(x), want)
    assert rel_err(want, reference(x)) <= 1e-5


def test_concurrent_calls_from_python_threads():
    """Several Python threads calling one converted model at once (the executor releases
    the GIL; scratch is per thread, output buffers per thread) get their own results."""
    from concurrent.futures import ThreadPoolExecutor

    net = randomise_bn(models.create("resnet20"))
    masks = masks_for(net, 0.95)
    xs = [torch.randn(n, 3, 32, 32) for n in (1, 16, 17, 3, 32, 2)]
    fast = sp.convert(net, masks, example_input=xs[1], autotune=False)
    assert _chains(fast)
    with torch.no_grad():
        want = [fast(x).clone() for x in xs]

        def call(i: int) -> torch.Tensor:
            return [fast(xs[i]).clone() for _ in range(3)][-1]

        with ThreadPoolExecutor(max_workers=3) as pool:
            got = list(pool.map(call, range(len(xs))))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_layer_modes_and_repr_count_chain_layers():
    net = randomise_bn(models.create("resnet20"))
    fast = sp.convert(net, masks_for(net, 0.95), example_input=torch.randn(2, 3, 32, 32),
                      autotune=False)  # fmt: skip
    modes = fast.layer_modes()
    assert sum(m == "chain" for m in modes.values()) == 21 and modes["fc"] in ("sparse", "dense")
    assert "21 of them in 1 chain(s)" in repr(fast)
    (chain,) = fast.chains().values()
    chain.set_mode("layers")
    assert "chain" not in fast.layer_modes().values()
