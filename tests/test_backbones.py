"""Backbone adapters (the backbones package): each family's blocks, head and token layout against the library's own
model. The tiny models are built from each family's real hub config keys (hub_configs.py), once per session."""

import copy
import functools

import pytest
import torch
from hub_configs import config_for
from transformers import (
    BeitForImageClassification,
    CLIPForImageClassification,
    Data2VecVisionForImageClassification,
    DeiTForImageClassification,
    Dinov2ForImageClassification,
    Dinov2WithRegistersForImageClassification,
    SiglipForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTMSNForImageClassification,
)

from zoomvit import backbones
from zoomvit.maps import fuse_heads, normalize_map, rollout_matrix
from zoomvit.models import ViTBundle
from zoomvit.vit_analyzer import MAP_METHODS, analyze

# A larger init range than the real 0.02 gives peaked, distinguishable attention in a random model.
INIT = dict(initializer_range=0.2)


@functools.cache
def deit_without_teacher():
    torch.manual_seed(2)
    model = DeiTForImageClassification(config_for("deit", **INIT)).eval()
    with torch.no_grad():  # DeiT starts these at zero; random values make the two special tokens differ
        for param in (model.base_model.embeddings.cls_token, model.base_model.embeddings.distillation_token):
            param.normal_(std=0.2)
    return model


@functools.cache
def vit_msn():
    torch.manual_seed(3)
    return ViTMSNForImageClassification(config_for("vit_msn", **INIT)).eval()


@functools.cache
def dinov2():
    """DINOv2 as its hub config has it: the MLP's width from mlp_ratio, no intermediate_size."""
    torch.manual_seed(4)
    model = Dinov2ForImageClassification(config_for("dinov2", **INIT)).eval()
    with torch.no_grad():  # layer scale starts at 1.0 everywhere: random values show it is applied where it belongs
        for name, param in model.named_parameters():
            if "lambda1" in name:
                param.uniform_(0.5, 1.5)
    return model


