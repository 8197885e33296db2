"""Drawing on images: heatmap overlays, boxes, kept/dropped tokens. Plain numpy + PIL (so they stay
fast on 2048-pixel images), and the evaluation plots (matplotlib figures)."""

from __future__ import annotations

import dataclasses
import functools
import math

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from zoomvit.images import fit_size  # the loader bounds images with it too; the app sizes its views with it


@functools.lru_cache(maxsize=32)
def _colour_table(cmap: str) -> np.ndarray:
    """(256, 3) uint8 lookup table: indexing it is much cheaper than calling the colormap per pixel.

    Cached per colormap name (read-only: callers only index it)."""
    table = (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    table.flags.writeable = False
    return table


def _levels(heat: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 0..255 colour levels (NaN as 0, out-of-range values clipped)."""
    levels = np.nan_to_num(np.asarray(heat, dtype=np.float32) * np.float32(255.0))
    return np.rint(np.clip(levels, 0.0, 255.0, out=levels), out=levels).astype(np.uint8)


def _colourize(levels: np.ndarray, cmap: str) -> Image.Image:
    """Levels through the colormap, as an RGB image (a palette lookup in Pillow: no per-pixel numpy indexing)."""
    coloured = Image.fromarray(levels, "L")
    coloured.putpalette(_colour_table(cmap).tobytes())  # mode P: each level is its colour
    return coloured.convert("RGB")


def overlay(image: Image.Image, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """Blend `heat` (H x W, values in [0, 1], same size as the image) over the image in a matplotlib colormap."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (image.height, image.width):
        raise ValueError(f"heat map is {heat.shape[::-1]} (w, h) but the image is {image.size}")
    return Image.blend(image.convert("RGB"), _colourize(_levels(heat), cmap), alpha)


def draw_box(image: Image.Image, box, color="red", width: int = 3) -> Image.Image:
    """A copy of the image with the rectangle box = (x0, y0, x1, y1), in this image's pixels, outlined.

    A box under one pixel wide (a patch of a tiny image) is drawn one pixel wide rather than refused."""
    out = image.convert("RGB")  # always a copy
    x0, y0, x1, y1 = (float(c) for c in box)
    ImageDraw.Draw(out).rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=color, width=width)
    return out


def draw_zoom_boxes(image: Image.Image, result, to_pixels) -> Image.Image:
    """The zoom as the app and the CLI show it: every candidate box thin and white, the winner (the zoom's box) red
    and thick on top. `to_pixels` maps a box in original image pixels to this image's pixels."""
    out = image
    for candidate in result.candidates:
        if candidate.box != result.box:
            out = draw_box(out, to_pixels(candidate.box), color=(255, 255, 255), width=max(1, image.width // 400))
    return draw_box(out, to_pixels(result.box), color=(255, 40, 40), width=max(3, image.width // 200))


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


# ----------------------------------------------------------------------------------------------------------
# Display-sized rendering (the web app): draw on a bounded copy of the image, never on the full-size one
# ----------------------------------------------------------------------------------------------------------


def resized_view(image: Image.Image, geometry, max_side: int, min_side: int = 0):
    """A copy of the image at most max_side pixels on its longest side (and, for tiny images, blown up to
    min_side on its shortest), and the geometry for that copy.

    The patch grid, crop and resize are the model's; only the image side of the mapping changes, so
    `pixel_to_patch`, `patch_box` and `upsample` of the returned geometry work in the copy's pixels.
    """
    size = fit_size(image.size, max_side, min_side)
    # Blown-up pixels stay sharp squares: a tiny image shows what the model was given.
    resample = Image.Resampling.NEAREST if size[0] > image.width else Image.Resampling.BILINEAR
    small = image.convert("RGB") if size == image.size else image.resize(size, resample)
    factor = size[0] / geometry.image_size[0]
    return small, dataclasses.replace(geometry, image_size=size, scale=geometry.scale * factor)


def heat_overlay(image: Image.Image, geometry, grid_map: np.ndarray, cmap: str = "jet", alpha: float = 0.5):
    """A patch-grid map upsampled through `geometry` (made for this image's size) and blended over it."""
    return overlay(image, geometry.upsample(grid_map), cmap, alpha)


@functools.lru_cache(maxsize=1)
def _font_file() -> str | None:
    """DejaVu Sans, which matplotlib ships: it has the en dash, ×, … that captions use (Pillow's own font lacks
    them and draws a box)."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # noqa: BLE001 - then Pillow's own font
        return None


def _font(size: int):
    try:
        return ImageFont.truetype(_font_file(), size)
    except (TypeError, ValueError, AttributeError, OSError, ImportError):
        pass
    try:
        return ImageFont.load_default(size=size)  # Pillow's built-in scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def label_font(size: int):
    """The font captions and tile names are drawn in, at `size` pixels."""
    return _font(size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


FIGURE_MIN_WIDTH = 320  # a saved figure's narrowest width (pixels)
FIGURE_MAX_SIDE = 4096  # ... and the most an enlargement may make of its longest side


def _at_least(image: Image.Image, width: int) -> Image.Image:
    """The image enlarged by a whole factor (its longest side at most FIGURE_MAX_SIDE) and then, if still
    narrower than `width`, centred on a white band that wide."""
    factor = min(math.ceil(width / image.width), max(1, FIGURE_MAX_SIDE // max(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    if image.width < width:
        band = Image.new("RGB", (width, image.height), (255, 255, 255))
        band.paste(image, ((width - image.width) // 2, 0))
        image = band
    return image


def figure_with_legend(image: Image.Image, cmap: str | None = "jet", caption: str = "") -> Image.Image:
    """The image with a colorbar ("less important" to "more important", when cmap is given) and a wrapped
    caption below it: a picture that still says what it shows once it is saved and shared. A small image is
    enlarged (nearest neighbour: its pixels stay visible) and, if still narrow, framed in white, to at least
    FIGURE_MIN_WIDTH: the colour bar and the caption need the room."""
    image = _at_least(image.convert("RGB"), FIGURE_MIN_WIDTH)
    width = image.width
    unit = max(12, width // 64)
    font = _font(unit)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = unit
    lines = _wrap(probe, caption, font, width - 2 * margin) if caption else []
    bar_height = 2 * unit if cmap else 0
    label_height = int(unit * 1.4) if cmap else 0
    text_height = int(len(lines) * unit * 1.35)
    height = image.height + margin + bar_height + label_height + text_height + margin
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    sheet.paste(image, (0, 0))
    draw = ImageDraw.Draw(sheet)
    y = image.height + margin
    if cmap:
        ramp = np.tile(np.linspace(0, 255, width - 2 * margin).round().astype(np.uint8), (bar_height, 1))
        sheet.paste(_colourize(ramp, cmap), (margin, y))
        y += bar_height
        draw.text((margin, y), "less important", fill=(0, 0, 0), font=font)
        draw.text((width - margin, y), "more important", fill=(0, 0, 0), font=font, anchor="ra")
        y += label_height
    for line in lines:
        draw.text((margin, y), line, fill=(0, 0, 0), font=font)
        y += int(unit * 1.35)
    return sheet


def colormap_stops(cmap: str = "jet", count: int = 9) -> list[str]:
    """`count` evenly spaced colours of the colormap, low to high, as '#rrggbb' (for a legend)."""
    table = _colour_table(cmap)
    return ["#" + "".join(f"{int(c):02x}" for c in table[i]) for i in np.linspace(0, 255, count).round().astype(int)]


# ---- evaluation plots -------------------------------------------------------------------------------------
# Bare matplotlib Figures (no pyplot): no global state, safe in a server thread, saved with fig.savefig.


def plot_pruning(summary: dict) -> Figure:
    """Top-1 against MACs for every pruning mode and criterion; random is dashed, the unpruned model a line."""
    entries = summary["prune"]
    modes = list(dict.fromkeys(e["mode"] for e in entries))
    fig = Figure(figsize=(5.0 * len(modes), 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(modes), sharey=True))
    for ax, mode in zip(axes, modes):
        for criterion in dict.fromkeys(e["criterion"] for e in entries if e["mode"] == mode):
            points = sorted(
                (e["macs_ratio"], 100 * e["top1"]) for e in entries if (e["mode"], e["criterion"]) == (mode, criterion)
            )
            style = {"color": "grey", "linestyle": "--"} if criterion == "random" else {}
            ax.plot(*zip(*points), marker="o", label=criterion, **style)
        ax.axhline(100 * summary["top1"], color="black", linewidth=0.8, label="unpruned")
        ax.set_title(f"{mode} mode, pruned after block {summary['settings']['after_block']}")
        ax.set_xlabel("MACs / unpruned MACs")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("top-1 (%)")
    fig.suptitle(f"{_data_name(summary)}: top-1 vs compute (n = {summary['n']})")
    return fig


def plot_zoom(summary: dict) -> Figure:
    """Top-1 before and after adaptive zoom (and of the crop alone), for all items and each group."""
    z = summary["zoom"]
    blocks = [("all", z)] + [
        (v if column == "background" else f"{column} {v}", b)
        for column, groups in z.get("groups", {}).items()
        for v, b in groups.items()
    ]
    # wide enough for the legend's one row (it sits below the axes, where it covers no bar and no value)
    fig = Figure(figsize=(max(3.8, 1.6 + 1.3 * len(blocks)), 4.1), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(blocks))
    bars = (("whole image", "top1_before"), ("adaptive zoom", "top1_after"), ("crop only", "top1_crop"))
    for i, (label, key) in enumerate(bars):
        values = [100 * b[key] for _, b in blocks]
        drawn = ax.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
        ax.bar_label(drawn, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [f"{name}\n(n={b['n']})" for name, b in blocks])
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 110)  # room for the values above bars of 100%
    ax.set_yticks(range(0, 101, 20))
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(bars), fontsize=8)
    ax.set_title(f"{_data_name(summary)}: zoom")
    return fig


def plot_faithfulness(summary: dict) -> Figure:
    """Mean deletion and insertion curves of every map, AUCs in the legend."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        for e in summary["faithfulness"]:
            curve = np.asarray(e[f"{kind}_curve"])
            style = {"color": "grey", "linestyle": "--"} if e["method"] == "random" else {}
            label = f"{e['method']} ({100 * e[f'{kind}_auc']:.1f})"
            ax.plot(np.linspace(0, 100, len(curve)), curve, marker=".", label=label, **style)
        ax.set_title(f"{kind} (AUC x 100 in brackets, {better} is better)")
        ax.set_xlabel(f"% of pixels {'removed' if kind == 'deletion' else 'restored'}, most important first")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("probability of the predicted class")
    fig.suptitle(f"{_data_name(summary)}: map faithfulness (n = {summary['n']})")
    return fig


def plot_sanity(summary: dict) -> Figure:
    """The sanity checks: each map's mean rank correlation with the intact model's map against how much of the
    model is random, the pass threshold dashed."""
    sanity = summary["sanity"]
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(sanity["levels"]))
    for e in sanity["maps"]:
        ax.plot(x, e["spearman"], marker="o", label=e["map"])
    ax.axhline(sanity["threshold"], color="grey", linestyle="--", linewidth=0.8, label="pass threshold")
    ax.set_xticks(x, sanity["levels"], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("randomised (cumulatively, from the top)")
    ax.set_ylabel("Spearman rank correlation with the intact map")
    lowest = min(min(e["spearman"]) for e in sanity["maps"])
    ax.set_ylim(min(-0.3, lowest - 0.05), 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{_data_name(summary)}: sanity checks, model randomisation (n = {summary['n']})")
    return fig


def _data_name(summary: dict) -> str:
    return summary["data"].rstrip("/").split("/")[-1]
