"""End to end in a real headless Chromium (Debian's `chromium`, driven by Playwright from PyPI; Playwright's
own browser download is never used): upload, prediction, click a patch, move the retention slider.

Saves a screenshot of the Explore tab after the click (ZOOMVIT_SCREENSHOT=docs/screenshot.png refreshes the
README's picture).
"""

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

import app
import visualization
import vit_analyzer
from app_server import running_app

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "assets" / "wall_clock.jpg"
# The README's picture is refreshed on purpose (ZOOMVIT_SCREENSHOT=docs/screenshot.png); by default a test
# run leaves tracked files alone.
SCREENSHOT_ENV = "ZOOMVIT_SCREENSHOT"
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
TIMEOUT_MS = 90_000  # a model run on a busy 2-core machine can take a few seconds


def chromium_path() -> str:
    candidates = [os.environ.get("ZOOMVIT_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser"), "/usr/bin/chromium"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("Chromium not found: install Debian's `chromium` (apt-get install chromium; .ci/run does) "
                "or set ZOOMVIT_CHROMIUM=/path/to/chromium.")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install -e '.[test]' (do not run `playwright install`).")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def url(deit_tiny):
    with running_app(deit_tiny) as (_, address):
        yield address


def test_upload_click_a_patch_and_prune(browser, url, deit_tiny, tmp_path):
    loaded = vit_analyzer.load_image(EXAMPLE)
    analysis = vit_analyzer.analyze(deit_tiny, loaded, keep_graph=False)
    predicted = deit_tiny.label(analysis.predicted)
    _, geometry = visualization.resized_view(loaded.image, analysis.geometry, app.DISPLAY_SIDE)
    # The patch to click: the strongest rollout patch (on the clock), at its centre in the shown image's pixels.
    row, col = (int(v) for v in divmod(int(analysis.rollout().argmax()), analysis.grid[1]))
    x0, y0, x1, y1 = geometry.patch_box(row, col)

    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    outside = []
    page.on("request", lambda r: outside.append(r.url) if urlparse(r.url).hostname not in ("127.0.0.1", "localhost")
            and not r.url.startswith(("data:", "blob:")) else None)
    page.goto(url)

    # Upload: the prediction appears.
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#prediction").get_by_text(predicted, exact=True).first.wait_for()

    # Click the patch on the heatmap: it is named by row and column.
    page.wait_for_function(
        "() => { const i = document.querySelector('#overlay img');"
        " return i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0 }"
    )
    overlay = page.locator("#overlay img")
    natural_width = overlay.evaluate("i => i.naturalWidth")
    shown = overlay.bounding_box()
    css = shown["width"] / natural_width
    overlay.click(position={"x": (x0 + x1) / 2 * css, "y": (y0 + y1) / 2 * css})
    caption = page.locator("#caption")
    caption.get_by_text(re.compile(rf"row {row}, column {col}\b")).wait_for()
    assert "what it attends to" in caption.inner_text()
    page.wait_for_timeout(500)  # let the new overlay image paint before the picture is taken
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "screenshot.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000

    # Zoom & prune: the default retention runs when the tab opens; dragging the slider to 10% changes "after".
    page.get_by_role("tab", name="Zoom & prune").click()
    stats = page.locator("#prune_stats")
    stats.get_by_text("Keep 50%").wait_for()
    after = page.locator("#prune_after")
    after_at_50 = after.inner_text()
    slider = page.locator("#keep input[type=range]")
    box = slider.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 1, box["y"] + box["height"] / 2, steps=10)
    page.mouse.up()
    stats.get_by_text("Keep 10%").wait_for()
    assert after.inner_text() != after_at_50
    assert re.search(r"tokens\s+197\s+21\b", stats.inner_text())
    assert not outside, f"the page reached outside: {outside[:5]}"
    page.close()
