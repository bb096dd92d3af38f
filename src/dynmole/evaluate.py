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

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .data import Example, format_examples, scoring_protocol
from .data.tokenize import encode_answer, encode_prompt, truncate_prompt
from .errors import DynmoleError
from .io import write_json

logger = logging.getLogger(__name__)

_METRIC_TEXT = {
    ("cloze", "acc"): "summed log-likelihood of each answer",
    ("cloze", "acc_norm"): "log-likelihood of each answer per character",
    ("label", "acc"): "logits of the label tokens",
    ("label", "acc_norm"): "same as acc",
}


@dataclass(frozen=True)
class _Request:
    """One (example, choice) pair, tokenised."""

    example: int
    choice: int
    context: list[int]
    continuation: list[int]
    num_chars: int
    truncated: bool = False


def describe_scoring(scoring: str) -> str:
    """One sentence saying what ``scoring`` (a protocol name) shows the model and what it scores."""
    if scoring_protocol(scoring) == "cloze":
        return ("cloze: the task's prompt, then each answer text (lm-evaluation-harness); acc = highest summed "
                "log-likelihood of the answer, acc_norm = highest per character")
    return ("label: the options listed with labels in the prompt, answered by the label (MoE-PEFT / DynMoLE / "
            "LD-MoLE); acc = highest logit of the label tokens at the answer position, acc_norm = acc")


def metric_heading(metric: str, scoring: str) -> str:
    """A table heading naming the metric and the protocol, e.g. ``"acc (%, cloze: summed ...)"``."""
    protocol = scoring_protocol(scoring)
    return f"{metric} (%, {protocol}: {_METRIC_TEXT[protocol, metric]})"


def _context_prefix(tokenizer: Any) -> list[int]:
    """The token an empty prompt is replaced by, so that the first answer token is predicted."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise DynmoleError("an example has an empty prompt and the tokenizer has no BOS or EOS token")
    return [token]


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model``'s config says it takes (``max_position_embeddings`` or
    ``n_positions`` of its text config), or None when it says none."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _requests(tokenizer: Any, examples: list[Example], scoring: str, max_length: int | None = None) -> list[_Request]:
    """One :class:`_Request` per (example, choice), tokenised as in training (``encode_example``):
    prompt and choice as one text, split after the prompt's own tokens (:func:`encode_answer`,
    as lm-evaluation-harness); the tokenizer's special tokens (e.g. Gemma's <bos>) lead the
    context, and the continuation has none. A pair longer than ``max_length`` tokens has its
    context cut from the left after those special tokens, as training cuts the prompt
    (:func:`truncate_prompt`), and is marked ``truncated``; the choice is always kept whole."""
    requests = []
    for index, example in enumerate(format_examples(examples, scoring)):
        lead, body = encode_prompt(tokenizer, example.prompt)
        for choice, text in enumerate(example.choices):
            context, continuation = encode_answer(tokenizer, example.prompt, body, text)
            context = lead + context or _context_prefix(tokenizer)
            if not continuation:
                raise DynmoleError(f"example {example.id}: choice {choice} ({text!r}) has no tokens")
            truncated = max_length is not None and len(context) + len(continuation) > max_length
            if truncated:
                if len(continuation) >= max_length:
                    raise DynmoleError(f"example {example.id}: choice {choice} has {len(continuation)} tokens, "
                                       f"too many for the {max_length}-token limit (eval_cutoff_len) with any "
                                       "prompt before it")
                context = truncate_prompt(tokenizer, context, max_length - len(continuation))
            requests.append(_Request(index, choice, context, continuation, len(text), truncated))
    return requests


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model`` (or the HF model a MoLE or PEFT wrapper holds) takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


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


Progress = Callable[[Iterable[Any]], Iterable[Any]]


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
    trim = _accepts_logits_to_keep(model)
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


# ---------------------------------------------------------------- shared context
# The choices of one question repeat its context. With ``share_context`` the context but its last
# token (the prefix) runs once per question with the KV cache on; the cache rows are repeated for
# the question's choices, and a second pass runs ``[last context token] + choice[:-1]`` (the
# suffix) on them, whose logits predict the choice's tokens. Causal attention and per-token
# routing make this the computation of the full sequences: the prefix never sees a choice.


def _cache_argument(model: nn.Module) -> str | None:
    """The KV-cache argument of ``model``'s HF forward: ``cache`` (transformers >= 5.x) or
    ``past_key_values``; None when it takes neither."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _shared_saves_tokens(requests: list[_Request]) -> bool:
    """Whether running each context's prefix once runs fewer tokens than the full sequences
    (not for one-token answers to one prompt, as in label scoring: those share a row anyway)."""
    full = {tuple(r.context + r.continuation)[:-1] for r in requests}
    prefixes = {tuple(r.context) for r in requests}
    suffixes = {(tuple(r.context), tuple(r.continuation[:-1])) for r in requests}
    shared = sum(len(c) - 1 for c in prefixes) + sum(1 + len(s) for _, s in suffixes)
    return shared < sum(map(len, full))


