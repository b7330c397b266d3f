"""Hardening of the library layer: CIFAR pickles of every protocol (and still nothing but
data), the finite-difference trace on masked models, tied weights, and transactional
mask operations (a failing apply / remove / reinitialize leaves the model as it was)."""

from __future__ import annotations

import copy
import io
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import ntksap
from data_fixtures import py3_pickle, tar_gz, write_cifar10, write_cifar100
from ntksap import data
from ntksap.analysis.spectrum import finite_difference_trace
from ntksap.data import DatasetError
from ntksap.data.cifar import RestrictedUnpickler, restricted_loads
from ntksap.targets import prunable_parameters

PROTOCOLS = [2, 3, 4, 5]

# --- CIFAR pickles: every protocol, every common label container ---------------------------

LABELS = {
    "int-list": list,
    "int64-array": lambda y: np.array(y, dtype=np.int64),
    "int64-scalar-list": lambda y: [np.int64(v) for v in y],
    "uint8-array-tuple": lambda y: tuple(np.array(y, dtype=np.uint8)),
}


def _load_both_layouts(name: str, folder: Path) -> list[tuple[data.TensorImageDataset, ...]]:
    """(train, test) read from the extracted folder, then from the .tar.gz alone."""
    root = folder.parent
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable array" warning
        out.append((data.create(name, root=root), data.create(name, root=root, split="test")))
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        tar_gz(folder, root / archive)
        shutil.rmtree(folder)
        out.append((data.create(name, root=root), data.create(name, root=root, split="test")))
    return out


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-names", "numpy1-names"])
@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cifar10_pickles_of_protocols_2_to_5_load(
    tmp_path: Path, protocol: int, labels: str, numpy1: bool
) -> None:
    # Bug: protocol 2 (`_codecs.encode` for bytes), protocol 5 (`_frombuffer`) and numpy
    # scalar labels (`multiarray.scalar`) were refused as "may be malicious".
    dumps = py3_pickle(protocol, numpy1=numpy1)
    fake = write_cifar10(tmp_path, per_batch=2, n_test=3, dumps=dumps, labels=LABELS[labels])
    for train, test in _load_both_layouts("cifar10", fake.folder):
        assert train.classes == fake.classes
        assert np.array_equal(train.images.numpy(), fake.train_x)
        assert train.targets.dtype == torch.int64 and test.targets.dtype == torch.int64
        assert train.targets.tolist() == fake.train_y.tolist()
        assert np.array_equal(test.images.numpy(), fake.test_x)
        assert test.targets.tolist() == fake.test_y.tolist()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cifar100_pickles_of_protocols_2_to_5_load(tmp_path: Path, protocol: int) -> None:
    fake = write_cifar100(tmp_path, dumps=py3_pickle(protocol), labels=LABELS["int64-array"])
    for train, test in _load_both_layouts("cifar100", fake.folder):
        assert train.classes == fake.classes
        assert np.array_equal(train.images.numpy(), fake.train_x)
        assert train.targets.tolist() == fake.train_y.tolist()
        assert test.targets.tolist() == fake.test_y.tolist()


def _numeric_zoo() -> dict[str, object]:
    g = np.random.default_rng(0)
    cube = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    return {
        "u8": g.integers(0, 256, (2, 5), dtype=np.uint8),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "f32": g.standard_normal((3, 2)).astype(np.float32),
        "f16": np.array([0.5, -2.0], dtype=np.float16),
        "c128": np.array([1 + 2j]),
        "bool": np.array([True, False, True]),
        "big-endian": np.arange(4, dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "strided": np.arange(10, dtype=np.int32)[::3],
        "axes-permuted": cube.transpose(2, 0, 1),  # numpy 2, protocol 5: order "K"
        "empty": np.zeros((0, 3), dtype=np.uint8),
        "scalars": [np.int64(7), np.float32(1.5), np.bool_(True), np.uint8(255)],
        "plain": [b"abc", "text", 3, 2.5, None, True, (1, 2), {"k": [1]}],
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray | np.generic):
        return type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-names", "numpy1-names"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_restricted_unpickler_rebuilds_numeric_numpy_data(protocol: int, numpy1: bool) -> None:
    dumps = py3_pickle(protocol, numpy1=numpy1)
    zoo = _numeric_zoo()
    blob = dumps(zoo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 reading numpy.core
        expected = pickle.loads(blob)
    out = restricted_loads(blob, "zoo")
    assert _same(expected, out), out  # exactly what the unrestricted unpickler builds
    for k, v in zoo.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(out[k], v) and out[k].flags.writeable, k
    # b"" separately: the pure-Python pickler behind numpy1=True memoizes the b"" of an
    # empty array's buffer and would refer later b"" to it
    assert restricted_loads(dumps([b"", b"ab", b""]), "bytes") == [b"", b"ab", b""]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_code_in_a_cifar_batch_is_refused_at_every_protocol(tmp_path: Path, protocol: int) -> None:
    fake = write_cifar10(tmp_path, per_batch=1, n_test=1)
    marker = tmp_path / "pwned"
    path = fake.folder / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=protocol))
    with pytest.raises(DatasetError, match="malicious") as err:
        data.create("cifar10", root=tmp_path, split="test")
    assert f"{os.system.__module__}.system" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


