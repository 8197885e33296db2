"""The confident zoom (#23) on the real DeiT-Tiny: its margin rule, its candidates' boxes in the image's own
pixels, an explanation whose numbers are the probabilities it compared, and the cost counted in forward units."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from zoomvit import cli, config, zoom
from zoomvit.evaluation import report
from zoomvit.images import load_image
from zoomvit.vit_analyzer import analyze


@pytest.fixture(scope="module")
def composites(shared_dir, deit_tiny):
    """Analyses of a few zoom-bench composites (small object, sharp and blurred backgrounds)."""
    folder = shared_dir / "data" / "zoom-bench"
    return [analyze(deit_tiny, folder / f"zoom_{i:04d}.jpg") for i in range(6)]


def numbers(reason: str):
    found = re.fullmatch(
        r"crop (\d\.\d\d) vs whole (\d\.\d\d): ([+-]\d\.\d\d), (not )?over the (\d\.\d\d) margin: .*", reason
    )
    assert found, reason
    crop, whole, gain, under, margin = found.groups()
    return float(crop), float(whole), float(gain), under is None, float(margin)


def test_the_crop_decides_only_when_it_beats_the_whole_image_by_the_margin(composites):
    decided = set()
    for analysis in composites:
        for margin in (0.0, 0.1, 0.5):
            result = zoom.zoom(analysis, "confident", margin=margin)
            gain = float(result.probs_crop.max() - analysis.probs.max())
            assert result.zoomed == (gain > margin) and result.margin == margin
            expected = result.probs_crop if result.zoomed else analysis.probs
            np.testing.assert_array_equal(result.probs_after, expected)  # the crop's or the whole's, never a mix
            decided.add(result.zoomed)
    assert decided == {True, False}  # both outcomes happen on these images


def test_the_explanation_gives_the_probabilities_it_compared(composites, deit_tiny):
    for analysis in composites:
        result = zoom.zoom(analysis, "confident")
        crop, whole, gain, over, margin = numbers(result.reason)
        assert crop == round(float(result.probs_crop.max()), 2) and whole == round(float(analysis.probs.max()), 2)
        assert gain == pytest.approx(result.gain, abs=0.006) and margin == config.ZOOM_MARGIN
        assert over == result.zoomed
        facts = result.as_dict()
        assert facts["whole"]["prob"] == pytest.approx(float(analysis.probs.max()), abs=1e-6)  # as printed
        assert facts["crop"]["index"] == int(result.probs_crop.argmax())
        assert facts["crop"]["label"] == deit_tiny.label(int(result.probs_crop.argmax()))


def test_candidates_are_in_the_image_own_pixels_and_the_winner_is_the_box(shared_dir, deit_tiny):
    # A photo at twice its size and squashed: the processor resizes it, so working and original pixels differ.
    photo = Image.open(shared_dir / "data" / "zoom-bench" / "zoom_0001.jpg").convert("RGB")
    big = photo.resize((photo.width * 2, photo.height), Image.Resampling.BILINEAR)
    analysis = analyze(deit_tiny, load_image(big))
    result = zoom.zoom(analysis, "confident")
    sources = [c.source for c in result.candidates]
    assert len(set(sources)) == len(sources) and 1 <= len(sources) <= len(config.ZOOM_CANDIDATES)
    for candidate in result.candidates:
        x0, y0, x1, y1 = candidate.box
        assert 0 <= x0 < x1 <= big.width + 0.5 and 0 <= y0 < y1 <= big.height + 0.5
    winner = max(result.candidates, key=lambda c: c.confidence)
    assert winner.box == result.box and winner.source == result.source
    assert winner.confidence == pytest.approx(float(result.probs_crop.max()))
    assert result.as_dict()["winner"] == result.candidates.index(winner)
    # The crop is the box's region of the image (not downscaled here: its pixels are the original's).
    assert analysis.loaded.scale == 1.0
    x0, y0, x1, y1 = result.box
    assert result.crop.size[0] == pytest.approx(x1 - x0, abs=1) and result.crop.size[1] == pytest.approx(y1 - y0, abs=1)


def test_forward_units_count_a_reduced_crop_by_its_tokens(deit_tiny):
    adapter = deit_tiny.adapter
    full_tokens, half_tokens = 1 + 14 * 14, 1 + 7 * 7  # this DeiT-Tiny reads its class token alone
    assert deit_tiny.num_special == 1
    half = torch.zeros(1, 3, 112, 112)
    expected = adapter.block_macs(half_tokens) / adapter.block_macs(full_tokens)
    assert zoom.forward_units(deit_tiny, [half]) == pytest.approx(1 + expected)
    assert 0.2 < expected < 0.3  # about a quarter of a pass
    three = torch.zeros(3, 3, 224, 224)
    assert zoom.forward_units(deit_tiny, [three, half]) == pytest.approx(1 + 3 + expected)


def test_a_zoom_counts_one_unit_per_distinct_crop(composites):
    for analysis in composites:
        for policy in zoom.POLICIES:
            result = zoom.zoom(analysis, policy)
            assert result.forward_units == pytest.approx(1 + len(result.candidates))
            assert len({c.box for c in result.candidates}) == len(result.candidates)  # no crop classified twice
            assert result.seconds > 0


def test_the_old_rule_is_reachable_by_name_and_unchanged(composites):
    analysis = composites[0]
    adaptive = zoom.zoom(analysis, "adaptive")
    assert adaptive.policy == "adaptive" and adaptive.margin is None
    assert {c.source for c in adaptive.candidates} <= {"focus", "rollout_max", "cls_max"}
    weight = config.ZOOM_WHOLE_WEIGHT
    if adaptive.zoomed:
        np.testing.assert_allclose(adaptive.probs_after, weight * analysis.probs + (1 - weight) * adaptive.probs_crop)
    with pytest.raises(Exception, match="Unknown zoom policy 'bold': use one of confident, adaptive, always"):
        zoom.zoom(analysis, "bold")


def test_eval_runs_the_chosen_policy_and_reports_its_cost(shared_dir, deit_tiny, tmp_path, capsys):
    data = shared_dir / "data" / "zoom-bench"
    code = cli.main(
        ["eval", "--data", str(data), "--model", str(shared_dir / "models" / "deit-tiny-patch16-224"), "--limit", "4"]
        + ["--tasks", "zoom", "--zoom-policy", "confident", "--workers", "0", "--out", str(tmp_path), "--json"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["zoom_policy"] == "confident"
    with open(tmp_path / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    units = [float(r["zoom_units"]) for r in rows]
    assert all(2 <= u <= 1 + len(config.ZOOM_CANDIDATES) for u in units)
    assert summary["zoom"]["forward_units"] == pytest.approx(np.mean(units))
    text = report.markdown_report(summary)
    assert "Confident zoom (crop: the crop's own prediction" in text and "| forward units |" in text
    assert f" {summary['zoom']['forward_units']:.2f} |" in text
