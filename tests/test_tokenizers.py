"""Tokenizer training: a byte-level BPE with our special tokens; GPT-2's packaged BPE."""

from __future__ import annotations

import pytest
from conftest import tiny_corpus

from nexttok.errors import NexttokError
from nexttok.tokenizer_train import SPECIALS, gpt2_folder, load_tokenizer, train_bpe


def test_trained_bpe_round_trips_and_has_the_special_tokens(tmp_path):
    text = tiny_corpus(6000)
    tok = train_bpe([text], 400, tmp_path / "tok")
    assert len(tok) == 400
    again = load_tokenizer(str(tmp_path / "tok"))
    ids = again.encode(text, add_special_tokens=False)
    assert again.decode(ids) == text  # byte-level: lossless
    assert len(text) / len(ids) > 1.5  # merges learned: more than one character per token
    assert again.eos_token == again.bos_token == "<|endoftext|>" and again.pad_token == "<|pad|>"
    for s in SPECIALS:
        assert len(again.encode(s, add_special_tokens=False)) == 1
    assert "<|im_start|>assistant" in again.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    # Text never seen in training still encodes (no unknown token): bytes are the fallback.
    assert again.decode(again.encode("naïve ☃", add_special_tokens=False)) == "naïve ☃"


def test_vocab_too_small_for_the_special_tokens_is_a_clear_error():
    with pytest.raises(NexttokError, match="--vocab-size must be at least 261"):
        train_bpe(["some text"], 100)


def test_gpt2_tokenizer_is_the_real_50257_token_bpe(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTTOK_CACHE", str(tmp_path))
    tok = load_tokenizer("gpt2")
    assert len(tok) == 50257 and (gpt2_folder() / "tokenizer.json").is_file()
    assert tok.encode("Hello world", add_special_tokens=False) == [15496, 995]  # GPT-2's own ids


def test_cli_tokenizer_train(tmp_path):
    from typer.testing import CliRunner

    from nexttok.cli import app

    (tmp_path / "a.txt").write_text(tiny_corpus(4000))
    res = CliRunner().invoke(
        app, ["tokenizer", "train", "--data", str(tmp_path), "--vocab-size", "300", "--out", str(tmp_path / "t")]
    )
    assert res.exit_code == 0, res.output
    assert len(load_tokenizer(str(tmp_path / "t"))) == 300
    bad = CliRunner().invoke(
        app, ["tokenizer", "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "u")]
    )
    assert bad.exit_code == 2 and "does not exist" in bad.output
