"""The two evaluation protocols, and the papers' label format as a transform of ``Example``.

``cloze`` (lm-evaluation-harness): the task's prompt, then each answer text; the examples are
used as loaded. ``label`` (MoE-PEFT, the code of the DynMoLE and LD-MoLE papers,
``moe_peft/tasks/qa_tasks.py``): the prompt lists the options with labels and ends with
``"\\nAnswer:"``, the answer is the label (``" A"``, ``" B"``, ... or ``" true"``/``" false"``).
:func:`format_examples` is the one place that turns a protocol into the examples that are both
trained on and evaluated, so the two cannot drift apart. See ``docs/data.md``.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable, Iterable, Sequence

from ..errors import DynmoleError
from .example import Example
from .tasks import WINOGRANDE_QUESTION

PROTOCOLS = ("cloze", "label")
"""The evaluation protocols (``JobConfig.scoring``)."""
ALIASES = {"choices": "cloze"}
"""Old names still accepted where users type a protocol."""

ANSWER = "\nAnswer:"
_CHOOSE = "Please choose the correct answer to the question"
_BOOLEAN = {"no": "false", "yes": "true", "false": "false", "true": "true"}

Labelled = Sequence[tuple[str, str]]
"""``(label, option)`` pairs, in choice order."""


def scoring_protocol(name: str) -> str:
    """``"cloze"`` or ``"label"`` for ``name``; the old name ``"choices"`` means ``"cloze"``.

    Raises:
        ValueError: ``name`` is no protocol (the message starts with ``unknown scoring``).
    """
    protocol = ALIASES.get(name, name)
    if protocol not in PROTOCOLS:
        raise DynmoleError(f"unknown scoring {name!r}; expected cloze or label (choices is an old name for cloze)")
    return protocol


def _body(example: Example) -> str:
    """The cloze prompt without its trailing ``"\\nAnswer:"``."""
    return example.prompt.removesuffix(ANSWER)


def _question(example: Example) -> str:
    """The cloze prompt's question: its body without a leading ``"Question: "``."""
    return _body(example).removeprefix("Question: ")


def _inline(labelled: Labelled) -> str:
    return "".join(f" ({label}) {option}" for label, option in labelled)


def _lines(labelled: Labelled) -> str:
    return "".join(f"\n({label}) {option}" for label, option in labelled)


def _arc(example: Example, labelled: Labelled) -> str:
    """ARC, OpenBookQA (and every task MoE-PEFT has no format for): options inline."""
    return f"{_CHOOSE}: {_question(example)}{_inline(labelled)}{ANSWER}"


def _piqa(example: Example, labelled: Labelled) -> str:
    """MoE-PEFT's PIQA prompt, which ends with ``"Correct solution:"`` instead of ``"Answer:"``."""
    return ("Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
            f"appropriate solution to achieve the task:\n{_question(example)}\n{_lines(labelled)}\n\n"
            "Correct solution:")


def _siqa(example: Example, labelled: Labelled) -> str:
    return f"{_CHOOSE}.\n{_body(example)}{_lines(labelled)}{ANSWER}"


def _hellaswag(example: Example, labelled: Labelled) -> str:
    return f"Please choose the correct ending to complete the given sentence.\nSentence: {_body(example)}" \
           f"{_lines(labelled)}{ANSWER}"


def _winogrande(example: Example, labelled: Labelled) -> str:
    sentence = example.prompt.removesuffix(WINOGRANDE_QUESTION)
    return "Please choose the correct answer to fill in the blank to complete the given sentence.\n" \
           f"Sentence: {sentence}{_lines(labelled)}{ANSWER}"


def _boolq(example: Example) -> str:
    """MoE-PEFT's BoolQ prompt: the question alone, without the passage."""
    question = _body(example).rpartition("\nQuestion: ")[2]
    return f"Please answer the following question with true or false: {question}{ANSWER}"


_LETTERED: dict[str, Callable[[Example, Labelled], str]] = {
    "arc_e": _arc, "arc_c": _arc, "obqa": _arc, "piqa": _piqa, "siqa": _siqa, "hellaswag": _hellaswag,
    "winogrande": _winogrande,
}
"""The tasks with a MoE-PEFT prompt of their own; the others (RTE, local tasks) use ``_arc``."""


def _options(example: Example) -> tuple[str, ...]:
    return example.options or tuple(choice.strip() for choice in example.choices)


def _boolean_labels(example: Example) -> tuple[str, ...] | None:
    """``("false", "true")`` for BoolQ's ``("no", "yes")`` options; None for other examples."""
    words = tuple(_BOOLEAN.get(option.lower()) for option in _options(example))
    return words if example.task == "boolq" and None not in words else None


def label_format(example: Example) -> Example:
    """``example`` in the papers' label format: same id, task and gold index, a prompt that lists
    the options with labels, and the labels as choices.

    BoolQ gets ``" false"``/``" true"`` (for ``no``/``yes``) and a prompt without the passage;
    every other task gets ``" A"``, ``" B"``, ... in choice order. Example (ARC)::

        Please choose the correct answer to the question: Which gas do plants take in? (A) oxygen (B) carbon dioxide
        Answer:

    Raises:
        ValueError: more than 26 options.
    """
    labels = _boolean_labels(example)
    if labels is not None:
        prompt = _boolq(example)
    else:
        options = _options(example)
        if len(options) > len(string.ascii_uppercase):
            raise DynmoleError(f"{example.id}: {len(options)} options is more than letters A-Z")
        labels = tuple(string.ascii_uppercase[: len(options)])
        prompt = _LETTERED.get(example.task, _arc)(example, list(zip(labels, options)))
    return dataclasses.replace(example, prompt=prompt, choices=tuple(f" {label}" for label in labels),
                               options=labels)


def format_examples(examples: Iterable[Example], scoring: str) -> list[Example]:
    """The examples as the protocol ``scoring`` trains on and evaluates them: unchanged for
    ``cloze`` (or its old name ``choices``), :func:`label_format` of each for ``label``."""
    if scoring_protocol(scoring) == "cloze":
        return list(examples)
    return [label_format(example) for example in examples]
