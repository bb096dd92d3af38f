"""The published mini results (docs/results.md) are what the committed runs give."""

from pathlib import Path

import pytest

from dynmole.analysis import RunRecord, group_by_variant
from dynmole.analysis.tables import comparison_table
from dynmole.reproduce_profiles import VARIANTS

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNS = DOCS / "results" / "mini" / "runs"


def _grid_records() -> list[RunRecord]:
    # The paper's row order, as `dynmole reproduce` plans the grid.
    folders = [RUNS / "base"] + [p.parent for key in VARIANTS for p in sorted(RUNS.glob(f"{key}/seed*/result.json"))]
    return [RunRecord.read(folder) for folder in folders]


@pytest.mark.parametrize("metric", ["acc_norm", "acc"])
def test_committed_runs_give_the_published_table(metric):
    records = _grid_records()
    assert len(records) == 1 + 12 * 2  # the base model, then 12 variants x 2 seeds
    table = comparison_table(group_by_variant(records), metric)
    published = (DOCS / "results" / "mini" / "results.md").read_text()
    assert table.strip() in published


def test_results_md_quotes_the_committed_averages():
    rows = {line.split("|")[1].strip(): line for line in comparison_table(group_by_variant(_grid_records())).splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    text = (DOCS / "results.md").read_text()
    text = text[text.index("# Results: the `mini` profile"):]  # the mini section (the cpu grid leads the page)
    for name in ("LoRA", "DynMoLE", "LD-MoLE (shared)", "ReMoLE"):
        average = rows[name].split("|")[6].strip()
        assert f"| {name} |" in text and average in text.split(f"| {name} |")[1].splitlines()[0]