@functools.cache
def dinov2_registers():
    torch.manual_seed(5)
    model = Dinov2WithRegistersForImageClassification(config_for("dinov2_with_registers", **INIT)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lambda1" in name or "register_tokens" in name:
                param.uniform_(0.5, 1.5)
    return model


@functools.cache
def clip():
    torch.manual_seed(6)
    model = CLIPForImageClassification(config_for("clip", vision=INIT)).eval()
    model.set_attn_implementation("eager")  # the library's attentions to compare with
    with torch.no_grad():  # a pre-norm with unit weights would hide a missing one
        model.vision_model.pre_layrnorm.weight.uniform_(0.5, 1.5)
    return model


@functools.cache
def siglip():
    torch.manual_seed(7)
    model = SiglipForImageClassification(config_for("siglip")).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
    return model


def _beit_like(model_cls, model_type, seed, **options):
    torch.manual_seed(seed)
    model = model_cls(config_for(model_type, **INIT, **options)).eval()
    with torch.no_grad():  # bias tables and embeddings start at zero, layer scale at one value: random values show
        for name, param in model.named_parameters():  # each is applied where it belongs
            if "lambda" in name:
                param.uniform_(0.5, 1.5)
            elif any(part in name for part in ("relative_position_bias_table", "position_embeddings", "cls_token")):
                param.normal_(std=0.5)
    return model


@functools.cache
def beit_layer_bias():
    """BEiT as the ImageNet checkpoints: a relative bias per block, layer scale, the head on the patch mean."""
    return _beit_like(BeitForImageClassification, "beit", 8)


@functools.cache
def beit_shared_bias_cls():
    """BEiT with one relative bias shared by the blocks, absolute position embeddings, the head on the class token."""
    return _beit_like(
        BeitForImageClassification,
        "beit",
        9,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        use_absolute_position_embeddings=True,
        use_mean_pooling=False,
    )


@functools.cache
def data2vec_vision():
    """Data2Vec-vision with both relative biases (added together) and absolute position embeddings."""
    return _beit_like(
        Data2VecVisionForImageClassification,
        "data2vec-vision",
        10,
        use_relative_position_bias=True,
        use_shared_relative_position_bias=True,
        use_absolute_position_embeddings=True,
    )


@pytest.fixture(
    params=[
        "tiny_vit",
        "tiny_deit_distilled",
        "deit_without_teacher",
        "vit_msn",
        "dinov2",
        "dinov2_registers",
        "clip",
        "siglip",
        "beit_layer_bias",
        "beit_shared_bias_cls",
        "data2vec_vision",
    ]
)
def model(request):
    if request.param in ("tiny_vit", "tiny_deit_distilled"):
        return request.getfixturevalue(request.param).model
    return globals()[request.param]()


def run_adapter(adapter, pixels, full_attention):
    x = adapter.embed(pixels)
    attentions = []
    for i in range(adapter.num_layers):
        x, probs = adapter.block(i, x, full_attention=full_attention)
        attentions.append(probs)
    return adapter.head(x), attentions


@torch.no_grad()
def test_the_adapter_reproduces_the_model(model):
    """Logits of the block engine (fused and eager) and its attention probabilities equal the library's."""
    adapter = backbones.adapter_for(model)
    size = adapter.input_size
    pixels = torch.randn(2, 3, *size)
    expected = model(pixel_values=pixels, output_attentions=True)
    fused, _ = run_adapter(adapter, pixels, full_attention=False)
    eager, attentions = run_adapter(adapter, pixels, full_attention=True)
    assert torch.allclose(fused, expected.logits, atol=1e-5)
    assert torch.allclose(eager, expected.logits, atol=1e-5)
    for ours, theirs in zip(attentions, expected.attentions, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_the_stacked_qkv_projection_follows_its_weights(tiny_vit):
    """q, k and v run as one stacked product kept on the attention module: a weight changed in place (trained,
    loaded) or a model cast or moved gives a new stack, never the old weights' logits."""
    model = copy.deepcopy(tiny_vit.model)
    adapter = backbones.adapter_for(model)
    pixels = torch.randn(1, 3, *adapter.input_size)
    with torch.no_grad():
        run_adapter(adapter, pixels, full_attention=False)  # the stacks are made here
        model.base_model.layers[0].attention.k_proj.weight.mul_(-1)
        ours, _ = run_adapter(adapter, pixels, full_attention=False)
        assert torch.allclose(ours, model(pixel_values=pixels).logits, atol=1e-5)
        model.to(torch.float64)
        ours, _ = run_adapter(adapter, pixels.double(), full_attention=False)
        assert ours.dtype == torch.float64
        assert torch.allclose(ours, model(pixel_values=pixels.double()).logits, atol=1e-10)


def test_token_layouts():
    for model, layout in ((deit_without_teacher(), (2, (0,), "DeiT")), (vit_msn(), (1, (0,), "ViT-MSN"))):
        adapter = backbones.adapter_for(model)
        assert (adapter.num_prefix, adapter.decision_tokens, adapter.family) == layout


def test_distilled_deit_reads_both_special_tokens(tiny_deit_distilled, tiny_vit):
    adapter = tiny_deit_distilled.adapter
    assert (adapter.num_prefix, adapter.decision_tokens, adapter.family) == (2, (0, 1), "DeiT (distilled)")
    assert "class + distillation token" in adapter.describe() and "reads both" in adapter.describe()
    assert (tiny_vit.adapter.num_prefix, tiny_vit.adapter.decision_tokens) == (1, (0,))
    assert tiny_deit_distilled.adapter.head_macs() == 2 * tiny_vit.adapter.head_macs()


def test_an_unsupported_family_names_the_supported_ones():
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1], num_heads=[1], num_labels=3)
    with pytest.raises(ValueError, match=r"a 'swin' model; supported families: ViT \('vit'\), DeiT \('deit'\)"):
        backbones.adapter_for(SwinForImageClassification(cfg))


