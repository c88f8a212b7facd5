"""The playground page in headless Chromium, for the tests and bench/playground.py: a browser, and waiting for the
page's ``data-rendered`` counter (bumped each time the bars are drawn)."""

from __future__ import annotations


def chromium(width: int = 375, height: int = 900):
    """Headless Debian Chromium through Selenium and chromium-driver (the playground's tests and benchmark)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        raise RuntimeError("the browser tests need Chromium: `apt-get install chromium chromium-driver` (make test)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(60)
    return driver


def wait(driver, until, seconds: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds).until(until)


def rendered(driver) -> str | None:
    return driver.find_element("tag name", "body").get_attribute("data-rendered")


def open_page(driver, url: str) -> None:
    """Load the page and wait for its first bars."""
    driver.get(url)
    wait(driver, rendered)


def render(driver, act=None) -> None:
    """Do ``act`` and wait until the bars are drawn again."""
    before = rendered(driver)
    if act:
        act()
    wait(driver, lambda d: rendered(d) != before)


def click_token(driver, text: str) -> None:
    """Click the bar of the token ``text`` (it must be among the shown candidates)."""
    match = [b for b in bars(driver) if b.get_attribute("data-text") == text]
    assert match, f"{text!r} is not among the bars: {[b.get_attribute('data-text') for b in bars(driver)]}"
    render(driver, match[0].click)


def set_value(driver, element_id: str, value) -> None:
    render(driver, lambda: driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));", element_id, str(value)))  # fmt: skip


def bars(driver):
    return driver.find_elements("css selector", "#bars li button")


def start(driver, prompt: str, chat: bool = False) -> None:
    """A new context from the prompt box."""
    render(driver, lambda: driver.execute_script(
        "document.getElementById('prompt').value = arguments[0];"
        "document.getElementById('chat').checked = arguments[1];"
        "document.getElementById('predict').click();", prompt, chat))  # fmt: skip


def trace(driver) -> list[str]:
    return [td.get_attribute("textContent") for td in driver.find_elements("css selector", "#trace tbody td.chosen")]
