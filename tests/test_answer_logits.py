"""The answer-logits training path (``TrainConfig.answer_logits_only``) gives the full path's loss
and gradients; bf16 autocast trains MoLE models on CPU; ``group_by_length`` reaches the Trainer."""

import pytest
import torch
from peft import get_peft_model_state_dict
from torch import nn
from transformers import Trainer, TrainingArguments

from dynmole import MoLEConfig
from dynmole.adapters import adapt_model
from dynmole.data import Example
from dynmole.data.tokenize import IGNORE_INDEX, AnswerCollator, encode_example
from dynmole.training.answer_logits import (
    ANSWER_SPAN_KEY,
    AnswerSpanCollator,
    answer_cross_entropy,
    answer_positions,
    logits_to_keep,
)
from dynmole.training.config import TrainConfig
from dynmole.training.trainer import MoLETrainer, train

FACTS = [
    ("the sky is", " blue"), ("fire is", " hot and red"), ("what is the sun ? the sun is", " hot"),
    ("ice is", " cold"), ("water is", " wet"), ("the cat is", " a dog ? no"), ("a fish", " swims"),
    ("which bird flies ? the", " blue bird"),
]


def _examples(n=8):
    return [
        Example(f"toy/{i}", "toy", f"question : {p} ? answer :", (a, " red"), 0)
        for i, (p, a) in enumerate(FACTS[i % len(FACTS)] for i in range(n))
    ]


def _features(tokenizer, n=8):
    return [encode_example(tokenizer, ex) for ex in _examples(n)]


def test_positions_cover_every_answer_token():
    labels = torch.tensor([
        [IGNORE_INDEX] * 5 + [7, 8, IGNORE_INDEX],      # answer at 5-6: predicted from positions 4-5
        [IGNORE_INDEX] * 3 + [9, 10, 11, 12, 13],         # answer at 3-7: predicted from positions 2-6
    ])
    positions = answer_positions(labels)
    assert positions.count == 8 - 2
    assert positions.mask.tolist() == [[False] * 4 + [True] * 2 + [False] * 2, [False] * 2 + [True] * 5 + [False]]
    assert answer_positions(torch.full((2, 5), IGNORE_INDEX)).count == 1
    assert not answer_positions(torch.full((2, 5), IGNORE_INDEX)).mask.any()
    assert answer_positions(torch.tensor([[5, 6, 7]])).count == 3  # a label at position 0 is never predicted
    assert logits_to_keep(positions, torch.device("cpu"), masks=True) is positions.mask
    assert logits_to_keep(positions, torch.device("cpu"), masks=False) == 6
    assert logits_to_keep(positions, torch.device("cuda"), masks=True) == 6  # a mask would need a device sync


@pytest.mark.parametrize("num_items", [None, 7])
@pytest.mark.parametrize("exact", [True, False])
def test_cross_entropy_matches_transformers(num_items, exact):
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.modeling_utils import slice_logits_to_keep

    torch.manual_seed(0)
    labels = torch.tensor([[IGNORE_INDEX] * 4 + [3, 4, IGNORE_INDEX, IGNORE_INDEX],
                           [IGNORE_INDEX] * 2 + [5, 6, 7, 1, 2, 3]])
    logits = torch.randn(2, 8, 11)
    positions = answer_positions(labels)
    keep = positions.mask if exact else positions.count
    kept = slice_logits_to_keep(logits, keep)
    assert kept.shape == ((8, 11) if exact else (2, 7, 11))
    full = ForCausalLMLoss(logits, labels, 11, num_items_in_batch=num_items)
    assert answer_cross_entropy(kept, labels, keep, num_items).item() == pytest.approx(full.item(), abs=1e-6)


def _trainer(model, tmp_path, grad_accum=2):
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_accumulation_steps=grad_accum,
        remove_unused_columns=False,
    )
    trainer = MoLETrainer(model=model, args=args, data_collator=AnswerCollator(0))
    trainer.current_gradient_accumulation_steps = grad_accum
    return trainer


def _accumulated_step(model, trainer, batches, counted=True):
    """``Trainer.training_step`` over ``batches`` (one accumulated optimizer step): loss and grads."""
    num_items = sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in batches) if counted else None
    loss = sum(trainer.training_step(model, dict(b), torch.tensor(num_items) if counted else None) for b in batches)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss, grads


