"""Rendering records through the chat template, and which tokens the labels train."""

from __future__ import annotations

import pytest

from nexttok.data.chat import DEFAULT_CHATML, IGNORE, Renderer, ensure_chat_template
from nexttok.data.formats import Record
from nexttok.errors import NexttokError

CHAT = Record(
    "t:1",
    (
        {"role": "system", "content": "Answer with a title."},
        {"role": "user", "content": "Which play?"},
        {"role": "assistant", "content": "Hamlet"},
        {"role": "user", "content": "And this one?"},
        {"role": "assistant", "content": "Macbeth, I think."},
    ),
)


def trained_text(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])


def test_assistant_turns_are_trained_and_nothing_else(tiny_lm):
    tok = tiny_lm.tokenizer
    ex = Renderer(tok, "assistant").render(CHAT)
    assert trained_text(tok, ex) == "Hamlet<|im_end|>Macbeth, I think.<|im_end|>"
    # labels equal the ids where trained: training targets are the tokens themselves (not shifted)
    assert all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels, strict=True))
    assert ex.n_bytes == len(b"Hamlet<|im_end|>Macbeth, I think.<|im_end|>")


def test_completion_is_the_default_and_trains_assistant_turns(tiny_lm):
    tok = tiny_lm.tokenizer
    assert Renderer(tok).render(CHAT).labels == Renderer(tok, "assistant").render(CHAT).labels


def test_last_trains_only_the_final_turn(tiny_lm):
    tok = tiny_lm.tokenizer
    assert trained_text(tok, Renderer(tok, "last").render(CHAT)) == "Macbeth, I think.<|im_end|>"


def test_all_trains_every_token_but_the_first(tiny_lm):
    tok = tiny_lm.tokenizer
    ex = Renderer(tok, "all").render(CHAT)
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]
    assert ex.input_ids == tok.apply_chat_template(list(CHAT.messages), tokenize=True, return_dict=False)


def test_text_records_train_every_token_and_end_with_eos(tiny_lm):
    tok = tiny_lm.tokenizer
    ex = Renderer(tok, "last").render(Record("t:2", text="To be, or not to be"))
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels[1:] == ex.input_ids[1:]


@pytest.mark.integration
def test_masks_on_the_default_model_template(default_lm):
    """SmolLM2's template injects a system prompt; the prefix diff must still find the turns."""
    tok = default_lm.tokenizer
    rec = Record("d:1", CHAT.messages[1:])
    assert trained_text(tok, Renderer(tok).render(rec)) == "Hamlet<|im_end|>Macbeth, I think.<|im_end|>"


def test_too_long_records_are_dropped_or_truncated(tiny_lm):
    tok = tiny_lm.tokenizer
    short = Record("s:1", ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}))
    n = len(Renderer(tok).render(CHAT))
    dropped = Renderer(tok, max_length=n - 1).render_all([CHAT, short])
    assert len(dropped.examples) == 1 and sum(dropped.dropped.values()) == 1
    assert f"longer than {n - 1} tokens" in dropped.summary()
    cut = Renderer(tok, max_length=n - 1, truncate=True).render_all([CHAT, short])
    assert len(cut.examples) == 2 and cut.truncated == 1 and len(cut.examples[0]) == n - 1


def test_truncation_that_leaves_nothing_trained_drops_the_record(tiny_lm):
    tok = tiny_lm.tokenizer
    first = Renderer(tok).render(CHAT)
    start = next(i for i, lab in enumerate(first.labels) if lab != IGNORE)
    out = Renderer(tok, max_length=start, truncate=True)
    with pytest.raises(NexttokError, match="every record was dropped.*no trained tokens"):
        out.render_all([CHAT])


def test_bad_train_on_names_the_choices(tiny_lm):
    with pytest.raises(NexttokError, match="--train-on must be one of completion, assistant, all, last"):
        Renderer(tiny_lm.tokenizer, "prompt")


def test_default_chatml_added_to_a_tokenizer_without_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["plain text only " * 50], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    before = len(tok)
    assert ensure_chat_template(tok) == 2
    assert len(tok) == before + 2 and tok.chat_template == DEFAULT_CHATML
    ids = Renderer(tok).render(Record("x:1", CHAT.messages[1:3])).input_ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids  # one special token, not split into pieces
    assert ensure_chat_template(tok) == 0  # idempotent
