"""The Compare tab in a real headless Chromium (helpers and fixtures from test_browser): every tile drawn at a
readable size, a click on a tile inspects its patch here and on the Explore tab, and the zoom crop fills its panel.

ZOOMVIT_COMPARE_SCREENSHOT=docs/compare.png refreshes the README's picture of the tab.
"""

import os
import re
from pathlib import Path

import pytest
from test_browser import EXAMPLE, browser, error_badges, page, predicted_label, upload, url  # noqa: F401 (fixtures)

from zoomvit import compare, visualization
from zoomvit.app.sessions import MIN_DISPLAY_SIDE, display_side
from zoomvit.app.views import VIEW_NAMES, VIEWS, ViewSettings
from zoomvit.app.zoom_prune import CROP_SIDE
from zoomvit.images import load_image
from zoomvit.vit_analyzer import analyze

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

SCREENSHOT_ENV = "ZOOMVIT_COMPARE_SCREENSHOT"
LOADED = "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0 }"
NEW_PICTURE = (
    "([sel, src]) => { const i = document.querySelector(sel);"
    " return i && i.src !== src && i.complete && i.naturalWidth > 0 }"
)


def shown_scale(picture) -> float:
    """CSS pixels per picture pixel, as the page shows it."""
    return picture.bounding_box()["width"] / picture.evaluate("i => i.naturalWidth")


def test_every_tile_readable_and_a_click_inspects_its_patch(page, deit_tiny, tmp_path):  # noqa: F811
    loaded = load_image(EXAMPLE)
    analysis = analyze(deit_tiny, loaded, keep_graph=False)
    display, geometry = visualization.resized_view(
        loaded.image, analysis.geometry, display_side(loaded.image.size), MIN_DISPLAY_SIDE
    )
    upload(page, EXAMPLE, deit_tiny.label(analysis.predicted))
    page.get_by_role("tab", name="Compare").click()
    sheets = {
        "maps": (len(VIEWS), compare.MAP_SIDES, 192),
        "strip": (deit_tiny.num_layers, compare.STRIP_SIDES, 192),
        "heads": (deit_tiny.num_heads, compare.HEAD_SIDES, 96),
    }
    layouts = {}
    for name, (count, sides, least) in sheets.items():
        page.wait_for_function(LOADED, arg=f"#cmp_{name} img")
        picture = page.locator(f"#cmp_{name} img")
        layouts[name] = layout = compare.tile_layout(display.size, count, sides)
        # Every tile is on the picture (it has the layout's size), and each is shown at least `least` px across.
        assert picture.evaluate("i => [i.naturalWidth, i.naturalHeight]") == list(layout.size), name
        assert shown_scale(picture) * max(layout.picture) >= least, name
    assert f"Block by block: {VIEW_NAMES[ViewSettings().view]}" in page.locator("#cmp_strip_text").inner_text()
    assert "Every head of block 12" in page.locator("#cmp_heads_text").inner_text()

    # Click the strongest rollout patch on block 4's tile: that patch is inspected, in every block and head.
    row, col = (int(v) for v in divmod(int(analysis.rollout().argmax()), analysis.grid[1]))
    x0, y0, x1, y1 = geometry.patch_box(row, col)
    layout, strip = layouts["strip"], page.locator("#cmp_strip img")
    tx, ty = layout.origin(3)
    pw, ph = layout.picture
    scale, before = shown_scale(strip), strip.get_attribute("src")
    strip.click(
        position={
            "x": (tx + (x0 + x1) / 2 * pw / display.width) * scale,
            "y": (ty + (y0 + y1) / 2 * ph / display.height) * scale,
        }
    )
    page.locator("#cmp_strip_text").get_by_text(re.compile(rf"row {row}, column {col}\b")).wait_for()
    page.locator("#cmp_heads_text").get_by_text("Every head of block 4").wait_for()
    page.wait_for_function(NEW_PICTURE, arg=["#cmp_strip img", before])
    page.wait_for_timeout(500)  # let the new pictures paint before the picture is taken
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "compare.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    top = page.get_by_role("tab", name="Compare").bounding_box()["y"] - 8  # the tab, without the page's header
    end = page.locator("#cmp_clear").bounding_box()
    page.screenshot(
        path=str(screenshot),
        full_page=True,
        clip={"x": 0, "y": top, "width": 1280, "height": end["y"] + end["height"] + 8 - top},
    )
    assert screenshot.stat().st_size > 10_000

    # A map tile's name makes it the Explore tab's view and keeps the patch; the Explore tab shows the same patch.
    maps = page.locator("#cmp_maps img")
    tx, ty = layouts["maps"].origin(2)
    scale = shown_scale(maps)
    maps.click(position={"x": (tx + 20) * scale, "y": (ty + layouts["maps"].picture[1] + 10) * scale})
    page.locator("#cmp_strip_text").get_by_text("Block by block").wait_for()
    page.get_by_role("tab", name="Explore").click()
    page.wait_for_function("() => document.querySelector('#view input[value=intent]').checked")
    caption = page.locator("#caption")
    caption.get_by_text(re.compile(rf"row {row}, column {col}\b.*block 4")).wait_for()
    assert page.locator("#block input").input_value().startswith("4")

    # Clear: the strip shows the map again, block by block.
    page.get_by_role("tab", name="Compare").click()
    page.locator("#cmp_clear").click()
    page.locator("#cmp_strip_text").get_by_text("Block by block: Intent").wait_for()
    assert error_badges(page) == 0


def test_the_zoom_crop_is_shown_at_the_panel_size(page, deit_tiny):  # noqa: F811
    upload(page, EXAMPLE, predicted_label(deit_tiny))
    page.get_by_role("tab", name="Zoom & prune").click()
    page.locator("#zoom_on input[type=checkbox]").check()
    page.wait_for_function(LOADED, arg="#zoom_crop img")
    crop, box = page.locator("#zoom_crop img"), page.locator("#zoom_box img")
    assert max(crop.evaluate("i => [i.naturalWidth, i.naturalHeight]")) == CROP_SIDE
    page.wait_for_function(LOADED, arg="#zoom_box img")
    # As tall as the zoom box beside it (the panel's height), not the crop's own ~250 px.
    shown = crop.evaluate(
        "i => { const r = i.getBoundingClientRect();"
        " const s = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight, 1);"
        " return i.naturalHeight * s }"
    )
    assert shown >= 0.95 * box.bounding_box()["height"]
