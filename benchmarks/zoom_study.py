"""The zoom study (#23): candidate boxes from many maps on the dev sets, each crop classified, then zoom policies
(which candidate, crop or whole image) scored from that cache, tuned and 2-fold cross-validated.

    python benchmarks/zoom_study.py collect --model ../shared/models/deit-tiny-patch16-224 --out /tmp/zoom-study
    python benchmarks/zoom_study.py score --out /tmp/zoom-study

collect: for every image of zoom-bench and imagenet-sample ("nat"), one analysis pass, the candidate maps
(`MAPS`), a tight box per map and mass (padding 0, squared, as `zoom.box_from_map`), and every distinct crop
classified at the model's size and at half of it (for ranking at a quarter of the cost). It writes one .npz per
data set. score: every policy below, on both sets, with forward units counted (the analysis pass is 1, a crop at
the model's size 1, a crop at half size its share of the block multiply-adds).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoomvit import config, zoom  # noqa: E402
from zoomvit.artifacts import artifact_patches  # noqa: E402
from zoomvit.geometry import encode  # noqa: E402
from zoomvit.images import load_image  # noqa: E402
from zoomvit.maps import normalize_map  # noqa: E402
from zoomvit.models import load_model  # noqa: E402
from zoomvit.pruning import block_macs  # noqa: E402
from zoomvit.vit_analyzer import analyze_many, predict_pixels  # noqa: E402

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = {"bench": "data/zoom-bench", "nat": "data/imagenet-sample"}
MASSES = (0.4, 0.6, 0.8)
LOW_SIDE = 112


def candidate_maps(analysis, priors: dict) -> dict[str, np.ndarray]:
    maps = dict(zoom.candidate_maps(analysis))
    maps["rollout_mean"] = analysis.rollout(config.ROLLOUT_DISCARD_RATIO, "mean")
    maps["cls_mean"] = analysis.cls_map(-1, "mean")
    maps["keys"] = zoom.key_similarity_map(analysis)  # LOST
    artifacts = artifact_patches(analysis)
    for name in ("focus", "rollout_max", "cls_max"):
        if artifacts:
            masked = maps[name].copy()
            for row, col, _ in artifacts:
                masked[row, col] = 0.0
            maps[f"{name}_noart"] = normalize_map(masked)
        else:
            maps[f"{name}_noart"] = maps[name]
        maps[f"{name}_prior"] = normalize_map(maps[name] / (priors[name] + 0.05))
    return maps


def classify(bundle, crops) -> tuple[np.ndarray, np.ndarray]:
    pixels = torch.cat([encode(bundle, load_image(crop))[0] for crop in crops])
    full = predict_pixels(bundle, pixels)
    low = predict_pixels(bundle, F.interpolate(pixels, size=(LOW_SIDE, LOW_SIDE), mode="bilinear", antialias=True))
    return full, low


def mean_maps(bundle, folder: Path, rows: list) -> dict[str, np.ndarray]:
    """The three zoom maps averaged over the images: what the model attends to in every image (the priors)."""
    sums = {}
    for start in range(0, len(rows), 8):
        for analysis in analyze_many(bundle, [folder / r["file"] for r in rows[start : start + 8]]):
            for name, grid_map in zoom.candidate_maps(analysis).items():
                sums[name] = sums.get(name, 0) + grid_map
    return {name: total / len(rows) for name, total in sums.items()}


def collect_set(bundle, name: str, rows: list, folder: Path, priors: dict, out: Path):
    """Every image's candidates: boxes, crops' probabilities at full and LOW_SIDE size; one .npz in `out`."""
    record = {"label": [], "whole": [], "boxes": [], "owners": [], "spread": [], "full": [], "low": []}
    names = None
    started = time.perf_counter()
    for start in range(0, len(rows), 8):
        group = rows[start : start + 8]
        for row, analysis in zip(group, analyze_many(bundle, [folder / r["file"] for r in group])):
            maps = candidate_maps(analysis, priors)
            names = sorted(maps)
            boxes, crops, owners = [], [], []
            for map_name, mass in itertools.product(names, MASSES):
                box = zoom.box_from_map(analysis, maps[map_name], mass=mass, padding=0.0)
                key = tuple(round(c, 2) for c in box)
                if key not in boxes:
                    boxes.append(key)
                    crops.append(analysis.loaded.image.crop(zoom._pixel_box(box)))
                owners.append(boxes.index(key))
            full, low = classify(bundle, crops)
            record["label"].append(int(row["label_index"]))
            record["whole"].append(analysis.probs.astype(np.float16))
            record["boxes"].append(np.array([analysis.geometry.to_original(b) for b in boxes], dtype=np.float32))
            record["owners"].append(owners)
            record["spread"].append([zoom.map_spread(maps[n]) for n in names])
            record["full"].append(full.astype(np.float16))
            record["low"].append(low.astype(np.float16))
        done = start + len(group)
        print(f"{name}: {done}/{len(rows)} {(time.perf_counter() - started) / done:.2f} s/img", file=sys.stderr)
    extra = {}
    if "scale" in rows[0]:
        extra = {
            "scale": np.array([float(r["scale"]) for r in rows]),
            "background": np.array([r["background"] for r in rows]),
            "true_box": np.array([[float(r[c]) for c in ("x0", "y0", "x1", "y1")] for r in rows]),
        }
    ragged = {key: np.empty(len(rows), dtype=object) for key in ("boxes", "full", "low")}
    for key, holder in ragged.items():
        holder[:] = record[key]
    np.savez(
        out / f"{name}.npz",
        label=np.array(record["label"]),
        whole=np.stack(record["whole"]),
        names=np.array(names),
        masses=np.array(MASSES),
        owners=np.array(record["owners"]),
        spread=np.array(record["spread"]),
        **ragged,
        **extra,
    )


def collect(args):
    torch.set_num_threads(args.threads)
    bundle = load_model(args.model, "cpu", "float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name, where in SETS.items():
        folder = SHARED / where
        with open(folder / "labels.csv", newline="") as f:
            sets[name] = (folder, list(csv.DictReader(f))[: args.limit])
    if (out / "priors.npz").is_file():  # from an earlier collect into the same folder
        priors = dict(np.load(out / "priors.npz"))
    else:
        priors = mean_maps(bundle, *sets["nat"])  # natural photos: what every image draws attention to
        np.savez(out / "priors.npz", **priors)
    for name in args.sets.split(","):
        collect_set(bundle, name, *sets[name][::-1], priors, out)


def low_units(bundle) -> float:
    """A crop at LOW_SIDE in forward units: block multiply-adds on its tokens over those on a full-size input."""
    side = bundle.adapter.input_size[0]
    tokens = lambda px: bundle.num_special + (px // bundle.patch_size) ** 2
    return block_macs(bundle, tokens(LOW_SIDE)) / block_macs(bundle, tokens(side))


class Cache:
    """One data set's collected candidates, as (images, combos) arrays: combo k = (map, mass)."""

    def __init__(self, path: Path):
        z = np.load(path, allow_pickle=True)
        self.label, self.names, self.masses = z["label"], list(z["names"]), list(z["masses"])
        whole = z["whole"].astype(np.float32)
        self.whole_max, self.whole_arg = whole.max(1), whole.argmax(1)
        self.whole_label = whole[np.arange(len(whole)), self.label]
        owners = z["owners"]  # (N, K): index of the distinct box each combo gave
        self.uid = owners
        full = [f.astype(np.float32) for f in z["full"]]
        low = [f.astype(np.float32) for f in z["low"]]
        take = lambda arrays, fn: np.stack([fn(a)[o] for a, o in zip(arrays, owners)])
        self.fmax, self.farg = take(full, lambda a: a.max(1)), take(full, lambda a: a.argmax(1))
        self.lmax = take(low, lambda a: a.max(1))
        self.boxes = z["boxes"]
        self.extra = {k: z[k] for k in ("scale", "background", "true_box") if k in z}
        self.combos = [(n, m) for n in self.names for m in self.masses]

    def cols(self, combos) -> list[int]:
        return [self.combos.index(c) for c in combos]


