"""Tiny seeded models, a tokenizer trained in the test session, and real pairs.

Nothing here downloads: models are built from configs with seeded random weights and
the tokenizer is trained on the bundled HH-RLHF text.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from graddyn.data.collate import tokenize_sequence
from graddyn.data.pairs import load_pairs
from graddyn.models import disable_dropout, tiny_neox_config
from graddyn.train.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is many times faster on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def real_pairs():
    return load_pairs().pairs[:64]


@pytest.fixture(scope="session")
def tokenizer(real_pairs):
    texts = [p.prompt + p.chosen for p in real_pairs] + [p.rejected for p in real_pairs]
    return train_bpe_tokenizer(texts, vocab_size=400)


def make_tiny_model(vocab_size: int, dtype=torch.float64, seed: int = 0, **overrides):
    """A 2-layer GPT-NeoX with seeded random weights, dropout off, in eval mode."""
    torch.manual_seed(seed)
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    settings.update(overrides)
    model = GPTNeoXForCausalLM(tiny_neox_config(vocab_size, **settings))
    disable_dropout(model)
    return model.to(dtype).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_sequences(tokenizer, real_pairs):
    """Chosen and rejected sequences of four real pairs, kept short."""
    out = []
    for pair in real_pairs[:4]:
        out.append(tokenize_sequence(tokenizer, pair.prompt, pair.chosen, 24, 12))
        out.append(tokenize_sequence(tokenizer, pair.prompt, pair.rejected, 24, 12))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny float32 GPT-NeoX and its tokenizer saved like any Hugging Face model."""
    path = tmp_path_factory.mktemp("tiny-model")
    model = make_tiny_model(len(tokenizer), dtype=torch.float32)
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = model.config.bos_token_id = model.config.pad_token_id = eos
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