def test_maps_read_only_the_tokens_the_head_reads(tiny_deit_distilled):
    """A DeiT without its teacher head has a distillation token the decision never reads: its maps follow the
    class token's row alone; the distilled head reads both rows."""
    import numpy as np

    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    plain = ViTBundle(
        deit_without_teacher(), tiny_deit_distilled.processor, "deit", 8, (32, 32), 2, {i: str(i) for i in range(5)}
    )
    analysis = analyze(plain, image)
    cls_row = analysis.attentions[-1].mean(axis=0)[0]
    assert np.allclose(analysis.cls_map(-1), normalize_map(analysis._to_grid(cls_row)), atol=1e-6)
    distilled = analyze(tiny_deit_distilled, image)
    both = distilled.attentions[-1].mean(axis=0)[:2].mean(axis=0)
    assert np.allclose(distilled.cls_map(-1), normalize_map(distilled._to_grid(both)), atol=1e-6)


@pytest.mark.parametrize(
    "make, prefix, family",
    [
        (dinov2, 1, "DINOv2"),
        (dinov2_registers, 5, "DINOv2 with registers"),
        (clip, 1, "CLIP"),
        (siglip, 0, "SigLIP"),
        (beit_layer_bias, 1, "BEiT"),
        (beit_shared_bias_cls, 1, "BEiT"),
        (data2vec_vision, 1, "Data2Vec-vision"),
    ],
)
def test_pooled_heads_end_to_end(make, prefix, family):
    """Tiny DINOv2 (class token + patch mean, registers), CLIP (patch mean), SigLIP, BEiT and Data2Vec-vision
    (relative bias): analysis, every map in [0, 1], keep-1.0 pruning equals the model's own logits, the weights
    of the decision sum to 1 and skip registers."""
    import numpy as np

    from zoomvit import pruning

    model = make()
    adapter = backbones.adapter_for(model)
    assert (adapter.num_prefix, adapter.family) == (prefix, family)
    weights = adapter.decision_weights(prefix + 16)
    assert float(weights.sum()) == pytest.approx(1.0) and float(weights[1:prefix].sum()) == 0.0  # registers unread
    bundle = tiny_bundle(model)
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    analysis = analyze(bundle, image)
    assert analysis.grid == (4, 4) and analysis.attentions.shape[-1] == prefix + 16
    for method in MAP_METHODS:
        grid_map = analysis.map(method)
        assert grid_map.shape == (4, 4) and np.isfinite(grid_map).all() and grid_map.min() >= 0 and grid_map.max() <= 1
    with torch.no_grad():
        expected = model(pixel_values=analysis.pixel_values).logits.softmax(-1)[0].numpy()
    assert np.allclose(analysis.probs, expected, atol=1e-5)
    for mode in pruning.MODES:
        result = pruning.prune(analysis, 1.0, 1, mode, timing_repeats=0)
        assert np.allclose(result.probs_after, expected, atol=1e-4)
        result = pruning.prune(analysis, 0.5, 1, mode, timing_repeats=0)
        assert result.tokens_after == prefix + 8 and np.isfinite(result.probs_after).all()


def tiny_bundle(model):
    """A model of this file (32x32 input, 8-pixel patches, 5 labels) as the analyzer and pruning take it."""
    from transformers import ViTImageProcessorPil

    adapter = backbones.adapter_for(model)
    return ViTBundle(
        model,
        ViTImageProcessorPil(size={"height": 32, "width": 32}),
        adapter.family,
        8,
        (32, 32),
        adapter.num_prefix,
        {i: str(i) for i in range(5)},
    )


RELATIVE_BIAS_MODELS = [beit_layer_bias, beit_shared_bias_cls, data2vec_vision]


