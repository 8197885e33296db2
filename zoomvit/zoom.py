"""Intent-guided zoom: a box from an importance map, a crop of the original image, and a second look.

Box recipe (all on the patch grid, then mapped to image pixels through the processor's geometry):
1. floor the map at its median (background patches carry no mass), 2. keep the fewest patches that hold
`mass` of what is left, 3. take the 8-connected region holding most of that mass, 4. its bounding box,
padded, grown to a square (the processor would squash or cut a long crop), at least `min_side`, inside
the image.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from zoomvit import config
from zoomvit.errors import ZoomViTError
from zoomvit.geometry import encode
from zoomvit.images import load_image
from zoomvit.maps import floor_at_median, map_spread, normalize_map, top_mass_patches
from zoomvit.vit_analyzer import Analysis, Prediction, predict_pixels, top_predictions

POLICIES = config.ZOOM_POLICIES


def mass_region(grid_map: np.ndarray, mass: float = config.ZOOM_MASS) -> np.ndarray:
    """Boolean grid mask: the 8-connected region holding the most of the map's top-`mass` patches."""
    selected = top_mass_patches(grid_map, mass)
    values = floor_at_median(grid_map)
    best, best_mass = None, -1.0
    seen = np.zeros_like(selected)
    h, w = selected.shape
    for start in zip(*np.nonzero(selected)):
        if seen[start]:
            continue
        region, queue = [], deque([start])
        seen[start] = True
        while queue:
            r, c = queue.popleft()
            region.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and selected[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        region_mass = sum(values[p] for p in region)
        if region_mass > best_mass:
            best, best_mass = region, region_mass
    mask = np.zeros_like(selected)
    mask[tuple(np.array(best).T)] = True
    return mask


def _square_inside(x0, y0, x1, y1, width, height, min_side):
    """Grow the box to a square of at least min_side, shifted (not shrunk) to stay inside the image."""
    side = min(max(x1 - x0, y1 - y0, min_side), width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    nx0 = min(max(cx - side / 2, 0.0), width - side)
    ny0 = min(max(cy - side / 2, 0.0), height - side)
    return nx0, ny0, nx0 + side, ny0 + side


def _pixel_box(box) -> tuple[int, int, int, int]:
    """A box rounded to whole pixels, at least one pixel each way (a tiny image's box can round to nothing)."""
    x0, y0, x1, y1 = (int(round(c)) for c in box)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def box_from_map(
    analysis: Analysis,
    grid_map: np.ndarray,
    mass: float = config.ZOOM_MASS,
    padding: float = config.ZOOM_PADDING,
    min_side: float = config.ZOOM_MIN_SIDE,
) -> tuple[float, float, float, float]:
    """Zoom box in WORKING image pixels (x0, y0, x1, y1) from a patch-grid importance map."""
    rows, cols = np.nonzero(mass_region(grid_map, mass))
    geo = analysis.geometry
    x0, y0, _, _ = geo.patch_box(rows.min(), cols.min())
    _, _, x1, y1 = geo.patch_box(rows.max(), cols.max())
    vx0, vy0, vx1, vy1 = geo.view_box()
    x0, y0, x1, y1 = max(x0, vx0), max(y0, vy0), min(x1, vx1), min(y1, vy1)
    pad_x, pad_y = (x1 - x0) * padding, (y1 - y0) * padding
    width, height = geo.image_size
    return _square_inside(x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y, width, height, min_side * min(width, height))


@dataclass
class ZoomResult:
    box: tuple[float, float, float, float]  # ORIGINAL image pixels
    crop: Image.Image
    before: list[Prediction]
    after: list[Prediction]
    probs_before: np.ndarray
    probs_after: np.ndarray
    probs_crop: np.ndarray  # the crop's own probabilities, whether or not the policy zoomed
    zoomed: bool
    reason: str
    box_area: float  # share of the image the box covers
    source: str  # which map the box came from

    def as_dict(self):
        return {
            "before": [p.as_dict() for p in self.before],
            "after": [p.as_dict() for p in self.after],
            "box": [round(c, 1) for c in self.box],
            "zoomed": self.zoomed,
            "reason": self.reason,
            "box_area": round(self.box_area, 4),
            "source": self.source,
        }


def focus_map(analysis: Analysis) -> np.ndarray:
    """Where the model looks, whatever it decides: geometric mean of max-head rollout and last-layer CLS
    attention. Class-specific maps explain the (often wrong) whole-image decision and so point at the
    evidence for the wrong class; on zoom-bench this class-agnostic map finds the small object far better."""
    return normalize_map(np.sqrt(analysis.rollout(config.ROLLOUT_DISCARD_RATIO, "max") * analysis.cls_map()))


def candidate_maps(analysis: Analysis) -> dict[str, np.ndarray]:
    """Maps whose boxes compete for the zoom: the focus map, max-head rollout and max-head CLS attention."""
    return {
        "focus": focus_map(analysis),
        "rollout_max": analysis.rollout(config.ROLLOUT_DISCARD_RATIO, "max"),
        "cls_max": analysis.cls_map(-1, "max"),
    }


def zoom(
    analysis: Analysis,
    policy: str = "adaptive",
    method: str | None = None,
    max_area: float = config.ZOOM_MAX_AREA,
) -> ZoomResult:
    """Crop where the model looks and classify the crop.

    Candidate boxes come from `candidate_maps` (or only `method`'s map, if given); the crop the model is
    most certain about wins. adaptive: zoom only when that box is small (at most `max_area` of the image)
    and its map concentrated (spread at most config.DIFFUSE_SPREAD), and then predict with both looks,
    ZOOM_WHOLE_WEIGHT * whole-image probabilities + the rest * crop probabilities, so a confident whole
    image is not overruled by an unsure crop; otherwise keep the whole-image prediction.
    always: the crop's own prediction.
    """
    if policy not in POLICIES:
        raise ZoomViTError(f"Unknown zoom policy '{policy}': use one of {POLICIES}.")
    bundle = analysis.bundle
    image = analysis.loaded.image
    maps = candidate_maps(analysis) if method is None else {method: analysis.map(method)}
    boxes = {name: box_from_map(analysis, grid_map) for name, grid_map in maps.items()}
    crops = {name: image.crop(_pixel_box(box)) for name, box in boxes.items()}
    pixels = torch.cat([encode(bundle, load_image(crop))[0] for crop in crops.values()])
    crop_probs = dict(zip(crops, predict_pixels(bundle, pixels)))  # one batched forward for all candidates
    chosen = max(crop_probs, key=lambda name: crop_probs[name].max())
    box, crop, probs_crop = boxes[chosen], crops[chosen], crop_probs[chosen]
    area = (box[2] - box[0]) * (box[3] - box[1]) / (image.width * image.height)
    spread = map_spread(maps[chosen])
    probs_before = analysis.probs
    if policy == "always":
        zoomed, reason = True, "zoom forced"
    elif area > max_area:
        zoomed, reason = False, f"box covers {area:.0%} of the image: the model already sees the object whole"
    elif spread > config.DIFFUSE_SPREAD:
        zoomed, reason = False, f"attention is scattered ({spread:.0%} of patches hold 60% of it)"
    else:
        zoomed, reason = (
            True,
            (
                f"attention is concentrated in a box covering {area:.0%} of the image: "
                f"whole image and crop combined ({config.ZOOM_WHOLE_WEIGHT:.0%} / {1 - config.ZOOM_WHOLE_WEIGHT:.0%})"
            ),
        )
    if policy == "always":
        probs_after = probs_crop
    elif zoomed:
        probs_after = config.ZOOM_WHOLE_WEIGHT * probs_before + (1 - config.ZOOM_WHOLE_WEIGHT) * probs_crop
    else:
        probs_after = probs_before
    return ZoomResult(
        analysis.geometry.to_original(box),
        crop,
        top_predictions(bundle, probs_before),
        top_predictions(bundle, probs_after),
        probs_before,
        probs_after,
        probs_crop,
        zoomed,
        reason,
        float(area),
        chosen,
    )
