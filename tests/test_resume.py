"""A run killed with SIGKILL resumes from its last checkpoint and ends where an uninterrupted run ends."""

import os
import subprocess
import sys
import textwrap

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
    from dynmole.train import TrainConfig, adapt_model, train

    torch.use_deterministic_algorithms(True)
    output_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    import dynmole.train as train_module
    original = train_module.MoLETrainer.__init__
    def with_crash(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks", [])) + [Crash()]
        original(self, *a, **k)
    train_module.MoLETrainer.__init__ = with_crash

    model = conftest.tiny_llama.__wrapped__()(seed=0)
    tokenizer = conftest.tiny_tokenizer.__wrapped__()
    model = adapt_model(model, "dynmole", MoLEConfig(r=4, alpha=8, dropout=0.1))
    config = TrainConfig(output_dir=output_dir, max_steps=8, batch_size=4, lr=1e-2, save_steps=4,
                         logging_steps=2, report_to="none", seed=3, resume=resume)
    train(model, tokenizer, _examples(16), config)
    """
)


def _run(script, output_dir, kill_at, resume):
    return subprocess.run(
        [sys.executable, str(script), str(output_dir), str(kill_at), "1" if resume else "0"],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    straight = _run(script, tmp_path / "straight", kill_at=-1, resume=False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    crashed = _run(script, tmp_path / "crashed", kill_at=6, resume=False)
    assert crashed.returncode == -9  # killed after the checkpoint at step 4, before the end
    assert (tmp_path / "crashed" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "crashed" / "adapter").exists()
    resumed = _run(script, tmp_path / "crashed", kill_at=-1, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # and training really moved the adapter
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))
