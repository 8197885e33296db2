"""Engine invariants on tiny random models (fast): shapes, maps, geometry, pruning, targets, MACs."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DeiTImageProcessorPil, ViTImageProcessorPil

from zoomvit import pruning
from zoomvit.errors import ModelLoadError
from zoomvit.geometry import Geometry, geometry_for
from zoomvit.maps import normalize_map, rollout_matrix
from zoomvit.models import load_model
from zoomvit.vit_analyzer import MAP_METHODS, analyze, analyze_many

# The grids the tiny configs imply: 32x48 input / patch 8 and 48x48 / patch 8 (see conftest).
GRIDS = {"tiny_vit": (4, 6), "tiny_deit_distilled": (6, 6)}
SPECIAL = {"tiny_vit": 1, "tiny_deit_distilled": 2}
BUNDLES = list(GRIDS)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_pixels(bundle, batch, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, *bundle.input_size)


@pytest.fixture(scope="module")
def analyses(tiny_vit, tiny_deit_distilled):
    # Non-square images, so the processor has to resize (and, for the DeiT one, crop).
    return {
        "tiny_vit": analyze(tiny_vit, random_image(64, 40, seed=1)),
        "tiny_deit_distilled": analyze(tiny_deit_distilled, random_image(70, 50, seed=2)),
    }


# ---- the analysis pass ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLES)
def test_analysis_shapes(request, analyses, name):
    bundle, analysis = request.getfixturevalue(name), analyses[name]
    gh, gw = GRIDS[name]
    n = SPECIAL[name] + gh * gw
    layers, heads = bundle.model.config.num_hidden_layers, bundle.model.config.num_attention_heads
    assert analysis.attentions.shape == (layers, heads, n, n)
    assert analysis.attention_grads.shape == analysis.attentions.shape
    assert analysis.probs.shape == (len(bundle.id2label),)
    np.testing.assert_allclose(analysis.probs.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(analysis.attentions.sum(-1), 1.0, atol=1e-5)  # softmax rows
    assert np.abs(analysis.attention_grads).max() > 0
    assert analysis.target == analysis.predicted == int(analysis.probs.argmax())


@pytest.mark.parametrize("name", BUNDLES)
def test_a_batched_analysis_gives_each_image_its_own_analysis(request, name):
    bundle = request.getfixturevalue(name)
    images = [random_image(64, 40, seed=s) for s in (3, 4, 5)]
    together = analyze_many(bundle, images)
    for image, batched in zip(images, together):
        alone = analyze(bundle, image, keep_graph=False)
        assert batched.target == alone.target and batched.geometry == alone.geometry
        for field in ("probs", "attentions", "attention_grads", "hidden_states"):
            np.testing.assert_allclose(getattr(batched, field), getattr(alone, field), atol=1e-5, rtol=0)
        np.testing.assert_allclose(batched.intent(), alone.intent(), atol=1e-4, rtol=0)
        assert batched.attentions.base is None  # its own copy, not a view that keeps the batch alive


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("method", MAP_METHODS)
def test_maps_lie_in_unit_range_on_config_grid(analyses, name, method):
    analysis = analyses[name]
    assert analysis.grid == GRIDS[name]
    heat = analysis.map(method)
    assert heat.shape == GRIDS[name]
    assert np.isfinite(heat).all()
    assert heat.min() == pytest.approx(0.0, abs=1e-6) and heat.max() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", BUNDLES)
def test_cls_map_reads_special_rows_and_skips_special_columns(request, analyses, name):
    """Checked against the HF model's own attentions: the grid must exclude every special token."""
    bundle, analysis = request.getfixturevalue(name), analyses[name]
    ns = SPECIAL[name]
    with torch.no_grad():
        hf = bundle.model(pixel_values=analysis.pixel_values, output_attentions=True).attentions
    last = hf[-1][0].mean(0).numpy()
    expected = normalize_map(last[:ns, ns:].mean(0).reshape(GRIDS[name]))
    np.testing.assert_allclose(analysis.cls_map(), expected, atol=1e-5)


@pytest.mark.parametrize("head", [0, "1", "max", "min"])
def test_head_selection(analyses, head):
    analysis = analyses["tiny_vit"]
    index = int(head) if str(head).isdigit() else None
    fused = analysis.attention_matrix(0, head)
    raw = analysis.attentions[0]
    expected = raw[index] if index is not None else getattr(raw, head)(axis=0)
    np.testing.assert_array_equal(fused, expected)