def predict(cache: Cache, cols, select: str, margin: float, low: float):
    """(predictions, forward units per image, chosen combo per image) of one policy."""
    uid = cache.uid[:, cols]
    distinct = 1 + (np.diff(np.sort(uid, 1), axis=1) != 0).sum(1)
    rows = np.arange(len(uid))
    if select == "full":
        chosen = np.asarray(cols)[cache.fmax[:, cols].argmax(1)]
        units = 1 + distinct
    elif select == "low":  # rank at LOW_SIDE, classify the winner at full size
        chosen = np.asarray(cols)[cache.lmax[:, cols].argmax(1)]
        units = 1 + low * distinct + 1
    else:  # "low2": rank at LOW_SIDE, classify the best two at full size, keep the more confident
        order = np.argsort(-cache.lmax[:, cols], axis=1)[:, :2]
        pair = np.asarray(cols)[order]
        better = cache.fmax[rows[:, None], pair].argmax(1)
        chosen = pair[rows, better]
        units = 1 + low * distinct + np.minimum(2, distinct)
    crop_conf, crop_pred = cache.fmax[rows, chosen], cache.farg[rows, chosen]
    use = crop_conf > cache.whole_max + margin
    return np.where(use, crop_pred, cache.whole_arg), units, chosen, use


def accuracy(cache, pred, where=None) -> float:
    hit = pred == cache.label
    return float(hit[where].mean() if where is not None else hit.mean())


def report(name, caches, combos, select, margin, low):
    bench, nat = caches["bench"], caches["nat"]
    pb, ub, _, zb = predict(bench, bench.cols(combos), select, margin, low)
    pn, un, _, zn = predict(nat, nat.cols(combos), select, margin, low)
    bg = bench.extra["background"]
    line = (
        f"| {name} | {100 * accuracy(bench, pb):.1f} | {100 * accuracy(nat, pn):.1f} | "
        f"{100 * accuracy(bench, pb, bg == 'blur'):.1f} / {100 * accuracy(bench, pb, bg == 'sharp'):.1f} | "
        f"{np.mean(np.concatenate([ub, un])):.2f} | {100 * zb.mean():.0f} / {100 * zn.mean():.0f} |"
    )
    print(line)


