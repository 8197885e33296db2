"""Each family's config as its real hub checkpoint carries it, sizes shrunk: the tiny test models are built from these.

A config class fills in a default for every key it knows, so a test config built from keyword arguments can carry
keys a family's real config never has (DINOv2's carries `mlp_ratio`, and no `intermediate_size`): code reading such
a key passes the tests and fails on every real checkpoint. Here every dict has exactly the keys of the config.json
of the checkpoint named beside it (the keys its config class wrote when it was uploaded), with the same values but
for the sizes: hidden size, layers, heads, MLP width where the config names one, image and patch size, and 5 labels
(id2label / label2id, which every image classifier's config carries). `config_for` builds the config as
`from_pretrained` does (`from_dict`) and lets a test change only keys the real config has.
"""

import copy

from transformers import CONFIG_MAPPING

NUM_LABELS = 5
_LABELS = {
    "id2label": {str(i): f"LABEL_{i}" for i in range(NUM_LABELS)},
    "label2id": {f"LABEL_{i}": i for i in range(NUM_LABELS)},
}
# The shrunk sizes, under the keys the families use for them.
_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}

# facebook/deit-tiny-patch16-224 (a ViT, see ../shared/models/deit-tiny-patch16-224/config.json); the DeiT-type
# checkpoints (facebook/deit-*-distilled-patch16-224) carry the same keys under model_type "deit".
_DEIT_TINY = {
    "architectures": ["ViTForImageClassification"],
    "model_type": "vit",
    **_SIZES,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "num_channels": 3,
    "qkv_bias": True,
    "encoder_stride": 16,
    **_LABELS,
}

HUB_CONFIGS = {
    # google/vit-base-patch16-224
    "vit": {
        "architectures": ["ViTForImageClassification"],
        "attention_probs_dropout_prob": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        **_SIZES,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "model_type": "vit",
        "num_channels": 3,
        "qkv_bias": True,
        "transformers_version": "4.13.0.dev0",
        **_LABELS,
    },
    "deit": {**_DEIT_TINY, "architectures": ["DeiTForImageClassificationWithTeacher"], "model_type": "deit"},
    # facebook/vit-msn-small
    "vit_msn": {
        "architectures": ["ViTMSNForImageClassification"],
        "attention_probs_dropout_prob": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        **_SIZES,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-06,
        "model_type": "vit_msn",
        "num_channels": 3,
        "qkv_bias": True,
        "torch_dtype": "float32",
        "transformers_version": "4.24.0.dev0",
        **_LABELS,
    },
    # facebook/dinov2-small (the classifier facebook/dinov2-small-imagenet1k-1-layer adds its labels): the MLP's
    # width is hidden_size * mlp_ratio; there is no intermediate_size.
    "dinov2": {
        "architectures": ["Dinov2ForImageClassification"],
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        **_SIZES,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-06,
        "layerscale_value": 1.0,
        "mlp_ratio": 4,
        "model_type": "dinov2",
        "num_channels": 3,
        "qkv_bias": True,
        "torch_dtype": "float32",
        "transformers_version": "4.32.0.dev0",
        "use_swiglu_ffn": False,
        **_LABELS,
    },
    # facebook/dinov2-with-registers-small (its backbone stages follow the layer count: 2 here, 12 there)
    "dinov2_with_registers": {
        "apply_layernorm": True,
        "architectures": ["Dinov2WithRegistersForImageClassification"],
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        **_SIZES,
        "initializer_range": 0.02,
        "interpolate_antialias": True,
        "interpolate_offset": 0.0,
        "layer_norm_eps": 1e-06,
        "layerscale_value": 1.0,
        "mlp_ratio": 4,
        "model_type": "dinov2_with_registers",
        "num_channels": 3,
        "num_register_tokens": 4,
        "out_features": ["stage2"],
        "out_indices": [2],
        "qkv_bias": True,
        "reshape_hidden_states": True,
        "stage_names": ["stem", "stage1", "stage2"],
        "torch_dtype": "float32",
        "transformers_version": "4.48.0.dev0",
        "use_swiglu_ffn": False,
        **_LABELS,
    },
    # microsoft/beit-base-patch16-224
    "beit": {
        "architectures": ["BeitForImageClassification"],
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        **_SIZES,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "layer_scale_init_value": 0.1,
        "model_type": "beit",
        "num_channels": 3,
        "transformers_version": "4.10.0.dev0",
        "use_absolute_position_embeddings": False,
        "use_mask_token": False,
        "use_mean_pooling": True,
        "use_relative_position_bias": True,
        "use_shared_relative_position_bias": False,
        "vocab_size": 8192,
        **_LABELS,
    },
    # facebook/data2vec-vision-base-ft1k
    "data2vec-vision": {
        "architectures": ["Data2VecVisionForImageClassification"],
        "attention_probs_dropout_prob": 0.0,
        "auxiliary_channels": 256,
        "auxiliary_concat_input": False,
        "auxiliary_loss_weight": 0.4,
        "auxiliary_num_convs": 1,
        "drop_path_rate": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        **_SIZES,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "layer_scale_init_value": 0.1,
        "model_type": "data2vec-vision",
        "num_channels": 3,
        "out_indices": [3, 5, 7, 11],
        "pool_scales": [1, 2, 3, 6],
        "semantic_loss_ignore_index": 255,
        "torch_dtype": "float32",
        "transformers_version": "4.18.0.dev0",
        "use_absolute_position_embeddings": False,
        "use_auxiliary_head": True,
        "use_mask_token": False,
        "use_mean_pooling": True,
        "use_relative_position_bias": True,
        "use_shared_relative_position_bias": False,
        "vocab_size": 8192,
        **_LABELS,
    },
    # openai/clip-vit-base-patch32 (CLIPForImageClassification reads vision_config; the text tower is not built)
    "clip": {
        "architectures": ["CLIPForImageClassification"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 512,
        "transformers_version": None,
        **_LABELS,
        "text_config": {
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 32,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "pad_token_id": 1,
            "projection_dim": 512,
            "vocab_size": 49408,
        },
        "vision_config": {
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "hidden_act": "quick_gelu",
            **_SIZES,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_channels": 3,
            "projection_dim": 512,
        },
    },
    # google/siglip-base-patch16-224 (its config names only what differs from the defaults; the shrunk sizes are
    # keys of the vision config, as in the larger SigLIPs' configs)
    "siglip": {
        "architectures": ["SiglipForImageClassification"],
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "torch_dtype": "float32",
        "transformers_version": "4.37.0.dev0",
        **_LABELS,
        "text_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "model_type": "siglip_text_model",
            "num_attention_heads": 2,
            "vocab_size": 32000,
        },
        "vision_config": {"model_type": "siglip_vision_model", **_SIZES, "intermediate_size": 64},
    },
}


def config_for(model_type: str, vision=None, **changes):
    """The config of HUB_CONFIGS[model_type], built as from_pretrained builds it, with `changes` (and `vision`, for
    the vision config) to keys the real config carries, no others; eager attention, whose probabilities the
    tests compare with."""
    config = copy.deepcopy(HUB_CONFIGS[model_type])
    for target, update in ((config, changes), (config.get("vision_config", {}), vision or {})):
        unknown = set(update) - set(target)
        assert not unknown, f"{model_type}'s hub config has no {sorted(unknown)}"
        target.update(update)
    return CONFIG_MAPPING[model_type].from_dict(config, attn_implementation="eager")
