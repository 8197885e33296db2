"""Side-by-side views of one cached analysis: every map as a tile, one map over all blocks, every head of a block.

Pure functions, Analysis + settings -> numbers (`*_maps`) or a `Sheet` (a PIL picture of named tiles, and where
each tile is on it, so a click on it can be traced back to a tile and a point of the image). No model run: they
read the analysis pass's attentions and gradients. The app's Compare tab (`compare_tab`) draws them; the CLI can
save `sheet.image`.

Indices are the library's, 0-based: `block` a layer index (-1 the last), `head` a head index or a fusion over
heads ("mean", "max", "min"), `patch` a (row, col) of the patch grid. The target-class views (gradient-weighted,
intent) explain `analysis.target`: pass `analysis.for_target(t)` for another class (the other views are the same
for every target).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from zoomvit import config, visualization
from zoomvit.images import fit_size

MAP_NAMES = {
    "rollout": "Rollout",
    "grad_rollout": "Gradient-weighted",
    "intent": "Intent",
    "cls": "CLS attention",
    "attention": "Attention",
}
# Maps that fold all blocks into one: over blocks they are shown accumulated through blocks 1..b (the model cut
# after block b); the last tile is the map itself. CLS and attention are one block's own.
ACCUMULATED = ("rollout", "grad_rollout", "intent")

# A tile's picture, its long side in pixels: (at least, at most). The most tiles per row that keep the least.
MAP_SIDES = (192, 256)
STRIP_SIDES = (192, 256)
HEAD_SIDES = (128, 256)
MIN_SHORT_SIDE = 64  # a tile's short side at least: a very wide or tall image gives readable strips, one a row
SHEET_WIDTH = 1200  # the sheets' width (at most, unless one tile needs more): the app's full-width panel
GAP = 8  # between tiles (a selected tile's frame is drawn in it)
MARGIN = 4  # around the sheet
NAME_SIZE = 15  # the tile names' font size
NAME_HEIGHT = 22  # the strip under each picture that holds its name
FRAME = 3  # the selected tile's frame
SELECTED = (249, 115, 22)  # orange, as the app's accent


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the tiles of a sheet are: `count` pictures of `picture` (width, height) pixels, `columns` a row,
    each with its name under it."""

    count: int
    columns: int
    picture: tuple[int, int]

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.columns)

    @property
    def size(self) -> tuple[int, int]:
        pw, ph = self.picture
        return (
            2 * MARGIN + self.columns * pw + (self.columns - 1) * GAP,
            2 * MARGIN + self.rows * (ph + NAME_HEIGHT) + (self.rows - 1) * GAP,
        )

    def origin(self, index: int) -> tuple[int, int]:
        """The top left corner of tile `index`'s picture, in the sheet's pixels."""
        pw, ph = self.picture
        row, col = divmod(index, self.columns)
        return MARGIN + col * (pw + GAP), MARGIN + row * (ph + NAME_HEIGHT + GAP)

    def hit(self, x: float, y: float):
        """What the sheet's pixel (x, y) is on: (tile index, (fx, fy)) on a picture, where fx, fy are the fractions
        of its width and height (0 to 1, the pixel's centre); (tile index, None) on its name; None in a gap."""
        pw, ph = self.picture
        col, row = math.floor((x - MARGIN) / (pw + GAP)), math.floor((y - MARGIN) / (ph + NAME_HEIGHT + GAP))
        index = row * self.columns + col
        if not (0 <= col < self.columns and 0 <= row and index < self.count):
            return None
        x0, y0 = self.origin(index)
        lx, ly = x - x0, y - y0
        if not (0 <= lx < pw and 0 <= ly < ph + NAME_HEIGHT):
            return None
        if ly >= ph:
            return index, None
        return index, ((math.floor(lx) + 0.5) / pw, (math.floor(ly) + 0.5) / ph)


@dataclasses.dataclass(frozen=True)
class Sheet:
    """A picture of named tiles and where they are (`layout.hit` traces a click back to a tile)."""

    image: Image.Image
    names: tuple[str, ...]
    layout: Layout


def _picture_size(image_size, long_side: int) -> tuple[int, int]:
    """The size a tile's picture has for this long side: what `visualization.resized_view` makes of it."""
    return fit_size(image_size, long_side, _short_side(image_size, long_side))


def _short_side(image_size, long_side: int) -> int:
    # fit_size only shrinks to max_side; a min_side this large makes it blow a small image up to long_side too.
    return math.ceil(long_side * min(image_size) / max(1, max(image_size)))


