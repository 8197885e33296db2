"""Draw the example images the web app offers (synthetic scenes, made here with Pillow: no third-party photos).

    python assets/make_examples.py

Seeded, so a run gives the same pictures. Each scene is something an ImageNet classifier can name; most put
the object in one part of the frame, so that zooming in has something to do.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SIZE = (512, 384)


def _sky(size, top, bottom):
    """A vertical gradient from `top` to `bottom` colour."""
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / max(1, h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


def _noise(img, amount, seed):
    """Mild per-pixel grain so the scenes are not perfectly flat (flat colour looks unnatural to a ViT)."""
    grain = np.random.default_rng(seed).normal(0.0, amount / 10, (img.height, img.width, 1))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def traffic_light():
    img = _sky(SIZE, (120, 170, 230), (200, 225, 245))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 300, 512, 384), fill=(90, 90, 95))  # road
    d.rectangle((326, 150, 334, 330), fill=(60, 60, 60))  # pole
    d.rounded_rectangle((300, 40, 360, 190), radius=10, fill=(30, 30, 30))
    for i, colour in enumerate([(230, 30, 30), (70, 60, 20), (40, 70, 40)]):
        cy = 65 + i * 48
        d.ellipse((312, cy - 18, 348, cy + 18), fill=colour)
    return _noise(img, 40, 1)


def hot_air_balloon():
    img = _sky(SIZE, (70, 130, 210), (180, 215, 240))
    d = ImageDraw.Draw(img)
    cx, cy, r = 150, 120, 70
    stripes = [(220, 40, 40), (250, 200, 40), (40, 120, 220), (250, 250, 250)]
    # Envelope: vertical gores (bands) seen through a round-topped, tapering mask.
    bands = Image.new("RGB", SIZE)
    bd = ImageDraw.Draw(bands)
    band = 2 * r / 7
    for i in range(7):
        bd.rectangle((cx - r + i * band, 0, cx - r + (i + 1) * band, SIZE[1]), fill=stripes[i % 4])
    mask = Image.new("L", SIZE, 0)
    md = ImageDraw.Draw(mask)
    md.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    md.polygon([(cx - r + 4, cy + 20), (cx + r - 4, cy + 20), (cx + 20, cy + 105), (cx - 20, cy + 105)], fill=255)
    img.paste(bands, (0, 0), mask)
    d.line([(cx - 18, cy + 105), (cx - 12, cy + 125)], fill=(60, 40, 20), width=2)
    d.line([(cx + 18, cy + 105), (cx + 12, cy + 125)], fill=(60, 40, 20), width=2)
    d.rectangle((cx - 14, cy + 125, cx + 14, cy + 145), fill=(140, 90, 40))
    d.rectangle((0, 340, 512, 384), fill=(70, 130, 60))
    return _noise(img, 40, 2)


def wall_clock():
    img = Image.new("RGB", SIZE, (215, 205, 185))
    d = ImageDraw.Draw(img)
    cx, cy, r = 360, 140, 80
    d.ellipse((cx - r - 8, cy - r - 8, cx + r + 8, cy + r + 8), fill=(60, 40, 30))
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 250, 245))
    for k in range(12):
        a = math.radians(k * 30)
        r0 = r * (0.78 if k % 3 else 0.7)
        inner = (cx + r0 * math.sin(a), cy - r0 * math.cos(a))
        outer = (cx + r * 0.9 * math.sin(a), cy - r * 0.9 * math.cos(a))
        d.line([inner, outer], fill=(20, 20, 20), width=4 if k % 3 == 0 else 2)
    d.line(
        [(cx, cy), (cx + 40 * math.sin(math.radians(300)), cy - 40 * math.cos(math.radians(300)))],
        fill=(20, 20, 20),
        width=6,
    )
    d.line(
        [(cx, cy), (cx + 62 * math.sin(math.radians(60)), cy - 62 * math.cos(math.radians(60)))],
        fill=(20, 20, 20),
        width=4,
    )
    d.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=(180, 20, 20))
    return _noise(img, 30, 3)


def jack_o_lantern():
    img = Image.new("RGB", SIZE, (20, 15, 30))
    d = ImageDraw.Draw(img)
    cx, cy = 190, 220
    d.ellipse((cx - 110, cy - 85, cx + 110, cy + 85), fill=(235, 120, 20))
    for dx in (-60, -20, 20, 60):  # ribs
        d.arc((cx + dx - 40, cy - 85, cx + dx + 40, cy + 85), 100, 260 if dx < 0 else 280, fill=(190, 90, 10), width=3)
    d.rectangle((cx - 10, cy - 110, cx + 10, cy - 80), fill=(70, 110, 40))
    glow = (255, 220, 90)
    d.polygon([(cx - 60, cy - 10), (cx - 30, cy - 10), (cx - 45, cy - 40)], fill=glow)
    d.polygon([(cx + 30, cy - 10), (cx + 60, cy - 10), (cx + 45, cy - 40)], fill=glow)
    mouth = [(cx - 70, cy + 25), (cx + 70, cy + 25), (cx + 40, cy + 55), (cx, cy + 45), (cx - 40, cy + 55)]
    d.polygon(mouth, fill=glow)
    return _noise(img, 30, 4)


def spider_web():
    img = _sky(SIZE, (25, 35, 30), (60, 80, 60))
    d = ImageDraw.Draw(img)
    cx, cy = 330, 170
    spokes = 16
    for k in range(spokes):
        a = 2 * math.pi * k / spokes
        d.line([(cx, cy), (cx + 260 * math.cos(a), cy + 260 * math.sin(a))], fill=(225, 225, 225), width=1)
    for ring in range(1, 14):
        r = ring * 15
        pts = [
            (cx + r * math.cos(2 * math.pi * k / spokes), cy + r * math.sin(2 * math.pi * k / spokes))
            for k in range(spokes + 1)
        ]
        d.line(pts, fill=(225, 225, 225), width=1)
    return _noise(img.filter(ImageFilter.SMOOTH), 30, 5)


def honeycomb():
    img = Image.new("RGB", SIZE, (120, 75, 20))
    d = ImageDraw.Draw(img)
    r = 22
    h = r * math.sqrt(3)
    for row in range(-1, int(SIZE[1] / h) + 2):
        for col in range(-1, int(SIZE[0] / (1.5 * r)) + 2):
            cx = col * 1.5 * r
            cy = row * h + (h / 2 if col % 2 else 0)
            pts = [
                (cx + (r - 2) * math.cos(math.radians(60 * k)), cy + (r - 2) * math.sin(math.radians(60 * k)))
                for k in range(6)
            ]
            shade = 200 + ((row * 7 + col * 13) % 5) * 10
            d.polygon(pts, fill=(shade, round(shade * 0.68), 30))
    return _noise(img, 30, 6)


SCENES = {
    "traffic_light": traffic_light,
    "hot_air_balloon": hot_air_balloon,
    "wall_clock": wall_clock,
    "jack_o_lantern": jack_o_lantern,
    "spider_web": spider_web,
    "honeycomb": honeycomb,
}


def main():
    for name, draw in SCENES.items():
        path = HERE / f"{name}.jpg"
        draw().save(path, quality=90, optimize=True)
        print(f"wrote {path.relative_to(HERE.parent)} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
