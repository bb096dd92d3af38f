"""Which examples are near-duplicates of each other: the relations the leak-free split groups by
and the leak check counts.

Two relations, both pure functions of the examples (no data loading):

* **near-duplicate**: the same option set (the bare options, case-folded, as a set) and a prompt
  token-set Jaccard similarity ``|T_a & T_b| / |T_a | T_b| >= NEAR_DUPLICATE_JACCARD``, the tokens
  being the prompt's case-folded ``\\w+`` words (the task's template words included). WinoGrande's
  twins (two sentences differing by a trigger word or phrase, the same two options, opposite
  answers) are near-duplicates; so are BoolQ questions on the same passage.
* **contained answer**: an example's gold answer (stripped, at least ``CONTAINED_ANSWER_WORDS``
  words) occurs verbatim in another example's prompt. HellaSwag's ActivityNet items are
  consecutive captions of one video: one item's gold ending is the next item's context, so
  training on that context shows the model the other item's answer.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

from .example import Example

NEAR_DUPLICATE_JACCARD = 0.6
"""Prompt token-set Jaccard at or above which two examples with the same option set are
near-duplicates. On the packaged WinoGrande validation set, twins (adjacent rows, same options)
score 0.73-1.0 and different sentences with the same options at most 0.52, so 0.6 sits in the
gap; 0.8 would miss the twins whose trigger is a phrase (e.g. "liked to live in the moment" /
"liked to be aware of all the surroundings", 0.73)."""

CONTAINED_ANSWER_WORDS = 5
"""Fewest ``\\w+`` words of a gold answer whose occurrence in another prompt counts: shorter
answers recur in unrelated prompts (ARC-Challenge's "the independent (manipulated) variable", 4
words, is the wording of other questions); on the packaged data every answer of 5 or more words
found in another prompt is a HellaSwag caption."""

_WORD = re.compile(r"\w+")


def prompt_tokens(text: str) -> frozenset[str]:
    """The case-folded ``\\w+`` words of ``text``, as a set."""
    return frozenset(_WORD.findall(text.casefold()))


def option_set(example: Example) -> frozenset[str]:
    """The example's bare options (``options``, else the stripped ``choices``), case-folded, as a set."""
    options = example.options or tuple(choice.strip() for choice in example.choices)
    return frozenset(option.strip().casefold() for option in options)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Token-set Jaccard similarity ``|a & b| / |a | b|`` (0 for two empty sets)."""
    common = len(a & b)
    union = len(a) + len(b) - common
    return common / union if union else 0.0


def _similar_pairs(sets: Sequence[frozenset[str]], threshold: float) -> set[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, with ``jaccard(sets[i], sets[j]) >= threshold``.

    Exact, by prefix filtering: with the tokens of each set ordered rarest first, two sets of
    Jaccard >= t share a token among the first ``|s| - floor(t |s|) + 1`` of either, so only
    pairs sharing such a prefix token are compared, and only where the smaller set has at least
    ``t`` times the larger's size (the Jaccard similarity is at most their ratio)."""
    frequency = Counter(token for tokens in sets for token in tokens)
    index: dict[str, list[int]] = defaultdict(list)
    pairs: set[tuple[int, int]] = set()
    for j, tokens in enumerate(sets):
        ordered = sorted(tokens, key=lambda token: (frequency[token], token))
        prefix = ordered[: len(ordered) - math.floor(threshold * len(ordered)) + 1]
        candidates = {i for token in prefix for i in index[token]}
        pairs.update((i, j) for i in candidates
                     if min(len(sets[i]), len(tokens)) >= threshold * max(len(sets[i]), len(tokens))
                     and jaccard(sets[i], tokens) >= threshold)
        for token in prefix:
            index[token].append(j)
    return pairs


def near_duplicate_pairs(examples: Sequence[Example],
                         threshold: float = NEAR_DUPLICATE_JACCARD) -> set[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, of near-duplicates: the same :func:`option_set` and
    prompt :func:`jaccard` of :func:`prompt_tokens` at least ``threshold``."""
    buckets: dict[frozenset[str], list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        buckets[option_set(example)].append(index)
    pairs: set[tuple[int, int]] = set()
    for members in buckets.values():
        sets = [prompt_tokens(examples[k].prompt) for k in members]
        pairs.update((members[i], members[j]) for i, j in _similar_pairs(sets, threshold))
    return pairs


def contained_answer_pairs(answers_of: Sequence[Example], prompts_of: Sequence[Example],
                           min_words: int = CONTAINED_ANSWER_WORDS) -> set[tuple[int, int]]:
    """Pairs ``(i, j)``: the stripped gold answer of ``answers_of[i]``, of at least ``min_words``
    ``\\w+`` words, occurs in the prompt of ``prompts_of[j]`` (the same example excepted).

    Only prompts holding every whole word of the answer (its ``\\w+`` words but the first and
    the last, which the occurrence may cut) are searched."""
    holding: dict[str, set[int]] = defaultdict(set)
    for j, example in enumerate(prompts_of):
        for word in _WORD.findall(example.prompt):
            holding[word].add(j)
    pairs: set[tuple[int, int]] = set()
    for i, example in enumerate(answers_of):
        answer = example.answer.strip()
        words = _WORD.findall(answer)
        if len(words) < min_words:
            continue
        inner = words[1:-1]
        everyone = range(len(prompts_of))
        candidates = set.intersection(*(holding.get(word, set()) for word in inner)) if inner else everyone
        pairs.update((i, j) for j in candidates
                     if prompts_of[j] is not example and answer in prompts_of[j].prompt)
    return pairs


def union_groups(size: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """For each of ``size`` items, the smallest index of its group: the transitive closure of
    ``pairs`` (union-find)."""
    parent = list(range(size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is always the group's smallest index
    return [root(i) for i in range(size)]
