"""Zoom and intent diagnosis on the real DeiT-Tiny: zoom-bench blur composites (a small photo pasted on a blurred
background, with its box known) and the box-based definition of inverted intent."""

import csv

import numpy as np
import pytest

from zoomvit import config, intent, zoom
from zoomvit.vit_analyzer import analyze, analyze_many

BLUR_ITEMS = 30


@pytest.fixture(scope="module")
def blur_items(shared_dir):
    folder = shared_dir / "data" / "zoom-bench"
    with open(folder / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["background"] == "blur"][:BLUR_ITEMS]
    assert len(rows) == BLUR_ITEMS
    return [
        (folder / r["file"], tuple(float(r[k]) for k in ("x0", "y0", "x1", "y1")), int(r["label_index"])) for r in rows
    ]


def _covered(box, target):
    """Share of the target box inside `box`."""
    ix = max(0.0, min(box[2], target[2]) - max(box[0], target[0]))
    iy = max(0.0, min(box[3], target[3]) - max(box[1], target[1]))
    return ix * iy / ((target[2] - target[0]) * (target[3] - target[1]))


def test_zoom_box_covers_the_object_on_blur_items(deit_tiny, blur_items):
    covered, gains = [], 0
    # Batched analysis passes: each image's analysis is its own `analyze` (tested in test_engine_unit).
    analyses = [
        a
        for start in range(0, len(blur_items), 10)
        for a in analyze_many(deit_tiny, [path for path, _, _ in blur_items[start : start + 10]])
    ]
    for (_path, gt, label), analysis in zip(blur_items, analyses):
        result = zoom.zoom(analysis)
        x0, y0, x1, y1 = result.box
        w, h = analysis.loaded.original_size
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert result.crop.size == (round(x1) - round(x0), round(y1) - round(y0))
        covered.append(_covered(result.box, gt))
        gains += int(np.argmax(result.probs_after) == label) - int(analysis.predicted == label)
    # Most boxes hold most of the object, and zooming wins more items than it loses.
    assert np.mean(np.array(covered) >= 0.5) >= 0.8, covered
    assert gains > 0


def test_adaptive_zoom_leaves_a_full_frame_object_alone(deit_tiny, blur_items):
    """The pasted photo itself (object fills the frame): the box would be most of the image, so no zoom."""
    from PIL import Image

    path, gt, _ = blur_items[0]
    photo = Image.open(path).crop(tuple(int(c) for c in gt)).resize((448, 448))
    result = zoom.zoom(analyze(deit_tiny, photo, keep_graph=False), "adaptive")
    if result.box_area > 0.5:
        assert not result.zoomed and np.allclose(result.probs_after, result.probs_before)
    else:
        assert result.zoomed


def test_inverted_means_most_mass_outside_the_box(deit_tiny, blur_items):
    path, gt, _ = blur_items[0]
    analysis = analyze(deit_tiny, path, keep_graph=False)
    w, h = analysis.loaded.original_size
    inside = intent.diagnose(analysis, box=gt)
    # The complement-ish box: a thin strip in a corner away from the object holds little of the map.
    corner = (0, 0, 8, 8) if gt[0] > 16 or gt[1] > 16 else (w - 8, h - 8, w, h)
    outside = intent.diagnose(analysis, box=corner)
    for d in (inside, outside):
        assert d.kind in intent.KINDS
        if d.kind == "inverted":
            assert d.metrics["mass_inside_box"] < 0.5
        if d.kind == "good":
            assert d.metrics["mass_inside_box"] >= 0.5
    if outside.kind != "diffuse":
        assert outside.kind == "inverted"


def test_diagnosis_without_a_box_judges_the_intent_maps_own_box(deit_tiny, shared_dir):
    """The region cropped is the box of the intent map it diagnoses (not the zoom's candidates'), the ratio is that
    crop's, and the sentence names that box."""
    path = shared_dir / "data" / "imagenet-sample" / "n01440764_tench.JPEG"
    analysis = analyze(deit_tiny, path, keep_graph=False)
    diagnosis = intent.diagnose(analysis)
    assert diagnosis.kind in ("good", "inverted") and diagnosis.reason
    intent_box = analysis.geometry.to_original(zoom.box_from_map(analysis, analysis.intent()))
    assert diagnosis.region == pytest.approx(intent_box) and diagnosis.region_name == "the intent map's box"
    x0, y0, x1, y1 = (int(round(c * analysis.geometry.scale)) for c in diagnosis.region)
    crop = analyze(deit_tiny, analysis.loaded.image.crop((x0, y0, x1, y1)), keep_graph=False)
    p = analysis.predicted
    assert diagnosis.metrics["crop_confidence_ratio"] == pytest.approx(crop.probs[p] / analysis.probs[p], rel=1e-3)
    assert intent.region_text(diagnosis.region) in diagnosis.reason
    assert diagnosis.as_dict()["region"] == [round(c, 1) for c in intent_box]
    with_box = intent.diagnose(analysis, box=(10, 20, 110, 120))
    assert with_box.region == (10, 20, 110, 120) and with_box.region_name == "the object box"


def test_a_prediction_that_is_a_guess_is_flagged_whatever_the_kind(deit_tiny, shared_dir):
    """Noise gets a top-1 of a few percent: the diagnosis says first that the prediction itself is a guess. The
    kinds stay the evaluation's three (it groups images by kind), and the flag is not a metric (its columns)."""
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    analysis = analyze(deit_tiny, noise, keep_graph=False)
    assert analysis.probs.max() < config.GUESS_PROB
    diagnosis = intent.diagnose(analysis)
    assert diagnosis.kind in intent.KINDS and diagnosis.guess
    assert diagnosis.reason.startswith("the prediction itself is a guess")
    assert diagnosis.as_dict()["guess"] is True and "guess" not in diagnosis.metrics

    tench = intent.diagnose(
        analyze(deit_tiny, shared_dir / "data" / "imagenet-sample" / "n01440764_tench.JPEG", keep_graph=False)
    )
    assert not tench.guess and "guess" not in tench.reason and tench.as_dict()["guess"] is False
