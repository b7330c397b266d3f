"""Hardening of the scoring side: typed method options, every dtype, non-tensor outputs,
computed (normalised) weights, the input-shape check, library metadata, bad input.

Every test here uses tiny models; the whole file runs in a few seconds.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from conftest import INPUT_SHAPE, NUM_CLASSES, class_balanced_batch, prune_fast, small_convnet
from ntksap.scoring import base

METHODS = ntksap.list_methods()
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FAST = {"ntksap": {"num_samples": 8, "batch_size": 4}}


def _kw(method: str, **kw):
    """prune/compute_scores keywords for `method` on small_convnet (fast settings)."""
    out = {"input_shape": INPUT_SHAPE, **FAST.get(method, {}), **kw}
    if ntksap.get_method(method).needs_data:
        out.setdefault("data", class_balanced_batch())
    return out


# --- 1. typed method options -----------------------------------------------------------------
def test_every_method_declares_typed_options_with_help():
    """Method.options are Option specs (not bare defaults) and defaults come from them."""
    expected = {
        "ntksap": {
            "epsilon": (float, 0.01),
            "resamples": (int, None),
            "num_samples": (int, None),
            "batch_size": (int, 256),
            "init": (str, "auto"),
            "inputs": (str, "noise"),
            "bn_pass": (str, "fused"),
            "memory_format": (str, "auto"),
            "robust": (bool, False),
            "precision": (str, "float32"),
        },
        "grasp": {"temperature": (float, 200.0)},
        "synflow": {"precision": (str, "auto")},
        "px": {
            "classifier": (str, None),
            # None: the variant's own rule (code-2024 fixes "binary", "batch")
            "leaky_gate": (str, None),
            "norm_stats": (str, None),
            "precision": (str, "auto"),
            "variant": (str, "code-2024"),
        },
    }
    for name in METHODS:
        meth = ntksap.get_method(name)
        got = {o: (spec.type, spec.default) for o, spec in meth.options.items()}
        assert got == expected.get(name, {}), name
        assert meth.defaults == {o: d for o, (_, d) in got.items()}
        for o, spec in meth.options.items():
            assert isinstance(spec, base.Option) and spec.name == o
            assert spec.help, f"{name} {o} has no help"
    ntk = ntksap.get_method("ntksap").options
    assert ntk["init"].choices == ("auto", "reset", "kaiming", "none")
    assert ntk["num_samples"].allow_none and ntk["resamples"].allow_none  # None: 5, robust 1
    assert ntksap.get_method("synflow").options["precision"].choices == (
        "auto",
        "float32",
        "float64",
    )


@pytest.mark.parametrize(
    ("method", "option", "value", "match"),
    [
        ("ntksap", "epsilon", float("nan"), "ntksap epsilon must be a positive number, got nan"),
        ("ntksap", "epsilon", float("inf"), "epsilon must be a positive number, got inf"),
        ("ntksap", "epsilon", True, "epsilon must be a positive number, got True"),
        ("ntksap", "epsilon", "0.1", "epsilon must be a positive number, got '0.1'"),
        ("ntksap", "epsilon", None, "epsilon must be a positive number, got None"),
        ("ntksap", "resamples", 2.0, r"resamples must be an integer >= 1 or None \(auto\), got 2"),
        ("ntksap", "resamples", True, r"resamples must be .* or None \(auto\), got True"),
        ("ntksap", "num_samples", 0, r"num_samples must be an integer >= 1 or None \(auto\)"),
        ("ntksap", "batch_size", 0, "batch_size must be an integer >= 1, got 0"),
        ("ntksap", "init", "xavier", "init must be one of auto, reset, kaiming, none"),
        ("grasp", "temperature", float("nan"), "grasp temperature must be a positive number"),
        ("synflow", "precision", "half", "precision must be one of auto, float32, float64"),
    ],
)
def test_bad_option_values_name_method_option_and_value(method, option, value, match):
    with pytest.raises(ValueError, match=match):
        ntksap.prune(small_convnet(), method, density=0.5, **_kw(method, **{option: value}))


def test_options_are_normalised_before_the_scorer_sees_them():
    """An int for a float option arrives as a float, and the metadata records it so."""
    masks = ntksap.prune(
        small_convnet(), "ntksap", density=0.5, rounds=1, **_kw("ntksap", epsilon=1)
    )
    eps = masks.metadata["options"]["epsilon"]
    assert eps == 1.0 and type(eps) is float
    md = ntksap.get_method("grasp").resolve_options({"temperature": 100})
    assert md == {"temperature": 100.0} and type(md["temperature"]) is float


def test_register_method_takes_option_specs_and_refuses_a_dict():
    Option = base.Option
    with pytest.raises(TypeError, match="sequence of Option specs"):
        ntksap.register_method("dict_options", options={"power": 1.0})
    with pytest.raises(TypeError, match="low must be a finite number"):
        Option("power", 1.0, float, low=float("nan"))
    with pytest.raises(ValueError, match="option spec power must be a positive number"):
        Option("power", -1.0, float, low=0.0, low_open=True)  # a bad default fails at once

    @ntksap.register_method(
        "test_abs_power",
        options=[Option("power", 1.0, float, "exponent", low=0.0, low_open=True)],
    )
    def abs_power(ctx):
        return {n: p.detach().abs() ** ctx.options["power"] for n, p in ctx.params.items()}

    try:
        meth = ntksap.get_method("test_abs_power")
        assert meth.defaults == {"power": 1.0}
        net = small_convnet()
        got = ntksap.compute_scores(net, "test_abs_power", power=2)
        for n, p in ntksap.prunable_parameters(net).items():
            assert torch.allclose(got[n], p.detach().abs() ** 2)
        with pytest.raises(ValueError, match="test_abs_power power must be a positive number"):
            ntksap.compute_scores(net, "test_abs_power", power=0)
    finally:
        base.METHODS._items.pop("test_abs_power")


# --- 2. every dtype --------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::ntksap.LayerCollapseWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_every_dtype_exactly_and_leaves_the_dtype(method, dtype):
    net = small_convnet().to(dtype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    n_total = sum(p.numel() for p in ntksap.prunable_parameters(net).values())
    masks = prune_fast(net, method, density=0.3, rounds=2)
    assert masks.num_kept == round(0.3 * n_total)
    assert all(p.dtype == dtype for p in net.parameters()), "the user's model was converted"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    expected = "float64" if dtype == torch.float64 else "float32"
    assert masks.metadata["dtype"] == str(dtype).removeprefix("torch.")
    assert masks.metadata["compute_dtype"] == expected


@pytest.mark.parametrize("method", METHODS)
def test_float64_scores_agree_with_float32_and_half_models_use_a_float32_copy(method):
    """float64 is an independent, more precise computation of the same scores; a float16
    model is scored exactly as its float32 copy would be."""
    options = {"init": "none"} if method == "ntksap" else {}  # weights drawn per dtype else
    net32 = small_convnet()
    s32 = ntksap.compute_scores(net32, method, seed=5, **_kw(method, **options))
    s64 = ntksap.compute_scores(net32.double(), method, seed=5, **_kw(method, **options))
    for n in s32:
        assert s64[n].dtype == (torch.float32 if method == "random" else torch.float64), n
        scale = float(s32[n].abs().max())
        assert torch.allclose(s64[n].float(), s32[n], rtol=1e-3, atol=1e-5 * scale), (method, n)
    net16 = small_convnet().half()
    twin = copy.deepcopy(net16).float()
    s16 = ntksap.compute_scores(net16, method, seed=5, **_kw(method, **options))
    ref = ntksap.compute_scores(twin, method, seed=5, **_kw(method, **options))
    for n in ref:
        assert s16[n].dtype == ref[n].dtype and torch.equal(s16[n], ref[n]), (method, n)


# --- 3. outputs that are not one tensor, and two-input models -----------------------------------
@dataclass
class _Output:
    logits: torch.Tensor
    aux: torch.Tensor


class _Wrapped(nn.Module):
    """small_convnet whose forward returns a tuple, a dict or an output object."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = small_convnet()

    def forward(self, x):
        out = self.net(x)
        if self.kind == "tuple":
            return out, x.mean()
        if self.kind == "dict":
            return {"features": x.flatten(1), "logits": out}
        return _Output(logits=out, aux=x.mean())


