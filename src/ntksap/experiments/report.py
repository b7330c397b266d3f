"""Reports over run records: a table of final top-1 by variant and sparsity (markdown, CSV),
and plots (accuracy vs sparsity, per-layer density, training curves), optionally beside the
NTK-SAP paper's published numbers (`ntksap.experiments.paper`).

How runs are grouped:
    * A row is a *variant*: the method plus every other grouping setting
      (`Record.grouping()`: config.json minus density, seeds, software and paths) whose value
      differs between the given records, e.g. "ntksap rounds=5" in an ablation over
      prune.rounds, just "ntksap" in a plain sweep, "snip epochs=1" / "snip epochs=2" when
      train.epochs differs, so runs of different experiments are never averaged together.
    * A column is a sparsity: 1 - the requested density of config.json, the density rounded
      to SPARSITY_DECIMALS places so that 0.8**6 and 0.262144 meet in one column.
    * A cell is the mean ± sample std (ddof=1) of final top-1 over the seeds of its
      *finished* runs, with n. Runs that are not finished (diverged, failed, interrupted,
      incomplete) are never averaged in: each cell says how many it has ("k not finished")
      and the report lists them below the table.
    * Two runs with the same variant, sparsity and seeds (folders merged from two places) are
      a ValueError naming both folders, never counted twice.

Effective sparsity: below the top-1 table a second table gives, per cell, the mean effective
sparsity of its runs' masks (1 - the fraction of prunable weights on an input-to-output path,
`ntksap.masks.effective`; result.json's "effective_sparsity", or computed from the run's
mask file for runs written before that field existed; "n/a" when neither is available). A
method that leaves many dead weights is sparser than its column says.

Marks (per column, among the rows of runs, never the paper's):
    * best (bold): the highest mean; all of them on a tie. Only where at least two rows have a
      value in the column.
    * within spread (†): a cell that is not the best but
      `best_mean - mean <= max(std_best, std_cell)`, both cells with n >= 2 (a single seed
      has no spread to compare with).

Example:
    >>> from pathlib import Path
    >>> from ntksap.experiments.records import Record
    >>> def rec(method, seed, top1):
    ...     cfg = {"model": "lenet5", "dataset": "digits", "train": {"epochs": 1, "seed": seed},
    ...            "prune": {"method": method, "density": 0.1, "seed": seed}}
    ...     return Record(f"{method}{seed}", Path(f"/r/{method}{seed}"), "finished", cfg,
    ...                   {"status": "finished", "final_top1": top1})
    >>> table = build_table([rec("snip", 0, 90.0), rec("snip", 1, 92.0), rec("random", 0, 80.0)])
    >>> [(r.variant, r.cells[0.9].mean, r.cells[0.9].n) for r in table.rows]
    [('random', 80.0, 1), ('snip', 91.0, 2)]
    >>> print(to_markdown(table).splitlines()[10])
    | snip | **91.00 ± 1.41** (n=2) |
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ntksap.experiments.paper import PAPER_SOURCE, PaperResult, match_paper, paper_rows_for
from ntksap.experiments.records import Record
from ntksap.files import atomic_write, write_text
from ntksap.runs import CONFIG_FILE
from ntksap.scoring import get_method, list_methods

#: Densities are rounded to this many decimals to decide which column a run belongs to.
SPARSITY_DECIMALS = 4

#: Row order of the methods (the paper's baselines, then NTK-SAP, then its successor PX);
#: others follow by name.
METHOD_ORDER = (
    "dense",
    "mask",
    "random",
    "magnitude",
    "snip",
    "itersnip",
    "grasp",
    "synflow",
    "ntksap",
    "px",
)

#: Settings named in the report's "shared by all rows" line when they are the same everywhere.
SHARED_SHOWN = (
    "dataset",
    "model",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.schedule",
)

#: The files `write_report` writes (keys of the dict it returns).
REPORT_FILES = (
    "report.md",
    "results.csv",
    "accuracy_vs_sparsity.png",
    "layer_density.png",
    "training_curves.png",
)

CSV_COLUMNS = (
    "variant",
    "method",
    "sparsity",
    "density",
    "n",
    "mean",
    "std",
    "min",
    "max",
    "seeds",
    "not_finished",
    "best",
    "within_spread",
    "effective_sparsity",
)

_MISSING = object()  # a setting absent from one record's config


@dataclass
class Cell:
    """One variant at one sparsity.

    Attributes:
        sparsity / density: the column (rounded, SPARSITY_DECIMALS).
        finished: the finished runs (with a final top-1), sorted by seed; the statistics are
            over these.
        unfinished: the other runs of the cell (diverged, failed, incomplete, ...).
        values / seeds: final top-1 (%) and seed of each finished run.
        n, mean, std (sample, ddof=1; None when n < 2), min, max: None when n == 0.
        best / within_spread: the marks (module docstring).
        paper: for a row of published numbers, the number shown (n is 0 there).
    """

    sparsity: float
    density: float
    finished: list[Record] = field(default_factory=list)
    unfinished: list[Record] = field(default_factory=list)
    paper: PaperResult | None = None
    best: bool = False
    within_spread: bool = False

    @property
    def values(self) -> list[float]:
        return [float(r.top1) for r in self.finished if r.top1 is not None]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.finished]

    @property
    def n(self) -> int:
        return len(self.finished)

    @property
    def mean(self) -> float | None:
        if self.paper is not None:
            return self.paper.top1
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        if self.paper is not None:
            return self.paper.std
        # statistics.stdev is the sample std (ddof=1), as numpy.std(ddof=1)
        return statistics.stdev(self.values) if len(self.values) >= 2 else None

    @property
    def effective_sparsity(self) -> float | None:
        """Mean effective sparsity over the cell's runs that have it, finished or not (the
        mask is what the method chose); None when none has."""
        known = [
            e for r in (*self.finished, *self.unfinished) if (e := r.effective_sparsity) is not None
        ]
        return statistics.fmean(known) if known else None

    @property
    def min(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def max(self) -> float | None:
        return max(self.values) if self.values else None


@dataclass
class Row:
    """A variant: its label, method, the varying settings that name it, and its cells.

    `grouping` is the full grouping of its runs (dataset, model, ...); `source` is "runs", or
    "paper" for a row of published numbers.
    """

    variant: str
    method: str
    settings: dict[str, Any]
    grouping: dict[str, Any]
    cells: dict[float, Cell] = field(default_factory=dict)
    source: str = "runs"

    @property
    def dataset(self) -> str:
        return str(self.grouping.get("dataset", ""))

    @property
    def model(self) -> str:
        return str(self.grouping.get("model", ""))

    def records(self) -> list[Record]:
        """Every run of the row, finished or not."""
        return [r for c in self.cells.values() for r in (*c.finished, *c.unfinished)]


@dataclass
class Table:
    """The report's table.

    Attributes:
        rows: in display order; with paper=True a row of published numbers follows the rows
            of its method.
        sparsities: the columns, ascending.
        varying: the dotted grouping settings that differ between records (in the labels).
        shared: the grouping settings that are the same in every record.
        paper: whether published numbers were asked for; paper_notes: what was (not) found.
        skipped: records left out because their config.json could not be read.
    """

    rows: list[Row]
    sparsities: list[float]
    varying: list[str]
    shared: dict[str, Any]
    paper: bool = False
    paper_notes: list[str] = field(default_factory=list)
    skipped: list[Record] = field(default_factory=list)

    @property
    def run_rows(self) -> list[Row]:
        return [r for r in self.rows if r.source == "runs"]

    @property
    def paper_rows(self) -> list[Row]:
        return [r for r in self.rows if r.source == "paper"]

    def unfinished(self) -> list[tuple[Row, Record]]:
        """(row, record) of every run not finished, by row, sparsity and seed."""
        return [
            (row, rec)
            for row in self.run_rows
            for s in sorted(row.cells)
            for rec in row.cells[s].unfinished
        ]


# ---------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------
def _key(value: Any) -> str:
    """A comparable, hashable form of a setting (tuples of lists are not hashable)."""
    if value is _MISSING:
        return "\0missing"
    return json.dumps(value, sort_keys=True, default=str)


def _fmt_value(value: Any) -> str:
    if value is _MISSING:  # not in the run's config: the run used the default
        return "default"
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, default=str)


def _fmt_missing(key: str, method: str) -> str:
    """The label of a setting absent from a run's config: "default", except for an option
    whose default has changed (`Method.pinned`, e.g. px's variant): runs record it since,
    so one without it ran under an earlier default, "unrecorded" (not today's)."""
    name = key.rsplit(".", 1)[-1]
    pinned = method in list_methods() and name in get_method(method).pinned
    return "unrecorded" if key.startswith("prune.options.") and pinned else "default"


def _sort_value(value: Any) -> tuple[int, Any]:
    """Sort numbers as numbers (rounds=5 before rounds=10), then strings, then the rest."""
    if value is _MISSING:
        return (0, 0)
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, int | float):
        return (2, float(value))
    if isinstance(value, str):
        return (3, value)
    return (4, _key(value))


def varying_settings(records: Sequence[Record]) -> list[str]:
    """The grouping settings (dotted) that differ between `records`, method aside.

    A setting varies when two records hold different values for it, or when it is set in
    some runs of a method and absent from others (an option given to some runs only). A
    setting absent only from another method's runs (prune.* of a dense run) does not vary.

    >>> from pathlib import Path
    >>> def rec(rounds, epochs):
    ...     cfg = {"dataset": "d", "prune": {"method": "ntksap", "density": 0.1,
    ...            "rounds": rounds}, "train": {"epochs": epochs}}
    ...     return Record("r", Path("r"), "finished", cfg, None)
    >>> varying_settings([rec(1, 5), rec(5, 5), rec(1, 10)])
    ['prune.rounds', 'train.epochs']
    """
    groupings = [r.grouping() for r in records]
    keys: dict[str, None] = {}
    for g in groupings:
        keys.update(dict.fromkeys(g))
    out = []
    for k in keys:
        if k == "prune.method":  # the method heads every label already
            continue
        present = {_key(g[k]) for g in groupings if k in g}
        by_method: dict[str, set[bool]] = {}
        for rec, g in zip(records, groupings, strict=True):
            by_method.setdefault(rec.method, set()).add(k in g)
        if len(present) > 1 or any(len(s) > 1 for s in by_method.values()):
            out.append(k)
    return out


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last dotted part of each key ("prune.rounds" -> "rounds"), unless two keys share
    it (prune.schedule and train.schedule), when both keep their full names."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def column_of(record: Record) -> tuple[float, float]:
    """(sparsity, density) of the column a record belongs to (rounded)."""
    density = round(record.density, SPARSITY_DECIMALS)
    return round(1.0 - density, SPARSITY_DECIMALS), density


def _method_rank(method: str) -> tuple[int, str]:
    return (
        (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)
    )


def pct(sparsity: float) -> str:
    """A sparsity as the table's column label.

    >>> pct(0.7379), pct(0.98)
    ('73.79%', '98.00%')
    """
    return f"{sparsity * 100:.2f}%"


def build_table(records: Iterable[Record], *, paper: bool = False) -> Table:
    """Group `records` into variants x sparsities and mark the best cells (module docstring).

    Args:
        records: run records (`ntksap.experiments.records.read_record`).
        paper: add rows of the NTK-SAP paper's published numbers where the data set, model,
            method and sparsity (within 0.001) match; `Table.paper_notes` says what matched.

    Raises:
        ValueError: no records, or two records of the same variant, sparsity and seeds
            (the message names both folders).
    """
    records = list(records)
    if not records:
        raise ValueError("no run records to report on (no run folders found?)")
    # A torn or missing config.json reads as {}: such a run has no settings to group by.
    skipped = [r for r in records if not r.config]
    records = [r for r in records if r.config]
    if not records:
        raise ValueError(
            "no run folder with a readable config.json (missing or torn): "
            + ", ".join(str(r.folder) for r in skipped[:5])
        )

    varying = varying_settings(records)
    short = _short_names(varying)
    groupings = [r.grouping() for r in records]
    shared = {
        k: v
        for k, v in groupings[0].items()
        if k not in varying and k != "prune.method" and all(k in g for g in groupings)
    }

    rows: dict[tuple[str, ...], Row] = {}
    sort_keys: dict[tuple[str, ...], tuple[Any, ...]] = {}
    seen: dict[tuple[Any, ...], Record] = {}
    for rec, g in zip(records, groupings, strict=True):
        values = [g.get(k, _MISSING) for k in varying]
        vkey = (rec.method, *(_key(v) for v in values))
        if vkey not in rows:
            settings = {
                short[k]: v for k, v in zip(varying, values, strict=True) if v is not _MISSING
            }
            # A setting absent only because the method has none (prune.* of dense) stays out.
            label_parts = [
                f"{short[k]}={_fmt_missing(k, rec.method) if v is _MISSING else _fmt_value(v)}"
                for k, v in zip(varying, values, strict=True)
                if v is not _MISSING or _absent_varies(k, rec.method, records, groupings)
            ]
            rows[vkey] = Row(
                variant=" ".join([rec.method, *label_parts]),
                method=rec.method,
                settings=settings,
                grouping=g,
            )
            sort_keys[vkey] = (_method_rank(rec.method), *(_sort_value(v) for v in values))
        row = rows[vkey]
        sparsity, density = column_of(rec)
        settings_all = rec.settings()
        dup_key = (
            vkey,
            sparsity,
            settings_all.get("train.seed", 0),
            settings_all.get("prune.seed"),
        )
        if dup_key in seen:
            other = seen[dup_key]
            raise ValueError(
                f"two runs of the same cell ({row.variant}, sparsity {pct(sparsity)}, seed "
                f"{rec.seed}): {other.folder} and {rec.folder}. Folders merged from two "
                "places? Report on each run once (move or drop one of them)."
            )
        seen[dup_key] = rec
        cell = row.cells.setdefault(sparsity, Cell(sparsity=sparsity, density=density))
        (cell.finished if rec.top1 is not None else cell.unfinished).append(rec)

    for row in rows.values():
        for cell in row.cells.values():
            cell.finished.sort(key=lambda r: (r.seed, str(r.folder)))
            cell.unfinished.sort(key=lambda r: (r.seed, str(r.folder)))

    ordered = [rows[k] for k in sorted(rows, key=lambda k: (sort_keys[k], rows[k].variant))]
    _check_unique_labels(ordered)
    sparsities = sorted({s for row in ordered for s in row.cells})
    _mark(ordered, sparsities)
    table = Table(
        rows=ordered,
        sparsities=sparsities,
        varying=varying,
        shared=shared,
        paper=paper,
        skipped=skipped,
    )
    if paper:
        _add_paper_rows(table)
    return table


def _absent_varies(
    key: str, method: str, records: Sequence[Record], groupings: Sequence[dict[str, Any]]
) -> bool:
    """Whether `key` is set in some runs of `method` (so its absence must show as
    "default")."""
    return any(r.method == method and key in g for r, g in zip(records, groupings, strict=True))


def _check_unique_labels(rows: Sequence[Row]) -> None:
    labels = [r.variant for r in rows]
    dups = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dups:  # only values whose printed forms coincide (1 and "1") can get here
        raise ValueError(
            f"variants {dups} print the same but differ in their settings; "
            "check the configs of these runs"
        )


def _mark(rows: Sequence[Row], sparsities: Sequence[float]) -> None:
    """Set `best` and `within_spread` per column (module docstring)."""
    for s in sparsities:
        cells = [r.cells[s] for r in rows if s in r.cells and r.cells[s].n > 0]
        if len(cells) < 2:  # a lone value is not "best" of anything
            continue
        best_mean = max(c.mean for c in cells if c.mean is not None)
        best = [c for c in cells if c.mean == best_mean]
        for c in best:
            c.best = True
        for c in cells:
            if c.best or c.n < 2 or c.mean is None or c.std is None:
                continue
            c.within_spread = any(
                b.n >= 2 and b.std is not None and best_mean - c.mean <= max(b.std, c.std)
                for b in best
            )


def _add_paper_rows(table: Table) -> None:
    pairs: list[tuple[str, str]] = []
    for row in table.run_rows:
        if (row.dataset, row.model) not in pairs:
            pairs.append((row.dataset, row.model))
    several = len(pairs) > 1
    out = list(table.rows)
    for dataset, model in pairs:
        published = paper_rows_for(dataset, model)
        if not published:
            table.paper_notes.append(f"no published numbers for {dataset}/{model}")
            continue
        pair_rows = [r for r in table.run_rows if (r.dataset, r.model) == (dataset, model)]
        methods = list(dict.fromkeys(r.method for r in pair_rows))
        added = []
        for method in methods:
            cells = {}
            for s in table.sparsities:
                hit = match_paper(published, method, s)
                if hit is not None:
                    cells[s] = Cell(sparsity=s, density=round(1 - s, SPARSITY_DECIMALS), paper=hit)
            if not cells:
                continue
            label = f"{method} {dataset}/{model} (paper)" if several else f"{method} (paper)"
            prow = Row(
                variant=label,
                method=method,
                settings={},
                grouping={"dataset": dataset, "model": model},
                cells=cells,
                source="paper",
            )
            last = max(
                i
                for i, r in enumerate(out)
                if r.method == method and any(r is p for p in pair_rows)
            )
            out.insert(last + 1, prow)
            added.append(method)
        if added:
            table.paper_notes.append(f"published numbers for {dataset}/{model}: {', '.join(added)}")
        else:
            have = sorted({(p.method, pct(p.sparsity)) for p in published})
            table.paper_notes.append(
                f"published numbers for {dataset}/{model} ("
                + ", ".join(f"{m} at {s}" for m, s in have)
                + ") match none of these runs' methods at these sparsities"
            )
    table.rows = out


# ---------------------------------------------------------------------------------------
# Text outputs
# ---------------------------------------------------------------------------------------
#: What a cell shows where it has no value (an en dash; ruff wants non-ASCII spelled out).
DASH = "\u2013"

LEGEND = (
    "Cells: mean ± sample std (ddof=1) of the final top-1 (%) over the seeds of finished "
    "runs, n = number of seeds (std \u2013 when n = 1). **Bold**: the highest mean in its column "
    "(marked where at least two rows have a value). †: not the best, but within the seed "
    "spread of the best: best mean - mean ≤ max(std of the best, std of the cell), both with "
    'n ≥ 2. "k not finished": runs of the cell that diverged, failed or did not end; they '
    "are not in the mean and are listed under the table."
)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_cell(cell: Cell | None) -> str:
    if cell is None:
        return ""
    if cell.paper is not None:
        p = cell.paper
        return f"{p.top1:.2f}" + (f" ± {p.std:.2f}" if p.std is not None else "")
    notes = [f"n={cell.n}"]
    if cell.unfinished:
        notes.append(f"{len(cell.unfinished)} not finished")
    if cell.mean is None:
        return f"{DASH} ({', '.join(notes)})"
    std = f"{cell.std:.2f}" if cell.std is not None else DASH
    text = f"{cell.mean:.2f} ± {std}"
    if cell.best:
        text = f"**{text}**"
    elif cell.within_spread:
        text += "†"
    return f"{text} ({', '.join(notes)})"


def _md_effective(cell: Cell | None) -> str:
    """A cell's mean effective sparsity (%), "n/a" when unknown, empty without runs."""
    if cell is None:
        return ""
    e = cell.effective_sparsity
    return "n/a" if e is None else f"{100 * e:.2f}"


def _md_grid(table: Table, rows: Sequence[Row], show: Callable[[Cell | None], str]) -> list[str]:
    """A markdown table: a header of the table's sparsities, then one line per row with
    `show` of its cell at each sparsity."""
    lines = ["| variant | " + " | ".join(pct(s) for s in table.sparsities) + " |"]
    lines.append("|---|" + "---:|" * len(table.sparsities))
    for row in rows:
        shown = [show(row.cells.get(s)) for s in table.sparsities]
        lines.append(f"| {_md_escape(row.variant)} | " + " | ".join(shown) + " |")
    return lines


def _describe(records_of: Sequence[Row]) -> tuple[int, int]:
    runs = [r for row in records_of for r in row.records()]
    return len(runs), sum(1 for r in runs if r.top1 is not None)


def to_markdown(table: Table) -> str:
    """The table as markdown: header lines, the table, its legend, the paper's source and
    notes (with paper=True), and the list of runs not finished."""
    total, finished = _describe(table.run_rows)
    lines = ["# Pruning report", ""]
    lines.append(f"{total} runs: {finished} finished, {total - finished} not finished.")
    shown = {k: table.shared[k] for k in SHARED_SHOWN if k in table.shared}
    if shown:
        lines.append(
            "Shared by all rows: "
            + ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt_value(v)}" for k, v in shown.items())
            + "."
        )
    if table.varying:
        names = _short_names(table.varying)
        lines.append(
            "Rows differ in: "
            + ", ".join(f"{names[k]} ({k})" if names[k] != k else k for k in table.varying)
            + "."
        )
    lines += ["", "## Final top-1 (%) by sparsity", ""]
    lines += _md_grid(table, table.rows, _md_cell)
    lines += ["", LEGEND]
    if table.paper:
        lines.append("")
        if table.paper_rows:
            lines += [
                f"Rows marked (paper): published top-1 (mean ± std) from {PAPER_SOURCE}; matched "
                "at |sparsity difference| ≤ 0.001. They come from the paper's full training "
                "schedules: compare them with runs of the same preset only. They take no "
                "part in the marks.",
                "",
            ]
        for note in table.paper_notes:
            lines.append(f"- {note}")
    if table.run_rows and table.sparsities:
        lines += ["", "## Effective sparsity (%) by sparsity", ""]
        lines += _md_grid(table, table.run_rows, _md_effective)
        lines += [
            "",
            "Effective sparsity: 1 - the fraction of prunable weights on at least one "
            "input-to-output path (mean over the cell's masks); it is ≥ the column's nominal "
            "sparsity, and higher where a method leaves weights that cannot affect the output.",
        ]
    unfinished = table.unfinished()
    if unfinished:
        lines += ["", f"## Runs not finished ({len(unfinished)})", ""]
        lines.append("| folder | variant | sparsity | seed | status | error |")
        lines.append("|---|---|---:|---:|---|---|")
        for row, rec in unfinished:
            status = rec.status if rec.status != "finished" else "finished, no final top-1"
            error = str((rec.result or {}).get("error") or "")
            if rec.status == "edited":  # its numbers belong to no known setting
                error = "config.json was changed after the run: not counted"
            if len(error) > 120:
                error = error[:117] + "..."
            sparsity, _ = column_of(rec)
            lines.append(
                f"| {_md_escape(str(rec.folder))} | {_md_escape(row.variant)} | "
                f"{pct(sparsity)} | {rec.seed} | {status} | {_md_escape(error)} |"
            )
    if table.skipped:
        lines += ["", f"Left out ({len(table.skipped)}, config.json missing or unreadable):"]
        for r in table.skipped:
            why = r.status if (r.folder / CONFIG_FILE).exists() else "no config.json"
            lines.append(f"- {r.folder} ({why})")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    # repr of a float is its shortest round-trip form: full precision, no noise digits
    return "" if value is None else repr(float(value))


