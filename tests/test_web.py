"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against a server on a tiny model: what it shows is the library's."""

from __future__ import annotations

import shutil

import httpx
import pytest
from serving import running

from nexttok.generate import generate
from nexttok.sampling import SamplingConfig

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def page(tiny_model_dir):
    import nexttok

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("the browser tests need Chromium: `apt-get install chromium chromium-driver` (make test does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=375,900"):
        options.add_argument(flag)
    with running(lambda: nexttok.load(str(tiny_model_dir)), served_model_name="tiny") as (base, _):
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            driver.get(base + "/")
            yield driver
        finally:
            driver.quit()


def _render(driver, act=None) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    before = driver.find_element("tag name", "body").get_attribute("data-rendered")
    if act:
        act()
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-rendered") != before
    )


def _set(driver, element_id: str, value) -> None:
    _render(driver, lambda: driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));", element_id, str(value)))  # fmt: skip


def _bars(driver):
    return driver.find_elements("css selector", "#bars li button")


def test_the_page_shows_the_distribution_stages_and_the_loop(page, tiny_lm):
    _render(page, lambda: page.execute_script(f"document.getElementById('prompt').value = {PROMPT!r};"
                                              "document.getElementById('predict').click();"))  # fmt: skip
    best = tiny_lm.distribution(PROMPT).top(10)
    bars = _bars(page)
    assert [int(b.get_attribute("data-id")) for b in bars] == [r.id for r in best]
    assert bars[0].find_element("css selector", ".prob").text == f"{best[0].prob:.4f}"

    _set(page, "temperature", 2)
    entropy = float(page.find_element("id", "summary").get_attribute("data-entropy"))
    assert entropy == pytest.approx(tiny_lm.distribution(PROMPT, temperature=2.0).entropy, abs=1e-4)
    _set(page, "temperature", 1)
    _set(page, "top_k", 3)
    kept = [b for b in _bars(page) if b.get_attribute("class") == "kept"]
    assert len(kept) == 3
    _set(page, "top_k", 0)

    second = _bars(page)[1]
    text = second.get_attribute("data-text")
    _render(page, second.click)
    assert page.find_element("id", "prompt").get_property("value") == PROMPT + text
    assert [int(b.get_attribute("data-id")) for b in _bars(page)] == [
        r.id for r in tiny_lm.distribution(PROMPT + text).top(10)
    ]
    _render(page, page.find_element("id", "undo").click)
    assert page.find_element("id", "prompt").get_property("value") == PROMPT
    assert [int(b.get_attribute("data-id")) for b in _bars(page)] == [r.id for r in best]


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
