import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dynmole import MoLEConfig, get_mole_model
from dynmole.data.example import Example
from dynmole.evaluation import accuracy, evaluate_tasks, results_markdown, score_choices, write_results
from dynmole.pretrained import accepts_logits_to_keep

CORPUS = [
    "Question : which animal barks ? Answer : dog cat fish bird",
    "Question : what is hot ? Answer : fire ice snow water",
    "the sky is blue and the grass is green red yellow",
    "A B C D . yes no maybe",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer that, like Gemma's, puts a BOS token before every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def examples():
    return [
        Example("t/0", "t", "Question : which animal barks ? Answer :", (" dog", " cat", " fish", " bird"), 0),
        Example("t/1", "t", "Question : what is hot ? Answer :", (" ice", " fire"), 1),
        Example("t/2", "t", "the sky is", (" blue", " green and yellow", " red"), 0),
        Example("t/3", "t", "the grass is", (" red", " green"), 1),
        Example("t/4", "t", "Question : what is blue ? Answer : the", (" snow is", " sky", " fish"), 1),
        Example("t/5", "t", "yes", (" no", " maybe", " yes no maybe"), 2),
    ]


def test_batched_scores_equal_unbatched(model, tokenizer, examples):
    one = score_choices(model, tokenizer, examples, batch_size=1, progress=False)
    eight = score_choices(model, tokenizer, examples, batch_size=8, progress=False)
    assert len(one) == sum(len(e.choices) for e in examples)
    assert [(s["id"], s["choice"]) for s in one] == [(e.id, i) for e in examples for i in range(len(e.choices))]
    for a, b in zip(one, eight):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)
        assert (a["num_tokens"], a["num_chars"]) == (b["num_tokens"], b["num_chars"])


def test_loglik_matches_hand_computation(model, tokenizer, examples):
    example = examples[2]
    scores = score_choices(model, tokenizer, examples, batch_size=4, progress=False)
    score = next(s for s in scores if s["id"] == example.id and s["choice"] == 1)
    context = tokenizer(example.prompt)["input_ids"]
    continuation = tokenizer(" green and yellow", add_special_tokens=False)["input_ids"]
    assert context[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in continuation
    with torch.no_grad():
        logprobs = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
    expected = sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(continuation))
    assert score["loglik"] == pytest.approx(expected, abs=1e-4)
    assert (score["num_tokens"], score["num_chars"]) == (3, len(" green and yellow"))


def test_accuracy_is_deterministic(model, tokenizer, examples):
    first = evaluate_tasks(model, tokenizer, {"t": examples}, batch_size=3, progress=False)
    second = evaluate_tasks(model, tokenizer, {"t": examples}, batch_size=5, progress=False)
    assert first == second
    assert first["tasks"]["t"]["n"] == len(examples)


class RiggedModel(nn.Module):
    """Predicts ``token`` with near certainty at every position, whatever the input."""

    def __init__(self, vocab_size: int, token: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.vocab_size, self.token = vocab_size, token
        self.rows = 0

    def forward(self, input_ids, attention_mask):
        self.rows += input_ids.shape[0]
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.token] = 20.0
        return SimpleNamespace(logits=logits)


def test_rigged_model_gets_full_accuracy(tokenizer):
    yes = tokenizer.convert_tokens_to_ids("yes")
    rigged = [
        Example(f"r/{i}", "r", prompt, choices, choices.index(" yes"))
        for i, (prompt, choices) in enumerate(
            [("the sky is", (" yes", " no")), ("Question :", (" no", " maybe", " yes")), ("fire", (" dog", " yes"))]
        )
    ]
    results = evaluate_tasks(RiggedModel(len(tokenizer), yes), tokenizer, {"r": rigged}, progress=False)
    assert results["tasks"]["r"] == {"acc": 1.0, "acc_norm": 1.0, "n": 3, "truncated": 0}


