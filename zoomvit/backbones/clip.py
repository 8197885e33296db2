"""Hugging Face CLIP image classifier."""

from __future__ import annotations

from functools import partial

from .base import Backbone, BlockParts, pooled_mean, split_heads, unscaled


class HFCLIP(Backbone):
    """Hugging Face CLIP image classifier: [class, patches] with a layernorm on the embeddings before block 1;
    the head averages the last block's patch tokens as they are (no final norm) and never reads the class token.
    Its settings live in config.vision_config. Merged tokens weigh in the mean by their sizes."""

    family = "CLIP"

    def __init__(self, model):
        super().__init__(model)
        self.config = model.config.vision_config
        self.backbone = model.vision_model
        self.layers = self.backbone.encoder.layers
        self.num_prefix = 1
        self.decision_tokens = ()
        self.pooled_from = 1

    def embed(self, pixel_values):
        return self.backbone.pre_layrnorm(super().embed(pixel_values))

    def parts(self, layer):
        att = layer.self_attn
        return BlockParts(
            layer.layer_norm1,
            partial(split_heads, att),
            att.scale,
            att.out_proj,
            unscaled,
            layer.layer_norm2,
            (layer.mlp,),
            unscaled,
        )

    def head(self, x, sizes=None):
        return self.model.classifier(pooled_mean(x, self.pooled_from, sizes))

    def describe(self) -> str:
        return "CLIP: class token, then patches; the head reads the mean of the patches (not the class token)"
