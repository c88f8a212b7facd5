"""Distribution: a proper probability distribution over the whole vocabulary, checked against an
independent reference (full HF forward over every position, softmax, topk)."""

import math

import pytest
import torch

from nexttok.errors import NexttokError

PROMPTS = ["ROMEO: what light", "the king", "x"]


def reference_probs(lm, ids):
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits  # (1, T, V): every position, as a user would write it
    return logits[0, -1].softmax(-1)


def test_probs_sum_to_one_over_the_whole_vocabulary(tiny_lm):
    d = tiny_lm.distribution("the king")
    assert d.probs.shape == (tiny_lm.vocab_size,)
    assert abs(float(d.probs.double().sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_top_k_equals_reference(tiny_lm, prompt):
    ids = tiny_lm.encode(prompt)
    ref = reference_probs(tiny_lm, ids)
    values, idx = ref.topk(10)
    rows = tiny_lm.distribution(prompt).top(10)
    assert [r.id for r in rows] == idx.tolist()
    assert [r.rank for r in rows] == list(range(1, 11))
    for r, v in zip(rows, values.tolist(), strict=True):
        assert r.prob == pytest.approx(v, abs=1e-6)
        assert r.logprob == pytest.approx(math.log(v), abs=1e-4)


def test_prob_and_rank_agree_with_the_table(tiny_lm):
    d = tiny_lm.distribution("the king")
    for row in d.top(20):
        tp = d.prob(row.id)
        assert tp.prob == pytest.approx(row.prob, abs=1e-9)
        assert tp.rank == row.rank == d.rank(row.id)
        # by text too, when the text encodes back to the same single token
        if tiny_lm.token_ids(row.text) == [row.id]:
            assert d.prob(row.text).rank == row.rank


def test_multi_token_word_first_token_and_chain_rule(tiny_lm):
    d = tiny_lm.distribution("the king")
    word = " understanding"
    ids = tiny_lm.token_ids(word)
    assert len(ids) > 1
    tp = d.prob(word)
    assert tp.multi_token and tp.ids == ids
    assert tp.prob == pytest.approx(float(d.probs[ids[0]]))
    # chain rule, computed independently one step at a time
    ctx, expected = list(d.context_ids), 0.0
    for t in ids:
        expected += math.log(float(reference_probs(tiny_lm, ctx)[t]))
        ctx.append(t)
    assert tp.word_logprob == pytest.approx(expected, abs=1e-4)
    assert tp.word_prob < tp.prob


def test_entropy_rises_with_temperature(tiny_lm):
    d = tiny_lm.distribution("the king")
    ents = [d.with_temperature(t).entropy for t in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(ents, ents[1:], strict=False))
    assert ents[-1] <= math.log(d.vocab_size) + 1e-6
    assert d.entropy_bits == pytest.approx(d.entropy / math.log(2))
    # entropy by definition, in float64
    p = d.probs.double()
    assert d.entropy == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)


def test_temperature_keeps_ranking_and_changes_spread(tiny_lm):
    d = tiny_lm.distribution("the king")
    cold, hot = d.with_temperature(0.5), d.with_temperature(2.0)
    assert [r.id for r in cold.top(5)] == [r.id for r in hot.top(5)]
    assert cold.top(1)[0].prob > d.top(1)[0].prob > hot.top(1)[0].prob


def test_mass_cover(tiny_lm):
    d = tiny_lm.distribution("the king")
    n = d.mass_cover(0.9)
    sorted_p = torch.sort(d.probs, descending=True).values
    assert float(sorted_p[:n].sum()) >= 0.9 > float(sorted_p[: n - 1].sum())


def test_top_is_clamped_and_validated(tiny_lm):
    d = tiny_lm.distribution("x")
    assert len(d.top(10**6)) == d.vocab_size
    with pytest.raises(NexttokError, match="at least 1"):
        d.top(0)


def test_logits_only_at_the_last_position(tiny_lm):

    calls = []
    heads = [tiny_lm.model.lm_head, tiny_lm.weights.inference_model().lm_head]  # whichever runs: the CPU copy
    hooks = [h.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape))) for h in heads]
    try:
        tiny_lm.distribution("ROMEO: what light through yonder window breaks")
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [(1, 1, tiny_lm.vocab_size)]


def test_empty_prompt_starts_from_bos(tiny_lm):
    d = tiny_lm.distribution("")
    assert d.context_ids == [tiny_lm.tokenizer.bos_token_id]


def test_bad_tokens(tiny_lm):
    d = tiny_lm.distribution("x")
    with pytest.raises(NexttokError, match="cannot encode"):
        d.prob("")
    with pytest.raises(NexttokError, match="outside the vocabulary"):
        d.prob(10**7)
    with pytest.raises(NexttokError, match="temperature 0"):
        d.with_temperature(0)


def test_chat_prompt_uses_the_template(tiny_lm):
    ids = tiny_lm.encode("hello", chat=True)
    text = tiny_lm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nhello<|im_end|>") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.integration
def test_default_model_paris(default_lm):
    d = default_lm.distribution("The capital of France is")
    top = d.top(1)[0]
    assert top.text == " Paris"
    assert 0.5 <= top.prob <= 0.95
    assert d.vocab_size == 49152
    assert d.prob(" chemistry").rank > 100
