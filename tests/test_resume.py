"""A run killed with SIGKILL (between steps, or while it writes a checkpoint) resumes from its
newest complete checkpoint and ends where an uninterrupted run ends."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from transformers import TrainerCallback
    import conftest
    from test_train import _examples
    from dynmole import MoLEConfig
    from dynmole.adapters import adapt_model
    from dynmole.training.config import TrainConfig
    from dynmole.training.trainer import train

    torch.use_deterministic_algorithms(True)
    output_dir, kill_at, resume, kill_in_save = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    import dynmole.training.trainer as train_module
    original = train_module.MoLETrainer.__init__
    def with_crash(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks", [])) + [Crash()]
        original(self, *a, **k)
    if not kill_in_save:
        train_module.MoLETrainer.__init__ = with_crash

    save_optimizer = train_module.MoLETrainer._save_optimizer_and_scheduler
    def killed_while_saving(self, output_dir):
        # the checkpoint's weights are written; the kill lands halfway through optimizer.pt
        if kill_in_save and self.state.global_step == kill_at:
            with open(os.path.join(output_dir, "optimizer.pt"), "wb") as handle:
                handle.write(b"half an optimizer")
            os.kill(os.getpid(), signal.SIGKILL)
        save_optimizer(self, output_dir)
    train_module.MoLETrainer._save_optimizer_and_scheduler = killed_while_saving

    model = conftest.tiny_llama.__wrapped__()(seed=0)
    tokenizer = conftest.tiny_tokenizer.__wrapped__()
    model = adapt_model(model, "dynmole", MoLEConfig(r=4, alpha=8, dropout=0.1))
    config = TrainConfig(output_dir=output_dir, max_steps=8, batch_size=4, lr=1e-2, save_steps=4,
                         logging_steps=2, report_to="none", seed=3, resume=resume)
    train(model, tokenizer, _examples(16), config)
    """
)


def _run(script, output_dir, kill_at, resume, kill_in_save=False):
    return subprocess.run(
        [sys.executable, str(script), str(output_dir), str(kill_at), "1" if resume else "0",
         "1" if kill_in_save else "0"],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "run.py"
    path.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    return path


@pytest.fixture(scope="module")
def straight(script, tmp_path_factory):
    """The adapter of an uninterrupted run."""
    output_dir = tmp_path_factory.mktemp("straight")
    finished = _run(script, output_dir, kill_at=-1, resume=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    adapter = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    assert any(adapter[k].abs().sum() > 0 for k in adapter if k.endswith("lora_B"))  # training moved it
    return adapter


def _assert_same_adapter(expected, output_dir):
    adapter = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(adapter[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, script, straight):
    crashed = _run(script, tmp_path / "crashed", kill_at=6, resume=False)
    assert crashed.returncode == -9  # killed after the checkpoint at step 4, before the end
    assert (tmp_path / "crashed" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "crashed" / "adapter").exists()
    resumed = _run(script, tmp_path / "crashed", kill_at=-1, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_adapter(straight, tmp_path / "crashed")


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, script, straight):
    run = tmp_path / "run"
    crashed = _run(script, run, kill_at=8, resume=False, kill_in_save=True)
    assert crashed.returncode == -9  # killed while writing checkpoint-8, the last step's
    assert (run / "checkpoint-8" / "adapter_model.safetensors").is_file()
    assert not (run / "checkpoint-8" / "trainer_state.json").exists() and not (run / "adapter").exists()
    (run / "checkpoint-20.bak").mkdir()  # a stray copy: not a checkpoint
    (run / "checkpoint-20.bak" / "trainer_state.json").write_text('{"global_step": 20}')
    resumed = _run(script, run, kill_at=-1, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint-8: no trainer_state.json" in resumed.stderr
    assert "resuming from " + str(run / "checkpoint-4") in resumed.stderr
    _assert_same_adapter(straight, run)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]  # each step logged once
