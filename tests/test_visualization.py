"""Overlays and drawings: right colours, right places, the input left untouched."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from zoomvit import compare, visualization
from zoomvit.geometry import Geometry

GREEN = (0, 160, 0)


@pytest.fixture
def image():
    return Image.new("RGB", (100, 60), GREEN)


def test_overlay_colours_follow_the_colormap(image):
    heat = np.zeros((60, 100), dtype=np.float32)
    heat[:, 50:] = 1.0
    jet = matplotlib.colormaps["jet"]
    full = np.asarray(visualization.overlay(image, heat, alpha=1.0)).astype(int)
    np.testing.assert_allclose(full[0, 0], np.array(jet(0.0)[:3]) * 255, atol=1)
    np.testing.assert_allclose(full[0, 99], np.array(jet(1.0)[:3]) * 255, atol=1)
    assert visualization.overlay(image, heat, alpha=0.0).tobytes() == image.tobytes()
    half = np.asarray(visualization.overlay(image, heat, alpha=0.5)).astype(int)
    np.testing.assert_allclose(half[0, 0], (np.array(GREEN) + full[0, 0]) / 2, atol=1)


def test_overlay_refuses_a_map_of_another_size(image):
    with pytest.raises(ValueError):
        visualization.overlay(image, np.zeros((14, 14)))


def test_draw_box_outlines_and_copies(image):
    boxed = visualization.draw_box(image, (10, 20, 40, 50), color=(255, 0, 0), width=2)
    assert boxed.getpixel((10, 30)) == boxed.getpixel((39, 30)) == boxed.getpixel((25, 49)) == (255, 0, 0)
    assert boxed.getpixel((25, 35)) == GREEN  # inside stays
    assert boxed.getpixel((5, 5)) == GREEN  # outside stays
    assert image.getpixel((10, 30)) == GREEN  # the input is not drawn on


def test_patch_outline_follows_the_geometry(image):
    geometry = Geometry((100, 60), (50, 30), (1, 3, 48, 24), 8)  # half-size input, cropped
    x0, y0, x1, y1 = geometry.patch_box(1, 2)
    assert (x0, y0, x1, y1) == (34, 22, 50, 38)
    outlined = visualization.patch_outline(image, geometry, 1, 2, color=(255, 255, 0), width=1)
    assert outlined.getpixel((34, 30)) == outlined.getpixel((42, 37)) == (255, 255, 0)
    assert outlined.getpixel((42, 30)) == GREEN


def test_token_mask_greys_exactly_the_dropped_patches():
    geometry = Geometry((101, 67), (56, 56), (4, 4, 48, 48), 8)  # uneven scaling, cropped: 6x6 grid
    kept = np.random.default_rng(0).random(geometry.grid) < 0.5
    rgb = np.random.default_rng(1).integers(0, 256, (67, 101, 3), dtype=np.uint8)
    out = np.asarray(visualization.token_mask_overlay(Image.fromarray(rgb), geometry, kept))
    changed = (out != rgb).any(-1)
    for y in range(67):
        for x in range(101):
            patch = geometry.pixel_to_patch(x + 0.5, y + 0.5)  # the patch holding the pixel's centre
            expected = patch is not None and not kept[patch]
            # a pixel greys out unless blending leaves it as it was (mid-grey pixels can stay the same)
            assert changed[y, x] == expected or (expected and np.abs(rgb[y, x].astype(int) - 128).max() <= 2)


def test_captions_draw_the_en_dash_and_the_times_sign():
    """Export captions say "Box (267, 1) – (377, 111)": the font must have the glyphs, not draw its missing-glyph
    box (as it does for U+0378, a code point with no character)."""
    image = Image.new("RGB", (400, 60), GREEN)

    def drawn(text):
        return np.asarray(visualization.figure_with_legend(image, None, f"Box (267, 1) {text} (377, 111)"))

    tofu = drawn("\u0378")
    for char in ("\u2013", "\u00d7"):
        assert not np.array_equal(drawn(char), tofu), f"{char!r} is drawn as the missing-glyph box"


def test_the_tiles_of_a_very_wide_image_are_readable_strips():
    """An 8000x200 photo: tiles keep MIN_SHORT_SIDE pixels on their short side (a 128-pixel tile would be 3 high),
    one a row, the sheet wider than its panel (which fits it to its column)."""
    geometry = Geometry((5120, 128), (8960, 224), (4368, 0, 224, 224), 16)
    image = Image.new("RGB", geometry.image_size, GREEN)
    maps = [np.full(geometry.grid, i / 2, dtype=np.float32) for i in range(3)]
    sheet = compare.draw_sheet(image, geometry, maps, ["head 1", "head 2", "head 3"], compare.HEAD_SIDES)
    assert sheet.layout.columns == 1 and sheet.layout.picture == (2560, 64)
    tall = compare.tile_layout((200, 8000), 3, compare.HEAD_SIDES)
    assert min(tall.picture) == 64 and tall.size[1] > compare.SHEET_WIDTH
    # Usual shapes keep their layout: 3 square heads in a row, as large as the sheet allows up to 256.
    square = compare.tile_layout((224, 224), 3, compare.HEAD_SIDES, width=720)
    assert square.columns == 3 and square.picture == (232, 232)


@pytest.mark.parametrize("size", [(16, 12), (20, 200), (3, 4000), (4000, 3)])
def test_a_figure_of_a_tiny_or_narrow_image_has_room_for_its_legend(size):
    """Under ~24 px wide the colour bar had a negative width (ValueError) and a caption wrapped into a 1-px
    column: the image is enlarged (whole factor, nearest) and framed to at least FIGURE_MIN_WIDTH."""
    image = Image.new("RGB", size, (200, 30, 30))
    for cmap in ("jet", None):
        figure = visualization.figure_with_legend(image, cmap, "a caption long enough to be wrapped over lines")
        assert figure.width >= visualization.FIGURE_MIN_WIDTH
        assert max(figure.size) <= max(visualization.FIGURE_MAX_SIDE, *size) + 200
        assert (200, 30, 30) in {figure.getpixel((x, 0)) for x in range(figure.width)}  # the image is on it
