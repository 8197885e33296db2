"""The figures of a `zoomvit eval` run, summarised from its per-image rows (and pass 2's pruned predictions):
the pruning table, the zoom blocks and groups, the faithfulness AUCs and mean curves, and the intent groups."""

from __future__ import annotations

import numpy as np

from zoomvit import intent, pruning
from zoomvit.evaluation.data import GROUP_COLUMNS
from zoomvit.evaluation.tasks import FAITHFULNESS_METHODS, INTENT_CONFIGS, fusion


def mean(values) -> float | None:
    values = np.asarray(values, dtype=float)
    return float(values.mean()) if values.size else None


def _change_summary(labels, before_pred, before_conf, after_pred, after_conf):
    """How a second look (pruned or zoomed) changes accuracy and the confidence in the first decision."""
    correct = before_pred == labels
    wrong = ~correct
    change = after_conf - before_conf
    return {
        "top1": mean(after_pred == labels),
        "agreement": mean(after_pred == before_pred),
        "confidence": mean(after_conf),
        "confidence_change": mean(change),
        "confidence_change_correct": mean(change[correct]),
        "confidence_change_wrong": mean(change[wrong]),
        "errors_kept": mean(after_pred[wrong] == before_pred[wrong]),  # same wrong class again
        "errors_fixed": mean(after_pred[wrong] == labels[wrong]),
        "correct_lost": mean(after_pred[correct] != labels[correct]),
    }


def zoom_summary(rows, has_boxes):
    def block(rs):
        out = {
            "n": len(rs),
            "top1_before": mean([r["correct"] for r in rs]),
            "top1_after": mean([r["zoom_correct"] for r in rs]),
            "top1_crop": mean([r["crop_correct"] for r in rs]),
            "zoomed_fraction": mean([r["zoomed"] for r in rs]),
            "forward_units": mean([r["zoom_units"] for r in rs if "zoom_units" in r]),
        }
        if has_boxes:
            out["pointing_game"] = mean([r["pointing_hit"] for r in rs])
            out["box_iou"] = mean([r["box_iou"] for r in rs])
        return out

    summary = block(rows)
    groups = {}
    for column in GROUP_COLUMNS:
        values = sorted({r[column] for r in rows if column in r})
        if values:
            groups[column] = {v: block([r for r in rows if r.get(column) == v]) for v in values}
    if groups:
        summary["groups"] = groups
    return summary


def intent_summary(rows, pruned):
    labels = np.array([r["label"] for r in rows])
    kinds = np.array([r["intent"] for r in rows])
    before = np.array([r["predicted"] for r in rows])
    confidence = np.array([r["confidence"] for r in rows])
    summary = {}
    for kind in intent.KINDS:
        sel = kinds == kind
        group = {
            "n": int(sel.sum()),
            "fraction": float(sel.mean()),
            "top1": mean(before[sel] == labels[sel]),
            "confidence": mean(confidence[sel]),
        }
        for mode, criterion, keep in INTENT_CONFIGS:
            run = pruned[(mode, criterion, keep)]
            group[f"prune_{mode}"] = {
                "criterion": criterion,
                "keep": keep,
                **_change_summary(labels[sel], before[sel], confidence[sel], run.predicted[sel], run.kept_prob[sel]),
            }
        if "zoom_predicted" in rows[0]:
            zoomed = np.array([r["zoom_predicted"] for r in rows])
            zoom_conf = np.array([r["zoom_confidence"] for r in rows])
            group["zoom"] = _change_summary(labels[sel], before[sel], confidence[sel], zoomed[sel], zoom_conf[sel])
        summary[kind] = group
    return summary


def prune_summary(bundle, rows, pruned, keeps, after_block, num_tokens):
    labels = np.array([r["label"] for r in rows])
    before = np.array([r["predicted"] for r in rows])
    entries = []
    for (mode, criterion, keep), run in pruned.items():
        predicted = run.predicted
        if keep not in keeps:
            continue  # only run for the intent groups
        _, tokens_after, macs_before, macs_after = pruning.pruned_macs(
            bundle, num_tokens, keep, after_block, mode, fusion(mode, criterion)
        )
        entries.append(
            {
                "mode": mode,
                "criterion": criterion,
                "keep": keep,
                "top1": mean(predicted == labels),
                "agreement": mean(predicted == before),
                "macs_ratio": macs_after / macs_before,
                "latency_ratio": run.latency_ratio,
                "tokens_after": tokens_after,
            }
        )
    return entries


def faithfulness_summary(rows, curves, has_boxes):
    entries = []
    for m in FAITHFULNESS_METHODS:
        entry = {
            "method": m,
            "deletion_auc": mean([r[f"deletion_{m}"] for r in rows]),
            "insertion_auc": mean([r[f"insertion_{m}"] for r in rows]),
            "deletion_curve": np.mean([c[m][0] for c in curves], axis=0).tolist(),
            "insertion_curve": np.mean([c[m][1] for c in curves], axis=0).tolist(),
        }
        if has_boxes and m != "random":
            entry["pointing_game"] = mean([r[f"pointing_{m}"] for r in rows])
        entries.append(entry)
    return entries
