"""The adapter interface, and what the families share: one pre-norm block, the attention, the pooled means.

The maps, zoom, pruning, the app, the CLI and eval never ask which family they hold: they go through a
`Backbone`. Tokens are laid out as [prefix tokens (class, distillation, registers), patch tokens], and each
family says:

- `num_prefix`: how many tokens come before the patches; `decision_tokens`: which of them the head reads;
  `pooled_from`: the first token a mean-pooling head averages (None for a head that pools nothing);
- `embed(pixel_values)`: tokens at any input size;
- `block(i, x, attn_bias, attention_rows, full_attention, positions)`: block i on any subset of tokens, with an
  additive attention bias, returning the attention probabilities of the first `attention_rows` queries, or
  (analysis pass) of all of them, differentiable. `positions` (B, N) are the tokens' indices in the full
  unpruned sequence (prefix i -> i, patch j -> num_prefix + j, -1 for a token with no single place, such as
  EViT's fused token); None means the full sequence in order. Only families with `uses_positions` (a position
  term inside the blocks: BEiT's relative bias) read them;
- `head(x, sizes)`: logits from the last block's tokens (final norm included); `sizes` (B, N, 1), how many
  tokens each merged token stands for, weights the means of pooled heads;
- `head_macs()`, `block_macs(tokens)`: the multiply-adds of the head and of one block, for the cost figures.

Every family here runs the same pre-norm block (`Backbone.block`, as timm's `vision_transformer.Block`):

    x = x + scale1(proj(attention(qkv(norm1(x)))))
    x = x + scale2(mlp(norm2(x)))

and says only where its modules are (`parts(layer)`, a `BlockParts`) and, for a position term, which bias the
attention adds (`attention_bias`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class BlockParts(NamedTuple):
    """One block's modules, in the order the shared pre-norm block (`Backbone.block`) runs them."""

    norm1: Callable  # the norm before the attention
    qkv: Callable  # normed tokens (B, N, D) -> q, k, v, each (B, heads, N, head_dim)
    scaling: float  # of the attention logits
    proj: Callable  # the attention's output (B, N, heads * head_dim) -> (B, N, D)
    scale1: Callable  # the attention branch's layer scale (`unscaled` where there is none)
    norm2: Callable  # the norm before the MLP
    mlp: tuple  # the MLP's modules, applied in turn; their Linear layers give its cost (`mlp_macs`)
    scale2: Callable  # the MLP branch's layer scale


def unscaled(h: torch.Tensor) -> torch.Tensor:
    """A residual branch without layer scale."""
    return h