def test_attention_is_a_patch_map_like_its_neighbours(analyses):
    """analysis.attention() returns what each patch receives on the patch grid, as cls_map and rollout return
    maps; the token matrix is attention_matrix()."""
    analysis = analyses["tiny_vit"]
    received = analysis.attention(-1, "max")
    assert received.shape == analysis.cls_map().shape == analysis.grid
    column_mean = analysis.attention_matrix(-1, "max").mean(axis=0)[analysis.num_special :]
    np.testing.assert_allclose(received.ravel(), normalize_map(column_mean), atol=1e-6)
    np.testing.assert_array_equal(received, analysis.map("attention", -1, "max"))


# ---- rollout --------------------------------------------------------------------------------------------


def random_attention(layers=3, n=7, seed=0):
    a = np.random.default_rng(seed).random((layers, n, n))
    return a / a.sum(-1, keepdims=True)


@pytest.mark.parametrize("discard", [0.0, 0.3, 0.9, 0.99])
def test_rollout_rows_sum_to_one(analyses, discard):
    for fused in (random_attention(), analyses["tiny_deit_distilled"].attentions.mean(1)):
        result = rollout_matrix(fused, discard)
        assert result.shape == fused.shape[1:]
        assert (result >= 0).all()
        np.testing.assert_allclose(result.sum(-1), 1.0, atol=1e-9)


def test_rollout_without_discard_is_the_product_of_residual_attention():
    a = random_attention()
    eye = np.eye(a.shape[-1])
    expected = eye
    for layer in a:
        expected = ((layer + eye) / 2) @ expected
    np.testing.assert_allclose(rollout_matrix(a, 0.0), expected, atol=1e-12)
    assert not np.allclose(rollout_matrix(a, 0.9), expected, atol=1e-3)  # discarding changes it


# ---- geometry -------------------------------------------------------------------------------------------

PROCESSORS = {
    "resize": lambda: ViTImageProcessorPil(size={"height": 32, "width": 48}),
    "resize+crop": lambda: DeiTImageProcessorPil(
        size={"height": 56, "width": 56}, crop_size={"height": 48, "width": 48}
    ),
    "shortest_edge+crop": lambda: DeiTImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48}
    ),
    "shortest_edge": lambda: DeiTImageProcessorPil(size={"shortest_edge": 56}, do_center_crop=False),
}
IMAGE_SIZES = [(48, 32), (100, 60), (37, 90), (300, 301)]


def bundle_with(bundle, processor_name):
    return dataclasses.replace(bundle, processor=PROCESSORS[processor_name]())


@pytest.mark.parametrize("processor", PROCESSORS)
@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_patch_centres_round_trip(tiny_vit, processor, size):
    geometry = geometry_for(bundle_with(tiny_vit, processor), size)
    gh, gw = geometry.grid
    for row in range(gh):
        for col in range(gw):
            x0, y0, x1, y1 = geometry.patch_box(row, col)
            assert geometry.pixel_to_patch((x0 + x1) / 2, (y0 + y1) / 2) == (row, col)
    assert geometry.pixel_to_patch(-1, 0) is None
    assert geometry.pixel_to_patch(size[0], size[1] - 1) is None


def test_pixels_outside_the_centre_crop_map_to_no_patch(tiny_vit):
    geometry = geometry_for(bundle_with(tiny_vit, "resize+crop"), (112, 112))  # 112 -> 56, crop 4 px each side
    assert geometry.grid == (6, 6)
    assert geometry.pixel_to_patch(2, 50) is None  # 1 resized px: inside the image, cut by the crop
    assert geometry.pixel_to_patch(10, 50) == (2, 0)
    assert geometry.view_box() == pytest.approx((8, 8, 104, 104))


