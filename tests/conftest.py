"""Fixtures: a tiny random-weight Llama with a BPE tokenizer trained here on a few KB of text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def tiny_corpus(n_chars: int = 8000) -> str:
    from nexttok.assets import shakespeare_files

    return shakespeare_files()[0].read_text(encoding="utf-8", errors="replace")[5000 : 5000 + n_chars]


def make_tiny_tokenizer(folder: Path, vocab_size: int = 384):
    """A byte-level BPE trained on a few KB, saved as an HF tokenizer folder with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([tiny_corpus()], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random-init Llama (2 layers, hidden 64) with its tokenizer, as a standard HF folder."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform predictions; sharper logits make ranks and samples meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    import nexttok

    return nexttok.load(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A tiny BPE tokenizer (shared by the training, checkpoint and data tests)."""
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def ids(tok):
    """The tiny corpus as token ids, shape (N,)."""
    return torch.tensor(tok.encode(tiny_corpus(8000)))


@pytest.fixture(scope="session")
def default_lm():
    """The real packaged default model (integration tests only)."""
    import nexttok

    return nexttok.load("default")


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # Tests never reach the hub: anything that tries fails fast instead of waiting on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("NEXTTOK_MODEL", raising=False)
    yield


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every test runs on the CPU unless it asks for a device (tests/test_device.py), also on a GPU machine. Set at
# import, not in the autouse fixture: session fixtures (tiny_lm) are made before function-scoped ones. A test
# that changes it through monkeypatch gets this value back afterwards.
os.environ["NEXTTOK_DEVICE"] = "cpu"
