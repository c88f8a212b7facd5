"""The playground's endpoints: stages re-applied to cached scores, a seeded draw, every token by rank."""

from __future__ import annotations

import httpx
import pytest
from serving import running

from nexttok.generate import generate, stage_records
from nexttok.sampling import SamplingConfig

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import nexttok

    with running(lambda: nexttok.load(str(tiny_model_dir)), served_model_name="tiny") as (base, app):
        yield base, app.state.nexttok


def _post(server, path, body):
    r = httpx.post(f"{server[0]}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_stages_are_the_librarys_and_a_slider_needs_no_forward_pass(server, tiny_lm):
    settings = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.02}
    first = _post(server, "/v1/stages", {"prompt": PROMPT, **settings})
    want = stage_records(tiny_lm, PROMPT, SamplingConfig(**settings))
    assert [s["name"] for s in first["stages"]] == [r.name for r in want]
    assert [s["survivors"] for s in first["stages"]] == [r.survivors for r in want]
    assert [s["entropy"] for s in first["stages"]] == pytest.approx([r.entropy for r in want], abs=1e-5)
    forwards = server[1].served().scores.forwards
    hot = _post(server, "/v1/stages", {"prompt": PROMPT, "temperature": 2.0})
    assert hot["cached"] and server[1].served().scores.forwards == forwards  # the same prompt: no model call
    assert hot["stages"][-1]["entropy"] == pytest.approx(
        tiny_lm.distribution(PROMPT, temperature=2.0).entropy, abs=1e-5
    )
    three = _post(server, "/v1/stages", {"prompt": PROMPT, "top_k": 3})
    kept = [c for c in three["candidates"] if c["kept"]]
    assert len(kept) == 3 and sum(c["final_prob"] for c in kept) == pytest.approx(1.0, abs=1e-5)
    assert [c["id"] for c in three["candidates"]] == [r.id for r in tiny_lm.distribution(PROMPT).top(10)]


def test_a_seeded_draw_repeats_equals_generate_and_shows_where_u_fell(server, tiny_lm):
    body = {"prompt": PROMPT, "temperature": 1.3, "seed": 7}
    a, b = _post(server, "/v1/stages", body)["sample"], _post(server, "/v1/stages", body)["sample"]
    first = next(iter(generate(tiny_lm, PROMPT, SamplingConfig(temperature=1.3, seed=7, max_new_tokens=1))))
    assert a == b and a["id"] == first.id and a["uniform"] == pytest.approx(first.uniform)
    assert a["cdf_before"] <= a["uniform"] <= a["cdf_after"] + 1e-6


def test_ranks_bucket_every_token_as_the_distribution_ranks_it(server, tiny_lm):
    text = "Whether 'tis nobler in the mind to suffer"
    got = _post(server, "/v1/ranks", {"prompt": text, "top": 3})
    ids = tiny_lm.encode(text)
    assert [t["id"] for t in got["tokens"]] == ids
    want = {"top-10": 0, "top-100": 0, "top-1000": 0, "beyond": 0}
    for i in range(1, len(ids)):
        rank = tiny_lm.distribution(ids[:i]).rank_of(ids[i])
        assert got["tokens"][i]["rank"] == rank
        want[next((f"top-{b}" for b in (10, 100, 1000) if rank <= b), "beyond")] += 1
    assert got["buckets"] == want and all(len(t["top"]) == 3 for t in got["tokens"][1:])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": PROMPT, "top_p": 0}, "top_p"),
        ({"prompt": PROMPT, "ids": [1]}, "prompt"),
        ({"ids": [10**7]}, "prompt"),
    ],
)
def test_bad_settings_are_a_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server[0]}/v1/stages", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_compare_equals_nexttok_compare_and_names_its_models(tiny_model_dir, tmp_path_factory, tiny_lm):
    from conftest import make_tiny_model

    import nexttok
    from nexttok.compare import compare

    other = make_tiny_model(tmp_path_factory.mktemp("tiny-b"), seed=1)
    loads = {"a": lambda: nexttok.load(str(tiny_model_dir)), "b": lambda: nexttok.load(str(other))}
    with running(loads) as (base, _):
        server = (base, None)
        got = _post(server, "/v1/compare", {"prompt": PROMPT, "top": 5, "moves": 3})
        want = compare(tiny_lm, nexttok.load(str(other)), PROMPT, top=5, moves=3)
        assert (got["a"], got["b"]) == ("a", "b")
        assert got["kl_ab_nats"] == pytest.approx(want.kl_ab, rel=1e-5)
        assert got["js_bits"] == pytest.approx(want.js_bits, rel=1e-5)
        assert [c["id"] for c in got["candidates"]] == [c.id for c in want.rows]
        assert [c["id"] for c in got["gains"]] == [c.id for c in want.gains]
        same = _post(server, "/v1/compare", {"prompt": PROMPT, "a": "b", "b": "b"})
        assert same["kl_ab_nats"] == pytest.approx(0, abs=1e-6) and same["b_top_rank_under_a"] == 1
        # Each model answers by its own name; one not served is a 404 that lists those that are.
        ids = tiny_lm.encode(PROMPT)
        r = _post(server, "/v1/stages", {"model": "b", "ids": ids})
        assert [c["id"] for c in r["candidates"]] == [x.id for x in nexttok.load(str(other)).distribution(ids).top(10)]
        missing = httpx.post(f"{base}/v1/compare", json={"prompt": PROMPT, "b": "c"}, timeout=30)
        assert missing.status_code == 404 and "serves 'a', 'b'" in missing.json()["error"]["message"]


def test_compare_on_one_model_says_how_to_serve_two(server):
    r = httpx.post(f"{server[0]}/v1/compare", json={"prompt": PROMPT}, timeout=30)
    assert r.status_code == 400 and "--model A --model B" in r.json()["error"]["message"]


def test_stages_report_the_entropy_and_the_90_percent_cover(server, tiny_lm):
    got = _post(server, "/v1/stages", {"prompt": PROMPT})
    dist = tiny_lm.distribution(PROMPT)
    assert got["entropy"] == pytest.approx(dist.entropy, abs=1e-5) and got["cover_90"] == dist.mass_cover(0.9)
    assert got["context"] == tiny_lm.tokenizer.decode(tiny_lm.encode(PROMPT))


def test_generated_tokens_carry_their_alternatives_by_id(server, tiny_lm):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 3}
    first = _post(server, "/v1/completions", body)["nexttok"]["choices"][0]["tokens"][0]
    want = tiny_lm.distribution(PROMPT).top(3)
    assert [a["id"] for a in first["alternatives"]] == [r.id for r in want]
    assert [a["prob"] for a in first["alternatives"]] == pytest.approx([r.prob for r in want], abs=1e-5)
