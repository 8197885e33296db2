"""The analysis pass: one forward with attentions and one backward from a target, cached as an `Analysis` that
every importance map is computed from.

Data flows one way: image -> `images.load_image` -> `analyze` (one forward, one backward) -> `Analysis` maps.
Zoom, pruning, the app and the CLI all read from the same `Analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from zoomvit import config
from zoomvit.errors import ZoomViTError
from zoomvit.geometry import Geometry, encode
from zoomvit.images import LoadedImage, load_image
from zoomvit.maps import (
    fuse_heads,
    grad_rollout_matrix,
    key_removal_effect,
    normalize_map,
    rollout_matrix,
)
from zoomvit.models import ViTBundle


@dataclass
class Prediction:
    index: int
    label: str
    prob: float

    def as_dict(self):
        return {"index": self.index, "label": self.label, "prob": round(self.prob, 6)}


@dataclass
class Analysis:
    """Everything one forward + one backward pass gives; every map below is computed from this cache."""

    bundle: ViTBundle
    loaded: LoadedImage
    geometry: Geometry
    pixel_values: torch.Tensor
    probs: np.ndarray  # (classes,)
    attentions: np.ndarray  # (layers, heads, N, N)
    target: int
    attention_grads: np.ndarray  # d logit[target] / d attention, same shape as attentions
    hidden_states: np.ndarray  # (layers + 1, N, hidden): the tokens entering each block, then the last output
    _graph: dict | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- predictions -------------------------------------------------------------------------------------
    @property
    def predicted(self) -> int:
        return int(self.probs.argmax())

    def top(self, k: int = config.TOP_K) -> list[Prediction]:
        return top_predictions(self.bundle, self.probs, k)

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid

    @property
    def num_special(self) -> int:
        return self.bundle.num_special

    def _to_grid(self, token_values: np.ndarray) -> np.ndarray:
        gh, gw = self.grid
        return np.asarray(token_values[self.num_special :], dtype=np.float32).reshape(gh, gw)

    def _special_rows(self, matrix: np.ndarray) -> np.ndarray:
        """The decision's row: the rows of the tokens the head reads, weighted as it reads them
        (adapter.decision_weights). A DeiT without its teacher head carries a distillation token that the decision
        never reads; DINOv2 reads its class token and the mean of the patches."""
        weights = self.bundle.adapter.decision_weights(matrix.shape[0]).numpy().astype(matrix.dtype)
        return weights @ matrix

    # ---- raw attention -----------------------------------------------------------------------------------
    def _layer(self, layer: int) -> int:
        n = self.attentions.shape[0]
        if not -n <= int(layer) < n:
            raise ZoomViTError(f"Layer {layer} is out of range (0..{n - 1}).")
        return int(layer) % n

    def attention_matrix(self, layer: int = -1, head="mean") -> np.ndarray:
        """(N, N) attention of one layer between all tokens, for one head or fused across heads; rows are
        queries. The maps below are read from it."""
        return fuse_heads(self.attentions[self._layer(layer)], head)

    def attention(self, layer: int = -1, head="mean") -> np.ndarray:
        """The attention each patch receives in one layer (its key column, averaged over all queries), on the
        patch grid in [0, 1] like the other maps: the app's and the CLI's "attention" map."""
        return normalize_map(self._to_grid(self.attention_matrix(layer, head).mean(axis=0)))

    def cls_map(self, layer: int = -1, head="mean") -> np.ndarray:
        return normalize_map(self._to_grid(self._special_rows(self.attention_matrix(layer, head))))

    def patch_index(self, row: int, col: int) -> int:
        gh, gw = self.grid
        if not (0 <= row < gh and 0 <= col < gw):
            raise ZoomViTError(f"Patch ({row}, {col}) is outside the {gh}x{gw} grid.")
        return self.num_special + row * gw + col

    def attended_by_patch(self, row: int, col: int, layer: int = -1, head="mean") -> np.ndarray:
        """What patch (row, col) attends to: its query row, over patches."""
        return normalize_map(self._to_grid(self.attention_matrix(layer, head)[self.patch_index(row, col)]))

    def attending_patch(self, row: int, col: int, layer: int = -1, head="mean") -> np.ndarray:
        """What attends to patch (row, col): its key column, over patch queries."""
        return normalize_map(self._to_grid(self.attention_matrix(layer, head)[:, self.patch_index(row, col)]))

    # ---- relevance maps ----------------------------------------------------------------------------------
    def rollout(self, discard_ratio: float = config.ROLLOUT_DISCARD_RATIO, head=config.ROLLOUT_HEAD_FUSION):
        key = ("rollout", float(discard_ratio), str(head))
        if key not in self._cache:
            if not 0.0 <= discard_ratio < 1.0:
                raise ZoomViTError("discard_ratio must be in [0, 1).")
            matrix = rollout_matrix(fuse_heads(self.attentions, head), discard_ratio)
            self._cache[key] = normalize_map(self._to_grid(self._special_rows(matrix)))
        return self._cache[key]

    def grad_rollout(self, target: int | None = None) -> np.ndarray:
        if target is not None and int(target) != self.target:
            return self.for_target(target).grad_rollout()
        if "grad_rollout" not in self._cache:
            matrix = grad_rollout_matrix(self.attentions, self.attention_grads)
            self._cache["grad_rollout"] = normalize_map(self._to_grid(self._special_rows(matrix)))
        return self._cache["grad_rollout"]

    def intent(self, target: int | None = None, from_block: int = 0) -> np.ndarray:
        """The intent map: how much each token entering block `from_block` matters for the target's logit
        (formula in `intent_map`)."""
        if target is not None and int(target) != self.target:
            return self.for_target(target).intent(from_block=from_block)
        key = ("intent", int(from_block))
        if key not in self._cache:
            self._cache[key] = intent_map(self, from_block)
        return self._cache[key]

    def map(self, method: str, layer: int = -1, head="mean", discard_ratio=config.ROLLOUT_DISCARD_RATIO, target=None):
        """One entry point for every map kind, as named in the CLI and the app."""
        if method == "rollout":
            return self.rollout(discard_ratio, head)
        if method == "grad_rollout":
            return self.grad_rollout(target)
        if method == "intent":
            return self.intent(target)
        if method == "cls":
            return self.cls_map(layer, head)
        if method == "attention":
            return self.attention(layer, head)
        raise ZoomViTError(f"Unknown method '{method}': use one of {MAP_METHODS}.")

    def upsample(self, grid_map: np.ndarray) -> np.ndarray:
        return self.geometry.upsample(grid_map)

    # ---- token norms -------------------------------------------------------------------------------------
    def token_norms(self) -> np.ndarray:
        """(grid h, grid w) L2 norm of each patch's token leaving the last block, from the cached pass."""
        if "token_norms" not in self._cache:
            self._cache["token_norms"] = self._to_grid(np.linalg.norm(self.hidden_states[-1], axis=-1))
        return self._cache["token_norms"]

    # ---- another target ----------------------------------------------------------------------------------
    def for_target(self, target: int) -> Analysis:
        """The same analysis for another class: reuses the forward pass and re-runs only the backward."""
        target = int(target)
        if not 0 <= target < self.probs.shape[0]:
            raise ZoomViTError(f"Class index {target} is out of range (0..{self.probs.shape[0] - 1}).")
        if target == self.target:
            return self
        memo = self._cache.setdefault("targets", {})
        if target not in memo:
            if self._graph is None:  # graph was released: pay one more forward
                memo[target] = analyze(self.bundle, self.loaded, target=target, keep_graph=False)
            else:
                grads = _backward(self._graph, [target], keep_graph=True)[:, 0]
                memo[target] = replace(self, target=target, attention_grads=grads, _graph=None, _cache={})
        return memo[target]

    def release_graph(self):
        """Free the autograd graph (other targets then cost a forward pass again)."""
        self._graph = None


