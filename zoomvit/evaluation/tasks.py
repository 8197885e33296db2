"""What `zoomvit eval` runs: its tasks, the pruning configurations and the maps it compares, and the CLI's
--tasks and --keep parsed into them."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from zoomvit import config
from zoomvit.checks import check_keep
from zoomvit.errors import ZoomViTError

TASKS = config.EVAL_TASKS
DEFAULT_TASKS = config.EVAL_DEFAULT_TASKS
DEFAULT_KEEPS = config.EVAL_KEEPS
# Ranking criteria per pruning mode; "random" is each mode's baseline (analysis: random tokens dropped;
# efficiency: random tokens kept and the rest merged into them, so only the choice differs from "merge").
CRITERIA = {"analysis": ("intent", "grad_rollout", "random"), "efficiency": ("merge", "cls_topk", "random")}
OWN_SCORES = ("merge", "cls_topk")  # criteria that rank by the model's own attention at the cut (no scores passed)
FAITHFULNESS_METHODS = ("random", "attention", "cls", "rollout", "grad_rollout", "intent")
INTENT_KEEP = 0.5  # the intent groups report pruning at this keep
# The configurations the intent groups (and their example sheets) report: each mode's own ranking at INTENT_KEEP.
INTENT_CONFIGS = (("analysis", "intent", INTENT_KEEP), ("efficiency", "merge", INTENT_KEEP))


class PrunedRun(NamedTuple):
    """One pruning configuration over the N evaluated images (pass 2), in their order."""

    predicted: np.ndarray  # (N,) the pruned model's class
    kept_prob: np.ndarray  # (N,) its probability of the unpruned prediction
    confidence: np.ndarray  # (N,) its probability of its own prediction
    latency_ratio: float | None  # None: not measured (eval --no-timing)
    kept: np.ndarray | None = None  # (N, kept tokens) patch indices kept, where asked for (example sheets)


def parse_keeps(text: str) -> tuple[float, ...]:
    """'0.9,0.7' -> (0.9, 0.7), each in (0, 1]."""
    try:
        keeps = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ZoomViTError(f"--keep must be comma-separated numbers, got '{text}'.") from None
    if not keeps:
        raise ZoomViTError(f"--keep values must be in (0, 1], got '{text}'.")
    return tuple(check_keep(k, "--keep values") for k in keeps)


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ZoomViTError(f"--tasks must be some of {','.join(TASKS)}, got '{text}'.")
    return tasks


def prune_configs(tasks, keeps) -> list[tuple[str, str, float]]:
    """The (mode, criterion, keep) configurations the pruning pass runs for `tasks`."""
    configs = [(m, c, k) for m, names in CRITERIA.items() for c in names for k in keeps] if "prune" in tasks else []
    if "intent" in tasks:  # the intent groups need keep INTENT_KEEP in both modes, listed or not
        configs += [cfg for cfg in INTENT_CONFIGS if cfg not in configs]
    return configs


def fusion(mode: str, criterion: str) -> str:
    """What happens to the tokens a configuration does not keep (see `pruning.forward_pruned`)."""
    return "merge" if mode == "efficiency" and criterion in ("merge", "random") else "drop"
