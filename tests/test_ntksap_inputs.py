"""NTK-SAP's `inputs` option: the appendix ablation "noise vs real inputs".

inputs="data" replaces every noise batch z by real images from `data`; each test checks it
against a computation written out here, or against the published (noise) method.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from conftest import INPUT_SHAPE, class_balanced_batch, small_convnet
from ntksap.cli import main
from ntksap.runs import CONFIG_FILE, MASK_FILE
from ntksap.scoring.ntksap import draw_seed

MLP_IN = 6


def _mlp() -> nn.Sequential:
    """Two Linear layers, no BatchNorm: the finite difference is easy to write by hand."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(MLP_IN, 5), nn.ReLU(), nn.Linear(5, 3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of unequal size (5 images in all), so the stream crosses a batch edge."""
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(3, MLP_IN, generator=g), torch.tensor([0, 1, 2])),
        (torch.randn(2, MLP_IN, generator=g), torch.tensor([1, 0])),
    ]


def _mask(net: nn.Module, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) < 0.7
        for n, p in ntksap.prunable_parameters(net).items()
    }


# --- (1) one round equals |dR/dm| written out with autograd ----------------------------------
def test_data_inputs_score_equals_direct_autograd_on_real_images() -> None:
    """num_samples 7 from 5 images, batches of 3: both resamples cycle through the data.

    The draws are reproduced by the scorer's protocol: per batch k a generator seeded by
    draw_seed(round seed, k), from which a seed for the Linears' reset_parameters (theta),
    then delta ~ N(0, eps^2) per prunable tensor; no z is drawn.
    """
    net, batches = _mlp(), _data()
    cur = _mask(net)
    eps, resamples, num_samples, batch_size, seed = 0.03, 2, 7, 3, 4
    got = ntksap.compute_scores(
        net, "ntksap", masks=cur, data=batches, seed=seed, epsilon=eps, resamples=resamples,
        num_samples=num_samples, batch_size=batch_size, init="reset", inputs="data",
    )  # fmt: skip

    images = torch.cat([x for x, _ in batches])  # 5 images, read as a cyclic stream
    stream = [images[i % len(images)] for i in range(resamples * num_samples)]
    torch.manual_seed(seed)
    base = int(torch.randint(0, (1 << 63) - 1, ()))
    tmp = copy.deepcopy(net)
    names = ["0.weight", "2.weight"]
    m = {n: cur[n].float().requires_grad_(True) for n in names}
    total = {n: torch.zeros_like(v) for n, v in m.items()}
    position, k = 0, 0
    for _ in range(resamples):
        for bs in (3, 3, 1):  # 7 images in batches of 3
            gen = torch.Generator().manual_seed(draw_seed(base, k))
            k += 1
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(0, (1 << 63) - 1, (), generator=gen)))
                tmp[0].reset_parameters()
                tmp[2].reset_parameters()
            theta = {n: tmp.get_parameter(n).detach().clone() for n in names}
            delta = {n: torch.randn(theta[n].shape, generator=gen) * eps for n in names}
            x = torch.stack(stream[position : position + bs])
            position += bs

            def f(w: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                h = F.relu(F.linear(x, w["0.weight"], tmp[0].bias))
                return F.linear(h, w["2.weight"], tmp[2].bias)

            r = (
                f({n: theta[n] * m[n] for n in names})
                - f({n: (theta[n] + delta[n]) * m[n] for n in names})
            ).pow(2).sum()  # fmt: skip
            for n, g in zip(names, torch.autograd.grad(r, [m[n] for n in names])):
                total[n] += g
    assert set(got) == set(names)
    for n in names:
        expected = total[n].abs() * cur[n]
        assert torch.allclose(got[n], expected, rtol=1e-5, atol=1e-7 * float(expected.max())), n
        assert (got[n][~cur[n]] == 0).all()


def test_data_inputs_ignore_targets_and_differ_from_noise() -> None:
    net, batches = _mlp(), _data()
    kw = dict(seed=1, num_samples=5, batch_size=5, resamples=1, init="none")
    real = ntksap.compute_scores(net, "ntksap", data=batches, inputs="data", **kw)
    relabelled = [(x, torch.zeros_like(y)) for x, y in batches]
    again = ntksap.compute_scores(net, "ntksap", data=relabelled, inputs="data", **kw)
    noise = ntksap.compute_scores(net, "ntksap", data=batches, **kw)
    assert all(torch.equal(real[n], again[n]) for n in real)
    assert not all(torch.equal(real[n], noise[n]) for n in real)


def test_data_inputs_with_batchnorm_prune_to_the_exact_count() -> None:
    """The BN rule is unchanged: statistics of the clean network on each real batch."""
    net = small_convnet()
    masks = ntksap.prune(
        net, "ntksap", density=0.3, data=class_balanced_batch(2), rounds=2, num_samples=8,
        batch_size=4, inputs="data",
    )  # fmt: skip
    assert masks.num_kept == round(0.3 * masks.num_total)
    assert masks.metadata["options"]["inputs"] == "data"


# --- (2) the missing-data error ---------------------------------------------------------------
def test_data_inputs_without_data_is_a_clear_error_before_any_work() -> None:
    net = _mlp()
    with pytest.raises(ValueError, match=r"inputs='data'.*pass data=.*inputs='noise'"):
        ntksap.prune(net, "ntksap", density=0.5, input_shape=(MLP_IN,), inputs="data")
    with pytest.raises(ValueError, match=r"inputs='data'.*pass data="):
        ntksap.compute_scores(net, "ntksap", input_shape=(MLP_IN,), inputs="data")
    with pytest.raises(ValueError, match="must be one of noise, data"):
        ntksap.prune(net, "ntksap", density=0.5, input_shape=(MLP_IN,), inputs="images")


def test_needs_data_for_follows_the_inputs_option() -> None:
    meth = ntksap.get_method("ntksap")
    assert not meth.needs_data and not meth.needs_data_for()
    assert not meth.needs_data_for({"inputs": "noise", "resamples": 2})
    assert meth.needs_data_for({"inputs": "data"})
    assert ntksap.get_method("snip").needs_data_for({})
    assert not ntksap.get_method("synflow").needs_data_for({})


# --- (3) ntksap.run and the CLI feed real batches and record the option ----------------------
def test_run_with_data_inputs_finishes_and_records_the_option(tmp_path: Path) -> None:
    """Without real batches the prune inside the run would raise the missing-data error."""
    out = tmp_path / "r"
    result = ntksap.run(
        out, dataset="digits", method="ntksap", density=0.5, rounds=2, train={"epochs": 1},
        options={"inputs": "data", "resamples": 1}, log=lambda _m: None,
    )  # fmt: skip
    assert result["status"] == "finished"
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["prune"]["options"] == {"inputs": "data", "resamples": 1}
    assert ntksap.Masks.load(out / MASK_FILE).metadata["options"]["inputs"] == "data"


def test_cli_run_and_list_have_the_inputs_flag(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    argv = [
        "run", "--dataset", "digits", "--model", "lenet5", "--epochs", "1", "--no-progress",
        "--method", "ntksap", "--sparsity", "0.5", "--rounds", "1", "--resamples", "1",
        "--inputs", "data", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / CONFIG_FILE).read_text())["prune"]["options"]["inputs"] == "data"
    capsys.readouterr()
    assert main(["list"]) == 0
    assert "--inputs {noise,data} (default noise)" in capsys.readouterr().out


# --- (4) the default is the published method, unchanged ---------------------------------------
def test_noise_default_is_unchanged() -> None:
    net = small_convnet()
    kw = dict(input_shape=INPUT_SHAPE, seed=3, num_samples=6, batch_size=4, resamples=2)
    plain = ntksap.compute_scores(net, "ntksap", **kw)
    noise = ntksap.compute_scores(net, "ntksap", inputs="noise", **kw)
    assert all(torch.equal(plain[n], noise[n]) for n in plain)
    # data given to the noise method only sets the input shape: same scores
    with_data = ntksap.compute_scores(net, "ntksap", data=class_balanced_batch(), **kw)
    assert all(torch.equal(plain[n], with_data[n]) for n in plain)
    a = ntksap.prune(net, "ntksap", density=0.2, rounds=2, **kw)
    b = ntksap.prune(net, "ntksap", density=0.2, rounds=2, inputs="noise", **kw)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert b.metadata["options"]["inputs"] == "noise"
