"""Run folders: one experiment (prune, then train) in one folder that is never lost or mixed.

A run folder holds everything needed to trust and reproduce a number:

    config.json       the resolved settings, written first (model, data, pruning, training)
    mask.safetensors  the masks trained with, written as soon as pruning ends
    layers.txt        per-layer table: shape, params, kept, density, effective, FLOPs kept
    metrics.jsonl     one line per epoch (train loss/acc, test loss, top-1, top-5, lr, s, img/s)
    checkpoint.pt     the last epoch, atomically rewritten
    result.json       status ("finished", "diverged", "failed", "interrupted"), final and best
                      top-1, density, effective density and sparsity (weights on an
                      input-to-output path), FLOPs, collapsed layers, times
    identity.json     (runs of a sweep) the sha256 of the settings the run was made with,
                      written right after config.json (a later hand edit of config.json
                      is told from it)
    .ntksap.lock      the claim: an OS lock held by the one process working on the folder

Guarantees (each tested):
- claimed atomically at the start (an exclusive `flock` on `.ntksap.lock`, released by the
  OS even on SIGKILL): a second process on the same folder gets `RunBusyError` at once;
- an existing run is never overwritten: `resume=True` continues it from whatever was saved
  (its mask, never re-pruned once saved; its checkpoint, or epoch 0 without one), with the
  same settings only (each differing setting is named); a finished or diverged run is
  reported and left untouched;
- every file is written atomically (`ntksap.files`); temporary files of a killed write are
  removed by the next process that claims the folder.

Example:
    >>> import ntksap
    >>> result = ntksap.run("runs/m5k", dataset="mnist5k", method="ntksap", sparsity=0.9,
    ...                     train={"epochs": 2})  # doctest: +SKIP
    >>> result["status"], result["final_top1"]  # doctest: +SKIP
    ('finished', 96.3)
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ntksap import data
from ntksap import validate as v
from ntksap._version import __version__
from ntksap.attach import apply_masks
from ntksap.files import read_json, remove_stale_temporaries, write_json, write_text
from ntksap.masks import Masks
from ntksap.models import MODELS, create
from ntksap.pruning import SCHEDULES, SCOPES, LayerCollapseWarning, prune, resolve_density
from ntksap.reinit import reinitialize
from ntksap.scoring import get_method
from ntksap.stats import format_table, layer_table
from ntksap.targets import prunable_parameters
from ntksap.training import distributed
from ntksap.training.config import PRESETS, TrainConfig, list_presets, preset_for_dataset
from ntksap.training.loop import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    DivergedError,
    _truncate_metrics,
    fit,
    read_metrics,
)

CONFIG_FILE = "config.json"
MASK_FILE = "mask.safetensors"
LAYERS_FILE = "layers.txt"
RESULT_FILE = "result.json"
LOCK_FILE = ".ntksap.lock"
IDENTITY_FILE = "identity.json"

#: result.json statuses; "finished" and "diverged" are final (resume leaves them alone).
FINAL_STATUSES = ("finished", "diverged")
#: Exit codes of the command line per final status (2 is a usage error, 1 a failure).
EXIT_CODES = {"finished": 0, "diverged": 3}


class RunFolderError(ValueError):
    """The run folder is in a state the request cannot use (exists, or settings differ)."""


class RunBusyError(RunFolderError):
    """Another process holds the run folder."""


# ---------------------------------------------------------------------------------------
# The claim
# ---------------------------------------------------------------------------------------
def _lock(fd: int) -> bool:
    """Take an exclusive, non-blocking OS lock on `fd`; False if another process has it."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def claim(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold `folder` for this process: create it if needed and lock it, atomically.

    The lock is the kernel's (`flock`), so it is released when the process dies, even by
    SIGKILL: no stale claim survives a crash. The lock file itself stays (deleting it would
    let two processes lock two different files).

    Raises:
        RunBusyError: another process holds the folder (its pid and host are named).
        NotADirectoryError / PermissionError: the folder cannot be created or written.
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise NotADirectoryError(f"run folder {folder} exists and is not a folder") from None
    except PermissionError:
        raise PermissionError(f"cannot write to run folder {folder}: permission denied") from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create run folder {folder}: {exc.strerror}") from None
    locked = False
    try:
        if not _lock(fd):
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            raise RunBusyError(
                f"run folder {folder} is in use by another ntksap process ({holder}); wait for "
                "it to finish, or choose another --out (nothing there was changed)"
            )
        locked = True
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        remove_stale_temporaries(folder)
        yield folder
    finally:
        # A folder this call created and nothing was written to: leave no trace. Only the
        # holder may clean up, and only while it still holds the lock: two processes can both
        # see the folder missing and "create" it, and the one refused must not delete the
        # lock file and folder of the one that is running.
        if locked and created and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
            with contextlib.suppress(OSError):
                (folder / LOCK_FILE).unlink()
                folder.rmdir()
        os.close(fd)  # releases the lock


