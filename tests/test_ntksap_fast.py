"""The fast NTK-SAP path: its draws, its BatchNorm rule, its memory and its layout choice.

Its scores equal the reference procedure's on the same draws (tests/test_scores_reference.py
for a hand computation, `test_equals_the_plain_reference_procedure_on_the_same_draws` here for
the benchmark baseline); these tests cover the pieces.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ntksap
from conftest import INPUT_SHAPE, small_convnet
from ntksap.scoring import ntksap as fast

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
import ntksap_reference  # noqa: E402  (benchmarks/ is not a package)


@pytest.mark.parametrize("bn_pass", ["separate", "fused"])
def test_equals_the_plain_reference_procedure_on_the_same_draws(bn_pass):
    """float64, a BN conv net, a random current mask: bn_pass="separate" equals the
    benchmark baseline to 1e-12 (the same computation, another layout and code path);
    "fused" differs by the O(1/n) change of its statistics (n = values per channel),
    here < 2 % on 16-image batches (the masks' agreement at full scale: RESULTS.md)."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 5),
    ).double()  # fmt: skip
    params = ntksap.prunable_parameters(net)
    g = torch.Generator().manual_seed(1)
    cur = {n: torch.rand(p.shape, generator=g) < 0.7 for n, p in params.items()}
    kw = dict(input_shape=(3, 16, 16), seed=3, resamples=2, num_samples=40, batch_size=16,
              init="kaiming", masks=cur)  # fmt: skip
    with ntksap_reference.registered() as name, ntksap_reference.same_draws():
        ref = ntksap.compute_scores(net, name, **kw)
    for fmt in ("contiguous", "channels_last"):
        got = ntksap.compute_scores(net, "ntksap", bn_pass=bn_pass, memory_format=fmt, **kw)
        for n in ref:
            rel = float((got[n] - ref[n]).norm() / ref[n].norm())
            assert rel < (1e-12 if bn_pass == "separate" else 2e-2), (fmt, n, rel)
            if bn_pass == "fused":
                assert rel > 1e-9  # really another statistics rule


def test_reference_baseline_registers_only_inside_its_context():
    with ntksap_reference.registered() as name:
        assert name in ntksap.list_methods()
    assert name not in ntksap.list_methods()


def test_seeded_kaiming_redraw_has_the_kaiming_distribution_and_is_reproducible():
    """Each Conv/Linear weight ~ N(0, 2 / fan_in), biases 0, BN 1/0 with fresh statistics:
    checked against the formula on a wide layer (std within 2 % for 1e6 draws)."""
    net = nn.Sequential(nn.Conv2d(64, 256, 7), nn.BatchNorm2d(256), nn.Linear(256, 300))
    with torch.no_grad():
        net[1].weight.fill_(3.0)
        net[1].running_mean.fill_(5.0)
    fast.redraw_seeded_(net, "kaiming", torch.Generator().manual_seed(0))
    w = net[0].weight.detach()
    assert abs(float(w.std()) / math.sqrt(2 / (64 * 49)) - 1) < 0.02
    assert abs(float(w.mean())) < 3 * float(w.std()) / math.sqrt(w.numel())
    assert abs(float(net[2].weight.std()) / math.sqrt(2 / 256) - 1) < 0.02
    assert float(net[0].bias.abs().max()) == 0.0 and float(net[2].bias.abs().max()) == 0.0
    assert bool((net[1].weight == 1).all()) and bool((net[1].running_mean == 0).all())
    first = w.detach().clone()
    fast.redraw_seeded_(net, "kaiming", torch.Generator().manual_seed(0))
    assert torch.equal(first, net[0].weight)
    fast.redraw_seeded_(net, "kaiming", torch.Generator().manual_seed(1))
    assert not torch.equal(first, net[0].weight)