def _can_share_context(model: nn.Module, requests: list[_Request]) -> bool:
    """Whether the shared-context path saves work and computes what the full sequences do.

    It needs a KV cache; not while routing statistics are collected (they count every token of
    every choice's sequence); not for PEFT prompt learning (its virtual tokens use the cache);
    and no attention window (sliding or chunked) shorter than a prefix plus a suffix, since the
    padding between them counts towards the window.
    """
    if not _shared_saves_tokens(requests) or _cache_argument(model) is None or getattr(model, "stats_enabled", False):
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    config = getattr(model, "config", None)
    windows = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    longest = max((len(r.context) for r in requests), default=0) + max((len(r.continuation) for r in requests), default=0)
    return all(window is None or longest <= window for window in windows)


def _pad_right(sequences: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``sequences``, right-padded (host tensors)."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def _shared_batches(
    contexts: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]], batch_size: int
) -> list[list[tuple[int, ...]]]:
    """Contexts in batches of at most ``batch_size`` suffix rows (at least one context), sorted
    by their longest suffix, then their length, longest first: the suffixes, the larger part of
    the work, are padded the least. One-token contexts (no prefix) form batches of their own."""
    batches: list[list[tuple[int, ...]]] = []
    rows = 0
    for context in sorted(contexts, key=lambda c: (max(map(len, contexts[c])), len(c)), reverse=True):
        count = len(contexts[context])
        if not batches or rows + count > batch_size or (len(context) == 1) != (len(batches[-1][0]) == 1):
            batches.append([])
            rows = 0
        batches[-1].append(context)
        rows += count
    return batches


def _prefix_cache(model: nn.Module, prefixes: list[tuple[int, ...]], pad_id: int) -> tuple[Any, torch.Tensor]:
    """The KV cache of ``prefixes`` (right-padded) and their attention mask."""
    input_ids, attention_mask = _pad_right(prefixes, pad_id)
    device = _model_device(model)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    outputs = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=True, **extra)
    return getattr(outputs, _cache_argument(model)), attention_mask


def _suffix_logits(
    model: nn.Module, prefixes: list[tuple[int, ...]], suffixes: list[tuple[int, tuple[int, ...]]], pad_id: int
) -> torch.Tensor:
    """Logits of every ``(prefix index, suffix)`` row after its prefix (``(rows, width, vocab)``)."""
    device = _model_device(model)
    index = torch.tensor([k for k, _ in suffixes])
    input_ids, suffix_mask = _pad_right([suffix for _, suffix in suffixes], pad_id)
    offsets = torch.tensor([len(prefix) for prefix in prefixes])[index]
    position_ids = offsets[:, None] + torch.arange(input_ids.shape[1])
    extra: dict[str, Any] = {}
    attention_mask = suffix_mask
    if any(prefixes):  # (a batch of one-token contexts has no prefix)
        cache, prefix_mask = _prefix_cache(model, prefixes, pad_id)
        cache.batch_select_indices(index.to(device))
        attention_mask = torch.cat([prefix_mask[index], suffix_mask], dim=1)
        extra = {_cache_argument(model): cache, "use_cache": True}
    return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                 position_ids=position_ids.to(device), **extra).logits