def status(folder: str | os.PathLike[str]) -> str:
    """The state of a run folder: "new" (nothing saved), "incomplete" (started, no result:
    killed, or running now), or result.json's status ("finished", "diverged", "failed",
    "interrupted")."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        return "new"
    result = folder / RESULT_FILE
    if not result.is_file():
        return "incomplete"
    try:
        return str(read_json(result).get("status", "finished"))
    except (ValueError, AttributeError):
        return "incomplete"


def config_differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Each setting that differs, as "name: saved -> now" (nested keys joined by dots).

    >>> config_differences({"train": {"lr": 0.05, "seed": 1}}, {"train": {"lr": 0.1, "seed": 1}})
    ['train.lr: 0.05 -> 0.1']
    """
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append(f"{name}: (absent) -> {now[key]!r}")
            elif key not in now:
                out.append(f"{name}: {saved[key]!r} -> (absent)")
            else:
                out += config_differences(saved[key], now[key], name)
        return out
    if isinstance(saved, list | tuple) and isinstance(now, list | tuple):
        saved, now = list(saved), list(now)
    return [] if saved == now else [f"{prefix}: {saved!r} -> {now!r}"]


#: Entries of config.json that describe the software or the machine, not the experiment: a
#: run resumed on another machine may find its data set in another folder.
_NOT_SETTINGS = ("versions", "data_dir")


