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
    forwards = server[1].scores.forwards
    hot = _post(server, "/v1/stages", {"prompt": PROMPT, "temperature": 2.0})
    assert hot["cached"] and server[1].scores.forwards == forwards  # the same prompt: no model call
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
