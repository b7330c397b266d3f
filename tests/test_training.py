"""Training of pruned networks: zeros stay zero, bit-exact resume, DDP, presets, run folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ntksap
from ntksap import data, models
from ntksap.cli import main as cli
from ntksap.training import PRESETS, TrainConfig, fit, load_checkpoint, preset
from torchrun import torchrun

HERE = Path(__file__).parent


def _digits_setup(seed: int = 0, sparsity: float = 0.9):
    torch.manual_seed(seed)
    model = models.create("lenet5", num_classes=10, in_channels=1)
    masks = ntksap.prune(
        model, "ntksap", sparsity=sparsity, input_shape=(1, 8, 8), rounds=3, num_samples=50
    )
    ntksap.apply_masks(model, masks)
    train = data.create("digits", split="train")
    test = data.create("digits", split="test")
    tl = data.make_loader(train, batch_size=64, train=True, device="cpu", seed=seed)
    vl = data.make_loader(test, batch_size=256, train=False, device="cpu", seed=seed)
    return model, masks, tl, vl


# --- presets and config ---
def test_presets_are_the_papers_table():
    c10 = preset("cifar10-resnet20")
    assert (c10.epochs, c10.batch_size, c10.lr, c10.milestones) == (160, 128, 0.1, (80, 120))
    assert (c10.momentum, c10.nesterov, c10.weight_decay) == (0.9, False, 1e-4)
    c100 = preset("cifar100-vgg16")
    assert (c100.milestones, c100.nesterov, c100.weight_decay) == ((60, 120), True, 5e-4)
    tin = preset("tinyimagenet-resnet18")
    assert (tin.epochs, tin.batch_size, tin.lr, tin.milestones) == (200, 256, 0.2, (100, 150))
    inet = preset("imagenet-resnet")
    assert (inet.epochs, inet.milestones) == (90, (30, 60, 80))
    paper = ["cifar10-resnet20", "cifar100-vgg16", "tinyimagenet-resnet18", "imagenet-resnet"]
    assert [PRESETS[p]["model"] for p in paper] == ["resnet20", "vgg16_bn", "resnet18", "resnet50"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"epochs": 0}, "epochs must be an integer"),
        ({"schedule": "step"}, "valid choices: multistep, cosine"),
        ({"milestones": (120, 80)}, "milestones must be increasing"),
        ({"lr": -0.1}, "lr must be a positive"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov needs momentum"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig().with_overrides(**changes)


def test_unknown_override_names_the_valid_settings():
    with pytest.raises(TypeError, match="valid: amp, batch_size"):
        TrainConfig().with_overrides(epoch=3)


def test_lr_schedules():
    c = TrainConfig(epochs=160, milestones=(80, 120))
    assert [c.lr_factor(e) for e in (0, 79.9, 80, 119, 120, 159)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    w = TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine")
    assert w.lr_factor(1.0) == pytest.approx(0.5)
    assert w.lr_factor(2.0) == pytest.approx(1.0)
    assert w.lr_factor(6.0) == pytest.approx(0.5)
    assert w.lr_factor(10.0) == pytest.approx(0.0)


# --- 3. pruned weights exactly zero after training ---
def test_pruned_weights_exactly_zero_after_training(tmp_path):
    model, masks, tl, vl = _digits_setup()
    before = {n: model.get_submodule(n.rpartition(".")[0]).weight.detach().clone() for n in masks}
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4)
    summary = fit(model, tl, vl, cfg, out_dir=tmp_path, log=lambda _m: None)
    for n, m in masks.items():
        mod = model.get_submodule(n.rpartition(".")[0])
        assert (mod.weight[~m] == 0).all(), n  # effective weights
        assert (mod.parametrizations.weight.original[~m] == 0).all(), n  # stored tensor too
        assert not torch.equal(mod.weight[m], before[n][m]), n  # the kept ones trained
    assert summary["density"] == pytest.approx(masks.density)
    # training learns: far above chance (10 %). One seed's 2-epoch top-1 with a 90 %-sparse
    # NTK-SAP mask varies from ~20 % to ~80 % with the draws, so no tighter bound here.
    assert summary["final_top1"] > 15


# --- 4. resume is bit-exact ---
class _Stop(Exception):
    pass


def test_resume_after_a_kill_ends_bit_identical(tmp_path):
    cfg = TrainConfig(
        epochs=3, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(2,)
    )
    model_a, _, tl, vl = _digits_setup()
    fit(model_a, tl, vl, cfg, out_dir=tmp_path / "a", log=lambda _m: None)

    model_b, _, tl, vl = _digits_setup()

    def kill_after_first(row):
        if row["epoch"] == 1:
            raise _Stop

    with pytest.raises(_Stop):
        fit(
            model_b,
            tl,
            vl,
            cfg,
            out_dir=tmp_path / "b",
            on_epoch_end=kill_after_first,
            log=lambda _m: None,
        )
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    torch.manual_seed(12345)  # whatever the process did since must not matter
    model_c, _, tl, vl = _digits_setup()  # a fresh process: same init, masks, loaders
    fit(model_c, tl, vl, cfg, out_dir=tmp_path / "b", resume=True, log=lambda _m: None)
    sa, sc = model_a.state_dict(), model_c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    ref = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["top1"] for r in lines] == [r["top1"] for r in ref]


def test_resume_refuses_a_different_config(tmp_path):
    model, _, tl, vl = _digits_setup()
    fit(model, tl, vl, TrainConfig(epochs=1, batch_size=64), out_dir=tmp_path, log=lambda _m: None)
    model, _, tl, vl = _digits_setup()
    with pytest.raises(ValueError, match="different config"):
        fit(model, tl, vl, TrainConfig(epochs=2, batch_size=64, lr=0.5), out_dir=tmp_path,
            resume=True, log=lambda _m: None)  # fmt: skip


def test_checkpoint_is_weights_only_and_complete(tmp_path):
    model, masks, tl, vl = _digits_setup()
    fit(model, tl, vl, TrainConfig(epochs=1, batch_size=64), out_dir=tmp_path, log=lambda _m: None)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "masks", "rng", "config", "epoch"} <= set(
        state
    )
    assert ntksap.Masks(state["masks"]) == masks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    for key in ("train_loss", "train_acc", "test_loss", "top1", "top5", "lr", "seconds",
                "images_per_s", "density"):  # fmt: skip
        assert key in row, key


# --- CLI: run and train into run folders ---
def test_cli_run_writes_a_complete_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli(["run", "--dataset", "digits", "--model", "lenet5", "--method", "ntksap",
              "--sparsity", "0.9", "--rounds", "2", "--num-samples", "20", "--epochs", "2",
              "--batch-size", "64", "--lr", "0.05", "--out", str(out)])  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in out.iterdir() if p.name != ".ntksap.lock")
    assert names == ["checkpoint.pt", "config.json", "layers.txt", "mask.safetensors",
                     "metrics.jsonl", "result.json"]  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["density"] == pytest.approx(0.1, abs=1e-4)
    assert result["final_top1"] is not None and result["flops_remaining"] < result["flops_dense"]
    config = json.loads((out / "config.json").read_text())
    assert config["prune"]["method"] == "ntksap" and config["train"]["epochs"] == 2
    # the folder is not overwritten by accident
    rc = cli(["run", "--dataset", "digits", "--model", "lenet5", "--method", "random",
              "--sparsity", "0.5", "--epochs", "1", "--out", str(out)])  # fmt: skip
    assert rc == 2 and "already holds a run" in capsys.readouterr().err
    assert json.loads((out / "result.json").read_text()) == result


def test_cli_train_with_a_mask_file_and_resume(tmp_path, capsys):
    mask = tmp_path / "m.safetensors"
    assert cli(["prune", "--model", "lenet5", "--input-shape", "1,8,8", "--method", "magnitude",
                "--sparsity", "0.8", "--out", str(mask)]) == 0  # fmt: skip
    out = tmp_path / "t"
    args = ["train", "--dataset", "digits", "--model", "lenet5", "--mask", str(mask),
            "--epochs", "1", "--batch-size", "128", "--out", str(out)]  # fmt: skip
    assert cli(args) == 0
    assert cli([*args[:-4], "--epochs", "2", "--out", str(out), "--resume"]) == 2  # other config
    assert "differ" in capsys.readouterr().err
    assert cli(["train", "--dataset", "digits", "--model", "resnet20", "--mask", str(mask),
                "--epochs", "1", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "made for model 'lenet5'" in capsys.readouterr().err
    # --resume of a folder where nothing was saved yet starts the run (what a sweep needs)
    assert cli(["train", "--dataset", "digits", "--model", "lenet5", "--epochs", "1",
                "--out", str(tmp_path / "y"), "--resume"]) == 0  # fmt: skip
    assert "nothing saved in" in capsys.readouterr().out


# --- 5. DDP on CPU ---
def test_ddp_two_ranks_match_one_process_with_the_doubled_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    worker = str(HERE / "ddp_worker.py")
    subprocess.run(
        [sys.executable, worker, str(tmp_path / "one")], check=True, env=env, timeout=300
    )
    proc = torchrun([worker, str(tmp_path / "two")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "two" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "two" / "rank1.pt", weights_only=True)
    assert (one["world"], r0["world"], r1["world"]) == (1, 2, 2)
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
        assert torch.equal(r0["masks"][k], one["masks"][k]), k
    for k, v in one["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # ranks in lock-step
        assert torch.allclose(r0["state"][k], v, atol=1e-5, rtol=1e-5), k


def test_torchrun_ntksap_run_writes_once_from_rank_zero(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    out = tmp_path / "run"
    proc = torchrun(
        ["-m", "ntksap", "run", "--dataset", "digits", "--model", "lenet5", "--method", "ntksap",
         "--sparsity", "0.9", "--rounds", "2", "--num-samples", "20", "--epochs", "2",
         "--batch-size", "64", "--out", str(out), "--no-progress"],
        env=env, reset=lambda: shutil.rmtree(out, ignore_errors=True),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.count("done: final top-1") == 1  # only rank 0 reports
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["density"] == pytest.approx(0.1, abs=1e-4)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # the pruning itself was split across both processes (distributed scoring)
    assert ntksap.Masks.load(out / "mask.safetensors").metadata["processes"] == 2
    assert "pruning lenet5 with ntksap to density 0.1 on 2 processes" in proc.stdout


def test_sigkilled_cli_run_resumes_bit_identical(tmp_path):
    """A real kill (SIGKILL mid-training) then --resume ends with the uninterrupted weights."""
    import signal
    import time

    common = ["train", "--dataset", "digits", "--model", "lenet5", "--epochs", "12",
              "--batch-size", "64", "--no-progress"]  # fmt: skip
    assert cli([*common, "--out", str(tmp_path / "ref")]) == 0
    killed = tmp_path / "killed"
    # the killed process computes with as many threads as this one (the reference and the
    # resumed part run here): bit-identical results need the same reduction order
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ntksap", *common, "--out", str(killed)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ckpt = killed / "checkpoint.pt"
        if ckpt.exists() and (killed / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert 1 <= done < 12, "the kill must land mid-training"
    assert cli([*common, "--out", str(killed), "--resume"]) == 0
    ref = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    got = load_checkpoint(killed / "checkpoint.pt")
    assert got["epoch"] == 12
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k
    epochs = [json.loads(x)["epoch"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))
