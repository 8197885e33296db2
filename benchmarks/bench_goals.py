"""The engine's accuracy goals, measured in one run on the dev data (not a test):

    python benchmarks/bench_goals.py [--model PATH] [--limit N] [--faithfulness-limit N]

- analysis-mode pruning after block 6 (intent vs plain gradient-weighted rollout), top-1 change at keep 0.3 / 0.1;
- efficiency-mode pruning after block 6 (merge vs CLS-attention top-k vs random), top-1 change at keep 0.5 / 0.3;
- zoom-bench: top-1 of the pasted object's class before and after adaptive zoom (all, blur), focus-map peak in box;
- imagenet-sample: top-1 with and without adaptive zoom;
- deletion / insertion AUC of every map on a subset.
"""

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faithfulness  # noqa: E402
import pruning  # noqa: E402
import vit_analyzer as va  # noqa: E402
import zoom  # noqa: E402

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
AFTER = 6


def rows_of(folder: Path, limit: int | None):
    with open(folder / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[:limit] if limit else rows


def pct(x):
    return f"{100 * x:.1f}%"


def pruning_goals(bundle, folder, limit):
    rows = rows_of(folder, limit)
    labels = np.array([int(r["label_index"]) for r in rows])
    keeps = (0.5, 0.3, 0.1)
    pixels, scores = [], {"intent": {k: [] for k in keeps}, "grad_rollout": {k: [] for k in keeps}}
    for r in tqdm(rows, desc="analysis passes", file=sys.stderr):
        analysis = va.analyze(bundle, folder / r["file"], keep_graph=False)
        pixels.append(analysis.pixel_values)
        for keep in keeps:
            scores["intent"][keep].append(pruning.analysis_scores(analysis, AFTER, keep)[0].numpy())
            scores["grad_rollout"][keep].append(analysis.grad_rollout().ravel())
    pixels = torch.cat(pixels)
    top1 = lambda logits: float((logits.argmax(-1).numpy() == labels).mean())
    chunks = lambda fn: torch.cat([fn(pixels[i : i + 50], slice(i, i + 50)) for i in range(0, len(rows), 50)])
    base = top1(chunks(lambda x, s: pruning.forward_pruned(bundle, x, AFTER, 1.0)[0]))
    print(f"\nimagenet-sample n={len(rows)}: unpruned top-1 {pct(base)}")
    for name, per_keep in scores.items():
        tables = {keep: torch.tensor(np.stack(values)) for keep, values in per_keep.items()}
        line = [
            f"keep {keep}: {100 * (top1(chunks(lambda x, s: pruning.forward_pruned(bundle, x, AFTER, keep, tables[keep][s])[0])) - base):+.1f}"
            for keep in keeps
        ]
        print(f"  analysis  {name:13s} " + " | ".join(line) + " points")
    for fusion in ("merge", "drop"):
        line = [
            f"keep {keep}: {100 * (top1(chunks(lambda x, s: pruning.forward_pruned(bundle, x, AFTER, keep, None, fusion)[0])) - base):+.1f}"
            for keep in (0.7, 0.5, 0.3)
        ]
        label = "merge+coverage" if fusion == "merge" else "CLS-attn top-k"
        print(f"  efficiency {label:14s} " + " | ".join(line) + " points")
    generator = torch.Generator().manual_seed(0)
    random_scores = torch.rand(len(rows), len(scores["intent"][0.5][0]), generator=generator)
    line = [
        f"keep {keep}: {100 * (top1(chunks(lambda x, s: pruning.forward_pruned(bundle, x, AFTER, keep, random_scores[s])[0])) - base):+.1f}"
        for keep in (0.7, 0.5, 0.3)
    ]
    print(f"  random                    " + " | ".join(line) + " points")


def zoom_goals(bundle, folder, limit, has_boxes):
    rows = rows_of(folder, limit)
    before, after, zoomed, peak, kinds = [], [], [], [], []
    for r in tqdm(rows, desc=f"zoom {folder.name}", file=sys.stderr):
        analysis = va.analyze(bundle, folder / r["file"], keep_graph=False)
        result = zoom.zoom(analysis)
        label = int(r["label_index"])
        before.append(analysis.predicted == label)
        after.append(int(np.argmax(result.probs_after)) == label)
        zoomed.append(result.zoomed)
        kinds.append(r.get("background", "photo"))
        if has_boxes:
            heat = analysis.upsample(zoom.focus_map(analysis))
            y, x = np.unravel_index(int(heat.argmax()), heat.shape)
            s = analysis.geometry.scale
            x0, y0, x1, y1 = (float(r[k]) * s for k in ("x0", "y0", "x1", "y1"))
            peak.append(x0 <= x <= x1 and y0 <= y <= y1)
    before, after, kinds = np.array(before), np.array(after), np.array(kinds)
    print(f"\n{folder.name} n={len(rows)}: top-1 {pct(before.mean())} -> {pct(after.mean())} with adaptive zoom "
          f"(zoomed {pct(np.mean(zoomed))})")
    for kind in sorted(set(kinds)) if has_boxes else []:
        sel = kinds == kind
        print(f"  {kind}: {pct(before[sel].mean())} -> {pct(after[sel].mean())}, "
              f"focus-map peak inside the box {pct(np.array(peak)[sel].mean())}")
    if has_boxes:
        print(f"  focus-map peak inside the box overall {pct(np.mean(peak))}")


def faithfulness_goals(bundle, folder, limit):
    rows = rows_of(folder, None)[:: max(1, 500 // limit)][:limit]
    methods = ("random", "attention", "cls", "rollout", "grad_rollout", "intent")
    curves = {m: ([], []) for m in methods}
    for r in tqdm(rows, desc="deletion/insertion", file=sys.stderr):
        analysis = va.analyze(bundle, folder / r["file"], keep_graph=False)
        for m in methods:
            deletion, insertion = faithfulness.perturbation_curves(analysis, None if m == "random" else analysis.map(m))
            curves[m][0].append(faithfulness.auc(deletion))
            curves[m][1].append(faithfulness.auc(insertion))
    print(f"\nfaithfulness, imagenet-sample n={len(rows)} (predicted class; deletion lower is better)")
    for m in methods:
        print(f"  {m:13s} deletion AUC {100 * np.mean(curves[m][0]):5.2f}  insertion AUC {100 * np.mean(curves[m][1]):5.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument("--limit", type=int, default=None, help="images per data set (default: all 500)")
    parser.add_argument("--faithfulness-limit", type=int, default=100)
    parser.add_argument("--only", default="prune,zoom,faithfulness")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest when anything else runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = va.load_model(args.model)
    only = set(args.only.split(","))
    data = SHARED / "data"
    print(f"model {args.model}")
    if "prune" in only:
        pruning_goals(bundle, data / "imagenet-sample", args.limit)
    if "zoom" in only:
        zoom_goals(bundle, data / "zoom-bench", args.limit, has_boxes=True)
        zoom_goals(bundle, data / "imagenet-sample", args.limit, has_boxes=False)
    if "faithfulness" in only:
        faithfulness_goals(bundle, data / "imagenet-sample", args.faithfulness_limit)


if __name__ == "__main__":
    main()