PICK = {
    "tuple": (r"returned tuple; pass output_fn=lambda out: out\[0\]", lambda o: o[0]),
    "dict": (r"returned dict; pass output_fn=lambda out: out\['logits'\]", lambda o: o["logits"]),
    "object": (r"returned _Output; pass output_fn=lambda out: out\.logits", lambda o: o.logits),
}


@pytest.mark.filterwarnings("ignore::ntksap.LayerCollapseWarning")
@pytest.mark.parametrize("kind", list(PICK))
@pytest.mark.parametrize("method", ["ntksap", "snip", "grasp", "synflow"])
def test_non_tensor_outputs_are_named_and_output_fn_prunes_them(method, kind):
    match, pick = PICK[kind]
    model = _Wrapped(kind)
    with pytest.raises(TypeError, match="must return one tensor of logits.*" + match):
        ntksap.prune(model, method, density=0.3, rounds=1, **_kw(method))
    got = ntksap.prune(model, method, density=0.3, rounds=1, output_fn=pick, **_kw(method))
    plain = ntksap.prune(model.net, method, density=0.3, rounds=1, **_kw(method))
    assert ntksap.Masks({n.removeprefix("net."): m for n, m in got.items()}) == plain
    assert got.metadata["output_fn"] is True and plain.metadata["output_fn"] is False
    json.dumps(got.metadata, allow_nan=False)  # a flag, not a function
    scores = ntksap.compute_scores(model, method, output_fn=pick, **_kw(method))
    ref = ntksap.compute_scores(model.net, method, **_kw(method))
    assert all(torch.equal(scores["net." + n], s) for n, s in ref.items())


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, mask):
        return self.fc(x * mask)


