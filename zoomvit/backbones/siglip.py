"""Hugging Face SigLIP image classifier."""

from __future__ import annotations

from .base import Backbone, pooled_mean
from .clip import HFCLIP


class HFSiglip(HFCLIP):
    """Hugging Face SigLIP image classifier: patches only (no prefix token); CLIP's blocks and settings in
    config.vision_config; the head averages every token after the final layernorm. Its attention-pool head is
    built but not used by the classifier."""

    family = "SigLIP"

    def __init__(self, model):
        super().__init__(model)
        self.num_prefix = 0
        self.pooled_from = 0

    embed = Backbone.embed  # the plain embeddings: no layernorm before block 1

    def head(self, x, sizes=None):
        return self.model.classifier(pooled_mean(self.backbone.post_layernorm(x), self.pooled_from, sizes))

    def describe(self) -> str:
        return "SigLIP: patches only (no class token); the head reads the mean of all tokens"