def tile_layout(image_size, count: int, sides=MAP_SIDES, width: int = SHEET_WIDTH) -> Layout:
    """`count` tiles of a picture of `image_size` (width, height): as many a row as `width` holds with a long side
    of at least sides[0] (rows balanced: 12 tiles are 2 rows of 6, not 7 and 5), each as large as that allows, up
    to sides[1]. A short side keeps MIN_SHORT_SIDE pixels: a very wide or tall image's tiles go one a row, wider
    than `width` where they must (the app fits the sheet to its column)."""
    if count < 1:
        raise ValueError("a sheet needs at least one tile")
    least, most = sides
    aspect = image_size[0] / max(1, image_size[1])
    least = max(least, math.ceil(MIN_SHORT_SIDE * max(aspect, 1 / aspect)))
    for columns in range(count, 0, -1):
        columns = math.ceil(count / math.ceil(count / columns))  # balanced rows
        room = (width - 2 * MARGIN - (columns - 1) * GAP) / columns  # picture width a tile may have
        long_side = min(most, math.floor(room / min(1.0, aspect)))
        if long_side >= least:
            return Layout(count, columns, _picture_size(image_size, long_side))
    return Layout(count, 1, _picture_size(image_size, least))


def draw_sheet(
    image: Image.Image,
    geometry,
    grid_maps,
    names,
    sides=MAP_SIDES,
    cmap: str = "jet",
    alpha: float = 0.5,
    patch=None,
    selected: int | None = None,
    width: int = SHEET_WIDTH,
) -> Sheet:
    """One overlay per patch-grid map (values in [0, 1]) on `image` (drawn through `geometry`, made for its
    size), each with its name under it; `patch` (row, col) outlined on every tile, tile `selected` framed."""
    names = tuple(str(name) for name in names)
    grid_maps = list(grid_maps)
    if len(names) != len(grid_maps):
        raise ValueError(f"{len(grid_maps)} maps but {len(names)} names")
    layout = tile_layout(image.size, len(grid_maps), sides, width)
    long_side = max(layout.picture)
    small, small_geometry = visualization.resized_view(image, geometry, long_side, _short_side(image.size, long_side))
    sheet = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = visualization.label_font(NAME_SIZE)
    pw, ph = layout.picture
    for index, (grid_map, name) in enumerate(zip(grid_maps, names)):
        picture = visualization.heat_overlay(small, small_geometry, grid_map, cmap, alpha)
        if patch is not None:
            picture = visualization.patch_outline(picture, small_geometry, *patch, color="white", width=2)
        x, y = layout.origin(index)
        sheet.paste(picture, (x, y))
        colour = SELECTED if index == selected else (40, 40, 40)
        if index == selected:
            draw.rectangle(
                (x - FRAME, y - FRAME, x + pw + FRAME - 1, y + ph + FRAME - 1), outline=SELECTED, width=FRAME
            )
        draw.text(
            (x + pw / 2, y + ph + NAME_HEIGHT / 2 + 1),
            _fitted(draw, name, font, pw),
            fill=colour,
            font=font,
            anchor="mm",
        )
    return Sheet(sheet, names, layout)


