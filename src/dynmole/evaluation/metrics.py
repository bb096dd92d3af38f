"""Accuracy metrics of scored choices: per-example predictions, ``acc`` and ``acc_norm``."""

from __future__ import annotations

from typing import Any

from ..data import Example


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


def samples(examples: list[Example], scores: list[dict[str, Any]],
            label_scoring: bool = False) -> dict[str, list[Any]]:
    """What ``dynmole eval --log-samples`` keeps of ``scores`` (from :func:`score_choices` on
    ``examples``): :func:`predictions`' parallel lists (``id``, ``label``, ``acc``, ``acc_norm``) and,
    per example, each choice's summed log-likelihood (``loglik``) and log-likelihood per character
    (``loglik_norm``), in choice order. Under label scoring (``label_scoring``) there is nothing to
    normalise: ``loglik_norm`` is ``loglik`` and ``acc_norm`` is ``acc``."""
    out = predictions(examples, scores)
    by_example: dict[str, list[dict[str, Any]]] = {}
    for score in scores:
        by_example.setdefault(score["id"], []).append(score)
    out["loglik"] = [[pair["loglik"] for pair in by_example[example.id]] for example in examples]
    if label_scoring:
        out["acc_norm"] = list(out["acc"])
        out["loglik_norm"] = [list(row) for row in out["loglik"]]
    else:
        out["loglik_norm"] = [[pair["loglik"] / pair["num_chars"] for pair in by_example[example.id]]
                              for example in examples]
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