def patch_brightness(bundle, image):
    """Mean brightness in [0, 1] of every patch of the processor's own pixel_values."""
    proc = bundle.processor
    pixels = proc(images=image, return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(proc.image_mean).view(3, 1, 1), torch.tensor(proc.image_std).view(3, 1, 1)
    gray = (pixels * std + mean).mean(0)
    p = bundle.patch_size
    return gray.unfold(0, p, p).unfold(1, p, p).mean((-1, -2)).numpy()


@pytest.mark.parametrize("processor", PROCESSORS)
@pytest.mark.parametrize("size", IMAGE_SIZES[1:])
def test_geometry_matches_the_processor(tiny_vit, processor, size):
    """Whiten exactly the pixels Geometry says patch (r, c) sees: the processor's patch (r, c) lights up."""
    bundle = bundle_with(tiny_vit, processor)
    geometry = geometry_for(bundle, size)
    pixels = bundle.processor(images=Image.new("RGB", size), return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (geometry.crop[3], geometry.crop[2])
    gh, gw = geometry.grid
    for row, col in [(0, 0), (gh - 1, gw - 1), (gh // 2, 1)]:
        image = Image.new("RGB", size)
        x0, y0, x1, y1 = geometry.patch_box(row, col)
        image.paste((255, 255, 255), (round(x0), round(y0), round(x1), round(y1)))
        brightness = patch_brightness(bundle, image)
        assert np.unravel_index(brightness.argmax(), brightness.shape) == (row, col)
        assert brightness[row, col] > 0.7


@pytest.mark.parametrize("processor", PROCESSORS)
@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_upsample_returns_image_size_and_puts_patches_in_place(tiny_vit, processor, size):
    geometry = geometry_for(bundle_with(tiny_vit, processor), size)
    gh, gw = geometry.grid
    row, col = gh - 1, 1
    grid_map = np.zeros((gh, gw), dtype=np.float32)
    grid_map[row, col] = 1.0
    up = geometry.upsample(grid_map)
    assert up.shape == (size[1], size[0])
    assert up.min() >= 0 and up.max() <= 1
    y, x = np.unravel_index(up.argmax(), up.shape)
    x0, y0, x1, y1 = geometry.patch_box(row, col)
    assert x0 - 1 <= x <= x1 + 1 and y0 - 1 <= y <= y1 + 1


def test_upsample_is_zero_outside_the_view(tiny_vit):
    geometry = geometry_for(bundle_with(tiny_vit, "shortest_edge+crop"), (100, 60))
    up = geometry.upsample(np.ones(geometry.grid, dtype=np.float32))
    x0, _, x1, _ = geometry.view_box()
    assert up[:, : int(x0) - 1].max() == 0 and up[:, int(np.ceil(x1)) + 1 :].max() == 0
    assert up[30, 50] == pytest.approx(1.0)


def test_geometry_reports_boxes_in_original_pixels():
    geometry = Geometry((100, 50), (100, 50), (0, 0, 96, 48), 16, scale=0.5)
    assert geometry.to_original((10, 20, 30, 40)) == (20, 40, 60, 80)


# ---- pruning engine -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("after_block", [1, 2])
@pytest.mark.parametrize("fusion", ["drop", "merge"])
def test_unpruned_forward_matches_hf(request, name, after_block, fusion):
    bundle = request.getfixturevalue(name)
    pixels = random_pixels(bundle, batch=2)
    with torch.no_grad():
        expected = bundle.model(pixel_values=pixels).logits
    logits, keep_idx = pruning.forward_pruned(bundle, pixels, after_block, keep=1.0, fusion=fusion)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert keep_idx.shape == (2, GRIDS[name][0] * GRIDS[name][1])


def final_token_counts(bundle, fn):
    """Token counts that reach the final layernorm (the classifier's input) while fn runs."""
    seen = []
    handle = bundle.backbone.layernorm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[1]))
    try:
        result = fn()
    finally:
        handle.remove()
    return result, seen


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("fusion", ["drop", "fuse", "merge"])
def test_kept_token_count(request, name, keep, fusion):
    bundle = request.getfixturevalue(name)
    patches = GRIDS[name][0] * GRIDS[name][1]
    n_keep = round(keep * patches)
    (logits, keep_idx), seen = final_token_counts(
        bundle, lambda: pruning.forward_pruned(bundle, random_pixels(bundle, 2), 1, keep, fusion=fusion)
    )
    extra = 1 if fusion == "fuse" else 0  # EViT's one token standing for the dropped ones
    assert seen == [SPECIAL[name] + n_keep + extra]
    assert keep_idx.shape == (2, n_keep)
    for row in keep_idx:
        assert len(set(row.tolist())) == n_keep and 0 <= row.min() and row.max() < patches


@pytest.mark.parametrize("name", BUNDLES)
def test_analysis_scores_pick_the_top_patches(request, name):
    bundle = request.getfixturevalue(name)
    patches = GRIDS[name][0] * GRIDS[name][1]
    scores = torch.from_numpy(np.random.default_rng(3).permutation(patches).astype(np.float32)).unsqueeze(0)
    _, keep_idx = pruning.forward_pruned(bundle, random_pixels(bundle, 1), 1, 0.25, patch_scores=scores)
    expected = set(scores[0].argsort(descending=True)[: round(0.25 * patches)].tolist())
    assert set(keep_idx[0].tolist()) == expected


def test_analysis_ranking_skips_duplicates(tiny_vit):
    """With two identical top tokens, redundancy-aware ranking keeps one of them and the next distinct token."""
    analysis = analyze(tiny_vit, random_image(64, 40), keep_graph=False)
    patches = analysis.grid[0] * analysis.grid[1]
    ns = analysis.num_special
    intent = np.linspace(1.0, 0.0, patches, dtype=np.float32)  # patch 0 best, then 1, 2, ...
    analysis._cache[("intent", 1)] = intent.reshape(analysis.grid)
    hidden = np.random.default_rng(0).normal(size=analysis.hidden_states.shape).astype(np.float32)
    hidden[1, ns + 1] = hidden[1, ns + 0]  # patch 1 duplicates patch 0 at the cut
    analysis.hidden_states = hidden
    ranking = pruning.analysis_scores(analysis, 1, 2 / patches)[0]
    kept = set(ranking.argsort(descending=True)[:2].tolist())
    assert kept == {0, 2}
    # Without the duplicate, plain intent order wins.
    hidden[1, ns + 1] = np.random.default_rng(1).normal(size=hidden.shape[-1])
    ranking = pruning.analysis_scores(analysis, 1, 2 / patches)[0]
    assert set(ranking.argsort(descending=True)[:2].tolist()) == {0, 1}


@pytest.mark.parametrize("name", BUNDLES)
def test_one_cut_serves_every_configuration_exactly(request, name):
    """Evaluation runs the blocks before the cut once per batch for all its configurations: finishing each from
    that shared cut gives forward_pruned's logits and kept tokens bit for bit."""
    bundle = request.getfixturevalue(name)
    pixels = random_pixels(bundle, 3, seed=5)
    scores = torch.rand(3, GRIDS[name][0] * GRIDS[name][1], generator=torch.Generator().manual_seed(0))
    cut = pruning.run_to_cut(bundle, pixels, 1, with_scores=True)
    for keep, patch_scores, fusion in [
        (0.5, None, "merge"),
        (0.3, None, "drop"),
        (0.7, None, "fuse"),
        (0.5, scores, "drop"),
        (0.3, scores, "merge"),
        (1.0, None, "merge"),
    ]:
        expected, expected_kept = pruning.forward_pruned(bundle, pixels, 1, keep, patch_scores, fusion)
        logits, kept = pruning.finish_pruned(bundle, cut, keep, patch_scores, fusion)
        assert torch.equal(logits, expected) and torch.equal(kept, expected_kept), (keep, fusion)


def test_a_cut_without_scores_needs_patch_scores(tiny_vit):
    cut = pruning.run_to_cut(tiny_vit, random_pixels(tiny_vit, 1), 1, with_scores=False)
    with pytest.raises(ValueError, match="without scores"):
        pruning.finish_pruned(tiny_vit, cut, 0.5, None, "merge")
    assert pruning.needs_own_scores(tiny_vit, random_pixels(tiny_vit, 1), 0.5, None)
    assert not pruning.needs_own_scores(tiny_vit, random_pixels(tiny_vit, 1), 1.0, None)
    assert not pruning.needs_own_scores(tiny_vit, random_pixels(tiny_vit, 1), 0.5, torch.zeros(1, 24))


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("fusion", ["drop", "merge"])
def test_special_tokens_survive_pruning(request, name, fusion):
    """Cut after the last block: only the special tokens' outputs feed the head, so logits must be exact
    whatever is dropped; a dropped or misplaced CLS/distillation token would change them."""
    bundle = request.getfixturevalue(name)
    pixels = random_pixels(bundle, 2)
    with torch.no_grad():
        expected = bundle.model(pixel_values=pixels).logits
    last = bundle.num_layers
    logits, _ = pruning.forward_pruned(bundle, pixels, last, keep=0.1, fusion=fusion)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    # ...while an early cut really changes what the later blocks compute.
    early, _ = pruning.forward_pruned(bundle, pixels, 1, keep=0.1, fusion=fusion)
    assert not torch.allclose(early, expected, atol=1e-4)


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8])
def test_efficiency_merge_runs_batched(request, name, keep):
    """A batch gives each image exactly what it gets alone (no token mixes across images)."""
    bundle = request.getfixturevalue(name)
    pixels = random_pixels(bundle, 3, seed=4)
    logits, keep_idx = pruning.forward_pruned(bundle, pixels, 1, keep, fusion="merge")
    assert logits.shape == (3, len(bundle.id2label)) and torch.isfinite(logits).all()
    assert keep_idx.shape == (3, round(keep * GRIDS[name][0] * GRIDS[name][1]))
    for i in range(3):
        alone, alone_idx = pruning.forward_pruned(bundle, pixels[i : i + 1], 1, keep, fusion="merge")
        torch.testing.assert_close(alone, logits[i : i + 1], atol=1e-5, rtol=0)
        assert torch.equal(alone_idx[0], keep_idx[i])


