"""The Compare renderer (`compare`) on the real DeiT-Tiny, and the Compare tab's handlers (`compare_tab`) without a
browser: tiles per view, block and head, their size, that they differ, that each is the library's map, and that
a click on a tile lands on the tile and the patch under it."""

import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from zoomvit import compare, visualization
from zoomvit.app.explorer import Explorer
from zoomvit.app.views import VIEWS, ViewSettings
from zoomvit.app.zoom_prune import CROP_SIDE, crop_for_panel
from zoomvit.errors import ZoomViTError
from zoomvit.maps import normalize_map, rollout_matrix
from zoomvit.vit_analyzer import analyze

pytestmark = [  # Gradio's queue trips over pandas 3 deprecations: not ours
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "zoomvit" / "assets" / "wall_clock.jpg"


@pytest.fixture(scope="module")
def analysis(deit_tiny):
    return analyze(deit_tiny, EXAMPLE)


@pytest.fixture(scope="module")
def shown(analysis):
    """The picture the app draws on (its display copy) and that copy's geometry."""
    return visualization.resized_view(analysis.loaded.image, analysis.geometry, 768)


def tiles(sheet: compare.Sheet) -> list[np.ndarray]:
    """Each tile's picture, cut out of the sheet."""
    pw, ph = sheet.layout.picture
    out = []
    for i in range(sheet.layout.count):
        x, y = sheet.layout.origin(i)
        out.append(np.asarray(sheet.image.crop((x, y, x + pw, y + ph)), dtype=np.int16))
    return out


def assert_all_differ(pictures, at_least=2.0):
    for i in range(len(pictures)):
        for j in range(i + 1, len(pictures)):
            assert np.abs(pictures[i] - pictures[j]).mean() > at_least, (i, j)


def test_every_map_is_one_readable_tile_named_under_it(analysis, shown):
    image, geometry = shown
    sheet = compare.map_tiles(analysis, image=image, geometry=geometry, selected="intent")
    assert sheet.layout.count == len(VIEWS) == len(compare.MAP_NAMES)
    assert sheet.names == tuple(compare.MAP_NAMES[v] for v in compare.config.MAP_METHODS)
    assert sheet.layout.columns == len(VIEWS)  # side by side, one row
    assert max(sheet.layout.picture) >= 192 and sheet.image.width <= compare.SHEET_WIDTH
    assert sheet.image.size == sheet.layout.size
    pictures = tiles(sheet)
    assert_all_differ(pictures)
    # Each tile is the library's map over the picture, drawn as the main view draws it.
    small, small_geometry = visualization.resized_view(
        image, geometry, max(sheet.layout.picture), min(sheet.layout.picture)
    )
    expected = visualization.heat_overlay(small, small_geometry, analysis.map("intent"), "jet", 0.5)
    assert np.abs(pictures[2] - np.asarray(expected, dtype=np.int16)).mean() < 0.5  # the frame is outside it
    # The name strip under each picture has ink in it; the framed (selected) tile's frame is orange.
    pw, ph = sheet.layout.picture
    x, y = sheet.layout.origin(0)
    names = np.asarray(sheet.image.crop((x, y + ph, x + pw, y + ph + compare.NAME_HEIGHT)).convert("L"))
    assert names.min() < 100
    x, y = sheet.layout.origin(2)
    assert sheet.image.getpixel((x - 2, y + ph // 2)) == compare.SELECTED


def test_the_block_strip_has_one_tile_per_block_and_accumulates(analysis, shown, deit_tiny):
    image, geometry = shown
    sheet = compare.block_strip(analysis, "rollout", image=image, geometry=geometry, selected=-1)
    last = deit_tiny.num_layers
    assert sheet.layout.count == last == 12
    assert sheet.names[0] == "block 1" and sheet.names[-1] == f"blocks 1–{last}"
    assert (sheet.layout.columns, sheet.layout.rows) == (6, 2)  # 12 tiles: 2 rows of 6 at 1200 px
    assert max(sheet.layout.picture) >= 192 and sheet.image.width <= compare.SHEET_WIDTH
    pictures = tiles(sheet)
    assert np.abs(pictures[0] - pictures[-1]).mean() > 5.0
    assert_all_differ(pictures[4:], at_least=0.1)  # the first blocks' rollouts differ less than a colour step

    plain = compare.block_maps(analysis, "rollout", discard_ratio=0.0)  # 0.9 leaves blocks 1 and 2 alike here
    assert all(np.abs(plain[b] - plain[b + 1]).max() > 1e-3 for b in range(last - 1))
    maps = compare.block_maps(analysis, "rollout")
    assert np.allclose(maps[-1], analysis.rollout())  # the last tile is the map itself
    for b in (1, 5):  # block b's tile: the rollout of the model cut after block b
        fused = analysis.attentions[:b].mean(axis=1)
        expected = normalize_map(rollout_matrix(fused, 0.9)[0, 1:].reshape(analysis.grid))
        assert np.allclose(maps[b - 1], expected, atol=1e-5)
    for view in ("grad_rollout", "intent"):
        assert np.allclose(compare.block_maps(analysis, view)[-1], analysis.map(view), atol=1e-6)
    cls = compare.block_maps(analysis, "cls", head=1)
    assert all(np.allclose(cls[b], analysis.cls_map(b, 1)) for b in range(last))
    assert compare.block_names(last, "cls")[-1] == f"block {last}"


def test_a_patch_shows_its_attention_in_every_block(analysis):
    patch = (5, 9)
    to = compare.block_maps(analysis, "intent", head="max", patch=patch)
    by = compare.block_maps(analysis, "intent", head="max", patch=patch, direction="attended_by")
    for b in (0, 6, 11):
        assert np.allclose(to[b], analysis.attended_by_patch(*patch, b, "max"))
        assert np.allclose(by[b], analysis.attending_patch(*patch, b, "max"))
    assert compare.block_names(12, "intent", patch)[-1] == "block 12"


def test_the_heads_grid_is_numbered_from_one_and_readable(analysis, shown, deit_tiny):
    image, geometry = shown
    sheet = compare.heads_grid(analysis, block=-1, image=image, geometry=geometry, selected=0)
    heads = deit_tiny.num_heads
    assert sheet.layout.count == heads and sheet.names == tuple(f"head {h}" for h in range(1, heads + 1))
    assert min(sheet.layout.picture) >= 96
    assert_all_differ(tiles(sheet))
    maps = compare.head_maps(analysis, 3, patch=(2, 2), direction="attended_by")
    assert all(np.allclose(maps[h], analysis.attending_patch(2, 2, 3, h)) for h in range(heads))


def test_a_sheet_draws_the_analysed_image_by_default(analysis):
    sheet = compare.heads_grid(analysis, block=0)
    assert sheet.layout.count == analysis.attentions.shape[1]
    with pytest.raises(ValueError, match="geometry"):
        compare.map_tiles(analysis, image=analysis.loaded.image)


def test_layouts_keep_tiles_readable_for_any_count_and_shape():
    for count, size in ((5, (512, 384)), (12, (384, 512)), (24, (640, 480)), (16, (300, 300)), (1, (50, 20))):
        layout = compare.tile_layout(size, count, compare.STRIP_SIDES)
        assert max(layout.picture) >= 192 and layout.columns * layout.rows >= count
        assert layout.size[0] <= compare.SHEET_WIDTH and layout.rows == -(-count // layout.columns)
        assert layout.rows * layout.columns - count < layout.columns  # balanced: no empty row


def test_a_click_is_traced_back_to_its_tile_and_patch(analysis, shown):
    image, geometry = shown
    layout = compare.tile_layout(image.size, 12, compare.STRIP_SIDES)
    pw, ph = layout.picture
    x, y = layout.origin(7)
    index, (fx, fy) = layout.hit(x + pw * 0.25, y + ph * 0.75)
    assert index == 7 and abs(fx - 0.25) < 0.01 and abs(fy - 0.75) < 0.01
    assert layout.hit(x + pw / 2, y + ph + 5) == (7, None)  # its name
    assert layout.hit(x - compare.GAP / 2, y + 10) is None  # the gap before it
    assert layout.hit(x + pw / 2, y + ph + compare.NAME_HEIGHT + 2) is None  # below its name
    assert layout.hit(layout.size[0] - 1, layout.size[1] - 1) is None
    # The point found is the patch under it: the centre of patch (5, 9) of a tile maps back to (5, 9).
    small, small_geometry = visualization.resized_view(image, geometry, max(layout.picture), min(layout.picture))
    x0, y0, x1, y1 = small_geometry.patch_box(5, 9)
    _, (fx, fy) = layout.hit(x + (x0 + x1) / 2, y + (y0 + y1) / 2)
    assert geometry.pixel_to_patch(fx * image.width, fy * image.height) == (5, 9)


def test_the_zoom_crop_fills_its_panel():
    assert crop_for_panel(Image.new("RGB", (110, 90))).size == (CROP_SIDE, round(90 * CROP_SIDE / 110))
    assert max(crop_for_panel(Image.new("L", (2000, 1500))).size) == CROP_SIDE


# ---- the tab's handlers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explorer(deit_tiny):
    return Explorer(deit_tiny)


def test_the_api_draws_every_map_block_and_head(explorer, analysis):
    settings = ViewSettings(view="cls", block=4, head="2")
    maps, strip, heads, *texts, session = explorer.compare.compare(str(EXAMPLE), settings=settings)
    assert maps.width > 5 * 192 and strip.height > 2 * 140 and heads.width > 3 * 128
    assert "block 4's (head 2)" in texts[0] and "CLS attention" in texts[1] and "block 4" in texts[2]
    # x, y in the image's pixels: the patch there, in every block.
    *_, strip_text, _, _ = explorer.compare.compare(str(EXAMPLE), 300, 100, settings, session)
    row, col = session.geometry.pixel_to_patch(*session.original_to_display(300, 100))
    assert f"row {row}, column {col}" in strip_text
    with pytest.raises(ZoomViTError, match="outside"):
        explorer.compare.compare(str(EXAMPLE), 5000, 10, settings, session)


def test_a_click_on_a_tile_chooses_it_and_inspects_its_patch(explorer):
    session = explorer.store.session_for(str(EXAMPLE), None)
    settings = ViewSettings(view="rollout", block=-1)
    layout = compare.tile_layout(session.display.size, session.num_layers, compare.STRIP_SIDES)
    x0, y0, x1, y1 = session.geometry.patch_box(6, 4)
    pw, ph = layout.picture
    tx, ty = layout.origin(3)  # block 4's tile
    point = (tx + (x0 + x1) / 2 * pw / session.display.width, ty + (y0 + y1) / 2 * ph / session.display.height)
    out = explorer.compare.click("strip", session, settings, gr.SelectData(None, {"index": point, "value": None}))
    assert len(out) == 14 and out[1] == 4  # the block dropdown
    assert session.patch == (6, 4) and "row 6, column 4" in out[4] and "block 4" in out[4]  # the main caption
    assert "row 6, column 4" in out[12] and "Every head of block 4" in out[13]
    x, y = out[6], out[7]
    assert session.geometry.pixel_to_patch(*session.original_to_display(x, y)) == (6, 4)
    # A map tile's name: that view, the patch kept.
    layout = compare.tile_layout(session.display.size, len(VIEWS), compare.MAP_SIDES)
    tx, ty = layout.origin(2)
    name = (tx + 5, ty + layout.picture[1] + 8)
    out = explorer.compare.click("maps", session, settings, gr.SelectData(None, {"index": name, "value": None}))
    assert out[0] == VIEWS[2][1] and out[1:3] == (gr.skip(), gr.skip()) and session.patch == (6, 4)
    # Beside the tiles (the sheet's margin): nothing changes.
    gap = explorer.compare.click("heads", session, settings, gr.SelectData(None, {"index": (1, 1), "value": None}))
    assert gap == (gr.skip(),) * 14 and session.patch == (6, 4)
    cleared = explorer.compare.clear(session, settings)
    assert session.patch is None and len(cleared) == 9 and "row" not in cleared[1]


def test_the_compare_endpoint_takes_the_image_first_then_plain_values(deit_tiny):
    from app_server import running_app
    from gradio_client import Client, handle_file

    with running_app(deit_tiny) as (_, url):
        client = Client(url, verbose=False)
        maps, strip, heads, maps_text, strip_text, heads_text = client.predict(
            handle_file(str(EXAMPLE)), api_name="/compare"
        )
        with Image.open(maps) as picture:
            assert picture.width > 5 * 192
        assert "Every map" in maps_text and "Block by block" in strip_text and "block 12" in heads_text
        *_, strip_text, heads_text = client.predict(
            handle_file(str(EXAMPLE)),
            x=300,
            y=100,
            direction="attended_by",
            view="cls",
            block=3,
            head="2",
            api_name="/compare",
        )
        assert re.search(r"row \d+, column \d+\*\*, what attends to it", strip_text) and "block 3" in heads_text