def test_label_scoring_scores_the_letters(tokenizer, examples):
    rigged = RiggedModel(len(tokenizer), tokenizer.convert_tokens_to_ids("B"))
    scores = score_choices(rigged, tokenizer, examples, batch_size=4, progress=False, scoring="label")
    assert all(s["num_tokens"] == 1 and s["num_chars"] == 2 for s in scores)
    assert rigged.rows == len(examples)  # one-letter answers to one prompt share a forward row
    expected = sum(e.label == 1 for e in examples) / len(examples)
    assert accuracy(examples, scores)["acc"] == pytest.approx(expected)


def test_unknown_scoring_is_rejected(model, tokenizer, examples):
    with pytest.raises(ValueError, match="unknown scoring"):
        score_choices(model, tokenizer, examples, progress=False, scoring="letters")


def test_mole_model_scores_like_its_base_and_keeps_its_mode(model, tokenizer, examples):
    base = score_choices(model, tokenizer, examples, progress=False)
    mole = get_mole_model(model, MoLEConfig(method="dynmole", num_experts=2, r=2, alpha=4.0))
    try:
        mole.train()
        scores = score_choices(mole, tokenizer, examples, progress=False)
        assert mole.training
    finally:
        model.eval()
    # The experts' B matrices start at zero: the adapted model scores like the base one.
    for a, b in zip(base, scores):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)


def test_markdown_table_and_json(tmp_path):
    run = {"tasks": {"arc_e": {"acc": 0.5, "acc_norm": 0.25, "n": 4}}, "average": {"acc": 0.5, "acc_norm": 0.25}}
    other = {
        "tasks": {"arc_e": {"acc": 1.0, "acc_norm": 1.0, "n": 4}, "piqa": {"acc": 0.5, "acc_norm": 0.5, "n": 2}},
        "average": {"acc": 0.75, "acc_norm": 0.75},
    }
    table = results_markdown({"base": run, "dynmole": other})
    assert table.splitlines() == [
        "| run | arc_e | piqa | average |",
        "|---|---:|---:|---:|",
        "| base | 25.0 | - | 25.0 |",
        "| dynmole | 100.0 | 50.0 | 75.0 |",
    ]
    write_results(tmp_path / "out" / "results.json", run, {"model": "tiny"})
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"] == run and saved["metadata"]["model"] == "tiny"


@pytest.mark.slow
def test_smollm2_accuracy_is_reproducible():
    from dynmole.data import load_examples
    from dynmole.pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    examples = load_examples("arc_e", split="eval", limit=20)
    first = evaluate_tasks(model, tokenizer, {"arc_e": examples}, batch_size=16, progress=False)
    second = evaluate_tasks(model, tokenizer, {"arc_e": examples}, batch_size=7, progress=False)
    assert first["tasks"]["arc_e"] == second["tasks"]["arc_e"]
    assert first["tasks"]["arc_e"]["n"] == 20


def test_only_answer_positions_reach_the_lm_head(model, tokenizer, examples):
    """``logits_to_keep`` trims the LM head to the answer window without changing any score."""
    class FullLogits(nn.Module):  # no ``logits_to_keep``: every position's logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    positions = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    try:
        trimmed = score_choices(model, tokenizer, examples, batch_size=4, progress=False)
        trimmed_positions, positions[:] = sum(positions), []
        full = score_choices(FullLogits(model), tokenizer, examples, batch_size=4, progress=False)
        full_positions = sum(positions)
    finally:
        hook.remove()
    assert trimmed_positions < full_positions
    for a, b in zip(trimmed, full):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-5)
    fresh = type(model)(model.config)
    mole = get_mole_model(fresh, MoLEConfig(method="loramoe", num_experts=2, r=2, alpha=4.0))
    assert mole.get_base_model() is fresh and accepts_logits_to_keep(mole)
    assert not accepts_logits_to_keep(FullLogits(model))


