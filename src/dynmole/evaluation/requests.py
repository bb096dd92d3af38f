"""Tokenised scoring requests: one per (example, choice), cut to the model's context length.

The scoring engines (:mod:`.engines`, :mod:`.shared_context`) run these; ``cloze`` and ``label``
examples become requests alike (the label format is applied first, by :func:`format_examples`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..data import Example, format_examples
from ..data.tokenize import encode_answer, encode_prompt, truncate_prompt
from ..errors import DynmoleError

Progress = Callable[[Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class _Request:
    """One (example, choice) pair, tokenised."""

    example: int
    choice: int
    context: list[int]
    continuation: list[int]
    num_chars: int
    truncated: bool = False


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


def _pad_right(sequences: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``sequences``, right-padded (host tensors)."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask
