"""Sweeps: methods x sparsities x seeds (x any setting), one run folder per (cell, seed).

A sweep is a grid of `ntksap.run` calls. Every (cell, seed) becomes one run folder under
`SWEEP/runs/`, written exactly as `ntksap run` writes it and named by a readable label plus a
short hash of its resolved settings (`ntksap-s98.2-seed0-1a2b3c4d`): the same settings always
land in the same folder, different settings never share one. A run's identity is the sha256
of its canonical settings (`ntksap.experiments.records.run_identity`: `lr` and `train.lr` are
one key, 1 and 1.0 one number), recorded in its folder (identity.json); where two settings
would share a short name, or a folder of that name belongs to other settings, the name takes
more digits of the hash. Re-running a sweep therefore skips finished (and diverged) runs,
resumes interrupted ones from what they saved, and retries failed ones only when asked
(`retry_failed`). A folder whose config.json was edited by hand is reported as "edited" and
left alone: not counted as done, not run over.

Settings come from a TOML file (`configs/*.toml`) and/or keyword overrides:

    [run]                       # every run: preset, model, dataset, data_dir, and fixed
    preset = "cifar10-resnet20" # pruning settings (rounds, schedule, scope, shuffle, ...)
    [train]                     # TrainConfig overrides (epochs, lr, batch_size, ...)
    epochs = 160
    [options]                   # method options, applied to the methods that have them
    resamples = 5
    [grid]
    methods = ["synflow", "ntksap"]
    compression = [2, 6, 10, 14, 18]   # density 0.8^k; or sparsities = [...] / densities
    seeds = [0, 1, 2]
    [grid.axes]                 # further axes: any pruning setting, method option or
    rounds = [1, 5, 20]         # training setting, e.g. epsilon, shuffle, reinit, lr
    [methods.ntksap]            # settings of one method (override [run]/[options]/[train])
    rounds = 20
    [slurm]                     # `executor = "slurm"`: partition, gpus_per_task, ...
    partition = "gpu"

An axis that is an option of some methods only (e.g. `resamples`) multiplies only their
cells. A key that is both a training setting and a method option (`batch_size`) must be
qualified: `train.batch_size` or `options.batch_size`. Each setting is given once per level:
fixed ([run], [train], [options]), per method, axis; a level overrides the one before it
under the same name, and two spellings of one setting (`lr` and `train.lr`) are an error.
Every key and value is checked (types included) before any work.

Scale-out: `shard=(i, n)` runs the i-th of n disjoint slices (Slurm array variables are read
when no shard is given); `executor="local", jobs=N` runs N at a time on this machine (one GPU
each when there are several); `executor="slurm"` submits a job array through submitit. Only
the process that drives the whole sweep on one machine writes the SQLite index; shards and
cluster jobs write only their run folders, and `ntksap report` merges them. The index is a
cache: one that is corrupt is moved aside and rebuilt, one that is locked is passed by with a
note; local worker processes die with the process that started them.

Example:
    >>> spec = Sweep.from_dict({"run": {"dataset": "digits"}, "train": {"epochs": 1},
    ...     "grid": {"methods": ["random", "snip"], "sparsities": [0.9], "seeds": [0, 1]}})
    >>> [c.name.rsplit("-", 1)[0] for c in plan(spec, "sweeps/demo")]
    ['random-s90-seed0', 'random-s90-seed1', 'snip-s90-seed0', 'snip-s90-seed1']
    >>> summary = run_sweep(spec, "sweeps/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ntksap import runs
from ntksap import validate as v
from ntksap.experiments.index import RUNS_DIR, SWEEP_FILE, Index, IndexUnavailable
from ntksap.experiments.records import canonical, config_hash, recorded_identity, run_identity
from ntksap.files import read_json, write_json
from ntksap.pruning import resolve_density
from ntksap.scoring import get_method, list_methods
from ntksap.training.config import TrainConfig

#: Keys of `ntksap.run` that are pruning settings (fixed in [run], or axes).
RUN_KEYS = (
    "rounds",
    "schedule",
    "scope",
    "floor",
    "include_bias",
    "exclude",
    "include",
    "invert",
    "shuffle",
    "reinit",
    "effective",
    "effective_tolerance",
)
#: Keys of `ntksap.run` that name the setting (fixed for a sweep, never axes).
BASE_KEYS = ("preset", "model", "dataset", "data_dir")
#: Training settings (TrainConfig fields; the seed is the grid's).
TRAIN_KEYS = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("seed", "preset")
)
EXECUTORS = ("local", "slurm", "submitit-local")
#: Settings whose value is a list (an axis of one takes a list per run): what the list holds.
LIST_KEYS = {("run", "exclude"): "patterns", ("run", "include"): "patterns",
             ("train", "milestones"): "epochs"}  # fmt: skip
_GRID_KEYS = ("methods", "sparsities", "densities", "compression", "seeds", "axes")
_SLURM_INTS = ("gpus_per_task", "cpus_per_task", "mem_gb", "time_minutes", "array_parallelism")
_SLURM_KEYS = (
    "partition",
    "gpus_per_task",
    "cpus_per_task",
    "mem_gb",
    "time_minutes",
    "account",
    "qos",
    "constraint",
    "array_parallelism",
)


class SweepError(ValueError):
    """A sweep specification that cannot be run (named key, valid choices)."""


# ---------------------------------------------------------------------------------------
# Types of the values read from a file or flags
# ---------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    """What a value is, in TOML's words (for messages)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _toml(value: Any) -> str:
    """`value` as TOML writes it (for examples in messages)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(x) for x in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _table(where: str, value: Any) -> dict[str, Any]:
    """`value` as a dict; an error naming `where` if it is not a table."""
    if not isinstance(value, Mapping):
        raise SweepError(
            f"{where} must be a table (a [header] with key = value lines), got {_kind(value)}: "
            f"{value!r}"
        )
    return dict(value)


def _list(where: str, key: str, value: Any, example: str) -> list[Any]:
    """`value` as a list; an error naming `where` if it is not one (a TOML string is never
    taken apart into its letters)."""
    if isinstance(value, list | tuple):
        return list(value)
    fix = f"{key} = [{_toml(value)}]" if not isinstance(value, Mapping) else example
    raise SweepError(f"{where} must be a list, e.g. {fix}, got {_kind(value)}: {value!r}")


def _numbers(where: str, values: Sequence[Any]) -> list[float]:
    """Each value a finite number (true/false is not one)."""
    for x in values:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise SweepError(f"{where} must hold numbers, got {_kind(x)}: {x!r}")
        if not math.isfinite(x):
            raise SweepError(f"{where} must hold finite numbers, got {x!r}")
    return [float(x) for x in values]


def _what(key: tuple[str, str]) -> str:
    kind, name = key
    return {"run": "pruning setting", "train": "training setting", "option": "method option"}[
        kind
    ] + f" {name}"


def _check_value(where: str, key: tuple[str, str], value: Any) -> None:
    """The shape of one setting's value: a list for `LIST_KEYS` (of strings for patterns),
    else one value (no list, no table); numbers finite. The rest is checked by
    `ntksap.runs.prepare` for every run, before any work."""
    name = key[1]
    if key in LIST_KEYS:
        example = '["layers.5*"]' if key[0] == "run" else "[80, 120]"
        if not isinstance(value, list | tuple):
            raise SweepError(
                f"{where} must be a list of {LIST_KEYS[key]}, e.g. {name} = {example} "
                f"(on the command line: {name}=[...]), got {_kind(value)}: {value!r}"
            )
        for x in value:
            if key[0] == "run" and not isinstance(x, str):
                raise SweepError(f"{where} must hold strings (name patterns), got {x!r}")
        return
    if isinstance(value, Mapping):
        raise SweepError(f"{where} must be one value, got a table: {value!r}")
    if isinstance(value, list | tuple):
        raise SweepError(
            f"{where} must be one value, got a list: {_toml(value)} (one run per value is an "
            f"axis: [grid.axes] {name} = {_toml(value)})"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise SweepError(f"{where} must be a finite number, got {value!r}")


# ---------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------
def _all_options(methods: Sequence[str]) -> dict[str, list[str]]:
    """option name -> the methods (of `methods`) that declare it."""
    out: dict[str, list[str]] = {}
    for m in methods:
        for name in get_method(m).options:
            out.setdefault(name, []).append(m)
    return out


def classify(key: str, methods: Sequence[str]) -> tuple[str, str]:
    """Where a setting goes: ("run" | "train" | "option", name).

    >>> classify("rounds", ["ntksap"]), classify("lr", ["ntksap"]), classify("epsilon", ["ntksap"])
    (('run', 'rounds'), ('train', 'lr'), ('option', 'epsilon'))
    >>> classify("train.batch_size", ["ntksap"])
    ('train', 'batch_size')
    """
    k = key.strip().replace("-", "_")
    options = _all_options(methods)
    prefix, _, rest = k.partition(".")
    if rest:
        if prefix == "train" and rest in TRAIN_KEYS:
            return "train", rest
        if prefix in ("options", "option") and rest in options:
            return "option", rest
        if prefix == "prune" and rest in RUN_KEYS:
            return "run", rest
        raise SweepError(
            f"unknown setting {key!r}: use train.<{'|'.join(TRAIN_KEYS)}>, "
            f"options.<{'|'.join(sorted(options)) or 'none'}> or prune.<{'|'.join(RUN_KEYS)}>"
        )
    if k in ("seed", "seeds", "method", "methods", "density", "sparsity", "sparsities"):
        raise SweepError(f"{key!r} is a grid dimension: give it under [grid] (or --{k}), not here")
    if k in RUN_KEYS:
        return "run", k
    in_train, in_options = k in TRAIN_KEYS, k in options
    if in_train and in_options:
        raise SweepError(
            f"{key!r} is both a training setting and an option of {', '.join(options[k])}: "
            f"write train.{k} or options.{k}"
        )
    if in_train:
        return "train", k
    if in_options:
        return "option", k
    valid = sorted({*RUN_KEYS, *TRAIN_KEYS, *options})
    raise SweepError(
        f"unknown setting {key!r} for methods {', '.join(methods)}; valid: {', '.join(valid)}"
    )


def parse_value(text: str) -> Any:
    """A flag value as TOML would read it: ints, floats, true/false, [a, b] lists, else the
    string.

    >>> [parse_value(t) for t in ("5", "0.01", "true", "none", "cosine", "[fc*,conv1*]")]
    [5, 0.01, True, None, 'cosine', ['fc*', 'conv1*']]
    """
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        return [parse_value(x) for x in t[1:-1].split(",") if x.strip()]
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def none_as_choice(key: str, value: Any, methods: Sequence[str]) -> Any:
    """`value` with None (a flag's "none") turned back into the string "none" where `key`
    (or METHOD.key) is a string option of one of `methods` that has "none" among its
    choices and takes no None, e.g. ntksap's init=none; lists element-wise.

    >>> none_as_choice("init", [None, "auto"], ["ntksap"]), none_as_choice("rounds", None, [])
    (['none', 'auto'], None)
    """
    method, dot, rest = key.partition(".")
    name, owners = (rest, [method.lower()]) if dot else (key, list(methods))
    name = name.strip().replace("-", "_")
    for m in owners:
        opt = get_method(m).options.get(name) if m in list_methods() else None
        if opt is not None and not opt.allow_none and "none" in (opt.choices or ()):
            if isinstance(value, list):
                return ["none" if v is None else v for v in value]
            return "none" if value is None else value
    return value


def parse_assignment(text: str, *, many: bool) -> tuple[str, Any]:
    """ "rounds=1,5,20" -> ("rounds", [1, 5, 20]) (many) or "epsilon=0.01" -> ("epsilon", 0.01)."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip() or not values.strip():
        example = "rounds=1,5,20" if many else "resamples=1"
        form = "KEY=VALUES" if many else "KEY=VALUE"
        raise SweepError(f"bad setting {text!r}: write {form}, e.g. {example}")
    if many:  # lists as values: rounds=1,5 is two runs, exclude=[fc*],[conv1*] two lists
        return key.strip(), [parse_value(x) for x in values.split(",") if x.strip()]
    return key.strip(), parse_value(values)


# ---------------------------------------------------------------------------------------
# The specification
# ---------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """A sweep: fixed settings, the grid, per-method settings, executor settings."""

    base: dict[str, Any] = field(default_factory=dict)  # preset, model, dataset, data_dir
    run: dict[str, Any] = field(default_factory=dict)  # fixed pruning settings (+ options)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    options: dict[str, Any] = field(default_factory=dict)  # method options, where they exist
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: ["ntksap"])
    densities: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    axes: dict[str, list[Any]] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)  # name, jobs
    slurm: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Sweep:
        """Read a sweep file (see the module docstring for its tables)."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise SweepError(f"sweep file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SweepError(f"{path} is not valid TOML: {exc}") from None
        try:
            return cls.from_dict(raw)
        except SweepError as exc:
            raise SweepError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Sweep:
        """From the TOML tables as a dict; every key is checked (unknown ones are errors)."""
        raw = _table("the sweep file", raw)
        tables = ("name", "run", "train", "options", "grid", "methods", "executor", "slurm")
        _unknown("top-level table", raw, tables)
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            raise SweepError(f"name must be a string, got {_kind(name)}: {name!r}")
        spec = cls(name=name)
        run = _table("[run]", raw.get("run", {}))
        for key in BASE_KEYS:
            if key in run and not isinstance(run[key], str):
                raise SweepError(
                    f"[run] {key} must be a string, got {_kind(run[key])}: {run[key]!r}"
                )
        spec.base = {k: run.pop(k) for k in BASE_KEYS if k in run}
        spec.run = run
        spec.train = _table("[train]", raw.get("train", {}))
        spec.options = _table("[options]", raw.get("options", {}))
        grid = _table("[grid]", raw.get("grid", {}))
        _unknown("[grid] key", grid, _GRID_KEYS)
        if "methods" in grid:
            methods = _list("[grid] methods", "methods", grid["methods"], 'methods = ["snip"]')
            for m in methods:
                if not isinstance(m, str):
                    raise SweepError(
                        f"[grid] methods must hold method names (strings), got {_kind(m)}: {m!r}"
                    )
            spec.methods = [m.lower() for m in methods]
        densities = {}
        for key in ("sparsities", "densities", "compression"):
            if key in grid:
                where = f"[grid] {key}"
                densities[key] = _numbers(where, _list(where, key, grid[key], f"{key} = [0.9]"))
        spec.set_density_grid(**densities)
        if "seeds" in grid:
            spec.seeds = _list("[grid] seeds", "seeds", grid["seeds"], "seeds = [0, 1, 2]")
        axes = _table("[grid.axes]", grid.get("axes", {}))
        spec.axes = {
            k: _list(f"[grid.axes] {k}", k, vals, f"{k} = [1, 2]") for k, vals in axes.items()
        }
        if isinstance(raw.get("methods"), list):  # the grid's list, written at the top
            raise SweepError(
                f"[methods] must be a table of per-method settings ([methods.ntksap] ...), got "
                f"a list: {raw['methods']!r}; the methods to compare go in [grid]: "
                f"methods = {_toml(raw['methods'])}"
            )
        per_method = _table("[methods]", raw.get("methods", {}))
        spec.per_method = {
            str(m).lower(): _table(f"[methods.{m}] (settings of the method {m!r})", t)
            for m, t in per_method.items()
        }
        spec.executor = _table("[executor]", raw.get("executor", {}))
        _unknown("[executor] key", spec.executor, ("name", "jobs"))
        spec.slurm = _table("[slurm]", raw.get("slurm", {}))
        _unknown("[slurm] key", spec.slurm, _SLURM_KEYS)
        return spec

    def set_density_grid(
        self,
        *,
        sparsities: Sequence[float] | None = None,
        densities: Sequence[float] | None = None,
        compression: Sequence[float] | None = None,
    ) -> None:
        """Set the densities from exactly one of sparsities, densities or compression k
        (density 0.8^k, the paper's grid)."""
        given = [x for x in (sparsities, densities, compression) if x is not None]
        if len(given) > 1:
            raise SweepError("give one of sparsities, densities or compression, not several")
        for key, values in (("sparsities", sparsities), ("densities", densities),
                            ("compression", compression)):  # fmt: skip
            if values is not None:
                _numbers(key, _list(key, key, values, f"{key} = [0.9]"))
        if sparsities is not None:
            # 1 - 0.9 is 0.09999999999999998: rounded, so config.json and hashes read 0.1
            self.densities = [round(resolve_density(None, float(s)), 12) for s in sparsities]
        elif densities is not None:
            self.densities = [resolve_density(float(d), None) for d in densities]
        elif compression is not None:
            for k in compression:
                v.finite_float("compression", k, low=0.0)
            self.densities = [
                round(resolve_density(0.8 ** float(k), None), 12) for k in compression
            ]

    def to_dict(self) -> dict[str, Any]:
        """The TOML tables as a dict (what sweep.json records)."""
        return {
            "name": self.name,
            "run": {
                **self.base,
                **{k: str(v) if isinstance(v, Path) else v for k, v in self.run.items()},
            },
            "train": self.train,
            "options": self.options,
            "grid": {
                "methods": self.methods,
                "densities": self.densities,
                "seeds": self.seeds,
                "axes": self.axes,
            },
            "methods": self.per_method,
            "executor": self.executor,
            "slurm": self.slurm,
        }

    # -- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Names, values and combinations, before any work (each cell is checked by `plan`)."""
        if not self.methods:
            raise SweepError("the sweep has no methods: give [grid] methods or --methods")
        for m in self.methods:
            v.choice("method", m, list_methods())
        if len(set(self.methods)) != len(self.methods):
            raise SweepError(f"methods repeated: {self.methods}")
        if not self.densities:
            raise SweepError(
                "the sweep has no sparsities: give [grid] sparsities, densities or compression "
                "(or --sparsities / --densities / --compression)"
            )
        if not self.seeds:
            raise SweepError("the sweep has no seeds: give [grid] seeds or --seeds")
        _numbers("densities", _list("densities", "densities", self.densities, "[0.1]"))
        for s in _list("[grid] seeds", "seeds", self.seeds, "seeds = [0, 1, 2]"):
            v.seed(s, "[grid] seeds: each seed")
        for what, vals in (("densities", self.densities), ("seeds", self.seeds)):
            if len(set(vals)) != len(vals):
                raise SweepError(f"{what} repeated: {vals}")
        self.setting_keys()  # every key known, given once, with a value of the right shape
        for key, vals in self.axes.items():
            if not vals:
                raise SweepError(f"axis {key!r} has no values")
            texts = [json.dumps(canonical(x), sort_keys=True) for x in vals]
            for j, text in enumerate(texts):
                if text in texts[:j]:
                    first = vals[texts.index(text)]
                    raise SweepError(
                        f"axis {key!r} repeats a value: {first!r} and {vals[j]!r} are the same "
                        f"setting (numbers compare by value, 1 == 1.0); give it once"
                    )
        name = self.executor.get("name", "local")
        v.choice("executor", name, EXECUTORS)
        v.positive_int("jobs", self.executor.get("jobs", 1))
        for key, value in self.slurm.items():
            if key in _SLURM_INTS:
                low = 0 if key == "gpus_per_task" else 1
                v.int_in_range(f"[slurm] {key}", value, low, 10**9)
            elif not isinstance(value, str):
                raise SweepError(f"[slurm] {key} must be a string, got {_kind(value)}: {value!r}")

    def setting_keys(self) -> dict[str, dict[tuple[str, str], str]]:
        """Every setting's canonical key ((kind, name), see `classify`) -> where it is given
        ("[train] lr", "[grid.axes] train.lr"), per level: "fixed", "axes", "method:<m>".

        Raises SweepError for an unknown key, a value of the wrong shape (`_check_value`), a
        setting given twice in one level (in two tables, or in two spellings), and an axis
        that spells a fixed or per-method setting another way (`lr` vs `train.lr`: say which).
        """
        levels: dict[str, dict[tuple[str, str], str]] = {"fixed": {}, "axes": {}}
        spelled: dict[str, str] = {}  # where -> the key as written (normalised)

        def add(level: str, where: str, key: str, canon: tuple[str, str], value: Any) -> None:
            _check_value(where, canon, value)
            found = levels.setdefault(level, {})
            if canon in found:
                raise SweepError(
                    f"{found[canon]} and {where} set the same {_what(canon)}: give it once"
                )
            found[canon] = where
            spelled[where] = key.strip().replace("-", "_")

        options = _all_options(self.methods)
        for key, value in self.train.items():
            name = key.replace("-", "_")
            if name not in TRAIN_KEYS:
                raise SweepError(f"unknown [train] setting {key!r}; valid: {', '.join(TRAIN_KEYS)}")
            add("fixed", f"[train] {key}", key, ("train", name), value)
        for key, value in self.options.items():
            name = key.replace("-", "_")
            if name not in options:
                raise SweepError(
                    f"option {key!r} belongs to none of the methods {', '.join(self.methods)}; "
                    f"their options: {', '.join(sorted(options)) or 'none'}"
                )
            add("fixed", f"[options] {key}", key, ("option", name), value)
        for key, value in self.run.items():
            add("fixed", f"[run] {key}", key, classify(key, self.methods), value)
        for key, vals in self.axes.items():
            canon = classify_axis(key, self.methods)
            where = f"[grid.axes] {key}"
            for x in _list(where, key, vals, f"{key} = [1, 2]"):
                _check_value(f"a value of {where}", canon, x)
            found = levels["axes"]
            if canon in found:
                raise SweepError(
                    f"the axes {found[canon]} and {where} are the same {_what(canon)}: give "
                    "one axis (a run would be labelled by one and trained with the other)"
                )
            found[canon] = where
            spelled[where] = key.strip().replace("-", "_")
        for m, table in self.per_method.items():
            if m not in self.methods:
                raise SweepError(
                    f"[methods.{m}] names a method that is not in the grid "
                    f"({', '.join(self.methods)})"
                )
            for key, value in _table(f"[methods.{m}]", table).items():
                add(f"method:{m}", f"[methods.{m}] {key}", key, classify(key, [m]), value)
        for canon, where in levels["axes"].items():
            for level, found in levels.items():
                other = found.get(canon)
                if level != "axes" and other and spelled[other] != spelled[where]:
                    raise SweepError(
                        f"{where} and {other} are two spellings of the {_what(canon)}: write "
                        f"both as {spelled[where]!r} (the axis then overrides the fixed value) "
                        "or drop one"
                    )
        return levels

    def drop(self, key: tuple[str, str]) -> list[str]:
        """Remove every fixed setting and axis whose canonical key is `key` (the command
        line's flags replace the file's); returns the keys removed, as written. Keys that
        cannot be classified stay, for `validate` to report."""
        removed = []
        for table, kind in ((self.train, "train"), (self.options, "option")):
            for k in [k for k in table if (kind, k.replace("-", "_")) == key]:
                del table[k]
                removed.append(k)
        for table, classify_key in ((self.run, classify), (self.axes, classify_axis)):
            for k in list(table):
                try:
                    same = classify_key(k, self.methods) == key
                except SweepError:
                    continue
                if same:
                    del table[k]
                    removed.append(k)
        return removed


def _unknown(what: str, given: Mapping[str, Any], valid: Sequence[str]) -> None:
    bad = [k for k in given if k not in valid]
    if bad:
        raise SweepError(f"unknown {what} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One run of the sweep: its folder name, the hash in it, labels, the validated request
    and its identity (sha256 of the canonical settings, `records.run_identity`)."""

    name: str
    hash: str
    method: str
    density: float
    seed: int
    axes: dict[str, Any]
    request: runs.RunRequest
    identity: str = ""

    @property
    def folder(self) -> Path:
        return self.request.out


#: What an "edited" run's outcome says (the folder's config.json was changed by hand).
EDITED_MESSAGE = (
    "config.json no longer has the settings this run was made with (edited by hand?); its "
    "files are kept and it is not counted as done. Restore config.json, or move the folder "
    "out of runs/ and run the sweep again to redo the run"
)


def cell_status(cell: Cell) -> str:
    """`ntksap.runs.status` of the cell's folder, or "edited" when its config.json has
    settings other than the cell's (changed by hand after the run was made)."""
    state = runs.status(cell.folder)
    if state == "new":
        return state
    config = _read_config(cell.folder)
    if config and run_identity(config) != cell.identity:
        return "edited"
    return state


def _read_config(folder: Path) -> dict[str, Any] | None:
    """config.json of a run folder; None when absent, {} when unreadable (torn, not a
    table): `ntksap.runs` reports those when the run is resumed."""
    path = folder / runs.CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _owner(folder: Path, identity: str, suffix: str) -> str:
    """Whose is the run folder `folder` (named ...-`suffix`): "free" (nothing saved),
    "ours" (made for the settings `identity`, edited since or not), or "other" (made for
    other settings whose hash starts the same: the cell takes a longer name)."""
    config = _read_config(folder)
    if config is None:
        return "free"
    recorded = recorded_identity(folder)
    if recorded is not None:
        return "ours" if recorded == identity else "other"
    if not config or run_identity(config) == identity:
        return "ours"  # an unreadable config: `ntksap.runs` refuses to resume over it
    # a folder of an earlier version (no identity.json): its settings hash to its name when
    # it is another cell's; when they do not, it is this cell's, edited by hand
    return "other" if config_hash(config, 64).startswith(suffix) else "ours"


def _pct(density: float) -> str:
    """Sparsity in % for folder names: 0.018 -> "98.2", 0.36 -> "64"."""
    return f"{100 * (1 - density):.4g}"


def _label(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.+]+", "_", text)


def _place(kwargs: dict[str, Any], kind: str, name: str, value: Any) -> None:
    if kind == "run":
        kwargs[name] = list(value) if name in ("exclude", "include") else value
    elif kind == "train":
        kwargs["train"][name] = value
    else:
        kwargs["options"][name] = value


def plan(spec: Sweep, out: str | os.PathLike[str]) -> list[Cell]:
    """Every (cell, seed) of the sweep, validated with `ntksap.runs.prepare` (no work done).

    Order: methods, then densities, then axis values, then seeds (a shard takes every n-th
    run of this list, so shards get a mix of cheap and costly runs). Two runs with the same
    settings are an error naming both. Each run's folder is `<label>-<8 hex digits of
    config_hash>`, with more digits where another run of the plan, or an existing folder made
    for other settings, has that name (existing folders are read, never written).
    """
    spec.validate()
    out = Path(out)
    cells: list[Cell] = []
    seen: dict[str, str] = {}  # identity -> label of the run that has it
    taken: set[str] = set()
    for method in spec.methods:
        opts = get_method(method).options
        axes = {k: vals for k, vals in spec.axes.items() if _applies(k, method, opts)}
        for density in spec.densities:
            for combo in itertools.product(*axes.values()):
                chosen = dict(zip(axes, combo))
                for seed in spec.seeds:
                    kwargs = _kwargs(spec, method, opts, chosen)
                    try:
                        req = runs.prepare(
                            out,
                            method=method,
                            density=density,
                            seed=seed,
                            log=lambda _msg: None,
                            **kwargs,
                        )
                    except (ValueError, TypeError) as exc:
                        where = ", ".join(f"{k}={val}" for k, val in chosen.items())
                        raise SweepError(
                            f"run {method} at density {density:.4g}"
                            + (f" ({where})" if where else "")
                            + f": {exc}"
                        ) from None
                    settings = req.settings()
                    identity = run_identity(settings)
                    label = "-".join(
                        [method, f"s{_pct(density)}"]
                        + [
                            f"{classify(k, list_methods())[1]}{_label(x)}"
                            for k, x in chosen.items()
                        ]
                        + [f"seed{seed}"]
                    )
                    if identity in seen:
                        raise SweepError(
                            f"runs {seen[identity]} and {label} have the same settings: "
                            "remove the value that repeats another"
                        )
                    seen[identity] = label
                    full = config_hash(settings, 64)
                    for n in (8, 16, 32, 64):
                        name = f"{label}-{full[:n]}"
                        owner = _owner(out / RUNS_DIR / name, identity, full[:n])
                        if name not in taken and owner != "other":
                            break
                    taken.add(name)
                    req.out = out / RUNS_DIR / name
                    req.identity = identity
                    cells.append(Cell(name, full[:8], method, density, seed, chosen, req,
                                      identity))  # fmt: skip
    return cells


def classify_axis(key: str, methods: Sequence[str]) -> tuple[str, str]:
    """`classify` for an axis: an option of any registered method counts (it multiplies the
    cells of the methods that have it), but at least one of `methods` must have it."""
    kind, name = classify(key, list_methods())
    if kind == "option" and not any(name in get_method(m).options for m in methods):
        raise SweepError(f"axis {key!r} is an option of none of the methods {', '.join(methods)}")
    return kind, name


def _applies(key: str, method: str, options: Mapping[str, Any]) -> bool:
    kind, name = classify(key, list_methods())
    return kind != "option" or name in options


def _kwargs(
    spec: Sweep, method: str, opts: Mapping[str, Any], chosen: Mapping[str, Any]
) -> dict[str, Any]:
    """`ntksap.run` keywords for one cell: fixed < per-method < axis values."""
    kwargs: dict[str, Any] = {**spec.base, "train": dict(spec.train), "options": {}}
    for key, value in spec.options.items():
        if key.replace("-", "_") in opts:
            kwargs["options"][key.replace("-", "_")] = value
    for key, value in spec.run.items():
        kind, name = classify(key, spec.methods)
        if kind != "option" or name in opts:
            _place(kwargs, kind, name, value)
    for key, value in spec.per_method.get(method, {}).items():
        _place(kwargs, *classify(key, [method]), value)
    for key, value in chosen.items():
        _place(kwargs, *classify(key, list_methods()), value)
    return kwargs


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/n" -> (i, n), 0 <= i < n (the i-th of n disjoint slices).

    >>> parse_shard("0/2")
    (0, 2)
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise SweepError(f"bad shard {text!r}: write i/n with 0 <= i < n, e.g. 0/4")
    i, n = int(m[1]), int(m[2])
    if n < 1 or not 0 <= i < n:
        raise SweepError(f"bad shard {text!r}: i must be in 0..n-1 (4 slices: 0/4 .. 3/4)")
    return i, n


def shard_from_environment(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(i, n) from a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT and
    SLURM_ARRAY_TASK_MIN), or None outside one."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    except ValueError:
        raise SweepError("SLURM_ARRAY_TASK_ID / _COUNT / _MIN are not integers") from None
    return parse_shard(f"{task}/{count}")


def select_shard(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The runs of shard (i, n): every n-th run from the i-th (disjoint, together all)."""
    if shard is None:
        return list(cells)
    i, n = shard
    return list(cells[i::n])


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one run in this invocation."""

    name: str
    status: str  # finished, diverged, failed, interrupted, skipped-busy, ...
    before: str  # its status before this invocation
    top1: float | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class SweepSummary:
    out: Path
    planned: int  # runs in the whole sweep
    selected: int  # runs of this shard
    outcomes: list[Outcome]
    submitted: list[str] = field(default_factory=list)  # submitit job ids
    pending: bool = False  # jobs submitted and not waited for (slurm without wait)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out

    @property
    def ok(self) -> bool:
        """No run failed or was interrupted in this invocation (diverged is a result)."""
        return all(o.status in ("finished", "diverged", "skipped") for o in self.outcomes)


def _job(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one cell (in this process, a worker process, or a submitit job); never raises for
    a failing run: its folder records the error and the outcome says so."""
    req: runs.RunRequest = payload["request"]
    threads = payload.get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    name = req.out.name
    quiet = payload.get("quiet", False)
    prefix = payload.get("prefix", f"[{name}] ")

    def log(msg: str) -> None:
        if not quiet:
            print(f"{prefix}{msg}", flush=True)

    parent = _WORKER_SLOT.get("parent")
    if parent is not None and os.getppid() != parent:  # the sweep is gone: take no more work
        os._exit(1)
    device = payload.get("device")
    slot = _WORKER_SLOT.get("slot")
    if device is None and slot is not None:
        device = _gpu_for_slot(slot)
    start = time.perf_counter()
    before = runs.status(req.out)
    try:
        result = runs.execute(
            req,
            resume=before != "new",
            device=device,
            workers=payload.get("workers"),
            progress=payload.get("progress", False),
            log=log,
        )
        out = {
            "status": result.get("status", "finished"),
            "top1": result.get("final_top1"),
            "error": result.get("error"),
        }
    except runs.RunBusyError as exc:
        out = {"status": "skipped-busy", "error": str(exc)}
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded in the folder's result.json by runs; the sweep goes on
        out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    return {"name": name, "before": before, "seconds": time.perf_counter() - start, **out}


_WORKER_SLOT: dict[str, int] = {}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 0.5


def _init_worker(slots: Any, parent: int) -> None:
    """Initialiser of a local pool worker: its slot (GPU) number, and it dies with `parent`
    (the sweep process): a SIGKILLed sweep cannot shut its pool down, and workers left
    behind would run the queue and wait for more forever."""
    _die_with_parent(parent)
    _WORKER_SLOT["slot"] = slots.get()


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel SIGKILLs this process when its parent dies (PR_SET_PDEATHSIG).
    Everywhere, as a fallback: a thread exits the process once the parent pid changes (the
    orphan was re-parented), and `_job` checks it before each run."""
    _WORKER_SLOT["parent"] = parent
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the thread below still watches
            pass
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="ntksap-parent-watch", daemon=True).start()


def _gpu_for_slot(slot: int) -> str | None:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{slot % n}" if n else None


def run_sweep(
    spec: Sweep,
    out: str | os.PathLike[str],
    *,
    shard: tuple[int, int] | None = None,
    executor: str | None = None,
    jobs: int | None = None,
    retry_failed: bool = False,
    wait: bool = False,
    device: str | None = None,
    workers: int | None = None,
    quiet: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> SweepSummary:
    """Run (or continue) the sweep `spec` in the folder `out`; see the module docstring.

    Args:
        shard: (i, n) to run only the i-th of n slices; None reads a Slurm job array's
            variables, else runs everything.
        executor: "local" (default; `jobs` at a time), "slurm" (a submitit job array), or
            "submitit-local" (the same job array as local processes, to test the cluster path).
        retry_failed: run failed runs again (resuming from what they saved).
        wait: for "slurm", wait for the jobs (default: submit and return).
        device / workers / progress: as `ntksap.run`.
        quiet: print one line per run instead of the runs' epoch lines.

    Returns:
        SweepSummary; each run's outcome (finished, diverged, failed, skipped, ...).
    """
    out = Path(out)
    executor = executor or spec.executor.get("name", "local")
    v.choice("executor", executor, EXECUTORS)
    jobs = v.positive_int("jobs", jobs if jobs is not None else spec.executor.get("jobs", 1))
    if shard is None:
        shard = shard_from_environment()
        if shard is not None:
            log(f"shard {shard[0]}/{shard[1]} from the Slurm job array")
    if executor == "slurm":
        _check_slurm()
    cells = plan(spec, out)  # every cell validated before any work
    mine = select_shard(cells, shard)
    todo: list[Cell] = []
    outcomes: list[Outcome] = []
    for c in mine:
        state = cell_status(c)
        if state == "edited":  # never run over, never counted as done
            outcomes.append(Outcome(c.name, "edited", runs.status(c.folder), error=EDITED_MESSAGE))
        elif state in runs.FINAL_STATUSES or (state == "failed" and not retry_failed):
            outcomes.append(Outcome(c.name, "skipped", state))
        else:
            todo.append(c)
    if executor != "slurm":  # cluster nodes may mount data the login node does not see
        _check_data(todo)
    if out.exists() and not out.is_dir():
        raise SweepError(f"sweep folder {out} exists and is not a folder")
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    write_json(
        out / SWEEP_FILE,
        {
            **spec.to_dict(),
            "axis_paths": {k: _axis_path(k, spec) for k in spec.axes},
            "runs": [c.name for c in cells],
        },
    )
    # One writer per machine for the index: the process driving the whole sweep.
    index = Index(out, note=log) if shard is None and executor != "slurm" else None
    index = _synced(index, [c.folder for c in cells if c.folder.exists()], log)

    edited = sum(o.status == "edited" for o in outcomes)
    done_before = len(mine) - len(todo) - edited
    where = f" (shard {shard[0]}/{shard[1]}: {len(mine)} of {len(cells)})" if shard else ""
    failed_kept = sum(o.before == "failed" for o in outcomes)
    log(
        f"sweep {out}: {len(cells)} runs{where}; {done_before} already done"
        + (f" ({failed_kept} failed: --retry-failed runs them again)" if failed_kept else "")
        + (f", {edited} edited by hand (left alone, see below)" if edited else "")
        + f", {len(todo)} to run with the {executor} executor"
        + (f", {jobs} at a time" if jobs > 1 and executor != "slurm" else "")
    )
    summary = SweepSummary(out, len(cells), len(mine), outcomes)
    if not todo:
        return summary

    payloads = [
        {
            "request": c.request,
            "device": device,
            "workers": workers,
            "quiet": quiet,
            "progress": progress and jobs == 1,
        }
        for c in todo
    ]
    tracker = _Tracker(todo, summary, index, log)
    if executor == "local" and jobs == 1:
        for k, (c, p) in enumerate(zip(todo, payloads)):
            log(f"[{k + 1}/{len(todo)}] {c.name} ({runs.status(c.folder)})")
            tracker.done(_job({**p, "prefix": "    "}))
    elif executor == "local":
        _run_pool(todo, payloads, jobs, tracker)
    else:
        _run_submitit(spec, out, executor, todo, payloads, jobs, wait, tracker, summary, log)
    return summary


def _synced(
    index: Index | None, folders: Sequence[Path], log: Callable[[str], None]
) -> Index | None:
    """`index.sync(folders)`; an index that cannot be used now is left alone for the rest of
    this invocation, with a one-line note (it is a cache: the run folders are the results)."""
    if index is None:
        return None
    try:
        index.sync(folders)
    except IndexUnavailable as exc:
        log(f"note: {exc}; this sweep goes on without it")
        return None
    return index


def _check_data(cells: Sequence[Cell]) -> None:
    """Each data set the runs to do read can be opened (its test split, the smaller one),
    before any work: a missing data set is one clear error, not a failed run folder per cell."""
    from ntksap import data

    for dataset, root in sorted({(c.request.dataset, c.request.data_dir) for c in cells},
                                key=str):  # fmt: skip
        try:
            data.create(dataset, root=root, split="test")
        except (ValueError, OSError) as exc:
            raise SweepError(f"data set {dataset!r} cannot be read: {exc}") from None


def _axis_path(key: str, spec: Sweep) -> str:
    """Where an axis lives in config.json ("prune.rounds", "train.lr", "prune.options.x")."""
    kind, name = classify_axis(key, spec.methods)
    if kind == "train":
        return f"train.{name}"
    if kind == "option":
        return f"prune.options.{name}"
    return "reinit" if name == "reinit" else f"prune.{name}"


class _Tracker:
    """Records each ended run: its outcome in the summary, its index row (when this process
    keeps the index), and a progress line with the time left."""

    def __init__(
        self,
        todo: Sequence[Cell],
        summary: SweepSummary,
        index: Index | None,
        log: Callable[[str], None],
    ) -> None:
        self.folders = {c.name: c.folder for c in todo}
        self.total, self.summary, self.index, self.log = len(todo), summary, index, log
        self.count, self.start = 0, time.perf_counter()

    def died(self, cell: Cell, error: str) -> Outcome:
        """A run whose process or job died without a word: recorded as failed."""
        return self.done({"name": cell.name, "status": "failed", "error": error})

    def done(self, res: Mapping[str, Any]) -> Outcome:
        self.count += 1
        o = Outcome(
            res["name"],
            res["status"],
            res.get("before", "?"),
            res.get("top1"),
            res.get("error"),
            float(res.get("seconds", 0.0)),
        )
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.count * (self.total - self.count)
        what = f"top-1 {o.top1:.2f}" if o.top1 is not None else (o.error or "")
        self.log(
            f"  {self.count}/{self.total} {o.name}: {o.status} {what} ({o.seconds:.0f} s); "
            f"about {_duration(left)} left"
        )
        self.summary.outcomes.append(o)
        self.index = _synced(self.index, [self.folders[o.name]], self.log)
        return o


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _run_pool(
    todo: list[Cell],
    payloads: list[dict[str, Any]],
    jobs: int,
    tracker: _Tracker,
) -> None:
    """`jobs` worker processes on this machine; each runs one run at a time, with its share
    of the CPU threads (and its own GPU when there are several)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no forked torch state (threads, CUDA) in the workers
    slots = ctx.Queue()  # handed to each worker as it starts (no manager process to outlive us)
    for k in range(jobs):
        slots.put(k)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with cf.ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_init_worker, initargs=(slots, os.getpid())
    ) as pool:
        futures = [pool.submit(_job, {**p, "threads": threads}) for p in payloads]
        try:
            for fut in cf.as_completed(futures):
                try:
                    res = fut.result()
                except Exception as exc:  # a worker died (e.g. killed): the run is incomplete
                    tracker.died(todo[futures.index(fut)], f"worker process died: {exc}")
                    continue
                tracker.done(res)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _check_slurm() -> None:
    """Slurm's commands and submitit must be here before anything is written."""
    import shutil

    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise SweepError(
            f"--executor slurm: {' and '.join(missing)} not found, this is not a Slurm login "
            "node; run on one, or use --executor local (--jobs N) or submitit-local here"
        )
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise SweepError(
            "--executor slurm needs submitit: pip install 'ntksap[cluster]' (or submitit)"
        ) from None


def slurm_parameters(spec: Sweep, jobs: int) -> dict[str, Any]:
    """submitit AutoExecutor parameters from the [slurm] table (generic names where
    submitit has them, slurm_* otherwise)."""
    s = spec.slurm
    params: dict[str, Any] = {
        "timeout_min": int(s.get("time_minutes", 24 * 60)),
        "gpus_per_node": int(s.get("gpus_per_task", 1)),
        "tasks_per_node": 1,
        "nodes": 1,
        "slurm_array_parallelism": int(s.get("array_parallelism", jobs if jobs > 1 else 256)),
    }
    if "cpus_per_task" in s:
        params["cpus_per_task"] = int(s["cpus_per_task"])
    if "mem_gb" in s:
        params["mem_gb"] = int(s["mem_gb"])
    for key in ("partition", "account", "qos", "constraint"):
        if key in s:
            params[f"slurm_{key}"] = str(s[key])
    return params


def _run_submitit(
    spec: Sweep,
    out: Path,
    executor: str,
    todo: list[Cell],
    payloads: list[dict[str, Any]],
    jobs: int,
    wait: bool,
    tracker: _Tracker,
    summary: SweepSummary,
    log: Callable[[str], None],
) -> None:
    """A submitit job array, one task per run (Slurm, or local processes to test the path)."""
    try:
        import submitit
    except ImportError:
        raise SweepError(
            f"--executor {executor} needs submitit: pip install 'ntksap[cluster]' "
            "(or pip install submitit)"
        ) from None
    folder = out / "submitit" / "%j"
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(name=f"ntksap-{spec.name or out.name}", **slurm_parameters(spec, jobs))
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
        threads = max(1, (os.cpu_count() or 1) // jobs)
        ex.update_parameters(
            timeout_min=int(spec.slurm.get("time_minutes", 24 * 60)),
            cpus_per_task=threads,
            gpus_per_node=0,
        )
        payloads = [{**p, "threads": threads} for p in payloads]
        wait = True  # local jobs die with this process
    # Slurm: one array, its parallelism set by the scheduler. Local: submitit starts every
    # job of an array at once, so arrays of `jobs` runs are submitted one after another.
    step = len(todo) if executor == "slurm" else jobs
    for lo in range(0, len(todo), step):
        batch = list(range(lo, min(lo + step, len(todo))))
        submitted = ex.map_array(_job, [payloads[k] for k in batch])
        summary.submitted += [j.job_id for j in submitted]
        if executor == "slurm":
            log(
                f"submitted {len(submitted)} runs as the job array "
                f"{submitted[0].job_id.split('_')[0]}; logs in {out / 'submitit'}"
            )
        if not wait:
            summary.pending = True
            log(f"not waiting: `ntksap report {out}` gathers whatever has finished")
            return
        for job, k in zip(submitted, batch):
            try:
                res = job.result()
            except Exception as exc:  # the job itself died (timeout, node failure, kill)
                lines = str(exc).strip().splitlines()
                last = lines[-1] if lines else type(exc).__name__
                tracker.died(todo[k], f"job {job.job_id}: {last}")
                continue
            tracker.done(res)


def describe(summary: SweepSummary) -> str:
    """One paragraph: what this invocation did, and the failures with their errors."""
    counts = summary.counts()
    parts = [f"{n} {s}" for s, n in sorted(counts.items())]
    text = f"sweep {summary.out}: {summary.selected} runs here ({', '.join(parts) or 'none'})"
    bad = [o for o in summary.outcomes if o.status not in ("finished", "skipped")]
    for o in bad:
        text += f"\n  {o.name}: {o.status}" + (f": {o.error}" if o.error else "")
    if any(o.status == "failed" for o in summary.outcomes):
        text += "\n  (re-run the same command with --retry-failed to run failed runs again)"
    return text


__all__ = [
    "EXECUTORS",
    "RUN_KEYS",
    "TRAIN_KEYS",
    "Cell",
    "Outcome",
    "Sweep",
    "SweepError",
    "SweepSummary",
    "cell_status",
    "classify",
    "classify_axis",
    "describe",
    "none_as_choice",
    "parse_assignment",
    "parse_shard",
    "parse_value",
    "plan",
    "run_sweep",
    "select_shard",
    "shard_from_environment",
]
