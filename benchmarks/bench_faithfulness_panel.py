"""Server time of the Explore tab's faithfulness panel, measured in one run (not a test).

    python benchmarks/bench_faithfulness_panel.py [--model PATH] [--image PATH] [--repeats 7] [--threads N]

Times `FaithfulnessPanel.compute` as the button calls it, on the app's first view of the image: the map's
deletion and insertion curves and a random map's (the eval's protocol: 38 perturbed images in batched forwards)
and the plot, with the kept results cleared before every run; then the same call with its result kept (the plot
alone). Prints medians in seconds after one warm-up run. The goal: at most 1-2 s on DeiT-Tiny on a 2-core CPU.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zoomvit.app.explorer import Explorer  # noqa: E402
from zoomvit.models import load_model  # noqa: E402

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", REPO.parent / "shared"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument("--image", default=str(REPO / "zoomvit" / "assets" / "wall_clock.jpg"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_model(args.model, device="cpu", dtype="float32")
    explorer = Explorer(bundle)
    session = explorer.explore.explain(args.image)[-1]
    panel = explorer.faithfulness

    def fresh():
        panel._results.clear()  # every run measures the map again
        panel.compute(session)

    runs = {"measured (curves + plot)": fresh, "kept (plot only)": lambda: panel.compute(session)}
    fresh()  # warm-up: first forwards pay for allocations
    for name, fn in runs.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(
            f"faithfulness panel, {name}: median {np.median(times):.3f} s "
            f"(range {min(times):.3f}-{max(times):.3f}, {args.repeats} runs, {torch.get_num_threads()} threads, "
            f"{Path(args.model).name}, view {session.shown.settings['view']})"
        )


if __name__ == "__main__":
    main()