def test_label_scoring_is_the_argmax_of_the_label_logits(model, tokenizer, examples):
    """One forward row per example (one-token labels share it); the prediction is the argmax of
    the label tokens' logits at the last prompt position, computed here by hand."""
    from dynmole.data import label_format

    expected = []
    for example in examples:
        labelled = label_format(example)
        labels = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in labelled.choices]
        assert all(len(ids) == 1 for ids in labels) and tokenizer.unk_token_id not in sum(labels, [])
        context = tokenizer(labelled.prompt)["input_ids"]
        with torch.no_grad():
            last = model(torch.tensor([context])).logits[0, -1]
        expected.append(int(last[[ids[0] for ids in labels]].argmax()))
    rows = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        scores = score_choices(model, tokenizer, examples, batch_size=4, progress=False, scoring="label")
    finally:
        hook.remove()
    assert sum(rows) == len(examples)
    predicted = [max((s for s in scores if s["id"] == e.id), key=lambda s: s["loglik"])["choice"] for e in examples]
    assert predicted == expected
    results = evaluate_tasks(model, tokenizer, {"t": examples}, batch_size=4, scoring="label", progress=False)
    acc = sum(p == e.label for p, e in zip(expected, examples)) / len(examples)
    assert results["scoring"] == "label"
    assert results["tasks"]["t"] == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc), "n": len(examples),
                                     "truncated": 0}


def test_label_training_features_are_the_evaluated_prompt_and_the_gold_label(tokenizer, examples):
    from dynmole.data import format_examples
    from dynmole.data.tokenize import IGNORE_INDEX, encode_example
    from dynmole.evaluation.requests import _requests

    for example, labelled in zip(examples, format_examples(examples, "label")):
        features = encode_example(tokenizer, labelled)
        gold = tokenizer(" " + "ABCD"[example.label], add_special_tokens=False)["input_ids"]
        assert features["input_ids"][-len(gold) - 1:] == gold + [tokenizer.eos_token_id]
        (context,) = {tuple(request.context) for request in _requests(tokenizer, [example], "label")}
        prompt = features["input_ids"][: len(features["input_ids"]) - len(gold) - 1]
        assert tuple(prompt) == context
        assert features["labels"] == [IGNORE_INDEX] * len(prompt) + gold + [tokenizer.eos_token_id]


def test_choices_is_the_old_name_of_cloze(model, tokenizer, examples):
    old = evaluate_tasks(model, tokenizer, {"t": examples}, scoring="choices", progress=False)
    new = evaluate_tasks(model, tokenizer, {"t": examples}, scoring="cloze", progress=False)
    assert old == new and new["scoring"] == "cloze"


def test_long_prompts_are_cut_as_training_cuts_them_and_counted(model, tokenizer, examples, caplog):
    import logging

    from dynmole.errors import DynmoleError

    words = ("the sky is blue . " * 200 + "Question : what is hot ? Answer :").split()
    long = Example("t/long", "t", " ".join(words), (" ice", " fire"), 1)
    spans = []  # tokens each forward attends over (prefix + suffix with the shared context)
    hook = model.register_forward_pre_hook(lambda m, a, kw: spans.append(kw["attention_mask"].shape[1]),
                                           with_kwargs=True)
    try:
        with caplog.at_level(logging.WARNING, logger="dynmole.evaluation.engines"):
            result = evaluate_tasks(model, tokenizer, {"t": [long, *examples]}, batch_size=4, progress=False)
        assert max(spans) <= 64  # the model's max_position_embeddings (1000+ tokens without the cut)
        spans.clear()
        cut = score_choices(model, tokenizer, [long], progress=False, max_length=16)
        assert max(spans) <= 16
    finally:
        hook.remove()
    assert result["tasks"]["t"]["truncated"] == 1 and result["tasks"]["t"]["n"] == len(examples) + 1
    assert "t: the prompts of 1 of 7 examples were cut from the left to fit 64 tokens" in caplog.text
    # BOS, then the prompt's last 14 words, then the whole one-token choice: 16 tokens, as encode_example cuts
    kept = Example("t/kept", "t", " ".join(words[-14:]), long.choices, 1)
    whole = score_choices(model, tokenizer, [kept], progress=False)
    assert [s["truncated"] for s in cut] == [True, True] and not any(s["truncated"] for s in whole)
    torch.testing.assert_close([s["loglik"] for s in cut], [s["loglik"] for s in whole])
    with pytest.raises(DynmoleError, match=r"example t/long: choice 1 has 3 tokens, too many for the 3-token limit"):
        score_choices(model, tokenizer, [Example("t/long", "t", long.prompt, (" ice", " sky is blue"), 1)],
                      progress=False, max_length=3)
