"""``nexttok serve`` on a tiny model, through the official openai client and plain HTTP: the answers equal
the library's, requests batch together without changing each other's tokens, and bad input is a 400 that
leaves the scheduler sound."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from importlib.resources import files

import httpx
import jsonschema
import pytest
import torch
from openai import APIStatusError, AsyncOpenAI, OpenAI
from serving import running

from nexttok.generate import generate
from nexttok.sampling import SamplingConfig

PROMPT = "To be, or not to be"
NAME = "tiny"


def _load(folder):
    import nexttok

    return lambda: nexttok.load(str(folder))


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running(_load(tiny_model_dir), served_model_name=NAME, max_batch=16, max_queue=64) as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def _post(server, path: str, body) -> httpx.Response:
    return httpx.post(f"{server[0]}{path}", json=body, timeout=60)


def _steps(lm, prompt, config, n=1):
    out: dict[int, list] = {}
    for s in generate(lm, prompt, config, num_samples=n, alternatives=5):
        out.setdefault(s.sample, []).append(s)
    return [out[i] for i in range(n)]


def _text(steps) -> str:
    return "".join(s.delta for s in steps)


# --- what the answers say --------------------------------------------------------------------------------


def test_models_lists_the_served_name_with_context_and_vocabulary(client, tiny_lm):
    (card,) = client.models.list().data
    assert card.id == NAME
    assert card.model_extra["context_length"] == tiny_lm.context_length
    assert card.model_extra["vocab_size"] == tiny_lm.vocab_size


def test_completion_logprobs_are_the_models_distribution(client, tiny_lm):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, logprobs=5, temperature=0)
    lp = r.choices[0].logprobs
    dist = tiny_lm.distribution(PROMPT)
    best = dist.top(5)
    assert lp.tokens[0] == best[0].text
    assert abs(lp.token_logprobs[0] - best[0].logprob) < 1e-5
    for row in best:
        assert abs(lp.top_logprobs[0][row.text] - row.logprob) < 1e-5
    assert r.usage.prompt_tokens == len(tiny_lm.encode(PROMPT)) and r.usage.completion_tokens == 1


def test_greedy_completion_equals_generate(client, tiny_lm):
    config = SamplingConfig(temperature=0, max_new_tokens=12, ignore_eos=True)
    (steps,) = _steps(tiny_lm, PROMPT, config)
    r = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        logprobs=2,
        extra_body={"nexttok": {"ignore_eos": True}},
    )
    assert r.choices[0].text == _text(steps)
    assert r.choices[0].finish_reason == "length"
    got = r.choices[0].logprobs.token_logprobs
    assert all(abs(a - s.logprob) < 1e-4 for a, s in zip(got, steps, strict=True))
    offsets = r.choices[0].logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_n_samples_equal_generate_num_samples_with_the_seed(client, tiny_lm):
    config = SamplingConfig(temperature=1.2, top_k=40, max_new_tokens=8, seed=7, ignore_eos=True)
    want = [_text(s) for s in _steps(tiny_lm, PROMPT, config, n=4)]
    r = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=8, temperature=1.2, seed=7, n=4,
        extra_body={"top_k": 40, "nexttok": {"ignore_eos": True}},
    )  # fmt: skip
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    assert len(set(want)) > 1  # four different samples, not one four times
    seeds = [c["seed"] for c in r.model_extra["nexttok"]["choices"]]
    assert seeds == [7, 8, 9, 10]


def test_stream_joins_to_the_same_text_and_logprobs(client):
    args = dict(
        model=NAME, prompt=PROMPT, max_tokens=10, seed=3, logprobs=3, extra_body={"nexttok": {"ignore_eos": True}}
    )
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    lps = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert text == whole.choices[0].text
    assert lps == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-6)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_shape_logprobs_and_stream(client, tiny_lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"}]
    ids = tiny_lm.encode_chat(messages)
    config = SamplingConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
    (steps,) = _steps(tiny_lm, ids, config)
    args = dict(
        model=NAME, messages=messages, max_tokens=6, temperature=0, extra_body={"nexttok": {"ignore_eos": True}}
    )
    r = client.chat.completions.create(**args, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == _text(steps)
    content = choice.logprobs.content
    assert [c.token for c in content] == [s.text for s in steps]
    assert all(abs(c.logprob - s.logprob) < 1e-4 for c, s in zip(content, steps, strict=True))
    assert all(
        len(c.top_logprobs) == 3 and bytes(c.bytes) == tiny_lm.token_bytes(s.id)
        for c, s in zip(content, steps, strict=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True))
    assert streamed == choice.message.content


def test_async_client_gets_the_same_answers(server, client):
    args = dict(model=NAME, prompt=PROMPT, max_tokens=6, seed=11)
    want = client.completions.create(**args).choices[0].text

    async def ask():
        async with AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(c.completions.create(**args) for _ in range(3)))

    assert [r.choices[0].text for r in asyncio.run(ask())] == [want] * 3


def test_echo_with_no_new_tokens_scores_the_text_as_teacher_forcing(client, tiny_lm):
    text = "Whether 'tis nobler in the mind to suffer"
    r = client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = tiny_lm.encode(text)
    assert r.choices[0].text == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids)
    forced = tiny_lm.continuation_logprob(ids[:1], ids[1:])
    assert abs(sum(lp.token_logprobs[1:]) - forced) < 1e-3
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])


def test_chat_prompt_logprobs_extension(client, tiny_lm):
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=1, extra_body={"nexttok": {"prompt_logprobs": 2}}
    )
    rows = r.model_extra["nexttok"]["choices"][0]["prompt_logprobs"]
    ids = tiny_lm.encode_chat(messages)
    assert [row["id"] for row in rows] == ids and rows[0]["logprob"] is None
    assert abs(sum(row["logprob"] for row in rows[1:]) - tiny_lm.continuation_logprob(ids[:1], ids[1:])) < 1e-3


def test_trace_extension_records_every_stage_and_the_draw(client):
    r = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=3, temperature=0.8, top_p=0.9, seed=5,
        extra_body={"top_k": 20, "min_p": 0.01, "nexttok": {"trace": True}},
    )  # fmt: skip
    ext = r.model_extra["nexttok"]
    assert ext["sampling"]["top_k"] == 20 and ext["sampling_source"]["top_k"] == "request"
    assert ext["sampling_source"]["typical_p"] == "default"
    for token in ext["choices"][0]["tokens"]:
        names = [s["name"] for s in token["stages"]]
        assert names == ["model", "temperature", "top_k", "top_p", "min_p"]
        assert 0 <= token["uniform"] < 1 and token["rank"] >= 1 and token["entropy"] > 0
        survivors = [s["survivors"] for s in token["stages"]]
        assert survivors == sorted(survivors, reverse=True) and survivors[2] <= 20
        assert all(0 < s["token_prob"] <= 1 for s in token["stages"])
        assert token["stages"][-1]["token_prob"] == pytest.approx(token["sampled_prob"], rel=1e-4)


def test_next_token_is_predict_json(server, tiny_model_dir, tiny_lm):
    from typer.testing import CliRunner

    from nexttok.cli import app

    schema = json.loads(files("nexttok").joinpath("schemas/predict.schema.json").read_text())
    body = {"prompt": PROMPT, "top": 5, "tokens": [" the", "be"], "temperatures": [0.5, 1.0]}
    got = _post(server, "/v1/next_token", body)
    assert got.status_code == 200, got.text
    jsonschema.validate(got.json(), schema)
    args = ["predict", PROMPT, "--json", "-k", "5", "-t", " the", "-t", "be", "--temperatures", "0.5,1"]
    cli = CliRunner().invoke(app, [*args, "--model", str(tiny_model_dir)])
    want = json.loads(cli.stdout)
    for g, w in zip(got.json()["distributions"], want["distributions"], strict=True):
        assert [r["id"] for r in g["top"]] == [r["id"] for r in w["top"]]
        assert g["entropy_nats"] == pytest.approx(w["entropy_nats"], abs=1e-5)
        assert [t["word_prob"] for t in g["tokens"]] == pytest.approx([t["word_prob"] for t in w["tokens"]], abs=1e-6)
    chat = _post(server, "/v1/next_token", {"messages": [{"role": "user", "content": "hi"}]})
    jsonschema.validate(chat.json(), schema)
    assert chat.json()["chat"] is True


def test_tokenize_and_detokenize(server, tiny_lm):
    r = _post(server, "/tokenize", {"prompt": PROMPT}).json()
    ids = tiny_lm.encode(PROMPT)
    assert [t["id"] for t in r["tokens"]] == ids and r["count"] == len(ids)
    assert "".join(PROMPT[t["start"] : t["end"]] for t in r["tokens"]) == PROMPT
    assert b"".join(bytes(t["bytes"]) for t in r["tokens"]) == PROMPT.encode()
    back = _post(server, "/detokenize", {"tokens": ids}).json()
    assert back["text"] == PROMPT and [t["id"] for t in back["tokens"]] == ids


# --- rows of different requests together ----------------------------------------------------------------------


def test_concurrent_requests_each_get_what_they_get_alone(client):
    prompts = [PROMPT[: 3 + 2 * i] + " x" * i for i in range(8)]
    asks = [dict(model=NAME, prompt=p, max_tokens=4 + 2 * i, seed=100 + i, logprobs=1) for i, p in enumerate(prompts)]
    alone = [client.completions.create(**a) for a in asks]
    together: list = [None] * len(asks)

    def ask(i):
        together[i] = client.completions.create(**asks[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for a, b in zip(alone, together, strict=True):
        assert b.choices[0].text == a.choices[0].text
        assert b.choices[0].logprobs.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-4)


def test_batched_steps_really_batch(server, client):
    """While one long request decodes, others join it: some decoder steps run several rows."""
    metrics = server[1].state.nexttok.metrics
    before = metrics.batch_rows.collect()[0].samples
    multi = lambda samples: sum(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")  # noqa: E731
    total = lambda samples: next(s.value for s in samples if s.name.endswith("_count"))  # noqa: E731
    threads = [
        threading.Thread(target=client.completions.create, kwargs=dict(model=NAME, prompt=PROMPT, max_tokens=30))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = metrics.batch_rows.collect()[0].samples
    steps = total(after) - total(before)
    one_row = multi(after) - multi(before)
    assert steps < 4 * 30 - 30 and one_row < steps  # fewer steps than tokens: rows shared steps


def test_a_client_that_goes_away_frees_its_row(server):
    scheduler = server[1].state.nexttok.served().scheduler
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 200, "stream": True, "nexttok": {"ignore_eos": True}}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert scheduler.busy_rows == 1
    end = time.monotonic() + 10
    while scheduler.busy_rows and time.monotonic() < end:
        time.sleep(0.02)
    assert scheduler.busy_rows == 0 and not scheduler.running


def test_a_seed_reproduces_across_restarts(tiny_model_dir):
    texts = []
    for _ in range(2):
        with running(_load(tiny_model_dir), served_model_name=NAME) as (base, _):
            c = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
            texts.append(c.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, seed=42).choices[0].text)
    assert texts[0] == texts[1]


# --- bad input ----------------------------------------------------------------------------------------------

BAD = [
    ({"model": NAME, "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"model": NAME, "prompt": PROMPT, "top_k": -3}, 400, "top_k"),
    ({"model": NAME, "prompt": PROMPT, "min_p": 1.5}, 400, "min_p"),
    ({"model": NAME, "prompt": PROMPT, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": NAME, "prompt": PROMPT, "logprobs": 21}, 400, "logprobs"),
    ({"model": NAME, "prompt": PROMPT, "logprobs": -1}, 400, "logprobs"),
    ({"model": NAME, "prompt": PROMPT, "n": 17}, 400, "n"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "word " * 400}, 400, "prompt"),
    ({"model": NAME, "prompt": [999_999]}, 400, "prompt"),
    ({"model": NAME, "prompt": PROMPT, "logit_bias": {"x y z": 5}}, 400, "logit_bias"),
    ({"model": NAME, "prompt": PROMPT, "stop": [""]}, 400, "stop"),
    ({"model": NAME, "prompt": PROMPT, "seed": -1}, 400, "seed"),
    ({"model": NAME, "prompt": PROMPT, "colour": "red"}, 400, "colour"),
    ({"model": NAME, "prompt": PROMPT, "suffix": "!"}, 400, "suffix"),
    ({"model": NAME, "prompt": PROMPT, "nexttok": {"tracing": True}}, 400, "nexttok.tracing"),
    ({"prompt": PROMPT}, 400, "model"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
]
BAD_CHAT = [
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": NAME, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json"}}, 400,
     "response_format"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
]  # fmt: skip


def _good(server):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 5, "seed": 9, "logprobs": 2}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize(("body", "status", "param"), BAD + BAD_CHAT)
def test_bad_input_is_an_openai_error_between_two_good_answers(server, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    first = _good(server)
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"
    assert _good(server) == first


def test_malformed_json_and_a_body_over_the_limit(tiny_model_dir):
    with running(_load(tiny_model_dir), served_model_name=NAME, max_body=2000) as (base, _):
        first = _good([base])
        r = httpx.post(f"{base}/v1/completions", content=b'{"model": "tiny", "prompt": ', timeout=30,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        big = httpx.post(f"{base}/v1/completions", json={"model": NAME, "prompt": "x" * 5000}, timeout=30)
        assert big.status_code == 413 and "--max-body" in big.json()["error"]["message"]
        assert _good([base]) == first


def test_api_key(tiny_model_dir):
    with running(_load(tiny_model_dir), served_model_name=NAME, api_key="sekret") as (base, _):
        with pytest.raises(APIStatusError) as e:
            OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert httpx.post(f"{base}/v1/completions", json={"model": NAME, "prompt": "x"}).status_code == 401
        good = OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].text is not None


def test_a_full_queue_is_429_with_retry_after_and_a_retry_succeeds(tiny_model_dir):
    with running(_load(tiny_model_dir), served_model_name=NAME, max_batch=1, max_queue=1) as (base, app):
        gate = threading.Event()
        app.state.nexttok.served().scheduler.call(lambda: gate.wait(30))  # the model's thread is busy: requests queue
        waiting: list = []
        ask = {"model": NAME, "prompt": PROMPT, "max_tokens": 3}
        first = threading.Thread(target=lambda: waiting.append(httpx.post(f"{base}/v1/completions", json=ask)))
        first.start()
        end = time.monotonic() + 10
        while not app.state.nexttok.served().scheduler.waiting and time.monotonic() < end:
            time.sleep(0.01)
        r = httpx.post(f"{base}/v1/completions", json=ask, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_exceeded" and "--max-queue 1" in r.json()["error"]["message"]
        gate.set()
        first.join(60)
        assert waiting[0].status_code == 200
        assert httpx.post(f"{base}/v1/completions", json=ask, timeout=30).status_code == 200


def test_health_is_503_until_the_model_is_loaded(tiny_model_dir):
    gate = threading.Event()
    load = _load(tiny_model_dir)

    def slow():
        gate.wait(30)
        return load()

    with running(slow, wait=False, served_model_name=NAME) as (base, _):
        r = httpx.get(f"{base}/health", timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert httpx.post(f"{base}/v1/completions", json={"model": NAME, "prompt": "x"}).status_code == 503
        gate.set()
        from serving import wait_healthy

        wait_healthy(base)


def test_metrics_count_requests_tokens_and_latency(server, client):
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3)
    text = httpx.get(f"{server[0]}/metrics").text
    assert 'nexttok_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("nexttok_prompt_tokens_total", "nexttok_generated_tokens_total", "nexttok_queue_depth",
                 "nexttok_running_rows", "nexttok_time_to_first_token_seconds_bucket",
                 "nexttok_inter_token_seconds_bucket", "nexttok_batch_rows_bucket"):  # fmt: skip
        assert name in text
    generated = next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("nexttok_generated_tokens_total")
    )
    assert generated >= 3 and not math.isnan(generated)


def test_the_effective_settings_name_the_generation_config(tiny_model_dir, tmp_path):
    """A value the model's generation config sets fills an omitted field, and the response says so."""
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_model_dir, folder)
    cfg = GenerationConfig.from_pretrained(folder)
    cfg.temperature, cfg.top_p, cfg.do_sample = 0.6, 0.9, True
    cfg.save_pretrained(folder)
    with running(_load(folder), served_model_name=NAME) as (base, _):
        r = httpx.post(f"{base}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1, "top_p": 0.5})
        ext = r.json()["nexttok"]
        assert ext["sampling"]["temperature"] == 0.6 and ext["sampling_source"]["temperature"] == "generation_config"
        assert ext["sampling"]["top_p"] == 0.5 and ext["sampling_source"]["top_p"] == "request"


def test_no_stage_disagrees_with_the_library(client, tiny_lm):
    """A request with penalties and bias draws what generate() draws with the same settings and seed."""
    config = SamplingConfig(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
                            logit_bias={" the": -5.0}, max_new_tokens=10, seed=77, ignore_eos=True)  # fmt: skip
    (steps,) = _steps(tiny_lm, PROMPT, config)
    r = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=10, temperature=0.9, presence_penalty=0.5, frequency_penalty=0.2,
        seed=77, logit_bias={" the": -5.0}, extra_body={"repetition_penalty": 1.3, "nexttok": {"ignore_eos": True}},
    )  # fmt: skip
    assert r.choices[0].text == _text(steps)
    assert torch.tensor([s.uniform for s in steps]).tolist() == [
        t["uniform"] for t in r.model_extra["nexttok"]["choices"][0]["tokens"]
    ]


