"""The web page in a real headless Chromium against the running app: the model picker fills from
/v1/models, a generation shows its step previews as they stream and then the result, and Cancel
really stops the server's denoising loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.serve.harness import wait_for
from tests.serve.test_handles_and_cancel import job_stats

RECORD_FRAMES = """
window.frames_seen = [];
const image = document.getElementById('preview-image');
new MutationObserver(() => window.frames_seen.push(image.src))
  .observe(image, {attributes: true, attributeFilter: ['src']});
"""
SCREENSHOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "page.png"


def fill(browser: Any, **fields: object) -> None:
    from selenium.webdriver.common.by import By

    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))


def open_page(browser: Any, app_url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{app_url}/")
    wait_for(lambda: "tiny" in browser.find_element(By.ID, "model").text, 30, "the model picker")


def test_a_generation_shows_its_steps_then_the_result(browser: Any, app_url: str) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    fill(browser, prompt="a lighthouse at dusk", width=256, height=256, steps=12, seed=3)
    browser.execute_script(RECORD_FRAMES)
    browser.find_element(By.ID, "start").click()
    caption = wait_for(
        lambda: "seed 3" in (text := browser.find_element(By.ID, "result").text) and text,
        120,
        "the result",
    )
    assert "256x256" in caption
    assert browser.find_element(By.ID, "status").text == "done"
    frames = browser.execute_script("return window.frames_seen")
    assert len(set(frames)) >= 3, f"{len(set(frames))} distinct preview frames"
    result = browser.find_element(By.ID, "result-image").get_attribute("src")
    assert result.startswith("data:image/png;base64,")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))


def test_cancel_stops_the_servers_loop(browser: Any, app_url: str) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    fill(browser, prompt="a very long walk", width=512, height=512, steps=100, seed=4)
    browser.find_element(By.ID, "start").click()
    wait_for(lambda: "step 2 of" in browser.find_element(By.ID, "status").text, 60, "step 2")
    request_id = browser.execute_script("return document.body.dataset.requestId")
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: browser.find_element(By.ID, "status").text == "cancelled", 30, "cancelled")

    def stopped() -> dict | None:
        stats = job_stats(request_id)
        return stats if stats is not None and stats["status"] != "running" else None

    stats = wait_for(stopped, 60, "the server to stop the job")
    assert stats["status"] == "cancelled" and stats["steps"] < 100