# ---------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------
@dataclass
class RunRequest:
    """A validated run: what `run` does, as config.json records it."""

    out: Path
    model: str
    dataset: str
    data_dir: Path | None
    train: TrainConfig
    method: str | None = None
    density: float | None = None
    prune_settings: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    mask: Masks | None = None
    mask_path: Path | None = None
    reinit: bool = False
    # the sweep's sha256 of `settings()` (ntksap.experiments.records.run_identity), written to
    # identity.json with config.json; None: not recorded (a run outside a sweep)
    identity: str | None = None

    def settings(self) -> dict[str, Any]:
        """What defines the experiment: config.json without the software versions, the world
        size and the data location (a sweep names its run folders by a hash of this)."""
        cfg = self.config(1)
        for key in ("versions", "world_size", "data_dir"):
            cfg.pop(key, None)
        return cfg

    def config(self, world_size: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "command": "run" if self.method else "train",
            "model": self.model,
            "dataset": self.dataset,
            "data_dir": str(self.data_dir) if self.data_dir else None,
        }
        if self.method:
            cfg["prune"] = {
                "method": self.method,
                "density": self.density,
                "options": self.options,
                **self.prune_settings,
            }
        else:
            cfg["mask"] = str(self.mask_path) if self.mask_path else None
            cfg["mask_metadata"] = self.mask.metadata if self.mask is not None else None
        cfg.update(
            reinit=self.reinit,
            train=self.train.to_dict(),
            world_size=world_size,
            versions={
                "ntksap": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        )
        return cfg


def resolve_train_config(
    preset: str | None,
    dataset: str | None,
    model: str | None,
    train: TrainConfig | Mapping[str, Any] | None,
    seed: int | None,
    log: Callable[[str], None] = print,
) -> tuple[TrainConfig, str, str]:
    """(TrainConfig, model, dataset) from a preset (or the data set's), overridden by `train`."""
    if preset is not None:
        v.choice("preset", preset, list_presets())
    if dataset is not None:
        v.choice("dataset", dataset, data.list_datasets())
    if model is not None and model not in MODELS:
        v.choice("model", model, MODELS.names())
    name = preset
    if name is None and dataset is not None:
        name = preset_for_dataset(dataset)
        if name is not None:
            log(f"no preset given: using {name!r}, the preset for {dataset}; settings override it")
    base = PRESETS[name] if name else None
    cfg = base["train"] if base else TrainConfig()
    if isinstance(train, TrainConfig):
        cfg = train
    elif train is not None:
        cfg = cfg.with_overrides(**dict(train))
    if seed is not None:
        cfg = cfg.with_overrides(seed=v.seed(seed))
    model = model or (base["model"] if base else None)
    dataset = dataset or (base["dataset"] if base else None)
    if model is None or dataset is None:
        raise ValueError(
            "give model and dataset, or a preset that names them: "
            + ", ".join(f"{k} ({p['model']} on {p['dataset']})" for k, p in PRESETS.items())
        )
    return cfg, model.lower(), dataset.lower()


def check_method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` validated against `method`'s declared options (before any work); only the
    given ones are returned, so config.json records what was asked for."""
    resolved = get_method(method).resolve_options(options)  # names, values, cross-checks
    return {k: resolved[k] for k in options}


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def prepare(
    out: str | os.PathLike[str],
    *,
    preset: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    method: str | None = "ntksap",
    density: float | None = None,
    sparsity: float | None = None,
    mask: str | os.PathLike[str] | Masks | None = None,
    rounds: int | None = None,
    schedule: str = "exponential",
    scope: str = "global",
    floor: float | None = None,
    include_bias: bool = False,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    invert: bool = False,
    shuffle: bool = False,
    options: Mapping[str, Any] | None = None,
    train: TrainConfig | Mapping[str, Any] | None = None,
    seed: int | None = None,
    reinit: bool = False,
    log: Callable[[str], None] = print,
    effective: bool = False,
    effective_tolerance: float | None = None,
) -> RunRequest:
    """Validate a run's settings without doing any work: the `RunRequest` that `run` executes.

    Takes `run`'s setting arguments (not device, workers, resume, sync_bn, progress); sweeps
    call it for every cell before starting any, and hash `RunRequest.settings()`.

    >>> req = prepare("runs/x", dataset="digits", method="snip", sparsity=0.5, log=lambda m: None)
    >>> req.model, req.method, req.density, req.train.epochs
    ('lenet5', 'snip', 0.5, 30)
    """
    # --- validate everything before any work --------------------------------------------
    cfg, model_name, dataset_name = resolve_train_config(
        preset, dataset, model, train, seed if seed is not None else None, log
    )
    req = RunRequest(
        out=Path(out),
        model=model_name,
        dataset=dataset_name,
        data_dir=Path(data_dir) if data_dir is not None else None,
        train=cfg,
        reinit=v.boolean("reinit", reinit),
    )
    if method is not None and mask is not None:
        raise ValueError("give a method to prune with, or a mask to train with, not both")
    if method is not None:
        meth = get_method(method)
        req.method = meth.name
        req.density = resolve_density(density, sparsity)
        if rounds is not None:
            v.positive_int("rounds", rounds)
        v.choice("schedule", schedule, SCHEDULES)
        v.choice("scope", scope, SCOPES)
        req.options = check_method_options(meth.name, options or {})
        for name in meth.pinned:  # a changed default: recorded, so identities differ
            if req.options.get(name) is None:
                req.options[name] = meth.options[name].default
        req.prune_settings = {
            "rounds": rounds,
            "schedule": schedule,
            "scope": scope,
            "seed": cfg.seed,
            "include_bias": v.boolean("include_bias", include_bias),
            "exclude": list(exclude),
            "include": list(include),
            "invert": v.boolean("invert", invert),
            "shuffle": v.boolean("shuffle", shuffle),
        }
        if floor is not None:
            # only when set: the configs (and sweep hashes) of other runs stay as they were
            req.prune_settings["floor"] = v.finite_float("floor", floor, low=0.0, high=1.0)
            if floor and scope != "global":
                raise ValueError(f"floor={floor:g} needs scope='global'")
        if v.boolean("effective", effective):
            # only when set: the configs (and sweep hashes) of other runs stay as they were
            req.prune_settings["effective"] = True
        if effective_tolerance is not None:
            if not effective:
                raise ValueError("effective_tolerance needs effective=True")
            req.prune_settings["effective_tolerance"] = v.finite_float(
                "effective_tolerance", effective_tolerance, low=0.0, high=1.0, low_open=True
            )
    else:
        if (
            density is not None
            or sparsity is not None
            or options
            or effective
            or effective_tolerance is not None
            or floor is not None
        ):
            raise ValueError(
                "density, sparsity, floor, effective, effective_tolerance and options need a "
                "method "
                "(method=None given)"
            )
        if mask is not None:
            req.mask = mask if isinstance(mask, Masks) else Masks.load(mask)
            req.mask_path = None if isinstance(mask, Masks) else Path(mask)
            made_for = req.mask.metadata.get("model")
            if made_for is not None and made_for != model_name:
                raise ValueError(
                    f"the mask {req.mask_path or ''} was made for model {made_for!r}, not "
                    f"{model_name!r}"
                )
    return req


def run(
    out: str | os.PathLike[str],
    *,
    preset: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    method: str | None = "ntksap",
    density: float | None = None,
    sparsity: float | None = None,
    mask: str | os.PathLike[str] | Masks | None = None,
    rounds: int | None = None,
    schedule: str = "exponential",
    scope: str = "global",
    floor: float | None = None,
    include_bias: bool = False,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    invert: bool = False,
    shuffle: bool = False,
    options: Mapping[str, Any] | None = None,
    train: TrainConfig | Mapping[str, Any] | None = None,
    seed: int | None = None,
    reinit: bool = False,
    resume: bool = False,
    device: str | None = None,
    workers: int | None = None,
    sync_bn: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
    effective: bool = False,
    effective_tolerance: float | None = None,
) -> dict[str, Any]:
    """Prune (or take `mask`, or stay dense) and train, into the run folder `out`.

    Args:
        out: the run folder (claimed for the duration; see the module docstring).
        preset / model / dataset / data_dir: the setting (`ntksap.training.config.PRESETS`);
            without a preset the data set's is used; explicit names override it.
        method, density | sparsity: prune with this method (`method=None`: no pruning).
        mask: train with these masks (a file or `Masks`) instead of pruning; with
            `method=None`.
        rounds, schedule, scope, floor, include_bias, exclude, include, invert, shuffle,
            options: as `ntksap.prune` (options: the method's, e.g. {"resamples": 5}).
        effective: density / sparsity is the effective one (weights on an input-to-output
            path), as `ntksap.prune(effective=True)`; recorded as config "prune.effective".
        effective_tolerance: with `effective`, the relative tolerance of the search (default:
            `ntksap.prune`'s, 1 %); recorded as config "prune.effective_tolerance" when given.
        train: TrainConfig overrides on the preset, e.g. {"epochs": 10, "lr": 0.05}.
        seed: seeds the model init, the pruning draws and the data order (default: 0).
        reinit: re-draw the weights after pruning (ablation).
        resume: continue the run in `out` from whatever it saved.
        device: "cpu", "cuda", "cuda:1" (default: cuda:LOCAL_RANK when available).

    Returns:
        The contents of result.json: "status" ("finished" or "diverged"), "final_top1",
        "best_top1", "density" (the model's real one), "collapsed", times, FLOPs.

    Raises:
        ValueError (incl. RunFolderError, RunBusyError): bad settings or folder state, before
            any work; the folder is left as it was.
    """
    req = prepare(
        out, preset=preset, model=model, dataset=dataset, data_dir=data_dir, method=method,
        density=density, sparsity=sparsity, mask=mask, rounds=rounds, schedule=schedule,
        scope=scope, floor=floor, include_bias=include_bias, exclude=exclude, include=include,
        invert=invert,
        shuffle=shuffle, options=options, train=train, seed=seed, reinit=reinit, log=log,
        effective=effective, effective_tolerance=effective_tolerance,
    )  # fmt: skip
    return execute(req, resume=resume, device=device, workers=workers, sync_bn=sync_bn,
                   progress=progress, log=log)  # fmt: skip


def execute(
    req: RunRequest,
    *,
    resume: bool = False,
    device: str | None = None,
    workers: int | None = None,
    sync_bn: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Do the run `req` (from `prepare`) in its folder `req.out`; see `run`."""
    if workers is not None:
        v.int_in_range("workers", workers, 0, 1024)
    distributed.resolve_device(device)

    env = distributed.setup(device)
    try:
        return _run(req, env, resume, workers, sync_bn, progress, log)
    finally:
        distributed.cleanup()


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _run(
    req: RunRequest,
    env: distributed.DistEnv,
    resume: bool,
    workers: int | None,
    sync_bn: bool,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    out = req.out
    config = req.config(env.world_size)
    log = log if env.is_main else (lambda _msg: None)
    with contextlib.ExitStack() as stack:
        # Rank 0 alone claims and inspects the folder; the others follow its decision.
        decision: dict[str, Any] = {}
        if env.is_main:
            try:
                stack.enter_context(claim(out))
                decision = _open_folder(out, config, resume, log, req.identity)
            except Exception as exc:
                decision = {"error": exc}
        decision = distributed.broadcast_object(decision, env)
        if "error" in decision:
            err = decision["error"]
            raise err if isinstance(err, BaseException) else RunFolderError(str(err))
        if decision["state"] == "final":
            return decision["result"]
        try:
            return _train(req, env, config, workers, sync_bn, progress, log)
        except DivergedError as exc:
            if not env.is_main:
                raise
            _warn(str(exc))
            return _finish(out, env, {"status": "diverged", "error": str(exc),
                                      "diverged_epoch": exc.epoch})  # fmt: skip
        except KeyboardInterrupt:
            if env.is_main:
                _finish(out, env, {"status": "interrupted"})
            raise
        except Exception as exc:
            if env.is_main and (out / CONFIG_FILE).exists():
                with contextlib.suppress(Exception):
                    _finish(out, env, {"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
            raise


def _open_folder(
    out: Path,
    config: dict[str, Any],
    resume: bool,
    log: Callable[[str], None],
    identity: str | None = None,
) -> dict[str, Any]:
    """Decide what to do with the claimed folder: start, continue, or report it as final.
    `identity` (a sweep's) is recorded in identity.json once config.json holds the settings
    (a folder of an earlier version gains it when it is resumed with the same settings)."""
    state = status(out)
    if state == "new":
        leftovers = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if leftovers:  # files, but no config.json: not a run folder of ours
            raise RunFolderError(
                f"{out} is not empty ({', '.join(leftovers[:5])}) and is not an ntksap run "
                "folder; choose another --out (nothing there was changed)"
            )
        if resume:
            log(f"nothing saved in {out} yet: starting the run")
        write_json(out / CONFIG_FILE, config)
        _record_identity(out, identity)
        return {"state": "start"}
    if not resume:
        raise RunFolderError(
            f"run folder {out} already holds a run ({state}); pass --resume to continue it, or "
            "choose another --out (nothing there was changed)"
        )
    saved = read_json(out / CONFIG_FILE)
    strip = {k: val for k, val in config.items() if k not in _NOT_SETTINGS}
    diffs = config_differences(
        {k: val for k, val in saved.items() if k not in _NOT_SETTINGS}, strip
    )
    if diffs:
        raise RunFolderError(
            f"--resume with settings that differ from {out / CONFIG_FILE} (saved -> now): "
            + "; ".join(diffs)
            + ". Resume with the same settings, or start a new --out (nothing was changed)"
        )
    if not (out / IDENTITY_FILE).is_file():
        _record_identity(out, identity)
    if state in FINAL_STATUSES:
        result = read_json(out / RESULT_FILE)
        log(
            f"the run in {out} is already {state} (final top-1 {result.get('final_top1')}); "
            "nothing to do, nothing changed"
        )
        return {"state": "final", "result": result}
    log(f"resuming the {state} run in {out}")
    return {"state": "resume"}


def _record_identity(out: Path, identity: str | None) -> None:
    if identity is not None:
        write_json(
            out / IDENTITY_FILE,
            {
                "sha256": identity,
                "of": "config.json without versions, world_size and data_dir; keys sorted, "
                "numbers canonical (1.0 written 1)",
            },
        )


def build_model(
    name: str, num_classes: int, input_shape: Sequence[int], seed: int = 0
) -> torch.nn.Module:
    """A freshly initialised registered model for inputs of `input_shape` (C, H, W), seeded;
    torch's global RNG is left as it was. Factories taking `input_size` (the MLP) get the
    input's side length.

    >>> build_model("lenet5", 10, (1, 28, 28)).__class__.__name__
    'LeNet5'
    """
    import inspect

    shape = tuple(input_shape)
    kwargs: dict[str, Any] = {}
    factory = MODELS.get(name)
    if "input_size" in inspect.signature(factory).parameters and len(shape) >= 2:
        if len(set(shape[1:])) != 1:
            raise ValueError(f"model {name!r} needs a square input, got {shape}")
        kwargs["input_size"] = shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(v.seed(seed))
        return create(name, num_classes=num_classes, in_channels=shape[0], **kwargs)


def _train(
    req: RunRequest,
    env: distributed.DistEnv,
    config: dict[str, Any],
    workers: int | None,
    sync_bn: bool,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    out, cfg = req.out, req.train
    train_ds = data.create(req.dataset, root=req.data_dir, split="train")
    test_ds = data.create(req.dataset, root=req.data_dir, split="test")
    info = train_ds.info
    model = build_model(req.model, info.num_classes, info.input_shape, cfg.seed)

    masks: Masks | None = req.mask
    saved_mask = out / MASK_FILE
    if req.method is not None:
        if saved_mask.is_file():  # atomic write: a file that exists is complete
            masks = Masks.load(saved_mask)
            log(f"re-using the saved mask {saved_mask} (not pruning again)")
        else:
            masks = _prune(req, env, model, train_ds, progress, log)
            if env.is_main:
                masks.save(saved_mask)
    if masks is not None:
        masks.check_covers(model)
        collapse = masks.collapse_warning()
        if collapse:
            _warn(collapse)
        head_dead = masks.dead_head_warning()
        if head_dead and env.is_main:
            _warn(head_dead)
        apply_masks(model, masks)
        if env.is_main:
            stats, totals = layer_table(model, masks, info.input_shape)
            write_text(out / LAYERS_FILE, format_table(stats, totals) + "\n")
    elif env.is_main:
        log("no mask: training the dense network")
    if req.reinit:
        reinitialize(model, "kaiming", seed=cfg.seed + 1)

    if cfg.batch_size % env.world_size:
        raise ValueError(
            f"batch size {cfg.batch_size} is not divisible by the {env.world_size} ranks"
        )
    per_rank = cfg.batch_size // env.world_size
    train_loader = data.make_loader(
        train_ds, batch_size=per_rank, train=True, device=env.device, seed=cfg.seed,
        num_workers=workers, rank=env.rank, world_size=env.world_size,
    )  # fmt: skip
    test_loader = (
        data.make_loader(
            test_ds,
            batch_size=per_rank,
            train=False,
            device=env.device,
            seed=cfg.seed,
            num_workers=workers,
        )
        if env.is_main
        else None
    )
    has_checkpoint = (out / CHECKPOINT_FILE).is_file()
    if env.is_main and not has_checkpoint:
        _truncate_metrics(out / METRICS_FILE, 0)  # epochs of a run killed before its checkpoint
    distributed.barrier(env)
    summary = fit(
        model, train_loader, test_loader, cfg, env=env, out_dir=out if env.is_main else None,
        resume=has_checkpoint, progress=progress and env.is_main, sync_bn=sync_bn, log=log,
    )  # fmt: skip
    extra: dict[str, Any] = {"status": "finished", **summary}
    if masks is not None:
        _, totals = layer_table(model, masks, info.input_shape)
        extra.update(
            flops_dense=totals.flops_dense,
            flops_remaining=totals.flops_remaining,
            params_prunable=totals.params,
            params_kept=totals.kept,
            # kept weights on an input-to-output path (ntksap.masks.effective); None when the
            # path analysis cannot read the model
            params_effective=totals.effective_kept,
            effective_density=totals.effective_density,
            effective_sparsity=totals.effective_sparsity,
            collapsed=masks.collapsed(),
            dead_outputs=masks.dead_outputs(),
            prune_seconds=masks.metadata.get("seconds"),
        )
    result = _finish(out, env, extra)
    log(
        f"done: final top-1 {summary['final_top1']}, best {summary['best_top1']} "
        f"(epoch {summary['best_epoch']}), density {summary['density']:.4f}; results in {out}"
    )
    return result


def _prune(
    req: RunRequest,
    env: distributed.DistEnv,
    model: torch.nn.Module,
    train_ds: Any,
    progress: bool,
    log: Callable[[str], None],
) -> Masks:
    """Prune and give every rank the same masks.

    Under torchrun every rank scores its share (`prune(..., distributed=True)`: NTK-SAP's
    draws, or the data batches, split across the ranks) and the masks are rank 0's on all;
    in one process, rank 0 is the only one.
    """
    assert req.method is not None and req.density is not None
    meth = get_method(req.method)
    settings = req.prune_settings
    batches = (
        data.prune_batches(train_ds, per_class=10, seed=req.train.seed)
        if meth.needs_data_for(req.options)  # e.g. ntksap with inputs="data"
        else None
    )
    if env.is_main:
        where = f" on {env.world_size} processes" if env.distributed else ""
        kind = "effective density" if settings.get("effective") else "density"
        log(f"pruning {req.model} with {meth.name} to {kind} {req.density:.4g}{where}")
    with warnings.catch_warnings():  # collapse is reported by _train, once, with the fix
        warnings.simplefilter("ignore", LayerCollapseWarning)
        local = prune(
            model, meth.name, density=req.density, input_shape=train_ds.info.input_shape,
            data=batches, device=env.device, progress=progress and env.is_main,
            distributed=env.distributed, **settings, **req.options,
        )  # fmt: skip
    targets = prunable_parameters(
        model,
        include_bias=settings["include_bias"],
        exclude=settings["exclude"],
        include=settings["include"],
    )
    shapes = {n: p.shape for n, p in targets.items()}
    # every rank holds the same masks already; broadcasting rank 0's makes it certain
    tensors = distributed.broadcast_masks(dict(local), shapes, env)
    metadata = distributed.broadcast_object(local.metadata, env)
    return Masks(tensors, {**metadata, "dataset": req.dataset})


def _finish(out: Path, env: distributed.DistEnv, extra: dict[str, Any]) -> dict[str, Any]:
    """Write result.json (rank 0) from the saved files and `extra`; returns its contents."""
    if not env.is_main:
        return extra
    rows = read_metrics(out / METRICS_FILE)
    result = {
        **extra,
        "epochs_done": rows[-1]["epoch"] if rows else 0,
        "train_seconds": round(sum(r.get("wall_seconds") or 0.0 for r in rows), 2),
        "world_size": env.world_size,
    }
    if "density" in result:
        result["sparsity"] = 1.0 - result["density"]
    write_json(out / RESULT_FILE, result)
    return result


__all__ = [
    "CONFIG_FILE",
    "EXIT_CODES",
    "FINAL_STATUSES",
    "IDENTITY_FILE",
    "LAYERS_FILE",
    "LOCK_FILE",
    "MASK_FILE",
    "RESULT_FILE",
    "RunBusyError",
    "RunFolderError",
    "RunRequest",
    "build_model",
    "check_method_options",
    "claim",
    "config_differences",
    "execute",
    "prepare",
    "resolve_train_config",
    "run",
    "status",
]
