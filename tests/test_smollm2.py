"""End-to-end checks on the real packaged SmolLM2-135M and benchmark data (slow, run in CI)."""

import pytest
import torch

from dynmole import MoLEConfig
from dynmole.adapters import adapt_model
from dynmole.data import load_mixture
from dynmole.model import find_mole, load_mole_model
from dynmole.pretrained import load_model_and_tokenizer
from dynmole.training.config import TrainConfig
from dynmole.training.trainer import train

pytestmark = pytest.mark.slow


def test_short_dynmole_training_lowers_loss_and_round_trips(tmp_path, capsys):
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    examples = load_mixture(["boolq"], "train", limit_per_task=8, seed=0)
    model = adapt_model(model, "dynmole", MoLEConfig(r=8, alpha=16, num_experts=4))
    config = TrainConfig(
        output_dir=str(tmp_path), max_steps=8, batch_size=4, lr=3e-3, cutoff_len=96, logging_steps=1,
        report_to="none", warmup_ratio=0.0, seed=0,
    )
    model, summary = train(model, tokenizer, examples, config)
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert len(losses) == 8
    # 8 examples seen twice: the second pass must fit them better than the first did
    assert sum(losses[4:]) < sum(losses[:4])
    assert find_mole(model) is not None
    ids = tokenizer(["Question: is the sky blue?\nAnswer:"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**ids).logits
    restored = load_mole_model(load_model_and_tokenizer("smollm2-135m")[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(**ids).logits, expected)

    # the documented inference path: base + adapter from the command line
    from dynmole import cli

    capsys.readouterr()
    cli.main(["generate", "--adapter", str(tmp_path / "adapter"), "--prompt", "Question: is fire hot?\nAnswer:",
              "--max-new-tokens", "4"])
    assert capsys.readouterr().out.strip()
