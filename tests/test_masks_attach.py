"""Masks on arbitrary models: attach, copy, save/load, export, bake, training, ablations, errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import ntksap
from conftest import INPUT_SHAPE, prune_fast, small_convnet
from ntksap import MaskError, Masks


class OddModel(nn.Module):
    """Outside the registry: nested Sequentials, Conv1d, BatchNorm1d and a Linear used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Sequential(
            nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU()),
            nn.Sequential(nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4), nn.ReLU()),
        )
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 2, 10)
        h = self.feat(x).mean(-1)  # (N, 4)
        h = self.shared(torch.relu(self.shared(h)))  # the same Linear twice
        return self.head(h)  # (N, 3)


def _odd_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 2, 10, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]))]


# --- 5. arbitrary models ---
@pytest.mark.parametrize("method", ["ntksap", "snip", "grasp", "synflow", "magnitude"])
def test_arbitrary_model_prunes_attaches_trains_and_copies(method):
    torch.manual_seed(0)
    net = OddModel()
    data = _odd_data()
    kw = {"data": data} if ntksap.get_method(method).needs_data else {"input_shape": (2, 10)}
    if method == "ntksap":
        kw.update(num_samples=6, rounds=3)
    masks = ntksap.prune(net, method, density=0.4, **kw)
    assert list(masks) == ["feat.0.0.weight", "feat.1.0.weight", "shared.weight", "head.weight"]
    ntksap.apply_masks(net, masks)
    out = net(data[0][0])
    out.sum().backward()
    assert out.shape == (6, 3)
    assert net.shared.parametrizations.weight.original.grad is not None
    clone = copy.deepcopy(net)
    assert torch.equal(clone(data[0][0]), net(data[0][0]))
    assert ntksap.get_masks(clone) == masks
    # the copy is independent: baking it leaves the original parametrized
    ntksap.remove_masks(clone)
    assert parametrize.is_parametrized(net.shared) and not parametrize.is_parametrized(clone.shared)
    assert torch.equal(net.shared.weight, clone.shared.weight)  # torch's shared-class bug avoided
    assert torch.equal(clone(data[0][0]), net(data[0][0]))


def test_tied_weights_are_masked_everywhere_they_are_used():
    enc, dec = nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False)
    dec.weight = enc.weight  # tied
    net = nn.Sequential(enc, nn.Tanh(), dec)
    masks = ntksap.prune(net, "magnitude", density=0.5)
    assert list(masks) == ["0.weight"]  # one tensor, named once
    ntksap.apply_masks(net, masks)
    assert torch.equal(net[0].weight, net[2].weight)
    assert (net[2].weight[~masks["0.weight"]] == 0).all()


def test_prunable_parameters_options():
    net = small_convnet()
    assert list(ntksap.prunable_parameters(net)) == ["0.weight", "3.weight", "8.weight"]
    with_bias = ntksap.prunable_parameters(net, include_bias=True)
    assert list(with_bias) == ["0.weight", "0.bias", "3.weight", "8.weight", "8.bias"]
    assert list(ntksap.prunable_parameters(net, exclude=["8.*"])) == ["0.weight", "3.weight"]
    extra = ntksap.prunable_parameters(net, include=["1.weight"])
    assert "1.weight" in extra
    with pytest.raises(ValueError, match="matches no parameter"):
        ntksap.prunable_parameters(net, exclude=["classifier.*"])
    with pytest.raises(ValueError, match="no prunable parameters"):
        ntksap.prunable_parameters(net, exclude=["*"])


def test_excluded_layers_stay_dense_and_count_is_over_the_rest(convnet):
    masks = prune_fast(convnet, "magnitude", density=0.3, exclude=["0.weight"])
    assert "0.weight" not in masks
    n = 6 * 8 * 9 + 5 * 8
    assert masks.num_total == n and masks.num_kept == round(0.3 * n)


