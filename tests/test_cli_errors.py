"""A user's mistake ends the command with one line ``error: ...`` naming the file, row, option or
field, and exit status 2; ``--debug`` / ``DYNMOLE_DEBUG=1`` show the traceback, and a bug always
does (issue 12, item 8)."""

import json

import pytest
import torch

import dynmole.evaluation.engines
import dynmole.pretrained
from dynmole import cli
from dynmole.errors import DynmoleError
from dynmole.experiments import commands

ROW = {"id": "q0", "prompt": "question : the sky is ? answer :", "choices": [" blue", " red"], "label": 0,
       "task": "toy"}


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was checked")


def _error_line(argv, capsys):
    """The stderr of ``dynmole ARGV``, which must exit with status 2 after one line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_bad_inputs_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dynmole.pretrained, "load_model_and_tokenizer", _no_model)
    files = {
        "bad.yaml": b"lr: [1e-3\nbatch_size: 4\n",
        "bad.json": b'{"lr": 1e-3,}',
        "steps.yaml": b"max_steps: 2.5\n",
        "empty.jsonl": b"\n",
        "latin1.jsonl": json.dumps(ROW).encode() + b'\n{"id": "caf\xe9"}\n',
        "latin1.json": b'[\n{"id": "caf\xe9"}]',
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.jsonl").mkdir()
    train = ["train", "--tasks", "toy", "--output-dir", str(tmp_path / "out")]
    cases = [
        (["train", "--config", str(tmp_path / "absent.yaml")], f"--config {tmp_path / 'absent.yaml'}: No such file"),
        (["train", "--config", str(tmp_path / "bad.yaml")],
         "bad.yaml: bad YAML at line 2, column 11: expected ',' or ']', but got ':'"),
        (["train", "--config", str(tmp_path / "bad.json")], "bad.json: bad JSON at line 1, column 13"),
        (["train", "--config", str(tmp_path / "steps.yaml")], "max_steps must be an integer, got 2.5"),
        (["train", "--lr", "-1"], "lr must be >= 0, got -1.0"),
        (["train", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["train", "--grad-accum", "0"], "grad_accum must be >= 1, got 0"),
        (["train", "--cutoff-len", "0"], "cutoff_len must be >= 1, got 0"),
        (["train", "--logging-steps", "0"], "logging_steps must be >= 1, got 0"),
        (["eval", "--eval-batch-size", "0"], "eval_batch_size must be >= 1, got 0"),
        (["eval", "--tasks", "arc_x"], "unknown task 'arc_x'; known tasks: arc_e"),
        ([*train, "--source", str(tmp_path / "empty.jsonl")], f"{tmp_path / 'empty.jsonl'}: the file is empty"),
        ([*train, "--source", str(tmp_path / "folder.jsonl")],
         f"{tmp_path / 'folder.jsonl'}: is a folder, not a data"),
        ([*train, "--source", str(tmp_path / "absent.jsonl")], f"{tmp_path / 'absent.jsonl'}: no such file"),
        ([*train, "--source", str(tmp_path / "latin1.jsonl")],
         f"{tmp_path / 'latin1.jsonl'}: row 2: not UTF-8 text (byte 0xe9 at byte 12 of the line)"),
        ([*train, "--source", str(tmp_path / "latin1.json")],
         f"{tmp_path / 'latin1.json'}: line 2: not UTF-8 text (byte 0xe9 at byte 12 of the line)"),
    ]
    for argv, message in cases:
        assert message in _error_line(argv, capsys), argv


def test_skip_invalid_skips_a_row_that_is_not_utf8(tmp_path):
    from dynmole.data import read_local

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b'\n{"id": "caf\xe9"}\n')
    load = read_local(path, "toy", skip_invalid=True)
    assert [e.id for e in load.examples] == ["q0"] and "row 2: not UTF-8 text" in load.skipped[0]


@pytest.fixture
def toy_eval(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    """``dynmole eval`` arguments on a toy data file, the model a tiny random Llama."""
    monkeypatch.setattr(commands, "load_for_inference", lambda *args: (tiny_llama(), tiny_tokenizer))
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({**ROW, "id": f"q{i}"}) + "\n" for i in range(4)))
    return ["eval", "--source", str(data), "--eval-source", str(data), "--tasks", "toy"]


def _fail_with(monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(dynmole.evaluation.engines, "score_choices", fail)


def test_out_of_memory_names_the_knobs(toy_eval, monkeypatch, capsys):
    _fail_with(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB.\nSee the docs."))
    assert _error_line(toy_eval, capsys) == (
        "error: out of memory while evaluating toy (CUDA out of memory. Tried to allocate 40.00 GiB. See the docs.). "
        "Knobs to turn: --eval-batch-size, --eval-cutoff-len")


def test_debug_shows_the_traceback_and_a_bug_always_does(toy_eval, monkeypatch):
    _fail_with(monkeypatch, DynmoleError("a user's mistake"))
    with pytest.raises(DynmoleError, match="a user's mistake"):
        cli.main([*toy_eval, "--debug"])
    monkeypatch.setenv("DYNMOLE_DEBUG", "1")
    with pytest.raises(DynmoleError, match="a user's mistake"):
        cli.main(toy_eval)
    monkeypatch.delenv("DYNMOLE_DEBUG")
    _fail_with(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError, match="a bug"):
        cli.main(toy_eval)


def test_ctrl_c_ends_a_command_with_one_line_on_how_to_resume(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "train_job", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--method", "lora", "--tasks", "arc_e", "--output-dir", "unused"])
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("interrupted: `dynmole train` stopped") and "--resume" in err
    assert "Traceback" not in err
