"""Map faithfulness by perturbation (Chefer et al. 2021 style), on the model's own input pixels.

Deletion: remove the most important pixels first, 10% of the image per step (removed = the dataset mean, i.e.
0 after normalisation), and track the target-class probability; lower area under the curve = more faithful.
Insertion: start from a blurred image and put the most important pixels back first; higher AUC = better.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vit_analyzer import Analysis, predict_pixels


def _blur(pixel_values: torch.Tensor, kernel: int = 31, sigma: float = 10.0) -> torch.Tensor:
    radius = kernel // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).to(pixel_values.dtype)
    c = pixel_values.shape[1]
    out = F.pad(pixel_values, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def pixel_order(analysis: Analysis, grid_map: np.ndarray) -> torch.Tensor:
    """Input pixels sorted from most to least important (the grid map upsampled bilinearly to the input)."""
    h, w = analysis.pixel_values.shape[-2:]
    heat = F.interpolate(
        torch.as_tensor(np.asarray(grid_map, dtype=np.float32))[None, None], size=(h, w), mode="bilinear",
        align_corners=False,
    )
    return heat.flatten().argsort(descending=True, stable=True)


def perturbation_curves(analysis: Analysis, grid_map: np.ndarray | None, steps: int = 10, seed: int = 0):
    """(deletion, insertion) target-class probabilities at 0, 1/steps, ..., 1 of the pixels.

    grid_map None means a random pixel order (the baseline every map must beat).
    """
    x = analysis.pixel_values
    h, w = x.shape[-2:]
    if grid_map is None:
        order = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
    else:
        order = pixel_order(analysis, grid_map)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    fractions = np.linspace(0, 1, steps + 1)
    # mask[i] marks the pixels among the top fractions[i] of the order.
    mask = torch.stack([(rank < int(round(f * h * w))).view(1, h, w) for f in fractions]).to(x.dtype)
    deleted = x * (1 - mask)
    inserted = _blur(x) * (1 - mask) + x * mask
    probs = predict_pixels(analysis.bundle, torch.cat([deleted, inserted]))[:, analysis.target]
    return probs[: steps + 1], probs[steps + 1 :]


def auc(curve: np.ndarray) -> float:
    xs = np.linspace(0, 1, len(curve))
    return float(np.trapezoid(curve, xs))
