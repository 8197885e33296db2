"""The real DeiT-Tiny on real photos: our preprocessing matches Hugging Face's, and analysis-mode pruning
keeps the model's decisions."""

import csv

import pytest
import torch

from zoomvit import pruning
from zoomvit.geometry import encode
from zoomvit.images import load_image
from zoomvit.vit_analyzer import analyze_many, predict_pixels

SAMPLE_SIZE = 100


@pytest.fixture(scope="module")
def sample_paths(shared_dir):
    folder = shared_dir / "data" / "imagenet-sample"
    with open(folder / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:SAMPLE_SIZE]
    assert len(rows) == SAMPLE_SIZE
    return [folder / row["file"] for row in rows]


def test_predict_matches_the_hf_pipeline(deit_tiny, deit_model_path, sample_paths):
    from transformers import pipeline

    classifier = pipeline("image-classification", model=deit_model_path, device="cpu")
    theirs = [out[0]["label"] for out in classifier([str(p) for p in sample_paths], top_k=1, batch_size=10)]
    # `predict` for each photo, in batches: the same preprocessing and forward, 10 images a pass.
    ours = []
    for start in range(0, len(sample_paths), 10):
        pixels = torch.cat([encode(deit_tiny, load_image(p))[0] for p in sample_paths[start : start + 10]])
        ours += [deit_tiny.label(probs.argmax()) for probs in predict_pixels(deit_tiny, pixels)]
    mismatches = [(p.name, a, b) for p, a, b in zip(sample_paths, ours, theirs) if a != b]
    assert not mismatches


def test_analysis_mode_pruning_keeps_decisions(deit_tiny, sample_paths):
    """Only the 30% most intended tokens after block 6: the decision survives on at least 95 of 100 photos."""
    agree = 0
    for start in range(0, len(sample_paths), 10):  # batched passes: each image's result is its own (tested)
        analyses = analyze_many(deit_tiny, sample_paths[start : start + 10])
        scores = torch.cat([pruning.analysis_scores(analysis, 6, 0.3) for analysis in analyses])
        pixels = torch.cat([analysis.pixel_values for analysis in analyses])
        logits, keep_idx = pruning.forward_pruned(deit_tiny, pixels, 6, 0.3, scores)
        assert keep_idx.shape == (len(analyses), round(0.3 * 196))
        agree += sum(int(torch.argmax(row)) == analysis.predicted for row, analysis in zip(logits, analyses))
    assert agree >= 95, f"decision kept on {agree}/{SAMPLE_SIZE} images"
