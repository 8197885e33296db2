"""The app's About text, written from the loaded model (its preprocessing, its blocks) and where it runs."""

from __future__ import annotations

import re

from zoomvit import config, model_cards
from zoomvit.geometry import geometry_for
from zoomvit.models import ViTBundle

ABOUT = """
**What each view shows, and when to trust it**

- **Gradient-weighted** (the first view): rollout with each attention weighted by its gradient for the *target
  class* (Chefer et al. 2021). Class-specific: the patches whose attention raises that class. The most faithful map
  on deletion tests (the evaluation's figures on DeiT-Tiny), hence shown first.
- **Rollout**: attention multiplied through all blocks (Abnar & Zuidema 2020): which patches feed the class token
  through the network. Class-agnostic: it shows where the model *looks*, not why it picks a class. Often lights up
  a few background patches that ViTs use as scratch space.
- **Intent**: gradient-weighted rollout plus how much removing each patch's key would change the target class,
  over all blocks. What the decision depends on; about as faithful as gradient-weighted, a little sharper.
- **CLS attention**: what the class token reads in one block (one head, or mean/max/min over heads).
- **Attention**: how much attention each patch receives in one block, from all tokens.
- **Clicking a patch**: what that patch attends to (its attention row) or what attends to it (its column), in the
  chosen block and head.

**Sanity checks** (Adebayo et al. 2018, model randomisation; `zoomvit eval --tasks sanity` on DeiT-Tiny, 500
ImageNet photos): every view above passes. With the classifier and every block given random weights, each map's rank
correlation with the trained model's map falls below 0.5 (rollout to 0.15, the others to about 0): the maps show
what the model computes, not just the image. Gradient-weighted and intent already change with a random classifier
alone (0.69 and 0.45); rollout changes least (above 0.5 until blocks 8-12 are random): of the five, it shows the
most of the image itself.

**Faithfulness of this map**: the deletion and insertion curves of the map on screen, on this image, for the class
it explains: the pixels it ranks highest are removed first (deletion: the class's probability should fall fast, a
low area under the curve) or restored first over a blurred copy (insertion: it should rise fast, a high area). The
evaluation's protocol, 10% of the pixels per step; 38 perturbed images through the model, on request: the map's
and, for comparison, those of a random map (seeded), as the evaluation's baseline. AUCs are in points (× 100).

**High-norm tokens**: many ViTs turn a few background patches into scratch space (Darcet et al. 2024, "Vision
Transformers Need Registers"): their tokens leave the network with a norm far above the others and soak up
attention, so attention and rollout maps can peak there although that patch means little for the image. A patch
whose token leaves the last block with more than {artifact_ratio:g}× the median norm is outlined in magenta and
named under the map (DeiT-Tiny showed none on 63 ImageNet photos: its largest was 2.8×).

**Intent diagnosis** (about the predicted class): *good*: importance is concentrated and the region alone is
still classified the same; *inverted*: the region the model relies on, cropped out, is not classified as its
answer, so the decision leans on context or background; *diffuse*: importance is scattered over separate places.
"Inverted" can appear on a right answer: a model can be right for contextual reasons (a tench recognised by the
angler holding it).
When the prediction itself is a guess (top-1 under 10%, or near chance for a model with few classes), the diagnosis
says so first: the map then explains a guess, not a decision.

{preprocessing}

**Numbering**: blocks are numbered 1 to {layers}; *prune after block 6* means blocks 7 to {layers} see only the
kept tokens. *Keep* is the share of patch tokens kept (0.1 to 1.0); the class token is always kept.

**Zoom**: boxes around where the model looks (the focus map) and around the patches whose keys agree (the
key-similarity map), each crop classified again; the most confident crop wins. The confident policy (the default)
uses its prediction only when it is surer than the whole image by {margin:.2f} in top probability, and says so in
numbers; adaptive zoom only uses the crop when the box is small, and then mixes both predictions (70% whole image,
30% crop). Forward units count the zoom's cost: one full-size forward is 1, the analysis pass included.

**Pruning**: *analysis* mode ranks tokens by intent (it looks ahead at the whole model: an explanation tool, not a
speed-up); *efficiency* mode ranks them without look-ahead, and its *fusion* says what becomes of the tokens not
kept: *drop* them, *fuse* them into one extra token (their score-weighted mean, EViT), or *merge* each into its most
similar kept token (the default; the CLI's `--fusion`).
MACs count the multiply-adds; the measured time is the median of several runs on {device}, which other users
share, so differences within the shown range are noise.
"""


def device_text(bundle: ViTBundle) -> str:
    """Where the model runs, as a sentence part: "this server's CPU", "this server's GPU (cuda:0)"."""
    kind = bundle.device.type
    return "this server's CPU" if kind == "cpu" else f"this server's GPU ({bundle.device})"


def preprocessing_text(bundle: ViTBundle) -> str:
    """What the model's own preprocessing does to a photo, read off its geometry for a 4:3 one (1000x750)."""
    geometry = geometry_for(bundle, (1000, 750))
    (rw, rh), (_, _, cw, ch) = geometry.resized, geometry.crop
    if (rw, rh) == (cw, ch):
        return (
            f"**Preprocessing**: every image is resized to {cw}×{ch} pixels, whatever its shape (squeezed, not "
            "cropped): the model sees all of it."
        )
    resize = f"its short side resized to {min(rw, rh)}" if abs(rw / rh - 1000 / 750) < 0.01 else f"resized to {rw}×{rh}"
    return (
        f"**The dark band**: the model sees only its centre crop (the image {resize}, then the centre "
        f"{cw}×{ch} taken). Pixels outside the crop never reach the model, so every map is zero there."
    )


def about_text(bundle: ViTBundle) -> str:
    text = ABOUT.format(
        layers=bundle.num_layers,
        preprocessing=preprocessing_text(bundle),
        device=device_text(bundle),
        artifact_ratio=config.ARTIFACT_NORM_RATIO,
        margin=config.ZOOM_MARGIN,
    )
    card = model_cards.model_card(bundle.name)
    if card:  # its headings made smaller than the About text's own
        card = re.sub(r"^(#{1,3}) ", lambda m: "#" * (len(m.group(1)) + 3) + " ", card, flags=re.M)
        text += f"\n\n**This model's card** (README.md in its folder, written by `zoomvit train`):\n\n{card}"
    return text
