"""The published results (docs/results.md and the reports under docs/results/) are what the committed runs give."""

from pathlib import Path

import pytest

from dynmole.analysis import RunRecord, group_by_variant
from dynmole.analysis.tables import comparison_table
from dynmole.experiments.profiles import VARIANTS

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNS = DOCS / "results" / "mini" / "runs"
CPU = DOCS / "results" / "cpu"


def _grid_records(runs: Path = RUNS) -> list[RunRecord]:
    # The paper's row order, as `dynmole reproduce` plans the grid.
    folders = [runs / "base"] + [p.parent for key in VARIANTS for p in sorted(runs.glob(f"{key}/seed*/result.json"))]
    return [RunRecord.read(folder) for folder in folders]


@pytest.mark.parametrize("metric", ["acc_norm", "acc"])
def test_committed_runs_give_the_published_table(metric):
    records = _grid_records()
    assert len(records) == 1 + 12 * 2  # the base model, then 12 variants x 2 seeds
    table = comparison_table(group_by_variant(records), metric)
    published = (DOCS / "results" / "mini" / "results.md").read_text()
    assert table.strip() in published


def test_results_md_quotes_the_committed_averages():
    table = comparison_table(group_by_variant(_grid_records()))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    text = (DOCS / "results.md").read_text()
    text = text[text.index("# Results: the `mini` profile"):]  # the mini section (the cpu grid leads the page)
    for name in ("LoRA", "DynMoLE", "LD-MoLE (shared)", "ReMoLE"):
        average = rows[name].split("|")[6].strip()
        assert f"| {name} |" in text and average in text.split(f"| {name} |")[1].splitlines()[0]


@pytest.mark.parametrize("metric", ["acc_norm", "acc"])
def test_cpu_report_is_the_committed_runs(metric):
    # docs/results/cpu/results.md, rewritten by every `reproduce` call on the folder, must be the whole grid's.
    table = comparison_table(group_by_variant(_grid_records(CPU / "runs")), metric)
    assert table.strip() in (CPU / "results.md").read_text()


def _table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first markdown table of ``text``: its header cells and, by first cell, each row's cells."""
    table = text[text.index("\n|") + 1:].split("\n\n")[0]
    header, _, *rows = [[cell.strip() for cell in line.split("|")] for line in table.splitlines()]
    return header, {cells[1]: cells for cells in rows}


def test_results_md_quotes_the_cpu_report_averages():
    report = (CPU / "results.md").read_text()
    _, quoted = _table((DOCS / "results.md").read_text().split("**Averages, protocol `cloze`**")[1])
    for column, metric in ((2, "acc_norm"), (3, "acc")):
        header, rows = _table(report.split(f"### 95 % intervals: {metric}\n")[1])
        average = header.index("average")
        assert set(quoted) == set(rows)
        assert all(quoted[name][column] == cells[average] for name, cells in rows.items())


def test_results_md_quotes_the_cpu_report_verdicts():
    # The verdict tables of results.md (all items, then without the leaked ones) and the routing claims
    # are the report's rows, verbatim.
    report = (CPU / "results.md").read_text()
    text = (DOCS / "results.md").read_text()
    for marker, section in (("**Verdicts, protocol `cloze`**", "### Verdict per claim"),
                            ("**Without the leaked WinoGrande items.**", "## Paired tests without the leaked items"),
                            ("- **Routing claims**", "## Routing claims")):
        quoted = text.split(marker)[1]
        quoted = quoted[quoted.index("\n|") + 1:].split("\n\n")[0].strip().splitlines()
        source = report.split(section)[1]
        source = source[source.index("\n|") + 1:].split("\n\n")[0].strip().splitlines()
        assert quoted == source and len(quoted) > 3
