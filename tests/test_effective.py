"""Effective masks (`ntksap.masks.effective`): the kept weights on an input-to-output path.

Checked against hand-worked networks (each expected mask written out), against an
independent boolean path computation (matrix products of 0/1 masks), and through the places
that show it: per-layer tables, run results, the sweep index and reports, the prune option
that targets an effective density, and the command line.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import sqlite3
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import ntksap
from ntksap import models
from ntksap.cli import main
from ntksap.experiments.index import Index, row_of
from ntksap.experiments.records import read_record
from ntksap.experiments.report import CSV_COLUMNS, build_table, to_csv, to_markdown
from ntksap.masks import Masks, effective
from ntksap.stats import format_table, layer_table


def bools(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def assert_masks(got: Masks, expected: dict[str, list]) -> None:
    assert list(got) == list(expected)
    for name, rows in expected.items():
        assert got[name].tolist() == bools(rows).tolist(), name


# ---------------------------------------------------------------------------------------
# Hand-worked networks
# ---------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    """4 inputs -> 4 hidden -> 3 hidden -> 3 outputs, with (non-zero) biases."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)
    )  # fmt: skip
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.fill_(0.5)  # a bias must not make a unit without input "alive"
    return net


# Rows are output units, columns input units (Linear weight layout).
MLP_MASKS = {
    "0.weight": [
        [1, 1, 0, 0],  # h1_0 <- x0, x1
        [0, 0, 0, 0],  # h1_1: no kept input (dead unit in the middle)
        [0, 0, 1, 0],  # h1_2 <- x2
        [0, 0, 0, 1],  # h1_3 <- x3, but h1_3 has no kept output: x3 is a dead input
    ],
    "2.weight": [
        [1, 1, 0, 0],  # h2_0 <- h1_0 (alive), h1_1 (dead)
        [0, 0, 1, 0],  # h2_1 <- h1_2
        [0, 1, 0, 0],  # h2_2 <- h1_1 only: no path from the input
    ],
    "4.weight": [
        [1, 0, 0],  # y0 <- h2_0
        [0, 1, 0],  # y1 <- h2_1
        [0, 0, 1],  # y2 <- h2_2 only: a dead output logit
    ],
}
MLP_EFFECTIVE = {
    "0.weight": [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
    "2.weight": [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
    "4.weight": [[1, 0, 0], [0, 1, 0], [0, 0, 0]],
}


def test_mlp_dead_unit_dead_input_dead_output() -> None:
    net = mlp()
    masks = Masks({k: bools(v) for k, v in MLP_MASKS.items()}, {"method": "hand"})
    got = effective(net, masks)  # input shape from the first Linear
    assert_masks(got, MLP_EFFECTIVE)
    assert got.metadata["effective"] is True and got.metadata["method"] == "hand"
    assert got.metadata["nominal_density"] == masks.density
    assert got.metadata["effective_density"] == got.density == 7 / (16 + 12 + 9)


def test_masked_biases_make_no_unit_alive() -> None:
    # include_bias masks: a kept bias is effective when its unit reaches the output; it is
    # never a path source, so the weights found above stay exactly the same
    net = mlp()
    biases = {"0.bias": [1, 1, 1, 1], "2.bias": [1, 1, 0], "4.bias": [1, 1, 1]}
    masks = Masks({**{k: bools(v) for k, v in MLP_MASKS.items()},
                   **{k: bools(v) for k, v in biases.items()}})  # fmt: skip
    got = effective(net, masks)
    assert_masks(Masks({k: got[k] for k in MLP_MASKS}), MLP_EFFECTIVE)
    # h1_3 has no kept output; every other kept bias's unit reaches a logit (h1_1 via h2_0,
    # although h1_1 has no input; h2_2's bias was pruned)
    assert got["0.bias"].tolist() == [True, True, True, False]
    assert got["2.bias"].tolist() == [True, True, False]
    assert got["4.bias"].tolist() == [True, True, True]


def test_model_and_masks_untouched_and_attached_masks_give_the_same() -> None:
    net = mlp()
    masks = Masks({k: bools(v) for k, v in MLP_MASKS.items()})
    state = copy.deepcopy(net.state_dict())
    saved = {k: m.clone() for k, m in masks.items()}
    effective(net, masks)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert net[0].weight.requires_grad  # the copy's gradients flags are its own
    assert all(torch.equal(saved[k], masks[k]) for k in masks)
    attached = ntksap.apply_masks(mlp(), masks)
    assert_masks(effective(attached, masks, input_shape=(4,)), MLP_EFFECTIVE)


class ResidualNet(nn.Module):
    """conv_in (1->2) -> relu -> [conv_a -> BN -> relu -> conv_b -> BN] + shortcut -> relu
    -> global average pool -> flatten -> fc (2 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.conv_a = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(2)
        self.conv_b = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_in(x))  # (N, 2, 4, 4)
        main = self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(h)))))
        out = torch.relu(main + h)  # the shortcut keeps h's channels alive
        return self.fc(torch.flatten(self.pool(out), 1))  # (N, 2)


def test_residual_cut_main_branch_shortcut_keeps_the_rest_alive() -> None:
    net = ResidualNet()
    full = torch.ones(2, 2, 3, 3, dtype=torch.bool)
    masks = Masks(
        {
            "conv_in.weight": torch.ones(2, 1, 3, 3, dtype=torch.bool),
            "conv_a.weight": full,
            "conv_b.weight": torch.zeros(2, 2, 3, 3, dtype=torch.bool),  # main branch cut
            "fc.weight": bools([[1, 0], [1, 0]]),  # only channel 0 reaches the logits
        }
    )
    got = effective(net, masks, input_shape=(1, 4, 4))
    conv_in = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    conv_in[0] = True  # channel 0: through the shortcut and the pool to fc; channel 1: unused
    assert torch.equal(got["conv_in.weight"], conv_in)
    assert not got["conv_a.weight"].any()  # conv_a's outputs reach nothing (conv_b is cut)
    assert not got["conv_b.weight"].any()
    assert got["fc.weight"].tolist() == bools([[1, 0], [1, 0]]).tolist()

    # main branch kept for channel 0 -> channel 1 -> channel 1 only: fc cannot see it
    conv_b = torch.zeros(2, 2, 3, 3, dtype=torch.bool)
    conv_b[0, 1] = True  # out channel 0 <- conv_a channel 1
    conv_a = torch.zeros(2, 2, 3, 3, dtype=torch.bool)
    conv_a[1, 0, 1, 1] = True  # conv_a channel 1 <- h channel 0 (centre tap)
    conv_a[0, 1, 1, 1] = True  # conv_a channel 0 <- h channel 1: conv_b never reads it
    masks2 = Masks({**masks, "conv_a.weight": conv_a, "conv_b.weight": conv_b})
    got = effective(net, masks2, input_shape=(1, 4, 4))
    expect_a = torch.zeros_like(conv_a)
    expect_a[1, 0, 1, 1] = True
    assert torch.equal(got["conv_a.weight"], expect_a)
    assert torch.equal(got["conv_b.weight"], conv_b)
    assert torch.equal(got["conv_in.weight"], conv_in)  # channel 1 feeds only dead conv_a[0]


def test_taps_that_only_meet_padding_are_not_on_a_path() -> None:
    # a 3x3 conv with padding 1 on a 1x1 input: only the centre tap ever multiplies a pixel
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3, 2))
    dense = Masks.ones_like({n: p for n, p in net.named_parameters() if n.endswith("weight")})
    got = effective(net, dense, input_shape=(2, 1, 1))
    centre = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
    centre[:, :, 1, 1] = True
    assert torch.equal(got["0.weight"], centre)
    assert got["2.weight"].all()


def test_max_pooling_joins_its_whole_window() -> None:
    # max pooling's gradient reaches one input per window; on the path graph every input of
    # the window is joined to the output, exactly as with average pooling
    def net(pool: nn.Module) -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(4, 4, 3), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True) if isinstance(pool, nn.MaxPool2d)
            else nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(4, 3),
        )  # fmt: skip

    a, b = net(nn.MaxPool2d(2)), net(nn.AvgPool2d(2))
    g = torch.Generator().manual_seed(0)
    masks = Masks(
        {
            n: torch.rand(p.shape, generator=g) < 0.25
            for n, p in a.named_parameters()
            if "weight" in n
        }
    )
    got = effective(a, masks, input_shape=(1, 8, 8))
    assert got == effective(b, masks, input_shape=(1, 8, 8))
    assert 0 < got.num_kept < masks.num_kept


def test_adaptive_max_pooling_and_dead_fc_inputs() -> None:
    # conv channels 1, 2 feed only fc inputs 4..11, whose weights are all pruned
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveMaxPool2d((2, 2)), nn.Flatten(),
                        nn.Linear(12, 2))  # fmt: skip
    fc = bools([[1] * 4 + [0] * 8] * 2)
    masks = Masks({"0.weight": torch.ones(3, 1, 3, 3, dtype=torch.bool), "3.weight": fc})
    got = effective(net, masks, input_shape=(1, 6, 6))
    assert got["0.weight"].flatten(1).all(1).tolist() == [True, False, False]
    assert not got["0.weight"][1:].any()
    assert torch.equal(got["3.weight"], fc)


def test_batchnorm_gamma_zero_still_connects() -> None:
    # documented choice: only the masks matter; gamma is trainable, so gamma = 0 (e.g. a
    # zero-initialised residual branch) does not cut the path
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2 * 2 * 2, 2))  # fmt: skip
    masks = Masks.ones_like({n: p for n, p in net.named_parameters() if n.endswith("weight")})
    masks = Masks({k: v for k, v in masks.items() if k != "1.weight"})
    before = effective(net, masks, input_shape=(1, 4, 4))
    with torch.no_grad():
        net[1].weight.zero_()
    assert effective(net, masks, input_shape=(1, 4, 4)) == before
    assert before.density == 1.0


# ---------------------------------------------------------------------------------------
# Against an independent computation, and properties
# ---------------------------------------------------------------------------------------
def boolean_reference(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Effective masks of a plain MLP (Linear weights in order, ReLU between) from boolean
    reachability with integer matrix products: forward[l] = units reachable from the input,
    backward[l] = units that reach the output."""
    m = [mk.long() for mk in masks]
    fwd = [torch.ones(m[0].shape[1], dtype=torch.long)]
    for w in m:
        fwd.append((w @ fwd[-1] > 0).long())
    bwd = [torch.ones(m[-1].shape[0], dtype=torch.long)]
    for w in reversed(m):
        bwd.insert(0, (w.T @ bwd[0] > 0).long())
    return [(w > 0) & (bwd[i + 1][:, None] > 0) & (fwd[i][None, :] > 0) for i, w in enumerate(m)]


def deep_mlp(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize(("depth", "width", "density"), [(3, 6, 0.3), (6, 10, 0.15)])
def test_random_mlps_match_boolean_reachability(depth: int, width: int, density: float) -> None:
    g = torch.Generator().manual_seed(depth)
    net = deep_mlp(depth, width)
    for trial in range(5):
        names = [n for n, _ in net.named_parameters() if n.endswith("weight")]
        masks = Masks({n: torch.rand(width, width, generator=g) < density for n in names})
        got = effective(net, masks)
        ref = boolean_reference([masks[n] for n in names])
        for n, r in zip(names, ref):
            assert torch.equal(got[n], r), (trial, n)


def test_deep_narrow_net_no_overflow_or_underflow() -> None:
    # 40 layers of width 64: dense path counts reach 64**40 ~ 1e72, beyond float32 (and the
    # SynFlow product with |theta| ~ 0.1 shrinks below 1e-38): the naive count fails,
    # the effective masks do not
    depth, width = 40, 64
    net = deep_mlp(depth, width)
    names = [n for n, _ in net.named_parameters() if n.endswith("weight")]
    g = torch.Generator().manual_seed(0)
    masks = Masks({n: torch.rand(width, width, generator=g) < 0.05 for n in names})
    masks = Masks({**masks, names[5]: torch.ones(width, width, dtype=torch.bool)})
    x = torch.ones(1, width)
    for w in [masks[n].float() for n in names]:
        x = x @ w.T
    dense_count = torch.ones(1, width)
    for _ in names:
        dense_count = dense_count @ torch.ones(width, width)
    assert not torch.isfinite(dense_count).all()  # float32 path counts overflow when dense
    small = torch.ones(1, width)
    for n in names:
        small = small @ (masks[n].float() * 0.01).T  # SynFlow-like |theta| product
    assert float(small.sum()) == 0.0  # ... and underflow to exactly zero with small weights
    got = effective(net, masks)
    ref = boolean_reference([masks[n] for n in names])
    assert all(torch.equal(got[n], r) for n, r in zip(names, ref))
    assert got.num_kept > 0
    dense = Masks({n: torch.ones(width, width, dtype=torch.bool) for n in names})
    assert effective(net, dense).density == 1.0


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_zoo_properties(name: str) -> None:
    net = models.create(name)
    shape = models.defaults(name).input_shape
    dense = Masks.ones_like(ntksap.prunable_parameters(net))
    assert effective(net, dense).density == 1.0  # every weight of the dense zoo model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = ntksap.prune(net, "random", sparsity=0.99, input_shape=shape)
    eff = effective(net, masks)
    assert all(bool((eff[k] <= masks[k]).all()) for k in masks)  # a subset of the kept ones
    assert eff.density < masks.density  # at 99 % random pruning some kept weights are dead
    again = effective(net, eff)
    assert again == eff  # idempotent


def test_bad_input() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    masks = Masks({"0.weight": torch.ones(2, 1, 3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="need the model's input shape"):
        effective(net, masks)
    with pytest.raises(ValueError, match="positive ints"):
        effective(net, masks, input_shape=(1, 0, 3))
    with pytest.raises(ntksap.MaskError, match="does not have"):
        effective(net, Masks({"nope.weight": torch.ones(2, dtype=torch.bool)}), (1, 3, 3))
    dilated = nn.Sequential(nn.Conv2d(1, 1, 3), nn.MaxPool2d(2, dilation=2))
    with pytest.raises(ValueError, match="dilation"):
        effective(dilated, {"0.weight": torch.ones(1, 1, 3, 3, dtype=torch.bool)}, (1, 9, 9))


# ---------------------------------------------------------------------------------------
# Pruning to an effective density
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_prune_to_effective_density(method: str) -> None:
    net = models.create("lenet5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = ntksap.prune(net, method, sparsity=0.98, input_shape=(1, 28, 28), effective=True)
    meta = masks.metadata
    target = 0.02
    e = effective(net, masks).density
    assert meta["effective_target"] == pytest.approx(target)
    assert meta["effective_density"] == e
    assert meta["effective_converged"] is True
    assert abs(e - target) <= max(0.01 * target, 1 / masks.num_total)
    assert meta["density"] == pytest.approx(masks.density, abs=1 / masks.num_total)
    assert meta["density"] >= e  # the nominal density found is above the effective one
    probes = meta["effective_probes"]
    assert probes[0][0] == pytest.approx(target) and probes[-1] == [meta["density"], e]
    # the probe is an ordinary prune at the nominal density found, same seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = ntksap.prune(net, method, density=meta["density"], input_shape=(1, 28, 28))
    assert Masks(dict(again)) == Masks(dict(masks))


def test_prune_effective_bad_input() -> None:
    net = models.create("lenet5")
    with pytest.raises(ValueError, match="effective must be True or False"):
        ntksap.prune(net, "random", density=0.1, input_shape=(1, 28, 28), effective="yes")
    with pytest.raises(ValueError, match="effective_tolerance must be in"):
        ntksap.prune(net, "random", density=0.1, input_shape=(1, 28, 28), effective=True,
                     effective_tolerance=0.0)  # fmt: skip
    # only the centre taps of this conv ever see a pixel: effective density <= 3/9 + fc
    one_pixel = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="out of reach"):
        ntksap.prune(one_pixel, "random", density=0.8, input_shape=(2, 1, 1), effective=True)


# ---------------------------------------------------------------------------------------
# Where it is shown: tables, runs, index, report, command line
# ---------------------------------------------------------------------------------------
def test_layer_table_shows_effective_density() -> None:
    net = mlp()
    masks = Masks({k: bools(v) for k, v in MLP_MASKS.items()})
    stats, totals = layer_table(net, masks, (4,))
    assert [(s.kept, s.effective_kept) for s in stats] == [(4, 3), (4, 2), (3, 2)]
    assert stats[0].effective_density == 3 / 16
    assert totals.effective_kept == 7 and totals.effective_density == 7 / 37
    assert totals.effective_sparsity == pytest.approx(30 / 37)
    text = format_table(stats, totals)
    assert text.splitlines()[0].split()[5] == "effective"
    assert text.splitlines()[1].split() == ["0.weight", "4x4", "16", "4", "25.00%", "18.75%", "8"]
    assert "effective        18.92% (effective sparsity 81.08%): 4 kept weights" in text
    stats, totals = layer_table(net, masks, (4,), effective_density=False)
    assert totals.effective_density is None and stats[0].effective_density is None
    assert "effective        n/a" in format_table(stats, totals)


def test_layer_table_warns_when_the_path_analysis_cannot_read_the_model() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.MaxPool2d(2, dilation=2))
    masks = Masks({"0.weight": torch.ones(1, 1, 3, 3, dtype=torch.bool)})
    with pytest.warns(UserWarning, match="effective density not computed.*dilation"):
        stats, totals = layer_table(net, masks, (1, 9, 9))
    assert stats[0].kept == 9 and stats[0].effective_density is None
    assert "effective        n/a" in format_table(stats, totals)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eff") / "sweep" / "runs" / "random-0.9"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ntksap.run(out, dataset="digits", method="random", sparsity=0.95,
                   train={"epochs": 1}, log=lambda _m: None)  # fmt: skip
    return out


def test_run_result_and_report(run_dir: Path) -> None:
    result = json.loads((run_dir / "result.json").read_text())
    masks = Masks.load(run_dir / "mask.safetensors")
    eff = effective(models.create("lenet5", in_channels=1), masks)
    assert result["params_effective"] == eff.num_kept
    assert result["effective_density"] == pytest.approx(eff.density)
    assert result["effective_sparsity"] == pytest.approx(1 - eff.density)
    assert result["effective_sparsity"] >= result["sparsity"]
    assert "effective" in (run_dir / "layers.txt").read_text().splitlines()[0]

    rec = read_record(run_dir)
    assert rec.effective_sparsity == result["effective_sparsity"]
    table = build_table([rec])
    md = to_markdown(table)
    assert "## Effective sparsity (%) by sparsity" in md
    assert f"| random | {100 * result['effective_sparsity']:.2f} |" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert CSV_COLUMNS[-1] == "effective_sparsity"
    assert float(rows[0]["effective_sparsity"]) == pytest.approx(result["effective_sparsity"])
    assert row_of(rec)["effective_sparsity"] == result["effective_sparsity"]


def test_old_run_folders_still_report(run_dir: Path, tmp_path: Path) -> None:
    # a run folder written before the field existed: computed from its mask ...
    old = tmp_path / "runs" / "old"
    old.mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "mask.safetensors", "result.json"):
        (old / name).write_bytes((run_dir / name).read_bytes())
    result = json.loads((old / "result.json").read_text())
    expected = result.pop("effective_sparsity")
    for key in ("effective_density", "params_effective"):
        result.pop(key)
    (old / "result.json").write_text(json.dumps(result))
    assert read_record(old).effective_sparsity == pytest.approx(expected)
    # ... and without a mask: n/a
    (old / "mask.safetensors").unlink()
    rec = read_record(old)
    assert rec.effective_sparsity is None
    md = to_markdown(build_table([rec]))
    assert "| random | n/a |" in md

    # an index made before the column existed gains it
    idx = Index(tmp_path)
    with sqlite3.connect(idx.path) as con:
        con.execute("CREATE TABLE runs (name TEXT PRIMARY KEY, folder TEXT NOT NULL, "
                    "status TEXT NOT NULL, signature TEXT)")  # fmt: skip
    assert idx.sync() == 1
    (row,) = idx.rows()
    assert row["effective_sparsity"] is None and row["status"] == "finished"


def test_old_index_rows_are_reread_when_a_column_is_added(run_dir: Path, tmp_path: Path) -> None:
    """An index written before `effective_sparsity` existed, whose rows are up to date by
    their signatures, gets the column filled on the next sync (not NULL until --rebuild)."""
    from ntksap.experiments.index import _COLUMNS

    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "mask.safetensors", "result.json"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    row = row_of(read_record(folder))
    old_cols = {k: t for k, t in _COLUMNS.items() if k != "effective_sparsity"}
    idx = Index(tmp_path)
    with sqlite3.connect(idx.path) as con:
        con.execute(f"CREATE TABLE runs ({', '.join(f'{k} {t}' for k, t in old_cols.items())})")
        con.execute(
            f"INSERT INTO runs ({', '.join(old_cols)}) VALUES ({', '.join('?' * len(old_cols))})",
            tuple(row[k] for k in old_cols),
        )
    assert idx.sync() == 1  # re-read although its signature had not changed
    (got,) = idx.rows()
    expected = json.loads((folder / "result.json").read_text())["effective_sparsity"]
    assert got["effective_sparsity"] == pytest.approx(expected)
    assert idx.sync() == 0  # and only once


def test_cli_prune_effective(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prune", "--model", "lenet5", "--method", "random", "--sparsity", "0.95"]
    assert main([*argv, "--effective"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"effective density ([\d.]+)% \(target 5.000%\) at nominal", out)
    assert found and abs(float(found[1]) - 5.0) <= 0.05  # 1 % relative tolerance
    assert "NOT within" not in out
    assert main([*argv, "--effective-tolerance", "0.05"]) == 2
    assert "--effective-tolerance needs --effective" in capsys.readouterr().err


def test_cli_run_effective_and_sweep_axis(tmp_path: Path) -> None:
    """`ntksap run --effective` reaches the effective target in its run folder; a sweep
    takes `effective` as a pruning setting (fixed or as an axis) and plans distinct runs."""
    from ntksap.experiments.sweep import Sweep, plan

    out = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--model", "lenet5", "--method", "random",
            "--sparsity", "0.97", "--effective", "--epochs", "1", "--out", str(out)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["effective_density"] == pytest.approx(0.03, rel=0.011)  # 1 % or one weight
    assert result["sparsity"] < 0.97  # the nominal density had to be raised
    config = json.loads((out / "config.json").read_text())
    assert config["prune"]["effective"] is True

    spec = Sweep(
        base={"dataset": "digits", "model": "lenet5"}, methods=["random"], densities=[0.05],
        axes={"effective": [False, True]}, train={"epochs": 1},
    )  # fmt: skip
    cells = plan(spec, tmp_path / "sweep")
    assert len(cells) == 2 and len({c.hash for c in cells}) == 2
    assert [c.request.prune_settings.get("effective", False) for c in cells] == [False, True]


def test_run_effective_tolerance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ntksap run --effective --effective-tolerance REL` (and `ntksap.run`, sweeps) pass the
    tolerance to the search and record it; without --effective, or out of (0, 1], it is an
    error before any work."""
    from ntksap import runs
    from ntksap.experiments.sweep import Sweep, plan

    out = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--model", "lenet5", "--method", "random",
            "--sparsity", "0.97", "--epochs", "1", "--out", str(out)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--effective", "--effective-tolerance", "0.2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["prune"]["effective"] is True
    assert config["prune"]["effective_tolerance"] == 0.2
    result = json.loads((out / "result.json").read_text())
    assert result["effective_density"] == pytest.approx(0.03, rel=0.2 + 1e-9)

    bad = tmp_path / "bad"
    assert main([*argv[:-1], str(bad), "--effective-tolerance", "0.2"]) == 2
    assert "--effective-tolerance needs --effective" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse refuses the value itself
        main([*argv[:-1], str(bad), "--effective", "--effective-tolerance", "0"])
    assert exc.value.code == 2 and "must be a number in (0, 1]" in capsys.readouterr().err
    assert not bad.exists()
    common = {"dataset": "digits", "method": "random", "sparsity": 0.9, "log": lambda m: None}
    with pytest.raises(ValueError, match="effective_tolerance needs effective=True"):
        runs.prepare(bad, effective_tolerance=0.05, **common)
    with pytest.raises(ValueError, match="effective_tolerance"):
        runs.prepare(bad, effective=True, effective_tolerance=1.5, **common)
    req = runs.prepare(bad, effective=True, effective_tolerance=0.05, **common)
    assert req.prune_settings["effective_tolerance"] == 0.05

    spec = Sweep(
        base={"dataset": "digits", "model": "lenet5"}, methods=["random"], densities=[0.05],
        run={"effective": True}, axes={"effective_tolerance": [0.01, 0.1]}, train={"epochs": 1},
    )  # fmt: skip
    cells = plan(spec, tmp_path / "sweep")
    assert [c.request.prune_settings["effective_tolerance"] for c in cells] == [0.01, 0.1]
