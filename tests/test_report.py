"""Reports (`ntksap.experiments.report`) and the paper's numbers (`...paper`).

Real run folders (digits/lenet5, 1 epoch, two methods x two sparsities x two seeds, built
once per module) check the numbers end to end against result.json read independently with
json and numpy; hand-written folders (config.json/result.json only) cover the edge cases:
runs not finished, duplicates, n = 1, marks, the paper's rows, variants split by settings.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

import ntksap
from ntksap.experiments import paper as paper_mod
from ntksap.experiments.records import Record, find_run_folders, read_record
from ntksap.experiments.report import (
    CSV_COLUMNS,
    REPORT_FILES,
    build_table,
    column_of,
    layer_densities,
    to_csv,
    to_markdown,
    training_curves,
    write_report,
)
from ntksap.masks import Masks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REAL_METHODS = ("random", "magnitude")  # no scoring data needed: the fastest methods
REAL_SPARSITIES = (0.5, 0.9)
REAL_SEEDS = (0, 1)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real_runs")
    for m in REAL_METHODS:
        for s in REAL_SPARSITIES:
            for k in REAL_SEEDS:
                ntksap.run(
                    root / f"{m}-{s}-{k}",
                    dataset="digits",
                    model="lenet5",
                    method=m,
                    sparsity=s,
                    seed=k,
                    train={"epochs": 1},
                    device="cpu",
                    log=lambda _: None,
                )
    return root


def records_in(*dirs: Path) -> list[Record]:
    return [read_record(p) for p in find_run_folders(dirs)]


def fake_run(
    folder: Path,
    *,
    method: str | None = "snip",
    density: float = 0.1,
    seed: int = 0,
    top1: float | None = 50.0,
    status: str | None = "finished",
    dataset: str = "mnist5k",
    model: str = "lenet5",
    epochs: int = 1,
    prune: dict | None = None,
) -> Path:
    """A run folder by hand: config.json as `ntksap.run` writes it (the parts a report
    reads) and result.json (`status=None`: no result.json, an incomplete run)."""
    folder.mkdir(parents=True)
    config: dict = {"command": "run", "model": model, "dataset": dataset, "data_dir": None}
    if method is not None:
        config["prune"] = {
            "method": method,
            "density": density,
            "options": {},
            "seed": seed,
            **(prune or {}),
        }
    config["train"] = {"epochs": epochs, "lr": 0.05, "seed": seed, "preset": "x"}
    config["versions"] = {"ntksap": "0"}
    (folder / "config.json").write_text(json.dumps(config))
    if status is not None:
        result: dict = {"status": status, "density": density}
        if status == "finished":
            result["final_top1"] = top1
        else:
            result["error"] = f"{status} | at epoch 1"
        (folder / "result.json").write_text(json.dumps(result))
    return folder


def independent_cells(folders: list[Path]) -> dict[tuple[str, float], list[tuple[int, float]]]:
    """(method, sparsity) -> [(seed, final top-1)] of finished runs, from the files with json."""
    out: dict[tuple[str, float], list[tuple[int, float]]] = {}
    for f in folders:
        cfg = json.loads((f / "config.json").read_text())
        res_path = f / "result.json"
        if not res_path.exists():
            continue
        res = json.loads(res_path.read_text())
        if res.get("status") != "finished":
            continue
        s = round(1 - round(cfg["prune"]["density"], 4), 4)
        out.setdefault((cfg["prune"]["method"], s), []).append(
            (cfg["train"]["seed"], res["final_top1"])
        )
    return out


def csv_rows(table) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(to_csv(table))))


def assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def row_of(table, variant: str):
    (row,) = [r for r in table.rows if r.variant == variant]
    return row


# ---------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------
def test_real_table_and_csv_match_numpy(real_runs: Path) -> None:
    folders = sorted(p for p in real_runs.iterdir() if p.is_dir())
    expected = independent_cells(folders)
    assert len(expected) == len(REAL_METHODS) * len(REAL_SPARSITIES)
    table = build_table(records_in(real_runs))
    assert [r.variant for r in table.rows] == ["random", "magnitude"]  # the paper's order
    assert table.varying == []
    assert table.sparsities == sorted(REAL_SPARSITIES)
    by_csv = {(r["variant"], float(r["sparsity"])): r for r in csv_rows(table)}
    assert len(by_csv) == len(expected)
    for (method, s), pairs in expected.items():
        seeds, values = zip(*sorted(pairs), strict=True)
        cell = row_of(table, method).cells[s]
        assert cell.n == len(values) == len(REAL_SEEDS)
        assert cell.seeds == list(seeds)
        assert cell.mean == pytest.approx(np.mean(values), abs=1e-12)
        assert cell.std == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        row = by_csv[(method, s)]
        assert int(row["n"]) == len(values)
        assert float(row["mean"]) == pytest.approx(np.mean(values), abs=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert float(row["min"]) == min(values) and float(row["max"]) == max(values)
        assert row["seeds"] == ";".join(map(str, seeds))
        assert row["not_finished"] == "0"
        assert float(row["density"]) == pytest.approx(1 - s)
        # the markdown shows the same numbers, rounded to 2 decimals
        md_line = next(
            ln for ln in to_markdown(table).splitlines() if ln.startswith(f"| {method} ")
        )
        assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" in md_line


def test_real_write_report(real_runs: Path, tmp_path: Path) -> None:
    records = records_in(real_runs)
    paths = write_report(records, tmp_path / "rep", paper=True)
    assert sorted(paths) == sorted(REPORT_FILES)
    for name, path in paths.items():
        assert path == tmp_path / "rep" / name and path.is_file()
        if name.endswith(".png"):
            assert_png(path)
    md = paths["report.md"].read_text()
    assert "no published numbers for digits/lenet5" in md
    assert "![final top-1 vs remaining weights](accuracy_vs_sparsity.png)" in md
    header = next(csv.reader(io.StringIO(paths["results.csv"].read_text())))
    assert tuple(header) == CSV_COLUMNS


def test_real_layer_densities_and_curves(real_runs: Path) -> None:
    table = build_table(records_in(real_runs))
    dens = layer_densities(table, 0.9)
    assert set(dens) == set(REAL_METHODS)
    for method in REAL_METHODS:
        masks = [
            Masks.load(real_runs / f"{method}-0.9-{k}" / "mask.safetensors") for k in REAL_SEEDS
        ]
        names = list(masks[0])
        assert list(dens[method]) == names  # the model's layer order
        for name in names:
            want = np.mean([int(m[name].sum()) / m[name].numel() for m in masks])
            assert dens[method][name] == pytest.approx(want)
        curve = training_curves(row_of(table, method), 0.9)
        tops = []
        for k in REAL_SEEDS:
            lines = (real_runs / f"{method}-0.9-{k}" / "metrics.jsonl").read_text().splitlines()
            tops.append(json.loads(lines[-1])["top1"])
        assert curve == [(1, pytest.approx(np.mean(tops)))]
    with pytest.raises(ValueError, match="no runs at sparsity"):
        write_report(records_in(real_runs), real_runs.parent / "bad", layer_sparsity=0.7)
    assert not (real_runs.parent / "bad").exists()  # nothing written


# ---------------------------------------------------------------------------------------
# Hand-written folders: edge cases
# ---------------------------------------------------------------------------------------
def test_not_finished_counted_not_averaged(tmp_path: Path) -> None:
    fake_run(tmp_path / "a0", seed=0, top1=60.0)
    fake_run(tmp_path / "a1", seed=1, top1=64.0)
    fake_run(tmp_path / "a2", seed=2, status="diverged")
    fake_run(tmp_path / "a3", seed=3, status="failed")
    fake_run(tmp_path / "a4", seed=4, status=None)  # incomplete: no result.json
    fake_run(tmp_path / "b0", density=0.2, seed=0, status="diverged")
    table = build_table(records_in(tmp_path))
    (row,) = table.rows
    cell = row.cells[0.9]
    assert cell.n == 2 and cell.mean == 62.0 and cell.seeds == [0, 1]
    assert [r.status for r in cell.unfinished] == ["diverged", "failed", "incomplete"]
    only_bad = row.cells[0.8]
    assert only_bad.n == 0 and only_bad.mean is None and len(only_bad.unfinished) == 1
    md = to_markdown(table)
    assert "(n=2, 3 not finished)" in md and "(n=0, 1 not finished)" in md
    assert "## Runs not finished (4)" in md
    for name in ("a2", "a3", "a4", "b0"):
        assert str(tmp_path / name) in md
    assert "diverged \\| at epoch 1" in md  # a | in an error does not break the table
    rows = {float(r["sparsity"]): r for r in csv_rows(table)}
    assert rows[0.9]["not_finished"] == "3" and rows[0.9]["n"] == "2"
    assert rows[0.8]["n"] == "0" and rows[0.8]["mean"] == "" and rows[0.8]["not_finished"] == "1"


def test_duplicates_raise_naming_both_folders(tmp_path: Path) -> None:
    fake_run(tmp_path / "sweep1" / "runs" / "x", seed=0, top1=60.0)
    fake_run(tmp_path / "sweep2" / "runs" / "x", seed=0, top1=61.0)
    fake_run(tmp_path / "sweep2" / "runs" / "y", seed=1, top1=61.0)
    with pytest.raises(ValueError, match="two runs of the same cell") as err:
        build_table(records_in(tmp_path / "sweep1", tmp_path / "sweep2"))
    assert str(tmp_path / "sweep1" / "runs" / "x") in str(err.value)
    assert str(tmp_path / "sweep2" / "runs" / "x") in str(err.value)
    # a failed duplicate is a duplicate too (one of the two folders is stale)
    fake_run(tmp_path / "sweep3" / "runs" / "y", seed=1, status="failed")
    with pytest.raises(ValueError, match="seed 1"):
        build_table(records_in(tmp_path / "sweep2", tmp_path / "sweep3"))


def test_single_seed_has_no_std(tmp_path: Path) -> None:
    fake_run(tmp_path / "a", top1=70.25)
    table = build_table(records_in(tmp_path))
    cell = table.rows[0].cells[0.9]
    assert cell.n == 1 and cell.mean == 70.25 and cell.std is None
    assert "| snip | 70.25 ± \u2013 (n=1) |" in to_markdown(table)  # alone: no bold
    (row,) = csv_rows(table)
    assert row["std"] == "" and row["min"] == row["max"] == "70.25" and row["best"] == "0"


def test_marks(tmp_path: Path) -> None:
    # column 90 %: snip mean 91 (std 1.414), grasp mean 90 (std 0.707; 1 <= 1.414: †),
    # synflow mean 85.5 (no mark), random one seed 90.8 (n=1: no †), magnitude 2 seeds
    # 88.0 / 89.0 (91 - 88.5 = 2.5 > max(1.414, 0.707): no †)
    values = {
        "snip": [90.0, 92.0],
        "grasp": [89.5, 90.5],
        "synflow": [85.0, 86.0],
        "random": [90.8],
        "magnitude": [88.0, 89.0],
    }
    for m, vals in values.items():
        for k, v in enumerate(vals):
            fake_run(tmp_path / f"{m}{k}", method=m, seed=k, top1=v)
    # column 80 %: a tie between two methods: both bold
    for m in ("snip", "grasp"):
        for k, v in enumerate([70.0, 72.0]):
            fake_run(tmp_path / f"{m}-80-{k}", method=m, density=0.2, seed=k, top1=v)
    table = build_table(records_in(tmp_path))
    marks = {
        (r.variant, s): (c.best, c.within_spread) for r in table.rows for s, c in r.cells.items()
    }
    assert marks == {
        ("snip", 0.9): (True, False),
        ("grasp", 0.9): (False, True),
        ("synflow", 0.9): (False, False),
        ("random", 0.9): (False, False),
        ("magnitude", 0.9): (False, False),
        ("snip", 0.8): (True, False),
        ("grasp", 0.8): (True, False),
    }
    md = to_markdown(table)
    assert "**91.00 ± 1.41** (n=2)" in md
    assert "90.00 ± 0.71† (n=2)" in md
    assert "85.50 ± 0.71 (n=2)" in md and "90.80 ± \u2013 (n=1)" in md
    assert md.count("**71.00 ± 1.41**") == 2
    assert "**Bold**: the highest mean" in md and "†: not the best" in md
    for r in csv_rows(table):
        want = marks[(r["variant"], float(r["sparsity"]))]
        assert (r["best"], r["within_spread"]) == (str(int(want[0])), str(int(want[1])))


def test_varying_epochs_and_rounds_split_variants(tmp_path: Path) -> None:
    for k in (0, 1):
        fake_run(tmp_path / f"e1-{k}", seed=k, top1=50.0 + k, epochs=1)
        fake_run(tmp_path / f"e2-{k}", seed=k, top1=60.0 + k, epochs=2)
    table = build_table(records_in(tmp_path))  # no duplicate error: different experiments
    assert [r.variant for r in table.rows] == ["snip epochs=1", "snip epochs=2"]
    assert [r.cells[0.9].mean for r in table.rows] == [50.5, 60.5]
    assert table.varying == ["train.epochs"]

    abl = tmp_path / "ablation"
    for rounds in (10, 5, 1):
        fake_run(abl / f"r{rounds}", method="ntksap", prune={"rounds": rounds}, top1=rounds)
    fake_run(abl / "dense", method=None, density=1.0, top1=99.0)
    table = build_table(records_in(abl))
    # numbers sort as numbers; the dense run has no prune settings, so no "rounds=" label
    assert [r.variant for r in table.rows] == [
        "dense",
        "ntksap rounds=1",
        "ntksap rounds=5",
        "ntksap rounds=10",
    ]
    assert table.sparsities == [0.0, 0.9]
    assert "Rows differ in: rounds (prune.rounds)." in to_markdown(table)


def test_density_rounding_shares_a_column(tmp_path: Path) -> None:
    fake_run(tmp_path / "a", density=0.8**6, seed=0, top1=80.0)
    fake_run(tmp_path / "b", density=0.262144000001, seed=1, top1=82.0)
    table = build_table(records_in(tmp_path))
    assert table.sparsities == [0.7379]
    assert table.rows[0].cells[0.7379].n == 2
    assert column_of(records_in(tmp_path)[0]) == (0.7379, 0.2621)


def test_paper_rows_cifar10_resnet20(tmp_path: Path) -> None:
    densities = {0.64: 0.36, 0.8**6: 0.7380, 0.8**18: 0.9820, 0.5: None}  # -> paper sparsity
    for d in densities:
        for k in (0, 1):
            for m in ("ntksap", "snip"):
                fake_run(tmp_path / f"{m}-{d}-{k}", method=m, density=d, seed=k,
                         top1=80.0 + k, dataset="cifar10", model="resnet20")  # fmt: skip
    table = build_table(records_in(tmp_path), paper=True)
    assert [r.variant for r in table.rows] == ["snip", "ntksap", "ntksap (paper)"]
    prow = table.rows[-1]
    assert prow.source == "paper" and prow.dataset == "cifar10"

    # the published numbers, read independently from the package's CSV
    text = Path(paper_mod.__file__).with_name("paper_results.csv").read_text()
    published = {
        float(r["sparsity"]): (float(r["top1"]), float(r["std"]))
        for r in csv.DictReader(ln for ln in text.splitlines() if not ln.startswith("#"))
        if (r["dataset"], r["model"], r["method"]) == ("cifar10", "resnet20", "ntksap")
    }
    md = to_markdown(table)
    (md_row,) = [ln for ln in md.splitlines() if ln.startswith("| ntksap (paper) |")]
    for d, ps in densities.items():
        s = round(1 - round(d, 4), 4)
        if ps is None:
            assert s not in prow.cells
            continue
        top1, std = published[ps]
        assert prow.cells[s].mean == top1 and prow.cells[s].std == std
        assert f"{top1:.2f} ± {std:.2f}" in md_row
    assert md_row.split("|")[3].strip() == ""  # 50 % (2nd column) has no published number
    assert "Wang, Li, Sun" in md and "ICLR 2023" in md
    assert "published numbers for cifar10/resnet20: ntksap" in md
    # the paper's row takes no part in the marks, and is not in the CSV
    assert not any(c.best or c.within_spread for c in prow.cells.values())
    assert {r["variant"] for r in csv_rows(table)} == {"snip", "ntksap"}

    paths = write_report(records_in(tmp_path), tmp_path / "rep", paper=True)
    for name in REPORT_FILES:
        if name.endswith(".png"):  # no masks, no metrics: placeholder figures, still PNGs
            assert_png(paths[name])


def test_no_published_numbers_and_unmatched(tmp_path: Path) -> None:
    fake_run(tmp_path / "m" / "a", dataset="mnist5k", model="lenet5")
    table = build_table(records_in(tmp_path / "m"), paper=True)
    assert table.paper_rows == []
    assert "no published numbers for mnist5k/lenet5" in to_markdown(table)
    # cifar10/resnet20 has numbers, but not for snip at 90 %
    fake_run(tmp_path / "c" / "a", dataset="cifar10", model="resnet20", density=0.1)
    md = to_markdown(build_table(records_in(tmp_path / "c"), paper=True))
    assert "match none of these runs' methods at these sparsities" in md
    # without paper=True, nothing about the paper
    assert "published" not in to_markdown(build_table(records_in(tmp_path / "c")))


def test_empty_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no run records"):
        build_table([])
    fake_run(tmp_path / "ok", top1=10.0)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "config.json").write_text("{not json")
    table = build_table(records_in(tmp_path))
    assert [r.folder.name for r in table.skipped] == ["torn"]
    assert "config.json missing or unreadable" in to_markdown(table)


def test_a_sweep_run_folder_without_config_is_listed_not_dropped(tmp_path: Path) -> None:
    """A folder under a sweep's runs/ whose config.json is gone (a run whose process died
    before writing it, or a file deleted by hand) is a run of the sweep: the report lists
    it; a folder of the same shape outside any sweep is not a run."""
    sweep = tmp_path / "sweep"
    fake_run(sweep / "runs" / "ok", top1=10.0)
    (sweep / "sweep.json").write_text("{}")
    (sweep / "runs" / "lost-seed0-0123abcd").mkdir()
    (sweep / "runs" / "lost-seed0-0123abcd" / "metrics.jsonl").write_text("")
    (tmp_path / "elsewhere" / "empty").mkdir(parents=True)  # no sweep.json above it
    for given in (tmp_path, sweep):
        folders = find_run_folders([given])
        assert [f.name for f in folders] == ["lost-seed0-0123abcd", "ok"], given
    table = build_table(records_in(sweep))
    assert [r.folder.name for r in table.skipped] == ["lost-seed0-0123abcd"]
    md = to_markdown(table)
    assert "Left out (1, config.json missing or unreadable)" in md
    assert "lost-seed0-0123abcd (no config.json)" in md
    assert "(n=1)" in md  # the finished run is still reported


# ---------------------------------------------------------------------------------------
# The paper's numbers
# ---------------------------------------------------------------------------------------
def test_paper_results_load() -> None:
    rows = paper_mod.load_paper_results()
    text = Path(paper_mod.__file__).with_name("paper_results.csv").read_text()
    comments = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert any("Wang, Dawei Li, Ruoyu Sun" in ln and "ICLR 2023" in ln for ln in comments)
    data = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(rows) == len(data) - 1  # minus the header
    r = paper_mod.match_paper(paper_mod.paper_rows_for("imagenet", "resnet50"), "snip", 0.8926)
    assert r is not None and (r.top1, r.std) == (60.98, None)
    near = paper_mod.match_paper(paper_mod.paper_rows_for("cifar10", "resnet20"), "ntksap", 0.737)
    assert near is not None and near.top1 == 90.04
    assert paper_mod.match_paper(paper_mod.load_paper_results(), "ntksap", 0.7365) is None
    assert "Tables 12-14" in paper_mod.PAPER_SOURCE and "Table 1" in paper_mod.PAPER_SOURCE


def test_a_setting_left_out_is_labelled_default_or_unrecorded(tmp_path: Path) -> None:
    """A setting absent from some runs' configs: "default" (those runs used it), except for
    an option whose default has changed (px's variant, `Method.pinned`): runs made before
    it was recorded are "unrecorded", never passed off as today's default."""
    fake_run(tmp_path / "a", method="px", top1=60.0)
    fake_run(tmp_path / "b", method="px", top1=70.0, prune={"options": {"variant": "code-2024"}})
    fake_run(tmp_path / "c", method="snip", top1=50.0)
    fake_run(tmp_path / "d", method="snip", top1=55.0, prune={"rounds": 5})
    labels = [row.variant for row in build_table(records_in(tmp_path)).rows]
    assert "px variant=unrecorded" in labels and "px variant=code-2024" in labels
    assert "snip rounds=default" in labels and "snip rounds=5" in labels