@pytest.mark.parametrize("method", ["dynmole", "ldmole", "lora"])
@pytest.mark.parametrize("counted", [True, False])
def test_loss_and_grads_equal_the_full_path(tiny_llama, tiny_tokenizer, tmp_path, method, counted):
    """Gradient accumulation 2, MoLE (with its aux losses) and PEFT LoRA, fp32: same loss, same grads."""
    features = _features(tiny_tokenizer)
    head_positions = []
    results = {}
    for answer_only in (False, True):
        torch.manual_seed(1)
        model = adapt_model(tiny_llama(), method, MoLEConfig(r=4, alpha=8, dropout=0.0, lambda_hidden=8))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.2)  # non-zero experts, so that every adapter weight gets a gradient
        lm_head = model.get_base_model().lm_head
        hook = lm_head.register_forward_hook(lambda m, args, out: head_positions.append(args[0].shape[:-1].numel()))
        collate = AnswerCollator(tiny_tokenizer.pad_token_id)
        if answer_only:
            collate = AnswerSpanCollator(collate)
        batches = [collate(features[:4]), collate(features[4:])]
        results[answer_only] = _accumulated_step(model, _trainer(model, tmp_path), batches, counted)
        hook.remove()
        if answer_only:  # on the CPU the LM head sees exactly the positions that predict answer tokens
            assert head_positions[-2:] == [int(b[ANSWER_SPAN_KEY].mask.sum()) for b in batches]
            assert head_positions[-2:] < head_positions[:2]
    (full_loss, full_grads), (loss, grads) = results[False], results[True]
    assert loss.item() == pytest.approx(full_loss.item(), abs=1e-6)
    assert grads.keys() == full_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        if "lora_" in name or "router" in name:  # (LD-MoLE's lambda MLP starts with a zero gradient)
            assert full_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grad, full_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_models_without_logits_to_keep_use_the_full_path(tiny_llama, tiny_tokenizer, tmp_path):
    class FullLogits(nn.Module):  # a causal LM whose forward has no ``logits_to_keep``
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, labels=None, **kwargs):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    model = FullLogits(tiny_llama()).train()
    batch = AnswerSpanCollator(AnswerCollator(tiny_tokenizer.pad_token_id))(_features(tiny_tokenizer, 4))
    trainer = _trainer(model, tmp_path, grad_accum=1)
    loss = trainer.compute_loss(model, dict(batch))
    reference = model(**{k: v for k, v in batch.items() if k != ANSWER_SPAN_KEY}).loss
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)


def _run(tiny_llama, tiny_tokenizer, path, **overrides):
    torch.manual_seed(0)
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4, alpha=8, dropout=0.05))
    config = TrainConfig(output_dir=str(path), max_steps=3, batch_size=4, grad_accum=2, lr=1e-2, logging_steps=1,
                         report_to="none", warmup_ratio=0.0, **overrides)
    model, summary = train(model, tiny_tokenizer, _examples(16), config)
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    return model, losses


def test_training_runs_equal_with_and_without_answer_logits(tiny_llama, tiny_tokenizer, tmp_path):
    """Through the whole Trainer (data loader, accumulation 2, dropout, AdamW): the same run."""
    full_model, full = _run(tiny_llama, tiny_tokenizer, tmp_path / "full", answer_logits_only=False)
    model, losses = _run(tiny_llama, tiny_tokenizer, tmp_path / "answer", answer_logits_only=True)
    assert losses == pytest.approx(full, abs=1e-5)
    state, full_state = get_peft_model_state_dict(model), get_peft_model_state_dict(full_model)
    for name, value in state.items():
        torch.testing.assert_close(value, full_state[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_trains_mole_on_cpu(tiny_llama, tiny_tokenizer, tmp_path):
    """bf16 (the Trainer's autocast) on CPU: adapters and routers stay fp32, the losses stay close to fp32's."""
    _, fp32 = _run(tiny_llama, tiny_tokenizer, tmp_path / "fp32", precision="fp32")
    model, bf16 = _run(tiny_llama, tiny_tokenizer, tmp_path / "bf16", precision="bf16")
    assert len(bf16) == len(fp32) == 3
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("group", [False, True])
def test_group_by_length_reaches_the_trainer(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch, group):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    seen = {}

    class Stop(Exception):
        pass

    def capture(self, *args, **kwargs):
        seen["sampler"] = self._get_train_sampler()
        raise Stop

    monkeypatch.setattr(Trainer, "train", capture)
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4))
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", group_by_length=group)
    with pytest.raises(Stop):
        train(model, tiny_tokenizer, _examples(8), config)
    assert isinstance(seen["sampler"], LengthGroupedSampler) == group
    assert TrainConfig().group_by_length is False and TrainConfig().answer_logits_only is True