def test_merging_preserves_total_mass():
    """Size-weighted means: sum(size * token) and the total size are the same before and after merging."""
    torch.manual_seed(5)
    x = torch.randn(2, 10, 4)
    sizes = torch.rand(2, 10, 1) + 0.5
    keep_idx = torch.tensor([[0, 3, 7], [1, 2, 9]])
    drop_idx = torch.tensor([[i for i in range(10) if i not in row] for row in keep_idx.tolist()])
    partner = torch.randint(0, 3, drop_idx.shape, generator=torch.Generator().manual_seed(1))  # any assignment
    merged, new_size = pruning.merge_into_kept(x, sizes, keep_idx, drop_idx, partner)
    assert merged.shape == (2, 3, 4)
    torch.testing.assert_close(new_size.sum(1), sizes.sum(1))
    torch.testing.assert_close((merged * new_size).sum(1), (x * sizes).sum(1))


def test_prune_result_mask_matches_kept_tokens(analyses):
    analysis = analyses["tiny_deit_distilled"]
    result = pruning.prune(analysis, keep=0.5, after_block=1, mode="analysis", timing_repeats=0)
    assert result.kept_mask.shape == GRIDS["tiny_deit_distilled"]
    assert result.kept_mask.sum() == result.tokens_after - 2 == 18
    # Analysis mode keeps exactly the top of its ranking, which starts with the most intended patch.
    ranking = pruning.analysis_scores(analysis, 1, 0.5)[0].numpy().reshape(result.kept_mask.shape)
    assert ranking[result.kept_mask].min() > ranking[~result.kept_mask].max()
    intent = analysis.intent(from_block=1)
    assert result.kept_mask.ravel()[int(intent.argmax())]


