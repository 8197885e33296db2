"""Every supported family, saved to a folder and loaded the way a user loads it, through the whole tool: the grid,
every map (finite, in [0, 1]), rollout rows that sum to 1, click-inspection, zoom (a box inside the image), and
pruning in both modes (keep 1.0 gives the model's own logits; the prefix tokens always stay). Each Hugging Face
model is built from its family's real hub config keys (hub_configs.py), sizes shrunk, as a user's checkpoint loads."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import test_backbones as hf
import test_timm
import torch
from hub_configs import config_for
from transformers import DeiTForImageClassificationWithTeacher, DeiTImageProcessorPil, ViTForImageClassification

from zoomvit import backbones, pruning, zoom
from zoomvit.maps import fuse_heads, rollout_matrix
from zoomvit.models import load_model
from zoomvit.vit_analyzer import MAP_METHODS, analyze

# row -> (builder, model_type in backbones.FAMILIES, prefix tokens, how the folder is loaded)
MATRIX = {
    "ViT": ("vit", "vit", 1, "folder"),
    "DeiT": ("deit_without_teacher", "deit", 2, "folder"),
    "DeiT distilled": ("deit_distilled", "deit", 2, "folder"),
    "ViT-MSN": ("vit_msn", "vit_msn", 1, "folder"),
    "BEiT": ("beit_layer_bias", "beit", 1, "folder"),
    "BEiT class-token head": ("beit_shared_bias_cls", "beit", 1, "folder"),
    "Data2Vec-vision": ("data2vec_vision", "data2vec-vision", 1, "folder"),
    "DINOv2": ("dinov2", "dinov2", 1, "folder"),
    "DINOv2 with registers": ("dinov2_registers", "dinov2_with_registers", 5, "folder"),
    "CLIP": ("clip", "clip", 1, "folder"),
    "SigLIP": ("siglip", "siglip", 0, "folder"),
    "timm DeiT (timm)": ("deit_tiny_patch16_224", "timm_wrapper", 1, "timm"),
    "timm DeiT (TimmWrapper)": ("deit_tiny_patch16_224", "timm_wrapper", 1, "folder"),
    "timm DeiT distilled": ("deit_tiny_distilled_patch16_224", "timm_wrapper", 2, "timm"),
    "timm DeiT-III": ("deit3_small_patch16_224", "timm_wrapper", 1, "folder"),
    "timm registers + average pool": ("vit_medium_patch16_reg4_gap_256", "timm_wrapper", 4, "timm"),
    "timm average pool, no prefix": ("vit_base_patch16_gap_224", "timm_wrapper", 0, "folder"),
    "timm class token + registers": ("vit_small_patch14_reg4_dinov2", "timm_wrapper", 5, "timm"),
}
GRID = (4, 4)  # every model here sees 32 x 32 pixels in 8-pixel patches


@functools.cache
def vit():
    torch.manual_seed(11)
    return ViTForImageClassification(config_for("vit", **hf.INIT)).eval()


@functools.cache
def deit_distilled():
    torch.manual_seed(12)
    model = DeiTForImageClassificationWithTeacher(config_for("deit", **hf.INIT)).eval()
    with torch.no_grad():  # zero at init: the two special tokens would be identical
        for param in (model.base_model.embeddings.cls_token, model.base_model.embeddings.distillation_token):
            param.normal_(std=0.2)
    return model


def saved_folder(row, tmp_path):
    """The row's tiny random model in the folder layout its loader reads; returns the name to load."""
    builder, model_type, _, route = MATRIX[row]
    folder = tmp_path / "model"
    if model_type == "timm_wrapper":
        test_timm.save_timm_folder(test_timm.tiny_timm(builder, seed=5), builder, folder)
        return f"timm:{folder}" if route == "timm" else str(folder)
    model = globals()[builder]() if builder in globals() else getattr(hf, builder)()
    model.save_pretrained(folder)
    # Resize then centre-crop, so the geometry has a crop to undo.
    DeiTImageProcessorPil(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return str(folder)


def library_logits(model, pixel_values):
    with torch.no_grad():
        out = model(pixel_values=pixel_values) if hasattr(model, "config") else model(pixel_values)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_every_family_has_a_row():
    """The matrix covers every entry of the adapter table (from which the README's family list is written)."""
    assert {row[1] for row in MATRIX.values()} == set(backbones.FAMILIES)


@pytest.mark.parametrize("row", MATRIX)
def test_family_through_the_whole_tool(row, tmp_path):
    _, model_type, prefix, _ = MATRIX[row]
    bundle = load_model(saved_folder(row, tmp_path))
    assert bundle.num_special == prefix == bundle.adapter.num_prefix
    image = np.random.default_rng(7).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    analysis = analyze(bundle, image)
    assert analysis.grid == GRID and analysis.attentions.shape[-1] == prefix + GRID[0] * GRID[1]

    # Maps: every method, every head fusion, finite and in [0, 1].
    for method in MAP_METHODS:
        for head in ("mean", "max", 0):
            grid_map = analysis.map(method, head=head)
            assert grid_map.shape == GRID and np.isfinite(grid_map).all(), (method, head)
            assert grid_map.min() >= 0 and grid_map.max() <= 1, (method, head)
    matrix = rollout_matrix(fuse_heads(analysis.attentions, "mean"), 0.9)
    assert np.allclose(matrix.sum(axis=1), 1.0)
    # Click-inspection of one patch, both directions.
    for inspected in (analysis.attended_by_patch(1, 2), analysis.attending_patch(1, 2)):
        assert inspected.shape == GRID and np.isfinite(inspected).all()

    # Zoom: a box inside the image, and a second look at the crop.
    result = zoom.zoom(analysis, policy="always")
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 < x1 <= 61 and 0 <= y0 < y1 <= 45 and result.after

    # Pruning: keep 1.0 is the model itself; with fewer tokens the prefix stays in every later block.
    expected = library_logits(bundle.model, analysis.pixel_values)
    for mode in pruning.MODES:
        scores = None if mode == "efficiency" else pruning.analysis_scores(analysis, 1, 1.0)
        logits, _ = pruning.forward_pruned(bundle, analysis.pixel_values, 1, 1.0, scores)
        assert torch.allclose(logits, expected, atol=1e-4), mode
    seen = []
    block = bundle.adapter.block

    def recording_block(i, x, *args, positions=None, **kwargs):
        if positions is not None:
            seen.append(positions)
        return block(i, x, *args, positions=positions, **kwargs)

    bundle.adapter.block = recording_block
    try:
        for mode, fusion in [
            ("analysis", "drop"),
            ("efficiency", "drop"),
            ("efficiency", "fuse"),
            ("efficiency", "merge"),
        ]:
            seen.clear()
            kept = pruning.prune(analysis, 0.5, 1, mode, fusion, timing_repeats=0)
            assert kept.tokens_after == prefix + 8 + (fusion == "fuse") and np.isfinite(kept.probs_after).all()
            assert seen and all(torch.equal(p[0, :prefix], torch.arange(prefix)) for p in seen), (mode, fusion)
            assert kept.kept_mask.sum() == 8
    finally:
        del bundle.adapter.block


@pytest.fixture(scope="module", params=["DINOv2", "DINOv2 with registers"])
def dinov2_bundle(request, tmp_path_factory):
    """A DINOv2 saved and loaded as a user's checkpoint: its config.json has mlp_ratio and no intermediate_size."""
    folder = saved_folder(request.param, tmp_path_factory.mktemp("dinov2"))
    saved = json.loads((Path(folder) / "config.json").read_text())
    assert "mlp_ratio" in saved and "intermediate_size" not in saved
    return load_model(folder)


@pytest.mark.parametrize(
    "mode, fusion", [("analysis", "drop"), ("efficiency", "drop"), ("efficiency", "fuse"), ("efficiency", "merge")]
)
def test_a_real_shaped_dinov2_prunes_in_both_modes(dinov2_bundle, mode, fusion):
    """Pruning a DINOv2 (with or without registers) from its real config, MACs included: the MLP's width is
    hidden_size * mlp_ratio, read from the blocks' Linear layers, not from a config key DINOv2 does not have."""
    bundle = dinov2_bundle
    analysis = analyze(bundle, np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    result = pruning.prune(analysis, 0.5, 1, mode, fusion, timing_repeats=0)
    prefix = bundle.num_special
    assert result.tokens_after == prefix + 8 + (fusion == "fuse") and np.isfinite(result.probs_after).all()
    d = bundle.adapter.hidden_size
    width = d * bundle.model.config.mlp_ratio
    assert bundle.adapter.mlp_macs() == 2 * d * width
    tokens = prefix + 16
    assert pruning.block_macs(bundle, tokens) == 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * width
    assert 0 < result.macs_after < result.macs_before
