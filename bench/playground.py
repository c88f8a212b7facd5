"""Benchmark: the playground page in headless Chromium on the default model, timed in the browser.

- a slider change (temperature) until the bars are redrawn: target <= 100 ms (no forward pass: the server
  re-applies the stages to the prompt's cached scores);
- a click on a bar until the next distribution is drawn: target <= one forward pass + 100 ms, the forward pass
  timed here as ``lm.last_logits`` on the same prompt.

With ``--screenshots DIR`` it saves ``DIR/playground.png``. Loopback only; 20 repeats, medians.

    .venv/bin/python bench/playground.py [--screenshots docs/img] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from serving import running  # noqa: E402

import nexttok  # noqa: E402

PROMPT = "The capital of France is"
WAIT = """const done = arguments[arguments.length - 1], before = document.body.dataset.rendered, t0 = performance.now();
%s
const poll = () => document.body.dataset.rendered !== before ? done(performance.now() - t0) : setTimeout(poll, 1);
poll();"""
SLIDE = "const e = document.getElementById('temperature'); e.value = %s; e.dispatchEvent(new Event('input'));"
CLICK = "document.querySelectorAll('#bars li button')[1].click();"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(60)
    return driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screenshots", type=Path)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    lm = nexttok.load()
    ids = lm.encode(PROMPT)
    lm.last_logits(ids)
    forward = statistics.median(_timed(lambda: lm.last_logits(ids)) for _ in range(args.repeats)) * 1000
    with running(lambda: nexttok.load()) as (base, _):
        driver = browser()
        try:
            driver.get(base + "/")
            driver.execute_async_script(WAIT % f"document.getElementById('prompt').value = {PROMPT!r};"
                                        "document.getElementById('predict').click();")  # fmt: skip
            slides, clicks = [], []
            for i in range(args.repeats):  # a new prompt each time: the click's prompt is not in the cache
                driver.execute_async_script(WAIT % f"document.getElementById('prompt').value = {PROMPT + ' ' * i!r};"
                                            "document.getElementById('predict').click();")  # fmt: skip
                slides.append(driver.execute_async_script(WAIT % (SLIDE % (0.5 + (i % 5) * 0.3))))
                clicks.append(driver.execute_async_script(WAIT % CLICK))
            driver.execute_async_script(WAIT % f"document.getElementById('prompt').value = {PROMPT!r};"
                                        "document.getElementById('predict').click();")  # fmt: skip
            driver.execute_async_script(WAIT % (SLIDE % 1))
            if args.screenshots:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.screenshots / "playground.png"))
                print(f"wrote {args.screenshots / 'playground.png'}")
        finally:
            driver.quit()
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
