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
from ntksap.pruning import LayerCollapseWarning, floor_reserve, kept_count, select
from ntksap.scoring.ntksap import rank_within


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
    assert bool(robust[head].any(1).all())
    k = kept_count(0.01, 64 * 64 * 2 + 640)
    assert robust.num_kept == plain.num_kept == k
    share = k // 3  # every layer at least its balanced share
    assert all(int(m.sum()) >= share for m in robust.values())
    assert robust.metadata["floor"] == 1.0 and plain.metadata["floor"] == 0.0
    # counts from the published (re-drawn theta) score, order inside a tensor from theta
    assert robust.metadata["options"]["within"] == "theta"
    assert robust.metadata["options"]["init"] == plain.metadata["options"]["init"] == "reset"
    assert plain.metadata["options"]["within"] == "score"


def test_rank_within_keeps_the_counts_of_one_score_and_the_order_of_the_other():
    """A global top-k over rank_within's scores keeps, per tensor, as many weights as a
    global top-k over `counts_by` and, inside the tensor, the best by `order_by`."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (7, 5), "b": (4, 9), "c": (10,)}
    a = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    b = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    m = {n: torch.rand(s, generator=g) < 0.8 for n, s in shapes.items()}
    for n in shapes:  # pruned entries score 0, as every scorer returns them
        a[n] *= m[n]
        b[n] *= m[n]
    got = {n: rank_within(a[n], b[n], m[n]) for n in shapes}
    live = sum(int(v.sum()) for v in m.values())
    for k in range(1, live + 1):
        by_a = torch.cat([v[m[n]] for n, v in a.items()]).sort(descending=True).values[k - 1]
        by_got = torch.cat([v[m[n]] for n, v in got.items()]).sort(descending=True).values[k - 1]
        for n in shapes:
            count = int((a[n][m[n]] >= by_a).sum())
            assert int((got[n][m[n]] >= by_got).sum()) == count, (k, n)
            if count:  # inside the tensor: the `count` best by b
                best_b = b[n][m[n]].sort(descending=True).values[count - 1]
                kept = (got[n] >= by_got) & m[n]
                assert bool((b[n][kept] >= best_b).all()), (k, n)
        assert all(bool((got[n][~m[n]] == 0).all()) for n in shapes)


def test_within_theta_counts_by_the_redrawn_score_and_orders_by_the_fixed_one(monkeypatch):
    """One round with stand-in gradients: A for re-drawn theta (the published score),
    B for theta fixed (init="none"). The mask must keep, per tensor, the count a global
    top-k of |A| gives and, inside it, the best by |B|; with within="score", |A| alone."""
    import ntksap.scoring.ntksap as mod

    net = _mlp()
    names = [n for n, p in net.named_parameters() if p.dim() > 1]
    g = torch.Generator().manual_seed(7)
    shapes = {n: p.shape for n, p in net.named_parameters() if n in names}
    fake = {
        which: {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        for which in ("A", "B")
    }
    calls: list[str | None] = []

    def stand_in(ctx, init=None):
        calls.append(init)
        return {n: v.clone() for n, v in fake["B" if init == "none" else "A"].items()}

    monkeypatch.setattr(mod, "ntksap_round_gradients", stand_in)
    k = kept_count(0.1, sum(math.prod(s) for s in shapes.values()))
    kw = dict(density=0.1, input_shape=(1, 8, 8), rounds=1, resamples=1, seed=0)
    got = ntksap.prune(net, "ntksap", within="theta", **kw)
    assert calls == ["none", None]  # theta fixed first, while the copy holds the weights
    threshold = torch.cat([v.abs().flatten() for v in fake["A"].values()]).topk(k).values[-1]
    for n in names:
        count = int((fake["A"][n].abs() >= threshold).sum())
        assert int(got[n].sum()) == count, n
        best = fake["B"][n].abs().flatten().topk(count).indices
        want = torch.zeros(shapes[n].numel(), dtype=torch.bool)
        want[best] = True
        assert torch.equal(got[n].flatten(), want), n
    plain = ntksap.prune(net, "ntksap", within="score", **kw)
    for n in names:
        assert torch.equal(plain[n], fake["A"][n].abs() >= threshold), n


def test_robust_defaults_are_100_rounds_of_one_draw_and_given_values_win():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    kw = dict(density=0.2, input_shape=(1, 4, 4), seed=0)
    robust = ntksap.prune(net, "ntksap", robust=True, **kw)
    assert robust.metadata["rounds"] == 100 and robust.metadata["options"]["resamples"] == 1
    plain = ntksap.prune(net, "ntksap", **kw)
    assert plain.metadata["rounds"] == 20 and plain.metadata["options"]["resamples"] == 5
    given = ntksap.prune(net, "ntksap", robust=True, rounds=3, resamples=2, **kw)
    assert given.metadata["rounds"] == 3 and given.metadata["options"]["resamples"] == 2


def test_robust_keeps_an_explicit_init_and_an_explicit_floor():
    kw = dict(density=0.05, input_shape=(1, 8, 8), rounds=2, resamples=1, seed=0, robust=True)
    m = ntksap.prune(_mlp(), "ntksap", init="kaiming", within="score", floor=0.5, **kw)
    assert m.metadata["options"]["init"] == "kaiming" and m.metadata["floor"] == 0.5
    assert m.metadata["options"]["within"] == "score"
    # a floor on any method, and none under scope="local" by default
    assert ntksap.prune(_mlp(), "magnitude", density=0.05, floor=1.0).metadata["floor"] == 1.0
    local = ntksap.prune(_mlp(), "ntksap", scope="local", **kw)
    assert local.metadata["floor"] == 0.0


def test_floor_reaches_a_run_config(tmp_path):
    from ntksap.runs import prepare

    req = prepare(tmp_path / "r", dataset="digits", method="random", density=0.5, floor=1.0,
                  log=lambda _m: None)  # fmt: skip
    assert req.prune_settings["floor"] == 1.0
    req = prepare(tmp_path / "r", dataset="digits", method="random", density=0.5,
                  log=lambda _m: None)  # fmt: skip
    assert "floor" not in req.prune_settings  # other runs' configs and hashes unchanged
