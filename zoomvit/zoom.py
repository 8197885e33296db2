"""Intent-guided zoom: a box from an importance map, a crop of the original image, and a second look.

Box recipe (all on the patch grid, then mapped to image pixels through the processor's geometry):
1. floor the map at its median (background patches carry no mass), 2. keep the fewest patches that hold
`mass` of what is left, 3. take the 8-connected region holding most of that mass, 4. its bounding box,
padded, grown to a square (the processor would squash or cut a long crop), at least `min_side`, inside
the image.

Policies (see `zoom`): confident (the default) classifies tight boxes (no padding) of the focus and key-similarity
maps and uses the most confident crop only when it beats the whole image by a margin; adaptive (the earlier rule)
and always use padded boxes of three attention maps. docs/zoom.md has how the default was chosen.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

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
    """Zoom box in WORKING image pixels (x0, y0, x1, y1) from a patch-grid importance map. Its side is at least
    `min_side` of the shorter image side and at least one patch's pixels (`patch_size`; the whole image side when
    the image is smaller): a crop of a few pixels, blown up to the model's input, shows the model nothing."""
    rows, cols = np.nonzero(mass_region(grid_map, mass))
    geo = analysis.geometry
    x0, y0, _, _ = geo.patch_box(rows.min(), cols.min())
    _, _, x1, y1 = geo.patch_box(rows.max(), cols.max())
    vx0, vy0, vx1, vy1 = geo.view_box()
    x0, y0, x1, y1 = max(x0, vx0), max(y0, vy0), min(x1, vx1), min(y1, vy1)
    pad_x, pad_y = (x1 - x0) * padding, (y1 - y0) * padding
    width, height = geo.image_size
    least = max(min_side * min(width, height), geo.patch_size)
    return _square_inside(x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y, width, height, least)


@dataclass
class Candidate:
    """One box the zoom considered: the map (and mass) it came from, the box, and how sure the model is of its
    crop (the crop's top probability)."""

    source: str
    box: tuple[float, float, float, float]  # ORIGINAL image pixels
    confidence: float

    def as_dict(self):
        return {"source": self.source, "box": [round(c, 1) for c in self.box], "confidence": round(self.confidence, 4)}


@dataclass
class ZoomResult:
    box: tuple[float, float, float, float]  # ORIGINAL image pixels: the winning candidate's
    crop: Image.Image
    before: list[Prediction]
    after: list[Prediction]
    probs_before: np.ndarray
    probs_after: np.ndarray
    probs_crop: np.ndarray  # the crop's own probabilities, whether or not the policy zoomed
    zoomed: bool
    reason: str  # why the crop was or was not used, in numbers
    box_area: float  # share of the image the box covers
    source: str  # which map the box came from
    policy: str = "adaptive"
    candidates: list[Candidate] = field(default_factory=list)  # every box classified; `box` is the winner's
    crop_top: Prediction | None = None  # the crop's own top class
    margin: float | None = None  # the confident policy's: how much surer the crop must make the model
    forward_units: float = 0.0  # block multiply-adds relative to one full-size forward, the analysis pass as 1
    seconds: float = 0.0  # the zoom's own time (the analysis pass is not counted)

    @property
    def gain(self) -> float:
        """The crop's top probability less the whole image's."""
        return float(self.probs_crop.max() - self.probs_before.max())

    def __repr__(self):  # the arrays and the crop would fill a screen
        return (
            f"ZoomResult(policy={self.policy!r}, zoomed={self.zoomed}, box={tuple(round(c, 1) for c in self.box)}, "
            f"source={self.source!r}, reason={self.reason!r}, forward_units={self.forward_units:.2f})"
        )

    def as_dict(self):
        return {
            "policy": self.policy,
            "before": [p.as_dict() for p in self.before],
            "after": [p.as_dict() for p in self.after],
            "box": [round(c, 1) for c in self.box],
            "zoomed": self.zoomed,
            "reason": self.reason,
            "box_area": round(self.box_area, 4),
            "source": self.source,
            "whole": self.before[0].as_dict(),
            "crop": self.crop_top.as_dict() if self.crop_top else None,
            "gain": round(self.gain, 4),
            "margin": self.margin,
            "candidates": [c.as_dict() for c in self.candidates],
            "winner": next((i for i, c in enumerate(self.candidates) if c.box == self.box), None),
            "forward_units": round(self.forward_units, 3),
            "ms": round(1000 * self.seconds, 1),
        }