# --- 6. mask round trip ---
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_round_trip(tmp_path, convnet, suffix):
    masks = prune_fast(convnet, "ntksap", sparsity=0.9)
    path = masks.save(tmp_path / f"sub/mask{suffix}")
    loaded = Masks.load(path)
    assert loaded == masks
    assert loaded.metadata["method"] == "ntksap"
    assert loaded.metadata["options"] == masks.metadata["options"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MaskError, match="cannot read mask file"):
        Masks.load(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        Masks.load(tmp_path / "missing.safetensors")
    with pytest.raises(MaskError, match=r"\.safetensors"):
        Masks({"w": torch.ones(2, dtype=torch.bool)}).save(tmp_path / "m.npy")


def test_save_keeps_the_old_file_if_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    old = Masks({"w": torch.ones(3, dtype=torch.bool)})
    old.save(path)

    real_open = open

    def failing_open(file, mode="r", *a, **k):  # the write of the temporary file fails
        if "w" in mode and str(file).endswith(f".tmp{os.getpid()}"):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="no space left on device while writing"):
        Masks({"w": torch.zeros(3, dtype=torch.bool)}).save(path)
    assert Masks.load(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_export_to_torch_prune_matches_parametrize(convnet):
    masks = prune_fast(convnet, "synflow", sparsity=0.95)
    a = ntksap.apply_masks(copy.deepcopy(convnet), masks).eval()
    b = ntksap.export_to_torch_prune(copy.deepcopy(convnet), masks).eval()
    assert hasattr(b[0], "weight_mask") and torch.equal(b[0].weight_mask.bool(), masks["0.weight"])
    x = torch.randn(4, *INPUT_SHAPE)
    assert torch.equal(a(x), b(x))


def test_remove_masks_leaves_exact_zeros(convnet):
    masks = prune_fast(convnet, "random", sparsity=0.8)
    net = ntksap.apply_masks(convnet, masks, zero=False)  # stored tensor keeps its values
    x = torch.randn(3, *INPUT_SHAPE)
    net.eval()
    before = net(x)
    ntksap.remove_masks(net)
    assert not parametrize.is_parametrized(net[0])
    assert isinstance(net[0].weight, nn.Parameter)
    for n, m in masks.items():
        w = net.get_parameter(n)
        assert (w[~m] == 0).all() and (w[m] != 0).all()
    assert torch.equal(net(x), before)


def test_masks_validation():
    with pytest.raises(MaskError, match="other than 0 and 1"):
        Masks({"w": torch.tensor([0.0, 0.5])})
    m = Masks({"w": torch.tensor([1.0, 0.0, 1.0, 1.0])})
    assert m["w"].dtype == torch.bool and m.density == 0.75 and m.sparsity == 0.25
    assert m.layer_densities() == {"w": 0.75}
    assert Masks({"w": torch.zeros(2, dtype=torch.bool)}).collapsed() == ["w"]


# --- 7. pruned weights stay exactly zero through training ---
@pytest.mark.parametrize("zero", [True, False])
def test_pruned_weights_stay_zero_through_sgd(convnet, batches, zero):
    masks = prune_fast(convnet, "snip", sparsity=0.9)
    net = ntksap.apply_masks(convnet, masks, zero=zero).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = batches[0]
    first = {
        n: net.get_parameter(n.replace("weight", "parametrizations.weight.original")).clone()
        for n in masks
    }
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for n, m in masks.items():
        mod = net.get_submodule(n.rpartition(".")[0])
        assert (mod.weight[~m] == 0).all(), n  # effective weights: exactly zero
        assert (mod.weight[m] != first[n][m]).any(), n  # ... while the kept ones trained
        if zero:  # the stored tensor too: no gradient, no decay, no momentum revived it
            assert (mod.parametrizations.weight.original[~m] == 0).all(), n


# --- 8. ablations ---
def test_shuffle_really_permutes_within_each_layer(convnet):
    masks = prune_fast(convnet, "magnitude", sparsity=0.7)
    shuffled = ntksap.shuffle_masks(masks, seed=1)
    for n in masks:
        assert int(shuffled[n].sum()) == int(masks[n].sum())
        assert not torch.equal(shuffled[n], masks[n]), n
    assert ntksap.shuffle_masks(masks, seed=1) == shuffled
    assert ntksap.shuffle_masks(masks, seed=2) != shuffled
    via_prune = prune_fast(convnet, "magnitude", sparsity=0.7, shuffle=True, seed=1)
    assert via_prune == shuffled and via_prune.metadata["ablation"] == "shuffle"


def test_invert_keeps_the_lowest_scores(convnet):
    inv = prune_fast(convnet, "magnitude", density=0.25, invert=True)
    allw = torch.cat(
        [p.detach().abs().flatten() for p in ntksap.prunable_parameters(convnet).values()]
    )
    k = round(0.25 * allw.numel())
    thresh = allw.sort().values[k - 1]
    for n, p in ntksap.prunable_parameters(convnet).items():
        assert (p.detach().abs()[inv[n]] <= thresh).all()
    assert inv.num_kept == k


def test_reinit_redraws_weights_and_keeps_masks(convnet):
    masks = prune_fast(convnet, "magnitude", sparsity=0.8)
    net = ntksap.apply_masks(convnet, masks)
    before = {n: net.get_submodule(n.rpartition(".")[0]).weight.detach().clone() for n in masks}
    ntksap.reinitialize(net, "kaiming", seed=3)
    again = ntksap.reinitialize(copy.deepcopy(net), "kaiming", seed=3)
    for n, m in masks.items():
        w = net.get_submodule(n.rpartition(".")[0]).weight
        assert (w[~m] == 0).all() and not torch.equal(w, before[n])
        assert torch.equal(w, again.get_submodule(n.rpartition(".")[0]).weight)
    assert ntksap.get_masks(net) == masks
    big = ntksap.reinitialize(nn.Linear(1000, 200), "kaiming", seed=0)
    assert abs(float(big.weight.detach().std()) - (2 / 1000) ** 0.5) < 0.002


# --- 9. bad input: clear errors before any work ---
class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "ntksap", "density": 0.0}, r"density must be in \(0, 1\]"),
        ({"method": "ntksap", "density": 1.5}, r"density must be in \(0, 1\]"),
        ({"method": "ntksap", "sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"method": "ntksap", "density": 0.5, "sparsity": 0.5}, "exactly one of density"),
        ({"method": "ntksap"}, "exactly one of density"),
        ({"method": "nope", "density": 0.5}, "valid choices: grasp, itersnip, magnitude, ntksap"),
        (
            {"method": "snip", "density": 0.5},
            "needs data.*data-free methods are: magnitude, ntksap",
        ),
        ({"method": "ntksap", "density": 0.5, "epsilon": -1}, "epsilon must be a positive"),
        (
            {"method": "ntksap", "density": 0.5, "init": "xavier"},
            "init must be one of auto, reset, kaiming, none",
        ),
        ({"method": "ntksap", "density": 0.5, "rounds": 0}, "rounds must be an integer"),
        ({"method": "ntksap", "density": 0.5, "scope": "layer"}, "valid choices: global, local"),
        ({"method": "ntksap", "density": 0.5, "schedule": "cubic"}, "exponential, linear"),
        ({"method": "ntksap", "density": 1e-9}, "keeps 0 of the"),
        ({"method": "synflow", "density": 0.5, "input_shape": None}, "needs input_shape"),
        ({"method": "ntksap", "density": 0.5, "input_shape": (4, 0)}, "positive ints"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(kwargs, match):
    net = CountingNet()
    kwargs = {"input_shape": (4,), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        ntksap.prune(net, **kwargs)
    assert net.calls == 0


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="valid: epsilon, resamples, num_samples, batch_size, init"):
        ntksap.prune(CountingNet(), "ntksap", density=0.5, input_shape=(4,), epsilion=0.1)
    with pytest.raises(TypeError, match="valid: none"):
        ntksap.prune(CountingNet(), "magnitude", density=0.5, epsilon=0.1)


def test_unknown_model_names_the_valid_ones():
    from ntksap import models

    with pytest.raises(ValueError, match=r"resnet20.*vgg16_bn"):
        models.create("resnet21")


def test_mask_file_that_does_not_fit_the_model(tmp_path, convnet):
    path = prune_fast(convnet, "magnitude", sparsity=0.5).save(tmp_path / "m.safetensors")
    other = small_convnet()
    other[0] = nn.Conv2d(3, 7, 3, padding=1)  # same names, one shape differs
    with pytest.raises(MaskError, match=r"mask shapes do not match the model: 0\.weight: mask"):
        ntksap.apply_masks(other, Masks.load(path))
    with pytest.raises(MaskError, match="name parameters the model does not have"):
        ntksap.apply_masks(nn.Linear(2, 2), Masks.load(path))
    assert not parametrize.is_parametrized(other[0])  # nothing half-applied


def test_pruning_an_already_masked_model_is_refused(convnet):
    masks = prune_fast(convnet, "magnitude", sparsity=0.5)
    ntksap.apply_masks(convnet, masks)
    with pytest.raises(ValueError, match="already parametrized"):
        prune_fast(convnet, "magnitude", sparsity=0.5)
    with pytest.raises(MaskError, match="already has a parametrization"):
        ntksap.apply_masks(convnet, masks)


def test_save_load_keeps_the_tensor_order(tmp_path):
    """safetensors sorts names; the masks (and so layer tables and collapse lists) keep the
    model's order through a round trip (a resumed run's layers.txt was reordered)."""
    order = ["features.0.weight", "fc1.weight", "aaa.weight"]
    masks = Masks({n: torch.ones(2, dtype=torch.bool) for n in order})
    for suffix in (".safetensors", ".pt"):
        assert list(Masks.load(masks.save(tmp_path / f"m{suffix}"))) == order


class _TiedLM(nn.Module):
    """An embedding whose weight is also the output head's (weight tying, as in language
    models): one tensor, two holders, first registered as `emb.weight`."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T) token ids -> (N, 50)
        return self.head(torch.relu(self.fc1(self.emb(x))).mean(1))


@pytest.mark.filterwarnings("ignore::ntksap.pruning.LayerCollapseWarning")  # magnitude: fc1
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_tied_weights_prune_under_their_first_name_and_mask_every_holder(method) -> None:
    """Before: prune raised KeyError 'head.weight' (the Linear named the tied tensor by its
    own path, the copy only knew `emb.weight`)."""
    torch.manual_seed(0)
    model = _TiedLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = ntksap.prune(model, method, density=0.3)
    assert set(masks) == {"fc1.weight", "emb.weight"}  # named_parameters()' names
    assert masks.num_kept == round(0.3 * (16 * 16 + 50 * 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ntksap.apply_masks(model, masks)
    # both holders see the one masked tensor
    assert torch.equal(model.emb.weight, model.head.weight)
    assert torch.equal(model.head.weight != 0, masks["emb.weight"])
    assert model(torch.randint(0, 50, (4, 7))).shape == (4, 50)
