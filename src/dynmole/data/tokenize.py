"""Turn examples into training features: loss on the answer tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import DynmoleError
from .example import Example

IGNORE_INDEX = -100


def encode_example(tokenizer: Any, example: Example, cutoff_len: int = 512) -> dict[str, list[int]]:
    """Token ids of ``prompt + answer + eos`` with labels masked (``-100``) on the prompt.

    Prompt and answer are tokenised together and split where the prompt's own tokens end
    (:func:`encode_pair`, as evaluation does), with the tokenizer's special tokens (e.g. BOS) in
    front of the prompt and none in the answer. When the whole is longer than ``cutoff_len`` the
    prompt is cut from the left, after its leading special tokens (which stay: Gemma needs its
    ``<bos>``), so the answer is always kept.
    """
    prompt, answer = encode_pair(tokenizer, example.prompt, example.answer)
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    if not answer:
        raise DynmoleError(f"example {example.id} has an empty answer")
    answer = answer[:cutoff_len]
    prompt = truncate_prompt(tokenizer, prompt, cutoff_len - len(answer))
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_prompt(tokenizer: Any, prompt: str) -> tuple[list[int], list[int]]:
    """``(lead, body)``: the special tokens the tokenizer puts in front of ``prompt`` (BOS and the
    like, see :func:`_leading_specials`) and the prompt's tokens without special tokens."""
    with_specials, body = tokenizer(prompt)["input_ids"], _plain(tokenizer, prompt)
    # (a prompt whose text starts with a special token's string has that token in its body too)
    added = max(_leading_specials(tokenizer, with_specials) - _leading_specials(tokenizer, body), 0)
    return with_specials[:added], body


def encode_answer(tokenizer: Any, prompt: str, body: list[int], answer: str) -> tuple[list[int], list[int]]:
    """``(context, answer)`` token ids of ``prompt + answer`` tokenised as one text (no special
    tokens), split after its longest common prefix with ``body`` (the prompt's own tokens, from
    :func:`encode_prompt`), as lm-evaluation-harness does.

    Tokenising the answer on its own would let a tokenizer that marks the start of every text (a
    sentencepiece ``▁``) put a token in the answer that the whole text does not have; a prompt
    token that merges with the answer's first characters (a trailing space) goes to the answer.
    """
    whole = _plain(tokenizer, prompt + answer)
    cut = 0
    while cut < min(len(whole), len(body)) and whole[cut] == body[cut]:
        cut += 1
    return whole[:cut], whole[cut:]


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt, answer)`` token ids: the tokenizer's leading special tokens and the prompt's
    tokens, then the answer's, from one tokenisation of ``prompt + answer`` (:func:`encode_answer`)."""
    lead, body = encode_prompt(tokenizer, prompt)
    context, tokens = encode_answer(tokenizer, prompt, body, answer)
    return lead + context, tokens


def _plain(tokenizer: Any, text: str) -> list[int]:
    """``text``'s token ids without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _leading_specials(tokenizer: Any, ids: list[int]) -> int:
    """How many of ``ids`` lead with the tokenizer's special ids (all but ``unk``)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or []) - {getattr(tokenizer, "unk_token_id", None)}
    lead = 0
    while lead < len(ids) and ids[lead] in special:
        lead += 1
    return lead


def truncate_prompt(tokenizer: Any, prompt: list[int], budget: int) -> list[int]:
    """``prompt`` cut to ``budget`` tokens from the left, keeping its leading special tokens
    (BOS and the like: the tokenizer's special ids other than ``unk``) in front."""
    if len(prompt) <= budget:
        return prompt
    lead = min(_leading_specials(tokenizer, prompt), max(budget, 0))
    return prompt[:lead] + prompt[len(prompt) - (max(budget, 0) - lead) :]


@dataclass
class AnswerCollator:
    """Right-pads a list of encoded examples; padding is masked in attention and labels."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