def to_csv(table: Table) -> str:
    """The runs' cells as CSV, one row per variant x sparsity (CSV_COLUMNS), full precision.

    std, mean, min, max are empty where undefined (n < 2 for std, n == 0 for the others);
    seeds are the finished runs' seeds joined by ";". The paper's rows are not included
    (they are in the package's paper_results.csv).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in table.run_rows:
        for s in table.sparsities:
            c = row.cells.get(s)
            if c is None:
                continue
            writer.writerow(
                [
                    row.variant,
                    row.method,
                    repr(c.sparsity),
                    repr(c.density),
                    c.n,
                    _num(c.mean),
                    _num(c.std),
                    _num(c.min),
                    _num(c.max),
                    ";".join(str(x) for x in c.seeds),
                    len(c.unfinished),
                    int(c.best),
                    int(c.within_spread),
                    _num(c.effective_sparsity),
                ]
            )
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas; pyplot is never imported, so no global
    backend is switched and nothing opens a window (safe in notebooks and on servers)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    # savefig into memory, then one atomic write: a full disk leaves no half PNG behind
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


def _colors(table: Table) -> dict[str, Any]:
    """One colour per run row, reused by its method's paper row and in every figure."""
    from matplotlib import colormaps

    rows = table.run_rows
    cmap = colormaps["tab10" if len(rows) <= 10 else "tab20"]
    colors: dict[str, Any] = {r.variant: cmap(i % cmap.N) for i, r in enumerate(rows)}
    for prow in table.paper_rows:
        same = [r for r in rows if (r.method, r.dataset, r.model) == (
            prow.method, prow.dataset, prow.model)]  # fmt: skip
        colors[prow.variant] = colors[same[0].variant] if same else "black"
    return colors


