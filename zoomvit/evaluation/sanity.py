"""Eval's `sanity` task: the model randomisation test of Adebayo et al. (2018), "Sanity Checks for Saliency Maps".

The weights are randomised from the top down, cumulatively: level 0 is the model as it is, level 1 its classifier,
level 2 the classifier and the last block, ... level L+1 the classifier and every block (the embeddings stay). At
each level every map of `MAPS` is computed again for each image, for the class the intact model predicted, and
compared with the intact model's map by Spearman rank correlation. A map that barely changes while the weights it
claims to explain are noise shows the image, not the model (an edge detector passes for a saliency map).

Randomising a tensor draws each value from normal(mean, std) of that tensor's own trained values, with a fixed
seed per level: activations keep their scale, so the random network is not degenerate (all-uniform attention would
make every map constant, a trivial "pass"). The maps are normalised to [0, 1], so the absolute-value variant of the
test is the same test. All of it happens on a copy (`Randomised`): the caller's model is never touched.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch

from zoomvit import config
from zoomvit.errors import ZoomViTError
from zoomvit.vit_analyzer import analyze_encoded

MAPS = config.MAP_METHODS  # the maps the app shows (the Compare tab's list)
SEED = 0
THRESHOLD = 0.5  # a map passes when its mean rank correlation with every block random is below this
RULE = (
    f"a map passes when its mean rank correlation with the intact model's map is below {THRESHOLD:g} once the "
    "classifier and every block are random"
)


def level_names(num_layers: int) -> list[str]:
    """What each level has randomised, as the report's columns name it: none, head, then each block added (blocks
    numbered 1..L as everywhere in the tool)."""
    blocks = [str(num_layers)] + [f"{first}-{num_layers}" for first in range(num_layers - 1, 0, -1)]
    return ["none", "head"] + [f"head+{b}" for b in blocks]


def level_in_words(name: str) -> str:
    """'head+10-12' -> 'the head and blocks 10-12'."""
    if name in ("none", "head"):
        return {"none": "nothing", "head": "the head"}[name]
    blocks = name.removeprefix("head+")
    return f"the head and block{'s' if '-' in blocks else ''} {blocks}"


def classifier_modules(bundle) -> list[torch.nn.Linear]:
    """The classifier layers: every Linear outside the blocks whose outputs are the class logits (a distilled DeiT
    has two). Found by shape rather than by name: the families name their heads differently (classifier,
    cls_classifier, head)."""
    in_blocks = {id(m) for block in bundle.adapter.layers for m in block.modules()}
    num_labels = len(bundle.id2label)
    found = [
        m
        for m in bundle.model.modules()
        if isinstance(m, torch.nn.Linear) and m.out_features == num_labels and id(m) not in in_blocks
    ]
    if not found:
        raise ZoomViTError(f"The sanity task found no classifier layer with {num_labels} outputs in this model.")
    return found


class Randomised:
    """A copy of `bundle`'s model whose top can be randomised level by level (`randomise`) and put back to the
    trained weights (`reset`); `bundle` is the copy's, for `analyze_encoded`. The original is only read."""

    def __init__(self, bundle, seed: int = SEED):
        self.original = bundle
        self.bundle = replace(bundle, model=copy.deepcopy(bundle.model))
        self.seed = seed
        self.num_levels = bundle.num_layers + 2

    def _modules(self, level: int) -> list[torch.nn.Module]:
        """What `level` adds to the randomised part: the classifier at 1, block L-level+2 after that."""
        if level == 1:
            return classifier_modules(self.bundle)
        return [self.bundle.adapter.layers[self.bundle.num_layers - level + 1]]

    @torch.no_grad()
    def reset(self) -> None:
        """Every weight back to the trained model's (an in-place copy: no second model in memory)."""
        for mine, theirs in zip(self.bundle.model.state_dict().values(), self.original.model.state_dict().values()):
            mine.copy_(theirs)

    @torch.no_grad()
    def randomise(self, level: int) -> None:
        """Randomise what `level` adds (levels are cumulative: call them in order 1, 2, ... after `reset`). The
        draws come from a generator seeded by the level alone, so every group of images sees the same network."""
        generator = torch.Generator().manual_seed(self.seed * 1009 + level)
        for module in self._modules(level):
            for param in module.parameters():
                values = param.detach().float().cpu()
                spread = values.std().item() if values.numel() > 1 else 0.0
                drawn = torch.randn(values.shape, generator=generator) * spread + values.mean()
                param.copy_(drawn.to(param.device, param.dtype))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (tied values share their mean rank). Identical maps give 1; a
    constant map against another has no ranking to agree with: 0."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if np.array_equal(a, b):
        return 1.0
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    scale = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / scale) if scale > 0 else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, tie, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=ranks) / counts)[tie]


def group_correlations(randomised: Randomised, analyses: list) -> np.ndarray:
    """(images, levels, maps) rank correlations for a group of images the intact model analysed (one batch).
    Each level is one batched analysis pass of the copy, for each image's intact target class."""
    intact = [[analysis.map(m) for m in MAPS] for analysis in analyses]
    loaded = [a.loaded for a in analyses]
    pixels = [a.pixel_values for a in analyses]
    geometries = [a.geometry for a in analyses]
    targets = [a.target for a in analyses]
    out = np.zeros((len(analyses), randomised.num_levels, len(MAPS)), dtype=np.float32)
    randomised.reset()
    for level in range(randomised.num_levels):
        if level:  # level 0 runs the untouched copy: the check that like is compared with like
            randomised.randomise(level)
        again = analyze_encoded(randomised.bundle, loaded, pixels, geometries, targets)
        for i, analysis in enumerate(again):
            out[i, level] = [rank_correlation(before, analysis.map(m)) for before, m in zip(intact[i], MAPS)]
    return out


def sanity_summary(correlations: np.ndarray, num_layers: int) -> dict:
    """results.json's `sanity`: per map, the mean correlation at each level, the share of images at or above
    THRESHOLD, and the verdict. `correlations`: (images, levels, maps)."""
    levels = level_names(num_layers)
    maps = []
    for j, name in enumerate(MAPS):
        means = correlations[:, :, j].mean(axis=0)
        below = np.array([float(f"{v:.2f}") < THRESHOLD for v in means])  # judged as the report prints them
        # the level from which every deeper randomisation stays below the threshold
        from_level = next((k for k in range(len(levels)) if below[k:].all()), None)
        maps.append(
            {
                "map": name,
                "spearman": [round(float(v), 4) for v in means],
                "above_threshold": [round(float(v), 4) for v in (correlations[:, :, j] >= THRESHOLD).mean(axis=0)],
                "passes": bool(below[-1]),
                "below_from": None if from_level is None else levels[from_level],
            }
        )
    return {"levels": levels, "threshold": THRESHOLD, "seed": SEED, "rule": RULE, "maps": maps}


def verdict(entry: dict) -> str:
    """One map's verdict in words, with the figure it rests on."""
    if entry["passes"]:
        level = entry["below_from"]
        return f"passes: below {THRESHOLD:g} once {level_in_words(level)} {'is' if level == 'head' else 'are'} random"
    return f"fails: still {entry['spearman'][-1]:.2f} with the head and every block random"