MAP_METHODS = config.MAP_METHODS


def intent_map(analysis: Analysis, from_block: int = 0) -> np.ndarray:
    """intent = norm(norm(grad-weighted rollout) + norm(relu(key-removal effect))), both over blocks from_block..

    Attention and gradients flow through the rollout (how relevance propagates across layers); the key-removal
    effect adds, per token, how much the target logit loses without it. A sum rather than a product: a
    product zeroes most of the map, and ties among zeros made it less faithful on the deletion metric.
    """
    attn = analysis.attentions[from_block:]
    grads = analysis.attention_grads[from_block:]
    if from_block == 0:  # over every block the flow is the grad_rollout map itself: computed (and cached) once
        flow = analysis.grad_rollout()
    else:
        flow = normalize_map(analysis._to_grid(analysis._special_rows(grad_rollout_matrix(attn, grads))))
    needed = analysis._to_grid(np.clip(key_removal_effect(attn, grads), 0, None))
    return normalize_map(flow + normalize_map(needed))


def _backward(graph: dict, targets: list[int], keep_graph: bool) -> np.ndarray:
    """Gradients of each image's target logit w.r.t. its attention maps, (layers, B, heads, N, N); no weight
    gradients: they are not needed. Images never interact, so one backward of the sum gives each its own."""
    logits = graph["logits"]
    chosen = logits[torch.arange(len(targets), device=logits.device), torch.as_tensor(targets, device=logits.device)]
    grads = torch.autograd.grad(chosen.sum(), list(graph["attentions"]), retain_graph=keep_graph)
    return to_numpy(torch.stack(grads))


