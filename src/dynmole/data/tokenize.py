"""Turn examples into training features: loss on the answer tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .example import Example

IGNORE_INDEX = -100


def encode_example(tokenizer: Any, example: Example, cutoff_len: int = 512) -> dict[str, list[int]]:
    """Token ids of ``prompt + answer + eos`` with labels masked (``-100``) on the prompt.

    The prompt is tokenised with the tokenizer's special tokens (e.g. BOS), the answer without
    them (Gemma would otherwise insert a second ``<bos>``). When the whole is longer than
    ``cutoff_len`` the prompt's text is cut from the left, after its leading special tokens
    (which stay: Gemma needs its ``<bos>``), so the answer is always kept.
    """
    prompt = tokenizer(example.prompt)["input_ids"]
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    if not answer:
        raise ValueError(f"example {example.id} has an empty answer")
    answer = answer[:cutoff_len]
    prompt = truncate_prompt(tokenizer, prompt, cutoff_len - len(answer))
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def truncate_prompt(tokenizer: Any, prompt: list[int], budget: int) -> list[int]:
    """``prompt`` cut to ``budget`` tokens from the left, keeping its leading special tokens
    (BOS and the like: the tokenizer's special ids other than ``unk``) in front."""
    if len(prompt) <= budget:
        return prompt
    special = set(getattr(tokenizer, "all_special_ids", None) or []) - {getattr(tokenizer, "unk_token_id", None)}
    lead = 0
    while lead < len(prompt) and prompt[lead] in special:
        lead += 1
    lead = min(lead, max(budget, 0))
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
