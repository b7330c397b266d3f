"""The selection floor (`ntksap.prune(floor=...)`) and robust NTK-SAP (`robust=True`).

Checked against brute-force selections written out independently, and on a small network
where plain NTK-SAP leaves output units with no weight."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import ntksap
from ntksap.pruning import LayerCollapseWarning, floor_reserve, kept_count, select, starved_layers


def test_floor_reserve_hand_worked():
    # k = 6 of 3 tensors: share 2. The head (2 units x 3) gives each unit max(1, 2 // 2) = 1
    # weight (its best), which already fills its share; "a" and "b" keep their best 2.
    s = {
        "a": torch.tensor([5.0, 1.0, 4.0, 3.0]),
        "b": torch.tensor([[0.5, 0.1], [0.2, 0.9]]),
        "head": torch.tensor([[9.0, 8.0, 7.0], [0.3, 0.1, 0.2]]),
    }
    m = {n: torch.ones_like(v, dtype=torch.bool) for n, v in s.items()}
    r = floor_reserve(s, m, k=6, floor=1.0)
    assert r["a"].tolist() == [True, False, True, False]
    assert r["b"].tolist() == [[True, False], [False, True]]
    assert r["head"].tolist() == [[True, False, False], [True, False, False]]
    # half the floor: share 1, the head's units still one weight each (2 > share 1), and
    # the others keep min(1, (6 - 2) // 2) = 1
    r = floor_reserve(s, m, k=6, floor=0.5)
    assert [int(r[n].sum()) for n in s] == [1, 1, 2]
    # a pruned entry is never reserved: the head's unit 0 loses its best weight
    m["head"][0, 0] = False
    r = floor_reserve(s, m, k=6, floor=1.0)
    assert r["head"].tolist() == [[False, True, False], [True, False, False]]


def _brute_force(scores, masks, density, floor):
    """select() with a floor, written out the slow way: the reserved entries, then the best
    others by score (no ties: the scores are distinct)."""
    names = list(scores)
    total = sum(s.numel() for s in scores.values())
    k = min(kept_count(density, total), sum(int(m.sum()) for m in masks.values()))
    share = math.floor(floor * k / len(names))
    reserved: dict[tuple[str, int], None] = {}
    head = names[-1]
    rows, cols = scores[head].shape
    for r in range(rows):
        alive = [c for c in range(cols) if masks[head][r, c]]
        alive.sort(key=lambda c: -float(scores[head][r, c]))
        for c in alive[: max(1, share // rows)]:
            reserved[(head, r * cols + c)] = None
    taken = len(reserved)
    rest = [i for i in range(scores[head].numel()) if masks[head].flatten()[i]]
    rest = [i for i in rest if (head, i) not in reserved]
    rest.sort(key=lambda i: -float(scores[head].flatten()[i]))
    for i in rest[: max(0, share - taken)]:
        reserved[(head, i)] = None
    other_share = min(share, (k - sum(1 for key in reserved if key[0] == head)) // (len(names) - 1))
    for n in names[:-1]:
        alive = [i for i in range(scores[n].numel()) if masks[n].flatten()[i]]
        alive.sort(key=lambda i: -float(scores[n].flatten()[i]))
        for i in alive[:other_share]:
            reserved[(n, i)] = None
    pool = [
        (float(scores[n].flatten()[i]), n, i)
        for n in names
        for i in range(scores[n].numel())
        if masks[n].flatten()[i] and (n, i) not in reserved
    ]
    pool.sort(reverse=True)
    chosen = set(reserved) | {(n, i) for _, n, i in pool[: k - len(reserved)]}
    return {
        n: torch.tensor([(n, i) in chosen for i in range(scores[n].numel())]).view(scores[n].shape)
        for n in names
    }


@pytest.mark.parametrize("floor", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("density", [0.02, 0.05, 0.2])
def test_select_with_floor_matches_brute_force(floor, density):
    g = torch.Generator().manual_seed(int(floor * 100 + density * 1000))
    shapes = {"conv": (8, 4, 3, 3), "fc1": (32, 72), "head": (10, 32)}
    # scores skewed so that the plain ranking starves the head: it scores 100x lower
    scores = {n: torch.rand(shape, generator=g, dtype=torch.float64) for n, shape in shapes.items()}
    scores["head"] = scores["head"] / 100
    masks = {n: torch.rand(shape, generator=g) < 0.9 for n, shape in shapes.items()}
    got = select(scores, masks, density, floor=floor)
    want = _brute_force(scores, masks, density, floor)
    for n in shapes:
        assert torch.equal(got[n], want[n]), n
    k = kept_count(density, sum(s.numel() for s in scores.values()))
    assert sum(int(m.sum()) for m in got.values()) == k
    assert bool(got["head"].any(1).all()), "an output unit kept no weight"
    plain = select(scores, masks, density)
    assert not bool(plain["head"].any(1).all()), "the case must starve the head without a floor"


def test_floor_zero_is_the_plain_selection():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(6, 5, generator=g), "b": torch.rand(4, 6, generator=g)}
    masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    plain = select(scores, masks, 0.3, generator=torch.Generator().manual_seed(1))
    zero = select(scores, masks, 0.3, generator=torch.Generator().manual_seed(1), floor=0.0)
    assert all(torch.equal(plain[n], zero[n]) for n in scores)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def test_robust_ntksap_keeps_every_output_unit_where_plain_starves_them():
    kw = dict(density=0.01, input_shape=(1, 8, 8), rounds=5, resamples=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        plain = ntksap.prune(_mlp(), "ntksap", **kw)
        robust = ntksap.prune(_mlp(), "ntksap", robust=True, **kw)
    head = "5.weight"
    assert int((~plain[head].any(1)).sum()) >= 1, "plain NTK-SAP should starve an output unit"
    assert head in starved_layers(plain)
    assert bool(robust[head].any(1).all())
    k = kept_count(0.01, 64 * 64 * 2 + 640)
    assert robust.num_kept == plain.num_kept == k
    share = k // 3  # every layer at least its balanced share
    assert all(int(m.sum()) >= share for m in robust.values())
    # the published pass starved the head, so the guarded pass made the mask
    guard = robust.metadata["guard"]
    assert guard["guarded"] and guard["starved"] == starved_layers(plain)
    assert robust.metadata["floor"] == 1.0 and plain.metadata["floor"] == 0.0
    assert robust.metadata["options"]["init"] == "none"  # theta fixed at the model's weights
    assert robust.metadata["options"]["robust"] is True
    assert plain.metadata["options"]["init"] == "reset" and "guard" not in plain.metadata


def test_robust_keeps_the_published_mask_where_it_starves_no_layer():
    """At 50 % no layer of the MLP is starved: robust NTK-SAP returns the published mask,
    draw for draw (same seed, 20 rounds x 5 draws), and says no guarded pass ran."""
    kw = dict(density=0.5, input_shape=(1, 8, 8), seed=4)
    plain = ntksap.prune(_mlp(), "ntksap", rounds=3, **kw)
    robust = ntksap.prune(_mlp(), "ntksap", robust=True, rounds=3, **kw)
    assert starved_layers(plain) == []
    assert all(torch.equal(robust[n], plain[n]) for n in plain)
    assert robust.metadata["guard"] == {"starved": [], "guarded": False}
    assert robust.metadata["options"] == {**plain.metadata["options"], "robust": True}
    assert robust.metadata["floor"] == 0.0 and robust.metadata["rounds"] == 3


def test_robust_defaults_and_given_values_win():
    """The published pass runs the paper's 20 x 5, the guarded one 100 x 1 with floor 1 and
    theta fixed; given rounds / resamples / init / floor win in both."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    kw = dict(input_shape=(1, 4, 4), seed=0)
    kept = ntksap.prune(net, "ntksap", robust=True, density=0.5, **kw)
    assert not kept.metadata["guard"]["guarded"]
    assert kept.metadata["rounds"] == 20 and kept.metadata["options"]["resamples"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        redone = ntksap.prune(net, "ntksap", robust=True, density=0.02, **kw)
    assert redone.metadata["guard"]["guarded"]
    assert redone.metadata["rounds"] == 100 and redone.metadata["options"]["resamples"] == 1
    assert redone.metadata["floor"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        given = ntksap.prune(
            net, "ntksap", robust=True, density=0.02, rounds=3, resamples=2, init="reset",
            floor=0.5, **kw,
        )  # fmt: skip
    assert given.metadata["guard"]["guarded"] and given.metadata["rounds"] == 3
    assert given.metadata["options"]["resamples"] == 2
    assert given.metadata["options"]["init"] == "reset" and given.metadata["floor"] == 0.5


def test_starved_layers_by_hand():
    t, f = True, False
    ok = {"a": torch.tensor([[t, f, f], [f, t, f]]), "out": torch.tensor([[t, f], [f, t]])}
    assert starved_layers(ok) == []
    few = {**ok, "a": torch.tensor([[t, f, f], [f, f, f]])}
    assert starved_layers(few) == ["a"]  # 1 weight for 2 units
    dead_class = {**ok, "out": torch.tensor([[t, t], [f, f]])}  # 2 weights, 2 units, one none
    assert starved_layers(dead_class) == ["out"]
    conv = {"c": torch.zeros(4, 2, 3, 3, dtype=torch.bool), "out": torch.ones(2, 4).bool()}
    conv["c"][:, 0, 0, :3] = True  # 12 weights for 4 output channels
    assert starved_layers(conv) == []
    conv["c"][:, 0, 0, :] = False
    conv["c"][0, 0, 0, :3] = True  # 3 weights for 4 channels
    assert starved_layers(conv) == ["c"]
    assert starved_layers({"bias": torch.zeros(3, dtype=torch.bool)}) == []  # 1-d: no rows


def test_floor_reaches_a_run_config(tmp_path):
    from ntksap.runs import prepare

    req = prepare(tmp_path / "r", dataset="digits", method="random", density=0.5, floor=1.0,
                  log=lambda _m: None)  # fmt: skip
    assert req.prune_settings["floor"] == 1.0
    req = prepare(tmp_path / "r", dataset="digits", method="random", density=0.5,
                  log=lambda _m: None)  # fmt: skip
    assert "floor" not in req.prune_settings  # other runs' configs and hashes unchanged
