"""TRL's ``SFTTrainer(model, peft_config=MoLEConfig(...))`` trains a MoLE adapter with the aux
losses in its loss, counted once and at ``MoLETrainer``'s scale under gradient accumulation."""

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import TrainingArguments

from dynmole import MoLEConfig, get_mole_model
from dynmole.data.tokenize import encode_example
from dynmole.model import find_mole
from dynmole.training.trainer import MoLETrainer, _collator
from test_train import _examples

trl = pytest.importorskip("trl", reason="the trl extra: pip install 'dynmole[trl]'")

# 8 examples with one-word answers (every micro-batch of 2 holds equally many answer tokens, where
# the token-weighted and the plain mean over micro-batches agree), in order, 2 x 2 per step, lr 0:
# every step sees the same weights, so the logged losses compare step by step.
ARGS = dict(use_cpu=True, report_to=[], per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            learning_rate=0.0, logging_steps=1, save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0,
            train_sampling_strategy="sequential", bf16=False)


def _config(aux: bool) -> MoLEConfig:
    # aux coefficients of 1: an aux loss of about 2, against an LM loss of about 4.6
    coef = 1.0 if aux else 0.0
    return MoLEConfig(method="dynmole", r=4, alpha=8, dropout=0.0, balance_coef=coef, entropy_coef=coef)


def _reference(tiny_llama, tokenizer, tmp_path):
    """A MoLE model with a non-trivial adapter, and ``MoLETrainer``'s log on the features."""
    torch.manual_seed(0)
    model = get_mole_model(tiny_llama(), _config(aux=True))
    with torch.no_grad():
        for layer in model.mole_layers():
            layer.lora_B.normal_(std=0.2)
            layer.router.normal_(std=0.5)
    features = Dataset.from_list([encode_example(tokenizer, example) for example in _examples(8)])
    args = TrainingArguments(output_dir=str(tmp_path / "mole"), remove_unused_columns=False, **ARGS)
    trainer = MoLETrainer(model=model, args=args, train_dataset=features,
                          data_collator=_collator(tokenizer, answer_logits_only=True))
    trainer.train()
    return model, features, [entry for entry in trainer.state.log_history if "loss" in entry]


def _sft(tiny_llama, tokenizer, features, adapter, config, output_dir, **overrides):
    """``trl.SFTTrainer`` on the pre-tokenized ``features`` (their ``labels`` are used as they are),
    from ``peft_config=config``, with the adapter weights of ``adapter``."""
    trainer = trl.SFTTrainer(model=tiny_llama(), peft_config=config, train_dataset=features,
                             processing_class=tokenizer,
                             args=trl.SFTConfig(output_dir=str(output_dir), **{**ARGS, **overrides}))
    set_peft_model_state_dict(trainer.model, get_peft_model_state_dict(adapter))
    trainer.train()
    return trainer


def test_sft_trainer_counts_the_aux_loss_once_at_moletrainers_scale(tiny_llama, tiny_tokenizer, tmp_path):
    reference, features, logged = _reference(tiny_llama, tiny_tokenizer, tmp_path)
    assert len(logged) == 2
    with_aux = _sft(tiny_llama, tiny_tokenizer, features, reference, _config(aux=True), tmp_path / "aux")
    without = _sft(tiny_llama, tiny_tokenizer, features, reference, _config(aux=False), tmp_path / "lm")
    sft = [entry["loss"] for entry in with_aux.state.log_history if "loss" in entry]
    lm_only = [entry["loss"] for entry in without.state.log_history if "loss" in entry]
    for step, entry in enumerate(logged):
        aux = entry["aux_balance"] + entry["aux_entropy"]  # MoLETrainer's mean over the step's micro-batches
        assert aux > 1.0
        assert sft[step] == pytest.approx(entry["loss"], abs=2e-4)  # the logged losses are rounded to 1e-4
        assert sft[step] - lm_only[step] == pytest.approx(aux, abs=2e-4)


def test_sft_trainer_trains_the_routers_and_saves_a_mole_adapter(tiny_llama, tiny_tokenizer, tmp_path):
    reference, features, _ = _reference(tiny_llama, tiny_tokenizer, tmp_path)
    before = {name: param.clone() for name, param in reference.named_parameters() if param.requires_grad}
    trainer = _sft(tiny_llama, tiny_tokenizer, features, reference, _config(aux=True), tmp_path / "sft",
                   learning_rate=1e-2)
    mole = find_mole(trainer.model)
    assert mole is not None and mole.last_aux_losses["total"] > 0
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[name], value) for name, value in before.items() if name.endswith("router"))
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    ids = torch.tensor([features[0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)