@pytest.mark.parametrize("make", RELATIVE_BIAS_MODELS)
@torch.no_grad()
def test_the_relative_bias_follows_the_input_grid(make):
    """At another input size (a 6x5 grid, not square) the bias table is resampled as the library resamples it;
    back at the trained size the trained grid's bias serves again."""
    model = make()
    adapter = backbones.adapter_for(model)
    for size in ((48, 40), (32, 32)):
        pixels = torch.randn(2, 3, *size)
        logits, _ = run_adapter(adapter, pixels, full_attention=False)
        assert torch.allclose(logits, model(pixel_values=pixels).logits, atol=1e-5)


@pytest.mark.parametrize("make", RELATIVE_BIAS_MODELS)
@torch.no_grad()
def test_blocks_place_tokens_by_their_positions(make):
    """The patches shuffled, with their original positions, give the model's logits (neither head depends on the
    patch order); the same shuffle read as the tokens' order does not."""
    model = make()
    adapter = backbones.adapter_for(model)
    pixels = torch.randn(2, 3, 32, 32)
    x = adapter.embed(pixels)
    torch.manual_seed(0)
    order = torch.stack([torch.randperm(16) for _ in range(2)])
    positions = torch.cat([torch.zeros(2, 1, dtype=torch.long), 1 + order], dim=1)
    shuffled = x.gather(1, positions.unsqueeze(-1).expand_as(x))

    def logits(positions):
        y = shuffled
        for i in range(adapter.num_layers):
            y, _ = adapter.block(i, y, positions=positions)
        return adapter.head(y)

    expected = model(pixel_values=pixels).logits
    assert torch.allclose(logits(positions), expected, atol=1e-5)
    assert not torch.allclose(logits(None), expected, atol=1e-3)


def test_a_token_without_a_place_takes_the_class_tokens_bias():
    adapter = backbones.adapter_for(beit_layer_bias())
    adapter.embed(torch.zeros(1, 3, 32, 32))
    full = adapter.position_bias(0, 17)[0]
    gathered = adapter.position_bias(0, 3, torch.tensor([[0, 6, -1]]))[0]
    as_tokens = [0, 6, 0]  # the fused token (-1) reads and is read like the class token
    assert torch.equal(gathered, full[:, as_tokens][:, :, as_tokens])


@torch.no_grad()
def test_pruned_blocks_gather_the_relative_bias_by_original_positions():
    """Analysis-mode pruning keeps the patches in ranking order, not index order; the library's own block, given
    the shared bias matrix gathered by hand at the kept tokens' original indices, computes the same logits."""
    from zoomvit import pruning

    model = beit_shared_bias_cls()
    beit = model.beit
    pixels = torch.randn(2, 3, 32, 32)
    logits, keep_idx = pruning.forward_pruned(tiny_bundle(model), pixels, 1, 0.5, patch_scores=torch.randn(2, 16))
    assert (keep_idx.diff(dim=1) < 0).any()  # some kept patch comes before one with a smaller index
    full = beit.shared_position_bias((4, 4))[0]
    hidden = beit.layers[0](beit.embeddings(pixels), attention_mask=full.unsqueeze(0))
    positions = torch.cat([torch.zeros(2, 1, dtype=torch.long), 1 + keep_idx], dim=1)
    kept = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    gathered = torch.stack([full[:, index][:, :, index] for index in positions])
    expected = model.classifier(beit.pooler(beit.layernorm(beit.layers[1](kept, attention_mask=gathered))))
    assert torch.allclose(logits, expected, atol=1e-5)


@torch.no_grad()
def test_a_merged_token_weighs_in_the_head_as_the_tokens_it_stands_for(model):
    """head(x, sizes) equals the head of the tokens with each patch repeated `size` times: pooled heads take the
    size-weighted mean, class-token heads read their prefix tokens as before."""
    adapter = backbones.adapter_for(model)
    prefix = adapter.num_prefix
    torch.manual_seed(0)
    x = torch.randn(2, prefix + 6, adapter.hidden_size)
    counts = torch.tensor([1] * prefix + [1, 3, 2, 1, 4, 2])
    repeated = x.repeat_interleave(counts, dim=1)
    sizes = counts.view(1, -1, 1).expand(2, -1, -1).float()
    assert torch.allclose(adapter.head(x, sizes), adapter.head(repeated), atol=1e-5)
    if adapter.decision_weights(prefix + 6)[prefix:].any():  # a pooled head: the sizes do matter
        assert not torch.allclose(adapter.head(x), adapter.head(repeated), atol=1e-4)


