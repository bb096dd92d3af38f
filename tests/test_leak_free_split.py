import itertools
import random

import pytest

from dynmole.data import Example, id_fraction
from dynmole.data.leakage import eval_leaks, leak_report, leaked_eval_ids
from dynmole.data.overlap import contained_answer_pairs, jaccard, near_duplicate_pairs, prompt_tokens, union_groups
from dynmole.data.split import LEAK_FREE_SPLIT, LEGACY_SPLIT, split_by_hash, split_description
from dynmole.errors import DynmoleError

QUESTION = "\nQuestion: Who or what fills the blank (_)?\nAnswer:"


def _twin(i, trigger, label):
    prompt = f"Sarah was a better surgeon than Maria so _ always got the {trigger} cases.{QUESTION}"
    return Example(f"w/{i}", "winogrande", prompt,
                   (" Sarah", " Maria"), label, ("Sarah", "Maria"))


def _ids(side):
    return {e.id for e in side}


def _straddling_pair():
    """Two row indices whose ids fall on opposite sides of 0.5 (so the legacy split separates them)."""
    return next((i, j) for i, j in itertools.combinations(range(50), 2)
                if (id_fraction(f"w/{i}") < 0.5) != (id_fraction(f"w/{j}") < 0.5))


def test_twins_land_on_one_side_and_legacy_split_separates_them():
    i, j = _straddling_pair()
    twins = [_twin(i, "easier", 1), _twin(j, "harder", 0)]
    other = Example("w/x", "winogrande", f"The cat sat on the mat because _ was tired.{QUESTION}", (" cat", " mat"), 0)
    rows = twins + [other]
    legacy = _ids(split_by_hash(rows, "eval", 0.5, LEGACY_SPLIT))
    assert len(legacy & _ids(twins)) == 1  # version 1 puts the twins on both sides
    for side in ("train", "eval"):
        kept = _ids(split_by_hash(rows, side, 0.5, LEAK_FREE_SPLIT))
        assert _ids(twins) <= kept or not _ids(twins) & kept
    smallest = min(e.id for e in twins)
    expected = "eval" if id_fraction(smallest) < 0.5 else "train"
    assert _ids(twins) <= _ids(split_by_hash(rows, expected, 0.5, LEAK_FREE_SPLIT))


def test_leak_free_split_is_deterministic_and_independent_of_row_order():
    rows = [_twin(i, trigger, i % 2) for i, trigger in enumerate(["easier", "harder", "longer", "shorter"] * 5)]
    rows += [Example(f"h/{i}", "hellaswag", f"Caption {i}: A man walks. He",
                     (" sits down on a bench slowly.", " flies."), 0)
             for i in range(6)]
    first = split_by_hash(rows, "eval", 0.5, LEAK_FREE_SPLIT)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert _ids(split_by_hash(shuffled, "eval", 0.5, LEAK_FREE_SPLIT)) == _ids(first)
    assert split_by_hash(rows, "eval", 0.5, LEAK_FREE_SPLIT) == first
    assert _ids(first) | _ids(split_by_hash(rows, "train", 0.5, LEAK_FREE_SPLIT)) == _ids(rows)


def test_an_answer_inside_another_prompt_joins_its_group():
    i, j = _straddling_pair()
    caption = Example(f"w/{i}", "hellaswag", "Roofing: A man is sitting on a roof. He",
                      (" is ripping old tiles off the roof.", " eats a cake."), 0)
    follower = Example(f"w/{j}", "hellaswag",
                       "Roofing: A man is sitting on a roof. He is ripping old tiles off the roof. He",
                       (" throws them down.", " sings."), 0)
    assert contained_answer_pairs([caption, follower], [caption, follower]) == {(0, 1)}
    evaluation = split_by_hash([caption, follower], "eval", 0.5, LEAK_FREE_SPLIT)
    assert len(evaluation) in (0, 2)
    assert len(split_by_hash([caption, follower], "eval", 0.5, LEGACY_SPLIT)) == 1


def test_same_source_groups_boolq_questions_on_one_passage():
    i, j = _straddling_pair()
    passage = "Ethanol fuel is made from corn."
    first = f"{passage}\nQuestion: does producing it take more energy than it gives?\nAnswer:"
    second = f"{passage}\nQuestion: do cars in brazil run on this kind of alcohol?\nAnswer:"
    rows = [Example(f"w/{i}", "boolq", first, (" no", " yes"), 1),
            Example(f"w/{j}", "boolq", second, (" no", " yes"), 0)]
    assert not near_duplicate_pairs(rows)  # too few shared words: only the source key links them
    assert len(split_by_hash(rows, "eval", 0.5, LEAK_FREE_SPLIT)) in (0, 2)


def test_near_duplicates_need_the_same_options_and_most_words():
    a, b = _twin(0, "easier", 1), _twin(1, "harder", 0)
    c = Example("w/2", "winogrande", a.prompt, (" Anna", " Maria"), 0, ("Anna", "Maria"))
    # 20 shared words (the blank "_" is one), and "easier" / "harder"
    assert jaccard(prompt_tokens(a.prompt), prompt_tokens(b.prompt)) == pytest.approx(20 / 22)
    assert near_duplicate_pairs([a, b, c]) == {(0, 1)}
    assert near_duplicate_pairs([a, b], threshold=0.95) == set()


def test_prefix_filtering_finds_every_similar_pair():
    rng = random.Random(1)
    vocabulary = [f"w{k}" for k in range(30)]
    rows = [Example(f"r/{k}", "t", " ".join(rng.sample(vocabulary, rng.randint(3, 12))), (" a", " b"), 0)
            for k in range(80)]
    sets = [prompt_tokens(e.prompt) for e in rows]
    for threshold in (0.3, 0.6, 0.8):
        pairs = itertools.combinations(range(len(rows)), 2)
        brute = {(i, j) for i, j in pairs if jaccard(sets[i], sets[j]) >= threshold}
        assert near_duplicate_pairs(rows, threshold) == brute


def test_union_groups_is_transitive():
    assert union_groups(5, [(3, 4), (1, 3)]) == [0, 1, 2, 1, 1]


def test_eval_leaks_counts_each_relation():
    a, b = _twin(0, "easier", 1), _twin(1, "harder", 0)
    result = eval_leaks("winogrande", [a], [b])
    assert result.near_duplicates == ("w/1",) and result.contained_answers == () and result.leaked == ("w/1",)


def test_unknown_split_version_is_refused():
    with pytest.raises(DynmoleError, match="split version"):
        split_by_hash([_twin(0, "easier", 1)], "eval", 0.5, 3)
    assert "leak-free split v2" in split_description("boolq", "eval", version=LEAK_FREE_SPLIT)


@pytest.mark.slow
def test_leak_free_split_has_no_leak_on_any_packaged_task():
    report = leak_report()
    assert {task: len(r.leaked) for task, r in report.items()} == {task: 0 for task in report}
    assert all(r.train and r.eval for r in report.values())


@pytest.mark.slow
def test_legacy_split_leaks_the_winogrande_twins():
    # the committed cpu grid's split: 151 of WinoGrande's 615 eval items have their twin in train
    assert len(leaked_eval_ids("winogrande")) == 151
