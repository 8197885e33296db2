"""Hugging Face BEiT and Data2Vec-vision: layer scale and a relative position bias that follows the tokens."""

from __future__ import annotations

from functools import partial

import torch

from .base import Backbone, BlockParts, pooled_mean, project_heads, split_heads


def layer_scaled(scale, h: torch.Tensor) -> torch.Tensor:
    """h times a block's layer scale; BEiT stores a missing one as 1.0, Data2Vec-vision as None."""
    return h if scale is None else scale * h


class HFBeit(Backbone):
    """Hugging Face BEiT: [class, patches]; pre-norm blocks with layer scale (`lambda_1/2`) and a relative
    position bias, per block and/or shared by all blocks (added together), optionally absolute position
    embeddings too (resampled by the library to any grid). With mean pooling (the ImageNet checkpoints) the head
    is `pooler.layernorm(mean of the last block's patch tokens)` and the class token is never read; without it,
    the class token after the final layernorm.

    The relative bias depends on where each token sits, so blocks read `positions` and gather the bias of the
    current grid (the one of the last `embed`) by them, never resizing it to a shorter sequence. A token at
    position -1 (EViT's fused token) has no place on the grid and takes the class token's entries, the ones
    the table learned for a token without a place."""

    family = "BEiT"
    uses_positions = True

    def __init__(self, model):
        super().__init__(model)
        self.layers = self.layer_list()
        self.mean_pooling = self.backbone.pooler.layernorm is not None
        self.decision_tokens = () if self.mean_pooling else (0,)
        self.pooled_from = self.num_prefix if self.mean_pooling else None
        self.grid = None  # (rows, cols) of patches of the last embed: the grid the relative bias is laid on
        self._relative_bias = {}  # block -> (1, heads, N, N) bias between every two tokens of that grid

    # Where the library keeps things; Data2Vec-vision has the same model under its older module names.
    def layer_list(self):
        return self.backbone.layers

    def embeddings(self, pixel_values):
        return self.backbone.embeddings(pixel_values)

    def relative_bias_modules(self, i):
        """Block i's own relative position bias module and the shared one, each None where the model has none."""
        return self.layers[i].relative_position_bias, self.backbone.shared_position_bias

    def parts(self, layer):
        att = layer.attention
        return BlockParts(
            layer.layernorm_before,
            partial(split_heads, att),
            att.scaling,
            att.o_proj,
            partial(layer_scaled, layer.lambda_1),
            layer.layernorm_after,
            (layer.mlp,),
            partial(layer_scaled, layer.lambda_2),
        )

    def embed(self, pixel_values):
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        if grid != self.grid:
            self.grid, self._relative_bias = grid, {}
        return self.embeddings(pixel_values)

    def position_bias(self, i, num_tokens, positions=None):
        """(1 or B, heads, N, N) relative position bias of block i between the tokens at `positions` (None: every
        token of the last embed, in order), or None for a model without one."""
        if i not in self._relative_bias:
            modules = [module for module in self.relative_bias_modules(i) if module is not None]
            # Once per grid (the library recomputes it every forward); outside inference mode so that the cached
            # tensor also serves the analysis pass, which needs no gradient of the tables.
            with torch.inference_mode(False), torch.no_grad():
                self._relative_bias[i] = sum(module(self.grid) for module in modules) if modules else None
        full = self._relative_bias[i]
        if full is None:
            return None
        if positions is None:
            if full.shape[-1] != num_tokens:
                raise ValueError(f"{num_tokens} tokens on a {self.grid} patch grid: pass the tokens' positions")
            return full
        index = positions.clamp_min(0)  # position -1 takes the class token's entries (see the class docstring)
        return full[0][:, index.unsqueeze(-1), index.unsqueeze(-2)].transpose(0, 1)

    def attention_bias(self, i, num_tokens, attn_bias, positions):
        bias = self.position_bias(i, num_tokens, positions)
        if attn_bias is not None:
            bias = attn_bias if bias is None else bias + attn_bias
        return bias

    def head(self, x, sizes=None):
        if self.mean_pooling:  # the final layernorm is an Identity then: the pooler's norm comes after the mean
            return self.model.classifier(self.backbone.pooler.layernorm(pooled_mean(x, self.pooled_from, sizes)))
        return self.model.classifier(self.backbone.layernorm(x)[:, 0])

    def describe(self) -> str:
        read = "the mean of the patches (not the class token)" if self.mean_pooling else "the class token"
        return f"{self.family}: class token, then patches, relative position bias; the head reads {read}"


class HFData2VecVision(HFBeit):
    """Hugging Face Data2Vec-vision: BEiT's model under the library's older module names (attention in
    `attention.attention`, the MLP as `intermediate` + `output`, no layer scale as None)."""

    family = "Data2Vec-vision"

    def layer_list(self):
        return self.backbone.encoder.layer

    def embeddings(self, pixel_values):
        return self.backbone.embeddings(pixel_values)[0]  # (tokens, patch grid)

    def relative_bias_modules(self, i):
        own = getattr(self.layers[i].attention.attention, "relative_position_bias", None)
        return own, getattr(self.backbone.encoder, "relative_position_bias", None)

    def parts(self, layer):
        att = layer.attention.attention
        qkv = partial(project_heads, (att.query, att.key, att.value), att.attention_head_size, holder=att)
        return BlockParts(
            layer.layernorm_before,
            qkv,
            att.attention_head_size**-0.5,
            layer.attention.output.dense,
            partial(layer_scaled, layer.lambda_1),
            layer.layernorm_after,
            (layer.intermediate, layer.output),
            partial(layer_scaled, layer.lambda_2),
        )
