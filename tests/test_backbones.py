"""Backbone adapters (backbones.py): each family's blocks, head and token layout against the library's own model."""

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    DeiTConfig,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    DeiTForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    ViTMSNConfig,
    ViTMSNForImageClassification,
)

import backbones


def _tiny(config_cls, **extra):
    return config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=32, patch_size=8, num_labels=5, initializer_range=0.2,
                      attn_implementation="eager", **extra)


def deit_without_teacher():
    torch.manual_seed(2)
    model = DeiTForImageClassification(_tiny(DeiTConfig)).eval()
    with torch.no_grad():  # DeiT starts these at zero; random values make the two special tokens differ
        for param in (model.base_model.embeddings.cls_token, model.base_model.embeddings.distillation_token):
            param.normal_(std=0.2)
    return model


def vit_msn():
    torch.manual_seed(3)
    return ViTMSNForImageClassification(_tiny(ViTMSNConfig)).eval()


def dinov2():
    torch.manual_seed(4)
    model = Dinov2ForImageClassification(_tiny(Dinov2Config)).eval()
    with torch.no_grad():  # layer scale starts at 1.0 everywhere: random values show it is applied where it belongs
        for name, param in model.named_parameters():
            if "lambda1" in name:
                param.uniform_(0.5, 1.5)
    return model


def dinov2_registers():
    torch.manual_seed(5)
    model = Dinov2WithRegistersForImageClassification(_tiny(Dinov2WithRegistersConfig)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lambda1" in name or "register_tokens" in name:
                param.uniform_(0.5, 1.5)
    return model


def clip():
    torch.manual_seed(6)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, initializer_range=0.2)
    model = CLIPForImageClassification(CLIPConfig(vision_config=vision, num_labels=5)).eval()
    model.set_attn_implementation("eager")  # the library's attentions to compare with
    with torch.no_grad():  # a pre-norm with unit weights would hide a missing one
        model.vision_model.pre_layrnorm.weight.uniform_(0.5, 1.5)
    return model


def siglip():
    torch.manual_seed(7)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8)
    model = SiglipForImageClassification(SiglipConfig(vision_config=vision, num_labels=5)).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(params=["tiny_vit", "tiny_deit_distilled", "deit_without_teacher", "vit_msn", "dinov2",
                        "dinov2_registers", "clip", "siglip"])
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

    import vit_analyzer

    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    plain = vit_analyzer.ViTBundle(deit_without_teacher(), tiny_deit_distilled.processor, "deit", 8, (32, 32), 2,
                                   {i: str(i) for i in range(5)})
    analysis = vit_analyzer.analyze(plain, image)
    cls_row = analysis.attentions[-1].mean(axis=0)[0]
    assert np.allclose(analysis.cls_map(-1), vit_analyzer.normalize_map(analysis._to_grid(cls_row)), atol=1e-6)
    distilled = vit_analyzer.analyze(tiny_deit_distilled, image)
    both = distilled.attentions[-1].mean(axis=0)[:2].mean(axis=0)
    assert np.allclose(distilled.cls_map(-1), vit_analyzer.normalize_map(distilled._to_grid(both)), atol=1e-6)


@pytest.mark.parametrize("make, prefix, family", [(dinov2, 1, "DINOv2"), (dinov2_registers, 5, "DINOv2 with registers"),
                                                  (clip, 1, "CLIP"), (siglip, 0, "SigLIP")])
def test_pooled_heads_end_to_end(make, prefix, family):
    """Tiny DINOv2 (class token + patch mean, registers) and CLIP (patch mean): analysis, every map in [0, 1],
    keep-1.0 pruning equals the model's own logits, the weights of the decision sum to 1 and skip registers."""
    import numpy as np
    from transformers import ViTImageProcessorPil

    import pruning
    import vit_analyzer

    model = make()
    adapter = backbones.adapter_for(model)
    assert (adapter.num_prefix, adapter.family) == (prefix, family)
    weights = adapter.decision_weights(prefix + 16)
    assert float(weights.sum()) == pytest.approx(1.0) and float(weights[1:prefix].sum()) == 0.0  # registers unread
    bundle = vit_analyzer.ViTBundle(model, ViTImageProcessorPil(size={"height": 32, "width": 32}), family, 8,
                                    (32, 32), prefix, {i: str(i) for i in range(5)})
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    analysis = vit_analyzer.analyze(bundle, image)
    assert analysis.grid == (4, 4) and analysis.attentions.shape[-1] == prefix + 16
    for method in vit_analyzer.MAP_METHODS:
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


def test_the_readme_lists_the_supported_families_from_the_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("Supported families: "))
    assert line == "Supported families: " + ", ".join(dict.fromkeys(backbones.FAMILY_NAMES.values())) + "."