def _title(table: Table) -> str:
    shown = [str(table.shared[k]) for k in ("dataset", "model") if k in table.shared]
    return "/".join(shown) if shown else "runs"


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10)
    ax.set_axis_off()


def plot_accuracy_vs_sparsity(table: Table, path: str | os.PathLike[str]) -> Path:
    """Final top-1 vs remaining weights, as the NTK-SAP paper's figures draw it.

    x: density (%) on a log axis, decreasing to the right; one line per variant with std
    error bars. With `table.paper`, the paper's published curve of each (dataset, model,
    method) in the table is drawn dashed with hollow markers, labelled "(paper)".
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    colors = _colors(table)
    xs_all: set[float] = set()
    for row in table.run_rows:
        pts = [
            (c.density * 100, c.mean, c.std or 0.0)
            for s, c in sorted(row.cells.items())
            if c.mean is not None
        ]
        if not pts:
            continue
        x, y, e = zip(*pts, strict=True)
        xs_all.update(x)
        ax.errorbar(x, y, yerr=e, marker="o", ms=4, lw=1.4, capsize=3,
                    color=colors[row.variant], label=row.variant)  # fmt: skip
    if table.paper:
        for prow in table.paper_rows:
            # the whole published curve of the method, not only the matched columns
            curve = sorted(
                (p for p in paper_rows_for(prow.dataset, prow.model) if p.method == prow.method),
                key=lambda p: p.sparsity,
            )
            x = [(1 - p.sparsity) * 100 for p in curve]
            y = [p.top1 for p in curve]
            e = [p.std or 0.0 for p in curve]
            xs_all.update(x)
            ax.errorbar(x, y, yerr=e, marker="o", ms=5, lw=1.2, ls="--", capsize=3,
                        mfc="none", color=colors[prow.variant], label=prow.variant)  # fmt: skip
    if not xs_all:
        _empty(ax, "no finished runs")
        return _save(fig, path)
    ax.set_xscale("log")
    ax.invert_xaxis()  # sparser to the right, as in the paper
    # one tick per density; the paper's 10.7 % and a run's 10.74 % would print on top of
    # each other, so ticks closer than 2 % (relative) share one
    ticks: list[float] = []
    for x in sorted(xs_all):
        if not ticks or x > ticks[-1] * 1.02:
            ticks.append(x)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.set_xlabel("remaining weights (%)")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title(f"{_title(table)}: accuracy vs sparsity (mean ± std over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _column(table: Table, sparsity: float | None) -> float | None:
    if not table.sparsities:
        return None
    if sparsity is None:
        return max(table.sparsities)
    near = min(table.sparsities, key=lambda s: abs(s - sparsity))
    if abs(near - sparsity) > 1e-3:
        raise ValueError(
            f"no runs at sparsity {sparsity!r}; the table has "
            + ", ".join(pct(s) for s in table.sparsities)
        )
    return near


def layer_densities(table: Table, sparsity: float) -> dict[str, dict[str, float]]:
    """variant -> {layer: density} at one sparsity column, each layer's density (kept /
    numel of its mask) averaged over the variant's runs there.

    Every run with a mask.safetensors counts, finished or not: the mask is what the method
    chose, whatever training did after. Layers are in mask order (the model's).
    """
    from ntksap.masks import Masks
    from ntksap.runs import MASK_FILE

    out: dict[str, dict[str, float]] = {}
    for row in table.run_rows:
        cell = row.cells.get(sparsity)
        if cell is None:
            continue
        per_layer: dict[str, list[float]] = {}
        for rec in (*cell.finished, *cell.unfinished):
            path = rec.folder / MASK_FILE
            if not path.is_file():
                continue
            try:
                masks = Masks.load(path)
            except Exception:  # a torn or foreign file: one run's mask, not the report
                continue
            for name, d in masks.layer_densities().items():
                per_layer.setdefault(name, []).append(d)
        if per_layer:
            out[row.variant] = {k: statistics.fmean(v) for k, v in per_layer.items()}
    return out


def plot_layer_density(
    table: Table, path: str | os.PathLike[str], *, sparsity: float | None = None
) -> Path:
    """Per-layer density (%) of each variant's masks at `sparsity` (default: the table's
    highest), averaged over seeds: one line per variant over the layers, log y.

    Raises:
        ValueError: `sparsity` is not a column of the table (within 0.001).
    """
    column = _column(table, sparsity)
    data = layer_densities(table, column) if column is not None else {}
    layers: list[str] = []
    for per in data.values():
        layers += [k for k in per if k not in layers]
    fig = _figure(max(7.0, 0.32 * len(layers) + 3), 5.0)
    ax = fig.add_subplot()
    if not data:
        where = pct(column) if column is not None else "any sparsity"
        _empty(ax, f"no masks at {where}")
        return _save(fig, path)
    colors = _colors(table)
    for variant, per in data.items():
        idx = [i for i, k in enumerate(layers) if k in per]
        ax.plot(idx, [per[layers[i]] * 100 for i in idx], marker="o", ms=4, lw=1.2,
                color=colors[variant], label=variant)  # fmt: skip
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_ylabel("layer density: kept / weights (%)")
    ax.set_title(
        f"{_title(table)}: per-layer density at sparsity {pct(column)} (mean over seeds)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(row: Row, sparsity: float) -> list[tuple[int, float]]:
    """(epoch, mean test top-1) of a row's finished runs at one sparsity, averaged over the
    runs that report a top-1 at that epoch (metrics.jsonl)."""
    from ntksap.training.loop import METRICS_FILE, read_metrics

    cell = row.cells.get(sparsity)
    if cell is None:
        return []
    by_epoch: dict[int, list[float]] = {}
    for rec in cell.finished:
        for m in read_metrics(rec.folder / METRICS_FILE):
            top1, epoch = m.get("top1"), m.get("epoch")
            if isinstance(top1, int | float) and isinstance(epoch, int) and math.isfinite(top1):
                by_epoch.setdefault(epoch, []).append(float(top1))
    return [(e, statistics.fmean(v)) for e, v in sorted(by_epoch.items())]


def plot_training_curves(table: Table, path: str | os.PathLike[str]) -> Path:
    """Test top-1 per epoch (mean over the seeds of finished runs): one panel per sparsity,
    one line per variant."""
    cols = table.sparsities
    ncols = min(3, max(1, len(cols)))
    nrows = max(1, math.ceil(len(cols) / ncols))
    fig = _figure(4.2 * ncols + 1, 3.2 * nrows + 0.6)
    if not cols:
        _empty(fig.add_subplot(), "no runs")
        return _save(fig, path)
    from matplotlib.ticker import MaxNLocator

    colors = _colors(table)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for i, s in enumerate(cols):
        ax = axes[i // ncols][i % ncols]
        drawn = False
        for row in table.run_rows:
            curve = training_curves(row, s)
            if not curve:
                continue
            ep, top1 = zip(*curve, strict=True)
            ax.plot(ep, top1, marker="." if len(ep) < 30 else None, lw=1.2,
                    color=colors[row.variant], label=row.variant)  # fmt: skip
            drawn = True
        ax.set_title(f"sparsity {pct(s)}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("test top-1 (%)")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
    for j in range(len(cols), nrows * ncols):
        axes[j // ncols][j % ncols].set_axis_off()
    fig.suptitle(f"{_title(table)}: test top-1 during training", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# The report folder
# ---------------------------------------------------------------------------------------
def write_report(
    records: Iterable[Record],
    out_dir: str | os.PathLike[str],
    *,
    paper: bool = False,
    layer_sparsity: float | None = None,
) -> dict[str, Path]:
    """Write report.md, results.csv and the three PNGs (REPORT_FILES) into `out_dir`.

    Args:
        records: the runs (`[read_record(p) for p in find_run_folders(dirs)]`).
        out_dir: created if needed; the five files are overwritten, each atomically.
        paper: beside the NTK-SAP paper's published numbers (table rows and dashed curves).
        layer_sparsity: the sparsity of the per-layer density plot (default: the highest).

    Returns:
        file name -> path of each file written (the keys are REPORT_FILES).

    Raises:
        ValueError: as `build_table`, or `layer_sparsity` matches no column.

    Example:
        >>> paths = write_report(records, "report/", paper=True)  # doctest: +SKIP
        >>> sorted(paths)  # doctest: +SKIP
        ['accuracy_vs_sparsity.png', 'layer_density.png', 'report.md', 'results.csv', ...]
    """
    table = build_table(records, paper=paper)
    column = _column(table, layer_sparsity)  # a bad sparsity fails before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in REPORT_FILES}
    plot_accuracy_vs_sparsity(table, paths["accuracy_vs_sparsity.png"])
    plot_layer_density(table, paths["layer_density.png"], sparsity=column)
    plot_training_curves(table, paths["training_curves.png"])
    write_text(paths["results.csv"], to_csv(table))
    figures = [
        "",
        "## Figures",
        "",
        "![final top-1 vs remaining weights](accuracy_vs_sparsity.png)",
        "",
        f"![per-layer density at sparsity {pct(column) if column is not None else '-'}]"
        "(layer_density.png)",
        "",
        "![test top-1 per epoch](training_curves.png)",
        "",
        "Per-cell numbers at full precision: results.csv.",
    ]
    write_text(paths["report.md"], to_markdown(table) + "\n".join(figures) + "\n")
    return paths


__all__ = [
    "CSV_COLUMNS",
    "LEGEND",
    "METHOD_ORDER",
    "REPORT_FILES",
    "SPARSITY_DECIMALS",
    "Cell",
    "Row",
    "Table",
    "build_table",
    "column_of",
    "layer_densities",
    "pct",
    "plot_accuracy_vs_sparsity",
    "plot_layer_density",
    "plot_training_curves",
    "to_csv",
    "to_markdown",
    "training_curves",
    "varying_settings",
    "write_report",
]
