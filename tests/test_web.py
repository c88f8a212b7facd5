"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against a server on a tiny model: what it shows is the library's."""

from __future__ import annotations

import httpx
import pytest
from conftest import make_tiny_model
from serving import running
from webpage import bars, chromium, render, set_value, start, trace, wait

from nexttok.generate import generate
from nexttok.sampling import SamplingConfig

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-b"), seed=1)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, tiny_lm):
    from conftest import tiny_corpus

    from nexttok.corpus import index_corpus

    folder = tmp_path_factory.mktemp("web-corpus")
    (folder / "plays.txt").write_text(tiny_corpus(8000), encoding="utf-8")
    return index_corpus(tiny_lm, [str(folder / "plays.txt")], folder / "index", show=False).folder


@pytest.fixture(scope="module")
def page(tiny_model_dir, other_dir, corpus_dir):
    import nexttok

    loads = {"tiny": lambda: nexttok.load(str(tiny_model_dir)), "tiny-b": lambda: nexttok.load(str(other_dir))}
    with running(loads, corpus=str(corpus_dir), min_span=2) as (base, _):
        driver = chromium()
        try:
            driver.get(base + "/")
            wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-rendered"))
            yield driver
        finally:
            driver.quit()


def test_the_page_shows_the_distribution_stages_and_the_loop(page, tiny_lm):
    render(page, lambda: page.execute_script(f"document.getElementById('prompt').value = {PROMPT!r};"
                                              "document.getElementById('predict').click();"))  # fmt: skip
    best = tiny_lm.distribution(PROMPT).top(10)
    shown = bars(page)
    assert [int(b.get_attribute("data-id")) for b in shown] == [r.id for r in best]
    assert shown[0].find_element("css selector", ".prob").text == f"{best[0].prob:.4f}"

    set_value(page, "temperature", 2)
    entropy = float(page.find_element("id", "summary").get_attribute("data-entropy"))
    assert entropy == pytest.approx(tiny_lm.distribution(PROMPT, temperature=2.0).entropy, abs=1e-4)
    set_value(page, "temperature", 1)
    set_value(page, "top_k", 3)
    kept = [b for b in bars(page) if b.get_attribute("class") == "kept"]
    assert len(kept) == 3
    set_value(page, "top_k", 0)

    second = bars(page)[1]
    text, token = second.get_attribute("data-text"), int(second.get_attribute("data-id"))
    render(page, second.click)
    assert page.find_element("id", "prompt").get_property("value") == PROMPT + text
    # The token is appended as that token, not re-tokenized with the text.
    after = tiny_lm.distribution(tiny_lm.encode(PROMPT) + [token]).top(10)
    assert [int(b.get_attribute("data-id")) for b in bars(page)] == [r.id for r in after]
    render(page, page.find_element("id", "undo").click)
    assert page.find_element("id", "prompt").get_property("value") == PROMPT
    assert [int(b.get_attribute("data-id")) for b in bars(page)] == [r.id for r in best]


def test_sample_with_a_seed_repeats_and_equals_generate(page, tiny_lm):
    from selenium.webdriver.support.ui import WebDriverWait

    page.execute_script(
        f"document.getElementById('prompt').value = {PROMPT!r}; document.getElementById('seed').value = 7;"
    )
    drawn = []
    for _ in range(2):
        page.execute_script("document.getElementById('draw').dataset.id = '';")
        page.find_element("id", "sample").click()
        WebDriverWait(page, 30).until(lambda d: d.find_element("id", "draw").get_attribute("data-id"))
        drawn.append(int(page.find_element("id", "draw").get_attribute("data-id")))
    first = next(iter(generate(tiny_lm, PROMPT, SamplingConfig(seed=7, max_new_tokens=1))))
    assert drawn == [first.id, first.id]
    assert "seed 7" in page.find_element("id", "draw").text


