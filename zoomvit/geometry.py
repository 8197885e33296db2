"""Geometry: original image pixels <-> model input pixels <-> patch grid, and maps back onto the image."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from zoomvit import config
from zoomvit.errors import ImageLoadError, ZoomViTError
from zoomvit.images import LoadedImage

if TYPE_CHECKING:
    from zoomvit.models import ViTBundle


@dataclass(frozen=True)
class Geometry:
    """The processor resizes the image to `resized` then takes `crop` (left, top, width, height) of it.

    The patch grid tiles the crop. Coordinates below are in the (possibly downscaled) working image unless
    they say "original"; `scale` converts: working = original * scale.
    """

    image_size: tuple[int, int]  # working image (width, height)
    resized: tuple[int, int]  # (width, height) after the processor's resize
    crop: tuple[int, int, int, int]  # (left, top, width, height) in resized pixels; may extend past it (padding)
    patch_size: int
    scale: float = 1.0

    @property
    def grid(self) -> tuple[int, int]:
        return self.crop[3] // self.patch_size, self.crop[2] // self.patch_size

    def _ratio(self):
        return self.resized[0] / self.image_size[0], self.resized[1] / self.image_size[1]

    def image_to_input(self, x: float, y: float) -> tuple[float, float]:
        rx, ry = self._ratio()
        return x * rx - self.crop[0], y * ry - self.crop[1]

    def input_to_image(self, u: float, v: float) -> tuple[float, float]:
        rx, ry = self._ratio()
        return (u + self.crop[0]) / rx, (v + self.crop[1]) / ry

    def pixel_to_patch(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the patch that shows working-image pixel (x, y); None outside the model's view."""
        u, v = self.image_to_input(x, y)
        col, row = math.floor(u / self.patch_size), math.floor(v / self.patch_size)
        gh, gw = self.grid
        if 0 <= row < gh and 0 <= col < gw and 0 <= x < self.image_size[0] and 0 <= y < self.image_size[1]:
            return row, col
        return None

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """The working-image box (x0, y0, x1, y1) that patch (row, col) sees."""
        p = self.patch_size
        x0, y0 = self.input_to_image(col * p, row * p)
        x1, y1 = self.input_to_image((col + 1) * p, (row + 1) * p)
        return x0, y0, x1, y1

    def view_box(self) -> tuple[float, float, float, float]:
        """The part of the working image the model sees at all (centre crop)."""
        x0, y0 = self.input_to_image(0, 0)
        x1, y1 = self.input_to_image(self.crop[2], self.crop[3])
        w, h = self.image_size
        return max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)

    def to_original(self, box):
        return tuple(float(c) / self.scale for c in box)

    def upsample(self, grid_map: np.ndarray) -> np.ndarray:
        """A patch-grid map (or a stack of them) as float32 (..., H, W) over the working image; 0 where the model
        sees nothing. Resizing then pasting is linear and separable, so a cached pair of matrices
        (`upsample_operator`) does it in two products, for a whole stack at once; `upsample_exact` is the
        reference those matrices are read from."""
        maps = np.asarray(grid_map, dtype=np.float32)
        operator = upsample_operator(self)
        if operator is not None:
            return operator[0] @ maps @ operator[1].T
        return np.stack([self.upsample_exact(m) for m in maps]) if maps.ndim == 3 else self.upsample_exact(maps)

    def upsample_exact(self, grid_map: np.ndarray) -> np.ndarray:
        """One map through the processor's geometry in reverse: bilinear resize to the crop, paste, resize."""
        grid_map = np.asarray(grid_map, dtype=np.float32)
        left, top, cw, ch = self.crop
        rw, rh = self.resized
        patch_level = Image.fromarray(grid_map, mode="F").resize((cw, ch), Image.Resampling.BILINEAR)
        frame = np.zeros((rh, rw), dtype=np.float32)
        # Paste the crop-sized map where the crop sits in the resized frame (clipped where the crop pads).
        fx0, fy0 = max(0, left), max(0, top)
        fx1, fy1 = min(rw, left + cw), min(rh, top + ch)
        if fx1 > fx0 and fy1 > fy0:
            frame[fy0:fy1, fx0:fx1] = np.asarray(patch_level)[fy0 - top : fy1 - top, fx0 - left : fx1 - left]
        w, h = self.image_size
        if (rw, rh) == (w, h):
            return frame
        return np.asarray(Image.fromarray(frame, mode="F").resize((w, h), Image.Resampling.BILINEAR))


