"""How much each figure moves when the model runs in bfloat16 instead of float32, measured in one run (not a test).

    python benchmarks/bf16_vs_fp32.py [--model PATH] [--limit 100] [--device cpu] [--threads 2]

Loads the model twice on one device, in float32 (the reference) and in bfloat16, and analyses the first --limit
dev images (../shared/data/imagenet-sample) with both. Prints: top-1 accuracy of each and how often their top-1
agrees; the change of the probability of the float32 prediction (mean and max |delta|); and the correlation of
each map (rollout, gradient rollout, intent) with float32's, min / median / mean over the images. The bfloat16
maps are computed for float32's predicted class, so that a flipped prediction does not compare two classes' maps.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare_timm_hf import MAPS, SHARED, correlation, dev_images  # noqa: E402

from zoomvit.images import load_image
from zoomvit.models import ViTBundle, load_model
from zoomvit.vit_analyzer import analyze  # noqa: E402


def compare(reference: ViTBundle, low: ViTBundle, images) -> dict:
    """Figures of `low` against `reference` over `images` [(path, label)]."""
    labels, ref_top1, low_top1, prob_delta = [], [], [], []
    corr = {m: [] for m in MAPS}
    for path, label in images:
        loaded = load_image(path)
        ref = analyze(reference, loaded, keep_graph=False)
        other = analyze(low, loaded, target=ref.predicted, keep_graph=False)
        labels.append(label)
        ref_top1.append(ref.predicted)
        low_top1.append(other.predicted)
        prob_delta.append(abs(float(other.probs[ref.predicted]) - float(ref.probs[ref.predicted])))
        for method in MAPS:
            corr[method].append(correlation(ref.map(method), other.map(method)))
    labels, ref_top1, low_top1 = np.array(labels), np.array(ref_top1), np.array(low_top1)
    return {
        "images": len(images),
        "top1_float32": float((ref_top1 == labels).mean()),
        "top1_bfloat16": float((low_top1 == labels).mean()),
        "top1_agreement": float((ref_top1 == low_top1).mean()),
        "prob_delta_mean": float(np.mean(prob_delta)),
        "prob_delta_max": float(np.max(prob_delta)),
        "map_correlation": {
            m: {"min": float(np.min(v)), "median": float(np.median(v)), "mean": float(np.mean(v))}
            for m, v in corr.items()
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument("--limit", type=int, default=100, help="first N dev images (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="where both copies run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = load_model(args.model, args.device, "float32")
    low = load_model(args.model, args.device, "bfloat16")
    f = compare(reference, low, dev_images(args.limit))
    print(f"{f['images']} dev images, {reference.name} on {reference.device}: bfloat16 against float32")
    print(
        f"top-1 accuracy: float32 {f['top1_float32']:.3f}, bfloat16 {f['top1_bfloat16']:.3f}; "
        f"top-1 agreement {f['top1_agreement']:.3f}"
    )
    print(f"|delta prob| of float32's predicted class: mean {f['prob_delta_mean']:.4f}, max {f['prob_delta_max']:.4f}")
    print(
        "map correlation with float32 (min / median / mean): "
        + ", ".join(
            f"{m} {c['min']:.4f} / {c['median']:.4f} / {c['mean']:.4f}" for m, c in f["map_correlation"].items()
        )
    )


if __name__ == "__main__":
    main()
