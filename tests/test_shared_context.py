"""``score_choices(share_context=True)`` (the default) runs each context once, with the KV cache,
and gives the log-likelihoods of the full sequences."""

import pytest
import torch

from dynmole import MoLEConfig, get_mole_model
from dynmole.adapters import adapt_model
from dynmole.data import Example
from dynmole.evaluation import score_choices

EXAMPLES = [
    Example("s/0", "s", "question : which bird flies ? answer :",
            (" the blue bird", " a fish", " the cat runs", " ice"), 0),
    Example("s/1", "s", "fire is", (" hot", " cold and wet"), 0),
    Example("s/2", "s", "what is the sky ? the sky is blue and the sun is hot . what is",
            (" water", " the sun", " a dog"), 1),
    Example("s/3", "s", "", (" yes", " no no"), 0),  # an empty prompt: the context is one token
    Example("s/4", "s", "the dog", (" runs", " swims", " flies"), 0),
    Example("s/5", "s", "water is wet ? answer :", (" yes", " no"), 0),  # one-token answers share a suffix row
]


def _scores(model, tokenizer, share, batch_size=4, **kwargs):
    return [s["loglik"] for s in score_choices(model, tokenizer, EXAMPLES, batch_size, False, share_context=share,
                                               **kwargs)]


def _positions(model, tokenizer, share, batch_size):
    """Token positions the decoder ran for the scoring, and its log-likelihoods."""
    seen = []
    embed = model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    try:
        scores = _scores(model, tokenizer, share, batch_size)
    finally:
        hook.remove()
    return sum(seen), scores


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_context_equals_full_sequences(tiny_llama, tiny_tokenizer, batch_size):
    model = tiny_llama()
    full_positions, full = _positions(model, tiny_tokenizer, False, batch_size)
    shared_positions, shared = _positions(model, tiny_tokenizer, True, batch_size)
    assert shared == pytest.approx(full, abs=1e-5)
    assert shared_positions < full_positions  # the shared path ran, on fewer tokens


@pytest.mark.parametrize("method", ["dynmole", "ldmole", "lora"])
def test_adapted_models_score_alike(tiny_llama, tiny_tokenizer, method):
    torch.manual_seed(0)
    model = adapt_model(tiny_llama(), method, MoLEConfig(r=4, alpha=8, lambda_hidden=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    assert _scores(model, tiny_tokenizer, True) == pytest.approx(_scores(model, tiny_tokenizer, False), abs=1e-5)


def test_routing_statistics_count_every_choice_sequence(tiny_llama, tiny_tokenizer):
    """While routing statistics are collected, every pair still runs as one sequence."""
    model = get_mole_model(tiny_llama(), MoLEConfig(r=4, alpha=8))
    summaries = {}
    for share in (False, True):
        with model.collect_routing_stats() as stats:
            _scores(model, tiny_tokenizer, share)
        summaries[share] = stats.summary()
    assert summaries[True] == summaries[False]


def test_sliding_window_shorter_than_the_inputs_uses_full_sequences(tiny_llama, tiny_tokenizer):
    model = tiny_llama()
    model.config.sliding_window = 4
    full_positions, full = _positions(model, tiny_tokenizer, False, 4)
    assert _positions(model, tiny_tokenizer, True, 4) == (full_positions, full)