def focus_map(analysis: Analysis) -> np.ndarray:
    """Where the model looks, whatever it decides: geometric mean of max-head rollout and last-layer CLS
    attention. Class-specific maps explain the (often wrong) whole-image decision and so point at the
    evidence for the wrong class; on zoom-bench this class-agnostic map finds the small object far better."""
    return normalize_map(np.sqrt(analysis.rollout(config.ROLLOUT_DISCARD_RATIO, "max") * analysis.cls_map()))


def key_similarity_map(analysis: Analysis, seeds: int = config.ZOOM_KEY_SEEDS) -> np.ndarray:
    """Where the object is by what the patches' keys share, not by attention mass (LOST, Simeoni et al. 2021):
    in the last block the patch whose key correlates positively with the fewest others is the seed; the map is
    each patch's positive correlation with those of the `seeds` lowest-degree patches that correlate with the
    seed. On the zoom-bench dev set its boxes find small objects on sharp backgrounds that attention misses."""
    adapter = analysis.bundle.adapter
    parts = adapter.parts(adapter.layers[-1])
    with torch.no_grad():
        hidden = analysis.bundle.place(torch.from_numpy(analysis.hidden_states[-2][None]))  # the model's device
        _, keys, _ = parts.qkv(parts.norm1(hidden))  # (1, heads, N, head_dim)
    keys = keys[0].permute(1, 0, 2).reshape(keys.shape[2], -1)[analysis.num_special :].float().cpu()
    keys = torch.nn.functional.normalize(keys, dim=-1)
    similarity = keys @ keys.T
    degree = (similarity > 0).sum(-1)
    seed = int(degree.argmin())
    lowest = torch.argsort(degree)[:seeds]
    near = lowest[similarity[seed, lowest] > 0]
    score = similarity[near].sum(0).clamp(min=0).numpy()
    return normalize_map(score.reshape(analysis.grid))


ZOOM_MAPS = {  # the maps a zoom box may come from, by the names config.ZOOM_CANDIDATES uses
    "focus": focus_map,
    "rollout_max": lambda analysis: analysis.rollout(config.ROLLOUT_DISCARD_RATIO, "max"),
    "cls_max": lambda analysis: analysis.cls_map(-1, "max"),
    "keys": key_similarity_map,
}


def candidate_maps(analysis: Analysis) -> dict[str, np.ndarray]:
    """The adaptive policy's maps: the focus map, max-head rollout and max-head CLS attention."""
    return {name: ZOOM_MAPS[name](analysis) for name in ("focus", "rollout_max", "cls_max")}


def _candidate_boxes(analysis: Analysis, policy: str, method: str | None) -> dict[str, tuple]:
    """source -> box in WORKING pixels, each distinct box once (the first source that gave it names it)."""
    if method is not None:
        return {method: box_from_map(analysis, analysis.map(method))}
    if policy == "confident":  # tight boxes (no padding) from the maps and masses the dev-set study chose
        maps = {name: ZOOM_MAPS[name](analysis) for name, _ in config.ZOOM_CANDIDATES}
        found = {
            f"{name} (mass {mass:g})": box_from_map(analysis, maps[name], mass=mass, padding=0.0)
            for name, mass in config.ZOOM_CANDIDATES
        }
    else:
        found = {name: box_from_map(analysis, grid_map) for name, grid_map in candidate_maps(analysis).items()}
    boxes = {}
    for source, box in found.items():
        if box not in boxes.values():
            boxes[source] = box
    return boxes


