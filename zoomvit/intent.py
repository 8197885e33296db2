"""Diagnosis of the model's intent: good alignment, inverted intent, or diffuse intent.

Measured on the intent map of the predicted class (floored at its median, treated as a distribution):
- spread: the share of patches needed to hold 60% of the map's mass (uniform map: 0.6; one patch: ~0.005);
- focus: the share of that top-60% mass lying in its largest 8-connected region (one blob: 1).
  diffuse  <=>  spread > config.DIFFUSE_SPREAD (as spread as noise) or focus < config.DIFFUSE_FOCUS (the
  importance is split over several separate places, none of them holding much of it).
- inverted: with a ground-truth object box, the share of mass inside the box is below one half (most of the
  importance sits outside the object). Without a box, the place the model looks does not support its own
  decision: the crop of the intent map's own box (`zoom.box_from_map` of that map, padded like the zoom's),
  classified alone, gives the predicted class less than half its whole-image probability and predicts something
  else. The region judged (the object box, or the intent map's box) is kept in `Diagnosis.region`, so a view draws
  the region the sentence names.
- good: neither.
Diffuse is checked first: a scattered map has no place to be "inside" or "outside" of.

Whatever the kind, a prediction the model is not sure of is flagged (`guess`, and said first in the reason): top-1
below config.GUESS_PROB, or below config.GUESS_OVER_CHANCE times chance where there are few classes. The kind then
describes the map of a guess, not a decision; the kinds themselves stay as they are (the evaluation groups images
by kind).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from zoomvit import config
from zoomvit.maps import floor_at_median, map_spread, top_mass_patches
from zoomvit.vit_analyzer import Analysis
from zoomvit.zoom import mass_region, zoom

KINDS = ("good", "inverted", "diffuse")
INVERTED_INSIDE = 0.5


def mass_inside(analysis: Analysis, grid_map: np.ndarray, box_original) -> float:
    """Share of the map's (median-floored) mass that falls inside a box given in original image pixels."""
    heat = analysis.upsample(floor_at_median(grid_map))
    s = analysis.geometry.scale
    x0, y0, x1, y1 = (int(round(c * s)) for c in box_original)
    total = heat.sum()
    return float(heat[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)].sum() / total) if total > 0 else 0.0


def focus_share(grid_map: np.ndarray, mass: float = config.ZOOM_MASS) -> float:
    """Share of the map's top-`mass` patches' (median-floored) mass that lies in their largest connected region."""
    values = floor_at_median(grid_map)
    total = values[top_mass_patches(grid_map, mass)].sum()
    return float(values[mass_region(grid_map, mass)].sum() / total) if total > 0 else 1.0


@dataclass
class Diagnosis:
    kind: str
    reason: str
    metrics: dict = field(default_factory=dict)
    guess: bool = False  # the prediction itself is a guess (not in metrics: the evaluation's columns stay the same)
    region: tuple | None = None  # ORIGINAL pixels: the region judged (none for a diffuse map: no one region)
    region_name: str = ""  # what that region is: "the object box" or "the intent map's box"

    def as_dict(self):
        return {
            "kind": self.kind,
            "reason": self.reason,
            "guess": self.guess,
            "region": None if self.region is None else [round(c, 1) for c in self.region],
            "region_name": self.region_name,
            **{k: round(v, 4) for k, v in self.metrics.items()},
        }


def region_text(box) -> str:
    x0, y0, x1, y1 = (round(c) for c in box)
    return f"x {x0}-{x1}, y {y0}-{y1} px"


def is_a_guess(analysis: Analysis) -> bool:
    probs = analysis.probs
    return float(probs[analysis.predicted]) < max(config.GUESS_PROB, config.GUESS_OVER_CHANCE / len(probs))


def flag_a_guess(analysis: Analysis, diagnosis: Diagnosis) -> Diagnosis:
    """The diagnosis, saying first when the prediction it is about is itself a guess."""
    if not is_a_guess(analysis):
        return diagnosis
    predicted = analysis.predicted
    label = analysis.bundle.label(predicted).split(",")[0]
    diagnosis.guess = True
    diagnosis.reason = (
        f"the prediction itself is a guess: '{label}' has only {float(analysis.probs[predicted]):.1%} "
        f"(chance is {1 / len(analysis.probs):.1%}), so the map explains a guess, not a decision; "
        f"the map: {diagnosis.reason}"
    )
    return diagnosis


def diagnose(analysis: Analysis, box=None) -> Diagnosis:
    """Classify the intent of `analysis` (see the module docstring for the criteria), flagging a guess.

    box: optional ground-truth object box in original pixels (without one, the intent map's box is cropped and
    classified: one forward of one crop).
    """
    return flag_a_guess(analysis, _diagnose(analysis, box))


def _diagnose(analysis: Analysis, box=None) -> Diagnosis:
    analysis = analysis.for_target(analysis.predicted)  # the diagnosis is about the model's own decision
    grid_map = analysis.intent()
    metrics = {"spread": map_spread(grid_map), "focus": focus_share(grid_map)}
    if metrics["spread"] > config.DIFFUSE_SPREAD:
        return Diagnosis(
            "diffuse",
            f"importance is scattered: 60% of it needs {metrics['spread']:.0%} of the patches",
            metrics,
        )
    if metrics["focus"] < config.DIFFUSE_FOCUS:
        return Diagnosis(
            "diffuse",
            f"importance is split over separate places: the largest holds only {metrics['focus']:.0%} of it",
            metrics,
        )
    if box is not None:
        metrics["mass_inside_box"] = mass_inside(analysis, grid_map, box)
        where = dict(region=tuple(float(c) for c in box), region_name="the object box")
        if metrics["mass_inside_box"] < INVERTED_INSIDE:
            return Diagnosis(
                "inverted",
                f"only {metrics['mass_inside_box']:.0%} of the importance lies on the object; the rest is background",
                metrics,
                **where,
            )
        return Diagnosis(
            "good", f"{metrics['mass_inside_box']:.0%} of the importance lies on the object", metrics, **where
        )
    probe = zoom(analysis, policy="always", method="intent")  # the intent map's own box, cropped and classified
    where = dict(region=probe.box, region_name="the intent map's box")
    predicted = analysis.predicted
    p_whole = float(analysis.probs[predicted])
    p_crop = float(probe.probs_crop[predicted])
    metrics["crop_confidence_ratio"] = p_crop / max(p_whole, 1e-9)
    label = analysis.bundle.label(predicted).split(",")[0]
    region = f"the intent map's box ({region_text(probe.box)})"
    if metrics["crop_confidence_ratio"] < 0.5 and int(np.argmax(probe.probs_crop)) != predicted:
        return Diagnosis(
            "inverted",
            f"{region}, cropped, is not classified as '{label}' "
            f"({p_crop:.0%} on the crop vs {p_whole:.0%} on the whole image)",
            metrics,
            **where,
        )
    return Diagnosis(
        "good",
        f"concentrated ({metrics['spread']:.0%} of patches hold 60% of the importance) and {region}, cropped, "
        f"supports '{label}' ({p_crop:.0%})",
        metrics,
        **where,
    )