# ---- other targets --------------------------------------------------------------------------------------


def test_for_target_reuses_the_pass_and_matches_a_fresh_analysis(tiny_vit):
    image = random_image(64, 40, seed=6)
    analysis = analyze(tiny_vit, image)
    target = int(np.argsort(analysis.probs)[0])  # the least likely class: surely not the predicted one
    assert target != analysis.target
    other = analysis.for_target(target)
    assert other.target == target
    assert not np.allclose(other.attention_grads, analysis.attention_grads, atol=1e-3)
    fresh = analyze(tiny_vit, image, target=target)
    np.testing.assert_allclose(other.attention_grads, fresh.attention_grads, atol=1e-5)
    np.testing.assert_allclose(other.intent(), fresh.intent(), atol=1e-5)
    np.testing.assert_allclose(analysis.grad_rollout(target), fresh.grad_rollout(), atol=1e-5)
    np.testing.assert_allclose(analysis.intent(target), fresh.intent(), atol=1e-5)
    # Without the graph, for_target pays one more forward pass and still gets the same answer.
    released = analyze(tiny_vit, image, keep_graph=False)
    np.testing.assert_allclose(released.for_target(target).attention_grads, fresh.attention_grads, atol=1e-5)


# ---- loading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLES)
def test_load_model_derives_the_token_layout(request, tmp_path, name):
    bundle = request.getfixturevalue(name)
    bundle.model.save_pretrained(tmp_path)
    bundle.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model) is type(bundle.model)
    assert loaded.num_special == SPECIAL[name]
    assert (loaded.patch_size, loaded.input_size) == (bundle.patch_size, bundle.input_size)
    analysis = analyze(loaded, random_image(60, 45))
    assert analysis.grid == GRIDS[name]
    assert analysis.attentions.shape[-1] == SPECIAL[name] + GRIDS[name][0] * GRIDS[name][1]
    assert analysis.rollout().shape == GRIDS[name]


