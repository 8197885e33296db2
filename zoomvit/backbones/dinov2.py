"""Hugging Face DINOv2 and DINOv2 with registers."""

from __future__ import annotations

from functools import partial

import torch

from .base import Backbone, BlockParts, pooled_mean, split_heads


class HFDinov2(Backbone):
    """Hugging Face DINOv2 and DINOv2 with registers: [class, registers..., patches]; pre-norm blocks with layer
    scale; position embeddings always resampled to the input's grid; the head reads the class token and the mean
    of the patch tokens (after the final layernorm, weighted by merged-token sizes), never the registers.

    The config carries `mlp_ratio`, not `intermediate_size`: sizes are read from the modules (`mlp_macs`)."""

    def __init__(self, model):
        super().__init__(model)
        self.layers = self.backbone.encoder.layer
        registers = int(getattr(self.config, "num_register_tokens", 0) or 0)
        self.num_prefix = 1 + registers
        self.decision_tokens = (0,)
        self.pooled_from = self.num_prefix  # the class token and the patch mean each feed half the classifier
        self.family = "DINOv2 with registers" if registers else "DINOv2"

    def embed(self, pixel_values):
        return self.backbone.embeddings(pixel_values)  # resamples its position table itself, always

    def parts(self, layer):
        att = layer.attention
        return BlockParts(
            layer.norm1,
            partial(split_heads, att),
            att.scaling,
            att.o_proj,
            layer.layer_scale1,
            layer.norm2,
            (layer.mlp,),
            layer.layer_scale2,
        )

    def head(self, x, sizes=None):
        seq = self.backbone.layernorm(x)
        pooled = torch.cat([seq[:, 0], pooled_mean(seq, self.pooled_from, sizes)], dim=-1)
        return self.model.classifier(pooled)

    def describe(self) -> str:
        registers = self.num_prefix - 1
        tokens = f"class token + {registers} registers" if registers else "class token"
        return f"{self.family}: {tokens}, then patches; the head reads the class token and the mean of the patches"
