import dataclasses
import json

import pytest
import torch

from dynmole import MoLEConfig
from dynmole.adapters import adapt_model
from dynmole.data import Example
from dynmole.data.tokenize import IGNORE_INDEX, AnswerCollator, encode_example
from dynmole.errors import DynmoleError
from dynmole.model import find_mole
from dynmole.training.config import TrainConfig
from dynmole.training.trainer import check_resume_settings, train


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
    if method not in ("lora", "dora"):
        assert find_mole(model) is not None
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


def test_resume_refuses_other_adapter_settings(tiny_llama, tiny_tokenizer, tmp_path):
    mole = MoLEConfig(r=4, alpha=8, dropout=0.0)
    config = TrainConfig(output_dir=str(tmp_path / "mole"), max_steps=1, batch_size=4, save_steps=1,
                         report_to="none")
    train(adapt_model(tiny_llama(), "dynmole", mole), tiny_tokenizer, _examples(4), config)
    resumed = dataclasses.replace(config, max_steps=2, resume=True)
    other = adapt_model(tiny_llama(), "mola", dataclasses.replace(mole, alpha=16))
    with pytest.raises(DynmoleError, match=r"checkpoint-1: it was trained with other adapter settings \(method: "
                       r"'dynmole' in the checkpoint, 'mola' now; alpha: 8 in the checkpoint, 16 now\); .*"
                       r"use a new --output-dir"):
        train(other, tiny_tokenizer, _examples(4), resumed)
    checkpoint = tmp_path / "mole" / "checkpoint-1"
    with pytest.raises(DynmoleError, match=r"\(r: 4 in the checkpoint, 2 now\)"):  # not "the base model"
        check_resume_settings(checkpoint, adapt_model(tiny_llama(), "dynmole", dataclasses.replace(mole, r=2)))
    reordered = dataclasses.replace(mole, target_modules=["down_proj", "up_proj", "gate_proj"])
    check_resume_settings(checkpoint, adapt_model(tiny_llama(), "dynmole", reordered))  # the same adapter
    lora = dataclasses.replace(config, output_dir=str(tmp_path / "lora"))
    train(adapt_model(tiny_llama(), "lora", mole), tiny_tokenizer, _examples(4), lora)
    checkpoint = tmp_path / "lora" / "checkpoint-1"
    check_resume_settings(checkpoint, adapt_model(tiny_llama(), "lora", mole))
    with pytest.raises(DynmoleError, match=r"\(method: 'lora' in the checkpoint, 'dora' now\)"):
        check_resume_settings(checkpoint, adapt_model(tiny_llama(), "dora", mole))
    with pytest.raises(DynmoleError, match=r"\(method: 'lora' in the checkpoint, 'dynmole' now\)"):
        check_resume_settings(checkpoint, adapt_model(tiny_llama(), "dynmole", mole))


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


class _GradientsBeforeStep:
    """A Trainer callback keeping the adapter's gradients just before the first optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        self.grads = {}
        outer = self

        class Capture(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if not outer.grads:
                    outer.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

        self.callback = Capture()


def _one_step_gradients(tiny_llama, tiny_tokenizer, tmp_path, plain: bool, examples):
    """Adapter gradients of one optimizer step (2 micro-batches of 2) under a plain ``Trainer``
    (the aux loss in the model's own ``loss``) or ``MoLETrainer`` (its answer-logits path)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from dynmole.training.trainer import MoLETrainer, _collator

    torch.manual_seed(0)
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for layer in model.mole_layers():
            layer.lora_B.normal_(std=0.2)  # the routers then get LM gradients too
    model.train()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-3, max_grad_norm=0.0,
        remove_unused_columns=False, save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0,
    )
    capture = _GradientsBeforeStep()
    features = Dataset.from_list([encode_example(tiny_tokenizer, ex) for ex in examples])
    trainer_class, collator = (Trainer, AnswerCollator(tiny_tokenizer.pad_token_id)) if plain else (
        MoLETrainer, _collator(tiny_tokenizer, answer_logits_only=True))
    trainer = trainer_class(model=model, args=args, train_dataset=features, data_collator=collator,
                            callbacks=[capture.callback])
    trainer.train()
    return capture.grads


def test_plain_trainer_weights_the_aux_loss_as_moletrainer(tiny_llama, tiny_tokenizer, tmp_path):
    """Gradient accumulation 2: a plain HF ``Trainer`` over a MoLE model (the aux loss added in the
    forward) gives ``MoLETrainer``'s gradients, not the aux loss counted once per micro-batch."""
    examples = _examples(4)  # one-word answers: every micro-batch holds 4 answer tokens
    plain = _one_step_gradients(tiny_llama, tiny_tokenizer, tmp_path / "plain", True, examples)
    reference = _one_step_gradients(tiny_llama, tiny_tokenizer, tmp_path / "mole", False, examples)
    assert plain.keys() == reference.keys() and any("router" in name for name in plain)
    for name, grad in plain.items():
        assert reference[name].abs().max() > 0, name
        torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


