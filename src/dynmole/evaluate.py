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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .data import Example, format_examples, scoring_protocol
from .io import write_json

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
        raise ValueError("an example has an empty prompt and the tokenizer has no BOS or EOS token")
    return [token]


def _requests(tokenizer: Any, examples: list[Example], scoring: str) -> list[_Request]:
    requests = []
    for index, example in enumerate(format_examples(examples, scoring)):
        # The prompt gets the tokenizer's usual special tokens (e.g. Gemma's <bos>); the answer
        # none, or a <bos> would sit between prompt and answer (as in training, ``encode_example``).
        context = tokenizer(example.prompt)["input_ids"] or _context_prefix(tokenizer)
        for choice, text in enumerate(example.choices):
            continuation = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not continuation:
                raise ValueError(f"example {example.id}: choice {choice} ({text!r}) has no tokens")
            requests.append(_Request(index, choice, context, continuation, len(text)))
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
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    device = _model_device(model)
    extra = {} if first is None else {"logits_to_keep": width - first}
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


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    batch_size: int = 16,
    progress: bool = True,
    scoring: str = "cloze",
) -> list[dict[str, Any]]:
    """Log-likelihood of every (example, choice) pair.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` returning
            ``.logits``; it is put in eval mode for the call and then restored.
        tokenizer: its tokenizer; the prompt is tokenised with its default special tokens, the
            continuation with none.
        examples: the examples to score.
        batch_size: sequences per forward (sorted by length, right-padded).
        progress: show a progress bar.
        scoring: ``"cloze"`` (old name ``"choices"``) scores each answer text after
            ``example.prompt``; ``"label"`` scores the labels of ``dynmole.data.label_format(example)``
            (the papers' protocol; ids and gold indices are unchanged).

    Returns:
        One dict per pair, in example then choice order: ``id``, ``task``, ``choice`` (index),
        ``loglik`` (summed log-prob), ``num_tokens`` and ``num_chars`` of the continuation.
    """
    requests = _requests(tokenizer, examples, scoring)
    # Pairs with the same input (one-token answers to one prompt, as in label scoring) share a
    # forward row. Longest first: similar lengths share a batch, and a too-long input fails at once.
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(tuple(request.context + request.continuation)[:-1], []).append(index)
    sequences = sorted(groups, key=len, reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logliks: list[float] = [0.0] * len(requests)
    batches = tqdm(
        range(0, len(sequences), batch_size),
        desc=f"scoring {examples[0].task}" if examples else "scoring",
        unit="batch",
        disable=not progress,
    )
    trim = _accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in batches:
                batch = sequences[start : start + batch_size]
                rows = [(row, index) for row, sequence in enumerate(batch) for index in groups[sequence]]
                # Logits from the first answer position of the batch on (one position at least).
                first = min(len(requests[index].context) for _, index in rows) - 1 if trim else None
                logits = _forward(model, batch, pad_id, first)
                values = _batch_logliks(logits, first or 0, [(row, requests[index]) for row, index in rows])
                for (_, index), value in zip(rows, values):
                    logliks[index] = value
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
) -> dict[str, Any]:
    """Accuracy on each task and their unweighted mean.

    Returns ``{"tasks": {task: {"acc", "acc_norm", "n"}}, "average": {"acc", "acc_norm"},
    "scoring": protocol}``, the protocol ``"cloze"`` or ``"label"`` (``"choices"`` is read as
    ``"cloze"``); the average is the plain mean over tasks (each task counts once). Under ``label``
    every choice is one label token, so there is nothing to normalise: ``acc_norm`` is ``acc``.
    With ``return_predictions`` the result also has ``"predictions": {task: ...}``, each task's
    per-example predictions (:func:`predictions`: parallel lists ``id``, ``label``, ``acc``,
    ``acc_norm``), which the paired tests of ``dynmole.analysis.significance`` need.
    """
    protocol = scoring_protocol(scoring)
    tasks, predicted = {}, {}
    for task, examples in examples_by_task.items():
        scores = score_choices(model, tokenizer, examples, batch_size, progress, protocol)
        predicted[task] = predictions(examples, scores)
        if protocol == "label":  # one label token per choice: acc_norm is acc
            predicted[task]["acc_norm"] = list(predicted[task]["acc"])
        tasks[task] = _accuracy_of(predicted[task])
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
