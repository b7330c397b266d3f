"""Run records: what a report or an index knows about one run folder, read from its files.

The run folders are the truth (`ntksap.runs`); everything here is read from them, never
cached elsewhere. A record carries the folder's config.json, result.json (None until the run
ends) and status, and names the settings a report groups by.

A run's identity is the sha256 of its settings in canonical form (`run_identity`): config.json
without the entries that do not define the experiment, keys sorted, numbers canonical (1 and
1.0 are one number, True is not 1). A sweep records it in the run folder (identity.json); a
folder whose config.json no longer has the identity it was made with was edited by hand and
reads as status "edited" (never counted as a result).

Example:
    >>> recs = [read_record(p) for p in find_run_folders(["sweeps/m5k"])]  # doctest: +SKIP
    >>> recs[0].method, recs[0].sparsity, recs[0].seed, recs[0].top1  # doctest: +SKIP
    ('ntksap', 0.98, 0, 91.2)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ntksap.files import read_json
from ntksap.runs import CONFIG_FILE, IDENTITY_FILE, MASK_FILE, RESULT_FILE, status

#: config.json entries that do not define the experiment (software, machine, data location).
NOT_HASHED = ("versions", "world_size", "data_dir")
#: The folder of a sweep that holds its run folders.
RUNS_DIR = "runs"
#: A sweep folder is marked by this file (its settings), beside runs/.
SWEEP_FILE = "sweep.json"
#: A sweep's run folder name: "<label>-seed<N>-<hex prefix of config_hash>".
_SWEEP_NAME = re.compile(r"-seed\d+-([0-9a-f]{8,64})$")

#: config.json keys that never define an experiment cell (software, location, seed, density).
NOT_GROUPING = (
    "versions",
    "world_size",
    "data_dir",
    "command",
    "mask",
    "mask_metadata",
    "prune.density",
    "prune.seed",
    "train.seed",
    "train.preset",
)


def canonical(value: Any) -> Any:
    """`value` with every number in one form, for hashing: an integral float becomes the int
    (1.0 -> 1; exact, any size), bools stay bools, tuples become lists, mapping keys strings.

    >>> canonical({"lr": 1.0, "milestones": (80.0, 120), "nesterov": True, "gamma": 0.5})
    {'lr': 1, 'milestones': [80, 120], 'nesterov': True, 'gamma': 0.5}
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else value
    if isinstance(value, Mapping):
        return {str(k): canonical(val) for k, val in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(x) for x in value]
    return str(value)  # paths and other objects: as config.json writes them


def settings_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings: config.json (or `RunRequest.settings()`) without `NOT_HASHED`."""
    return {k: val for k, val in config.items() if k not in NOT_HASHED}


def run_identity(config: Mapping[str, Any]) -> str:
    """The identity of a run: sha256 (64 hex digits) of its canonical settings. Key order,
    int-vs-float spelling of a number and tuple-vs-list do not matter; anything else does.

    >>> run_identity({"train": {"lr": 1}}) == run_identity({"train": {"lr": 1.0}})
    True
    >>> run_identity({"prune": {"shuffle": True}}) == run_identity({"prune": {"shuffle": 1}})
    False
    """
    text = json.dumps(
        canonical(settings_of(config)), sort_keys=True, separators=(",", ":"), allow_nan=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(config: Mapping[str, Any], length: int = 8) -> str:
    """The hash that names a sweep's run folder (its first `length` hex digits; 8 unless two
    folders would share a name): sha256 of the settings as JSON, as every version wrote it, so
    that the folders of earlier sweeps keep their names. Not the identity: `run_identity`.

    >>> config_hash({"model": "lenet5", "versions": {"torch": "2.13"}}) == config_hash(
    ...     {"model": "lenet5"})
    True
    """
    text = json.dumps(settings_of(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def recorded_identity(folder: str | os.PathLike[str]) -> str | None:
    """The identity recorded in a run folder's identity.json (None: none, or unreadable)."""
    try:
        data = read_json(Path(folder) / IDENTITY_FILE)
    except (OSError, ValueError):
        return None
    value = data.get("sha256") if isinstance(data, dict) else None
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else None


def is_edited(folder: str | os.PathLike[str], config: Mapping[str, Any]) -> bool:
    """Whether the run folder's config.json (`config`, as read) was changed after the run was
    made: it no longer has the recorded identity; for a sweep's folder written before
    identities were recorded, its settings no longer hash to the folder's name. An empty or
    unreadable config is not judged here (it reads as unreadable)."""
    if not config:
        return False
    folder = Path(folder)
    recorded = recorded_identity(folder)
    if recorded is not None:
        return recorded != run_identity(config)
    m = _SWEEP_NAME.search(folder.name)
    if m is None or folder.parent.name != RUNS_DIR:
        return False  # a folder of `ntksap run`: nothing to compare with
    return not config_hash(config, 64).startswith(m[1])