def test_a_bad_setting_is_one_line_in_the_page(page):
    from selenium.webdriver.support.ui import WebDriverWait

    page.execute_script(
        "const e = document.getElementById('top_k'); e.value = -2; e.dispatchEvent(new Event('input'));"
    )
    WebDriverWait(page, 30).until(lambda d: d.find_element("id", "error").text)
    message = page.find_element("id", "error").text
    assert message.startswith("top_k:") and "\n" not in message
    beside = page.execute_script("return document.getElementById('top_k').closest('label').nextElementSibling;")
    assert beside.get_attribute("class") == "field-error" and beside.text == message
    page.execute_script("const e = document.getElementById('top_k'); e.value = 0; e.dispatchEvent(new Event('input'));")


def test_the_colour_view_counts_each_bucket_as_the_api_does(page):
    from selenium.webdriver.support.ui import WebDriverWait

    text = "Whether 'tis nobler in the mind to suffer the slings"
    page.execute_script(
        f"document.getElementById('prompt').value = {text!r}; document.getElementById('coloured').dataset.buckets = '';"
    )
    page.find_element("id", "colour").click()
    WebDriverWait(page, 30).until(lambda d: d.find_element("id", "coloured").get_attribute("data-buckets"))
    base = page.current_url.rstrip("/")
    api = httpx.post(f"{base}/v1/ranks", json={"prompt": text}, timeout=30).json()["buckets"]
    spans = page.find_elements("css selector", "#coloured span")
    shown = {b: sum(1 for s in spans if s.get_attribute("class") == b) for b in api}
    assert shown == api and sum(api.values()) == len(spans) - 1  # every token but the first has a bucket
    assert "".join(s.get_attribute("textContent") for s in spans) == text
    spans[3].click()
    assert page.find_element("id", "alternatives").text.startswith(
        spans[3].get_attribute("textContent").replace(" ", "␣")
    )


def test_run_steps_fills_the_trace_as_generate_does_and_branches_return(page, tiny_lm):
    start(page, PROMPT)
    page.execute_script("document.getElementById('seed').value = 7; document.getElementById('steps').value = 5;")
    render(page, page.find_element("id", "run").click)
    want = list(generate(tiny_lm, PROMPT, SamplingConfig(seed=7, max_new_tokens=5)))
    assert trace(page) == [tiny_lm.token_text(s.id).replace(" ", "␣").replace("\n", "↵") for s in want]
    assert page.find_element("id", "prompt").get_property("value") == PROMPT + "".join(s.text for s in want)
    probs = [float(td.text) for td in page.find_elements("css selector", "#trace tbody td:nth-child(4)")]
    assert probs == pytest.approx([round(s.prob, 4) for s in want], abs=1e-4)
    # The branch list holds every point on the way; the first returns to the bare prompt.
    branches = page.find_elements("css selector", "#branches button")
    assert len(branches) == len(want) + 1
    render(page, branches[0].click)
    assert page.find_element("id", "prompt").get_property("value") == PROMPT and trace(page) == []
    third = page.find_elements("css selector", "#branches button")[3]
    render(page, third.click)
    assert len(trace(page)) == 3


def test_ask_twice_shows_samples_with_seeds_that_replay(page, tiny_lm):
    start(page, PROMPT)
    page.execute_script("document.getElementById('ask-n').value = 3; document.getElementById('ask-max').value = 6;")
    page.find_element("id", "ask").click()
    wait(page, lambda d: len(d.find_elements("css selector", "#samples .sample")) == 3)
    cards = page.find_elements("css selector", "#samples .sample")
    seeds = [int(c.get_attribute("data-seed")) for c in cards]
    assert len(set(seeds)) == 3
    for card, seed in zip(cards, seeds, strict=True):
        steps = list(generate(tiny_lm, PROMPT, SamplingConfig(seed=seed, max_new_tokens=6)))
        assert card.find_element("css selector", ".sample-text").get_attribute("textContent") == "".join(
            s.text for s in steps
        )
        assert float(card.get_attribute("data-logprob")) == pytest.approx(sum(s.logprob for s in steps), abs=1e-3)
        assert f"seed {seed}" in card.find_element("css selector", ".meta").text
    text = cards[1].find_element("css selector", ".sample-text").get_attribute("textContent")
    render(page, cards[1].find_element("tag name", "button").click)
    assert cards[1].find_element("css selector", ".replayed").get_attribute("data-same") == "true"
    assert page.find_element("id", "prompt").get_property("value") == PROMPT + text


