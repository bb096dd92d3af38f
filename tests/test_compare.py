"""``dynmole eval --log-samples`` and ``dynmole compare``, on a tiny random Llama and a toy data file."""

import json

import pytest

from dynmole import cli
from dynmole.experiments import commands

FACTS = [("the sky is", " blue", " red"), ("fire is", " hot", " cold"), ("ice is", " cold", " hot"),
         ("water is", " wet", " dry"), ("the sun is", " hot", " wet"), ("a fish", " swims", " flies")]


def _rows(task, labels, prefix="q"):
    return [{"id": f"{prefix}{i}", "prompt": f"question : {p} ? answer :", "choices": [a, b] if label == 0 else [b, a],
             "label": label, "task": task} for i, ((p, a, b), label) in enumerate(zip(FACTS, labels))]


@pytest.fixture
def evaluate(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    """``evaluate(name, rows, seed)``: ``dynmole eval --log-samples`` of a tiny random Llama (``seed``)
    on ``rows``; returns the results file's path."""
    def run(name, rows, seed=0, extra=()):
        monkeypatch.setattr(commands, "load_for_inference", lambda *args: (tiny_llama(seed), tiny_tokenizer))
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        out = tmp_path / f"{name}.json"
        tasks = ",".join(dict.fromkeys(row["task"] for row in rows))
        cli.main(["eval", "--source", str(data), "--eval-source", str(data), "--tasks", tasks, "--output", str(out),
                  "--log-samples", *extra])
        return out

    return run


def _error_line(argv, capsys):
    capsys.readouterr()  # what ran before
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_log_samples_reproduce_the_accuracies(evaluate, capsys):
    rows = _rows("toy", [0, 1, 0, 1, 0, 1])
    out = evaluate("a", rows)
    (result,) = json.loads(out.read_text())["results"].values()
    samples = result["samples"]["toy"]
    gold = {row["id"]: row["label"] for row in rows}
    assert sorted(samples["id"]) == sorted(gold) and samples["label"] == [gold[i] for i in samples["id"]]
    for metric, scores in (("acc", "loglik"), ("acc_norm", "loglik_norm")):
        assert all(len(choices) == 2 for choices in samples[scores])
        assert samples[metric] == [max(range(2), key=lambda i: (s[i], -i)) for s in samples[scores]]
        hits = sum(p == label for p, label in zip(samples[metric], samples["label"]))
        assert result["tasks"]["toy"][metric] == hits / len(rows)
    # without --log-samples: the same numbers, no samples
    plain = out.with_name("plain.json")
    cli.main(["eval", "--source", str(out.with_name("a.jsonl")), "--eval-source", str(out.with_name("a.jsonl")),
              "--tasks", "toy", "--output", str(plain)])
    (plain_result,) = json.loads(plain.read_text())["results"].values()
    assert "samples" not in plain_result and plain_result["tasks"] == result["tasks"]


def test_compare_with_itself_is_zero_with_p_one(evaluate, capsys):
    out = evaluate("a", _rows("toy", [0, 1, 0, 1, 0, 1]) + _rows("other", [1, 0, 1, 0], prefix="r"))
    capsys.readouterr()
    cli.main(["compare", str(out), str(out), "--resamples", "200"])
    table = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("|")}
    assert set(rows) >= {"toy", "other", "average"}
    for name in ("toy", "other", "average"):
        cells = rows[name]
        assert cells[4] == "+0.0" and cells[5] == "[+0.0, +0.0]" and cells[6] == "1.000" and cells[7] == "1.000"
        assert cells[8].strip(" |") == "0 / 0"
    assert rows["average"][1] == "10"


def test_compare_of_two_models_matches_the_paired_test(evaluate, capsys):
    from dynmole.analysis.compare import read_samples
    from dynmole.analysis.significance import paired_comparison

    rows = _rows("toy", [0, 1, 0, 1, 0, 1])
    a, b = evaluate("a", rows, seed=0), evaluate("b", rows, seed=3)
    capsys.readouterr()
    cli.main(["compare", str(a), str(b), "--metric", "acc", "--resamples", "300", "--seed", "1"])
    table = capsys.readouterr().out
    test = paired_comparison([read_samples(str(a))[1]], [read_samples(str(b))[1]], "acc", resamples=300, seed=1)
    average = next(line for line in table.splitlines() if line.startswith("| average |"))
    assert f"| {100 * test.average.difference:+.1f} |" in average