def test_echo_streams_the_prompt_first_with_or_without_logprobs(client):
    for logprobs in (None, 2):
        args = dict(model=NAME, prompt=PROMPT, max_tokens=3, seed=2, echo=True, logprobs=logprobs)
        whole = client.completions.create(**args)
        chunks = list(client.completions.create(**args, stream=True))
        assert chunks[0].choices[0].text == PROMPT
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert whole.choices[0].text.startswith(PROMPT)
        assert (whole.choices[0].logprobs is None) == (logprobs is None)
        if logprobs:
            streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
            assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-6, nan_ok=True)


def test_chat_streams_prompt_logprobs_before_the_answer(client):
    messages = [{"role": "user", "content": "Hello there"}]
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, stream=True,
                                                 extra_body={"nexttok": {"prompt_logprobs": 1}}))  # fmt: skip
    with_prompt = [c for c in chunks if (c.model_extra.get("nexttok") or {}).get("prompt_logprobs")]
    assert len(with_prompt) == 1 and not with_prompt[0].choices
    assert chunks.index(with_prompt[0]) < next(
        i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content
    )


def test_prompt_as_strings_or_id_lists_gives_n_choices_per_prompt(client, tiny_lm):
    texts = [PROMPT, "Whether 'tis nobler"]
    args = dict(model=NAME, max_tokens=4, seed=5, n=2, extra_body={"nexttok": {"ignore_eos": True}})
    by_text = client.completions.create(prompt=texts, **args)
    by_ids = client.completions.create(prompt=[tiny_lm.encode(t) for t in texts], **args)
    one = client.completions.create(prompt=tiny_lm.encode(texts[1]), **args)
    assert [c.index for c in by_text.choices] == [0, 1, 2, 3]
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert [c.text for c in by_text.choices[2:]] == [c.text for c in one.choices]
    assert by_text.usage.prompt_tokens == sum(len(tiny_lm.encode(t)) for t in texts)


