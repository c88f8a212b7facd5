"""``nexttok serve`` on the packaged default model: its answers are the library's."""

from __future__ import annotations

import pytest
from openai import OpenAI
from serving import running

from nexttok.generate import generate
from nexttok.sampling import SamplingConfig

pytestmark = pytest.mark.integration
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client():
    import nexttok

    with running(lambda: nexttok.load("default")) as (base, _):
        yield OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)


def test_logprobs_equal_the_distribution_and_paris_comes_first(client, default_lm):
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=1, logprobs=20, temperature=0)
    lp = r.choices[0].logprobs
    dist = default_lm.distribution(PROMPT)
    assert lp.tokens[0] == " Paris"
    for row in dist.top(20):
        assert abs(lp.top_logprobs[0][row.text] - row.logprob) < 1e-5


def test_greedy_and_four_seeded_samples_equal_generate(client, default_lm):
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    want = "".join(s.delta for s in generate(default_lm, PROMPT, greedy))
    got = client.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0)
    assert got.choices[0].text == want
    config = SamplingConfig(temperature=0.8, max_new_tokens=12, seed=1234)
    texts = ["", "", "", ""]
    for s in generate(default_lm, PROMPT, config, num_samples=4):
        texts[s.sample] += s.delta
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0.8, seed=1234, n=4)
    assert [c.text for c in r.choices] == texts


def test_echo_scores_a_text_as_teacher_forcing(client, default_lm):
    text = "The quick brown fox jumps over the lazy dog."
    r = client.completions.create(model="default", prompt=text, max_tokens=0, echo=True, logprobs=1)
    ids = default_lm.encode(text)
    total = sum(r.choices[0].logprobs.token_logprobs[1:])
    assert abs(total - default_lm.continuation_logprob(ids[:1], ids[1:])) < 1e-3


def test_chat_answers_through_the_template(client, default_lm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = default_lm.encode_chat(messages)
    want = "".join(s.delta for s in generate(default_lm, ids, SamplingConfig(temperature=0, max_new_tokens=20)))
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want and "Paris" in want