@dataclass
class Record:
    """One run folder as read from disk.

    Attributes:
        name: the folder's name (a sweep names it `<readable>-<hash>`).
        folder: its path.
        status: `ntksap.runs.status`: new, incomplete, finished, diverged, failed,
            interrupted; or "edited": config.json changed by hand after the run was made
            (`is_edited`), so its numbers belong to no known setting and count as no result.
        config: config.json ({} when absent).
        result: result.json, or None until the run ends.
    """

    name: str
    folder: Path
    status: str
    config: dict[str, Any]
    result: dict[str, Any] | None

    @property
    def method(self) -> str:
        """The pruning method ("dense" for a run without one, "mask" for a given mask)."""
        prune = self.config.get("prune")
        if prune:
            return str(prune["method"])
        return "mask" if self.config.get("mask") else "dense"

    @property
    def density(self) -> float:
        """The requested density (1.0 dense); `result["density"]` is the measured one."""
        prune = self.config.get("prune")
        if prune:
            return float(prune["density"])
        if self.result and self.result.get("density") is not None:
            return float(self.result["density"])
        return 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def seed(self) -> int:
        return int(self.config.get("train", {}).get("seed", 0))

    @functools.cached_property
    def effective_sparsity(self) -> float | None:
        """1 - the fraction of prunable weights on an input-to-output path
        (`ntksap.masks.effective`): result.json's "effective_sparsity"; for a run folder
        written before that field existed (or one not finished), computed from its
        mask.safetensors when the mask records a zoo model and its input shape; else None.
        A dense run (no mask) has 0.
        """
        if self.result and isinstance(self.result.get("effective_sparsity"), int | float):
            return float(self.result["effective_sparsity"])
        path = self.folder / MASK_FILE
        if not path.is_file():
            return 0.0 if self.method == "dense" and self.config else None
        return mask_effective_sparsity(path)

    @property
    def top1(self) -> float | None:
        """Final top-1 (%) of a finished run, else None."""
        if self.result is None or self.status != "finished":
            return None
        value = self.result.get("final_top1")
        return None if value is None else float(value)

    def settings(self) -> dict[str, Any]:
        """config.json flattened to dotted keys ("train.lr", "prune.options.resamples")."""
        return flatten(self.config)

    def grouping(self) -> dict[str, Any]:
        """The flattened settings that define the cell, minus density and seeds."""
        return {
            k: val
            for k, val in self.settings().items()
            if not any(k == skip or k.startswith(skip + ".") for skip in NOT_GROUPING)
        }


def mask_effective_sparsity(path: str | os.PathLike[str]) -> float | None:
    """The effective sparsity of a saved mask file, rebuilding its zoo model from the mask's
    metadata ("model", "model_args", "input_shape"); None when the file cannot be read or
    does not name a zoo model (the masks alone do not say how the layers connect).

    >>> mask_effective_sparsity("no/such/mask.safetensors") is None
    True
    """
    from ntksap import models
    from ntksap.masks import Masks, effective

    try:
        masks = Masks.load(path)
        meta = masks.metadata
        args = dict(meta.get("model_args") or {})
        name = args.pop("name", None) or meta.get("model")
        shape = meta.get("input_shape")
        if not isinstance(name, str) or name.lower() not in models.list_models() or not shape:
            return None
        import torch

        with torch.random.fork_rng(devices=[]):  # the weights' values do not matter
            # the keywords come from the file: the model must fit its masks on the meta
            # device before it is allocated (a forged `hidden` would allocate gigabytes)
            model = masks.build_fitting(lambda: models.create(name, **args))
        return 1.0 - effective(model, masks, input_shape=shape).density
    except Exception:  # a torn or foreign file: the report shows n/a, it does not fail
        return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": (1, 2)} (lists become tuples, hashable).

    >>> flatten({"train": {"lr": 0.1, "milestones": [80, 120]}, "model": "resnet20"})
    {'train.lr': 0.1, 'train.milestones': (80, 120), 'model': 'resnet20'}
    """
    out: dict[str, Any] = {}
    for key, val in d.items():
        name = f"{prefix}{key}"
        if isinstance(val, Mapping):
            out.update(flatten(val, name + "."))
        elif isinstance(val, list):
            out[name] = tuple(val)
        else:
            out[name] = val
    return out


def read_record(folder: str | os.PathLike[str]) -> Record:
    """The record of one run folder (a torn or missing file reads as absent, never raises)."""
    folder = Path(folder)
    state = status(folder)

    def load(name: str) -> dict[str, Any] | None:
        try:
            data = read_json(folder / name)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    config = load(CONFIG_FILE) or {}
    return Record(
        name=folder.name,
        folder=folder,
        status="edited" if state != "new" and is_edited(folder, config) else state,
        config=config,
        result=load(RESULT_FILE) if state not in ("new", "incomplete") else None,
    )


def find_run_folders(dirs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every run folder in or under `dirs`, sorted, once each: a folder with config.json,
    and every folder directly under a sweep's `runs/`, config.json or not (a run whose
    config.json is missing is then reported as unreadable, never silently left out).

    A directory may be a run folder itself, a sweep folder (runs under `runs/`, with
    sweep.json beside), or any folder holding either. A path that does not exist is an
    error (FileNotFoundError).
    """
    found: set[Path] = set()
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is not a folder (give sweep or run folders)")
        if (d / CONFIG_FILE).is_file():
            found.add(d.resolve())
            continue
        for cfg in d.rglob(CONFIG_FILE):
            found.add(cfg.parent.resolve())
        sweeps = [d] if (d / SWEEP_FILE).is_file() else []
        sweeps += [f.parent for f in d.rglob(SWEEP_FILE)]
        for sweep in sweeps:
            runs_dir = sweep / RUNS_DIR
            if runs_dir.is_dir():
                found.update(p.resolve() for p in runs_dir.iterdir() if p.is_dir())
    return sorted(found)


__all__ = [
    "NOT_GROUPING",
    "NOT_HASHED",
    "RUNS_DIR",
    "SWEEP_FILE",
    "Record",
    "canonical",
    "config_hash",
    "find_run_folders",
    "flatten",
    "is_edited",
    "mask_effective_sparsity",
    "read_record",
    "recorded_identity",
    "run_identity",
    "settings_of",
]
