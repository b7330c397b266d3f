"""Sizes in a mask file's metadata are data: the zoo model and example input that `export`
(and the report) rebuild from them never allocate more than the file's own masks describe.

A forged `model_args.num_classes` or `input_shape` is refused before any allocation: out of
range, by its own check; in range but not what the masks were made for, by building the model
on the meta device first and comparing it with the masks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import ntksap
from ntksap.export import export_source
from ntksap.masks import MAX_INPUT_ELEMENTS, MaskError, Masks, check_input_shape
from ntksap.models import create


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("masks") / "lenet5.safetensors"
    masks = ntksap.prune(create("lenet5"), "magnitude", sparsity=0.9, input_shape=(1, 28, 28))
    masks.save(path)
    return path


def _forge(src, dst, **changes) -> None:
    """Copy mask file `src` to `dst` with metadata entries replaced (dotted keys reach into
    model_args)."""
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    md = json.loads(meta["metadata"])
    for key, value in changes.items():
        if key.startswith("model_args."):
            md["model_args"][key.split(".", 1)[1]] = value
        else:
            md[key] = value
    save_file(tensors, str(dst), metadata={**meta, "metadata": json.dumps(md)})


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        # 672 GB for the classifier alone: refused by range, before any model is built
        ({"model_args.num_classes": 2 * 10**9}, ["model_args.num_classes", "integer in [1,"]),
        ({"model_args.num_classes": 0}, ["model_args.num_classes"]),
        ({"model_args.in_channels": "3"}, ["model_args.in_channels"]),
        ({"model_args": [1, 2]}, ["model_args", "JSON object"]),
        # a 40 GB example input
        ({"input_shape": [1, 100000, 100000]}, ["input_shape", "elements", "allowed"]),
        ({"input_shape": [1, 0, 28]}, ["input_shape", "positive integers"]),
        ({"input_shape": [1, 28.5, 28]}, ["input_shape", "positive integers"]),
        ({"input_shape": [True, 28, 28]}, ["input_shape", "positive integers"]),
        ({"input_shape": [1, 1, 1, 1, 28]}, ["input_shape", "1 to 4"]),
    ],
)
def test_forged_sizes_are_refused_when_read(mask_file, tmp_path, changes, words):
    bad = tmp_path / "bad.safetensors"
    _forge(mask_file, bad, **changes)
    with pytest.raises(MaskError) as err:
        Masks.load(bad)
    for w in words:
        assert w in str(err.value)


# Exports in a child whose address space is capped at 2 GiB (torch and ntksap take ~0.65): a
# model built from the forged size before the check would fail to allocate instead.
_EXPORT_CAPPED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from ntksap.export import export_source
from ntksap.masks import MaskError
try:
    export_source(sys.argv[1], sys.argv[2])
except MaskError as exc:
    print("MaskError:", exc)
"""


def test_in_range_size_that_does_not_fit_the_masks_allocates_nothing(mask_file, tmp_path):
    # 10**7 classes passes the range check but is a 3.4 GB Linear(84, 10**7): the meta probe
    # finds that fc3's mask is (10, 84) before anything is allocated
    bad = tmp_path / "classes.safetensors"
    _forge(mask_file, bad, **{"model_args.num_classes": 10**7})
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT_CAPPED, str(bad), str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MaskError:" in proc.stdout
    assert "fc3.weight: mask (10, 84) vs parameter (10000000, 84)" in proc.stdout
    assert not (tmp_path / "out.onnx").exists()


def test_build_fitting_probes_on_meta_first():
    devices: list[str] = []

    def factory() -> nn.Module:
        net = nn.Linear(3, 2, bias=False)
        devices.append(net.weight.device.type)
        return net

    fits = Masks({"weight": torch.ones(2, 3, dtype=torch.bool)})
    net = fits.build_fitting(factory)
    assert devices == ["meta", "cpu"]
    assert net.weight.device.type == "cpu"
    devices.clear()
    wrong = Masks({"weight": torch.ones(5, 3, dtype=torch.bool)})
    with pytest.raises(MaskError, match="do not match"):
        wrong.build_fitting(factory)
    assert devices == ["meta"]  # the real model was never built


def test_check_input_shape_limit():
    side = int(MAX_INPUT_ELEMENTS**0.5)
    assert check_input_shape([1, side, side], "s") == (1, side, side)
    with pytest.raises(ValueError, match="more than"):
        check_input_shape([2, side, side], "s")


def test_untouched_mask_file_still_exports(mask_file, tmp_path):
    # the meta probe must not change what an honest file gives
    out = export_source(mask_file, tmp_path / "ok.onnx")
    assert out.path.is_file()
    assert out.input_shape == (1, 28, 28)


# The report's effective sparsity of a mask file, in a child that prints its peak memory.
_REPORT_PEAK = """
import resource, sys
from ntksap.experiments.records import mask_effective_sparsity
print(mask_effective_sparsity(sys.argv[1]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MiB")
"""


def test_report_builds_no_model_larger_than_the_masks(tmp_path):
    path = tmp_path / "mlp.safetensors"
    net = create("mlp", input_size=8)
    masks = ntksap.prune(net, "magnitude", sparsity=0.5, input_shape=(1, 8, 8))
    masks.metadata["model_args"] = {"input_size": 8}
    masks.save(path)
    honest = subprocess.run(
        [sys.executable, "-c", _REPORT_PEAK, str(path)], capture_output=True, text=True, timeout=300
    )
    assert honest.stdout.split()[0] != "None", honest.stderr[-2000:]
    # a forged width: a 30000 x 30000 hidden layer is 3.6 GB of float32
    bad = tmp_path / "wide.safetensors"
    _forge(path, bad, **{"model_args.hidden": [30000, 30000]})
    proc = subprocess.run(
        [sys.executable, "-c", _REPORT_PEAK, str(bad)], capture_output=True, text=True, timeout=300
    )
    value, peak = proc.stdout.split()[:2]
    assert value == "None"  # shown as n/a: the masks do not fit the forged model
    assert int(peak) < 1500, f"peak {peak} MiB"