def tune(caches, combos_space, select, low, budget, fold_mask=None):
    """Greedy: add the (map, mass) combo that most raises zoom-bench top-1 with nat at least its no-zoom top-1,
    trying every margin, within `budget` forward units; on the images of `fold_mask` (all when None)."""
    bench, nat = caches["bench"], caches["nat"]
    mb = np.ones(len(bench.label), bool) if fold_mask is None else fold_mask
    mn = np.ones(len(nat.label), bool) if fold_mask is None else fold_mask
    nat_floor = accuracy(nat, nat.whole_arg, mn)
    best = (-1.0, [], 0.0)
    chosen: list = []
    margins = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
    while True:
        step = None
        for combo in combos_space:
            if combo in chosen:
                continue
            trial = [*chosen, combo]
            for margin in margins:
                pb, ub, _, _ = predict(bench, bench.cols(trial), select, margin, low)
                pn, un, _, _ = predict(nat, nat.cols(trial), select, margin, low)
                if np.mean(np.concatenate([ub[mb], un[mn]])) > budget or accuracy(nat, pn, mn) < nat_floor:
                    continue
                score = accuracy(bench, pb, mb)
                if step is None or score > step[0]:
                    step = (score, trial, margin)
        if step is None:  # nothing more fits the budget: the best set seen on the way
            return best
        if step[0] > best[0]:
            best = step
        chosen = step[1]


def score(args):
    out = Path(args.out)
    caches = {name: Cache(out / f"{name}.npz") for name in SETS}
    low = low_units(load_model(args.model, "cpu", "float32"))
    print(f"a {LOW_SIDE}-px crop costs {low:.3f} forward units")
    bench, nat = caches["bench"], caches["nat"]
    print(f"no zoom: bench {100 * accuracy(bench, bench.whole_arg):.1f}, nat {100 * accuracy(nat, nat.whole_arg):.1f}")
    print("| policy | zoom-bench | nat | blur / sharp | units | zoomed % bench / nat |")
    print("|---|---|---|---|---|---|")
    policy_c = [("focus", 0.6), ("rollout_max", 0.6), ("cls_max", 0.6)]
    report("C (3 maps, mass 0.6, margin 0.1)", caches, policy_c, "full", 0.1, low)
    at = lambda names, mass=0.6: [(name, mass) for name in names]
    three = ("focus", "rollout_max", "cls_max")
    ablation = {
        "C with the artifact tokens masked": (at(f"{n}_noart" for n in three), "full"),
        "C with maps divided by the mean map (prior)": (at(f"{n}_prior" for n in three), "full"),
        "key-similarity (LOST) box alone": (at(["keys"]), "full"),
        "C + key-similarity (LOST)": ([*policy_c, ("keys", 0.6)], "full"),
        "confident: focus + key-similarity at masses 0.4 and 0.6": (list(config.ZOOM_CANDIDATES), "full"),
        "all 14 maps at mass 0.6, ranked at 112 px, winner at full size": (at(bench.names), "low"),
        "all 14 maps at mass 0.6, ranked at 112 px, best two at full size": (at(bench.names), "low2"),
    }
    for name, (combos, select) in ablation.items():
        report(name + " (margin 0.1)", caches, combos, select, 0.1, low)
    space = bench.combos
    rng = np.random.default_rng(0)
    fold = rng.random(len(bench.label)) < 0.5  # composite i and photo i share a fold
    for select, budget in (("full", 4.0), ("low", 4.0), ("low2", 4.0)):
        _, combos, margin = tune(caches, space, select, low, budget)
        report(f"tuned {select} <= {budget}: {combos} m {margin}", caches, combos, select, margin, low)
        held_bench, held_nat = np.zeros(len(bench.label), bool), np.zeros(len(nat.label), bool)
        for train in (fold, ~fold):  # tuned on one half, scored on the other
            _, combos_f, margin_f = tune(caches, space, select, low, budget, train)
            pb, _, _, _ = predict(bench, bench.cols(combos_f), select, margin_f, low)
            pn, _, _, _ = predict(nat, nat.cols(combos_f), select, margin_f, low)
            held_bench[~train], held_nat[~train] = (pb == bench.label)[~train], (pn == nat.label)[~train]
            print(f"  fold tuned: {combos_f} m {margin_f}")
        print(f"  cross-validated: bench {100 * held_bench.mean():.1f}, nat {100 * held_nat.mean():.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("collect", "score"))
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument("--out", default="/tmp/zoom-study")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", default="bench,nat", help="collect: which data sets (bench, nat)")
    args = parser.parse_args()
    if args.step == "collect":
        collect(args)
    else:
        score(args)


if __name__ == "__main__":
    main()
