"""timm's VisionTransformer family, bare or inside transformers' TimmWrapperForImageClassification."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .base import Backbone, BlockParts, pooled_mean


def supported_timm_model(model):
    """The timm VisionTransformer inside `model` (itself, or a TimmWrapper's) and its pooling ("token" or "avg");
    ValueError for what the adapter cannot run (see TimmViT)."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    timm_model = getattr(model, "timm_model", model)  # TimmWrapperForImageClassification holds it
    if not isinstance(timm_model, VisionTransformer):
        raise ValueError(f"a timm '{type(timm_model).__name__}' model; timm's VisionTransformer family only")
    pool = "map" if timm_model.attn_pool is not None else timm_model.global_pool
    if pool not in ("token", "avg"):
        raise ValueError(f"a timm VisionTransformer with global_pool='{pool}'; class-token and 'avg' heads only")
    for blk in timm_model.blocks:
        if type(blk) is not Block or type(blk.attn) is not Attention or blk.attn.gate is not None:
            raise ValueError(f"a timm VisionTransformer with {type(blk).__name__} blocks; plain Block only")
    return timm_model, pool


def fused_qkv(att, h: torch.Tensor):
    """q, k, v (B, heads, N, head_dim) from timm's one qkv projection, through its optional qk-norm."""
    b, n, _ = h.shape
    q, k, v = att.qkv(h).reshape(b, n, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return att.q_norm(q), att.k_norm(k), v


class TimmViT(Backbone):
    """timm's VisionTransformer family (`timm.models.vision_transformer.VisionTransformer` and DeiT's distilled
    subclass), bare or inside transformers' TimmWrapperForImageClassification: [class?, distillation?,
    registers..., patches]; pre-norm blocks with one fused qkv projection, optional qk-norm and layer scale;
    absolute positions, with or without an entry for the prefix tokens (DeiT-III and register models have none);
    the head reads the class token (both DeiT tokens, averaged, when distilled) or the mean of the patches.

    Cannot: attention-pool heads (global_pool="map"), other pooling kinds, or blocks other than timm's plain
    `Block` (parallel, post-norm, gated); those are refused when the adapter is built."""

    def __init__(self, model):
        from timm.models.deit import VisionTransformerDistilled

        timm_model, pool = supported_timm_model(model)
        self.model = model
        self.timm_model = timm_model
        self.layers = timm_model.blocks
        self.distilled = isinstance(timm_model, VisionTransformerDistilled)
        self.num_prefix = timm_model.num_prefix_tokens
        self.pool = pool
        self.decision_tokens = ((0, 1) if self.distilled else (0,)) if pool == "token" else ()
        if pool == "avg":
            self.pooled_from = 0 if timm_model.pool_include_prefix else self.num_prefix
        embed = timm_model.patch_embed
        self.config = SimpleNamespace(
            patch_size=embed.patch_size[0],
            image_size=tuple(embed.img_size),
            num_attention_heads=self.layers[0].attn.num_heads,
            hidden_size=timm_model.embed_dim,
            num_channels=embed.proj.in_channels,
        )
        self.family = "timm " + ("DeiT (distilled)" if self.distilled else "VisionTransformer")
        self.layout = self._layout()

    def _layout(self) -> str:
        m = self.timm_model
        prefix = ["class token"] if m.cls_token is not None else []
        prefix += ["distillation token"] if self.distilled else []
        prefix += [f"{m.num_reg_tokens} registers"] if m.num_reg_tokens else []
        read = {
            "token": "both special tokens, averaged" if self.distilled else "the class token",
            "avg": "the mean of all tokens" if m.pool_include_prefix else "the mean of the patches",
        }
        return f"{' + '.join(prefix) or 'no prefix token'}, then patches; the head reads {read[self.pool]}"

    @property
    def num_labels(self) -> int:
        return self.timm_model.num_classes

    def embed(self, pixel_values):
        m = self.timm_model
        patches = m.patch_embed.proj(pixel_values)
        grid = tuple(patches.shape[-2:])
        patches = m.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        positions = m.pos_embed
        if grid != tuple(m.patch_embed.grid_size):  # timm's own resampling (bicubic, antialiased), as timm does it
            from timm.layers import resample_abs_pos_embed

            positions = resample_abs_pos_embed(
                positions,
                new_size=grid,
                old_size=m.patch_embed.grid_size,
                num_prefix_tokens=0 if m.no_embed_class else self.num_prefix,
            )
        b = patches.shape[0]
        prefix = [
            token.expand(b, -1, -1)
            for token in (m.cls_token, getattr(m, "dist_token", None), m.reg_token)
            if token is not None
        ]
        if m.no_embed_class:  # DeiT-III, register models: the prefix tokens carry no position
            x = torch.cat(prefix + [patches + positions], dim=1)
        else:
            x = torch.cat(prefix + [patches], dim=1) + positions
        return m.norm_pre(x)

    def parts(self, layer):
        att = layer.attn
        return BlockParts(
            layer.norm1,
            lambda h: fused_qkv(att, h),
            att.scale,
            lambda out: att.proj(att.norm(out)),
            layer.ls1,
            layer.norm2,
            (layer.mlp,),
            layer.ls2,
        )

    def head(self, x, sizes=None):
        m = self.timm_model
        x = m.norm(x)
        if self.distilled:
            return (m.head(x[:, 0]) + m.head_dist(x[:, 1])) / 2
        if self.pool == "token":
            pooled = x[:, 0]
        else:
            pooled = pooled_mean(x, self.pooled_from, sizes)
        return m.head(m.fc_norm(pooled))

    def describe(self) -> str:
        return f"{self.family}: {self.layout}"
