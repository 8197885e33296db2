"""Pure map arithmetic on numpy arrays: head fusion, rollout, gradient rollout, key removal, normalising and
the median-floored mass measures that zoom, pruning and the diagnosis share. No model, no torch."""

from __future__ import annotations

import numpy as np

from zoomvit import config
from zoomvit.errors import ZoomViTError

HEAD_FUSIONS = config.HEAD_FUSIONS


def normalize_map(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes all zeros (there is nothing to point at)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def floor_at_median(grid_map: np.ndarray) -> np.ndarray:
    """The map minus its median, clipped at 0: the background half of the patches carries no mass."""
    return np.clip(grid_map - np.median(grid_map), 0, None)


def top_mass_patches(grid_map: np.ndarray, mass: float = config.ZOOM_MASS) -> np.ndarray:
    """Boolean grid mask of the fewest patches holding `mass` of the map floored at its median (background
    patches carry no mass); all patches when nothing is left above the floor."""
    values = floor_at_median(grid_map)
    total = values.sum()
    if total <= 0:
        return np.ones(values.shape, dtype=bool)
    order = np.argsort(-values, axis=None)
    count = int(np.searchsorted(np.cumsum(values.ravel()[order]), mass * total) + 1)
    selected = np.zeros(values.size, dtype=bool)
    selected[order[:count]] = True
    return selected.reshape(values.shape)


def map_spread(grid_map: np.ndarray, mass: float = config.ZOOM_MASS) -> float:
    """Share of patches needed to hold `mass` of the median-floored map (uniform: about `mass`; one peak: 1/N)."""
    return float(top_mass_patches(grid_map, mass).mean())


def fuse_heads(attention: np.ndarray, head) -> np.ndarray:
    """attention: (..., heads, N, N). head: an index, or 'mean' / 'max' / 'min' across heads."""
    if isinstance(head, str) and head.lstrip("-").isdigit():
        head = int(head)
    if isinstance(head, (int, np.integer)):
        count = attention.shape[-3]
        if not -count <= int(head) < count:
            raise ZoomViTError(f"Head {head} is out of range (0..{count - 1}).")
        return attention[..., int(head), :, :]
    if head == "mean":
        return attention.mean(axis=-3)
    if head == "max":
        return attention.max(axis=-3)
    if head == "min":
        return attention.min(axis=-3)
    raise ZoomViTError(f"Unknown head '{head}': use an index or one of {HEAD_FUSIONS}.")


def rollout_matrix(fused: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Abnar & Zuidema (2020) rollout over per-layer (L, N, N) fused attention.

    Each layer: drop the lowest `discard_ratio` share of weights, add the residual (identity), renormalise
    rows, and multiply into the running product. Rows of the result sum to 1.
    """
    n = fused.shape[-1]
    eye = np.eye(n, dtype=np.float64)
    result = eye.copy()
    for a in fused.astype(np.float64):
        if discard_ratio > 0:
            flat = a.ravel().copy()
            drop = int(flat.size * discard_ratio)
            if drop:
                flat[np.argpartition(flat, drop - 1)[:drop]] = 0.0
            a = flat.reshape(a.shape)
        a = (a + eye) / 2.0
        a = a / a.sum(axis=-1, keepdims=True)
        result = a @ result
    return result


def grad_rollout_matrix(attentions: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Chefer et al. (2021), generic rule: R <- R + mean_h[(grad * A)^+] @ R, from R = I, over all layers."""
    n = attentions.shape[-1]
    relevance = np.eye(n, dtype=np.float64)
    for a, g in zip(attentions.astype(np.float64), grads.astype(np.float64)):
        cam = np.clip(g * a, 0, None).mean(axis=0)
        relevance = relevance + cam @ relevance
    return relevance


def key_removal_effect(attentions: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """First-order change of the target logit when each token stops being a key, summed over layers and heads.

    Removing key j from row i zeroes A_ij and renormalises the row, so dy = -A_ij (g_ij - sum_k A_ik g_ik).
    Returns T (N,), T_j = sum_l,h,i A_lhij (g_lhij - sum_k A_lhik g_lhik): large = the logit needs token j.
    """
    a = attentions.astype(np.float64)
    g = grads.astype(np.float64)
    row_mean = (a * g).sum(axis=-1, keepdims=True)
    return (a * (g - row_mean)).sum(axis=(0, 1, 2))
