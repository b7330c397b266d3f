"""Export a pruned network for deployment: ONNX (any runtime) or ntksap's sparse format.

`export(model, masks, path)` compacts the masked model (`ntksap.compact`: dead channels
removed, pruned weights exact zeros in what remains), writes it, and CHECKS the file: the
ONNX graph is run by onnxruntime on a random batch and compared with torch (rtol 1e-4,
atol 1e-5); the sparse module (`ntksap.sparse.convert` + `ntksap.sparse.save`) is read back
and compared the same way. A mismatch raises `ExportCheckError` and the file is removed:
an export that is written has been checked.

`load_source(path)` rebuilds a model and its masks from what ntksap writes: a mask file
(`ntksap prune --out`; its metadata names the zoo model, its arguments, input shape and
seed, so the initial weights are rebuilt exactly) or a run folder (`ntksap run/train --out`:
the trained weights of its checkpoint.pt, read with weights_only=True, or the initial
weights when no epoch finished). `export_source` does both; `ntksap export` calls it.

ONNX is written by torch's TorchScript-based exporter (`dynamo=False`; opset 17 by
default) with a dynamic batch dimension; BatchNorm is folded into the convs by the
exporter in eval mode, which keeps exact zeros exact. The optional packages (onnx,
onnxruntime; the `deploy` extra) are imported only here, with a clear error when missing.

Example:
    >>> import torch, ntksap
    >>> from ntksap import models
    >>> from ntksap.export import export
    >>> net = models.create("lenet5")
    >>> masks = ntksap.prune(net, "synflow", sparsity=0.99, input_shape=(1, 28, 28), rounds=2)
    >>> result = export(net, masks, "/tmp/lenet5.onnx", overwrite=True)  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
    params 61.7K -> 8.36K, FLOPs 1.29M -> 905K per 1x28x28 input; checked with onnxruntime ...
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ntksap.files import atomic_write, check_new_file, read_json
from ntksap.masks import MaskError, Masks

__all__ = [
    "FORMATS",
    "ExportCheckError",
    "ExportResult",
    "Source",
    "default_output",
    "export",
    "export_source",
    "load_source",
]

#: Export formats and the file suffix each must have.
FORMATS: dict[str, str] = {"onnx": ".onnx", "sparse": ".safetensors"}

#: Tolerances of the check of a written export against torch.
RTOL, ATOL = 1e-4, 1e-5


class ExportCheckError(RuntimeError):
    """The written export does not compute what the torch model computes."""


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote and how it checked.

    Attributes:
        path: the file written.
        format: "onnx" or "sparse".
        compacted: whether dead channels were removed first.
        params_before / params_after: parameters of the masked model / of the exported one.
        flops_before / flops_after: FLOPs of one forward on one input (`ntksap.stats`
            convention) of the dense structure before / after compaction.
        kept_weights: non-zero prunable weights of the exported model (its masks' kept).
        input_shape: one input's shape (no batch dimension).
        max_abs_diff: max |export - torch| on the check batch.
        notes: compaction notes (groups left whole, channels kept).
    """

    path: Path
    format: str
    compacted: bool
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    kept_weights: int
    input_shape: tuple[int, ...]
    max_abs_diff: float
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        from ntksap.stats import human

        shape = "x".join(map(str, self.input_shape))
        runtime = "onnxruntime" if self.format == "onnx" else "ntksap.sparse.load"
        lines = [
            f"params {human(self.params_before)} -> {human(self.params_after)}, FLOPs "
            f"{human(self.flops_before)} -> {human(self.flops_after)} per 1x{shape} input"
            + ("" if self.compacted else " (not compacted)")
            + f"; {self.kept_weights:,} non-zero prunable weights",
            f"checked with {runtime}: max |difference| {self.max_abs_diff:.2e} "
            f"(rtol {RTOL:g}, atol {ATOL:g})",
            *self.notes,
            f"wrote {self.path}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Sources: mask files and run folders
# ---------------------------------------------------------------------------------------
@dataclass
class Source:
    """A model and its masks rebuilt from a mask file or a run folder.

    Attributes:
        model: the (dense, unmasked) zoo model with the weights to export.
        masks: its masks (None: a dense run).
        input_shape: one input's shape (C, H, W).
        description: where the weights came from, for the user.
    """

    model: nn.Module
    masks: Masks | None
    input_shape: tuple[int, ...]
    description: str


def _zoo_name(masks: Masks, where: Path, model: str | None) -> str:
    from ntksap.models import MODELS

    made_for = masks.metadata.get("model")
    if model is not None:
        if made_for is not None and made_for != model:
            raise MaskError(
                f"{where} was made for model {made_for!r}, not {model!r}: export it as "
                f"{made_for!r} (leave out the model), or use a mask made for {model!r}"
            )
        name = model
    elif made_for is None:
        raise MaskError(
            f"{where} does not name the model it was made for (no 'model' in its metadata); "
            "give the zoo model name, or export from Python: ntksap.export.export(model, "
            "masks, path)"
        )
    else:
        name = made_for
    if name not in MODELS:
        raise MaskError(
            f"{where} was made for {name!r}, which is not an ntksap zoo model ("
            f"{', '.join(MODELS.names())}): ntksap cannot rebuild it from the file; export "
            "from Python: ntksap.export.export(model, masks, path)"
        )
    return name


def _build(name: str, masks: Masks | None, shape: Sequence[int], classes: int, seed: int):
    from ntksap.runs import build_model

    if masks is None:  # a dense run: the sizes come from the data set, not from a file
        return build_model(name, classes, tuple(shape), seed)
    # the sizes come from the mask file's metadata (range-checked when the Masks were made):
    # the model must fit the masks before the real one (and its example input) is allocated
    return masks.build_fitting(lambda: build_model(name, classes, tuple(shape), seed))


def _mask_source(path: Path, model: str | None) -> Source:
    masks = Masks.load(path)
    name = _zoo_name(masks, path, model)
    shape = masks.metadata.get("input_shape")
    args = masks.metadata.get("model_args") or {}
    if shape is None:
        from ntksap.models import defaults

        shape = list(defaults(name).input_shape)
        if "in_channels" in args:
            shape[0] = int(args["in_channels"])
    classes = args.get("num_classes")
    if classes is None:
        from ntksap.models import defaults

        classes = defaults(name).num_classes
    seed = int(masks.metadata.get("seed") or 0)
    net = _build(name, masks, shape, int(classes), seed)
    return Source(
        net, masks, tuple(shape), f"{path}: {name}, initial weights (seed {seed}) + masks"
    )


def _run_source(folder: Path, model: str | None) -> Source:
    from ntksap.runs import CONFIG_FILE, MASK_FILE
    from ntksap.training.checkpoint import load_checkpoint
    from ntksap.training.loop import CHECKPOINT_FILE

    config = read_json(folder / CONFIG_FILE)
    name = config.get("model")
    if not isinstance(name, str):
        raise ValueError(f"{folder / CONFIG_FILE} names no model: not an ntksap run folder")
    if model is not None and model != name:
        raise MaskError(f"the run in {folder} trained model {name!r}, not {model!r}")
    seed = int((config.get("train") or {}).get("seed") or 0)
    ckpt_path = folder / CHECKPOINT_FILE
    state = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None  # weights_only=True
    masks: Masks | None = None
    if (folder / MASK_FILE).is_file():
        masks = Masks.load(folder / MASK_FILE)
    elif state is not None and state.get("masks"):
        masks = Masks(state["masks"], config.get("mask_metadata") or {})
    elif config.get("mask"):
        masks = Masks.load(config["mask"])
    if masks is not None:
        _zoo_name(masks, folder, name)  # a mask for another model is refused
        shape = masks.metadata.get("input_shape")
        classes = (masks.metadata.get("model_args") or {}).get("num_classes")
    else:
        shape = classes = None
    if shape is None or classes is None:  # a dense run: ask the data set
        from ntksap import data

        info = data.create(config["dataset"], root=config.get("data_dir"), split="test").info
        shape, classes = info.input_shape, info.num_classes
    net = _build(name, masks, shape, int(classes), seed)
    if state is not None:
        from ntksap.attach import apply_masks, remove_masks

        if masks is not None:
            apply_masks(net, masks)  # the checkpoint holds the parametrized state dict
        try:
            net.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(f"{ckpt_path} does not fit model {name!r}: {exc}") from None
        if masks is not None:
            remove_masks(net)
        what = f"trained weights of {ckpt_path.name} (epoch {state.get('epoch')})"
    else:
        if config.get("reinit"):
            from ntksap.reinit import reinitialize

            reinitialize(net, "kaiming", seed=seed + 1)
        what = f"initial weights (seed {seed}; no checkpoint yet)"
    return Source(net, masks, tuple(shape), f"{folder}: {name}, {what}")


def load_source(path: str | os.PathLike[str], model: str | None = None) -> Source:
    """The model (zoo, rebuilt) and masks a mask file or a run folder describe.

    Args:
        path: a mask file written by `Masks.save` / `ntksap prune --out`, or a run folder of
            `ntksap run/train`.
        model: the zoo model the masks must be for (default: the one their metadata names);
            masks made for another model raise MaskError.

    Raises:
        FileNotFoundError: nothing at `path`.
        MaskError: the masks name no zoo model, or another model than `model`.
        ValueError: a folder that is not a run folder, or a checkpoint that does not fit.
    """
    path = Path(path)
    if path.is_dir():
        from ntksap.runs import CONFIG_FILE

        if not (path / CONFIG_FILE).is_file():
            raise ValueError(
                f"{path} is a folder without {CONFIG_FILE}: not an ntksap run folder; give a "
                "run folder (ntksap run/train --out) or a mask file (ntksap prune --out)"
            )
        return _run_source(path, model)
    if not path.exists():
        raise FileNotFoundError(f"no mask file or run folder at {path}")
    return _mask_source(path, model)


def default_output(source: str | os.PathLike[str], format: str) -> Path:
    """Where `ntksap export` writes by default: RUN/model.onnx or MASKS.onnx (the sparse
    format: .sparse.safetensors).

    >>> str(default_output("runs/a", "onnx")), str(default_output("r20.safetensors", "sparse"))
    ('runs/a/model.onnx', 'r20.sparse.safetensors')
    """
    _check_format(format)
    suffix = ".onnx" if format == "onnx" else ".sparse.safetensors"
    source = Path(source)
    if source.is_dir() or not source.suffix:
        return source / f"model{suffix}"
    return source.with_name(source.name.removesuffix(source.suffix) + suffix)


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------
def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")


def check_output(path: str | os.PathLike[str], format: str, overwrite: bool = False) -> Path:
    """Raise before any work unless `path` suits `format` and may be written."""
    _check_format(format)
    path = Path(path)
    if path.suffix.lower() != FORMATS[format]:
        raise ValueError(
            f"output {path}: the {format} format is written to a {FORMATS[format]} file"
        )
    return check_new_file(
        path, overwrite, "output", "replace it with --force (overwrite=True in Python)"
    )


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        fix = (
            "this ntksap has no sparse inference module"
            if module.startswith("ntksap")
            else "pip install 'ntksap[deploy]'"
        )
        raise ImportError(f"exporting needs {module}: {fix} ({exc})") from None


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence stdout and stderr down to the file descriptors: the TorchScript exporter logs
    its whole IR graph from C++ when it fails, before we fall back to the dynamo exporter."""
    import sys

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            for stream in (sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    stream.flush()
            saved = [os.dup(1), os.dup(2)]
        except (OSError, AttributeError, ValueError):  # no real descriptors (some notebooks)
            yield
            return
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                os.dup2(null.fileno(), 2)
                yield
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _onnx_bytes(model: nn.Module, x: torch.Tensor, opset: int) -> tuple[bytes, str]:
    """The ONNX file of `model` (eval mode) with a dynamic batch dimension, and the exporter
    used: torch's TorchScript-based one (fast, quiet), else the dynamo-based one (it handles
    e.g. LeNet-5's adaptive pooling to 5x5 of a 7x7 map, which the first refuses)."""
    import logging
    import warnings

    onnx = _need("onnx")
    buf = io.BytesIO()
    try:
        with torch.no_grad(), _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        return buf.getvalue(), "torchscript"
    except Exception as exc:
        first = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        )
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with (
            torch.no_grad(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=max(opset, 18),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        buf = io.BytesIO()
        onnx.save_model(program.model_proto, buf)
        return buf.getvalue(), "dynamo"
    except Exception as exc:
        raise ValueError(
            f"torch cannot export {type(model).__name__} to ONNX: the TorchScript exporter "
            f"says {first}; the dynamo exporter says {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        log.setLevel(level)


def _compare(got: Any, want: torch.Tensor, what: str, path: Path) -> float:
    got_t = torch.as_tensor(got).to(torch.float64)
    want_t = want.detach().to(torch.float64).cpu()
    if got_t.shape != want_t.shape:
        raise ExportCheckError(
            f"{what} gives shape {tuple(got_t.shape)}, torch {tuple(want_t.shape)}; {path} removed"
        )
    diff = (got_t - want_t).abs()
    if not bool((diff <= ATOL + RTOL * want_t.abs()).all()):
        raise ExportCheckError(
            f"{what} differs from torch by up to {float(diff.max()):.3g} (rtol {RTOL:g}, atol "
            f"{ATOL:g}); {path} removed"
        )
    return float(diff.max()) if diff.numel() else 0.0


def export(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    path: str | os.PathLike[str],
    format: str = "onnx",
    *,
    example_input: torch.Tensor | None = None,
    compact: bool = True,
    overwrite: bool = False,
    opset: int = 17,
    batch_size: int = 1,
    align: int = 8,
) -> ExportResult:
    """Compact `model` pruned by `masks`, write it to `path` in `format`, and check the file.

    The model takes one tensor (batch, *input_shape) and returns one tensor (the ONNX graph
    has one input "input" and one output "output", batch dimension dynamic).

    Args:
        model: the network (left untouched; masks attached by `apply_masks` or not).
        masks: its masks; None: the masks attached to `model`, or none (dense).
        path: the output file: .onnx for "onnx", .safetensors for "sparse".
        format: "onnx" (torch.onnx, checked with onnxruntime) or "sparse"
            (`ntksap.sparse.convert` + `save`, checked by `ntksap.sparse.load`).
        example_input: a batch showing the input shape; default: the masks' "input_shape" or
            the zoo model's default shape.
        compact: remove dead channels first (`ntksap.compact`); False exports the masked
            model as it is (pruned weights still exact zeros).
        overwrite: replace an existing file (otherwise FileExistsError, before any work).
        opset: ONNX opset (>= 17).
        batch_size: batch of the check (and of the sparse format's autotune).
        align: keep a multiple of `align` channels per layer when compacting
            (`ntksap.compact.compact`): onnxruntime's CPU convs are slower on channel
            counts that are not a multiple of 8 (ResNet-20, NTK-SAP 98.2 %, batch 64: 49 ms
            with all dead channels removed, 33 ms with align=8, 39 ms uncompacted).

    Returns:
        `ExportResult` (print it): sizes before/after, the check, the path.

    Raises:
        ValueError: unknown format, bad suffix, masks that do not fit, opset < 17.
        FileExistsError: `path` exists and not `overwrite`.
        ImportError: onnx / onnxruntime missing (`pip install 'ntksap[deploy]'`).
        ExportCheckError: the written file does not compute what torch computes (the file
            is removed).
    """
    from ntksap import validate
    from ntksap.attach import get_masks
    from ntksap.compact import _input_for, _prepared, compact_with_masks
    from ntksap.stats import count_module_flops
    from ntksap.targets import named_parameters_canonical

    path = check_output(path, format, overwrite)
    validate.positive_int("batch_size", batch_size)
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 17:
        raise ValueError(f"opset must be an int >= 17, got {opset!r}")
    if format == "onnx":
        _need("onnx")
        _need("onnxruntime")
    else:
        _need("ntksap.sparse")
    if masks is None:
        masks = get_masks(model)
    masks = masks if isinstance(masks, Masks) else Masks(masks)
    masks.check_model(model)

    before = _prepared(model, masks)  # eval copy, masks baked in
    x = _input_for(before, masks, example_input, batch=batch_size)
    shape = tuple(x.shape[1:])
    notes: tuple[str, ...] = ()
    if compact:
        net, out_masks, note_list = compact_with_masks(model, masks, x, align=align)
        notes = tuple(note_list)
    else:
        net, out_masks = before, masks
    net = net.eval()
    params = named_parameters_canonical(net)
    kept = sum(int(out_masks[n].sum()) if n in out_masks else 0 for n in params)
    with torch.no_grad():
        want = net(x)

    if format == "onnx":
        ort = _need("onnxruntime")
        content, _ = _onnx_bytes(net, x, opset)
        atomic_write(path, content)
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (got,) = session.run(None, {"input": x.detach().cpu().numpy()})
            diff = _compare(got, want, "onnxruntime", path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    else:
        from ntksap import sparse

        module = sparse.convert(net, out_masks, example_input=x)
        sparse.save(module, path)
        try:
            back = sparse.load(path)
            with torch.no_grad():
                diff = _compare(back(x), want, "the saved sparse model", path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    return ExportResult(
        path=path,
        format=format,
        compacted=compact,
        params_before=sum(p.numel() for p in before.parameters()),
        params_after=sum(p.numel() for p in net.parameters()),
        flops_before=count_module_flops(before, shape)[0],
        flops_after=count_module_flops(net, shape)[0],
        kept_weights=kept,
        input_shape=shape,
        max_abs_diff=diff,
        notes=notes,
    )


def export_source(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str] | None = None,
    format: str = "onnx",
    *,
    model: str | None = None,
    compact: bool = True,
    overwrite: bool = False,
    opset: int = 17,
    batch_size: int = 1,
    align: int = 8,
) -> ExportResult:
    """`export` of what a mask file or run folder describes (`load_source`); `path`
    defaults to `default_output(source, format)`. Every input is checked before any work."""
    _check_format(format)
    out = Path(path) if path is not None else default_output(source, format)
    check_output(out, format, overwrite)
    src = load_source(source, model)
    return export(
        src.model,
        src.masks,
        out,
        format,
        example_input=torch.zeros(1, *src.input_shape),
        compact=compact,
        overwrite=overwrite,
        opset=opset,
        batch_size=batch_size,
        align=align,
    )
