"""Hugging Face ViT, DeiT (distilled too) and ViT-MSN."""

from __future__ import annotations

from functools import partial

from .base import Backbone, BlockParts, split_heads, unscaled


class HFViT(Backbone):
    """Hugging Face ViT, DeiT (distilled too: class + distillation token, the two heads averaged) and ViT-MSN:
    pre-norm blocks with separate q/k/v projections, absolute position embeddings, the head on the class
    token(s) after the final layernorm."""

    def __init__(self, model):
        super().__init__(model)
        self.layers = self.backbone.layers
        # DeiT embeddings always carry a distillation token; only the teacher-distilled head reads it.
        self.num_prefix = 2 if getattr(self.backbone.embeddings, "distillation_token", None) is not None else 1
        distilled_head = hasattr(model, "distillation_classifier")
        self.decision_tokens = (0, 1) if distilled_head else (0,)
        self.family = {"deit": "DeiT", "vit_msn": "ViT-MSN"}.get(self.config.model_type, "ViT")
        if distilled_head:
            self.family += " (distilled)"

    def parts(self, layer):
        att = layer.attention
        return BlockParts(
            layer.layernorm_before,
            partial(split_heads, att),
            att.scaling,
            att.o_proj,
            unscaled,
            layer.layernorm_after,
            (layer.mlp,),
            unscaled,
        )

    def head(self, x, sizes=None):
        seq = self.backbone.layernorm(x)
        if len(self.decision_tokens) == 2:  # distilled DeiT: average the class and distillation heads
            return (self.model.cls_classifier(seq[:, 0]) + self.model.distillation_classifier(seq[:, 1])) / 2
        return self.model.classifier(seq[:, 0])

    def describe(self) -> str:
        tokens = "class + distillation token" if self.num_prefix == 2 else "class token"
        read = "both" if len(self.decision_tokens) == 2 else "the class token"
        return f"{self.family}: {tokens}, then patches; the head reads {read}"
