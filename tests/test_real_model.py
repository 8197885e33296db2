"""The real DeiT-Tiny on real photos: our preprocessing matches Hugging Face's, and analysis-mode pruning
keeps the model's decisions."""

import csv

import pytest
import torch

import pruning
from vit_analyzer import analyze, predict

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
    ours = [deit_tiny.label(predict(deit_tiny, p).argmax()) for p in sample_paths]
    mismatches = [(p.name, a, b) for p, a, b in zip(sample_paths, ours, theirs) if a != b]
    assert not mismatches


def test_analysis_mode_pruning_keeps_decisions(deit_tiny, sample_paths):
    """Only the 30% most intended tokens after block 6: the decision survives on at least 95 of 100 photos."""
    agree = 0
    for path in sample_paths:
        analysis = analyze(deit_tiny, path, keep_graph=False)
        scores = pruning.analysis_scores(analysis, 6, 0.3)
        logits, keep_idx = pruning.forward_pruned(deit_tiny, analysis.pixel_values, 6, 0.3, scores)
        assert keep_idx.shape == (1, round(0.3 * 196))
        agree += int(torch.argmax(logits[0])) == analysis.predicted
    assert agree >= 95, f"decision kept on {agree}/{SAMPLE_SIZE} images"