OBJECT_DATA = {
    "object-array": np.array([1, "a", None], dtype=object),
    "structured": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
    "strings": np.array(["ab", "c"]),
    "datetime": np.array(["2020-01-01"], dtype="datetime64[D]"),
}


@pytest.mark.parametrize("kind", list(OBJECT_DATA))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_non_numeric_numpy_dtypes_are_refused(tmp_path: Path, protocol: int, kind: str) -> None:
    # Bug: an object array loaded (np.dtype("O") was allowed): its pickle may carry any
    # object the other globals can build, so only plain numeric dtypes are accepted.
    fake = write_cifar10(tmp_path, per_batch=1, n_test=1)
    path = fake.folder / "test_batch"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"extra": OBJECT_DATA[kind]}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(DatasetError, match="malicious") as err:
        data.create("cifar10", root=tmp_path, split="test")
    assert "refused" in str(err.value)


# A dtype whose pickled state claims "holds Python objects" (flags=1) for int64 data: numpy
# then treats the 8 data bytes (0x10) as a PyObject pointer.
FORGED_FLAGS = (
    b"cnumpy.core.multiarray\n_reconstruct\n"
    b"(cnumpy\nndarray\n(I0\ntS'b'\ntR"
    b"(I1\n(I1\ntcnumpy\ndtype\n(S'i8'\nI00\nI01\ntR(I3\nS'<'\nNNNI-1\nI-1\nI1\ntbI00\n"
    b"S'\\x10\\x00\\x00\\x00\\x00\\x00\\x00\\x00'\ntb."
)
# numpy.ndarray called directly (not as _reconstruct's argument): the constructor that
# takes any dtype and a buffer.
DIRECT_NDARRAY = (
    b"cnumpy\nndarray\n((I2\ntcnumpy\ndtype\n(S'u1'\nI00\nI01\ntR"
    b"(I3\nS'|'\nNNNI-1\nI-1\nI0\ntbS'ab'\ntR."
)
# np.dtype("O8") on its own, and a legitimate dtype given a field list holding objects.
OBJECT_DTYPE = b"cnumpy\ndtype\n(S'O8'\nI00\nI01\ntR."
FORGED_FIELDS = (
    b"cnumpy\ndtype\n(S'u1'\nI00\nI01\ntR(I3\nS'|'\nN(S'a'\nt}S'a'\n"
    b"(cnumpy\ndtype\n(S'O8'\nI00\nI01\ntRI0\ntsI8\nI1\nI1\ntb."
)
# _codecs.encode with a codec other than latin-1 (protocol 2 only ever uses latin-1).
OTHER_CODEC = b"c_codecs\nencode\n(S'eJwLAQAA'\nS'base64'\ntR."


@pytest.mark.parametrize(
    "payload",
    [FORGED_FLAGS, DIRECT_NDARRAY, OBJECT_DTYPE, FORGED_FIELDS, OTHER_CODEC],
    ids=["forged-flags", "direct-ndarray", "object-dtype", "forged-fields", "other-codec"],
)
def test_forged_numpy_states_are_refused(payload: bytes) -> None:
    # Bug: the forged dtype state loaded (an int64 dtype with hasobject=True, which numpy
    # then mishandles), and numpy.ndarray / np.dtype("O") were callable with any arguments.
    with pytest.raises(DatasetError, match="malicious"):
        restricted_loads(payload, "forged")
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()


