"""``dynmole bench --sections train`` on a tiny random model: the printed structure and the JSON
rows (no timing asserts)."""

import contextlib
import io
import json
import math

import pytest

from dynmole import bench
from dynmole.bench.train import EVAL_VARIANTS, TRAIN_VARIANTS


@pytest.fixture(scope="module")
def train_section(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_train") / "bench.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(["--tiny", "--sections", "train", "--no-compile", "--json", str(path)]) == 0
    return out.getvalue(), json.loads(path.read_text())


def test_table_lists_every_variant_against_the_first(train_section):
    table, _ = train_section
    blocks = table.split("== ")[1:]
    assert [block.split(":")[0] for block in blocks] == ["train", "eval"]
    for block, variants in zip(blocks, (TRAIN_VARIANTS, EVAL_VARIANTS)):
        lines = block.splitlines()
        assert "x first" in lines[1]
        assert [line.split()[0] for line in lines[2 : 2 + len(variants)]] == list(variants)
        assert lines[2].split()[4] == "1.000"  # the first row is the reference
    assert table.count("max|d loss| vs first=") == 3  # (a), (b), (c): same batches; (d) has other batches
    assert table.count("max|d loglik| vs first=") == 1
    assert "LM-head positions=" in table and "examples/s=" in table


def test_json_rows(train_section):
    _, report = train_section
    assert report["problems"] == []
    rows = {(row["section"], row["variant"]): row for row in report["rows"]}
    assert set(rows) == {("train", v) for v in TRAIN_VARIANTS} | {("eval", v) for v in EVAL_VARIANTS}
    for row in rows.values():
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]
    full, answer = rows["train", TRAIN_VARIANTS[0]]["extra"], rows["train", TRAIN_VARIANTS[1]]["extra"]
    assert answer["head_positions_share"] < full["head_positions_share"] == 1.0
    assert answer["max_abs_loss_delta"] < 1e-5  # fp32: the same loss
    assert rows["train", TRAIN_VARIANTS[2]]["extra"]["max_abs_loss_delta"] < 0.1  # bf16: about the same
    assert rows["train", TRAIN_VARIANTS[3]]["extra"]["padding_share"] <= full["padding_share"]
    assert rows["eval", EVAL_VARIANTS[1]]["extra"]["max_abs_loglik_delta"] < 1e-4
    assert report["train"]["warmup"] == 1 and report["train"]["reps"] == 2
