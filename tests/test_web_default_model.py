"""The playground in headless Chromium on the packaged default model: the lesson's numbers and its six steps."""

from __future__ import annotations

import pytest
from serving import running
from webpage import bars, chromium, click_token, open_page, start, trace

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def page():
    import nexttok

    with running(lambda: nexttok.load("default")) as (base, _):
        driver = chromium()
        try:
            open_page(driver, base + "/")
            yield driver
        finally:
            driver.quit()


def test_paris_comes_first_with_the_probability_predict_gives(page, default_lm):
    start(page, "The capital of France is")
    best = default_lm.distribution("The capital of France is").top(1)[0]
    top = bars(page)[0]
    assert top.get_attribute("data-text") == " Paris" == best.text
    assert top.find_element("css selector", ".prob").text == f"{best.prob:.4f}"


def test_the_seeds_six_steps_by_clicks(page, default_lm):
    """The lesson's loop, "What's the capital of France?" to "... The capital of France is Paris", one click a step."""
    question = "What's the capital of France?"
    words = [" The", " capital", " of", " France", " is", " Paris"]
    start(page, question)
    for word in words:
        click_token(page, word)
    assert page.find_element("id", "prompt").get_property("value") == question + "".join(words)
    assert trace(page) == [w.replace(" ", "␣") for w in words]
    inputs = [td.get_attribute("textContent") for td in page.find_elements("css selector", "#trace td.input")]
    assert inputs[-1].endswith("The capital of France is")  # step 6's input, as in the lesson
    ids = default_lm.encode(question + "".join(words[:5]))
    p = float(page.find_elements("css selector", "#trace tbody td:nth-child(4)")[-1].text)
    assert p == pytest.approx(float(default_lm.distribution(ids).probs[default_lm.encode(" Paris")[-1]]), abs=1e-4)