def test_truncated_protocol5_pickle_is_corrupt_not_malicious(tmp_path: Path) -> None:
    blob = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=5)
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        restricted_loads(blob[: len(blob) // 2], "half")


# --- finite-difference trace on a masked model ---------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_finite_difference_trace_on_a_masked_model_equals_explicit_masks() -> None:
    # Bug: KeyError on a model with masks attached (parametrized parameter names).
    net = _mlp()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    masks = _half_masks(net)
    masked = ntksap.apply_masks(copy.deepcopy(net), masks)
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    got = finite_difference_trace(masked, x, draws=3, seed=2)
    assert got == finite_difference_trace(net, x, masks, draws=3, seed=2)
    # masks passed explicitly as well as attached: both apply
    more = _half_masks(net, seed=7)
    both = {n: masks[n] & more[n] for n in masks}
    assert finite_difference_trace(masked, x, more, draws=3) == finite_difference_trace(
        net, x, both, draws=3
    )
    assert ntksap.get_masks(masked) == masks and masked.training
    assert all(torch.equal(v, before[k]) for k, v in masked.state_dict().items())


# --- tied weights ---------------------------------------------------------------------------


class Tied(nn.Module):
    """Two Linear layers sharing one weight (an autoencoder-style tie) and their own biases."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 5)
        self.dec = nn.Linear(5, 5)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x)))


def test_get_masks_names_tied_weights_once() -> None:
    # Bug: get_masks returned "enc.weight" and "dec.weight" (num_total 50 for 25 weights).
    net = Tied()
    masks = _half_masks(net)
    assert list(masks) == ["enc.weight"] == list(prunable_parameters(net))  # prune's names
    ntksap.apply_masks(net, masks)
    got = ntksap.get_masks(net)
    assert list(got) == ["enc.weight"] and got.num_total == masks.num_total == 25
    assert got == masks


def test_get_masks_of_a_tied_model_equals_what_prune_gave() -> None:
    net = Tied()
    masks = ntksap.prune(net, "magnitude", density=0.4)
    assert list(masks) == ["enc.weight"] and masks.num_total == 25
    ntksap.apply_masks(net, masks)
    got = ntksap.get_masks(net)
    assert list(got) == list(masks) and got.num_total == masks.num_total and got == masks


def test_reinitialize_keeps_masks_on_every_holder_of_a_tied_weight() -> None:
    # Bug: reinitialize raised MaskError ("dec.weight" unknown) after removing the masks.
    net = Tied()
    masks = _half_masks(net)
    ntksap.apply_masks(net, masks)
    before = net.enc.weight.detach().clone()
    ntksap.reinitialize(net, "kaiming", seed=1)
    m = masks["enc.weight"]
    assert parametrize.is_parametrized(net.enc, "weight")
    assert parametrize.is_parametrized(net.dec, "weight")
    for w in (net.enc.weight, net.dec.weight, net.enc.parametrizations.weight.original):
        assert (w[~m] == 0).all()
    assert torch.equal(net.enc.weight, net.dec.weight)
    assert not torch.equal(net.enc.weight, before)
    assert ntksap.get_masks(net) == masks
    # the tie survives: one tensor under both holders
    assert net.enc.parametrizations.weight.original is net.dec.parametrizations.weight.original


# --- transactional apply / remove / reinitialize -------------------------------------------


def _half_masks(net: nn.Module, seed: int = 0) -> ntksap.Masks:
    """Random 50% masks on every Linear weight, named as `named_parameters()` (deduplicated)
    names them; built by hand so these tests do not depend on the scoring code."""
    g = torch.Generator().manual_seed(seed)
    return ntksap.Masks(
        {
            n: torch.rand(p.shape, generator=g) < 0.5
            for n, p in net.named_parameters()
            if n.endswith("weight") and p.dim() == 2
        }
    )


def _snapshot(net: nn.Module) -> tuple:
    return (
        {k: v.detach().clone() for k, v in net.state_dict().items()},
        dict(ntksap.get_masks(net)),
        [id(p) for p in net.parameters()],
        [type(m) for m in net.modules()],
    )


def _unchanged(net: nn.Module, snap: tuple) -> None:
    state, masks, params, types = snap
    now = net.state_dict()
    assert list(now) == list(state)
    for k, v in now.items():
        assert torch.equal(v, state[k]), k
    got = ntksap.get_masks(net)
    assert list(got) == list(masks) and all(torch.equal(got[k], masks[k]) for k in masks)
    assert [id(p) for p in net.parameters()] == params
    assert [type(m) for m in net.modules()] == types
    was = net.training
    net.eval()(torch.randn(2, 5))  # still usable (eval: BatchNorm statistics untouched)
    net.train(was)


def _fail_on_call(monkeypatch, owner, attr: str, call: int) -> None:
    """Make `owner.attr` raise on its `call`-th call (the earlier calls do the real work)."""
    real = getattr(owner, attr)
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise RuntimeError(f"injected failure in {attr}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, flaky)


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.bn(torch.relu(self.b(torch.relu(self.a(x))))))


def test_reinitialize_that_fails_midway_leaves_the_model_as_it_was(monkeypatch) -> None:
    # Bug: the masks were already removed and the weights redrawn when the error came.
    for net in (Tied(), Three()):
        ntksap.apply_masks(net, _half_masks(net))
        snap = _snapshot(net)

        def half_redraw(model: nn.Module, scheme: str) -> nn.Module:
            next(m for m in model.modules() if isinstance(m, nn.Linear)).reset_parameters()
            raise RuntimeError("injected failure in redraw_")

        monkeypatch.setattr(ntksap.reinit, "redraw_", half_redraw)
        with pytest.raises(RuntimeError, match="injected"):
            ntksap.reinitialize(net, "kaiming", seed=0)
        _unchanged(net, snap)
        monkeypatch.undo()

    net = Three()
    ntksap.apply_masks(net, _half_masks(net))
    snap = _snapshot(net)
    # the failure in re-attaching the masks, after the redraw
    _fail_on_call(monkeypatch, parametrize, "register_parametrization", 2)
    with pytest.raises(RuntimeError, match="injected"):
        ntksap.reinitialize(net, "kaiming", seed=0)
    _unchanged(net, snap)


def test_apply_masks_with_one_bad_mask_leaves_the_model_unparametrized(monkeypatch) -> None:
    # Bug: the masks before the bad one were attached (and their weights zeroed).
    net = Three()
    masks = _half_masks(net)
    snap = _snapshot(net)
    bad = dict(masks)
    bad["b.weight"] = torch.ones(5, 5, dtype=torch.bool, device="meta")  # cannot be read
    with pytest.raises(ntksap.MaskError, match=r"b\.weight"):
        ntksap.apply_masks(net, bad)
    _unchanged(net, snap)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())

    for call in (2, 3):  # a failure inside torch while attaching the 2nd / 3rd tensor
        _fail_on_call(monkeypatch, parametrize, "register_parametrization", call)
        with pytest.raises(RuntimeError, match="injected"):
            ntksap.apply_masks(net, masks)
        _unchanged(net, snap)
        monkeypatch.undo()
    ntksap.apply_masks(net, masks)  # and the model still takes them afterwards
    assert ntksap.get_masks(net) == masks


def test_remove_masks_that_fails_midway_leaves_the_masks_attached(monkeypatch) -> None:
    for net in (Tied(), Three()):
        ntksap.apply_masks(net, _half_masks(net), zero=False)
        snap = _snapshot(net)
        _fail_on_call(monkeypatch, parametrize, "remove_parametrizations", 2)
        with pytest.raises(RuntimeError, match="injected"):
            ntksap.remove_masks(net)
        _unchanged(net, snap)
        monkeypatch.undo()
        ntksap.remove_masks(net)
        assert not any(parametrize.is_parametrized(m) for m in net.modules())


def test_apply_masks_to_a_copy_does_not_change_the_original_class() -> None:
    # torch shares the generated Parametrized class between deep copies: attaching a mask
    # to the copy's weight must not add a `weight` property to the original's class.
    net = nn.Sequential(nn.Linear(4, 4))
    parametrize.register_parametrization(net[0], "bias", nn.Identity())
    clone = copy.deepcopy(net)
    ntksap.apply_masks(clone, {"0.weight": torch.eye(4, dtype=torch.bool)})
    assert torch.equal(net[0].weight, net[0]._parameters["weight"])
    assert not parametrize.is_parametrized(net[0], "weight")
    assert (clone[0].weight == torch.eye(4) * clone[0].weight).all()


def test_calibrate_batchnorm_on_a_masked_model_takes_its_masks_again() -> None:
    # Bug: MaskError "already has a parametrization" when the masks passed are attached.
    from ntksap.analysis.spectrum import calibrate_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    masks = _half_masks(net)
    masked = ntksap.apply_masks(copy.deepcopy(net), masks)
    want = calibrate_batchnorm(net, x, masks).state_dict()
    for given in (masks, None):
        got = calibrate_batchnorm(masked, x, given).state_dict()
        assert list(got) == list(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert ntksap.get_masks(masked) == masks
