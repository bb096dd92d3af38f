import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_llama():
    """A 2-layer random Llama built in the test (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed: int = 0, layers: int = 2):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config).eval()

    return build


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer built offline (vocabulary < 96 so it fits ``tiny_llama``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        "question answer yes no true false the a is of what which who sky blue green red sun hot cold "
        "water wet dry fire ice cat dog runs flies bird fish swims : ? . , \n"
    ).split(" ")
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