def test_load_model_reports_a_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"))


# ---- compute accounting ---------------------------------------------------------------------------------

MODES = [("analysis", "drop"), ("efficiency", "drop"), ("efficiency", "fuse"), ("efficiency", "merge")]


@pytest.mark.parametrize("mode, fusion", MODES)
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_pruning_saves_macs(deit_tiny, mode, fusion, keep):
    tokens_before, tokens_after, before, after = pruning.pruned_macs(deit_tiny, 197, keep, 6, mode, fusion)
    assert tokens_before == 197 and tokens_after < 197
    assert after < before


@pytest.mark.parametrize("mode, fusion", MODES)
def test_keeping_everything_costs_the_same(deit_tiny, mode, fusion):
    tokens_before, tokens_after, before, after = pruning.pruned_macs(deit_tiny, 197, 1.0, 6, mode, fusion)
    assert tokens_before == tokens_after == 197 and after == before


def test_deit_tiny_macs_match_the_published_figure(deit_tiny):
    # DeiT-Ti: 1.3 G multiply-accumulates per 224x224 image (Touvron et al. 2021, Table 1).
    _, _, before, _ = pruning.pruned_macs(deit_tiny, 197, 1.0, 6, "analysis", "drop")
    assert 1.2e9 < before < 1.35e9


def test_uncached_hub_model_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("zoomvit-test/not-a-cached-model")
    message = str(err.value)
    assert "\n" not in message and "zoomvit-test/not-a-cached-model" in message
    assert "offline" in message and "--model PATH" in message


def test_focus_share_tells_one_place_from_several():
    from zoomvit import intent

    one = np.zeros((8, 8), dtype=np.float32)
    one[2:4, 2:4] = 1.0
    assert intent.focus_share(one) == pytest.approx(1.0)
    two = one.copy()
    two[6:8, 6:8] = 1.0  # a second, separate blob of the same weight
    assert intent.focus_share(two, mass=0.99) == pytest.approx(0.5)
    assert intent.focus_share(two) == pytest.approx(0.8)  # 60% of the mass: 5 patches, 4 of them in one blob


def test_smaller_budgets_keep_a_prefix_of_the_pick_order(tiny_vit):
    rng = np.random.default_rng(1)
    analysis = analyze(tiny_vit, rng.integers(0, 255, (32, 48, 3), dtype=np.uint8), keep_graph=False)
    patches = analysis.grid[0] * analysis.grid[1]
    order = pruning.intent_pick_order(analysis, 1, patches)
    assert sorted(order.tolist()) == list(range(patches))
    for keep in (0.25, 0.5):
        count = pruning.kept_count(patches, keep)
        kept = pruning.analysis_scores(analysis, 1, keep)[0].argsort(descending=True)[:count]
        assert kept.tolist() == order[:count].tolist()


def test_printing_a_zoom_or_prune_result_is_one_short_line(analyses):
    """Their arrays, crops and timing runs would fill a screen (750 lines for a PruneResult)."""
    from zoomvit import zoom

    analysis = analyses["tiny_vit"]
    pruned = pruning.prune(analysis, 0.5, 1, "analysis", timing_repeats=0)
    for result in (pruned, zoom.zoom(analysis)):
        text = repr(result)
        assert "\n" not in text and len(text) < 400 and "array" not in text
    assert "keep=0.5" in repr(pruned) and "after_block=1" in repr(pruned)