def test_a_stop_string_ends_the_choice_with_finish_reason_stop(client):
    free = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"nexttok": {"ignore_eos": True}})  # fmt: skip
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzz"],
                                    extra_body={"nexttok": {"ignore_eos": True}})  # fmt: skip
    assert cut.choices[0].finish_reason == "stop" and cut.model_extra["nexttok"]["choices"][0]["finish"] == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_multi_turn_chat_equals_generate_on_the_template(client, tiny_lm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is there?"},
        {"role": "assistant", "content": "Nay, answer me."},
        {"role": "user", "content": "Long live the king!"},
    ]
    (steps,) = _steps(tiny_lm, tiny_lm.encode_chat(messages), SamplingConfig(temperature=0.9, seed=8, max_new_tokens=6))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0.9, seed=8)
    assert r.choices[0].message.content == _text(steps)
    assert r.usage.prompt_tokens == len(tiny_lm.encode_chat(messages))


def test_logprobs_minus_one_is_the_whole_vocabulary_where_the_server_allows_it(tiny_model_dir, tiny_lm):
    with running(_load(tiny_model_dir), served_model_name=NAME, max_logprobs=-1) as (base, _):
        c = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        r = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, logprobs=-1)
        top = r.choices[0].logprobs.top_logprobs[0]
        texts = {tiny_lm.token_text(i) for i in range(tiny_lm.vocab_size)}
        assert len(top) == len(texts)  # every token (texts that decode alike share one key)
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-4