def test_ask_underlines_the_verbatim_spans_the_server_found(page, tiny_lm, corpus_dir):
    from nexttok.corpus import CorpusIndex
    from nexttok.corpus.report import spans_report

    start(page, PROMPT)
    page.execute_script("document.getElementById('ask-n').value = 1; document.getElementById('ask-max').value = 16;")
    page.find_element("id", "ask").click()
    wait(page, lambda d: len(d.find_elements("css selector", "#samples .sample")) == 1)
    card = page.find_element("css selector", "#samples .sample")
    seed = int(card.get_attribute("data-seed"))
    ids = [
        s.id
        for s in generate(tiny_lm, PROMPT, SamplingConfig(seed=seed, max_new_tokens=16))
        if s.finish_reason != "eos"
    ]
    want = spans_report(tiny_lm, CorpusIndex(corpus_dir), ids, 2)
    tokens = card.find_elements("css selector", ".sample-text span")
    underlined = {j for j, t in enumerate(tokens) if "verbatim" in t.get_attribute("class").split()}
    assert underlined == {j for s in want["spans"] for j in range(s["start"], s["stop"])}
    info = card.find_element("css selector", ".verbatim-info")
    assert float(info.get_attribute("data-coverage")) == pytest.approx(want["coverage"])
    assert all(w["name"] in info.text for s in want["spans"] for w in s["where"])


def test_compare_shows_the_two_models_divergence(page, tiny_lm, other_dir):
    import nexttok
    from nexttok.compare import compare

    start(page, PROMPT)
    assert page.find_element("id", "compare").is_displayed()
    page.find_element("id", "compare-run").click()
    wait(page, lambda d: d.find_element("id", "compare-summary").get_attribute("data-kl"))
    want = compare(tiny_lm, nexttok.load(str(other_dir)), PROMPT)
    assert float(page.find_element("id", "compare-summary").get_attribute("data-kl")) == pytest.approx(
        want.kl_ab, rel=1e-5
    )
    rows = page.find_elements("css selector", "#compare-table tbody tr")
    assert [r.find_element("css selector", ".token").text for r in rows] == [c.shown for c in want.rows]


def test_chat_mode_reads_the_chat_template(page, tiny_lm):
    start(page, "Hello there", chat=True)
    ids = tiny_lm.encode("Hello there", chat=True)
    assert page.find_element("id", "context").get_attribute("textContent") == tiny_lm.tokenizer.decode(ids)
    assert [int(b.get_attribute("data-id")) for b in bars(page)] == [r.id for r in tiny_lm.distribution(ids).top(10)]
    render(page, bars(page)[0].click)
    assert page.find_element("id", "prompt").get_property("value") == "Hello there"  # the box keeps the message
    start(page, PROMPT)


def test_find_gives_rank_in_the_vocabulary_and_appends(page, tiny_lm):
    start(page, PROMPT)
    page.execute_script("document.getElementById('search').value = ' the';")
    page.find_element("id", "find").click()
    wait(page, lambda d: d.find_element("id", "found").text)
    q = tiny_lm.distribution(PROMPT).prob(" the")
    assert f"rank {q.rank:,} of {tiny_lm.vocab_size:,}" in page.find_element("id", "found").text
    render(page, page.find_element("id", "find-append").click)
    assert page.find_element("id", "prompt").get_property("value") == PROMPT + q.pieces[0]


def test_the_page_says_when_the_server_went_away_and_recovers(tiny_model_dir):
    from serving import free_port

    import nexttok

    port = free_port()
    load = lambda: nexttok.load(str(tiny_model_dir))  # noqa: E731
    driver = chromium()
    try:
        with running(load, port=port):
            driver.get(f"http://127.0.0.1:{port}/")
            wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-rendered"))
        driver.find_element("id", "predict").click()
        wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-server") == "down")
        assert "went away" in driver.find_element("id", "status").text
        before = driver.find_element("tag name", "body").get_attribute("data-rendered")
        with running(load, port=port):
            wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-server") == "up")
            wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-rendered") != before)
            assert driver.find_element("id", "status").text == ""
            assert len(bars(driver)) == 10
    finally:
        driver.quit()