def _sentencepiece_like_tokenizer():
    """A word-level tokenizer that, as Llama's sentencepiece one, marks the start of every text
    with a word-start ``▁`` (so ``" blue"`` alone is ``▁ ▁blue``), and puts BOS in front."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "▁": 4}
    for word in "question : the sky is ? answer blue red fire hot".split():
        vocab["▁" + word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("prompt", ["question : the sky is ? answer :", "question : the sky is ? answer : "])
def test_answer_tokens_come_from_the_whole_text(prompt):
    """Training features and evaluation requests take the answer's tokens from ``prompt + answer``
    tokenised as one text: no stray word-start token, the same tokens in both, BOS once in front."""
    from dynmole.evaluation.requests import _requests

    tokenizer = _sentencepiece_like_tokenizer()
    example = Example("t/0", "t", prompt, ("blue" if prompt.endswith(" ") else " blue", " fire hot"), 0)
    stray = tokenizer.convert_tokens_to_ids("▁")
    alone = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    assert prompt.endswith(" ") or alone[0] == stray  # what the old code put in the answer
    whole = tokenizer(prompt + example.answer)["input_ids"]
    assert stray not in whole and whole[0] == tokenizer.bos_token_id
    feature = encode_example(tokenizer, example)
    assert feature["input_ids"] == whole + [tokenizer.eos_token_id]
    answer = feature["labels"][feature["labels"].count(IGNORE_INDEX):]
    assert answer == tokenizer.convert_tokens_to_ids(["▁blue", "</s>"])
    requests = _requests(tokenizer, [example], "cloze")
    assert [len(r.continuation) for r in requests] == [1, 2]
    assert stray not in sum((r.continuation for r in requests), [])
    assert requests[0].context + requests[0].continuation == whole
    assert requests[0].context == feature["input_ids"][: -len(answer)]
    assert requests[0].continuation + [tokenizer.eos_token_id] == answer
    truncated = encode_example(tokenizer, example, cutoff_len=4)
    assert truncated["input_ids"] == [tokenizer.bos_token_id, whole[-2], *answer]


def test_word_level_features_are_unchanged(tiny_tokenizer):
    """For a tokenizer that splits at whitespace the features are those of the prompt and the answer
    tokenised apart (as before); so are the evaluation requests."""
    from dynmole.evaluation.requests import _requests

    examples = [*_examples(4), Example("t/e", "t", "", (" yes",), 0), Example("t/s", "t", "the sky is ", ("blue",), 0),
                Example("t/m", "t", "what is the sun ? answer :", (" the sun is hot .", " cold"), 0)]
    eos = [tiny_tokenizer.eos_token_id]
    for example in examples:
        prompt = tiny_tokenizer(example.prompt)["input_ids"]
        answer = tiny_tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        assert encode_example(tiny_tokenizer, example) == {
            "input_ids": prompt + answer + eos, "labels": [IGNORE_INDEX] * len(prompt) + answer + eos}
        for request, text in zip(_requests(tiny_tokenizer, [example], "cloze"), example.choices):
            assert request.context == (prompt or [tiny_tokenizer.bos_token_id])
            assert request.continuation == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_model_keeps_adding_the_aux_loss_after_training(tiny_llama, tiny_tokenizer, tmp_path):
    """``MoLETrainer`` adds the aux loss itself only while it computes its loss: after ``train()`` a
    plain training forward (a loop of one's own, a plain ``Trainer``, TRL) adds it again, and no
    pending aux loss (with its autograd graph) is left on the model."""
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4, alpha=8, dropout=0.0))
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, report_to="none", warmup_ratio=0.0)
    model, _ = train(model, tiny_tokenizer, _examples(8), config)
    mole = find_mole(model)
    assert mole.aux_in_loss and mole.pending_aux_loss is None
    batch = AnswerCollator(tiny_tokenizer.pad_token_id)([encode_example(tiny_tokenizer, e) for e in _examples(4)])
    model.train()
    loss = model(**batch).loss
    lm = mole.model(**batch).loss  # the HF model under the tuner: the LM loss alone
    assert mole.last_aux_losses["total"] > 0
    torch.testing.assert_close(loss, lm + mole.last_aux_losses["total"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, 10])
def test_warmup_ratio_outside_zero_to_one_is_refused(ratio):
    """transformers reads a warm-up of 1 or more as a step count: 1.0 would be one warm-up step."""
    with pytest.raises(DynmoleError, match=r"^warmup_ratio must be in \[0, 1\) \(a share of the training steps\)"):
        TrainConfig(warmup_ratio=ratio)


@pytest.mark.parametrize("field, value, message", [
    ("warmup_ratio", None, "warmup_ratio must be a number, got None"),
    ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
    ("resume", "yes", "resume must be true or false, got 'yes'"),
])
def test_train_config_refuses_values_of_another_type(field, value, message):
    with pytest.raises(DynmoleError, match=f"^{message}$"):
        TrainConfig(**{field: value})


def test_moletrainer_refuses_the_data_parallel_it_would_get_on_several_gpus(tiny_llama, tmp_path, monkeypatch):
    """Without torchrun/accelerate the HF Trainer wraps the model in ``nn.DataParallel`` when it sees
    several GPUs (``args.n_gpu > 1``): refused when the trainer is built, before any work."""
    from transformers import TrainingArguments

    from dynmole.train import MoLETrainer

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4, alpha=8))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(DynmoleError, match="does not run under torch.nn.DataParallel"):
        MoLETrainer(model=model, args=args)