def test_two_input_model_is_told_to_wrap_and_output_fn_is_checked():
    with pytest.raises(TypeError, match=r"one tensor x of shape \(batch, \*input_shape\).*2 "):
        ntksap.prune(_TwoInputs(), "synflow", density=0.5, input_shape=(4,))
    with pytest.raises(TypeError, match="Wrap the model"):
        ntksap.compute_scores(_TwoInputs(), "snip", data=[(torch.randn(3, 4), torch.arange(3))])
    # Methods that never run the model still work on it.
    assert ntksap.prune(_TwoInputs(), "magnitude", density=0.5).num_kept == 4
    with pytest.raises(TypeError, match="output_fn must be a function"):
        ntksap.prune(small_convnet(), "synflow", density=0.5, input_shape=INPUT_SHAPE, output_fn=1)
    with pytest.raises(TypeError, match=r"output_fn must return one tensor.*returned tuple"):
        ntksap.prune(
            _Wrapped("tuple"), "synflow", density=0.5, input_shape=INPUT_SHAPE, output_fn=tuple
        )


# --- 4. weight_norm / spectral_norm -------------------------------------------------------------
NORMS = {
    "weight_norm": (nn.utils.parametrizations.weight_norm, "parametrize.remove_parametrizations"),
    "spectral_norm": (nn.utils.parametrizations.spectral_norm, "remove_parametrizations"),
    "old_weight_norm": (nn.utils.weight_norm, "torch.nn.utils.remove_weight_norm"),
    "old_spectral_norm": (nn.utils.spectral_norm, "torch.nn.utils.remove_spectral_norm"),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_normalised_weights_are_a_clear_error_unless_excluded(kind):
    norm, fix = NORMS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # old weight_norm is deprecated
        net = nn.Sequential(norm(nn.Linear(6, 5)), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(6, 6), torch.tensor([0, 1, 2, 0, 1, 2]))]
    with pytest.raises(ValueError, match=r"0\.weight \(Linear\) is computed by .*" + fix):
        ntksap.prune(net, "snip", density=0.5, data=data)
    assert list(ntksap.prunable_parameters(net, exclude=["0.weight"])) == ["2.weight"]
    if kind == "old_weight_norm":
        # Its hook holds a non-leaf tensor that cannot be deep-copied: removal is the fix.
        with pytest.raises(ValueError, match=r"prevents the deep copy") as info:
            ntksap.prunable_parameters(net)
        assert "exclude=" not in str(info.value).split("(this old-style")[0]
        return
    with pytest.raises(ValueError, match=r"exclude=\['0\.weight'\] to keep it dense"):
        ntksap.prunable_parameters(net)
    masks = ntksap.prune(net, "snip", density=0.5, data=data, exclude=["0.weight"])
    assert list(masks) == ["2.weight"] and masks.num_kept == round(0.5 * 15)


def test_ntksaps_own_masks_still_count_as_the_weight():
    net = small_convnet()
    masks = prune_fast(net, "magnitude", density=0.5)
    ntksap.apply_masks(net, masks)
    got = ntksap.prunable_parameters(net)
    assert list(got) == list(masks)
    assert got["0.weight"] is net[0].parametrizations.weight.original


# --- 5. input shape checked by one forward; zoo defaults -----------------------------------------
class _Counting(nn.Module):
    """small_convnet that counts its forward passes on every copy (class-level)."""

    calls: list[int] = []  # noqa: RUF012  (shared on purpose: deep copies count too)

    def __init__(self) -> None:
        super().__init__()
        self.net = small_convnet()

    def forward(self, x):
        _Counting.calls.append(id(self))
        return self.net(x)


