"""The upload page in a real headless Chromium, against a live server with the exported model."""

import base64
import io
import json
import urllib.request

import pytest
from PIL import Image, ImageDraw
from playwright import sync_api

from pipeline.serving import server as http_server
from tests import programs
from tests.helpers import image_bytes

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = "/tmp/captioner_page.png"


@pytest.fixture(scope="module")
def page_server(exported_captioner):
    settings = http_server.ServeSettings(port=0)
    with http_server.CaptionServer(exported_captioner, settings, log_stream=io.StringIO()) as server:
        yield server


@pytest.fixture(scope="module")
def browser_page():
    with sync_api.sync_playwright() as playwright:
        executable = programs.find_chromium()
        assert executable, ("no headless Chromium here: run the tests with `python -m tests`, which installs one, "
                            f"or set {programs.ENVIRONMENT_VARIABLE}")
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium.new_page(viewport={"width": 900, "height": 900})
        finally:
            chromium.close()


def _scene_png():
    """A generated PNG (bytes): two red discs on blue, like the demo data."""
    image = Image.new("RGB", (224, 224), (36, 84, 214))
    draw = ImageDraw.Draw(image)
    for left in (30, 120):
        draw.ellipse((left, 80, left + 70, 150), fill=(212, 38, 38))
    return image_bytes(image, "PNG")


def _predict(server, body):
    request = urllib.request.Request(f"{server.url}/v1/models/captioner:predict",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"][0]


def test_page_shows_preview_and_the_endpoints_caption(page_server, browser_page):
    image_bytes = _scene_png()
    expected = _predict(page_server, {"instances": [{"b64": base64.b64encode(image_bytes).decode()}]})
    failed_requests = []
    browser_page.on("requestfailed", lambda request: failed_requests.append(request.url))

    browser_page.goto(page_server.url + "/")
    assert browser_page.title() == "Captioner"
    browser_page.set_input_files("#file", files=[{"name": "scene.png", "mimeType": "image/png",
                                                  "buffer": image_bytes}])
    sync_api.expect(browser_page.locator("#caption")).to_have_text(expected["caption"], timeout=120_000)
    assert browser_page.locator("#score").inner_text().startswith(f"score {expected['score']:.3f}")
    assert browser_page.locator("#error").is_hidden()
    # The preview shows the picked file itself, fully decoded at its own size.
    preview = browser_page.locator("#preview")
    assert preview.get_attribute("src") == "data:image/png;base64," + base64.b64encode(image_bytes).decode()
    assert browser_page.evaluate("() => { const i = document.getElementById('preview');"
                                 " return [i.complete, i.naturalWidth, i.naturalHeight]; }") == [True, 224, 224]
    assert failed_requests == []
    browser_page.screenshot(path=SCREENSHOT, full_page=True)


def test_page_shows_the_json_error_for_a_file_that_is_not_an_image(page_server, browser_page):
    browser_page.goto(page_server.url + "/")
    browser_page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png",
                                                  "buffer": b"this is not an image"}])
    error_box = browser_page.locator("#error")
    sync_api.expect(error_box).to_be_visible(timeout=60_000)
    shown = error_box.inner_text()
    assert shown.startswith("HTTP 400")
    assert "instances[0]: not a readable JPEG, PNG, GIF or BMP image" in json.loads(shown.partition("\n")[2])["error"]
    assert browser_page.locator("#caption").inner_text() == ""
