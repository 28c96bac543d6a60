"""The web page in a real headless Chromium against the running app: the model picker fills from
/v1/models, a generation shows its step previews as they stream and then the result, Cancel
really stops the server's denoising loop, image → image and inpainting send the uploaded image
(and the mask painted with the pointer, at the image's size), the noise-mask picker shows the
server's patterns, a bad upload shows the server's message at its field, and an app that wants an
API key gets one from the page."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.harness import app_args, wait_for, wait_ready
from tests.serve.test_handles_and_cancel import job_stats

RECORD_FRAMES = """
window.frames_seen = [];
const image = document.getElementById('preview-image');
new MutationObserver(() => window.frames_seen.push(image.src))
  .observe(image, {attributes: true, attributeFilter: ['src']});
"""
# What the page sends, seen from inside it: every fetch's url, headers and body.
RECORD_REQUESTS = """
window.requests_sent = [];
const original = window.fetch;
window.fetch = (url, options = {}) => {
  window.requests_sent.push({url: String(url), headers: options.headers || {},
                             body: options.body || null});
  return original(url, options);
};
"""
SCREENSHOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "page.png"
KEY = "page-test-key"


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


def text(browser: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id).text


def choose_mode(browser: Any, mode: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f'input[name="mode"][value="{mode}"]').click()


def upload(browser: Any, path: Path, field: str = "init-image") -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, field).send_keys(str(path))


def picture(path: Path, width: int, height: int) -> str:
    """A gradient PNG written to `path`; returns its data URL (what FileReader makes of it)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 90)], axis=-1)
    Image.fromarray(rgb.astype(np.uint8)).save(path, format="PNG")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def wait_result(browser: Any, seed: int) -> str:
    caption = wait_for(
        lambda: f"seed {seed}" in (caption := text(browser, "result")) and caption, 120, "result"
    )
    assert text(browser, "status") == "done"
    return caption