class Backbone:
    """The interface; see the module docstring. `model` is the whole classifier (backbone and head)."""

    family = "?"
    num_prefix: int = 1
    decision_tokens: tuple[int, ...] = (0,)
    pooled_from: int | None = None  # first token a mean-pooling head averages; None: the head pools nothing
    uses_positions = False  # whether blocks read `positions` (see the module docstring)
    layers: torch.nn.ModuleList  # the blocks, in order

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config
        self.backbone = model.base_model

    @property
    def patch_size(self) -> int:
        patch = self.config.patch_size
        return patch if isinstance(patch, int) else patch[0]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the position table was trained for."""
        size = self.config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

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
        """Hugging Face's embeddings (ViT, DeiT, ViT-MSN, SigLIP), told to resample the position table when the
        input is not the trained size; other families override this."""
        return self.backbone.embeddings(pixel_values, interpolate_pos_encoding=self.needs_resampling(pixel_values))

    def parts(self, layer: torch.nn.Module) -> BlockParts:
        """Where the block's modules are in this family."""
        raise NotImplementedError

    def attention_bias(
        self, i: int, num_tokens: int, attn_bias: torch.Tensor | None, positions: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The additive bias block i's attention takes: the caller's, plus a family's position term."""
        return attn_bias

    def block(
        self,
        i: int,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        attention_rows: int = 0,
        full_attention: bool = False,
        positions: torch.Tensor | None = None,
    ):
        part = self.parts(self.layers[i])
        bias = self.attention_bias(i, x.shape[1], attn_bias, positions)
        q, k, v = part.qkv(part.norm1(x))
        out, probs = attend(q, k, v, part.scaling, bias, attention_rows, full_attention)
        x = x + part.scale1(part.proj(out))
        h = part.norm2(x)
        for module in part.mlp:
            h = module(h)
        return x + part.scale2(h), probs

    def head(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def head_inputs(self) -> int:
        """How many D-vectors the classifier reads: the decision tokens, and the pooled mean if any."""
        return len(self.decision_tokens) + (self.pooled_from is not None)

    def head_macs(self) -> int:
        return self.hidden_size * self.num_labels * self.head_inputs

    def mlp_macs(self) -> int:
        """Multiply-adds of one token through a block's MLP, counted on its Linear layers: the sizes are the
        modules', whatever the config calls them (DINOv2's carries mlp_ratio, no intermediate_size) and however
        the MLP is built (gated MLPs have three matrices)."""
        modules = (m for part in self.parts(self.layers[0]).mlp for m in part.modules())
        return sum(m.in_features * m.out_features for m in modules if isinstance(m, torch.nn.Linear))

    def block_macs(self, tokens: int) -> int:
        """Multiply-adds of one block on `tokens` tokens: qkv + output projection, QK^T and AV, the MLP."""
        d = self.hidden_size
        return 4 * tokens * d * d + 2 * tokens * tokens * d + tokens * self.mlp_macs()

    def decision_weights(self, num_tokens: int) -> torch.Tensor:
        """(num_tokens,) weights of the tokens the head reads, summing to 1: a map's row for "the decision" is
        this weighting of the token rows (the class token's row for a class-token head). Each of the classifier's
        inputs (`head_inputs`: a decision token, the pooled mean) weighs the same."""
        share = 1.0 / self.head_inputs
        weights = torch.zeros(num_tokens)
        if self.pooled_from is not None:
            weights[self.pooled_from :] = 1.0 / (num_tokens - self.pooled_from)
            weights *= share
        weights[list(self.decision_tokens)] = share
        return weights

    def describe(self) -> str:
        """The family and token layout, as the app and the CLI show it."""
        return f"{self.family}: {self.num_prefix} prefix token(s) before the patches"


def split_heads(attention, h: torch.Tensor):
    """q, k, v (B, heads, N, head_dim) from separate q/k/v projections (every Hugging Face family here)."""
    return project_heads((attention.q_proj, attention.k_proj, attention.v_proj), attention.head_dim, h, attention)


def project_heads(projections, head_dim: int, h: torch.Tensor, holder: torch.nn.Module):
    """Each projection of h (B, N, D), split into heads: (B, heads, N, head_dim). The projections run as one
    matrix product (`stacked_projection`, kept on `holder`): at batch 1 on a few tokens, as after a pruning cut,
    each product's fixed cost counts."""
    weight, bias = stacked_projection(projections, holder)
    b, n, _ = h.shape
    stacked = F.linear(h, weight, bias).view(b, n, len(projections), -1, head_dim).permute(2, 0, 3, 1, 4)
    return tuple(stacked.unbind(0))


_STACKED = "_zoomvit_stacked_projection"


def stacked_projection(projections, holder: torch.nn.Module):
    """The Linear `projections`' weights, and biases (zeros where one has none; None where none has one), stacked
    into one Linear's. Kept on `holder` until a weight or bias changes: moved or cast (another storage), loaded or
    trained in place (a new version). A copy: about a quarter of a block's weights more."""
    params = [p for proj in projections for p in (proj.weight, proj.bias) if p is not None]
    key = tuple((p.data_ptr(), p._version) for p in params)
    kept = holder.__dict__.get(_STACKED)
    if kept is None or kept[0] != key:
        # Plain tensors, outside inference mode and without a graph: the analysis pass's backward reads them.
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([proj.weight for proj in projections])
            bias = None
            if any(proj.bias is not None for proj in projections):
                bias = torch.cat(
                    [
                        proj.bias if proj.bias is not None else proj.weight.new_zeros(proj.out_features)
                        for proj in projections
                    ]
                )
        kept = holder.__dict__[_STACKED] = (key, weight, bias)
    return kept[1], kept[2]


def pooled_mean(x: torch.Tensor, first: int, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the tokens x[:, first:] (B, D); with sizes (B, N, 1) each token counts as the tokens it merged, so
    a merged token weighs what its parts weighed in the unmerged mean."""
    tokens = x[:, first:]
    if sizes is None:
        return tokens.mean(dim=1)
    weights = sizes[:, first:]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1)


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
