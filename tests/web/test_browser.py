"""The review page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): load it, play an alert's FLAC clip, post a ``normal`` verdict with the token, and see
the bank version change. Screenshots go to the test's tmp dir, and to ``$ASD_SCREENSHOT_DIR``
when set (the README's docs/review-page.png comes from there)."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from tests.web.conftest import ReviewSite, review_events, reviews_file

pytest.importorskip("starlette", reason="the review page needs the optional extra 'web'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (test extra) is not installed")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT_ENV = "ASD_SCREENSHOT_DIR"
# Flags that work on these machines (no sandbox as root, no GPU, no network beyond loopback),
# and playback without a user gesture (the test clicks nothing before it plays).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--window-size=1400,900")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"Chromium or its driver not installed ({CHROMIUM}, {CHROMEDRIVER}): scripts/system-packages.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, tmp_path: Path, name: str) -> Path:
    """Save the whole page, beyond the window too (Chromium's DevTools capture), under the
    test's tmp dir and $ASD_SCREENSHOT_DIR."""
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes().startswith(b"\x89PNG")
    if os.environ.get(SCREENSHOT_ENV):
        target = Path(os.environ[SCREENSHOT_ENV])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)
    return path


PLAY = """
const audio = arguments[0], done = arguments[arguments.length - 1];
audio.muted = true;
audio.play().then(() => setTimeout(() => done({time: audio.currentTime, duration: audio.duration,
                                                error: audio.error && audio.error.code, paused: audio.paused}), 1500),
                  (error) => done({rejected: String(error), error: audio.error && audio.error.code}));
"""


def test_play_a_clip_post_a_verdict_and_see_the_bank_change(review_site, browser, tmp_path: Path) -> None:
    site: ReviewSite = review_site()
    browser.get(site.url)
    assert browser.find_element(By.ID, "bank-demo-fan").text == "v000001"
    row = browser.find_element(By.ID, f"alert-{site.event_id}")
    audio = row.find_element(By.TAG_NAME, "audio")
    browser.set_script_timeout(20)
    played = browser.execute_async_script(PLAY, audio)
    seconds = sf.info(str(site.clip)).duration
    # Chromium decoded the FLAC (its duration) and played it: the position moved.
    assert played.get("error") is None and "rejected" not in played, played
    assert played["duration"] == pytest.approx(seconds, abs=0.05) and played["time"] > 0.2, played
    screenshot(browser, tmp_path, "review-page")

    token = browser.find_element(By.ID, "token")
    token.send_keys(site.token)
    row.find_element(By.NAME, "condition").send_keys("default")
    row.find_element(By.NAME, "note").send_keys("the conveyor next door")
    row.find_element(By.CSS_SELECTOR, "button.normal").click()
    # The reply is shown, then the page reloads with the new bank version and the verdict.
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "bank-demo-fan").text == "v000002")
    answered = browser.find_element(By.ID, f"alert-{site.event_id}").find_element(
        By.CSS_SELECTOR, "[data-field=review]").text
    assert answered.startswith("normal (web") and "bank v000002" in answered
    assert browser.execute_script("return sessionStorage.getItem('asd-review-token')") == site.token
    screenshot(browser, tmp_path, "review-page-answered")
    assert site.store.current() == "v000002"
    assert [(r["verdict"], r["who"], r["note"]) for r in reviews_file(site)] == [
        ("normal", "web", "the conveyor next door")]
    assert len(review_events(site)) == 1


def test_a_wrong_token_is_shown_and_changes_nothing(review_site, browser) -> None:
    site: ReviewSite = review_site()
    browser.get(site.url)
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, f"alert-{site.event_id}").find_element(By.CSS_SELECTOR, "button.fault").click()
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "message").text.startswith("401"))
    assert "missing or wrong token" in browser.find_element(By.ID, "message").text
    assert site.store.versions() == ["v000001"] and reviews_file(site) == []