@pytest.mark.parametrize("make", [clip, beit_layer_bias, data2vec_vision])
def test_merging_after_the_last_block_is_exact_for_a_mean_of_the_raw_patches(make):
    """Merged tokens are size-weighted means, so a head that averages the last block's patches before any
    nonlinearity (CLIP; BEiT's norm comes after the mean) sees the same mean when it weighs them by size."""
    from zoomvit import pruning

    model = make()
    bundle = tiny_bundle(model)
    pixels = torch.randn(2, 3, 32, 32)
    logits, _ = pruning.forward_pruned(bundle, pixels, bundle.num_layers, 0.25, fusion="merge")
    with torch.no_grad():
        assert torch.allclose(logits, model(pixel_values=pixels).logits, atol=1e-5)


@pytest.mark.parametrize("make", [deit_without_teacher, clip, dinov2_registers, siglip, beit_layer_bias])
@torch.no_grad()
def test_efficiency_pruning_ranks_patches_by_the_decision_row(make):
    """Efficiency mode keeps the patches the decision attended to most before the cut: the class row for a class-
    token head (not the unread distillation token's), the patch-mean row for CLIP and BEiT, the class row and the
    patch mean by halves for DINOv2 (registers unread), every row for SigLIP."""
    from zoomvit import pruning

    bundle = tiny_bundle(make())
    adapter = bundle.adapter
    pixels = torch.randn(2, 3, 32, 32)
    _, keep_idx = pruning.forward_pruned(bundle, pixels, 1, 0.25, fusion="drop")
    x = adapter.embed(pixels)
    _, probs = adapter.block(0, x, full_attention=True)  # the one block before a cut after block 1
    decision_row = torch.einsum("q,bhqk->bk", adapter.decision_weights(x.shape[1]), probs)[:, adapter.num_prefix :]
    expected = decision_row.argsort(dim=1, descending=True)[:, :4]
    assert [set(row.tolist()) for row in keep_idx] == [set(row.tolist()) for row in expected]


def test_the_readme_lists_the_supported_families_from_the_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("Supported families: "))
    assert line == "Supported families: " + ", ".join(dict.fromkeys(backbones.FAMILY_NAMES.values())) + "."


@pytest.mark.parametrize("make, pooled_from", [(clip, 1), (siglip, 0), (beit_layer_bias, 1)])
def test_without_a_read_class_token_cls_attention_is_the_average_pooled_tokens_row(make, pooled_from):
    """The README's definition for heads that average tokens: "CLS attention" of a block is the mean of the pooled
    tokens' attention rows (what each patch receives from the average token), and rollout is the same mean of the
    rolled-out rows; the unread class token's own row plays no part."""
    import numpy as np

    analysis = analyze(tiny_bundle(make()), np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    attention = analysis.attentions[-1].mean(axis=0)
    expected = normalize_map(analysis._to_grid(attention[pooled_from:].mean(axis=0)))
    assert np.allclose(analysis.cls_map(-1), expected, atol=1e-6)
    if pooled_from:
        class_row = normalize_map(analysis._to_grid(attention[0]))
        assert not np.allclose(analysis.cls_map(-1), class_row, atol=1e-3)
    rolled = rollout_matrix(fuse_heads(analysis.attentions, "mean"), 0.9)
    assert np.allclose(
        analysis.rollout(0.9, "mean"), normalize_map(analysis._to_grid(rolled[pooled_from:].mean(axis=0))), atol=1e-6
    )
