"""Loading an ntksap.sparse file treats it as data: hand-forged files that try to run code,
to allocate from sizes written in the file, or to pass broken CSR arrays to the kernels are
refused by `load` with a ValueError naming the field or tensor and the rule, and nothing
from them runs (the injected code would create the file "pwned" in the working folder).

The base files are real saved models: LeNet-5 (a traced graph with pooling modules), the zoo
MLP (untraceable: a "python" part rebuilt from the zoo), a model with a stored graph
attribute, one with an unfolded BatchNorm, and a hand-built SparseChain.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import ntksap.sparse as sp
from ntksap import models
from ntksap.sparse.convert import SparseModel
from ntksap.sparse.layers import SparseChain, SparseConv2d
from sparse_file_forge import deep, forge, linear_file, read, ref, write
from test_sparse import masks_for, randomise_bn

PWNED = "pwned"  # the injected code's marker, relative to the test's working folder


class Scaled(nn.Module):
    """A stored graph attribute (`scale`: a get_attr node) and a functional flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)) * self.scale  # (N, 4, 4, 4)
        return self.fc(torch.flatten(y, 1))  # (N, 5)


class WithBN(nn.Module):
    """A BatchNorm after a ReLU: not folded, kept as a "torch" module with its state."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.conv(x)))  # (N, 4, 4, 4)
        return self.fc(torch.flatten(y, 1))  # (N, 5)


MODELS = ("lenet5", "mlp", "scaled", "withbn")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[str], tuple[Path, torch.Tensor, torch.Tensor]]:
    """saved(name) -> (file, input, output of the converted model), saved once per name."""
    root = tmp_path_factory.mktemp("saved")
    cache: dict[str, tuple[Path, torch.Tensor, torch.Tensor]] = {}

    def get(name: str) -> tuple[Path, torch.Tensor, torch.Tensor]:
        if name not in cache:
            torch.manual_seed(0)
            if name in ("scaled", "withbn"):
                net = randomise_bn((Scaled if name == "scaled" else WithBN)().eval())
                x = torch.randn(2, 3, 6, 6)
            elif name == "mlp":
                net, x = models.create("mlp", hidden=(32,)), torch.randn(2, 1, 28, 28)
            else:
                net, x = models.create("lenet5"), torch.randn(2, 1, 28, 28)
            fast = sp.convert(net, masks_for(net, 0.8), example_input=x, autotune=False)
            cache[name] = (sp.save(fast, root / f"{name}.safetensors"), x, fast(x))
        return cache[name]

    return get


def refused(path: Path, *words: str) -> str:
    """`load(path)` raises a ValueError containing every word; nothing injected ran."""
    with pytest.raises(ValueError) as info:
        sp.load(path)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert not Path(PWNED).exists(), "code from the file ran"
    return message


def graph_nodes(meta: dict) -> list[dict]:
    return meta["structure"]["nodes"]


def find(meta: dict, name: str) -> dict:
    return next(n for n in graph_nodes(meta) if n["name"] == name)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)


# -- code in the file never runs ------------------------------------------------------------


def test_code_in_a_placeholder_name_never_runs(saved, tmp_path) -> None:
    def change(meta, _t):
        graph_nodes(meta)[0]["target"] = f'x=open("{PWNED}", "w")'

    refused(forge(saved("lenet5")[0], tmp_path / "f.safetensors", change), "nodes[0].target")


def test_code_in_a_get_attr_target_never_runs(saved, tmp_path) -> None:
    evil = f'scale") if open("{PWNED}", "w") else getattr(self, "scale'

    def change(meta, tensors):
        (attr,) = [n for n in graph_nodes(meta) if n["op"] == "get_attr"]
        attr["target"] = evil
        meta["structure"]["attrs"] = [evil]
        tensors["net." + evil] = tensors.pop("net.scale")

    refused(forge(saved("scaled")[0], tmp_path / "f.safetensors", change), "attrs[0]")


def test_code_in_a_module_target_never_runs(saved, tmp_path) -> None:
    evil = f'fc1") if open("{PWNED}", "w") else getattr(self, "fc1'

    def change(meta, _t):
        find(meta, "fc1")["target"] = evil
        modules = meta["structure"]["modules"]
        modules[evil] = modules.pop("fc1")

    refused(forge(saved("lenet5")[0], tmp_path / "f.safetensors", change), "not a dotted path")


def test_code_in_a_keyword_name_never_runs(saved, tmp_path) -> None:
    def change(meta, _t):
        flat = find(meta, "flatten")
        flat["args"]["__tuple__"] = flat["args"]["__tuple__"][:1]
        key = f'start_dim=1 if open("{PWNED}", "w") else 0, end_dim'
        flat["kwargs"]["__dict__"] = {key: -1}

    refused(forge(saved("lenet5")[0], tmp_path / "f.safetensors", change), "__dict__ key")


def test_node_names_must_be_plain_identifiers(saved, tmp_path) -> None:
    def change(meta, _t):
        for n in graph_nodes(meta):
            if n["name"] == "pool":
                n["name"] = f'pool; open("{PWNED}", "w")'
            for a in n["args"]["__tuple__"]:
                if a == ref("pool"):
                    a["__node__"] = f'pool; open("{PWNED}", "w")'

    refused(forge(saved("lenet5")[0], tmp_path / "f.safetensors", change), ".name", "must match")


@pytest.mark.parametrize("attribute", ["__class__", "__dict__", "data", "storage"])
def test_getattr_reads_only_shape_ndim_dtype(saved, tmp_path, attribute) -> None:
    def change(meta, _t):
        nodes = graph_nodes(meta)
        nodes.insert(1, {"name": "peek", "op": "call_function", "target": "builtins.getattr",
                         "args": {"__tuple__": [ref("x"), attribute]},
                         "kwargs": {"__dict__": {}}})  # fmt: skip

    path = forge(saved("lenet5")[0], tmp_path / "f.safetensors", change)
    refused(path, "getattr may only read dtype, ndim, shape")


def test_code_in_python_part_children_never_replaces_methods(saved, tmp_path) -> None:
    # a child named "forward" would replace the zoo module's forward with a file-built module
    def change(meta, _t):
        children = meta["structure"]["children"]
        children["forward"] = children.pop("layers")

    refused(forge(saved("mlp")[0], tmp_path / "f.safetensors", change), "'forward'")


def test_python_part_must_be_the_zoo_class(saved, tmp_path) -> None:
    def change(meta, _t):
        meta["structure"]["class"] = "Evil"

    refused(forge(saved("mlp")[0], tmp_path / "f.safetensors", change), "MLP", "'Evil'")


def test_save_refuses_methods_that_load_would_refuse(tmp_path) -> None:
    class NewZeros(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + x.new_zeros(3)

    fast = sp.convert(NewZeros(), example_input=torch.randn(2, 4), autotune=False)
    with pytest.raises(ValueError, match="new_zeros"):
        sp.save(fast, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# -- sizes from the file --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("new_ones", [{"__tuple__": [1000000, 1000]}]),
        ("new_zeros", [{"__tuple__": [1000000, 1000]}]),
        ("new_full", [{"__tuple__": [1000000, 1000]}, 1.0]),
        ("new_empty", [{"__tuple__": [1000000, 1000]}]),
        ("repeat", [1000, 1000, 1, 1]),
        ("expand", [1000000, 1000, 28, 28]),
    ],
)
def test_methods_that_allocate_from_file_sizes_are_refused(saved, tmp_path, method, args) -> None:
    def change(meta, _t):
        out = graph_nodes(meta)[-1]
        graph_nodes(meta).insert(-1, {"name": "bomb", "op": "call_method", "target": method,
                                      "args": {"__tuple__": [ref("x"), *args]},
                                      "kwargs": {"__dict__": {}}})  # fmt: skip
        out["args"]["__tuple__"] = [ref("bomb")]

    path = forge(saved("lenet5")[0], tmp_path / "f.safetensors", change)
    refused(path, "nodes[", "target", method)


def test_zoo_keywords_naming_huge_layers_allocate_nothing(saved, tmp_path) -> None:
    # hidden = [30000, 30000]: 3.6 GB of zoo weights from a 20 KB file. The zoo model is built
    # on the meta device and its layers are replaced by the file's: nothing is allocated and
    # the model is the stored one
    def change(meta, _t):
        meta["zoo_model"]["hidden"] = [30000, 30000]

    path, x, want = saved("mlp")
    forged = forge(path, tmp_path / "f.safetensors", change)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    back = sp.load(forged)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"load allocated about {grown_mib:.0f} MiB"
    assert torch.equal(back(x), want)
    assert all(not t.is_meta for t in back.state_dict().values())


def test_zoo_model_needs_every_own_tensor_and_child(saved, tmp_path) -> None:
    def change(meta, _t):
        meta["structure"]["own"] = ["in_features"]

    refused(forge(saved("mlp")[0], tmp_path / "f.safetensors", change), ".own", "in_features")


def test_a_graph_that_amplifies_its_input_is_stopped_before_allocating(saved, tmp_path) -> None:
    # (N, 400) -> outer sum (N, 400, 400) -> flatten -> outer sum (N, 160000, 160000):
    # 100 GB from broadcasting alone
    def change(meta, _t):
        nodes = graph_nodes(meta)
        out = nodes.pop()
        nodes += [
            {"name": "a", "op": "call_method", "target": "unsqueeze",
             "args": {"__tuple__": [ref("flatten"), 2]}, "kwargs": {"__dict__": {}}},
            {"name": "b", "op": "call_method", "target": "unsqueeze",
             "args": {"__tuple__": [ref("flatten"), 1]}, "kwargs": {"__dict__": {}}},
            {"name": "c", "op": "call_function", "target": "operator.add",
             "args": {"__tuple__": [ref("a"), ref("b")]}, "kwargs": {"__dict__": {}}},
            {"name": "d", "op": "call_method", "target": "flatten",
             "args": {"__tuple__": [ref("c"), 1]}, "kwargs": {"__dict__": {}}},
            {"name": "e", "op": "call_method", "target": "unsqueeze",
             "args": {"__tuple__": [ref("d"), 2]}, "kwargs": {"__dict__": {}}},
            {"name": "f", "op": "call_method", "target": "unsqueeze",
             "args": {"__tuple__": [ref("d"), 1]}, "kwargs": {"__dict__": {}}},
            {"name": "g", "op": "call_function", "target": "operator.add",
             "args": {"__tuple__": [ref("e"), ref("f")]}, "kwargs": {"__dict__": {}}},
        ]  # fmt: skip
        out["args"]["__tuple__"] = [ref("g")]
        nodes.append(out)

    _path, x, _y = saved("lenet5")
    model = sp.load(forge(saved("lenet5")[0], tmp_path / "f.safetensors", change))
    with pytest.raises(ValueError, match=r"keep \d+ elements alive at <model>:g"):
        model(x[:1])


def test_pooling_sizes_from_the_file_are_bounded_at_the_call(saved, tmp_path) -> None:
    def change(meta, _t):
        pool = meta["structure"]["modules"]["pool"]
        pool["init"]["output_size"] = {"__tuple__": [100000, 100000]}

    _path, x, _y = saved("lenet5")
    model = sp.load(forge(saved("lenet5")[0], tmp_path / "f.safetensors", change))
    with pytest.raises(ValueError, match="may use at most"):
        model(x)


def test_torch_module_sizes_must_match_their_stored_state(saved, tmp_path) -> None:
    def change(meta, _t):
        meta["structure"]["modules"]["bn"]["init"]["num_features"] = 4000

    path = forge(saved("withbn")[0], tmp_path / "f.safetensors", change)
    refused(path, "'net.bn.weight'", "must have shape (4000,)", "got (4,)")


def test_torch_module_arguments_are_checked(saved, tmp_path) -> None:
    def change(meta, _t):
        meta["structure"]["modules"]["bn"]["init"]["device"] = "cuda"

    refused(forge(saved("withbn")[0], tmp_path / "f.safetensors", change), "no argument")


# -- CSR arrays and layer configs -----------------------------------------------------------


def _rowptr(t):
    return t["net.fc.rowptr"]


CSR_FORGERIES = [
    ("rowptr starts at 1", lambda m, t: _rowptr(t).__setitem__(0, 1), "rowptr[0] = 1, must be 0"),
    ("rowptr decreases", lambda m, t: _rowptr(t).__setitem__(1, 9), "rowptr must never decrease"),
    ("rowptr ends past the non-zeros",
     lambda m, t: t.update({k: t[k][:-1] for k in ("net.fc.col_idx", "net.fc.values")}),
     "must equal nnz"),
    ("column too large", lambda m, t: t["net.fc.col_idx"].__setitem__(0, 4), "outside [0, 4)"),
    ("column negative", lambda m, t: t["net.fc.col_idx"].__setitem__(0, -7), "outside [0, 4)"),
    ("column repeated in a row",
     lambda m, t: t.update({"net.fc.col_idx": t["net.fc.col_idx"].sort().values.flip(0)}),
     "must increase strictly within a row"),
    ("rowptr int64", lambda m, t: t.update({"net.fc.rowptr": _rowptr(t).long()}),
     "must be int32"),
    ("values float64", lambda m, t: t.update({"net.fc.values": t["net.fc.values"].double()}),
     "must be float32"),
    ("values one short", lambda m, t: t.update({"net.fc.values": t["net.fc.values"][:-1]}),
     "must have shape"),
    ("bias too long", lambda m, t: t.update({"net.fc.bias": torch.zeros(30)}),
     "must have shape (3,)"),
    ("bias without has_bias",
     lambda m, t: m["structure"]["modules"]["fc"]["config"].update(has_bias=False),
     "empty bias"),
    ("weight_shape more rows",
     lambda m, t: m["structure"]["modules"]["fc"]["config"].update(weight_shape=[4, 4]),
     "must have shape (5,)"),
    ("weight_shape narrower than the columns",
     lambda m, t: m["structure"]["modules"]["fc"]["config"].update(weight_shape=[3, 3]),
     "10 non-zeros exceed the 3 x 3 weight"),
    ("weight_shape of a conv on a linear",
     lambda m, t: m["structure"]["modules"]["fc"]["config"].update(weight_shape=[3, 4, 1, 1]),
     "must have 2 entries"),
    ("extra tensor", lambda m, t: t.update({"net.fc.sneaky": torch.zeros(2)}),
     "not part of the structure"),
    ("dense weight too large for the file",
     lambda m, t: (m["structure"]["modules"]["fc"]["config"].update(
         weight_shape=[3, 2**30], mode="dense")),
     "allocate"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"), [c[1:] for c in CSR_FORGERIES], ids=[c[0] for c in CSR_FORGERIES]
)
def test_forged_csr_arrays_and_layer_configs_are_refused(tmp_path, change, words) -> None:
    message = refused(linear_file(tmp_path / "f.safetensors", change), words)
    assert "net.fc" in message or "modules['fc']" in message, message


# -- malformed JSON -------------------------------------------------------------------------


def _set(path: list, value):
    def change(meta, _t):
        obj = meta
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return change


JSON_FORGERIES = [
    ("nodes not a list", _set(["structure", "nodes"], 5), "must be a JSON list"),
    ("node lacks its op", lambda m, t: m["structure"]["nodes"][1].pop("op") and None,
     "lacks the field(s) op"),
    ("unknown top-level field", _set(["extra"], 1), "unknown field(s) 'extra'"),
    ("reference to a later node",
     lambda m, t: m["structure"]["nodes"][1]["args"]["__tuple__"].__setitem__(0, ref("output")),
     "not an earlier node"),
    ("deeply nested arguments", lambda m, t: json.dumps(m).replace('"x"', deep(3000), 1),
     "nested"),
    ("decision without fields", _set(["decisions"], [{"name": 1}]), "decisions[0]"),
    ("batch size text", _set(["batch_size"], "many"), "batch_size: must be an integer"),
    ("threads negative", _set(["threads"], -1), "threads: must be in [1,"),
    ("autotuned text", _set(["autotuned"], "yes"), "autotuned: must be true or false"),
    ("untraced not a list", _set(["untraced"], 5), "untraced: must be a JSON list"),
    ("no output node", lambda m, t: m["structure"]["nodes"].pop(), "no output node"),
    ("module never called",
     lambda m, t: m["structure"]["modules"].update(
         spare={"kind": "torch", "class": "ReLU", "init": {}, "prefix": "net.spare."}),
     "not used by any node"),
    ("module named like a module attribute", lambda m, t: (
        m["structure"]["nodes"][1].update(target="training"),
        m["structure"]["modules"].update(training=m["structure"]["modules"].pop("fc")))[0],
     "would shadow the module attribute 'training'"),
    ("prefix elsewhere", lambda m, t: (
        m["structure"]["modules"]["fc"].update(prefix="net.other."),
        t.update({k.replace("net.fc.", "net.other."): t.pop(k) for k in list(t)}))[0],
     "must be 'net.fc.'"),
    ("float NaN argument",
     lambda m, t: m["structure"]["nodes"][1]["args"]["__tuple__"].append(float("nan")), "NaN"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"), [c[1:] for c in JSON_FORGERIES], ids=[c[0] for c in JSON_FORGERIES]
)
def test_malformed_metadata_is_a_clear_value_error(tmp_path, change, words) -> None:
    refused(linear_file(tmp_path / "f.safetensors", change), words)


def test_a_corrupt_safetensors_file_is_a_value_error(tmp_path) -> None:
    path = linear_file(tmp_path / "f.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{" + data[9:60])
    refused(path, "not a readable safetensors file")


# -- chains ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain_file(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    layers = []
    for o, c, res in ((8, 3, False), (8, 8, True)):
        w = torch.randn(o, c, 3, 3, generator=gen) * (torch.rand(o, c, 3, 3, generator=gen) < 0.3)
        layers.append(SparseConv2d.from_dense(w, torch.randn(o, generator=gen), padding=1,
                                              relu=True, residual=res))  # fmt: skip
    chain = SparseChain(layers, [(0, -1), (1, 1)], output=2, mode="layers")
    model = SparseModel(chain, [])
    x = torch.randn(2, 3, 8, 8)
    path = sp.save(model, tmp_path_factory.mktemp("chain") / "chain.safetensors")
    return path, x, model(x)


CHAIN_FORGERIES = [
    ("step as text", _set(["structure", "steps", 1, 0], "1"), "steps[1][0]: must be an integer"),
    ("output as text", _set(["structure", "output"], "2"), "output: must be an integer"),
    ("split_work a list", _set(["structure", "split_work"], [1]), "split_work"),
    ("timing as text", _set(["structure", "fused_ms"], "fast"), "fused_ms"),
    ("name a number", _set(["structure", "name"], 5), "name: must be a string"),
    ("layer reads the input with the wrong channels", _set(["structure", "steps", 1], [0, 1]),
     "reads value 0 with 3 channels but its weight takes 8"),
    ("unknown chain field", _set(["structure", "threads"], 4), "unknown field(s) 'threads'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"), [c[1:] for c in CHAIN_FORGERIES], ids=[c[0] for c in CHAIN_FORGERIES]
)
def test_forged_chain_fields_are_refused(chain_file, tmp_path, change, words) -> None:
    refused(forge(chain_file[0], tmp_path / "f.safetensors", change), words)


# -- what still loads -----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_saved_models_load_and_give_the_same_outputs_at_any_batch(saved, name) -> None:
    path, x, want = saved(name)
    back = sp.load(path)
    assert torch.equal(back(x), want)
    assert torch.equal(back(x), want)  # the second call: the checked signature is reused
    # other batch sizes (checked again; other kernels, so equal up to rounding)
    torch.testing.assert_close(back(x[:1]), want[:1], rtol=1e-5, atol=1e-6)
    big = x.repeat(32, *([1] * (x.dim() - 1)))  # batch 64
    torch.testing.assert_close(back(big)[: len(x)], want, rtol=1e-5, atol=1e-6)


def test_chain_file_loads_and_matches(chain_file) -> None:
    path, x, want = chain_file
    assert torch.equal(sp.load(path)(x), want)


def test_a_loaded_model_rejects_a_bad_input_before_any_kernel(saved) -> None:
    # the meta run sees the channel mismatch first (the kernels never get the wrong shape)
    back = sp.load(saved("lenet5")[0])
    with pytest.raises(RuntimeError):
        back(torch.randn(2, 3, 28, 28))


def test_forged_file_round_trip_through_write(saved, tmp_path) -> None:
    # the forging helpers themselves change nothing: a read-write copy loads and matches
    path, x, want = saved("withbn")
    meta, tensors = read(path)
    copy = write(tmp_path / "copy.safetensors", meta, tensors)
    assert torch.equal(sp.load(copy)(x), want)


def test_an_unfolded_batchnorm_saves_and_loads(saved) -> None:
    # torch's BatchNorm takes `bias` as a flag now: it is saved as one, not as the tensor
    path, x, want = saved("withbn")
    meta, _tensors = read(path)
    assert meta["structure"]["modules"]["bn"]["init"].get("bias", True) is True
    assert torch.equal(sp.load(path)(x), want)
