"""High-norm artifact tokens: the patches whose token leaves the last block with an outlier norm, flagged from the
cached pass (`Analysis.token_norms`, no model run), outlined on the Explore overlay and named in a caption note."""

import numpy as np
from PIL import Image

from zoomvit import config, visualization

COLOR = (255, 0, 255)  # magenta: apart from the clicked patch's white outline
SHOWN = 6  # patches named in the note; the rest are counted


def artifact_patches(analysis, ratio: float = config.ARTIFACT_NORM_RATIO) -> list[tuple[int, int, float]]:
    """(row, col, norm / median norm) of the patches whose last-block token norm is over `ratio` times the median,
    highest first: the high-norm tokens many ViTs use as scratch space (Darcet et al. 2024, "Vision Transformers
    Need Registers"), which soak up attention without standing for their patch's content."""
    norms = analysis.token_norms()
    ratios = norms / max(float(np.median(norms)), 1e-12)
    rows, cols = np.nonzero(ratios > ratio)
    return sorted(((int(r), int(c), float(ratios[r, c])) for r, c in zip(rows, cols)), key=lambda p: -p[2])


def outline(image: Image.Image, geometry, patches) -> Image.Image:
    """The image with each flagged patch outlined."""
    for row, col, _ in patches:
        image = visualization.patch_outline(image, geometry, row, col, color=COLOR, width=2)
    return image


def note(patches) -> str:
    """The caption's note on the flagged patches (empty when there are none)."""
    if not patches:
        return ""
    named = "; ".join(f"row {row}, column {col} ({ratio:.1f}×)" for row, col, ratio in patches[:SHOWN])
    more = f"; and {len(patches) - SHOWN} more" if len(patches) > SHOWN else ""
    count = "1 patch leaves" if len(patches) == 1 else f"{len(patches)} patches leave"
    return (
        f"**High-norm tokens** (magenta squares): {count} the last block with an outlier norm, times the "
        f"median: {named}{more}. Many ViTs use such tokens as scratch space (Darcet et al. 2024): they soak up "
        "attention, so attention maps can peak there without that patch mattering for the image."
    )
