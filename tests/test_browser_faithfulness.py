"""#17 in a real headless Chromium (see test_browser.py, whose helpers and fixtures these reuse): the first view,
the faithfulness panel of the map on screen, and the fusion control of the Zoom & prune tab."""

import re

import pytest
from test_browser import (  # noqa: F401  (browser, url and page are fixtures)
    EXAMPLE,
    browser,
    error_badges,
    open_prune_tab,
    page,
    predicted_label,
    upload,
    url,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

SHOWN = "() => { const i = document.querySelector('#faith_plot img'); return i && i.naturalWidth > 0 }"
AUCS = r"deletion AUC \d+\.\d vs random \d+\.\d \(lower is better\), insertion AUC \d+\.\d vs random \d+\.\d"


def no_result_shown(page):
    """Neither the plot nor the text takes room (#24: empty boxes before anything was asked)."""
    for part in ("#faith_plot", "#faith_text"):
        page.locator(part).wait_for(state="hidden")
    assert page.locator("#faith_hint").get_by_text("Faithfulness of this map measures").is_visible()


def test_the_faithfulness_panel_measures_the_map_on_screen_and_keeps_it(page, deit_tiny):
    upload(page, EXAMPLE, predicted_label(deit_tiny))
    caption, text = page.locator("#caption"), page.locator("#faith_text")
    caption.get_by_text(re.compile(r"^Gradient-weighted for wall clock")).wait_for()  # the first view
    assert page.locator("#view input[type=radio]:checked").evaluate("i => i.value") == "grad_rollout"
    no_result_shown(page)

    page.locator("#faith_btn").click()
    # AUCs x 100, as eval's report.md shows them, beside the random map's.
    text.get_by_text(re.compile(rf"Gradient-weighted for wall clock \(\d+\.\d%\): {AUCS}")).wait_for()
    page.wait_for_function(SHOWN)
    assert "38 perturbed images" in text.inner_text()

    # Another map: no result, nothing shown; back to the first: its kept result, without pressing again.
    page.locator("#view").get_by_text("Rollout", exact=True).click()
    caption.get_by_text("discard ratio 0.90").wait_for()
    no_result_shown(page)
    page.locator("#view").get_by_text("Gradient-weighted", exact=True).click()
    text.get_by_text(re.compile(rf"Gradient-weighted for wall clock .*: {AUCS}")).wait_for()
    page.wait_for_function(SHOWN)
    assert error_badges(page) == 0


def test_the_fusion_control_prunes_with_the_chosen_fusion(page, deit_tiny):
    upload(page, EXAMPLE, predicted_label(deit_tiny))
    open_prune_tab(page)
    stats = page.locator("#prune_stats")
    fusion = page.locator("#fusion input[type=radio]")
    assert stats.get_by_text("(analysis mode)").count() == 1
    assert all(fusion.nth(i).is_disabled() for i in range(3))  # analysis mode does not read it
    page.locator("#mode").get_by_text("efficiency (no look-ahead)").click()
    stats.get_by_text("(efficiency mode, merge)").wait_for()  # the default, as in the CLI
    assert re.search(r"tokens\s+197\s+99\b", stats.inner_text())
    page.wait_for_function("() => !document.querySelector('#fusion input[type=radio]').disabled")
    page.locator("#fusion").get_by_text("fuse into one token (EViT)").click()
    stats.get_by_text("(efficiency mode, fuse)").wait_for()
    assert re.search(r"tokens\s+197\s+100\b", stats.inner_text())  # the fused token counts
    assert error_badges(page) == 0
