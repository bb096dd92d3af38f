"""Every entry point trains on the format its evaluation protocol scores (``JobConfig.scoring``),
and records the protocol; ``choices`` is still read as ``cloze``."""

import json

import pytest
import torch

import dynmole.data
import dynmole.pretrained
from dynmole import cli
from dynmole.data import Example, format_examples
from dynmole.errors import DynmoleError
from dynmole.experiments import commands, grid, job, pipeline, reproduce

FACTS = [("the sky is", " blue", " red"), ("fire is", " hot", " cold"), ("ice is", " cold", " hot")]


def _examples(task: str, n: int) -> list[Example]:
    out = []
    for i in range(n):
        prompt, right, wrong = FACTS[i % len(FACTS)]
        choices = (right, wrong) if i % 2 == 0 else (wrong, right)
        out.append(Example(f"{task}/{i}", task, f"question : {prompt} ?\nAnswer:", choices, i % 2))
    return out


TRAIN = _examples("arc_e", 4) + _examples("boolq", 4)
EVAL = {"arc_e": _examples("arc_e", 3), "boolq": _examples("boolq", 3)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained(monkeypatch, tiny_llama, tiny_tokenizer):
    """Replaces model loading, data loading and training (which records the examples it gets)."""
    seen: list[list[Example]] = []

    def fake_train(model, tokenizer, examples, config, *args, **kwargs):
        seen.append(list(examples))
        return model, {"steps": 0, "examples": len(examples), "train_loss": 0.0}

    load = lambda *args, **kwargs: (tiny_llama(), tiny_tokenizer)  # noqa: E731
    for module in (commands, dynmole.pretrained):
        monkeypatch.setattr(module, "load_model_and_tokenizer", load)
    for module in (job, dynmole.data):
        monkeypatch.setattr(module, "load_mixture", lambda *args, **kwargs: list(TRAIN))
    monkeypatch.setattr(job, "load_examples", lambda task, *args, **kwargs: EVAL[task])
    monkeypatch.setattr(pipeline, "train", fake_train)  # the one pipeline of run, train and reproduce
    return seen


def _job_argv(tmp_path, scoring: str) -> list[str]:
    return ["--method", "lora", "--tasks", "arc_e,boolq", "--r", "2", "--output-dir", str(tmp_path),
            "--scoring", scoring]


@pytest.mark.parametrize("scoring", ["cloze", "label"])
def test_run_trains_on_the_evaluated_format(tmp_path, trained, scoring):
    job_config, train_config, mole = cli.job_configs(["run", *_job_argv(tmp_path, scoring)])
    commands.run_job(job_config, train_config, mole)
    assert trained == [format_examples(TRAIN, scoring)]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metadata"]["scoring"] == scoring and saved["metadata"]["job"]["scoring"] == scoring
    assert {run["scoring"] for run in saved["results"].values()} == {scoring}
    assert f"## acc (%, {scoring}: " in (tmp_path / "results.md").read_text()


def test_train_command_trains_on_the_label_format(tmp_path, trained):
    cli.main(["train", *_job_argv(tmp_path, "label")])
    assert trained == [format_examples(TRAIN, "label")]
    assert trained[0][0].prompt.startswith("Please choose the correct answer") and trained[0][0].answer == " A"


def test_reproduce_trains_on_the_label_format(tmp_path, trained, tiny_llama, tiny_tokenizer):
    inputs = reproduce.Inputs(load_model=lambda: (tiny_llama(), tiny_tokenizer), train_examples=lambda seed: TRAIN,
                              eval_examples=EVAL, description="toy")
    argv = ["--profile", "tiny", "--methods", "lora", "--seeds", "0", "--set", "scoring=label",
            "--output-dir", str(tmp_path)]
    assert reproduce.main(argv, inputs=inputs) == 0
    assert trained == [format_examples(TRAIN, "label")]
    for run in ("base", "lora/seed0"):
        result = json.loads((tmp_path / "runs" / run / "result.json").read_text())
        assert result["eval"]["scoring"] == result["job"]["scoring"] == "label"
    markdown = (tmp_path / "results.md").read_text()
    assert "## acc (%, label: " in markdown and "## acc_norm (%, label: same as acc)" in markdown


def test_choices_in_a_config_file_still_runs_as_cloze(tmp_path, trained):
    config = tmp_path / "old.yaml"
    config.write_text("method: lora\ntasks: [arc_e, boolq]\nr: 2\nscoring: choices\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    job_config, train_config, mole = cli.job_configs(["run", "--config", str(config)])
    assert job_config.scoring == "cloze"
    commands.run_job(job_config, train_config, mole)
    assert trained == [TRAIN]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["metadata"]["scoring"] == "cloze"
    with pytest.raises(DynmoleError, match="unknown scoring 'letters'"):
        cli.job_configs(["run", "--scoring", "letters"])


def test_old_runs_recorded_as_choices_read_as_cloze(tmp_path):
    from dynmole.analysis import RunRecord

    (tmp_path / "result.json").write_text(json.dumps({"variant": "LoRA", "eval": {"scoring": "choices"}}))
    assert RunRecord.read(tmp_path).scoring == "cloze"


def test_a_finished_run_recorded_as_choices_is_not_reported_as_changed(tmp_path):
    from dynmole.analysis import RunRecord
    from dynmole.experiments.profiles import PROFILES, VARIANTS

    (spec,) = grid.plan(PROFILES["tiny"], [VARIANTS["lora"]], [0], {}, tmp_path, eval_base=False)
    result = json.loads(json.dumps(grid._settings_record(spec)))
    assert result["job"]["scoring"] == "cloze"
    result["job"]["scoring"] = "choices"
    assert grid.changed_settings(spec, RunRecord(tmp_path, result)) == []
    result["job"]["scoring"] = "label"
    assert grid.changed_settings(spec, RunRecord(tmp_path, result)) == ["job.scoring"]


def test_run_prints_held_out_routing_before_and_after_training(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer,
                                                                capsys):
    """``run`` (and so the demo) with the routing probe on trains for real and puts the probe's first and
    last records beside the accuracies: routing before and after training, and says that a router
    learning rate other than the papers' is a departure."""
    load = lambda *args, **kwargs: (tiny_llama(), tiny_tokenizer)  # noqa: E731
    monkeypatch.setattr(commands, "load_model_and_tokenizer", load)
    monkeypatch.setattr(job, "load_mixture", lambda *args, **kwargs: list(TRAIN))
    monkeypatch.setattr(job, "load_examples", lambda task, *args, **kwargs: EVAL[task])
    argv = ["run", "--method", "dynmole", "--tasks", "arc_e,boolq", "--r", "2", "--output-dir", str(tmp_path),
            "--max-steps", "2", "--batch-size", "4", "--routing-probe-steps", "2", "--router-lr-scale", "10",
            "--report-to", "none"]
    commands.run_command(*cli.job_configs(argv))
    out = capsys.readouterr().out
    assert "routers train at 10x the learning rate (--router-lr-scale): a departure from the papers" in out
    rows = [line for line in out.splitlines() if line.startswith("| before training") or line.startswith("| after")]
    assert [row.split(" (")[0] for row in rows] == ["| before training", "| after 2 steps"]
    saved = json.loads((tmp_path / "results.json").read_text())["metadata"]["routing_probe"]
    assert saved["before"]["step"] == 0 and saved["after"]["step"] == 2 and saved["examples"] > 0
    assert 0 < saved["after"]["probe_max_load"] <= 1 and saved["after"]["probe_input_dependence"] is not None