def forward_units(bundle, pixel_values: list[torch.Tensor]) -> float:
    """What a zoom costs in forward passes: block multiply-adds of the crops' forwards relative to one forward
    at the model's input size, plus 1 for the analysis pass (its backward not counted: the zoom's maps need
    only the forward's attentions). A crop classified at half the side costs about a quarter."""
    adapter = bundle.adapter
    tokens = lambda height, width: bundle.num_special + (height // bundle.patch_size) * (width // bundle.patch_size)
    full = adapter.block_macs(tokens(*adapter.input_size))
    return 1.0 + sum(adapter.block_macs(tokens(*p.shape[-2:])) * p.shape[0] for p in pixel_values) / full


def zoom(
    analysis: Analysis,
    policy: str = config.ZOOM_POLICY,
    method: str | None = None,
    max_area: float = config.ZOOM_MAX_AREA,
    margin: float = config.ZOOM_MARGIN,
) -> ZoomResult:
    """Crop where the model looks and classify the crop.

    Every policy classifies its candidate boxes' crops in one batched forward, and the crop the model is most
    certain of wins. confident: tight boxes from config.ZOOM_CANDIDATES (the focus map and the key-similarity
    map); the crop's prediction is used only when its top probability beats the whole image's by `margin`.
    adaptive (the earlier default): padded boxes from `candidate_maps` (or only `method`'s map, if given); zoom
    only when the box is small (at most `max_area` of the image) and its map concentrated (spread at most
    config.DIFFUSE_SPREAD), and then predict ZOOM_WHOLE_WEIGHT * whole-image probabilities + the rest * crop
    probabilities. always: the crop's own prediction.
    """
    if policy not in POLICIES:
        raise ZoomViTError(f"Unknown zoom policy '{policy}': use one of {', '.join(POLICIES)}.")
    started = time.perf_counter()
    bundle, image = analysis.bundle, analysis.loaded.image
    boxes = _candidate_boxes(analysis, policy, method)
    crops = {name: image.crop(_pixel_box(box)) for name, box in boxes.items()}
    pixels = [encode(bundle, load_image(crop))[0] for crop in crops.values()]
    crop_probs = dict(zip(crops, predict_pixels(bundle, torch.cat(pixels))))  # one batched forward
    chosen = max(crop_probs, key=lambda name: crop_probs[name].max())
    box, crop, probs_crop = boxes[chosen], crops[chosen], crop_probs[chosen]
    area = (box[2] - box[0]) * (box[3] - box[1]) / (image.width * image.height)
    probs_before = analysis.probs
    if policy == "confident":
        zoomed, reason = _confident(probs_before, probs_crop, margin)
        probs_after = probs_crop if zoomed else probs_before
    else:
        zoomed, reason, probs_after = _adaptive(policy, probs_before, probs_crop, area, max_area, chosen, analysis)
    geometry = analysis.geometry
    return ZoomResult(
        geometry.to_original(box),
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
        policy=policy,
        candidates=[Candidate(n, geometry.to_original(boxes[n]), float(crop_probs[n].max())) for n in boxes],
        crop_top=top_predictions(bundle, probs_crop, 1)[0],
        margin=margin if policy == "confident" else None,
        forward_units=forward_units(bundle, pixels),
        seconds=time.perf_counter() - started,
    )


def _confident(probs_whole: np.ndarray, probs_crop: np.ndarray, margin: float) -> tuple[bool, str]:
    """The confident policy's decision and its reason, in the numbers it compared."""
    whole, crop = float(probs_whole.max()), float(probs_crop.max())
    gain = crop - whole
    compared = f"crop {crop:.2f} vs whole {whole:.2f}: {gain:+.2f}"
    if gain > margin:
        return True, f"{compared}, over the {margin:.2f} margin: the crop decides"
    return False, f"{compared}, not over the {margin:.2f} margin: the whole image stands"


def _adaptive(policy, probs_before, probs_crop, area, max_area, chosen, analysis):
    """The adaptive and always policies' decision: (zoomed, reason, probabilities after)."""
    if policy == "always":
        return True, "zoom forced", probs_crop
    if area > max_area:
        return False, f"box covers {area:.0%} of the image: the model already sees the object whole", probs_before
    spread = map_spread(ZOOM_MAPS[chosen](analysis) if chosen in ZOOM_MAPS else analysis.map(chosen))
    if spread > config.DIFFUSE_SPREAD:
        return False, f"attention is scattered ({spread:.0%} of patches hold 60% of it)", probs_before
    weight = config.ZOOM_WHOLE_WEIGHT
    reason = (
        f"attention is concentrated in a box covering {area:.0%} of the image: "
        f"whole image and crop combined ({weight:.0%} / {1 - weight:.0%})"
    )
    return True, reason, weight * probs_before + (1 - weight) * probs_crop
