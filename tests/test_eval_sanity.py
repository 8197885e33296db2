"""Eval's sanity task (model randomisation, Adebayo et al. 2018): the rank correlation, the cascading randomisation
of a model copy, and a whole run on a tiny random ViT."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoomvit.evaluation import report as eval_report
from zoomvit.evaluation import runner as evaluation
from zoomvit.evaluation import sanity
from zoomvit.vit_analyzer import analyze_many

REPO = Path(__file__).resolve().parents[1]
# rollout, cls and attention read the attentions alone: randomising the classifier cannot move them.
CLASS_AGNOSTIC = ("rollout", "cls", "attention")


def test_rank_correlation():
    grid = np.arange(12, dtype=float).reshape(3, 4)
    assert sanity.rank_correlation(grid, grid**3) == pytest.approx(1.0)  # any increasing transform keeps the ranks
    assert sanity.rank_correlation(grid, -grid) == pytest.approx(-1.0)
    # tied values share their mean rank: [0, 0, 1, 2] ranks as [0.5, 0.5, 2, 3]
    assert sanity.rank_correlation([0, 0, 1, 2], [1, 2, 3, 4]) == pytest.approx(
        np.corrcoef([0.5, 0.5, 2, 3], [0, 1, 2, 3])[0, 1]
    )
    assert sanity.rank_correlation(np.zeros(4), grid[0]) == 0.0  # a constant map ranks nothing


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def _changed(before, model):
    return {name for name, value in model.state_dict().items() if not torch.equal(before[name], value)}


def test_randomisation_cascades_from_the_top_on_a_copy(tiny_vit):
    """Level 1 randomises the classifier alone, level 2 the last block too, level L+1 every block; the embeddings
    stay; reset brings every weight back; the caller's model is never touched. (A tensor with one value throughout,
    as the random model's zero biases and unit norm gains, is drawn with a spread of 0: it keeps that value.)"""
    original = _state(tiny_vit.model)
    varied = {name for name, value in original.items() if value.numel() > 1 and value.float().std() > 0}
    randomised = sanity.Randomised(tiny_vit)
    model = randomised.bundle.model
    assert model is not tiny_vit.model and randomised.num_levels == tiny_vit.num_layers + 2 == 4
    in_block = lambda *blocks: {n for n in varied if any(n.startswith(f"vit.layers.{b}.") for b in blocks)}
    randomised.randomise(1)
    assert _changed(original, model) == {"classifier.weight"}
    randomised.randomise(2)
    assert _changed(original, model) == {"classifier.weight"} | in_block(1)
    randomised.randomise(3)
    assert _changed(original, model) == {"classifier.weight"} | in_block(0, 1)  # the embeddings stay
    again = sanity.Randomised(tiny_vit)  # the same seed draws the same random network
    for level in (1, 2, 3):
        again.randomise(level)
    assert not _changed(_state(model), again.bundle.model)
    randomised.reset()
    assert not _changed(original, model) and not _changed(original, tiny_vit.model)


def test_correlations_start_at_one_and_only_class_maps_feel_the_classifier(tiny_vit):
    rng = np.random.default_rng(0)
    analyses = analyze_many(tiny_vit, [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(2)])
    original = _state(tiny_vit.model)
    correlations = sanity.group_correlations(sanity.Randomised(tiny_vit), analyses)
    assert correlations.shape == (2, tiny_vit.num_layers + 2, len(sanity.MAPS))
    by_map = dict(zip(sanity.MAPS, np.moveaxis(correlations, 2, 0)))
    for name, values in by_map.items():
        np.testing.assert_allclose(values[:, 0], 1.0, err_msg=name)  # the untouched copy: the same maps
        if name in CLASS_AGNOSTIC:
            np.testing.assert_allclose(values[:, 1], 1.0, err_msg=name)
    assert (by_map["grad_rollout"][:, 1] < 0.99).all() and (by_map["intent"][:, 1] < 0.99).all()
    # with every block random, no map keeps its ranking
    assert (correlations[:, -1] < 0.9).all()
    assert not _changed(original, tiny_vit.model)


def test_sanity_run_writes_its_table_plot_and_verdicts(tiny_vit, tmp_path):
    rng = np.random.default_rng(1)
    lines = ["file,label_index"]
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{i}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    result = evaluation.evaluate(tiny_vit, tmp_path, after_block=1, tasks=("sanity",), progress=False, workers=0)
    s = result.summary["sanity"]
    assert s["levels"] == ["none", "head", "head+2", "head+1-2"] and [e["map"] for e in s["maps"]] == list(sanity.MAPS)
    for e in s["maps"]:
        assert e["spearman"][0] == 1.0 and e["above_threshold"][0] == 1.0
        assert e["passes"] == (e["spearman"][-1] < sanity.THRESHOLD)
    out = tmp_path / "out"
    written = {p.name for p in eval_report.write_outputs(result, out)}
    assert {"sanity.png", "report.md", "results.json"} <= written and "prune.png" not in written
    report = (out / "report.md").read_text()
    assert "| map | none | head | +2 | +1-2 | verdict |" in report
    rollout = next(e for e in s["maps"] if e["map"] == "rollout")
    figures = " | ".join(f"{v:.2f}" for v in rollout["spearman"])
    assert f"| rollout | {figures} | {sanity.verdict(rollout)} |" in report
    assert json.loads((out / "results.json").read_text())["sanity"] == s


def test_the_about_text_quotes_the_committed_sanity_run(deit_tiny):
    """The app's About text says which maps pass, with figures from the run the README shows."""
    from zoomvit.app.about import about_text

    summary = json.loads((REPO / "docs" / "results" / "sanity-imagenet-sample" / "results.json").read_text())
    maps = {e["map"]: e for e in summary["sanity"]["maps"]}
    assert set(maps) == set(sanity.MAPS) and all(e["passes"] for e in maps.values())
    about = " ".join(about_text(deit_tiny).split())
    assert "every view above passes" in about and "500 ImageNet photos" in about and summary["n"] == 500
    assert f"rollout to {maps['rollout']['spearman'][-1]:.2f}" in about
    head = lambda name: f"{maps[name]['spearman'][1]:.2f}"
    assert f"alone ({head('grad_rollout')} and {head('intent')})" in about