def to_numpy(values: torch.Tensor) -> np.ndarray:
    """float32 on the CPU, whatever device and precision the model ran in: the maps are computed from these."""
    return values.detach().float().cpu().numpy()


def analyze(bundle: ViTBundle, image, target: int | None = None, keep_graph: bool = True) -> Analysis:
    """One forward pass with attentions and one backward pass from the target logit (default: predicted)."""
    loaded = image if isinstance(image, LoadedImage) else load_image(image)
    pixel_values, geometry = encode(bundle, loaded)
    return analyze_encoded(bundle, [loaded], [pixel_values], [geometry], [target], keep_graph)[0]


def analyze_many(bundle: ViTBundle, images) -> list[Analysis]:
    """`analyze` (predicted class, no graph kept) for several images in one batched forward and backward, as
    evaluation runs it: each result equals its own `analyze` to float precision. The images must preprocess to
    one size (every processor here makes the model's input size)."""
    loaded = [image if isinstance(image, LoadedImage) else load_image(image) for image in images]
    encoded = [encode(bundle, item) for item in loaded]
    return analyze_encoded(bundle, loaded, [pixels for pixels, _ in encoded], [geometry for _, geometry in encoded])


def analyze_encoded(
    bundle: ViTBundle, loaded: list, pixel_values: list, geometries: list, targets=None, keep_graph: bool = False
) -> list[Analysis]:
    """The batched analysis pass over images already `encode`d (each (1, C, H, W), all one size)."""
    shapes = {tuple(pixels.shape) for pixels in pixel_values}
    if len(shapes) > 1:
        raise ZoomViTError(f"A batched analysis needs images that preprocess to one size, got {sorted(shapes)}.")
    targets = [None] * len(loaded) if targets is None else targets
    pixel_values = torch.cat(pixel_values)
    adapter = bundle.adapter
    with torch.enable_grad():
        # The family's own blocks with eager attention: every probability stays in the graph for the backward.
        x = adapter.embed(pixel_values)
        hidden, attention = [x], []
        for i in range(adapter.num_layers):
            x, probs_i = adapter.block(i, x, full_attention=True)
            hidden.append(x)
            attention.append(probs_i)
        logits = adapter.head(x)
        probs = to_numpy(logits.detach().float().softmax(-1))  # float32 softmax: bfloat16 keeps 3 digits
        targets = [int(p.argmax()) if t is None else int(t) for p, t in zip(probs, targets)]
        for t in targets:
            if not 0 <= t < probs.shape[1]:
                raise ZoomViTError(f"Class index {t} is out of range (0..{probs.shape[1] - 1}).")
        graph = {"logits": logits, "attentions": attention}
        attention_grads = _backward(graph, targets, keep_graph)
    attentions = to_numpy(torch.stack(attention))
    hidden_states = to_numpy(torch.stack(hidden))
    return [
        Analysis(
            # Copies: one image's results should not hold on to its batch's arrays.
            bundle,
            loaded[i],
            geometries[i],
            pixel_values[i : i + 1].clone(),
            probs[i].copy(),
            attentions[:, i].copy(),
            targets[i],
            attention_grads[:, i].copy(),
            hidden_states[:, i].copy(),
            _graph=graph if keep_graph else None,
        )
        for i in range(len(loaded))
    ]


@torch.no_grad()
def predict(bundle: ViTBundle, image) -> np.ndarray:
    """Class probabilities from a plain forward pass (no attentions kept)."""
    loaded = image if isinstance(image, LoadedImage) else load_image(image)
    pixel_values, _ = encode(bundle, loaded)
    return predict_pixels(bundle, pixel_values)[0]


@torch.inference_mode()
def predict_pixels(bundle: ViTBundle, pixel_values: torch.Tensor) -> np.ndarray:
    """(B, classes) probabilities through the block engine: the HF model's logits to float precision, but with
    fused SDPA attention instead of the eager attention the analysis pass needs (about 25% faster)."""
    adapter = bundle.adapter
    x = adapter.embed(bundle.place(pixel_values))
    for i in range(adapter.num_layers):
        x, _ = adapter.block(i, x)
    return to_numpy(adapter.head(x).float().softmax(-1))


def decision_change(before: Prediction, after: Prediction) -> str:
    """What became of a decision, as the app says it: 'tabby cat (0.41) -> tiger cat (0.52)' when the top class
    changed, 'tabby cat (0.41 -> 0.38)' when it stayed."""
    if before.index == after.index:
        return f"{before.label} ({before.prob:.2f} -> {after.prob:.2f})"
    return f"{before.label} ({before.prob:.2f}) -> {after.label} ({after.prob:.2f})"


def top_predictions(bundle: ViTBundle, probs: np.ndarray, k: int = config.TOP_K) -> list[Prediction]:
    order = np.argsort(-probs)[:k]
    return [Prediction(int(i), bundle.label(i), float(probs[i])) for i in order]
