"""Display-sized drawing for the web app: bounded copies, the fast upsampling, the tile sheets, the legend."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from zoomvit import compare, visualization
from zoomvit.geometry import Geometry, upsample_operator

GEOMETRIES = [
    Geometry((500, 375), (341, 256), (58, 16, 224, 224), 16),  # DeiT-style resize + centre crop
    Geometry((101, 67), (56, 56), (4, 4, 48, 48), 8),  # uneven scaling, cropped
    Geometry((224, 224), (224, 224), (0, 0, 224, 224), 16),  # plain resize
    Geometry((64, 40), (70, 40), (-2, 0, 74, 40), 2),  # crop wider than the resized image (padding)
]


@pytest.mark.parametrize(
    "size, side, expected",
    [
        ((2048, 1536), 768, (768, 576)),
        ((300, 200), 768, (300, 200)),
        ((1, 4000), 768, (1, 768)),
    ],
)
def test_fit_size_only_shrinks(size, side, expected):
    assert visualization.fit_size(size, side) == expected


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_resized_view_keeps_patches_in_place(geometry):
    image = Image.new("RGB", geometry.image_size, (10, 20, 30))
    small, small_geometry = visualization.resized_view(image, geometry, 50)
    assert max(small.size) <= 50 and small.size == small_geometry.image_size
    fx, fy = small.width / image.width, small.height / image.height
    gh, gw = geometry.grid
    for row, col in [(0, 0), (gh // 2, gw // 2), (gh - 1, gw - 1)]:
        x0, y0, x1, y1 = geometry.patch_box(row, col)
        np.testing.assert_allclose(small_geometry.patch_box(row, col), (x0 * fx, y0 * fy, x1 * fx, y1 * fy), rtol=1e-6)
        centre = ((x0 + x1) / 2 * fx, (y0 + y1) / 2 * fy)
        if 0 <= centre[0] < small.width and 0 <= centre[1] < small.height:
            assert small_geometry.pixel_to_patch(*centre) == (row, col)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_the_fast_upsampling_is_the_exact_upsampling(geometry):
    assert upsample_operator(geometry) is not None
    maps = np.random.default_rng(0).random((3, *geometry.grid), dtype=np.float32)
    stacked = geometry.upsample(maps)
    for grid_map, fast in zip(maps, stacked):
        np.testing.assert_allclose(geometry.upsample(grid_map), geometry.upsample_exact(grid_map), atol=1e-5)
        np.testing.assert_allclose(fast, geometry.upsample_exact(grid_map), atol=1e-5)


def test_a_sheet_tiles_one_overlay_per_map():
    geometry = GEOMETRIES[0]
    image = Image.new("RGB", geometry.image_size, (0, 160, 0))
    maps = [np.full(geometry.grid, i / 4, dtype=np.float32) for i in range(5)]
    sheet = compare.draw_sheet(
        image, geometry, maps, [f"h{i}" for i in range(5)], compare.HEAD_SIDES, "jet", 1.0, width=720
    )
    layout = sheet.layout
    assert sheet.image.size == layout.size and layout.columns * layout.rows >= 5
    jet = matplotlib.colormaps["jet"]
    pixels = np.asarray(sheet.image).astype(int)
    levels = [round(i / 4 * 255) for i in range(5)]  # the colour table has 256 levels
    pw, ph = layout.picture
    for i in range(5):  # the middle of each tile (inside the crop) has its map's colour at full opacity
        x, y = layout.origin(i)
        np.testing.assert_allclose(pixels[y + ph // 2, x + pw // 2], np.array(jet(levels[i] / 255)[:3]) * 255, atol=1)
    if layout.columns * layout.rows > 5:
        x, y = layout.origin(5)
        assert (pixels[y : y + ph, x : x + pw] == 255).all()  # the unused slot stays blank


def test_colormap_stops_run_low_to_high():
    stops = visualization.colormap_stops("viridis", 5)
    viridis = matplotlib.colormaps["viridis"]
    assert len(stops) == 5
    for stop, t in zip(stops, np.linspace(0, 1, 5)):
        expected = tuple(round(c * 255) for c in viridis(t)[:3])
        assert np.abs(np.array([int(stop[i : i + 2], 16) for i in (1, 3, 5)]) - expected).max() <= 3
