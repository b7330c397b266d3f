"""Published NTK-SAP results, shipped with the package, to set beside a report's own runs.

The numbers live in `paper_results.csv` next to this file (package data), one row per
(dataset, model, method, sparsity): top-1 (%) and its std over 3 seeds where the paper gives
one. Sparsity is the fraction of prunable weights removed, as in a run's config.

Example:
    >>> rows = paper_rows_for("cifar10", "resnet20")
    >>> [(r.method, r.sparsity, r.top1, r.std) for r in rows][:2]
    [('ntksap', 0.36, 91.36, 0.41), ('ntksap', 0.738, 90.04, 0.23)]
    >>> paper_rows_for("mnist5k", "lenet5")
    []
    >>> match_paper(rows, "ntksap", 1 - 0.8**6).top1  # 0.737856 matches the paper's 73.80 %
    90.04
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

#: Who published the numbers, and where (for the line under a report's table).
PAPER_SOURCE = (
    'Wang, Li, Sun, "NTK-SAP: Improving Neural Network Pruning by Aligning Training '
    'Dynamics", ICLR 2023: Tables 12-14 (CIFAR-10 ResNet-20, CIFAR-100 VGG-16-BN, '
    "Tiny-ImageNet ResNet-18; mean ± std of 3 seeds) and Table 1 (ImageNet ResNet-18/50, "
    "no std)"
)

#: A run's sparsity matches a published one when they differ by at most this much: the paper
#: prints 73.80 % for 1 - 0.8**6 = 0.737856, and 89.26 % for 0.8926 on ImageNet.
SPARSITY_TOLERANCE = 0.001

_CSV = "paper_results.csv"


@dataclass(frozen=True)
class PaperResult:
    """One published number: top-1 (%) of `method` on `dataset`/`model` at `sparsity`.

    `std` is None where the paper gives none (ImageNet, Table 1).
    """

    dataset: str
    model: str
    method: str
    sparsity: float
    top1: float
    std: float | None


@functools.cache
def _load() -> tuple[PaperResult, ...]:
    # importlib.resources reads the file whether the package is a folder, an installed
    # wheel or a zip; the CSV's '#' lines name the source and are not data.
    text = resources.files("ntksap.experiments").joinpath(_CSV).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out = []
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        std = (row.get("std") or "").strip()
        out.append(
            PaperResult(
                dataset=row["dataset"].strip(),
                model=row["model"].strip(),
                method=row["method"].strip(),
                sparsity=float(row["sparsity"]),
                top1=float(row["top1"]),
                std=float(std) if std else None,
            )
        )
    return tuple(out)


def load_paper_results() -> list[PaperResult]:
    """Every published number in the package's CSV, in file order.

    >>> len(load_paper_results()) > 0
    True
    """
    return list(_load())


def paper_rows_for(dataset: str, model: str) -> list[PaperResult]:
    """The published numbers for one data set and model (empty when the paper has none).

    >>> {r.method for r in paper_rows_for("imagenet", "resnet50")} >= {"ntksap", "snip"}
    True
    """
    return [r for r in _load() if r.dataset == dataset and r.model == model]


def match_paper(rows: Iterable[PaperResult], method: str, sparsity: float) -> PaperResult | None:
    """The published number of `method` nearest `sparsity` within SPARSITY_TOLERANCE, or None.

    >>> match_paper(paper_rows_for("cifar10", "resnet20"), "ntksap", 0.5) is None
    True
    """
    best: PaperResult | None = None
    for r in rows:
        diff = abs(r.sparsity - sparsity)
        if (
            r.method == method
            and diff <= SPARSITY_TOLERANCE + 1e-12
            and (best is None or diff < abs(best.sparsity - sparsity))
        ):
            best = r
    return best


__all__ = [
    "PAPER_SOURCE",
    "SPARSITY_TOLERANCE",
    "PaperResult",
    "load_paper_results",
    "match_paper",
    "paper_rows_for",
]
