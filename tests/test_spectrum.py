"""Spectra, their distance, and NTK-SAP's finite-difference trace against an explicit Jacobian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import ntksap
from ntksap.analysis.spectrum import finite_difference_trace, spectrum, spectrum_distance


def test_spectrum_of_a_random_psd_matrix_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 12, generator=g, dtype=torch.float64)
    k = a @ a.T  # rank 12
    s = spectrum(k)
    ref = np.sort(np.linalg.eigvalsh(k.numpy()))[::-1]
    assert np.allclose(s.eigenvalues, ref, atol=1e-10)
    assert s.trace == pytest.approx(float(k.trace()))
    assert s.largest == pytest.approx(ref[0])
    assert math.isinf(s.condition_number) or s.condition_number > 1e10  # rank-deficient
    assert 1.0 <= s.effective_rank <= 12.0 + 1e-9


def test_spectrum_summary_values():
    s = spectrum(torch.eye(5) * 3)
    assert s.condition_number == pytest.approx(1.0)
    assert s.effective_rank == pytest.approx(5.0)
    with pytest.raises(ValueError, match="not symmetric"):
        spectrum(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        spectrum(torch.ones(2, 3))


def test_spectrum_distance_in_decades():
    a = spectrum(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    b = spectrum(torch.diag(torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)))
    assert spectrum_distance(a, a) == 0.0
    assert spectrum_distance(a, b) == pytest.approx(1.0)
    assert spectrum_distance(a, b, top_k=1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_k"):
        spectrum_distance(a, b, top_k=4)
    with pytest.raises(ValueError, match="differ in length"):
        spectrum_distance(a, np.array([1.0, 2.0]))


def _explicit_trace(model, x, masks):
    """||J diag(m)||_F^2 with J = d logits / d (theta * m), by per-output autograd.grad."""
    model = model.double().eval()
    params = ntksap.prunable_parameters(model)
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    out = model(x.double())  # (N, K)
    total = 0.0
    for i in range(out.shape[0]):
        for k in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, k], list(params.values()), retain_graph=True)
            total += sum(float((g * masks[n]).pow(2).sum()) for n, g in zip(params, grads))
    return total


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_finite_difference_trace_tracks_the_exact_trace(density):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    masks = ntksap.prune(net, "random", density=density)
    est, err = finite_difference_trace(net, x, masks, epsilon=1e-3, draws=400, seed=0)
    exact = _explicit_trace(net, x, masks)
    # unbiased to first order in eps: within 4 standard errors (+ a hair of curvature)
    assert abs(est - exact) < 4 * err + 1e-3 * exact, (est, err, exact)
    assert err < 0.1 * exact


def test_finite_difference_trace_leaves_the_model_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    finite_difference_trace(net, torch.randn(5, 4), draws=2)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_cli_spectrum_table_plot_and_json(tmp_path, capsys):
    import json

    from ntksap.cli import main

    out = tmp_path / "spec"
    rc = main(["spectrum", "--model", "lenet5", "--num-classes", "4", "--input-shape", "1,8,8",
               "--sparsity", "0.8", "--methods", "random,synflow", "--samples", "6",
               "--fd-draws", "3", "--out-dir", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "closest to dense:" in text and "dist. to dense" in text
    assert (out / "spectrum.png").stat().st_size > 10_000
    report = json.loads((out / "spectrum.json").read_text())
    rows = {r["network"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "random", "synflow"]
    assert rows["dense"]["distance_to_dense"] == 0.0
    assert rows["random"]["density"] == pytest.approx(0.2, abs=1e-3)
    for name, eig in report["eigenvalues"].items():
        assert len(eig) == 6 * 4  # N x K
        assert sum(eig) == pytest.approx(rows[name]["trace"], rel=1e-9)
    # the same from mask files
    masks = ntksap.prune(ntksap.models.create("lenet5", num_classes=4, in_channels=1),
                         "magnitude", sparsity=0.8)  # fmt: skip
    path = masks.save(tmp_path / "mag.safetensors")
    rc = main(["spectrum", "--model", "lenet5", "--num-classes", "4", "--input-shape", "1,8,8",
               "--masks", str(path), "--samples", "6", "--fd-draws", "2",
               "--out-dir", str(tmp_path / "m")])  # fmt: skip
    assert rc == 0
    rows = json.loads((tmp_path / "m" / "spectrum.json").read_text())["rows"]
    assert [r["network"] for r in rows] == ["dense", "mag"]
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit code 2
        main(["spectrum", "--model", "lenet5", "--input-shape", "1,8,8", "--methods", "nope"])
    assert exc.value.code == 2
    assert "valid choices: grasp, itersnip" in capsys.readouterr().err


def test_calibrate_batchnorm_uses_the_pruned_networks_batch_statistics():
    from ntksap.analysis.spectrum import calibrate_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    x = torch.randn(7, 2, 6, 6)
    masks = ntksap.prune(net, "random", density=0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cal = calibrate_batchnorm(net, x, masks)
    h = torch.nn.functional.conv2d(
        x, net[0].weight * masks["0.weight"], net[0].bias
    )  # (7, 3, 4, 4)
    assert torch.allclose(cal[1].running_mean, h.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(cal[1].running_var, h.var(dim=(0, 2, 3), correction=1), atol=1e-5)
    assert cal[1].momentum == net[1].momentum and not cal.training
    assert (cal[0].weight[~masks["0.weight"]] == 0).all()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # the original is untouched


def test_cli_spectrum_labels_data_methods_and_overwrite(tmp_path, capsys):
    """Two mask files named alike give two rows; data methods score real (or declared
    synthetic) data; an out-dir's files are never replaced without --overwrite."""
    import json

    from ntksap.cli import main

    net = ntksap.models.create("lenet5", num_classes=4, in_channels=1)
    paths = []
    for sub, method in (("a", "magnitude"), ("b", "random")):
        paths.append(
            ntksap.prune(net, method, sparsity=0.8).save(tmp_path / sub / "mask.safetensors")
        )
    base = ["spectrum", "--model", "lenet5", "--num-classes", "4", "--input-shape", "1,8,8",
            "--samples", "4", "--fd-draws", "2"]  # fmt: skip
    out = tmp_path / "m"
    assert main([*base, "--masks", *map(str, paths), "--out-dir", str(out)]) == 0
    rows = json.loads((out / "spectrum.json").read_text())["rows"]
    assert [r["network"] for r in rows] == ["dense", "a/mask", "b/mask"]
    assert rows[1]["density"] == rows[2]["density"] and rows[1]["trace"] != rows[2]["trace"]
    before = (out / "spectrum.json").read_bytes()
    assert main([*base, "--masks", str(paths[0]), "--out-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "spectrum.json").read_bytes() == before
    assert main([*base, "--masks", str(paths[0]), "--out-dir", str(out), "--overwrite"]) == 0
    # a data method with --dataset synthetic: said in the output and in the JSON
    syn = tmp_path / "s"
    argv = ["spectrum", "--model", "lenet5", "--samples", "20", "--fd-draws", "2",
            "--methods", "snip", "--dataset", "synthetic", "--input-shape", "1,8,8",
            "--out-dir", str(syn)]  # fmt: skip
    assert main(argv) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert "SYNTHETIC" in json.loads((syn / "spectrum.json").read_text())["inputs"]


def test_cli_spectrum_passes_method_settings(tmp_path, capsys):
    """--set reaches `prune` (rounds, method options; all methods or one), checked first."""
    import json

    from ntksap.cli import main

    base = ["spectrum", "--model", "lenet5", "--num-classes", "4", "--input-shape", "1,8,8",
            "--sparsity", "0.8", "--samples", "4", "--fd-draws", "1"]  # fmt: skip
    out = tmp_path / "s"
    sets = ["--set", "rounds=2", "--set", "ntksap.resamples=1", "--set", "num-samples=8"]
    rc = main([*base, "--methods", "random,ntksap", *sets, "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "spectrum.json").read_text())
    assert report["settings"] == {
        "random": {"rounds": 2},
        "ntksap": {"rounds": 2, "resamples": 1, "num_samples": 8},
    }
    for extra, message in [
        (["--set", "bogus=1"], "'bogus' is not a setting of random, ntksap; valid: "),
        (["--set", "resamples=0"], "resamples"),
        (["--set", "snip.rounds=2"], "'snip' is not one of --methods"),
        (["--set", "rounds=0"], "rounds"),
        (["--set", "ntksap.inputs=data"], "ntksap need(s) real data: pass --dataset"),
    ]:
        rc = main([*base, "--methods", "random,ntksap", *extra, "--out-dir", str(tmp_path / "x")])
        assert rc == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not (tmp_path / "x").exists()
