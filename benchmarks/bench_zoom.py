"""The zoom's own time, confident policy against the adaptive one (the earlier default), in one run.

    python benchmarks/bench_zoom.py [--model ../shared/models/deit-tiny-patch16-224] [--images 20] [--rounds 5]

Each image is analysed once; then both policies zoom it in turns, `rounds` times each (the analysis pass is not
timed: the app has it cached when the zoom is asked for). Prints each policy's median time per image, the ratio
of the medians (goal: at most 2), and the forward units each spends.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoomvit import zoom  # noqa: E402
from zoomvit.models import load_model  # noqa: E402
from zoomvit.vit_analyzer import analyze  # noqa: E402

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument("--data", default=str(SHARED / "data" / "zoom-bench"))
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model(args.model, "cpu", "float32")
    with open(Path(args.data) / "labels.csv", newline="") as f:
        files = [Path(args.data) / row["file"] for row in csv.DictReader(f)][: args.images]
    policies = ("adaptive", "confident")
    times = {p: [] for p in policies}
    units = {p: [] for p in policies}
    for file in files:
        analysis = analyze(bundle, file, keep_graph=False)
        zoom.zoom(analysis, "confident")  # warm: the maps' caches, as in the app after the first view
        per_image = {p: [] for p in policies}
        for _ in range(args.rounds):
            for policy in policies:  # interleaved: both see the same machine state
                started = time.perf_counter()
                result = zoom.zoom(analysis, policy)
                per_image[policy].append(time.perf_counter() - started)
                if len(per_image[policy]) == 1:
                    units[policy].append(result.forward_units)
        for policy in policies:
            times[policy].append(float(np.median(per_image[policy])))
    medians = {p: 1000 * float(np.median(times[p])) for p in policies}
    for policy in policies:
        spread = 1000 * np.percentile(times[policy], [10, 90])
        print(
            f"{policy}: median {medians[policy]:.0f} ms per image (10-90%: {spread[0]:.0f}-{spread[1]:.0f} ms), "
            f"{np.mean(units[policy]):.2f} forward units"
        )
    print(
        f"confident / adaptive: {medians['confident'] / medians['adaptive']:.2f}x ({len(files)} images, "
        f"{args.rounds} interleaved rounds, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
