import json

import pytest
import torch

from dynmole import MoLEConfig
from dynmole.data import Example
from dynmole.data.tokenize import IGNORE_INDEX, AnswerCollator, encode_example
from dynmole.model import MoLEModel
from dynmole.train import TrainConfig, adapt_model, train


def _examples(n=16):
    facts = [("the sky is", " blue"), ("fire is", " hot"), ("ice is", " cold"), ("water is", " wet")]
    out = []
    for i in range(n):
        prompt, answer = facts[i % len(facts)]
        out.append(Example(f"toy/{i}", "toy", f"question : {prompt} ? answer :", (answer, " red"), 0))
    return out


def test_prompt_and_padding_masked(tiny_tokenizer):
    ex = _examples(1)[0]
    feature = encode_example(tiny_tokenizer, ex)
    prompt_len = len(tiny_tokenizer(ex.prompt)["input_ids"])
    answer = tiny_tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert feature["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert feature["labels"][prompt_len:] == answer
    assert feature["input_ids"][prompt_len:] == answer
    short = encode_example(tiny_tokenizer, Example("t/1", "t", "yes", (" no",), 0))
    batch = AnswerCollator(tiny_tokenizer.pad_token_id)([feature, short])
    pad = batch["attention_mask"][1] == 0
    assert pad.any() and (batch["labels"][1][pad] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1][pad] == tiny_tokenizer.pad_token_id).all()


def test_cutoff_keeps_answer(tiny_tokenizer):
    ex = Example("t/1", "t", " ".join(["the sky is blue ."] * 30), (" yes",), 0)
    feature = encode_example(tiny_tokenizer, ex, cutoff_len=16)
    assert len(feature["input_ids"]) == 16
    assert feature["labels"][-2:] == feature["input_ids"][-2:]


def test_cutoff_keeps_the_leading_bos(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = tiny_tokenizer.backend_tokenizer.__class__.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    ex = Example("t/1", "t", "question : " + " ".join(["the sky is blue ."] * 30) + " answer :", (" yes",), 0)
    full = encode_example(tokenizer, ex, cutoff_len=1000)
    assert full["input_ids"][0] == 2  # the tokenizer adds BOS (as Gemma's does)
    feature = encode_example(tokenizer, ex, cutoff_len=16)
    answer = tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(feature["input_ids"]) == 16
    assert feature["input_ids"][0] == 2 and feature["input_ids"].count(2) == 1  # BOS kept, once
    # BOS, then the end of the prompt, then the whole answer
    assert feature["input_ids"][1:] == full["input_ids"][len(full["input_ids"]) - 15:]
    assert feature["labels"][-len(answer):] == answer
    assert feature["labels"][: 16 - len(answer)] == [IGNORE_INDEX] * (16 - len(answer))


@pytest.mark.parametrize("method", ["dynmole", "ldmole", "lora", "dora"])
def test_training_lowers_loss_and_saves(tiny_llama, tiny_tokenizer, tmp_path, method):
    torch.manual_seed(0)
    model = adapt_model(tiny_llama(), method, MoLEConfig(r=4, alpha=8, dropout=0.0, lambda_hidden=8))
    config = TrainConfig(
        output_dir=str(tmp_path), max_steps=30, batch_size=8, lr=1e-2, logging_steps=5, report_to="none",
        warmup_ratio=0.0,
    )
    model, summary = train(model, tiny_tokenizer, _examples(), config)
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0] - 0.2  # the tiny random model plateaus near 4.1 (small lm_head init)
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)
    if isinstance(model, MoLEModel):
        logged = [r for r in records if "loss" in r][0]
        assert "aux_balance" in logged and "experts_per_token" in logged


def test_nan_stops_training_naming_step_and_module(tiny_llama, tiny_tokenizer, tmp_path):
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4, alpha=8))
    poisoned = next(model.mole_layers())
    with torch.no_grad():
        poisoned.lora_A[0, 0] = float("nan")
    config = TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, logging_steps=2, report_to="none")
    with pytest.raises(FloatingPointError, match=rf"at step 2; first non-finite weights: .*{poisoned.name}.lora_A"):
        train(model, tiny_tokenizer, _examples(8), config)


def test_out_of_memory_suggests_knobs(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import Trainer

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", fail)
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4))
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, report_to="none")
    with pytest.raises(RuntimeError, match="--batch-size .*--grad-accum.*--gradient-checkpointing"):
        train(model, tiny_tokenizer, _examples(4), config)


def test_remole_coefficient_changes_once_per_optimizer_step(tiny_llama, tiny_tokenizer, tmp_path):
    import math

    torch.manual_seed(0)
    mole = MoLEConfig(r=4, alpha=8, dropout=0.0, relu_target_k=1.0, relu_l1_init=1e-3)
    model = adapt_model(tiny_llama(), "remole", mole)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, grad_accum=3, lr=1e-3,
                         logging_steps=1, report_to="none", warmup_ratio=0.0)
    model, summary = train(model, tiny_tokenizer, _examples(12), config)
    assert summary["steps"] == 2
    # about 3 of 6 ReLU gates are open, above the target 1: the coefficient grows once per optimizer
    # step (2 updates), not once per micro-batch (6)
    updates = math.log(model.relu_l1_coef.item() / 1e-3) / math.log(1.2)
    assert updates == pytest.approx(2.0, abs=1e-4)
