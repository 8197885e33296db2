"""Backbone adapters: everything that depends on a model family, behind one small interface.

The maps, zoom, pruning, the app, the CLI and eval never ask which family they hold: they go through a
`Backbone`. Tokens are laid out as [prefix tokens (class, distillation, registers), patch tokens], and each
family says:

- `num_prefix`: how many tokens come before the patches; `decision_tokens`: which of them the head reads
  (empty for heads that pool the patches);
- `embed(pixel_values)`: tokens at any input size;
- `block(i, x, attn_bias, attention_rows, full_attention)`: block i on any subset of tokens, with an additive
  attention bias, returning the attention probabilities of the first `attention_rows` queries, or (analysis
  pass) of all of them, differentiable;
- `head(x)`: logits from the last block's tokens (final norm included);
- `head_macs()`: the multiply-adds of the head, for the cost figures.

Adding a family is one short class here and one line in `FAMILIES`.
"""

from __future__ import annotations

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
              full_attention: bool = False):
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
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
    shape = (*h.shape[:2], -1, attention.head_dim)
    return tuple(proj(h).view(shape).transpose(1, 2) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))


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
            if attn_bias is not None:
                logits = logits + attn_bias
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

    def block(self, i, x, attn_bias=None, attention_rows=0, full_attention=False):
        layer = self.layers[i]
        att = layer.attention
        h = layer.layernorm_before(x)
        q, k, v = split_heads(att, h)
        out, probs = attend(q, k, v, att.scaling, attn_bias, attention_rows, full_attention)
        x = x + att.o_proj(out)
        x = x + layer.mlp(layer.layernorm_after(x))
        return x, probs

    def head(self, x):
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
    of the patch tokens (after the final layernorm), never the registers.

    Cannot yet: weight the patch mean by merged-token sizes, so efficiency pruning's merge fusion is approximate
    in the head (dropping, and keep 1.0, are exact)."""

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

    def block(self, i, x, attn_bias=None, attention_rows=0, full_attention=False):
        layer = self.layers[i]
        att = layer.attention
        h = layer.norm1(x)
        q, k, v = split_heads(att, h)
        out, probs = attend(q, k, v, att.scaling, attn_bias, attention_rows, full_attention)
        x = x + layer.layer_scale1(att.o_proj(out))
        x = x + layer.layer_scale2(layer.mlp(layer.norm2(x)))
        return x, probs

    def head(self, x):
        seq = self.backbone.layernorm(x)
        pooled = torch.cat([seq[:, 0], seq[:, self.num_prefix:].mean(dim=1)], dim=-1)
        return self.model.classifier(pooled)

    def head_macs(self) -> int:
        return 2 * self.hidden_size * self.num_labels

    def decision_weights(self, num_tokens: int) -> torch.Tensor:
        weights = torch.zeros(num_tokens)
        weights[0] = 0.5  # the class token, and the patch mean, each feed half of the classifier's input
        weights[self.num_prefix:] = 0.5 / (num_tokens - self.num_prefix)
        return weights

    def describe(self) -> str:
        registers = self.num_prefix - 1
        tokens = f"class token + {registers} registers" if registers else "class token"
        return f"{self.family}: {tokens}, then patches; the head reads the class token and the mean of the patches"


class HFCLIP(Backbone):
    """Hugging Face CLIP image classifier: [class, patches] with a layernorm on the embeddings before block 1;
    the head averages the last block's patch tokens as they are (no final norm) and never reads the class token.
    Its settings live in config.vision_config.

    Cannot yet: weight the patch mean by merged-token sizes (merge fusion is approximate in the head), and
    efficiency pruning ranks patches by the class token's attention although the head does not read it."""

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

    def block(self, i, x, attn_bias=None, attention_rows=0, full_attention=False):
        layer = self.layers[i]
        att = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = split_heads(att, h)
        out, probs = attend(q, k, v, att.scale, attn_bias, attention_rows, full_attention)
        x = x + att.out_proj(out)
        x = x + layer.mlp(layer.layer_norm2(x))
        return x, probs

    def head(self, x):
        return self.model.classifier(x[:, self.num_prefix:].mean(dim=1))

    def head_macs(self) -> int:
        return self.hidden_size * self.num_labels

    def decision_weights(self, num_tokens: int) -> torch.Tensor:
        weights = torch.zeros(num_tokens)
        weights[self.num_prefix:] = 1.0 / (num_tokens - self.num_prefix)
        return weights

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

    def head(self, x):
        return self.model.classifier(self.vision.post_layernorm(x).mean(dim=1))

    def describe(self) -> str:
        return "SigLIP: patches only (no class token); the head reads the mean of all tokens"


# model_type -> adapter. The README's list of supported families comes from this table.
FAMILIES = {
    "vit": HFViT,
    "deit": HFViT,
    "vit_msn": HFViT,
    "dinov2": HFDinov2,
    "dinov2_with_registers": HFDinov2,
    "clip": HFCLIP,
    "siglip": HFSiglip,
}
FAMILY_NAMES = {"vit": "ViT", "deit": "DeiT", "vit_msn": "ViT-MSN", "dinov2": "DINOv2",
                "dinov2_with_registers": "DINOv2 with registers", "clip": "CLIP image classifier",
                "siglip": "SigLIP image classifier"}


def supported_families() -> str:
    """The families with an adapter, as error messages list them: "ViT ('vit'), DeiT ('deit'), ..."."""
    return ", ".join(f"{label} ('{key}')" for key, label in FAMILY_NAMES.items())


def adapter_for(model: torch.nn.Module) -> Backbone:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"a '{model_type}' model; supported families: {supported_families()}")
    return FAMILIES[model_type](model)
