"""Benchmark: the playground page in headless Chromium on the default model, timed in the browser.

- a slider change (temperature) until the bars are redrawn: target <= 100 ms (no forward pass: the server
  re-applies the stages to the prompt's cached scores);
- a click on a bar until the next distribution is drawn: target <= one forward pass + 100 ms, the forward pass
  timed here as ``lm.last_logits`` on the same prompt.

With ``--screenshots DIR`` it saves a PNG of each view in DIR (``make screenshots``: those alone, with
``--no-timing``). The server serves the default model and, for the compare view, the same model in bfloat16
(``--compare PATH`` for another, e.g. a fine-tuned folder). Loopback only; 20 repeats, medians.

    .venv/bin/python bench/playground.py [--screenshots docs/img] [--no-timing] [--repeats 20] [--compare PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from serving import running  # noqa: E402
from webpage import chromium, click_token, open_page, render, start, wait  # noqa: E402

import nexttok  # noqa: E402

PROMPT = "The capital of France is"
QUESTION, WORDS = "What's the capital of France?", [" The", " capital", " of", " France", " is", " Paris"]
WAIT = """const done = arguments[arguments.length - 1], before = document.body.dataset.rendered, t0 = performance.now();
%s
const poll = () => document.body.dataset.rendered !== before ? done(performance.now() - t0) : setTimeout(poll, 1);
poll();"""
SLIDE = "const e = document.getElementById('temperature'); e.value = %s; e.dispatchEvent(new Event('input'));"
CLICK = "document.querySelectorAll('#bars li button')[1].click();"
NEW = "document.getElementById('prompt').value = %r; document.getElementById('predict').click();"


def measure(driver, repeats: int) -> tuple[list[float], list[float]]:
    slides, clicks = [], []
    for i in range(repeats):  # a new prompt each time: the click's prompt is not in the cache
        driver.execute_async_script(WAIT % (NEW % (PROMPT + " " * i)))
        slides.append(driver.execute_async_script(WAIT % (SLIDE % (0.5 + (i % 5) * 0.3))))
        clicks.append(driver.execute_async_script(WAIT % CLICK))
    driver.execute_async_script(WAIT % (SLIDE % 1))
    return slides, clicks


def shoot(driver, folder: Path) -> None:
    """One PNG per view, each in the state the docs describe."""
    folder.mkdir(parents=True, exist_ok=True)

    def save(name: str, element_id: str | None = None) -> None:
        path = folder / name
        if element_id:
            element = driver.find_element("id", element_id)
            driver.execute_script("arguments[0].scrollIntoView();", element)
            element.screenshot(str(path))
        else:
            driver.execute_script("window.scrollTo(0, 0);")
            driver.save_screenshot(str(path))
        print(f"wrote {path}")

    start(driver, PROMPT)
    render(driver, lambda: driver.execute_script(
        "const e = document.getElementById('top_p'); e.value = 0.8; e.dispatchEvent(new Event('input'));"))  # fmt: skip
    driver.execute_script("document.getElementById('seed').value = 7;")
    driver.find_element("id", "sample").click()
    wait(driver, lambda d: d.find_element("id", "draw").text)
    save("playground.png")
    render(driver, lambda: driver.execute_script(
        "const e = document.getElementById('top_p'); e.value = 1; e.dispatchEvent(new Event('input'));"))  # fmt: skip
    start(driver, QUESTION)
    for word in WORDS:
        click_token(driver, word)
    save("playground-loop.png", "trace-section")
    driver.find_element("id", "colour").click()
    wait(driver, lambda d: d.find_element("id", "coloured").get_attribute("data-buckets"))
    driver.find_elements("css selector", "#coloured span")[-1].click()
    save("playground-colour.png", "colour-section")
    driver.find_element("id", "compare-run").click()
    wait(driver, lambda d: d.find_element("id", "compare-summary").text)
    save("playground-compare.png", "compare")
    start(driver, "Write one sentence about the sea.", chat=True)
    driver.execute_script("document.getElementById('ask-n').value = 3; document.getElementById('ask-max').value = 16;")
    driver.find_element("id", "ask").click()
    wait(driver, lambda d: len(d.find_elements("css selector", "#samples .sample")) == 3, 120)
    save("playground-ask.png", "ask-section")


def bf16_copy():
    # Keep bf16 even where it is emulated (models.load would run fp32 there): the view needs bf16's numbers.
    os.environ["NEXTTOK_BF16"] = "fast"
    try:
        return nexttok.load(dtype="bfloat16")
    finally:
        os.environ.pop("NEXTTOK_BF16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screenshots", type=Path)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compare", help="model B of the compare view (default: the default model in bfloat16)")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    other = (lambda: nexttok.load(args.compare)) if args.compare else bf16_copy
    loads = {"default": nexttok.load, (args.compare or "default-bf16"): other}
    with running(loads) as (base, _):
        driver = chromium(900, 1300)
        try:
            open_page(driver, base + "/")
            if not args.no_timing:
                slides, clicks = measure(driver, args.repeats)
            if args.screenshots:
                shoot(driver, args.screenshots)
        finally:
            driver.quit()
    if args.no_timing:
        return
    lm = nexttok.load()
    ids = lm.encode(PROMPT)
    lm.last_logits(ids)
    forward = statistics.median(_timed(lambda: lm.last_logits(ids)) for _ in range(args.repeats)) * 1000
    slide, click = statistics.median(slides), statistics.median(clicks)
    print(f"slider change -> redrawn: median {slide:.0f} ms, max {max(slides):.0f} ms (target <= 100)")
    print(f"click -> next distribution drawn: median {click:.0f} ms; forward pass {forward:.0f} ms; "
          f"overhead {click - forward:.0f} ms (target <= 100)")  # fmt: skip


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
