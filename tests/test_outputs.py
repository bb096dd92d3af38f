"""A run's output folder: the newest complete checkpoint is found, another run's files are never
mixed in, and an unwritable folder fails before any work (issue 12, items 5-7)."""

import json
import shutil

import pytest
import torch

from dynmole import MoLEConfig, cli
from dynmole.adapters import adapt_model
from dynmole.data import Example
from dynmole.errors import DynmoleError
from dynmole.training.config import TrainConfig
from dynmole.training.runs import check_output_dir, resume_checkpoint, scan_checkpoints, start_run
from dynmole.training.trainer import train

EXAMPLES = [Example(f"toy/{i}", "toy", "question : the sky is ? answer :", (" blue", " red"), 0) for i in range(8)]


def _checkpoint(folder, step, state="complete"):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if state == "complete":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    elif state == "cut short":
        (path / "trainer_state.json").write_text('{"global_step": %d, "log_hist' % step)
    return path


def _log(folder, steps):
    (folder / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))


def test_scan_takes_the_newest_complete_checkpoint_and_says_why_it_skips_newer_ones(tmp_path):
    complete = _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8, "cut short")  # killed while writing trainer_state.json
    _checkpoint(tmp_path, 12, "empty")  # killed as the save began
    shutil.copytree(complete, tmp_path / "checkpoint-20.bak")  # a stray copy is no checkpoint
    (tmp_path / "checkpoint-30").write_text("")  # nor is a file
    latest, skipped = scan_checkpoints(tmp_path)
    assert latest == complete
    assert skipped == [
        "checkpoint-12: no trainer_state.json, which the Trainer writes last: its save was interrupted",
        "checkpoint-8: its trainer_state.json is cut short or unreadable: its save was interrupted",
    ]
    assert scan_checkpoints(tmp_path / "absent") == (None, [])


def test_an_interrupted_run_needs_resume_or_overwrite(tmp_path):
    _log(tmp_path, [1, 2])
    _checkpoint(tmp_path, 2)
    with pytest.raises(DynmoleError, match=r"holds an interrupted run \(checkpoint-2, log.jsonl\): pass --resume to "
                                           r"continue it from checkpoint-2, --overwrite to start again"):
        check_output_dir(tmp_path, resume=False, overwrite=False)
    check_output_dir(tmp_path, resume=True, overwrite=False)
    shutil.rmtree(tmp_path / "checkpoint-2")
    _checkpoint(tmp_path, 2, "empty")
    with pytest.raises(DynmoleError, match=r"--resume: .* has no complete checkpoint to resume from \(checkpoint-2: "
                                           r"no trainer_state.json.*\): pass --overwrite"):
        check_output_dir(tmp_path, resume=True, overwrite=False)
    assert resume_checkpoint(tmp_path, resume=True, overwrite=True) is None  # resume when possible, else start again
    start_run(tmp_path, None, overwrite=True, max_steps=4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("max_steps, kept", [(4, False), (2, True)])
def test_resume_cuts_the_logs_back_and_drops_outputs_the_resumed_run_replaces(tmp_path, max_steps, kept):
    _log(tmp_path, [1, 2, 3])  # killed after step 3, its checkpoint at step 2, while logging step 4
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"step": 4, "lo')
    checkpoint = _checkpoint(tmp_path, 2)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "results.json").write_text("{}")
    assert resume_checkpoint(tmp_path, resume=True, overwrite=False) == checkpoint
    start_run(tmp_path, checkpoint, overwrite=False, max_steps=max_steps)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    # resuming before the last step, the old adapter and results would sit beside the new run's
    assert (tmp_path / "adapter").exists() == kept and (tmp_path / "results.json").exists() == kept


def _train(tiny_llama, tiny_tokenizer, output_dir, method="dynmole", **settings):
    torch.manual_seed(0)
    model = adapt_model(tiny_llama(), method, MoLEConfig(r=2, num_experts=2, top_k=1, dropout=0.0))
    config = TrainConfig(output_dir=str(output_dir), batch_size=4, logging_steps=1, report_to="none", **settings)
    return train(model, tiny_tokenizer, EXAMPLES, config)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_finished_run_is_refused_untouched_and_overwrite_replaces_it(tiny_llama, tiny_tokenizer, tmp_path):
    _train(tiny_llama, tiny_tokenizer, tmp_path, max_steps=2, save_steps=1)
    (tmp_path / "results.json").write_text("{}")  # as `dynmole run` leaves it
    before = _files(tmp_path)
    with pytest.raises(DynmoleError, match=r"holds a finished run \(adapter, checkpoint-1, checkpoint-2, log.jsonl, "
                                           r"results.json\): pass --overwrite to replace it"):
        _train(tiny_llama, tiny_tokenizer, tmp_path, max_steps=3)
    assert _files(tmp_path) == before
    with pytest.raises(DynmoleError, match="cannot resume .*checkpoint-2: it was trained with other adapter settings"):
        _train(tiny_llama, tiny_tokenizer, tmp_path, "mola", max_steps=3, resume=True)
    assert _files(tmp_path) == before  # refused before the resume cut the logs or dropped the old adapter
    _train(tiny_llama, tiny_tokenizer, tmp_path, max_steps=3, overwrite=True)
    assert not (tmp_path / "results.json").exists() and not list(tmp_path.glob("checkpoint-*"))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # the new run's steps only


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the output folder was checked")


def test_output_folder_problems_fail_before_any_work(tmp_path, monkeypatch, capsys):
    import dynmole.experiments.commands
    import dynmole.pretrained

    monkeypatch.setattr(dynmole.pretrained, "load_model_and_tokenizer", _no_model)
    monkeypatch.setattr(dynmole.experiments.commands, "load_model_and_tokenizer", _no_model)
    blocker = tmp_path / "file"  # a regular file where a folder should be (chmod stops no root process)
    blocker.write_text("")
    finished = tmp_path / "finished"
    (finished / "adapter").mkdir(parents=True)
    cases = [
        (["run", "--output-dir", str(blocker / "out")], f"cannot write to the output folder {blocker / 'out'}: "
                                                        f"{blocker} is a file, not a folder"),
        (["train", "--output-dir", str(blocker / "out")], "cannot write to the output folder"),
        (["eval", "--output", str(blocker / "eval.json")], f"cannot write to the folder of --output {blocker}: "
                                                           f"{blocker} is a file, not a folder"),
        (["eval", "--output", str(tmp_path)], f"--output {tmp_path} is a folder: give the path of the results file"),
        (["run", "--output-dir", str(finished)], f"{finished} holds a finished run (adapter): pass --overwrite"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, "--tasks", "arc_e"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
