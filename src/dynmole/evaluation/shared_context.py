"""The shared-context scoring path: each question's context runs once, with the KV cache.

The choices of one question repeat its context. With ``share_context`` the context but its last
token (the prefix) runs once per question with the KV cache on; the cache rows are repeated for
the question's choices, and a second pass runs ``[last context token] + choice[:-1]`` (the
suffix) on them, whose logits predict the choice's tokens. Causal attention and per-token
routing make this the computation of the full sequences: the prefix never sees a choice.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..pretrained import accepts_logits_to_keep
from .requests import Progress, _model_device, _pad_right, _Request


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
    longest = (max((len(r.context) for r in requests), default=0)
               + max((len(r.continuation) for r in requests), default=0))
    return all(window is None or longest <= window for window in windows)


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
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
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
    row_index = torch.tensor(rows, device=device)[:, None]
    picked = logprobs[row_index, torch.arange(width, device=device), targets.to(device)]
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