def test_seeded_redraw_resets_other_modules_before_the_kaiming_layers():
    """A custom module whose reset re-draws its child conv must not undo the Kaiming draw
    (redraw_ resets everything, then applies Kaiming: same order here)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)

        def reset_parameters(self) -> None:
            nn.init.constant_(self.conv.weight, 7.0)

        def forward(self, x):
            return self.conv(x)

    net = nn.Sequential(Block())
    fast.redraw_seeded_(net, "kaiming", torch.Generator().manual_seed(0))
    assert float(net[0].conv.weight.abs().max()) < 7.0


def test_draw_seeds_are_distinct_and_stable():
    seeds = {fast.draw_seed(b, k) for b in range(20) for k in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert fast.draw_seed(123, 4) == fast.draw_seed(123, 4)


def test_fused_statistics_are_the_clean_networks_own():
    """In the fused clean forward every BatchNorm's running statistics become the mean and
    unbiased variance of its own input; the hooks are gone afterwards."""
    net = small_convnet().eval()
    x = torch.randn(16, *INPUT_SHAPE)
    inputs = {}
    handles = [
        net[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].clone()))
        for i in (1, 4)
    ]
    with fast.fused_clean_statistics(net):
        net(x)
    for h in handles:
        h.remove()
    for i in (1, 4):
        assert torch.allclose(net[i].running_mean, inputs[i].mean((0, 2, 3)), atol=1e-6)
        assert torch.allclose(
            net[i].running_var, inputs[i].var((0, 2, 3), correction=1), rtol=1e-5, atol=1e-6
        )
    assert not net[1]._forward_pre_hooks and not net[4]._forward_pre_hooks


def test_memory_format_auto_picks_channels_last_for_narrow_convs_only():
    def ctx(model):
        return ntksap.scoring.ScoreContext(
            model, {}, {}, None, (3, 32, 32), torch.device("cpu"),
            options={"memory_format": "auto"},
        )  # fmt: skip

    narrow = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 64, 3))
    wide = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 512, 3), nn.Conv2d(512, 512, 3))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))
    assert fast.use_channels_last(ctx(narrow))
    assert not fast.use_channels_last(ctx(wide))
    assert not fast.use_channels_last(ctx(mlp))
    c = ctx(wide)
    c.options["memory_format"] = "channels_last"
    assert fast.use_channels_last(c)


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch, ntksap
    from torch import nn
    torch.set_num_threads(1)
    rounds, resamples = int(sys.argv[1]), int(sys.argv[2])
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    kw = dict(sparsity=0.9, input_shape=(3, 32, 32), num_samples=64, batch_size=64)
    ntksap.prune(net, "ntksap", rounds=1, resamples=1, **kw)  # warm-up: allocator, kernels
    def kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    before = kib("VmRSS:")
    ntksap.prune(net, "ntksap", rounds=rounds, resamples=resamples, **kw)
    print(kib("VmHWM:") - before)
    """
)


def _peak_kib(rounds: int, resamples: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(rounds), str(resamples)],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset"
)
def test_peak_memory_does_not_grow_with_rounds_or_resamples():
    """Peak working memory above the resident baseline: 2 rounds x 1 resample vs 12 rounds x
    8 resamples (48x the draws). One draw's graph holds ~10 activations of 64 x 32 x 32 x
    32 floats (8 MiB each), ~40 MiB in all; keeping a graph, or even one activation, per
    draw would add >= 8 MiB x 95 draws. The allocator's fragmentation varies the peak by
    up to about one draw's working set (measured: 41-90 MiB), hence the bound: the large
    run peaks less than 1.5 working sets above the small one."""
    small, large = _peak_kib(2, 1), _peak_kib(12, 8)
    assert small > 8 * 1024  # the measurement sees at least one activation
    assert large - small < 1.5 * small, (small, large)


HEAP_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from ntksap.heap import reuse_freed_memory
    torch.set_num_threads(1)
    def faults_of_later_allocs():
        for _ in range(2):  # warm-up cycles: 64 MiB, touched, freed
            x = torch.ones(16 * 2**20)
            del x
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            y = torch.ones(16 * 2**20)
            del y
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    def rss_kib():
        return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
    plain = faults_of_later_allocs()
    with reuse_freed_memory() as active:
        reused = faults_of_later_allocs()
        held = rss_kib()
    print(plain, reused, int(active), held - rss_kib())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator policy")
def test_heap_reuse_avoids_page_faults_and_returns_the_memory_afterwards():
    """A 64 MiB block freed and allocated again page-faults all its 16,384 pages every time
    by default (glibc mmap/munmap): 4 cycles after 2 warm-up cycles, 65,536 faults. Inside
    reuse_freed_memory the freed blocks are reused (glibc may place one more block before
    it does: at most one cycle's faults), and on exit the kept memory goes back to the OS."""
    out = subprocess.run(
        [sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True, check=True,
        timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    plain, reused, active, returned_kib = (int(v) for v in out.stdout.split())
    if not active:
        pytest.skip("no glibc mallopt here")
    assert plain > 60_000  # 4 x 16,384 pages of 4 KiB, faulted again each time
    assert reused < 17_000
    assert returned_kib > 32 * 1024  # the kept 64 MiB block is trimmed on exit


def test_bfloat16_precision_scores_the_same_draws_approximately():
    """precision="bfloat16" runs the passes under bf16 autocast on the same draws: the
    scores follow float32's (the finite difference of outputs 1 % apart keeps ~2 of bf16's
    3 significant digits), clearly closer to them than another seed's are."""
    net = small_convnet()
    kw = dict(input_shape=INPUT_SHAPE, num_samples=32, batch_size=32, resamples=2)
    f32 = ntksap.compute_scores(net, "ntksap", seed=0, **kw)
    bf16 = ntksap.compute_scores(net, "ntksap", seed=0, precision="bfloat16", **kw)
    other = ntksap.compute_scores(net, "ntksap", seed=1, **kw)
    for n in f32:
        assert bf16[n].dtype == torch.float32
        near = float((bf16[n] - f32[n]).norm() / f32[n].norm())
        far = float((other[n] - f32[n]).norm() / f32[n].norm())
        assert near < 0.5 * far, (n, near, far)