def _fitted(draw, text: str, font, width: int) -> str:
    """The name, cut with an ellipsis where it is wider than its tile."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _picture(analysis, image, geometry):
    if image is None:
        return analysis.loaded.image, analysis.geometry
    if geometry is None:
        raise ValueError("give the geometry made for `image` with it")
    return image, geometry


# ---- every map -------------------------------------------------------------------------------------------


def map_tiles(
    analysis,
    views=config.MAP_METHODS,
    names=None,
    block: int = -1,
    head="mean",
    discard_ratio: float = config.ROLLOUT_DISCARD_RATIO,
    cmap: str = "jet",
    alpha: float = 0.5,
    patch=None,
    selected: str | None = None,
    image=None,
    geometry=None,
    width: int = SHEET_WIDTH,
) -> Sheet:
    """Every map of `views` (rollout, grad_rollout, intent, cls, attention) side by side, named by `names`
    (default MAP_NAMES). block/head: for the one-block maps (CLS, attention), the head for rollout too.
    patch: outlined on each; selected: the view whose tile is framed. image/geometry: the picture to draw on
    (default the analysed image; the app passes its display copy and that copy's geometry)."""
    views = list(views)
    names = [MAP_NAMES.get(v, v) for v in views] if names is None else list(names)
    maps = [analysis.map(view, block, head, float(discard_ratio)) for view in views]
    image, geometry = _picture(analysis, image, geometry)
    chosen = views.index(selected) if selected in views else None
    return draw_sheet(image, geometry, maps, names, MAP_SIDES, cmap, alpha, patch, chosen, width)


# ---- one map over all blocks -----------------------------------------------------------------------------


def through_block(analysis, blocks: int):
    """The analysis of the model's first `blocks` blocks (1..L): the same pass, its later blocks left out (their
    attention and gradient; the gradients stay those of the whole model's output). No copy of the arrays."""
    total = analysis.attentions.shape[0]
    if not 1 <= blocks <= total:
        raise ValueError(f"blocks must be in 1..{total}, got {blocks}")
    if blocks == total:
        return analysis
    return dataclasses.replace(
        analysis,
        attentions=analysis.attentions[:blocks],
        attention_grads=analysis.attention_grads[:blocks],
        _graph=None,
        _cache={},
    )


def block_maps(
    analysis,
    view: str,
    head="mean",
    discard_ratio: float = config.ROLLOUT_DISCARD_RATIO,
    patch=None,
    direction: str = "attends_to",
) -> list[np.ndarray]:
    """One patch-grid map per block, 1..L. With `patch`: what that patch attends to in each block (direction
    "attends_to") or what attends to it ("attended_by"), whatever the view, as the app's click shows. Otherwise
    the view: rollout, grad_rollout and intent accumulated through blocks 1..b, cls and attention block b's own."""
    layers = range(analysis.attentions.shape[0])
    if patch is not None:
        pick = analysis.attending_patch if direction == "attended_by" else analysis.attended_by_patch
        return [pick(*patch, layer, head) for layer in layers]
    if view in ACCUMULATED:
        return [through_block(analysis, layer + 1).map(view, -1, head, float(discard_ratio)) for layer in layers]
    return [analysis.map(view, layer, head, float(discard_ratio)) for layer in layers]


def block_names(count: int, view: str, patch=None) -> list[str]:
    if patch is None and view in ACCUMULATED:
        return ["block 1"] + [f"blocks 1–{b}" for b in range(2, count + 1)]
    return [f"block {b}" for b in range(1, count + 1)]


def block_strip(
    analysis,
    view: str,
    head="mean",
    discard_ratio: float = config.ROLLOUT_DISCARD_RATIO,
    patch=None,
    direction: str = "attends_to",
    cmap: str = "jet",
    alpha: float = 0.5,
    selected: int | None = None,
    image=None,
    geometry=None,
    width: int = SHEET_WIDTH,
) -> Sheet:
    """`block_maps` as a sheet, block 1 first, each tile named by its block(s); `selected` (a layer index, -1 the
    last) is framed. Arguments as in `block_maps` and `map_tiles`."""
    maps = block_maps(analysis, view, head, discard_ratio, patch, direction)
    image, geometry = _picture(analysis, image, geometry)
    chosen = None if selected is None else int(selected) % len(maps)
    return draw_sheet(
        image, geometry, maps, block_names(len(maps), view, patch), STRIP_SIDES, cmap, alpha, patch, chosen, width
    )


# ---- every head of a block ----------------------------------------------------------------------------------


def head_maps(analysis, block: int = -1, patch=None, direction: str = "attends_to") -> list[np.ndarray]:
    """One map per head of the block: what the class token reads, or with `patch` what the patch attends to (or
    what attends to it), as the app's all-heads grid."""
    heads = range(analysis.attentions.shape[1])
    if patch is None:
        return [analysis.cls_map(block, h) for h in heads]
    pick = analysis.attending_patch if direction == "attended_by" else analysis.attended_by_patch
    return [pick(*patch, block, h) for h in heads]


def heads_grid(
    analysis,
    block: int = -1,
    patch=None,
    direction: str = "attends_to",
    cmap: str = "jet",
    alpha: float = 0.5,
    selected: int | None = None,
    image=None,
    geometry=None,
    width: int = SHEET_WIDTH,
) -> Sheet:
    """`head_maps` as a sheet of tiles named "head 1".."head H"; `selected` (a head index) framed."""
    maps = head_maps(analysis, block, patch, direction)
    image, geometry = _picture(analysis, image, geometry)
    chosen = None if selected is None else int(selected) % len(maps)
    names = [f"head {h}" for h in range(1, len(maps) + 1)]
    return draw_sheet(image, geometry, maps, names, HEAD_SIDES, cmap, alpha, patch, chosen, width)
