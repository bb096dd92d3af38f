"""``dynmole bench --sections train``: the training and evaluation speed options, on real data.

One DynMoLE model (SmolLM2-135M, 6 experts of r = 8 on gate/up/down_proj, as ``make demo``;
``--quick`` uses a tiny random Llama with a word-level tokenizer and made-up examples), one
AdamW, and the packaged demo mixture. Each timed call of a training variant is a pass over the
same examples, one optimizer step per batch, through :meth:`dynmole.training.trainer.MoLETrainer.compute_loss`:

* ``a_full_logits_fp32``: the LM head on every position (``answer_logits_only=False``), fp32;
* ``b_answer_logits_fp32``: the LM head on the answer positions only (the default);
* ``c_answer_logits_bf16``: (b) under bf16 autocast (``precision=bf16``, the Trainer's autocast);
* ``d_answer_logits_bf16_grouped``: (c) with the same examples batched by length (``group_by_length``).

Evaluation times :func:`dynmole.evaluation.score_choices` with every choice as a full sequence
against the shared-context path (the default). Variants run interleaved in one process
(:func:`dynmole.bench.timing.interleaved`); ratios are paired against the first variant. The loss of
(b) and (c), and the log-likelihoods of the shared-context path, are compared with the first
variant's on the same inputs before any timing (``max |delta|``).
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..data import Example
from ..data.tokenize import IGNORE_INDEX, AnswerCollator, encode_example
from ..training.answer_logits import ANSWER_SPAN_KEY, AnswerSpanCollator
from .layer import mole_config
from .report import Row, timing_row
from .timing import interleaved

TASKS = ("arc_e", "piqa", "siqa", "winogrande")  # the demo's
TARGET_MODULES = ["gate_proj", "up_proj", "down_proj"]
TRAIN_VARIANTS = ("a_full_logits_fp32", "b_answer_logits_fp32", "c_answer_logits_bf16", "d_answer_logits_bf16_grouped")
EVAL_VARIANTS = ("full_sequences", "shared_context")


@dataclass(frozen=True)
class TrainBenchSize:
    """Sizes of the train section."""

    model: str  # "tiny", "tiny-1" or a model name for dynmole.pretrained
    batch: int  # examples per optimizer step
    batches: int  # steps per timed call
    eval_per_task: int
    warmup: int = 1
    reps: int = 3
    experts: int = 6
    r: int = 8
    cutoff_len: int = 256


def train_bench_size(preset: str, model: str) -> TrainBenchSize:
    """The sizes for a ``dynmole bench`` preset (``tiny`` is the tests')."""
    if preset == "tiny":
        return TrainBenchSize(model, batch=4, batches=2, eval_per_task=2, reps=2, experts=3, r=2)
    if preset == "quick":
        return TrainBenchSize(model, batch=8, batches=2, eval_per_task=4)
    return TrainBenchSize(model, batch=8, batches=4, eval_per_task=8)


# --------------------------------------------------------------------------- assets
_WORDS = (
    "the a is of what which who sky blue green red sun hot cold water wet dry fire ice cat dog runs flies "
    "bird fish swims tree grows rain falls snow white night dark day light stone hard soft wind blows"
).split()


def _tiny_tokenizer() -> Any:
    """A word-level tokenizer built offline, with BOS/EOS/PAD (for the tiny random models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in _WORDS + ["question", "answer", ":", "?", "."]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_examples(count: int, seed: int) -> list[Example]:
    """Made-up multiple-choice examples with prompts of 4-40 words and 2-4 answers of 1-12 words."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))

    out = []
    for i in range(count):
        choices = tuple(" " + words(1, 12) for _ in range(rng.randint(2, 4)))
        out.append(Example(f"toy/{seed}/{i}", "toy", f"question : {words(4, 40)} ? answer :", choices,
                           rng.randrange(len(choices))))
    return out


def load_assets(size: TrainBenchSize,
                device: torch.device) -> tuple[nn.Module, Any, list[Example], list[Example], str]:
    """Base model, tokenizer, training and evaluation examples, and a description."""
    train_count = size.batch * size.batches
    if size.model in ("tiny", "tiny-1"):
        from .model import tiny_llama

        layers = 1 if size.model == "tiny-1" else 2
        model = tiny_llama(layers).to(device)
        return (model, _tiny_tokenizer(), _tiny_examples(train_count, 0), _tiny_examples(4 * size.eval_per_task, 1),
                f"random LlamaForCausalLM ({layers} layers), made-up examples")
    from ..data import load_examples, load_mixture
    from ..pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(size.model, device=str(device))
    per_task = -(-train_count // len(TASKS))
    train = load_mixture(list(TASKS), "train", per_task, seed=0)[:train_count]
    evaluation = [ex for task in TASKS for ex in load_examples(task, "eval", limit=size.eval_per_task)]
    return model, tokenizer, train, evaluation, f"{size.model}, demo mixture {', '.join(TASKS)}"


# --------------------------------------------------------------------------- training variants
def _batches(
    tokenizer: Any, examples: list[Example], size: TrainBenchSize, answer_only: bool, grouped: bool,
    device: torch.device,
) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """``examples`` encoded and collated in batches of ``size.batch`` (in order, or sorted by
    length as the Trainer's length-grouped sampler sorts a mega-batch), each with its count of
    answer tokens (the Trainer's ``num_items_in_batch``)."""
    features = [encode_example(tokenizer, ex, size.cutoff_len) for ex in examples]
    if grouped:
        features.sort(key=lambda f: len(f["input_ids"]), reverse=True)
    collate = AnswerCollator(tokenizer.pad_token_id)
    if answer_only:
        collate = AnswerSpanCollator(collate)
    out = []
    for start in range(0, len(features), size.batch):
        batch = collate(features[start : start + size.batch])
        items = batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()
        out.append(({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}, items.to(device)))
    return out


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _trainer(model: nn.Module, device: torch.device, folder: str) -> Any:
    from transformers import TrainingArguments

    from ..training.trainer import MoLETrainer

    args = TrainingArguments(output_dir=folder, use_cpu=device.type == "cpu", report_to=[],
                             remove_unused_columns=False)
    trainer = MoLETrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    return trainer


def train_pass_fn(
    trainer: Any, model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, bf16: bool,
    device: torch.device,
) -> Callable[[], None]:
    """One pass over ``batches``: per batch, the Trainer's loss (LM + aux) under the variant's
    precision, backward and an AdamW step."""

    def run() -> None:
        model.train()
        for batch, items in batches:
            with _autocast(device, bf16):
                loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def batch_losses(trainer: Any, model: nn.Module, batches: list, bf16: bool, device: torch.device) -> list[float]:
    """The LM loss of each batch (train mode, dropout seeded per batch, no grad so no aux loss)."""
    model.train()
    losses = []
    with torch.no_grad():
        for index, (batch, items) in enumerate(batches):
            torch.manual_seed(1000 + index)
            with _autocast(device, bf16):
                losses.append(float(trainer.compute_loss(model, dict(batch), num_items_in_batch=items)))
    return losses


def _positions(batches: list, answer_only: bool) -> tuple[int, int, int]:
    """(real tokens, padded positions, positions the LM head computes on the CPU) of ``batches``."""
    tokens = sum(int(b["attention_mask"].sum()) for b, _ in batches)
    padded = sum(b["input_ids"].numel() for b, _ in batches)
    head = sum(int(b[ANSWER_SPAN_KEY].mask.sum()) for b, _ in batches) if answer_only else padded
    return tokens, padded, head


def run_train_variants(
    model: nn.Module, tokenizer: Any, examples: list[Example], size: TrainBenchSize, *, device: torch.device,
    warmup: int, reps: int, log: Callable[[str], None],
) -> tuple[list[Row], dict[str, Any]]:
    """Rows (and details) of the four training variants."""
    settings = {  # variant: (answer logits only, bf16, grouped by length)
        TRAIN_VARIANTS[0]: (False, False, False),
        TRAIN_VARIANTS[1]: (True, False, False),
        TRAIN_VARIANTS[2]: (True, True, False),
        TRAIN_VARIANTS[3]: (True, True, True),
    }
    batches = {name: _batches(tokenizer, examples, size, a, g, device) for name, (a, _, g) in settings.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        trainer = _trainer(model, device, folder)
        losses = {name: batch_losses(trainer, model, batches[name], bf16, device)
                  for name, (_, bf16, grouped) in settings.items() if not grouped}
        fns = {name: train_pass_fn(trainer, model, optimizer, batches[name], bf16, device)
               for name, (_, bf16, _) in settings.items()}
        scenario = (f"DynMoLE N={size.experts} r={size.r} on gate/up/down, {size.batches} steps x "
                    f"{size.batch} examples, AdamW")
        log(f"[train] {scenario}: {len(fns)} variants x {reps} reps")
        timings = interleaved(fns, warmup=warmup, reps=reps, device=device, reference=TRAIN_VARIANTS[0])
    rows = []
    for name, timing in timings.items():
        tokens, padded, head = _positions(batches[name], settings[name][0])
        extra: dict[str, Any] = {
            "tokens_per_s": tokens / timing.median, "tokens": tokens, "padding_share": 1 - tokens / padded,
            "head_positions_share": head / padded, "losses": losses.get(name),
        }
        if name in losses:
            extra["max_abs_loss_delta"] = max(abs(x - y) for x, y in zip(losses[name], losses[TRAIN_VARIANTS[0]]))
        rows.append(timing_row("train", scenario, name, "ours", timing, **extra))
    return rows, {"train_examples": len(examples), "batch": size.batch, "steps_per_call": size.batches}


# --------------------------------------------------------------------------- evaluation variants
def run_eval_variants(
    model: nn.Module, tokenizer: Any, examples: list[Example], *, device: torch.device, warmup: int, reps: int,
    log: Callable[[str], None], batch_size: int = 16,
) -> list[Row]:
    """Rows of :func:`score_choices` with and without the shared context, fp32."""
    from ..evaluation import score_choices

    def scores(share: bool) -> list[float]:
        kwargs = {} if share else {"share_context": False}
        return [s["loglik"] for s in score_choices(model, tokenizer, examples, batch_size, False, **kwargs)]

    reference = scores(False)
    delta = max(abs(x - y) for x, y in zip(scores(True), reference))
    scenario = f"score_choices, {len(examples)} examples ({len({e.task for e in examples})} tasks), batch {batch_size}"
    log(f"[eval] {scenario}: 2 variants x {reps} reps")
    fns = {EVAL_VARIANTS[0]: lambda: scores(False), EVAL_VARIANTS[1]: lambda: scores(True)}
    timings = interleaved(fns, warmup=warmup, reps=reps, device=device, reference=EVAL_VARIANTS[0])
    rows = []
    for name, timing in timings.items():
        extra = {"examples_per_s": len(examples) / timing.median}
        if name != EVAL_VARIANTS[0]:
            extra["max_abs_loglik_delta"] = delta
        rows.append(timing_row("eval", scenario, name, "ours", timing, **extra))
    return rows


# --------------------------------------------------------------------------- section
def run_train_bench(
    preset: str, *, model_name: str, device: torch.device, dropout: float, warmup: int | None = None,
    reps: int | None = None, log: Callable[[str], None] = print,
) -> tuple[list[Row], dict[str, Any]]:
    """The train section: rows of the training and evaluation variants, and details for the JSON.
    ``warmup`` and ``reps`` default to the preset's (1 and 3: the section takes minutes)."""
    from ..model import get_mole_model

    size = train_bench_size(preset, model_name)
    warmup = size.warmup if warmup is None else warmup
    reps = size.reps if reps is None else reps
    log(f"[train] loading {size.model}")
    base, tokenizer, train_examples, eval_examples, description = load_assets(size, device)
    config = mole_config("dynmole", size.experts, size.r, dropout)
    config.target_modules = list(TARGET_MODULES)
    model = get_mole_model(base, config)
    with torch.no_grad():
        for layer in model.mole_layers():
            layer.lora_B.normal_(std=0.02)  # a trained-looking adapter: non-zero expert outputs
    rows, info = run_train_variants(model, tokenizer, train_examples, size, device=device, warmup=warmup, reps=reps,
                                    log=log)
    rows += run_eval_variants(model, tokenizer, eval_examples, device=device, warmup=warmup, reps=reps, log=log)
    info.update(model=description, num_experts=size.experts, r=size.r, target_modules=TARGET_MODULES,
                eval_examples=len(eval_examples), warmup=warmup, reps=reps)
    return rows, info
