"""The same DeiT-Tiny through three loaders, measured in one run (not a test): Hugging Face's copy, timm's copy
loaded by timm (`timm:<folder>`) and the same folder loaded by transformers' TimmWrapper.

    python benchmarks/compare_timm_hf.py [--limit N] [--maps N]

Prints, over the dev images (../shared/data/imagenet-sample):
- top-1 accuracy of each path with its own preprocessing (Hugging Face's squashes to 256x256 then crops; timm's
  resizes the short side to 256 then crops, so non-square photos are seen differently), and how often they agree;
- top-1 agreement and map correlations (rollout, gradient rollout, intent) when every path gets the same pixels
  (the Hugging Face preprocessing), which isolates the model code from the preprocessing.
"""

import argparse
import csv
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoomvit.images import load_image
from zoomvit.models import load_model
from zoomvit.vit_analyzer import analyze, predict  # noqa: E402

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
MAPS = ("rollout", "grad_rollout", "intent")


def dev_images(limit: int | None):
    folder = SHARED / "data" / "imagenet-sample"
    with open(folder / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    return [(folder / row["file"], int(row["label_index"])) for row in rows]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def compare(paths: dict, images, maps_on: int):
    """paths: name -> bundle; the first is the reference. Returns a dict of figures."""
    reference_name, reference = next(iter(paths.items()))
    same_pixels = {name: dataclasses.replace(b, processor=reference.processor) for name, b in paths.items()}
    own_top1 = {name: [] for name in paths}
    same_top1 = {name: [] for name in paths}
    map_corr = {name: {m: [] for m in MAPS} for name in paths if name != reference_name}
    labels = []
    for index, (path, label) in enumerate(images):
        loaded = load_image(path)
        labels.append(label)
        for name, bundle in paths.items():
            own_top1[name].append(int(predict(bundle, loaded).argmax()))
            same_top1[name].append(int(predict(same_pixels[name], loaded).argmax()))
        if index < maps_on:
            ref = analyze(reference, loaded, keep_graph=False)
            for name in map_corr:
                other = analyze(same_pixels[name], loaded, keep_graph=False)
                for method in MAPS:
                    map_corr[name][method].append(correlation(ref.map(method), other.map(method)))
    labels = np.array(labels)
    figures = {"images": len(images), "maps_on": min(maps_on, len(images))}
    for name in paths:
        own, same = np.array(own_top1[name]), np.array(same_top1[name])
        figures[name] = {
            "top1_own_preprocessing": float((own == labels).mean()),
            "agrees_with_reference_own_preprocessing": float((own == np.array(own_top1[reference_name])).mean()),
            "top1_same_pixels": float((same == labels).mean()),
            "agrees_with_reference_same_pixels": float((same == np.array(same_top1[reference_name])).mean()),
        }
        if name in map_corr:
            figures[name]["map_correlation_min"] = {m: float(np.min(v)) for m, v in map_corr[name].items()}
            figures[name]["map_correlation_median"] = {m: float(np.median(v)) for m, v in map_corr[name].items()}
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="first N dev images (default: all 500)")
    parser.add_argument("--maps", type=int, default=100, help="compare maps on the first N images")
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = SHARED / "models"
    paths = {
        "Hugging Face": load_model(str(models / "deit-tiny-patch16-224")),
        "timm": load_model(f"timm:{models / 'deit-tiny-patch16-224-timm'}"),
        "TimmWrapper": load_model(str(models / "deit-tiny-patch16-224-timm")),
    }
    figures = compare(paths, dev_images(args.limit), args.maps)
    print(f"{figures['images']} dev images; maps compared on {figures['maps_on']}; reference: Hugging Face")
    for name in paths:
        f = figures[name]
        print(
            f"{name}: top-1 {f['top1_own_preprocessing']:.3f} with its own preprocessing "
            f"(agrees {f['agrees_with_reference_own_preprocessing']:.3f}); same pixels: top-1 "
            f"{f['top1_same_pixels']:.3f}, agrees {f['agrees_with_reference_same_pixels']:.3f}"
        )
        if "map_correlation_min" in f:
            print(
                "   map correlation min / median: "
                + ", ".join(
                    f"{m} {f['map_correlation_min'][m]:.5f} / {f['map_correlation_median'][m]:.5f}" for m in MAPS
                )
            )


if __name__ == "__main__":
    main()