def result_b64(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    src = browser.find_element(By.ID, "result-image").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return src.removeprefix("data:image/png;base64,")


def sent(browser: Any, path: str) -> list[dict[str, Any]]:
    requests = browser.execute_script("return window.requests_sent")
    return [request for request in requests if request["url"].endswith(path)]


def past_step(status: str, step: int) -> bool:
    """Whether a "step N of M" status shows step `step` or a later one."""
    match = re.match(r"step (\d+) of", status)
    return match is not None and int(match.group(1)) >= step


def generate_directly(app_url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{app_url}/v1/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["images"][0]


def test_a_generation_shows_its_steps_then_the_result(browser: Any, app_url: str) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    fill(browser, prompt="a lighthouse at dusk", width=256, height=256, steps=12, seed=3)
    browser.execute_script(RECORD_FRAMES)
    browser.find_element(By.ID, "start").click()
    assert "256x256" in wait_result(browser, 3)
    frames = browser.execute_script("return window.frames_seen")
    assert len(set(frames)) >= 3, f"{len(set(frames))} distinct preview frames"
    result_b64(browser)


def test_cancel_stops_the_servers_loop(browser: Any, app_url: str) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    fill(browser, prompt="a very long walk", width=512, height=512, steps=100, seed=4)
    browser.find_element(By.ID, "start").click()
    # Generous: on a small CI machine this tier may share its two CPUs with the others. Any
    # step from the second on will do: a warm replica may pass step 2 between two polls.
    wait_for(lambda: past_step(text(browser, "status"), 2), 120, "step 2")
    request_id = browser.execute_script("return document.body.dataset.requestId")
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: text(browser, "status") == "cancelled", 30, "cancelled")

    def stopped() -> dict | None:
        stats = job_stats(request_id)
        return stats if stats is not None and stats["status"] != "running" else None

    stats = wait_for(stopped, 60, "the server to stop the job")
    assert stats["status"] == "cancelled" and stats["steps"] < 100


def test_image_to_image_sends_the_upload_and_matches_the_api(
    browser: Any, app_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, app_url)
    choose_mode(browser, "image")
    init = picture(tmp_path / "init.png", 96, 72)
    upload(browser, tmp_path / "init.png")
    wait_for(lambda: browser.find_element(By.ID, "paint").is_displayed(), 10, "the init preview")
    strength = browser.find_element(By.ID, "strength")
    for _ in range(6):  # 0.8 -> 0.5 from the keyboard, in steps of 0.05
        strength.send_keys(Keys.ARROW_LEFT)
    assert strength.get_attribute("value") == "0.5"
    fill(browser, prompt="a red house in the forest", steps=6, seed=5)
    browser.find_element(By.ID, "start").click()
    # No width/height given: the server took the init image's size.
    assert "96x72" in wait_result(browser, 5)
    request_id = browser.execute_script("return document.body.dataset.requestId")
    stats = job_stats(request_id)
    assert stats is not None and stats["steps"] == 3  # int(6 * 0.5): the skipped half never ran

    body = {"model": "tiny", "prompt": "a red house in the forest", "steps": 6, "seed": 5}
    direct = generate_directly(app_url, {**body, "init_image": init, "strength": 0.5})
    assert result_b64(browser) == direct["b64"]
    plain = generate_directly(app_url, {**body, "width": 96, "height": 72})
    assert result_b64(browser) != plain["b64"]


def test_inpaint_sends_the_painted_mask_at_the_images_size(
    browser: Any, app_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    choose_mode(browser, "inpaint")
    init = picture(tmp_path / "init.png", 128, 96)
    upload(browser, tmp_path / "init.png")
    canvas = browser.find_element(By.ID, "mask-canvas")
    wait_for(lambda: canvas.get_attribute("width") == "128" and canvas.is_displayed(), 10, "mask")
    # A horizontal stroke through the middle, from a quarter to three quarters across.
    across = canvas.rect["width"]
    chain = ActionChains(browser).move_to_element_with_offset(canvas, -across // 4, 0)
    chain.click_and_hold()
    for _ in range(10):
        chain.move_by_offset(across // 20, 0)
    chain.release().perform()
    fill(browser, prompt="a stone wall", steps=4, seed=6)
    browser.execute_script(RECORD_REQUESTS)
    browser.find_element(By.ID, "start").click()
    assert "128x96" in wait_result(browser, 6)
    request_id = browser.execute_script("return document.body.dataset.requestId")
    stats = job_stats(request_id)
    assert stats is not None and stats["steps"] == 4  # inpainting's default strength is 1

    (request,) = sent(browser, "v1/generate")
    body = json.loads(request["body"])
    assert body["init_image"] == init and body["strength"] == 1
    assert body["mask"].startswith("data:image/png;base64,")
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1])))
    assert mask.size == (128, 96)
    pixels = np.asarray(mask.convert("L"))
    assert pixels[48, 64] == 255 and pixels[48, 40] == 255, "white where the stroke went"
    assert pixels[5, 5] == 0 and pixels[90, 64] == 0 and pixels[48, 10] == 0, "black elsewhere"
    browser.execute_script("window.scrollTo(0, 0)")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))


def test_the_noise_mask_picker_shows_the_servers_patterns(browser: Any, app_url: str) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    names = [mask["name"] for mask in httpx.get(f"{app_url}/v1/noise-masks").json()["data"]]
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "[data-pattern] img")) == 9)
    choices = browser.find_elements(By.CSS_SELECTOR, "#noise-patterns label[data-pattern]")
    assert len(names) == 9 and [c.get_attribute("data-pattern") for c in choices] == names
    for choice in choices:
        thumbnail = choice.find_element(By.TAG_NAME, "img")
        assert thumbnail.is_displayed() and thumbnail.get_attribute("src").startswith(
            "data:image/png;base64,"
        )
        assert browser.execute_script("return arguments[0].naturalWidth", thumbnail) == 64
    browser.find_element(By.CSS_SELECTOR, 'input[name="noise-pattern"][value="ring"]').click()
    fill(browser, prompt="fog", width=64, height=64, steps=4, seed=7)
    browser.execute_script(RECORD_REQUESTS)
    browser.find_element(By.ID, "start").click()
    wait_result(browser, 7)
    body = json.loads(sent(browser, "v1/generate")[0]["body"])
    defaults = {"strength": 0.5, "start": 0, "end": 1, "invert": False}
    assert body["noise_mask"] == {"pattern": "ring", **defaults}