def test_wrong_input_shape_names_the_given_and_the_expected_shape():
    with pytest.raises(ValueError, match=r"input_shape \(1, 8, 8\) does not fit the model") as e:
        ntksap.prune(small_convnet(), "ntksap", density=0.5, input_shape=(1, 8, 8))
    msg = str(e.value)
    assert "first layer '0' (Conv2d, in_channels 3) expects (3, H, W) inputs" in msg
    assert "expected input[2, 1, 8, 8] to have 3 channels" in msg  # the original message
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"expects 64 features per input \(after flattening\)"):
        ntksap.prune(mlp, "synflow", density=0.5, input_shape=(3, 8, 8))
    bad_data = [(torch.randn(4, 1, 8, 8), torch.arange(4))]
    with pytest.raises(ValueError, match=r"the data's input shape \(1, 8, 8\) does not fit"):
        ntksap.prune(small_convnet(), "snip", density=0.5, data=bad_data)


def test_the_shape_check_is_one_forward_of_the_copy_and_changes_no_statistics():
    """The user's model never runs; ntksap's default num_samples reuses the check's output
    width instead of a second forward; train/eval modes and BN statistics are as given."""
    seen = {}

    @ntksap.register_method("test_spy", needs_input_shape=True)
    def spy(ctx):
        seen["modes"] = [m.training for m in ctx.model.modules()]
        seen["stats"] = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        seen["width"] = ctx.output_width
        return {n: torch.ones_like(p) for n, p in ctx.params.items()}

    try:
        model = _Counting().train()
        model.net[1].eval()  # a mixed mode must survive too
        _Counting.calls.clear()
        ntksap.compute_scores(model, "test_spy", input_shape=INPUT_SHAPE)
        assert len(_Counting.calls) == 1 and id(model) not in _Counting.calls
        assert seen["modes"] == [m.training for m in model.modules()]
        assert seen["width"] == NUM_CLASSES
        for k, v in model.state_dict().items():
            assert torch.equal(seen["stats"][k], v), k
    finally:
        base.METHODS._items.pop("test_spy")
    # ntksap without BatchNorm: 1 shape check + (clean + perturbed) per noise batch, with
    # num_samples = 10 x 5 classes = 50 in one batch of 64: no extra forward for the width.
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))
    calls = []
    mlp.register_forward_pre_hook(lambda m, a: calls.append(id(m)))
    masks = ntksap.prune(
        mlp, "ntksap", density=0.5, input_shape=(3, 2, 2), rounds=1, resamples=1, batch_size=64
    )
    assert masks.metadata["options"]["num_samples"] == 50
    assert len(calls) == 3 and id(mlp) not in calls


ZOO_DEFAULTS = {
    **{f"resnet{d}": ((3, 32, 32), 10) for d in (20, 32, 44, 56, 110)},
    **{f"vgg{d}_bn": ((3, 32, 32), 10) for d in (11, 13, 16, 19)},
    **{f"resnet{d}": ((3, 224, 224), 1000) for d in (18, 34, 50)},
    "lenet5": ((1, 28, 28), 10),
    "mlp": ((1, 28, 28), 10),
}


def test_registered_models_know_their_input_shape_and_classes():
    from ntksap import models

    assert set(ZOO_DEFAULTS) <= set(models.list_models())
    for name, (shape, classes) in ZOO_DEFAULTS.items():
        d = models.defaults(name)
        assert (d.input_shape, d.num_classes) == (shape, classes), name
    with pytest.raises(ValueError, match="valid choices"):
        models.defaults("resnet21")
    for name in ("lenet5", "mlp", "resnet20", "vgg11_bn", "resnet18"):
        torch.manual_seed(0)
        net = models.create(name)  # the defaults fit each other: one forward proves it
        shape, classes = ZOO_DEFAULTS[name]
        assert net.ntksap_model == {"name": name, "num_classes": classes, "in_channels": shape[0]}
        with torch.no_grad():
            assert net.eval()(torch.zeros(1, *shape)).shape == (1, classes), name
    net = models.create("MLP", num_classes=4, input_size=8, hidden=(16,))
    assert net.ntksap_model == {
        "name": "mlp", "num_classes": 4, "in_channels": 1, "input_size": 8, "hidden": (16,)
    }  # fmt: skip
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        models.create("lenet5", num_classes="10")


