"""The pruning loop: exact counts, schedules, selection, model untouched, determinism."""

from __future__ import annotations

import copy

import pytest
import torch

import ntksap
from conftest import PAPER_DENSITIES, prune_fast, small_convnet
from ntksap.pruning import kept_count, schedule_densities, select

METHODS = ntksap.list_methods()


def test_list_methods_is_the_contract():
    assert METHODS == [
        "grasp", "itersnip", "magnitude", "ntksap", "px", "random", "snip", "synflow"
    ]  # fmt: skip
    rounds = {m: ntksap.get_method(m).default_rounds for m in METHODS}
    assert rounds == {
        "grasp": 1, "itersnip": 100, "magnitude": 1, "ntksap": 20, "px": 100,
        "random": 1, "snip": 1, "synflow": 100,
    }  # fmt: skip


# --- 1. exact count ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::ntksap.LayerCollapseWarning")  # expected on a tiny net
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scope", ["global", "local"])
def test_exact_count_every_paper_density(method, scope):
    net = small_convnet()
    params = ntksap.prunable_parameters(net)
    n_total = sum(p.numel() for p in params.values())
    for d in PAPER_DENSITIES:
        masks = prune_fast(net, method, density=d, scope=scope, rounds=2)
        assert set(masks) == set(params)
        if scope == "global":
            assert masks.num_kept == round(d * n_total), (method, d)
        else:
            for name, m in masks.items():
                assert int(m.sum()) == round(d * m.numel()), (method, d, name)
        assert masks.num_total == n_total


def test_sparsity_and_density_are_the_same_request(convnet):
    a = prune_fast(convnet, "magnitude", sparsity=0.9)
    b = prune_fast(convnet, "magnitude", density=0.1)
    assert a == b
    assert a.density == pytest.approx(0.1, abs=1 / a.num_total)
    assert a.sparsity == pytest.approx(0.9, abs=1 / a.num_total)


def test_schedules():
    exp = schedule_densities(0.01, 4, "exponential")
    assert exp == pytest.approx([0.01**0.25, 0.01**0.5, 0.01**0.75, 0.01])
    assert exp[-1] == 0.01
    lin = schedule_densities(0.2, 4, "linear")
    assert lin == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert lin[-1] == 0.2


def test_iterative_rounds_follow_the_schedule(convnet, monkeypatch):
    """Every intermediate round keeps exactly round(d_t * N)."""
    seen = []
    real_select = select

    def spy(scores, masks, density, scope, generator=None, floor=0.0):
        out = real_select(scores, masks, density, scope, generator, floor)
        seen.append((density, sum(int(m.sum()) for m in out.values())))
        return out

    monkeypatch.setattr("ntksap.pruning.select", spy)
    n = sum(p.numel() for p in ntksap.prunable_parameters(convnet).values())
    prune_fast(convnet, "synflow", density=0.05, rounds=5)
    assert [d for d, _ in seen] == pytest.approx(schedule_densities(0.05, 5))
    assert [k for _, k in seen] == [kept_count(d, n) for d, _ in seen]


def test_select_breaks_ties_by_flat_index():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    masks = {"a": torch.ones(2, 3, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)}
    out = select(scores, masks, density=0.5, scope="global")  # keep 5 of 10
    assert out["a"].flatten().tolist() == [True] * 5 + [False]
    assert out["b"].tolist() == [False] * 4
    local = select(scores, masks, density=0.5, scope="local")
    assert local["a"].flatten().tolist() == [True, True, True, False, False, False]
    assert local["b"].tolist() == [True, True, False, False]


def test_pruned_weights_never_come_back():
    scores = {"w": torch.tensor([5.0, 4.0, 3.0, 2.0])}
    masks = {"w": torch.tensor([False, True, True, True])}  # the best-scored one is pruned
    out = select(scores, masks, density=0.5, scope="global")
    assert out["w"].tolist() == [False, True, True, False]


def test_select_rejects_nan():
    with pytest.raises(FloatingPointError, match="NaN"):
        select(
            {"w": torch.tensor([1.0, float("nan")])}, {"w": torch.ones(2, dtype=torch.bool)}, 0.5
        )


# --- 2. model untouched --------------------------------------------------------------------
def _model_facts(model):
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.momentum for m in bns],
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("train_mode", [True, False])
def test_model_untouched(method, train_mode):
    net = small_convnet()
    net.train(train_mode)
    net[1].momentum = 0.3  # a non-default momentum must survive the BN rule of ntksap
    net[4].momentum = None  # cumulative average
    net[0].bias.requires_grad_(False)
    with torch.no_grad():
        net[1].running_mean.add_(0.5)  # non-initial statistics must survive too
        net[4].num_batches_tracked.fill_(7)
    rng_before = torch.get_rng_state()
    before = _model_facts(net)
    prune_fast(net, method, sparsity=0.9)
    after = _model_facts(net)
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]
    assert torch.equal(torch.get_rng_state(), rng_before), "global RNG state changed"


