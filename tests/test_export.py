"""`ntksap.export` and `ntksap export`: ONNX (and sparse) files equal to the masked model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import ntksap
from conftest import run_cli
from ntksap import models
from ntksap.attach import apply_masks
from ntksap.export import ExportCheckError, export, load_source
from ntksap.masks import Masks

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def masked(model: nn.Module, masks: Masks, x: torch.Tensor) -> torch.Tensor:
    net = apply_masks(copy.deepcopy(model), masks).eval()
    with torch.no_grad():
        return net(x)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-5


def zero_count(path: Path) -> int:
    """Exact zeros in the ONNX file's weight tensors (two or more dimensions)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(
        int((numpy_helper.to_array(t) == 0).sum())
        for t in model.graph.initializer
        if len(t.dims) >= 2
    )


def trained_like(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
    return model


def random_masks(model: nn.Module, density: float, seed: int = 0) -> Masks:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in ntksap.prunable_parameters(model).items():
        m = torch.rand(p.shape, generator=g) < density
        if p.dim() >= 2:
            m[torch.rand(p.shape[0], generator=g) < 0.3] = False  # dead channels
        out[name] = m
    return Masks(out)


# ---------------------------------------------------------------------------------------
# The library
# ---------------------------------------------------------------------------------------
def test_onnx_round_trip_of_a_compacted_zoo_model(tmp_path) -> None:
    torch.manual_seed(0)
    net = trained_like(models.create("resnet20"))
    masks = random_masks(net, 0.2)
    path = tmp_path / "r20.onnx"
    result = export(net, masks, path, example_input=torch.zeros(1, 3, 16, 16))
    assert result.path == path and path.is_file()
    assert result.params_after < result.params_before
    assert result.flops_after < result.flops_before
    x = torch.randn(3, 3, 16, 16)  # another batch size: the batch dimension is dynamic
    assert_close(run_onnx(path, x), masked(net, masks, x))
    # pruned weights are exact zeros in the file (BatchNorm folded in keeps them zero)
    _, small_masks, _ = ntksap.compact.compact_with_masks(net, masks, x)
    assert zero_count(path) >= small_masks.num_total - small_masks.num_kept
    assert "wrote" in str(result) and "onnxruntime" in str(result)


class Branchy(nn.Module):
    """Not a zoo model: residual addition and a flatten into Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 12, 3, padding=1)
        self.fc1 = nn.Linear(12 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.a(x)))
        y = y + torch.relu(self.b(y))
        z = nn.functional.adaptive_avg_pool2d(y, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(z)))


def test_onnx_round_trip_of_an_arbitrary_model(tmp_path) -> None:
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    net = trained_like(Branchy())
    masks = random_masks(net, 0.4, seed=2)
    path = tmp_path / "branchy.onnx"
    result = export(net, masks, path, example_input=torch.zeros(1, 3, 8, 8))
    assert result.params_after < result.params_before
    x = torch.randn(4, 3, 8, 8)
    assert_close(run_onnx(path, x), masked(net, masks, x))


def test_lenet5_needs_the_dynamo_exporter_and_gets_it(tmp_path) -> None:
    # AdaptiveAvgPool2d((5, 5)) of a 7x7 map: the TorchScript exporter refuses it
    torch.manual_seed(0)
    net = models.create("lenet5")
    masks = random_masks(net, 0.3)
    path = tmp_path / "lenet.onnx"
    export(net, masks, path, example_input=torch.zeros(1, 1, 28, 28), batch_size=2)
    x = torch.randn(2, 1, 28, 28)
    assert_close(run_onnx(path, x), masked(net, masks, x))


def test_no_compact_exports_the_masked_model_as_it_is(tmp_path) -> None:
    torch.manual_seed(0)
    net = models.create("mlp", input_size=8)
    masks = random_masks(net, 0.2)
    result = export(net, masks, tmp_path / "m.onnx", compact=False)
    assert result.params_after == result.params_before
    assert zero_count(tmp_path / "m.onnx") >= masks.num_total - masks.num_kept
    x = torch.randn(2, 1, 8, 8)
    assert_close(run_onnx(tmp_path / "m.onnx", x), masked(net, masks, x))


def test_a_mismatching_export_fails_loudly_and_is_removed(tmp_path, monkeypatch) -> None:
    from ntksap import export as exporting

    torch.manual_seed(0)
    net = models.create("mlp", input_size=8)
    other = models.create("mlp", input_size=8)  # other weights: the file will not match
    real = exporting._onnx_bytes
    monkeypatch.setattr(exporting, "_onnx_bytes", lambda model, x, opset: real(other, x, opset))
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportCheckError, match="differs from torch"):
        export(net, random_masks(net, 0.5), path, compact=False)
    assert not path.exists()


def test_existing_file_is_never_replaced_silently(tmp_path) -> None:
    net = models.create("mlp", input_size=8)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        export(net, random_masks(net, 0.5), path)
    assert path.read_bytes() == b"keep me"
    export(net, random_masks(net, 0.5), path, overwrite=True)
    assert path.read_bytes() != b"keep me"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "tflite"}, "unknown export format 'tflite'; choose one of onnx, sparse"),
        ({"path_name": "m.txt"}, "written to a .onnx file"),
        ({"opset": 11}, "opset must be an int >= 17"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, match) -> None:
    net = models.create("mlp", input_size=8)
    path = tmp_path / kwargs.pop("path_name", "m.onnx")
    with pytest.raises(ValueError, match=match):
        export(net, random_masks(net, 0.5), path, **kwargs)
    assert not path.exists()


def test_sparse_format_round_trip(tmp_path) -> None:
    sparse = pytest.importorskip("ntksap.sparse")
    torch.manual_seed(0)
    net = trained_like(models.create("resnet20"))
    masks = random_masks(net, 0.1)
    path = tmp_path / "r20.safetensors"
    export(net, masks, path, "sparse", example_input=torch.zeros(1, 3, 16, 16))
    back = sparse.load(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(back(x), masked(net, masks, x))


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------
MLP_PRUNE = ["prune", "--model", "mlp", "--input-shape", "1,8,8", "--method", "magnitude"]


@pytest.fixture
def mask_file(tmp_path, capsys) -> Path:
    path = tmp_path / "mlp.safetensors"
    code, _, err = run_cli(
        [*MLP_PRUNE, "--sparsity", "0.95", "--out", path, "--no-progress"], capsys
    )
    assert code == 0, err
    return path


def test_cli_exports_a_mask_file(mask_file, capsys) -> None:
    code, out, err = run_cli(["export", mask_file], capsys)
    assert code == 0, err
    onnx_path = mask_file.with_suffix(".onnx")
    assert f"wrote {onnx_path}" in out and "params" in out and "FLOPs" in out
    src = load_source(mask_file)  # the initial weights (seed 0), rebuilt from the metadata
    assert src.input_shape == (1, 8, 8)
    x = torch.randn(5, 1, 8, 8)
    assert_close(run_onnx(onnx_path, x), masked(src.model, src.masks, x))
    # again: refused, file untouched; --force replaces it
    before = onnx_path.read_bytes()
    code, _, err = run_cli(["export", mask_file], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert onnx_path.read_bytes() == before
    code, _, err = run_cli(["export", mask_file, "--force"], capsys)
    assert code == 0, err


def test_cli_exports_a_run_folder_with_its_trained_weights(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--no-progress",
            "--method", "magnitude", "--sparsity", "0.9", "--out", run]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", run, "--out", tmp_path / "trained.onnx"], capsys)
    assert code == 0, err
    assert "trained weights of checkpoint.pt (epoch 1)" in out
    src = load_source(run)
    init = load_source(run / "mask.safetensors")  # the same masks on the initial weights
    assert src.masks == init.masks
    assert not torch.equal(src.model.layers[1].weight, init.model.layers[1].weight)
    x = torch.randn(3, 1, 8, 8)
    assert_close(run_onnx(tmp_path / "trained.onnx", x), masked(src.model, src.masks, x))


def test_cli_bad_input_is_refused_before_any_work(mask_file, tmp_path, capsys) -> None:
    cases = [
        (["export", tmp_path / "nothing.safetensors"], "no mask file or run folder"),
        (["export", mask_file, "--model", "resnet20"], "made for model 'mlp', not 'resnet20'"),
        (["export", mask_file, "--out", tmp_path / "x.txt"], "written to a .onnx file"),
        (["export", tmp_path], "not an ntksap run folder"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and message in err, (argv, err)
    code, _, err = run_cli(["export", mask_file, "--format", "tflite"], capsys)
    assert code == 2 and "invalid choice: 'tflite'" in err
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.txt"))


def test_cli_sparse_format(mask_file, capsys) -> None:
    sparse = pytest.importorskip("ntksap.sparse")
    code, out, err = run_cli(["export", mask_file, "--format", "sparse"], capsys)
    assert code == 0, err
    path = mask_file.with_name("mlp.sparse.safetensors")
    assert f"wrote {path}" in out
    src = load_source(mask_file)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert_close(sparse.load(path)(x), masked(src.model, src.masks, x))