def test_a_bad_upload_shows_the_servers_message_at_its_field(
    browser: Any, app_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    gif = tmp_path / "not-really.png"
    Image.new("RGB", (16, 16), "red").save(gif, format="GIF")
    data_url = "data:image/png;base64," + base64.b64encode(gif.read_bytes()).decode()
    refused = httpx.post(
        f"{app_url}/v1/generate", json={"model": "tiny", "prompt": "x", "init_image": data_url}
    )
    error = refused.json()["error"]
    assert refused.status_code == 415
    assert (error["code"], error["param"]) == ("unsupported_image", "init_image")
    open_page(browser, app_url)
    choose_mode(browser, "image")
    upload(browser, gif)
    fill(browser, prompt="x", steps=2, seed=8)
    browser.find_element(By.ID, "start").click()
    shown = wait_for(lambda: text(browser, "init_image-error"), 30, "the field's error")
    assert shown == error["message"]
    assert "unsupported_image" in text(browser, "status")
    assert browser.execute_script("return document.body.dataset.requestId")  # it was sent


@pytest.fixture(scope="module")
def keyed_url(
    ray_session: int, app_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A second, small app at /keyed that wants `KEY` (the default app is open)."""
    from ray import serve

    from deployments.app import build_app

    keys = tmp_path_factory.mktemp("auth") / "keys.txt"
    keys.write_text(f"{KEY}\n")
    args = app_args([{"id": "tiny", "source": "tiny"}])
    args["auth"] = {"api_keys_file": str(keys)}
    serve.run(build_app(args), name="keyed", route_prefix="/keyed", blocking=False)
    url = f"{app_url}/keyed"
    wait_ready(url)
    yield url
    serve.delete("keyed")


def test_the_api_key_is_asked_for_then_sent_on_every_call(browser: Any, keyed_url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{keyed_url}/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait_for(lambda: "needs an API key" in text(browser, "auth-message"), 30, "the 401 message")
    assert text(browser, "model") == ""
    fill(browser, **{"api-key": "wrong"})
    browser.find_element(By.ID, "save-key").click()
    wait_for(lambda: "refused this API key" in text(browser, "auth-message"), 30, "refused")
    fill(browser, **{"api-key": KEY})
    browser.find_element(By.ID, "save-key").click()
    wait_for(lambda: "tiny" in text(browser, "model"), 30, "the models, with the key")
    assert not browser.find_element(By.ID, "auth-message").is_displayed()

    # The key outlives a reload, and every call carries it: the catalogs and a generation (one
    # the server refuses for its width, after the key check, so no model needs to load).
    browser.refresh()
    wait_for(lambda: "tiny" in text(browser, "model"), 30, "the models, from the stored key")
    browser.execute_script(RECORD_REQUESTS)
    browser.find_element(By.ID, "save-key").click()
    fill(browser, width=1001, height=64, steps=2)
    browser.find_element(By.ID, "start").click()
    wait_for(lambda: text(browser, "width-error"), 30, "the width's error")
    assert text(browser, "auth-message") == ""
    calls = [request["url"].rsplit("/", 1)[-1] for request in sent(browser, "")]
    assert sorted(calls) == ["generate", "models", "noise-masks"]
    for request in sent(browser, ""):
        assert request["headers"]["authorization"] == f"Bearer {KEY}"
    browser.execute_script("localStorage.clear()")
