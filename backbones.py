"""Backbone adapters: everything that depends on a model family, behind one small interface.

The maps, zoom, pruning, the app, the CLI and eval never ask which family they hold: they go through a
`Backbone`. Tokens are laid out as [prefix tokens (class, distillation, registers), patch tokens], and each
family says:

- `num_prefix`: how many tokens come before the patches; `decision_tokens`: which of them the head reads
  (empty for heads that pool the patches);
- `embed(pixel_values)`: tokens at any input size;
- `block(i, x, attn_bias, attention_rows, full_attention, positions)`: block i on any subset of tokens, with an
  additive attention bias, returning the attention probabilities of the first `attention_rows` queries, or
  (analysis pass) of all of them, differentiable. `positions` (B, N) are the tokens' indices in the full
  unpruned sequence (prefix i -> i, patch j -> num_prefix + j, -1 for a token with no single place, such as
  EViT's fused token); None means the full sequence in order. Only families with `uses_positions` (a position
  term inside the blocks: BEiT's relative bias) read them;
- `head(x, sizes)`: logits from the last block's tokens (final norm included); `sizes` (B, N, 1), how many
  tokens each merged token stands for, weights the means of pooled heads;
- `head_macs()`: the multiply-adds of the head, for the cost figures.

Adding a family is one short class here and one line in `FAMILIES`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F


class Backbone:
    """The interface; see the module docstring. `model` is the whole classifier (backbone and head)."""

    family = "?"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config

    num_prefix: int = 1
    decision_tokens: tuple[int, ...] = (0,)
    uses_positions = False  # whether blocks read `positions` (see the module docstring)

    @property
    def patch_size(self) -> int:
        patch = self.config.patch_size
        return patch if isinstance(patch, int) else patch[0]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the position table was trained for."""
        size = self.config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    layers: torch.nn.ModuleList  # the blocks, in order

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def needs_resampling(self, pixel_values: torch.Tensor) -> bool:
        """Whether the position table must be resampled for this input (another size than it was trained at)."""
        return tuple(pixel_values.shape[-2:]) != tuple(self.input_size)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_labels(self) -> int:
        return len(self.model.config.id2label)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block(self, i: int, x: torch.Tensor, attn_bias: torch.Tensor | None = None, attention_rows: int = 0,
              full_attention: bool = False, positions: torch.Tensor | None = None):
        raise NotImplementedError

    def head(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def head_macs(self) -> int:
        return self.hidden_size * self.num_labels * max(1, len(self.decision_tokens))

    def decision_weights(self, num_tokens: int) -> torch.Tensor:
        """(num_tokens,) weights of the tokens the head reads, summing to 1: a map's row for "the decision" is
        this weighting of the token rows (the class token's row for a class-token head)."""
        weights = torch.zeros(num_tokens)
        weights[list(self.decision_tokens)] = 1.0 / len(self.decision_tokens)
        return weights

    def describe(self) -> str:
        """The family and token layout, as the app and the CLI show it."""
        return f"{self.family}: {self.num_prefix} prefix token(s) before the patches"


def split_heads(attention, h: torch.Tensor):
    """q, k, v (B, heads, N, head_dim) from separate q/k/v projections (every Hugging Face family here)."""
    return project_heads((attention.q_proj, attention.k_proj, attention.v_proj), attention.head_dim, h)


def project_heads(projections, head_dim: int, h: torch.Tensor):
    """Each projection of h (B, N, D), split into heads: (B, heads, N, head_dim)."""
    shape = (*h.shape[:2], -1, head_dim)
    return tuple(proj(h).view(shape).transpose(1, 2) for proj in projections)


def pooled_mean(x: torch.Tensor, first: int, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the tokens x[:, first:] (B, D); with sizes (B, N, 1) each token counts as the tokens it merged, so
    a merged token weighs what its parts weighed in the unmerged mean."""
    tokens = x[:, first:]
    if sizes is None:
        return tokens.mean(dim=1)
    weights = sizes[:, first:]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1)


def patch_mean_weights(num_tokens: int, num_prefix: int) -> torch.Tensor:
    """(num_tokens,) decision weights of a head that averages the patches: 1/P on each patch, 0 on the prefix."""
    weights = torch.zeros(num_tokens)
    weights[num_prefix:] = 1.0 / (num_tokens - num_prefix)
    return weights


def attend(q, k, v, scaling: float, attn_bias=None, attention_rows: int = 0, full_attention: bool = False):
    """Multi-head attention (B, heads, N, head_dim) -> (B, N, heads * head_dim), and probabilities.

    full_attention: computed eagerly, the (B, heads, N, N) probabilities part of the graph (the analysis pass
    takes gradients with respect to them). Otherwise fused SDPA, and with attention_rows > 0 the probabilities of
    the first `attention_rows` queries computed on their own (the special tokens' attention, for pruning).
    """
    b, _, n, _ = q.shape
    probs = None
    if full_attention:
        logits = torch.matmul(q, k.transpose(-2, -1)) * scaling
        if attn_bias is not None:
            logits = logits + attn_bias
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)
    else:
        if attention_rows:
            logits = torch.matmul(q[:, :, :attention_rows], k.transpose(-2, -1)) * scaling
            if attn_bias is not None:  # a per-query bias (relative position) has rows; a per-key one broadcasts
                logits = logits + attn_bias[..., :attention_rows, :]
            probs = logits.softmax(dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scaling)
    return out.transpose(1, 2).reshape(b, n, -1), probs


class HFViT(Backbone):
    """Hugging Face ViT, DeiT (distilled too: class + distillation token, the two heads averaged) and ViT-MSN:
    pre-norm blocks with separate q/k/v projections, absolute position embeddings, the head on the class
    token(s) after the final layernorm."""

    def __init__(self, model):
        super().__init__(model)
        self.backbone = model.base_model
        self.layers = self.backbone.layers
        # DeiT embeddings always carry a distillation token; only the teacher-distilled head reads it.
        self.num_prefix = 2 if getattr(self.backbone.embeddings, "distillation_token", None) is not None else 1
        distilled_head = hasattr(model, "distillation_classifier")
        self.decision_tokens = (0, 1) if distilled_head else (0,)
        self.family = {"deit": "DeiT", "vit_msn": "ViT-MSN"}.get(self.config.model_type, "ViT")
        if distilled_head:
            self.family += " (distilled)"

    def embed(self, pixel_values):
        return self.backbone.embeddings(pixel_values, interpolate_pos_encoding=self.needs_resampling(pixel_values))

    def block(self, i, x, attn_bias=None, attention_rows=0, full_attention=False, positions=None):
        layer = self.layers[i]
        att = layer.attention
        h = layer.layernorm_before(x)
        q, k, v = split_heads(att, h)
        out, probs = attend(q, k, v, att.scaling, attn_bias, attention_rows, full_attention)
        x = x + att.o_proj(out)
        x = x + layer.mlp(layer.layernorm_after(x))
        return x, probs

    def head(self, x, sizes=None):
        seq = self.backbone.layernorm(x)
        if len(self.decision_tokens) == 2:  # distilled DeiT: average the class and distillation heads
            return (self.model.cls_classifier(seq[:, 0]) + self.model.distillation_classifier(seq[:, 1])) / 2
        return self.model.classifier(seq[:, 0])

    def describe(self) -> str:
        tokens = "class + distillation token" if self.num_prefix == 2 else "class token"
        read = "both" if len(self.decision_tokens) == 2 else "the class token"
        return f"{self.family}: {tokens}, then patches; the head reads {read}"


class HFDinov2(Backbone):
    """Hugging Face DINOv2 and DINOv2 with registers: [class, registers..., patches]; pre-norm blocks with layer
    scale; position embeddings always resampled to the input's grid; the head reads the class token and the mean
    of the patch tokens (after the final layernorm, weighted by merged-token sizes), never the registers."""

    def __init__(self, model):
        super().__init__(model)
        self.backbone = model.base_model
        self.layers = self.backbone.encoder.layer
        registers = int(getattr(self.config, "num_register_tokens", 0) or 0)
        self.num_prefix = 1 + registers
        self.decision_tokens = (0,)
        self.family = "DINOv2 with registers" if registers else "DINOv2"

    def embed(self, pixel_values):
        return self.backbone.embeddings(pixel_values)  # resamples its position table itself, always

    def block(self, i, x, attn_bias=None, attention_rows=0, full_attention=False, positions=None):
        layer = self.layers[i]
        att = layer.attention
        h = layer.norm1(x)
        q, k, v = split_heads(att, h)
        out, probs = attend(q, k, v, att.scaling, attn_bias, attention_rows, full_attention)
        x = x + layer.layer_scale1(att.o_proj(out))
        x = x + layer.layer_scale2(layer.mlp(layer.norm2(x)))
        return x, probs

    def head(self, x, sizes=None):
        seq = self.backbone.layernorm(x)
        pooled = torch.cat([seq[:, 0], pooled_mean(seq, self.num_prefix, sizes)], dim=-1)
        return self.model.classifier(pooled)

    def head_macs(self) -> int:
        return 2 * self.hidden_size * self.num_labels

    def decision_weights(self, num_tokens: int) -> torch.Tensor:
        weights = 0.5 * patch_mean_weights(num_tokens, self.num_prefix)
        weights[0] = 0.5  # the class token, and the patch mean, each feed half of the classifier's input
        return weights

    def describe(self) -> str:
        registers = self.num_prefix - 1
        tokens = f"class token + {registers} registers" if registers else "class token"
        return f"{self.family}: {tokens}, then patches; the head reads the class token and the mean of the patches"


class HFCLIP(Backbone):
    """Hugging Face CLIP image classifier: [class, patches] with a layernorm on the embeddings before block 1;
    the head averages the last block's patch tokens as they are (no final norm) and never reads the class token.
    Its settings live in config.vision_config. Merged tokens weigh in the mean by their sizes."""

    family = "CLIP"

    def __init__(self, model):
        super().__init__(model)
        self.config = model.config.vision_config
        self.vision = model.vision_model
        self.layers = self.vision.encoder.layers
        self.num_prefix = 1
        self.decision_tokens = ()

    def embed(self, pixel_values):
        embedded = self.vision.embeddings(pixel_values, interpolate_pos_encoding=self.needs_resampling(pixel_values))
        return self.vision.pre_layrnorm(embedded)

    def block(self, i, x, attn_bias=None, attention_rows=0, full_attention=False, positions=None):
        layer = self.layers[i]
        att = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = split_heads(att, h)
        out, probs = attend(q, k, v, att.scale, attn_bias, attention_rows, full_attention)
        x = x + att.out_proj(out)
        x = x + layer.mlp(layer.layer_norm2(x))
        return x, probs

    def head(self, x, sizes=None):
        return self.model.classifier(pooled_mean(x, self.num_prefix, sizes))

    def head_macs(self) -> int:
        return self.hidden_size * self.num_labels

    def decision_weights(self, num_tokens: int) -> torch.Tensor:
        return patch_mean_weights(num_tokens, self.num_prefix)

    def describe(self) -> str:
        return "CLIP: class token, then patches; the head reads the mean of the patches (not the class token)"


class HFSiglip(HFCLIP):
    """Hugging Face SigLIP image classifier: patches only (no prefix token); CLIP-like blocks; the head averages
    every token after the final layernorm. Its attention-pool head is built but not used by the classifier."""

    family = "SigLIP"

    def __init__(self, model):
        super().__init__(model)
        self.num_prefix = 0

    def embed(self, pixel_values):  # no layernorm before block 1
        return self.vision.embeddings(pixel_values, interpolate_pos_encoding=self.needs_resampling(pixel_values))

    def head(self, x, sizes=None):
        return self.model.classifier(pooled_mean(self.vision.post_layernorm(x), 0, sizes))

    def describe(self) -> str:
        return "SigLIP: patches only (no class token); the head reads the mean of all tokens"


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
        self.backbone = model.base_model
        self.layers = self.layer_list()
        self.mean_pooling = self.backbone.pooler.layernorm is not None
        self.decision_tokens = () if self.mean_pooling else (0,)
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

    def attention(self, layer, h):
        """q, k, v (B, heads, N, head_dim) of one block, its scaling and its output projection."""
        att = layer.attention
        return (*split_heads(att, h), att.scaling, att.o_proj)

    def mlp(self, layer, h):
        return layer.mlp(h)

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

    def block(self, i, x, attn_bias=None, attention_rows=0, full_attention=False, positions=None):
        layer = self.layers[i]
        bias = self.position_bias(i, x.shape[1], positions)
        if attn_bias is not None:
            bias = attn_bias if bias is None else bias + attn_bias
        q, k, v, scaling, out_proj = self.attention(layer, layer.layernorm_before(x))
        out, probs = attend(q, k, v, scaling, bias, attention_rows, full_attention)
        x = x + layer_scaled(layer.lambda_1, out_proj(out))
        x = x + layer_scaled(layer.lambda_2, self.mlp(layer, layer.layernorm_after(x)))
        return x, probs

    def head(self, x, sizes=None):
        if self.mean_pooling:  # the final layernorm is an Identity then: the pooler's norm comes after the mean
            return self.model.classifier(self.backbone.pooler.layernorm(pooled_mean(x, self.num_prefix, sizes)))
        return self.model.classifier(self.backbone.layernorm(x)[:, 0])

    def decision_weights(self, num_tokens: int) -> torch.Tensor:
        if self.mean_pooling:
            return patch_mean_weights(num_tokens, self.num_prefix)
        return super().decision_weights(num_tokens)

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

    def attention(self, layer, h):
        att = layer.attention.attention
        q, k, v = project_heads((att.query, att.key, att.value), att.attention_head_size, h)
        return q, k, v, att.attention_head_size**-0.5, layer.attention.output.dense

    def mlp(self, layer, h):
        return layer.output(layer.intermediate(h))


def layer_scaled(scale, h: torch.Tensor) -> torch.Tensor:
    """h times a block's layer scale; BEiT stores a missing one as 1.0, Data2Vec-vision as None."""
    return h if scale is None else scale * h


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
        self.model = model
        self.timm_model = timm_model
        self.layers = timm_model.blocks
        self.distilled = isinstance(timm_model, VisionTransformerDistilled)
        self.num_prefix = timm_model.num_prefix_tokens
        self.pool = pool
        self.decision_tokens = ((0, 1) if self.distilled else (0,)) if pool == "token" else ()
        embed = timm_model.patch_embed
        attention = self.layers[0].attn
        self.config = SimpleNamespace(
            patch_size=embed.patch_size[0],
            image_size=tuple(embed.img_size),
            num_attention_heads=attention.num_heads,
            hidden_size=timm_model.embed_dim,
            intermediate_size=self.layers[0].mlp.fc1.out_features,
            num_channels=embed.proj.in_channels,
        )
        registers = timm_model.num_reg_tokens
        self.family = "timm " + ("DeiT (distilled)" if self.distilled else "VisionTransformer")
        prefix = ["class token"] if timm_model.cls_token is not None else []
        prefix += ["distillation token"] if self.distilled else []
        prefix += [f"{registers} registers"] if registers else []
        read = {"token": "both special tokens, averaged" if self.distilled else "the class token",
                "avg": "the mean of all tokens" if timm_model.pool_include_prefix else "the mean of the patches"}
        self.layout = f"{' + '.join(prefix) or 'no prefix token'}, then patches; the head reads {read[pool]}"

    @property
    def num_labels(self) -> int:
        return self.timm_model.num_classes

    def _pooled_from(self) -> int:
        """Index of the first token the 'avg' head averages."""
        return 0 if self.timm_model.pool_include_prefix else self.num_prefix

    def embed(self, pixel_values):
        m = self.timm_model
        patches = m.patch_embed.proj(pixel_values)
        grid = tuple(patches.shape[-2:])
        patches = m.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        positions = m.pos_embed
        if grid != tuple(m.patch_embed.grid_size):  # timm's own resampling (bicubic, antialiased), as timm does it
            from timm.layers import resample_abs_pos_embed

            positions = resample_abs_pos_embed(positions, new_size=grid, old_size=m.patch_embed.grid_size,
                                               num_prefix_tokens=0 if m.no_embed_class else self.num_prefix)
        b = patches.shape[0]
        prefix = [token.expand(b, -1, -1) for token in (m.cls_token, getattr(m, "dist_token", None), m.reg_token)
                  if token is not None]
        if m.no_embed_class:  # DeiT-III, register models: the prefix tokens carry no position
            x = torch.cat(prefix + [patches + positions], dim=1)
        else:
            x = torch.cat(prefix + [patches], dim=1) + positions
        return m.norm_pre(x)

    def block(self, i, x, attn_bias=None, attention_rows=0, full_attention=False, positions=None):
        layer = self.layers[i]
        att = layer.attn
        h = layer.norm1(x)
        b, n, _ = h.shape
        q, k, v = att.qkv(h).reshape(b, n, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = att.q_norm(q), att.k_norm(k)
        out, probs = attend(q, k, v, att.scale, attn_bias, attention_rows, full_attention)
        x = x + layer.ls1(att.proj(att.norm(out)))
        x = x + layer.ls2(layer.mlp(layer.norm2(x)))
        return x, probs

    def head(self, x, sizes=None):
        m = self.timm_model
        x = m.norm(x)
        if self.distilled:
            return (m.head(x[:, 0]) + m.head_dist(x[:, 1])) / 2
        if self.pool == "token":
            pooled = x[:, 0]
        else:
            pooled = pooled_mean(x, self._pooled_from(), sizes)
        return m.head(m.fc_norm(pooled))

    def decision_weights(self, num_tokens: int) -> torch.Tensor:
        if self.pool == "token":
            return super().decision_weights(num_tokens)
        return patch_mean_weights(num_tokens, self._pooled_from())

    def describe(self) -> str:
        return f"{self.family}: {self.layout}"


class TimmPreprocessor:
    """timm's evaluation transform (resize, centre crop, normalise) from a model's data config, as timm and
    transforms' TimmWrapperImageProcessor run it, plus the same resize and crop as numbers for the geometry.

    Cannot: 'border' crops (padding) and non-square inputs (timm keeps the ratio differently there); refused."""

    def __init__(self, data_config: dict):
        from timm.data import create_transform

        self.data_config = dict(data_config)
        _, height, width = self.data_config["input_size"]
        self.crop_mode = self.data_config.get("crop_mode") or "center"
        if height != width or self.crop_mode not in ("center", "squash"):
            raise ValueError(f"timm preprocessing with input size {height}x{width} and crop mode '{self.crop_mode}'; "
                             "square inputs with 'center' or 'squash' crops only")
        self.crop = height
        self.scale = math.floor(height / (self.data_config.get("crop_pct") or 0.875))
        self.transform = create_transform(**self.data_config, is_training=False)

    def __call__(self, images, return_tensors="pt"):
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(image.convert("RGB")) for image in images])}

    def resize_and_crop(self, width: int, height: int):
        """((width, height) after the resize, (left, top, width, height) of the crop), as torchvision computes them:
        the shortest edge (or, squashing, both) to `scale`, then a centre crop whose offset rounds half to even."""
        if self.crop_mode == "squash":
            resized = (self.scale, self.scale)
        elif width <= height:
            resized = (self.scale, int(self.scale * height / width))
        else:
            resized = (int(self.scale * width / height), self.scale)
        left = int(round((resized[0] - self.crop) / 2.0))
        top = int(round((resized[1] - self.crop) / 2.0))
        return resized, (left, top, self.crop, self.crop)


# model_type -> adapter. The README's list of supported families comes from this table.
FAMILIES = {
    "vit": HFViT,
    "deit": HFViT,
    "vit_msn": HFViT,
    "dinov2": HFDinov2,
    "dinov2_with_registers": HFDinov2,
    "clip": HFCLIP,
    "siglip": HFSiglip,
    "beit": HFBeit,
    "data2vec-vision": HFData2VecVision,
    "timm_wrapper": TimmViT,  # a folder in timm's hub layout or a hub timm/... id, loaded by transformers
}
FAMILY_NAMES = {"vit": "ViT", "deit": "DeiT", "vit_msn": "ViT-MSN", "dinov2": "DINOv2",
                "dinov2_with_registers": "DINOv2 with registers", "clip": "CLIP image classifier",
                "siglip": "SigLIP image classifier", "beit": "BEiT", "data2vec-vision": "Data2Vec-vision",
                "timm_wrapper": "timm VisionTransformer (class-token, distilled, register, layer-scale and average-pool models)"}


def supported_families() -> str:
    """The families with an adapter, as error messages list them: "ViT ('vit'), DeiT ('deit'), ..."."""
    return ", ".join(f"{label} ('{key}')" for key, label in FAMILY_NAMES.items())


def adapter_for(model: torch.nn.Module) -> Backbone:
    if type(model).__module__.startswith("timm."):  # a timm model built by timm itself (timm:<name or folder>)
        return TimmViT(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"a '{model_type}' model; supported families: {supported_families()}")
    return FAMILIES[model_type](model)
