"""Zero-shot multiple-choice accuracy by log-likelihood, under either evaluation protocol.

Every (example, choice) pair is scored by the summed log-probability of the choice's tokens
given the prompt; the predicted choice is the best-scoring one (``acc``) or the best per
character (``acc_norm``). ``cloze`` scoring (the LM evaluation harness's) scores each answer text
after the task's prompt; ``label`` scoring (the papers') first turns each example into the label
format (``dynmole.data.label_format``) and scores the one-token labels, so ``acc`` is the argmax
of the label tokens' logits at the answer position and ``acc_norm`` is set to ``acc``. Works
with any callable causal LM returning ``.logits``: a HF model or a :class:`dynmole.MoLEModel`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Example, scoring_protocol
from ..pretrained import accepts_logits_to_keep
from .metrics import _accuracy_of, samples
from .requests import Progress, _model_device, _pad_right, _Request, _requests, context_length
from .shared_context import _can_share_context, _shared_context_logliks

logger = logging.getLogger(__name__)


def _forward(model: nn.Module, sequences: list[tuple[int, ...]], pad_id: int, first: int | None) -> torch.Tensor:
    """Logits of ``sequences`` right-padded into one batch, from position ``first`` on (all if None).

    Only the answer positions are needed; leaving the others out of the LM head saves its
    ``batch x length x vocabulary`` logits (about a fifth of SmolLM2's forward, and most of the memory).
    """
    input_ids, attention_mask = _pad_right(sequences, pad_id)
    device = _model_device(model)
    extra = {} if first is None else {"logits_to_keep": input_ids.shape[1] - first}
    return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **extra).logits


def _batch_logliks(logits: torch.Tensor, offset: int, rows: list[tuple[int, _Request]]) -> list[float]:
    """Summed log-probability of each request's continuation, from the logits of its batch row.

    ``logits[row, t]`` predicts token ``offset + t + 1`` of the row; one host transfer per batch.
    """
    logprobs = logits.float().log_softmax(-1)
    sums = []
    for row, request in rows:
        start = len(request.context) - 1 - offset  # the logits at position t predict token t + 1
        answer = logprobs[row, start : start + len(request.continuation)]
        target = torch.tensor(request.continuation, device=answer.device)
        sums.append(answer.gather(-1, target[:, None]).sum())
    return torch.stack(sums).tolist()


def _full_sequence_logliks(
    model: nn.Module, requests: list[_Request], pad_id: int, batch_size: int, progress: Progress
) -> list[float]:
    """Log-likelihoods with every (context, choice) pair run as one sequence."""
    # Pairs with the same input (one-token answers to one prompt, as in label scoring) share a
    # forward row. Longest first: similar lengths share a batch, and a too-long input fails at once.
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(tuple(request.context + request.continuation)[:-1], []).append(index)
    sequences = sorted(groups, key=len, reverse=True)
    logliks: list[float] = [0.0] * len(requests)
    trim = accepts_logits_to_keep(model)
    for start in progress(range(0, len(sequences), batch_size)):
        batch = sequences[start : start + batch_size]
        rows = [(row, index) for row, sequence in enumerate(batch) for index in groups[sequence]]
        # Logits from the first answer position of the batch on (one position at least).
        first = min(len(requests[index].context) for _, index in rows) - 1 if trim else None
        logits = _forward(model, batch, pad_id, first)
        values = _batch_logliks(logits, first or 0, [(row, requests[index]) for row, index in rows])
        for (_, index), value in zip(rows, values):
            logliks[index] = value
    return logliks


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    batch_size: int = 16,
    progress: bool = True,
    scoring: str = "cloze",
    share_context: bool = True,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Log-likelihood of every (example, choice) pair.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` returning
            ``.logits``; it is put in eval mode for the call and then restored.
        tokenizer: its tokenizer; the prompt is tokenised with its default special tokens, the
            continuation with none.
        examples: the examples to score.
        batch_size: sequences per forward (sorted by length, right-padded); with the shared
            context, choice sequences per forward.
        progress: show a progress bar.
        scoring: ``"cloze"`` (old name ``"choices"``) scores each answer text after
            ``example.prompt``; ``"label"`` scores the labels of ``dynmole.data.label_format(example)``
            (the papers' protocol; ids and gold indices are unchanged).
        share_context: run each distinct context once, with the KV cache, and only the choices
            after it (the same log-likelihoods, up to float rounding). Models without a KV cache,
            and models collecting routing statistics, run every pair as one sequence.
        max_length: the most tokens of prompt + choice; a longer prompt loses its start (after
            its leading special tokens), as in training. None: the model's context length
            (:func:`context_length`; no limit when its config names none).

    Returns:
        One dict per pair, in example then choice order: ``id``, ``task``, ``choice`` (index),
        ``loglik`` (summed log-prob), ``num_tokens`` and ``num_chars`` of the continuation, and
        ``truncated`` (whether its prompt was cut to ``max_length``).
    """
    requests = _requests(tokenizer, examples, scoring, max_length or context_length(model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    desc = f"scoring {examples[0].task}" if examples else "scoring"

    def bar(items: Iterable[Any]) -> Iterable[Any]:
        return tqdm(items, desc=desc, unit="batch", disable=not progress)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if share_context and requests and _can_share_context(model, requests):
                logliks = _shared_context_logliks(model, requests, pad_id, batch_size, bar)
            else:
                logliks = _full_sequence_logliks(model, requests, pad_id, batch_size, bar)
    finally:
        model.train(was_training)
    return [
        {
            "id": examples[r.example].id,
            "task": examples[r.example].task,
            "choice": r.choice,
            "loglik": loglik,
            "num_tokens": len(r.continuation),
            "num_chars": r.num_chars,
            "truncated": r.truncated,
        }
        for r, loglik in zip(requests, logliks)
    ]


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    examples_by_task: Mapping[str, list[Example]],
    batch_size: int = 16,
    scoring: str = "cloze",
    progress: bool = True,
    *,
    return_predictions: bool = False,
    log_samples: bool = False,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Accuracy on each task and their unweighted mean.

    Returns ``{"tasks": {task: {"acc", "acc_norm", "n", "truncated"}}, "average": {"acc", "acc_norm"},
    "scoring": protocol}``, the protocol ``"cloze"`` or ``"label"`` (``"choices"`` is read as
    ``"cloze"``); the average is the plain mean over tasks (each task counts once). Under ``label``
    every choice is one label token, so there is nothing to normalise: ``acc_norm`` is ``acc``.
    With ``return_predictions`` the result also has ``"predictions": {task: ...}``, each task's
    per-example predictions (:func:`predictions`: parallel lists ``id``, ``label``, ``acc``,
    ``acc_norm``), which the paired tests of ``dynmole.analysis.significance`` need. With
    ``log_samples`` it has ``"samples": {task: ...}``: the same lists and each choice's scores
    (:func:`dynmole.evaluation.metrics.samples`), what ``dynmole eval --log-samples`` writes.
    ``truncated`` counts the examples whose prompt was cut to ``max_length`` tokens (see
    :func:`score_choices`); each task with any is also logged as a warning. Running out of memory
    raises ``torch.OutOfMemoryError`` naming the task and the options that use less.
    """
    protocol = scoring_protocol(scoring)
    max_length = max_length or context_length(model)
    tasks, predicted = {}, {}
    for task, examples in examples_by_task.items():
        try:
            scores = score_choices(model, tokenizer, examples, batch_size, progress, protocol, max_length=max_length)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"out of memory while evaluating {task} ({err}). Knobs to turn: --eval-batch-size, --eval-cutoff-len"
            ) from err
        predicted[task] = samples(examples, scores, label_scoring=protocol == "label")
        truncated = len({score["id"] for score in scores if score["truncated"]})
        if truncated:
            logger.warning("%s: the prompts of %d of %d examples were cut from the left to fit %d tokens",
                           task, truncated, len(examples), max_length)
        tasks[task] = {**_accuracy_of(predicted[task]), "truncated": truncated}
    average = {
        metric: sum(t[metric] for t in tasks.values()) / len(tasks) if tasks else 0.0
        for metric in ("acc", "acc_norm")
    }
    result: dict[str, Any] = {"tasks": tasks, "average": average, "scoring": protocol}
    if return_predictions:
        result["predictions"] = {task: {key: lists[key] for key in ("id", "label", "acc", "acc_norm")}
                                 for task, lists in predicted.items()}
    if log_samples:
        result["samples"] = predicted
    return result
