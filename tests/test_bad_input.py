"""Every bad input, from the command line or the library, is a clear error before any work:
no model forward, no file or folder written. One table; each row is (how it is called, the
words the message must contain)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ntksap
from ntksap.cli import main
from ntksap.masks import Masks
from ntksap.models import create
from ntksap.sparse import load as sparse_load
from sparse_file_forge import forged, mlp_bomb, nested_metadata

PRUNE = ["prune", "--model", "lenet5", "--method", "magnitude"]
RUN = ["run", "--dataset", "digits", "--model", "lenet5", "--method", "magnitude"]
SPEC = ["spectrum", "--model", "lenet5", "--samples", "10"]


def _library(call):
    return ("library", call)


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


# --- sweep-config: a sweep file's tables as a dict, run (nothing may be written) ---
SWEEP = ["sweep", "--dataset", "digits", "--methods", "random", "--sparsities", "0.5",
         "--out", "sw"]  # fmt: skip


def _sweep_dict(**tables: object) -> None:
    from ntksap.experiments import sweep as sw

    raw = {"run": {"dataset": "digits"}, "grid": {"methods": ["random"], "sparsities": [0.5]}}
    raw.update(tables)
    sw.run_sweep(sw.Sweep.from_dict(raw), "sw", log=lambda _m: None)


# --- sparse-inputs: ntksap.sparse layers, chains and models given inputs or arrays they
# cannot take (called through .forward, the module's own entry: the check comes first) ---
def _sparse_layer(kind: str) -> nn.Module:
    from ntksap.sparse.layers import SparseConv2d, SparseLinear

    gen = torch.Generator().manual_seed(0)
    if kind == "linear":  # Linear(1000, 50), 10 % dense
        w = torch.randn(50, 1000, generator=gen) * (torch.rand(50, 1000, generator=gen) < 0.1)
        return SparseLinear.from_dense(w, None, relu=True)
    return SparseConv2d.from_dense(torch.randn(4, 1, 3, 3, generator=gen), None, padding=1)


def _sparse_chain() -> nn.Module:
    from ntksap.sparse.layers import SparseChain, SparseConv2d

    gen = torch.Generator().manual_seed(0)
    a = SparseConv2d.from_dense(torch.randn(8, 3, 3, 3, generator=gen), None, padding=1)
    b = SparseConv2d.from_dense(torch.randn(8, 8, 3, 3, generator=gen), None, padding=1)
    return SparseChain([a, b], [(0, -1), (1, -1)], output=2)


def _sparse_model() -> nn.Module:
    from ntksap.sparse import SparseModel

    return SparseModel(nn.Sequential(_sparse_layer("conv")), [])


def _forged_linear(rowptr: list[int], col: list[int]) -> nn.Module:
    from ntksap.sparse.layers import SparseLinear

    i32 = torch.int32
    return SparseLinear((2, 3), torch.tensor(rowptr, dtype=i32), torch.tensor(col, dtype=i32),
                        torch.ones(len(col)))  # fmt: skip


CASES: list[tuple[str, object, list[str]]] = [
    # --- command line: prune ---
    ("prune nan sparsity", [*PRUNE, "--sparsity", "nan"], ["finite"]),
    ("prune sparsity 1", [*PRUNE, "--sparsity", "1"], ["sparsity must be in [0, 1)"]),
    ("prune density 0", [*PRUNE, "--density", "0"], ["density must be in (0, 1]"]),
    ("prune inf compression", [*PRUNE, "--compression", "inf"], ["finite"]),
    ("prune unknown method", [*PRUNE[:3], "--method", "foo", "--sparsity", ".5"], ["snip"]),
    ("prune unknown model", ["prune", "--model", "foo", "--sparsity", ".5"], ["resnet20"]),
    ("prune nan epsilon", [*PRUNE[:3], "--sparsity", ".5", "--epsilon", "nan"], ["finite"]),
    ("prune option of another method",
     [*PRUNE, "--sparsity", ".5", "--temperature", "3"], ["not an option of method"]),
    ("prune bad init", [*PRUNE[:3], "--sparsity", ".5", "--init", "zeros"], ["kaiming"]),
    ("prune data method without data",
     [*PRUNE[:3], "--method", "snip", "--sparsity", ".5"], ["needs data", "--dataset"]),
    ("prune bad suffix", [*PRUNE, "--sparsity", ".5", "--out", "m.npz"], [".safetensors"]),
    ("prune out exists", [*PRUNE, "--sparsity", ".5", "--out", "exists.safetensors"],
     ["--overwrite"]),
    ("prune cuda", [*PRUNE, "--sparsity", ".5", "--device", "cuda:7"], ["cuda"]),
    ("prune bad shape", [*PRUNE, "--sparsity", ".5", "--input-shape", "0,8,8"], ["bad input"]),
    ("prune seed", [*PRUNE, "--sparsity", ".5", "--seed", "-3"], ["seed"]),
    ("prune rounds 0", [*PRUNE, "--sparsity", ".5", "--rounds", "0"], [">= 1"]),
    ("prune exclude nothing", [*PRUNE, "--sparsity", ".5", "--exclude", "zz*"],
     ["matches no parameter"]),
    # --- command line: run / train ---
    ("run lr nan", [*RUN, "--sparsity", ".5", "--lr", "nan", "--out", "r"], ["finite"]),
    ("run lr inf", [*RUN, "--sparsity", ".5", "--lr", "inf", "--out", "r"], ["finite"]),
    ("run lr negative", [*RUN, "--sparsity", ".5", "--lr", "-1", "--out", "r"], ["positive"]),
    ("run wd inf", [*RUN, "--sparsity", ".5", "--weight-decay", "inf", "--out", "r"],
     ["finite"]),
    ("run momentum 2", [*RUN, "--sparsity", ".5", "--momentum", "2", "--out", "r"],
     ["momentum must be in [0, 1]"]),
    ("run warmup > epochs", [*RUN, "--sparsity", ".5", "--epochs", "2", "--warmup-epochs", "5",
                             "--out", "r"], ["warmup_epochs"]),
    ("run milestones", [*RUN, "--sparsity", ".5", "--milestones", "9,3", "--out", "r"],
     ["milestones must be increasing"]),
    ("run seed", [*RUN, "--sparsity", ".5", "--seed", str(2**40), "--out", "r"], ["seed"]),
    ("run epochs 0", [*RUN, "--sparsity", ".5", "--epochs", "0", "--out", "r"], [">= 1"]),
    ("run cuda", [*RUN, "--sparsity", ".5", "--device", "cuda", "--out", "r"], ["CUDA"]),
    ("run workers", [*RUN, "--sparsity", ".5", "--workers", "-1", "--out", "r"], [">= 0"]),
    ("run out in a file", [*RUN, "--sparsity", ".5", "--out", "exists.safetensors/r"],
     ["exists.safetensors"]),
    ("run resamples 0", [*RUN[:-1], "ntksap", "--sparsity", ".5", "--resamples", "0",
                         "--out", "r"], [">= 1"]),
    ("train missing mask", ["train", "--dataset", "digits", "--model", "lenet5",
                            "--mask", "nope.safetensors", "--out", "r"], ["not found"]),
    ("train foreign mask", ["train", "--dataset", "digits", "--model", "lenet5",
                            "--mask", "r20.safetensors", "--out", "r"], ["resnet20"]),
    ("run unknown preset", ["run", "--preset", "x", "--sparsity", ".5", "--out", "r"],
     ["invalid choice"]),
    # --- command line: spectrum ---
    ("spectrum nan epsilon", [*SPEC, "--epsilon", "nan"], ["finite"]),
    ("spectrum data method on noise", [*SPEC, "--methods", "snip,random"], ["real data"]),
    ("spectrum out-dir files exist", [*SPEC, "--methods", "random", "--out-dir", "spec"],
     ["--overwrite"]),
    ("spectrum samples 0", [*SPEC, "--samples", "0"], [">= 1"]),
    ("spectrum masks + sparsity", [*SPEC, "--masks", "r20.safetensors", "--sparsity", ".5"],
     ["would be ignored"]),
    ("spectrum foreign mask", [*SPEC, "--masks", "r20.safetensors"], ["resnet20"]),
    ("spectrum duplicate method", [*SPEC, "--methods", "random,random"], ["twice"]),
    # --- sweep-config: sweep files, --set / --axis ---
    ("sweep-config exclude a string", [*SWEEP, "--set", "exclude=layers.5*"],
     ["[run] exclude", "list of patterns", "'layers.5*'"]),
    ("sweep-config list for one value", [*SWEEP, "--set", "rounds=[1,5]"],
     ["rounds must be one value", "[1, 5]"]),
    ("sweep-config nan setting", [*SWEEP, "--set", "lr=nan"], ["[train] lr", "finite", "nan"]),
    ("sweep-config alias as two axes", [*SWEEP, "--axis", "train.lr=0.1,0.2", "--axis", "lr=0.3"],
     ["--axis train.lr", "--axis lr"]),
    ("sweep-config 1 and 1.0", [*SWEEP, "--axis", "lr=1,1.0"], ["repeats a value", "1 and 1.0"]),
    ("sweep-config axis of pattern strings", [*SWEEP, "--axis", "exclude=a*,b*"],
     ["[grid.axes] exclude", "list of patterns", "'a*'"]),
    ("sweep-config methods a string", _library(lambda: _sweep_dict(
     grid={"methods": "random", "sparsities": [0.5]})), ["[grid] methods", "list", "'random'"]),
    ("sweep-config table as a list", _library(lambda: _sweep_dict(run=["digits"])),
     ["[run] must be a table", "a list"]),
    ("sweep-config list as a table", _library(lambda: _sweep_dict(grid={"methods": ["random"],
     "sparsities": [0.5], "axes": {"rounds": {"first": 1}}})),
     ["[grid.axes] rounds must be a list", "a table"]),
    ("sweep-config scalar seeds", _library(lambda: _sweep_dict(grid={"methods": ["random"],
     "sparsities": [0.5], "seeds": 3})), ["[grid] seeds must be a list", "3"]),
    ("sweep-config sparsity a string", _library(lambda: _sweep_dict(grid={
     "methods": ["random"], "sparsities": ["0.5"]})), ["[grid] sparsities", "numbers", "'0.5'"]),
    ("sweep-config density a bool", _library(lambda: _sweep_dict(grid={
     "methods": ["random"], "densities": [True]})), ["[grid] densities", "true/false"]),
    ("sweep-config inf compression", _library(lambda: _sweep_dict(grid={
     "methods": ["random"], "compression": [float("inf")]})), ["[grid] compression", "finite"]),
    # --- library ---
    ("prune nan", _library(lambda: ntksap.prune(_net(), "random", density=float("nan"))),
     ["density must be a number"]),
    ("prune epsilon inf", _library(lambda: ntksap.prune(_net(), "ntksap", density=0.5,
     input_shape=(1, 4, 4), epsilon=float("inf"))), ["epsilon"]),
    ("prune unknown option", _library(lambda: ntksap.prune(_net(), "random", density=0.5,
     epsilon=0.1)), ["unknown option"]),
    ("prune data method without data", _library(lambda: ntksap.prune(_net(), "snip",
     density=0.5)), ["needs data"]),
    ("prune bad schedule", _library(lambda: ntksap.prune(_net(), "random", density=0.5,
     schedule="cubic")), ["exponential"]),
    ("prune floor above 1", _library(lambda: ntksap.prune(_net(), "random", density=0.5,
     floor=1.5)), ["floor", "[0, 1]"]),
    ("prune floor with local scope", _library(lambda: ntksap.prune(_net(), "random",
     density=0.5, floor=0.5, scope="local")), ["floor", "scope='global'"]),
    ("prune robust not bool", _library(lambda: ntksap.prune(_net(), "ntksap", density=0.5,
     input_shape=(1, 4, 4), robust="yes")), ["robust"]),
    ("run floor nan", _library(lambda: ntksap.run("r", dataset="digits", method="random",
     density=0.5, floor=float("nan"))), ["floor"]),
    ("cli floor negative", [*PRUNE, "--sparsity", "0.5", "--floor", "-0.1", "--out",
     "m.safetensors"], ["floor"]),
    ("prune rounds float", _library(lambda: ntksap.prune(_net(), "random", density=0.5,
     rounds=2.0)), ["rounds"]),
    ("prune bad input_shape", _library(lambda: ntksap.prune(_net(), "synflow", density=0.5,
     input_shape=(1, -4, 4))), ["input_shape"]),
    ("run lr nan", _library(lambda: ntksap.run("r", dataset="digits", method="random",
     density=0.5, train={"lr": float("nan")})), ["finite"]),
    ("run unknown setting", _library(lambda: ntksap.run("r", dataset="digits", method="random",
     density=0.5, train={"learning_rate": 0.1})), ["unknown training setting"]),
    ("run mask and method", _library(lambda: ntksap.run("r", dataset="digits", method="random",
     density=0.5, mask="r20.safetensors")), ["not both"]),
    ("run unknown dataset", _library(lambda: ntksap.run("r", dataset="mnist", method="random",
     density=0.5)), ["mnist5k"]),
    ("run bad option", _library(lambda: ntksap.run("r", dataset="digits", method="ntksap",
     density=0.5, options={"resamples": 0})), ["resamples"]),
    ("run device", _library(lambda: ntksap.run("r", dataset="digits", method="random",
     density=0.5, device="cuda:3")), ["cuda"]),
    ("masks metadata", _library(lambda: Masks({"w": torch.ones(2, dtype=torch.bool)},
     {"model": 3})), ["'model' must be str"]),
    # --- px variants: an option the variant fixes, given another value ---
    ("px variant fixes norm_stats", _library(lambda: ntksap.prune(_net(), "px", density=0.5,
     data=[(torch.randn(6, 1, 4, 4), torch.arange(6) % 3)], variant="code-2024",
     norm_stats="running")), ["variant='code-2024' fixes norm_stats='batch'",
     "got norm_stats='running'", "'code-2025' or 'paper'"]),
    ("px paper with a classifier", [*PRUNE[:3], "--method", "px", "--sparsity", ".5",
     "--variant", "paper", "--classifier", "fc3"], ["variant='paper' fixes no classifier",
     "variant='code-2025'"]),
    # --- sparse-file: ntksap.sparse.load of forged files (tests/sparse_file_forge.py) ---
    ("sparse-file code in a placeholder", _library(lambda: sparse_load(forged("placeholder",
     lambda m, t: m["structure"]["nodes"][0].update(target='x=open("pwned", "w")')))),
     ["nodes[0].target", "must match"]),
    ("sparse-file getattr of a dunder", _library(lambda: sparse_load(forged("getattr",
     lambda m, t: m["structure"]["nodes"].insert(1, {"name": "g", "op": "call_function",
     "target": "builtins.getattr", "args": {"__tuple__": [{"__node__": "x"}, "__class__"]},
     "kwargs": {"__dict__": {}}})))), ["getattr may only read"]),
    ("sparse-file new_ones", _library(lambda: sparse_load(forged("new_ones",
     lambda m, t: m["structure"]["nodes"].insert(1, {"name": "b", "op": "call_method",
     "target": "new_ones", "args": {"__tuple__": [{"__node__": "x"}, 1000000, 1000]},
     "kwargs": {"__dict__": {}}})))), ["nodes[1].target", "must be one of", "new_ones"]),
    ("sparse-file zoo class", _library(lambda: sparse_load(forged("zoo",
     lambda m, t: (mlp_bomb(m, t), m["structure"].update({"class": "Evil"}))[0]))),
     ["structure.class", "MLP", "'Evil'"]),
    ("sparse-file rowptr decreases", _library(lambda: sparse_load(forged("rowptr",
     lambda m, t: t["net.fc.rowptr"].__setitem__(1, 99)))),
     ["'net.fc.rowptr'", "never decrease"]),
    ("sparse-file weight_shape", _library(lambda: sparse_load(forged("shape",
     lambda m, t: m["structure"]["modules"]["fc"]["config"].update(weight_shape=[7, 4])))),
     ["'net.fc.rowptr'", "must have shape (8,)"]),
    ("sparse-file nested JSON", _library(lambda: sparse_load(forged("nested",
     nested_metadata))), ["nested"]),
    ("sparse-file extra tensor", _library(lambda: sparse_load(forged("extra",
     lambda m, t: t.update(extra=torch.zeros(1))))), ["'extra'", "not part of the structure"]),
    # --- sparse-inputs: wrong inputs to sparse layers / chains / models, forged CSR ---
    ("sparse-inputs linear width", _library(lambda: _sparse_layer("linear").forward(
     torch.randn(2, 10))), ["mat1 and mat2 shapes cannot be multiplied (2x10 and 1000x50)",
     "in_features=1000"]),
    ("sparse-inputs conv channels", _library(lambda: _sparse_layer("conv").forward(
     torch.randn(2, 3, 8, 8))), ["expected input[2, 3, 8, 8] to have 1 channels, but got 3"]),
    ("sparse-inputs conv 0 channels", _library(lambda: _sparse_layer("conv").forward(
     torch.randn(2, 0, 8, 8))), ["to have 1 channels, but got 0 channels"]),
    ("sparse-inputs conv rank", _library(lambda: _sparse_layer("conv").forward(
     torch.randn(8, 8))), ["4-D (N, C, H, W)", "[8, 8]"]),
    ("sparse-inputs chain channels", _library(lambda: _sparse_chain().forward(
     torch.randn(2, 4, 8, 8))), ["to have 3 channels, but got 4 channels"]),
    ("sparse-inputs model float64", _library(lambda: _sparse_model().forward(
     torch.randn(2, 1, 8, 8, dtype=torch.float64))),
     ["SparseModel computes in float32, got input 0 of dtype torch.float64"]),
    ("sparse-inputs rowptr decreases", _library(lambda: _forged_linear([0, 2, 1], [0, 1])),
     ["rowptr must never decrease: rowptr[1] = 2 > rowptr[2] = 1"]),
    ("sparse-inputs column past the fan-in", _library(lambda: _forged_linear([0, 1, 2],
     [0, 9])), ["col_idx[1] = 9 is outside [0, 3) (in_features)"]),
]  # fmt: skip


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """Counts every nn.Module call (any model, any copy) during the test."""
    calls: list[int] = []
    original = nn.Module.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__call__", counting)
    return calls


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} | {
        str(p.relative_to(root)) + "/": b"" for p in root.rglob("*") if p.is_dir()
    }


@pytest.mark.parametrize(("label", "call", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_before_any_work(
    label, call, words, tmp_path, monkeypatch, capsys, forwards
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("exists.safetensors").write_bytes(b"keep me")
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "spectrum.json").write_text("{}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        r20 = ntksap.prune(create("resnet20"), "random", density=0.5)
    r20.save("r20.safetensors")
    forwards.clear()
    before = _snapshot(tmp_path)
    if isinstance(call, tuple):
        with pytest.raises((ValueError, TypeError, OSError)) as info:
            call[1]()
        message = str(info.value)
    else:
        try:
            code = main(call)
        except SystemExit as exc:
            code = exc.code
        message = capsys.readouterr().err
        assert code == 2, message
        assert "Traceback" not in message
    for word in words:
        assert word in message, (word, message)
    assert not forwards, f"{len(forwards)} module call(s) before the error"
    assert _snapshot(tmp_path) == before, "a file or folder was written"


def test_the_table_is_big() -> None:
    """The closing note reports this number."""
    assert len(CASES) >= 50
