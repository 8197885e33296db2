"""The model chooser in a real headless Chromium: each browser tab (session) chooses its model; the header, the
About text and the analysis follow in that tab only; a model that fails to load is a toast and changes nothing.

The app serves the real DeiT-Tiny (the default), its timm copy and a folder that breaks after the start-up check.
"""

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from app_server import running_app
from test_browser import (  # noqa: F401 (fixture)
    EXAMPLE,
    SCREENSHOT_ENV,
    TIMEOUT_MS,
    browser,
    error_badges,
    upload,
    wait_for_toast,
)

from zoomvit import models
from zoomvit.app.about import preprocessing_text
from zoomvit.app.model_registry import ModelRegistry
from zoomvit.vit_analyzer import analyze

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

TIMM_COPY = "models/deit-tiny-patch16-224-timm"


@pytest.fixture(scope="module")
def served(deit_model_path, shared_dir, tiny_vit, tmp_path_factory):
    timm = str(shared_dir / TIMM_COPY)
    broken = tmp_path_factory.mktemp("served") / "tiny-broken"
    tiny_vit.model.save_pretrained(broken)
    tiny_vit.processor.save_pretrained(broken)

    def slow_timm(name, device, dtype):  # long enough to see the progress message
        if name == timm:
            time.sleep(3)
        return models.load_model(name, device, dtype)

    registry = ModelRegistry(
        [deit_model_path, timm, str(broken)], "cpu", "float32", 2, include_cache=False, loader=slow_timm
    )
    (broken / "model.safetensors").write_bytes(b"truncated")  # fails when chosen
    with running_app(registry) as (_, url):
        yield url, registry, timm
    shutil.rmtree(broken)


def open_page(browser, url):  # noqa: F811 (the fixture's value)
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.locator("#header").get_by_text("ZoomViT Explorer").wait_for()
    return page


def choose_model(page, label):
    page.locator("#model input").click()
    page.get_by_role("option", name=label, exact=True).click()


def shown_model(page) -> str:
    return page.locator("#model input").input_value()


def readme_picture(page, tmp_path):
    """The README's picture of the Explore tab, with the model chooser: a patch clicked, its attention shown.
    Written to docs/ only on purpose (ZOOMVIT_SCREENSHOT=docs/screenshot.png)."""
    page.wait_for_function("() => { const i = document.querySelector('#overlay img'); return i && i.naturalWidth > 0 }")
    overlay = page.locator("#overlay img")
    box = overlay.bounding_box()
    overlay.click(position={"x": box["width"] * 0.55, "y": box["height"] * 0.45})
    page.locator("#caption").get_by_text(re.compile(r"row \d+, column \d+")).first.wait_for()
    page.wait_for_timeout(500)  # let the new overlay paint
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "screenshot.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000


def percent(analysis) -> str:
    return f"{round(float(analysis.probs.max()) * 100)}%"


def test_each_tab_chooses_its_model_and_the_header_follows(browser, served, deit_tiny, tmp_path):  # noqa: F811
    url, registry, timm = served
    first = open_page(browser, url)
    header = first.locator("#header")
    assert "Model family: ViT: class token" in header.inner_text() and shown_model(first) == "deit-tiny-patch16-224"
    deit_top = analyze(deit_tiny, EXAMPLE, keep_graph=False)
    upload(first, EXAMPLE, "wall clock")
    first.locator("#prediction").get_by_text(percent(deit_top)).first.wait_for()
    readme_picture(first, tmp_path)

    choose_model(first, "deit-tiny-patch16-224-timm")
    first.wait_for_function(  # the progress message, shown on the header while the model loads
        "() => document.body.textContent.includes('Loading deit-tiny-patch16-224-timm…')", polling=100
    )
    header.filter(has_text="Model family: timm VisionTransformer").wait_for()
    assert "See where deit-tiny-patch16-224-timm looks (12 blocks × 3 heads" in header.inner_text()
    timm_bundle = registry.get(timm)
    about = first.locator("#about_text")
    assert "its short side resized to 256" in preprocessing_text(timm_bundle)
    first.get_by_text("About: what the maps").click()
    about.get_by_text("its short side resized to 256").wait_for()
    # The image on screen is analysed again with the new model.
    first.locator("#prediction").get_by_text(percent(analyze(timm_bundle, EXAMPLE, keep_graph=False))).first.wait_for()
    first.locator("#overlay img").wait_for()

    second = open_page(browser, url)  # another session: still the default model
    assert "Model family: ViT: class token" in second.locator("#header").inner_text()
    assert shown_model(second) == "deit-tiny-patch16-224"
    upload(second, EXAMPLE, "wall clock")
    second.locator("#prediction").get_by_text(percent(deit_top)).first.wait_for()
    assert "Model family: timm VisionTransformer" in header.inner_text()  # the first tab kept its choice
    assert shown_model(first) == "deit-tiny-patch16-224-timm"
    assert error_badges(first) == 0 and error_badges(second) == 0
    assert registry.loaded() == [timm, str(registry.offer(None).name)]
    second.close()

    # A model that cannot load: a toast with the one-line reason, and the tab keeps its model.
    choose_model(first, "tiny-broken")
    wait_for_toast(first, "model.safetensors is corrupt or incomplete")
    first.wait_for_function("() => document.querySelector('#model input').value === 'deit-tiny-patch16-224-timm'")
    assert "Model family: timm VisionTransformer" in header.inner_text()
    assert error_badges(first) == 0

    # One model in memory (--max-models 1): another tab's upload pushes this tab's model out; this tab's next
    # events (the Zoom & prune tab's pruning, then zoom) analyse its image again and answer. They used to wait
    # forever on the model lock their own event held, and with them every model event of every user.
    registry.max_models = 1
    other = open_page(browser, url)
    upload(other, EXAMPLE, None)
    other.locator("#prediction").get_by_text(percent(deit_top)).first.wait_for()
    assert registry.loaded() == [registry.offer(None).name]  # the timm copy left memory
    first.get_by_role("tab", name="Zoom & prune").click()
    first.locator("#zoom_on input[type=checkbox]").check()
    first.locator("#zoom_info").get_by_text("forward units").first.wait_for()
    first.locator("#prune_stats").get_by_text("tokens").first.wait_for()
    assert registry.loaded() == [timm] and error_badges(first) == 0
    upload(other, EXAMPLE.with_name("honeycomb.jpg"), None)  # and the other tab is served too
    other.locator("#overlay img").wait_for()
    other.close()
    first.close()