@functools.lru_cache(maxsize=64)
def upsample_operator(geometry: Geometry):
    """Matrices (A_y: H x rows, A_x: W x cols) with geometry.upsample_exact(G) == A_y @ G @ A_x.T, or None.

    One probe per grid row and per grid column recovers them; checked against `upsample_exact` on a random map,
    None (use it directly) if they do not match. Cached per geometry: the app redraws one image many times.
    """
    gh, gw = geometry.grid
    full = geometry.upsample_exact(np.ones((gh, gw), np.float32))
    if not full.size or full.max() <= 0:
        return None
    # full = s_y s_x^T (each axis' weights summed). A column probe gives s_y (A_x e_j)^T, a row probe
    # (A_y e_i) s_x^T: read both through one pixel (row, col) and divide by full[row, col] = s_y[row] s_x[col].
    row, col = np.unravel_index(int(np.argmax(full)), full.shape)
    a_x = np.empty((full.shape[1], gw), np.float32)
    for j in range(gw):
        probe = np.zeros((gh, gw), np.float32)
        probe[:, j] = 1.0
        a_x[:, j] = geometry.upsample_exact(probe)[row, :]
    a_y = np.empty((full.shape[0], gh), np.float32)
    for i in range(gh):
        probe = np.zeros((gh, gw), np.float32)
        probe[i, :] = 1.0
        a_y[:, i] = geometry.upsample_exact(probe)[:, col] / full[row, col]
    check = np.random.default_rng(0).random((gh, gw), dtype=np.float32)
    if np.abs(a_y @ check @ a_x.T - geometry.upsample_exact(check)).max() > 1e-3:
        return None
    a_y.flags.writeable = a_x.flags.writeable = False
    return a_y, a_x


def _size_value(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def geometry_for(bundle: ViTBundle, image_size: tuple[int, int], scale: float = 1.0) -> Geometry:
    """Reproduce the processor's resize + centre crop as numbers (matches its pixel_values exactly)."""
    proc = bundle.processor
    w, h = image_size
    if hasattr(proc, "resize_and_crop"):  # timm's transform states its own resize and crop
        resized, crop = proc.resize_and_crop(w, h)
        return Geometry((w, h), resized, crop, bundle.patch_size, scale)
    rw, rh = w, h
    if getattr(proc, "do_resize", True):
        size = proc.size
        short = _size_value(size, "shortest_edge")
        if _size_value(size, "height") and _size_value(size, "width"):
            rw, rh = _size_value(size, "width"), _size_value(size, "height")
        elif short:
            if w <= h:
                rw, rh = short, int(short * h / w)
            else:
                rw, rh = int(short * w / h), short
        else:
            raise ZoomViTError(f"Unsupported image processor size setting: {size}")
    if getattr(proc, "do_center_crop", False):
        ch, cw = _size_value(proc.crop_size, "height"), _size_value(proc.crop_size, "width")
        crop = ((rw - cw) // 2, (rh - ch) // 2, cw, ch)
    else:
        crop = (0, 0, rw, rh)
    return Geometry((w, h), (rw, rh), crop, bundle.patch_size, scale)


def small_image_note(bundle: ViTBundle, image_size: tuple[int, int]) -> str:
    """A sentence when the image is far below the model's input size (config.SMALL_IMAGE_SHARE); else ""."""
    input_side = min(bundle.input_size)
    if min(image_size) >= config.SMALL_IMAGE_SHARE * input_side:
        return ""
    (w, h), (ih, iw) = image_size, bundle.input_size
    return (
        f"This image is only {w}×{h} pixels, far below the model's {iw}×{ih} input: it is enlarged about "
        f"{input_side / max(1, min(image_size)):.0f}× before the model sees it, so its predictions and maps say little."
    )


def encode(bundle: ViTBundle, loaded: LoadedImage) -> tuple[torch.Tensor, Geometry]:
    """pixel_values exactly as the model's own processor makes them, and the geometry that maps them back."""
    geometry = geometry_for(bundle, loaded.image.size, loaded.scale)
    if geometry.resized[0] * geometry.resized[1] > 64_000_000:
        raise ImageLoadError("Image aspect ratio is too extreme for this model's preprocessing.")
    pixel_values = bundle.processor(images=loaded.image, return_tensors="pt")["pixel_values"]
    if tuple(pixel_values.shape[-2:]) != (geometry.crop[3], geometry.crop[2]):
        raise ZoomViTError(
            f"Unexpected preprocessing: got {tuple(pixel_values.shape[-2:])}, expected "
            f"{(geometry.crop[3], geometry.crop[2])}."
        )
    return bundle.place(pixel_values), geometry