def _continuation_logliks(logits: torch.Tensor, rows: list[int], continuations: list[list[int]]) -> list[float]:
    """Summed log-probability of each continuation, read from suffix row ``rows[i]`` from its
    first position on; one host transfer."""
    width = max(map(len, continuations))
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, tokens in enumerate(continuations):
        targets[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        valid[i, : len(tokens)] = True
    logprobs = logits.float().log_softmax(-1)
    device = logprobs.device
    picked = logprobs[torch.tensor(rows, device=device)[:, None], torch.arange(width, device=device), targets.to(device)]
    return torch.where(valid.to(device), picked, 0.0).sum(-1).tolist()


def _shared_context_logliks(
    model: nn.Module, requests: list[_Request], pad_id: int, batch_size: int, progress: Progress
) -> list[float]:
    """Log-likelihoods with each distinct context's prefix run once (see above)."""
    # context -> suffix -> the requests it scores (one-token answers to one prompt share a suffix)
    contexts: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for index, request in enumerate(requests):
        suffix = (request.context[-1], *request.continuation[:-1])
        contexts.setdefault(tuple(request.context), {}).setdefault(suffix, []).append(index)
    logliks: list[float] = [0.0] * len(requests)
    for batch in progress(_shared_batches(contexts, batch_size)):
        suffixes = [(k, suffix) for k, context in enumerate(batch) for suffix in contexts[context]]
        logits = _suffix_logits(model, [context[:-1] for context in batch], suffixes, pad_id)
        pairs = [(row, index) for row, (k, suffix) in enumerate(suffixes) for index in contexts[batch[k]][suffix]]
        values = _continuation_logliks(logits, [row for row, _ in pairs],
                                       [requests[index].continuation for _, index in pairs])
        for (_, index), value in zip(pairs, values):
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


def predictions(examples: list[Example], scores: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-example predictions of ``scores`` (from :func:`score_choices` on ``examples``).

    Returns parallel lists, one entry per example in ``examples``' order: ``id``, ``label`` (the
    gold choice index), ``acc`` (the index of the choice with the highest summed log-likelihood)
    and ``acc_norm`` (the highest log-likelihood per character). Ties go to the lowest index.
    """
    by_example: dict[str, list[dict[str, Any]]] = {}
    for score in scores:
        by_example.setdefault(score["id"], []).append(score)
    out: dict[str, list[Any]] = {"id": [], "label": [], "acc": [], "acc_norm": []}
    for example in examples:
        pairs = by_example[example.id]
        out["id"].append(example.id)
        out["label"].append(example.label)
        out["acc"].append(max(range(len(pairs)), key=lambda i: (pairs[i]["loglik"], -i)))
        out["acc_norm"].append(max(range(len(pairs)), key=lambda i: (pairs[i]["loglik"] / pairs[i]["num_chars"], -i)))
    return out


def _accuracy_of(predicted: dict[str, list[Any]]) -> dict[str, float | int]:
    """``acc``, ``acc_norm`` and ``n`` of :func:`predictions`' output."""
    n = len(predicted["label"])
    hits = {m: sum(p == label for p, label in zip(predicted[m], predicted["label"])) for m in ("acc", "acc_norm")}
    return {"acc": hits["acc"] / n if n else 0.0, "acc_norm": hits["acc_norm"] / n if n else 0.0, "n": n}


def accuracy(examples: list[Example], scores: list[dict[str, Any]]) -> dict[str, float | int]:
    """``acc``, ``acc_norm`` and ``n`` of ``scores`` (from :func:`score_choices` on ``examples``).

    ``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` the highest
    log-likelihood per *character* of the continuation (its leading space included). The LM
    evaluation harness's ``acc_norm`` also divides by character length (``len`` of the choice
    string, without the space it prepends), so the two agree up to that one character; its
    byte-length variant is ``acc_bytes``. Ties go to the lowest index (see :func:`predictions`).
    """
    return _accuracy_of(predictions(examples, scores))


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    examples_by_task: Mapping[str, list[Example]],
    batch_size: int = 16,
    scoring: str = "cloze",
    progress: bool = True,
    *,
    return_predictions: bool = False,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Accuracy on each task and their unweighted mean.

    Returns ``{"tasks": {task: {"acc", "acc_norm", "n", "truncated"}}, "average": {"acc", "acc_norm"},
    "scoring": protocol}``, the protocol ``"cloze"`` or ``"label"`` (``"choices"`` is read as
    ``"cloze"``); the average is the plain mean over tasks (each task counts once). Under ``label``
    every choice is one label token, so there is nothing to normalise: ``acc_norm`` is ``acc``.
    With ``return_predictions`` the result also has ``"predictions": {task: ...}``, each task's
    per-example predictions (:func:`predictions`: parallel lists ``id``, ``label``, ``acc``,
    ``acc_norm``), which the paired tests of ``dynmole.analysis.significance`` need.
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
        predicted[task] = predictions(examples, scores)
        if protocol == "label":  # one label token per choice: acc_norm is acc
            predicted[task]["acc_norm"] = list(predicted[task]["acc"])
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
        result["predictions"] = predicted
    return result


def results_markdown(runs: Mapping[str, dict[str, Any]], metric: str = "acc_norm") -> str:
    """A markdown table of ``metric`` in percent: one row per run (name -> :func:`evaluate_tasks`
    result), one column per task, then the average; a task a run lacks shows as ``-``."""
    tasks: list[str] = []
    for result in runs.values():
        tasks += [task for task in result["tasks"] if task not in tasks]
    lines = [
        "| run | " + " | ".join(tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for name, result in runs.items():
        cells = [
            f"{100 * result['tasks'][task][metric]:.1f}" if task in result["tasks"] else "-" for task in tasks
        ]
        cells.append(f"{100 * result['average'][metric]:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_tables(runs: Mapping[str, dict[str, Any]], scoring: str) -> str:
    """:func:`results_markdown` of ``acc`` then ``acc_norm``, each under a heading naming the
    metric and the protocol ``scoring`` the runs were evaluated with."""
    return "\n".join(f"## {metric_heading(metric, scoring)}\n\n{results_markdown(runs, metric)}"
                     for metric in ("acc", "acc_norm"))


def write_results(path: str | Path, results: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Write ``{"results": ..., "metadata": ...}`` as JSON, atomically; the metadata should say
    which model, adapter, data split and prompt format produced the numbers."""
    write_json(path, {"results": results, "metadata": {"dynmole_version": __version__, **metadata}})