def test_compare_refuses_files_of_different_examples(evaluate, capsys):
    a = evaluate("a", _rows("toy", [0, 1, 0, 1, 0, 1]))
    b = evaluate("b", _rows("toy", [0, 1, 0, 1, 0, 1], prefix="x"))
    err = _error_line(["compare", str(a), str(b)], capsys)
    assert "were not scored on the same examples: task toy differs in 12 ids" in err
    c = evaluate("c", _rows("other", [0, 1, 0, 1, 0, 1]))
    assert "not scored on the same examples: the tasks differ" in _error_line(["compare", str(a), str(c)], capsys)


def test_compare_refuses_files_without_samples(tmp_path, capsys):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"results": {"m": {"tasks": {"toy": {"acc": 0.5}}}}, "metadata": {}}))
    err = _error_line(["compare", str(plain), str(plain)], capsys)
    assert "has no per-example samples: was it written with --log-samples?" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "broken.json: bad JSON at line 1, column 2" in _error_line(["compare", str(broken), str(plain)], capsys)
    assert "no such file" in _error_line(["compare", str(tmp_path / "missing.json"), str(plain)], capsys)


def test_compare_reads_a_grid_runs_predictions_and_picks_a_run(tmp_path, capsys):
    predictions = {"toy": {"id": ["q0", "q1", "q2"], "label": [0, 1, 0], "acc": [0, 1, 1], "acc_norm": [0, 1, 1]}}
    grid = tmp_path / "predictions.json"
    grid.write_text(json.dumps(predictions))
    both = tmp_path / "results.json"
    worse = {"id": ["q2", "q1", "q0"], "label": [0, 1, 0], "acc": [1, 0, 1], "acc_norm": [1, 0, 1]}
    both.write_text(json.dumps({"results": {"base": {"samples": {"toy": worse}},
                                            "lora": {"samples": predictions}}}))
    assert "several runs with samples" in _error_line(["compare", str(grid), str(both)], capsys)
    cli.main(["compare", str(grid), f"{both}#base", "--resamples", "100"])
    average = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| average |"))
    assert "| +66.7 |" in average and "| 2 / 0 |" in average


def test_log_samples_needs_output(capsys):
    err = _error_line(["eval", "--tasks", "arc_e", "--log-samples"], capsys)
    assert "--log-samples needs --output" in err
    err = _error_line(["eval", "--harness", "arc_easy", "--output", "x.json", "--log-samples"], capsys)
    assert "--log-samples applies to dynmole's own evaluation, not to --harness" in err


def test_log_samples_under_label_scoring(evaluate):
    out = evaluate("a", _rows("toy", [0, 1, 0, 1, 0, 1]), extra=("--scoring", "label"))
    (result,) = json.loads(out.read_text())["results"].values()
    samples = result["samples"]["toy"]
    assert samples["acc_norm"] == samples["acc"] and samples["loglik_norm"] == samples["loglik"]
    assert samples["acc"] == [max(range(2), key=lambda i: (s[i], -i)) for s in samples["loglik"]]
    hits = sum(p == label for p, label in zip(samples["acc"], samples["label"]))
    assert result["tasks"]["toy"]["acc"] == result["tasks"]["toy"]["acc_norm"] == hits / 6


def test_compare_is_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "compare" in capsys.readouterr().out


def test_run_log_samples_keeps_both_runs(tiny_llama, tiny_tokenizer, tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows("toy", [0, 1, 0, 1, 0, 1])))
    out = tmp_path / "run"
    cli.main(["run", "--model", str(folder), "--source", str(data), "--tasks", "toy", "--method", "lora", "--r", "2",
              "--max-steps", "1", "--batch-size", "2", "--report-to", "none", "--output-dir", str(out),
              "--log-samples"])
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"base (zero-shot)", "lora (fine-tuned)"}
    assert all("samples" in result for result in results.values())
    path = str(out / "results.json")
    assert "several runs with samples" in _error_line(["compare", path, path], capsys)
    cli.main(["compare", f"{path}#lora (fine-tuned)", f"{path}#base (zero-shot)", "--resamples", "100"])
    assert "| average |" in capsys.readouterr().out