# --- 6. library metadata ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::ntksap.LayerCollapseWarning")  # zero biases go first
def test_library_masks_carry_the_model_and_target_facts(tmp_path):
    from ntksap import models

    zoo = models.create("mlp", num_classes=4, input_size=4, hidden=(8,)).to(torch.bfloat16)
    masks = ntksap.prune(
        zoo, "magnitude", density=0.5, include_bias=True, exclude=["layers.3.bias"]
    )
    md = masks.metadata
    assert md["model"] == "mlp"
    assert md["model_args"] == {
        "num_classes": 4, "in_channels": 1, "input_size": 4, "hidden": [8]
    }  # fmt: skip
    assert md["targets"] == {"include_bias": True, "exclude": ["layers.3.bias"], "include": []}
    assert md["num_total"] == 16 * 8 + 8 + 8 * 4 == masks.num_total
    assert (md["dtype"], md["compute_dtype"], md["output_fn"]) == ("bfloat16", "float32", False)
    for key in ("method", "density", "rounds", "seed", "options", "seconds", "torch"):
        assert key in md  # the earlier keys stay
    json.dumps(md, allow_nan=False)
    loaded = ntksap.Masks.load(masks.save(tmp_path / "m.safetensors"))
    assert loaded.metadata == json.loads(json.dumps(md))
    plain = ntksap.prune(nn.Sequential(nn.Linear(3, 2)), "random", density=0.5).metadata
    assert plain["model"] == "Sequential" and plain["model_args"] is None
    assert plain["num_total"] == 6 and plain["dtype"] == "float32"


# --- every bad argument fails before any forward ------------------------------------------------
def _bad_mask():
    params = ntksap.prunable_parameters(small_convnet())
    return {n: torch.ones(p.shape[0], dtype=torch.bool) for n, p in params.items()}


BAD_PRUNE = [
    ({"seed": -1}, r"seed must be an integer in \[0, 4294967295\]"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"include_bias": "yes"}, "include_bias must be True or False"),
    ({"invert": 1}, "invert must be True or False"),
    ({"shuffle": "no"}, "shuffle must be True or False"),
    ({"progress": None}, "progress must be True or False"),
    ({"device": "nonsense"}, "device must be an available device"),
    ({"device": "cuda:99"}, "device must be an available device"),
    ({"output_fn": "logits"}, "output_fn must be a function"),
    ({"data": [(torch.randn(4, *INPUT_SHAPE), torch.arange(3))]}, "same, non-zero batch size"),
    (
        {
            "data": [
                (torch.randn(2, *INPUT_SHAPE), torch.arange(2)),
                (torch.randn(2, 3, 4, 4), torch.arange(2)),
            ]
        },
        "every input must have the same shape",
    ),
    ({"data": [([1.0, 2.0], torch.arange(2))]}, "must hold tensors"),
    ({"data": 5}, "iterable of"),
    ({"epsilon": float("nan")}, "epsilon must be a positive number"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_PRUNE)
def test_every_bad_prune_argument_raises_before_any_forward(kwargs, match):
    model = _Counting()
    _Counting.calls.clear()
    method = "ntksap" if "epsilon" in kwargs else "snip"
    kw = {"input_shape": INPUT_SHAPE, "data": class_balanced_batch(), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        ntksap.prune(model, method, density=0.5, **kw)
    assert _Counting.calls == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"masks": "_bad_mask"}, "mask shapes do not match"),
        ({"masks": {"net.0.weight": torch.ones(6, 3, 3, 3, dtype=torch.bool)}}, "cover exactly"),
        ({"seed": 2**40}, "seed must be"),
        ({"include_bias": 1}, "include_bias must be True or False"),
    ],
)
def test_every_bad_compute_scores_argument_raises_before_any_forward(kwargs, match):
    if kwargs.get("masks") == "_bad_mask":
        kwargs = {"masks": {f"net.{n}": m for n, m in _bad_mask().items()}}
    model = _Counting()
    _Counting.calls.clear()
    with pytest.raises((ValueError, TypeError), match=match):
        ntksap.compute_scores(model, "snip", data=class_balanced_batch(), **kwargs)
    assert _Counting.calls == []
    ntksap.compute_scores(model, "snip", data=class_balanced_batch())
    assert _Counting.calls  # (the counter does see forwards)


def test_snip_reference_still_holds_with_float64_data_cast_from_float32():
    """Data batches are cast to the compute dtype: float32 data on a float64 model scores
    like float64 data (independent autograd reference)."""
    net = small_convnet().double()
    batches = class_balanced_batch()
    got = ntksap.compute_scores(net, "snip", data=batches)
    ref = copy.deepcopy(net).train()
    params = ntksap.prunable_parameters(ref)
    loss = sum(F.cross_entropy(ref(x.double()), y) for x, y in batches)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (n, p), g in zip(params.items(), grads):
        assert got[n].dtype == torch.float64
        assert torch.allclose(got[n], (g * p).abs(), rtol=1e-10, atol=1e-14), n
