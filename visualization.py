"""Drawing on images: heatmap overlays, boxes, kept/dropped tokens. Plain numpy + PIL, no figures, so it stays
fast on 2048-pixel images."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
from PIL import Image, ImageDraw


def _colour_table(cmap: str) -> np.ndarray:
    """(256, 3) uint8 lookup table: indexing it is much cheaper than calling the colormap per pixel."""
    return (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """Blend `heat` (H x W, values in [0, 1], same size as the image) over the image in a matplotlib colormap."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (image.height, image.width):
        raise ValueError(f"heat map is {heat.shape[::-1]} (w, h) but the image is {image.size}")
    levels = np.rint(np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255).astype(np.uint8)
    coloured = Image.fromarray(_colour_table(cmap)[levels], "RGB")
    return Image.blend(image.convert("RGB"), coloured, alpha)


def draw_box(image: Image.Image, box, color="red", width: int = 3) -> Image.Image:
    """A copy of the image with the rectangle box = (x0, y0, x1, y1), in this image's pixels, outlined."""
    out = image.convert("RGB")  # always a copy
    x0, y0, x1, y1 = (float(c) for c in box)
    ImageDraw.Draw(out).rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=width)
    return out


def patch_outline(image: Image.Image, geometry, row: int, col: int, color="yellow", width: int = 2) -> Image.Image:
    """Outline the part of the image that patch (row, col) sees."""
    return draw_box(image, geometry.patch_box(row, col), color, width)


def token_mask_overlay(image: Image.Image, geometry, kept_mask: np.ndarray, strength: float = 0.75) -> Image.Image:
    """Grey out the patches whose tokens were dropped (kept_mask: grid-shaped bool, True = kept)."""
    kept_mask = np.asarray(kept_mask, dtype=bool)
    if kept_mask.shape != geometry.grid:
        raise ValueError(f"kept_mask is {kept_mask.shape}, the patch grid is {geometry.grid}")
    rgb = image.convert("RGB")
    if rgb.size != geometry.image_size:
        raise ValueError(f"the image is {rgb.size}, the geometry is for {geometry.image_size}")
    dropped = Image.new("1", rgb.size, 0)
    draw = ImageDraw.Draw(dropped)
    for row, col in np.argwhere(~kept_mask):
        # A pixel belongs to the patch that holds its centre: edge e starts at pixel ceil(e - 0.5). Neighbours
        # share their float edges, so the patches tile the image without gaps or overlaps.
        x0, y0, x1, y1 = (math.ceil(c - 0.5) for c in geometry.patch_box(int(row), int(col)))
        if x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=1)
    grey = Image.blend(rgb, Image.new("RGB", rgb.size, (128, 128, 128)), strength)
    return Image.composite(grey, rgb, dropped)