# --- 4. seeded determinism -----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_mask(method):
    net = small_convnet()
    assert prune_fast(net, method, sparsity=0.8, seed=3) == prune_fast(
        net, method, sparsity=0.8, seed=3
    )


@pytest.mark.parametrize("method", ["random", "ntksap"])
def test_different_seed_different_mask(method):
    net = small_convnet()
    a = prune_fast(net, method, sparsity=0.8, seed=0)
    b = prune_fast(net, method, sparsity=0.8, seed=1)
    assert a != b
    assert a.num_kept == b.num_kept


def test_global_rng_does_not_leak_into_masks(convnet):
    torch.manual_seed(1)
    a = prune_fast(convnet, "random", sparsity=0.8, seed=5)
    torch.manual_seed(2)
    b = prune_fast(convnet, "random", sparsity=0.8, seed=5)
    assert a == b


def test_metadata_records_the_settings(convnet):
    masks = prune_fast(convnet, "ntksap", sparsity=0.9, rounds=2, seed=4)
    md = masks.metadata
    assert md["method"] == "ntksap" and md["rounds"] == 2 and md["seed"] == 4
    assert md["sparsity"] == pytest.approx(0.9)
    assert md["options"]["num_samples"] == 8
    assert md["input_shape"] == [3, 8, 8]


def test_ntksap_default_num_samples_is_ten_per_class(convnet):
    masks = ntksap.prune(convnet, "ntksap", sparsity=0.5, input_shape=(3, 8, 8), rounds=1)
    assert masks.metadata["options"]["num_samples"] == 10 * 5


def test_progress_bar_does_not_change_result(convnet):
    a = prune_fast(convnet, "synflow", sparsity=0.9, rounds=3, progress=True)
    b = prune_fast(convnet, "synflow", sparsity=0.9, rounds=3)
    assert a == b


def test_scoring_on_a_copy_even_with_device_argument(convnet):
    ref = copy.deepcopy(convnet)
    prune_fast(convnet, "snip", sparsity=0.5, device="cpu")
    for a, b in zip(ref.parameters(), convnet.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k", [0, 1, 37, 500, 999, 1000])
def test_keep_top_equals_a_stable_sort(k):
    from ntksap.pruning import _keep_top

    g = torch.Generator().manual_seed(k)
    flat = torch.randint(0, 20, (1000,), generator=g).float()  # many ties
    flat[::9] = float("-inf")
    expected = torch.zeros(1000, dtype=torch.bool)
    expected[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    assert torch.equal(_keep_top(flat, k), expected)


def test_layer_collapse_warns_and_names_the_tensor():
    net = torch.nn.Sequential(torch.nn.Linear(50, 50), torch.nn.Linear(50, 2))
    with torch.no_grad():
        net[1].weight.fill_(1e-6)  # magnitude pruning removes the whole classifier first
    with pytest.warns(ntksap.LayerCollapseWarning, match=r"1 tensor\(s\) to zero.*1\.weight"):
        masks = ntksap.prune(net, "magnitude", density=0.5)
    assert masks.collapsed() == ["1.weight"]


def test_ntksap_init_auto_follows_the_model_zoo():
    from ntksap import models

    zoo = models.create("lenet5", num_classes=10, in_channels=1)
    kw = dict(sparsity=0.5, input_shape=(1, 8, 8), rounds=1, num_samples=4)
    assert ntksap.prune(zoo, "ntksap", **kw).metadata["options"]["init"] == "kaiming"
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert ntksap.prune(plain, "ntksap", **kw).metadata["options"]["init"] == "reset"
    a = ntksap.prune(zoo, "ntksap", **kw)
    assert a == ntksap.prune(zoo, "ntksap", init="kaiming", **kw)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_a_kept_weight_scored_minus_inf_still_beats_a_pruned_one(scope):
    scores = {"w": torch.tensor([1.0, float("-inf"), float("-inf"), 5.0])}
    masks = {"w": torch.tensor([False, True, True, True])}
    out = select(scores, masks, density=0.75, scope=scope)
    assert out["w"].tolist() == [False, True, True, True]
    out = select(scores, masks, density=0.5, scope=scope)
    assert out["w"].tolist() == [False, True, False, True]


def test_exact_ties_are_not_cut_from_the_last_layers_first():
    """Many exact ties (here: equal magnitudes) must not all be cut from one layer."""
    net = torch.nn.Sequential(torch.nn.Linear(60, 60), torch.nn.Linear(60, 60))
    with torch.no_grad():
        for lin in net:
            lin.weight.fill_(0.5)
    masks = ntksap.prune(net, "magnitude", density=0.5)
    assert masks.num_kept == 3600
    for d in masks.layer_densities().values():
        assert 0.45 < d < 0.55  # by flat index it would be 1.0 and 0.0
    assert masks == ntksap.prune(net, "magnitude", density=0.5)  # still deterministic
