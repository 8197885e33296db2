"""Server time per view change in the web app, measured in one run (not a test).

    python benchmarks/bench_views.py [--model PATH] [--image PATH] [--repeats 15] [--threads 1]
                                     [--blas-threads one|default]

A view change (view, layer, head, discard ratio, opacity, colormap, click on a patch) re-renders from the
session's cached analysis: the map, its upsampling and the overlay (plus the all-heads grid the app draws with
it), without a model run. This times `views.ViewRenderer.render` exactly as the handlers call it, and separately the
JPEG encoding Gradio does on the returned images. Prints medians in milliseconds for a randomly initialised
ViT-B-shaped model (hidden 768, 12 layers, 12 heads, 224 px, patch 16, eager attention) and for the given model.
The goal is 30 ms per view change on ViT-B-shaped outputs. numpy's OpenBLAS runs on one thread, as in the
app (`serving.one_blas_thread`); --blas-threads default shows what its thread-per-core default costs.
"""

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dataclasses  # noqa: E402

from bench_engine import vit_b_shaped  # noqa: E402

from zoomvit.app import serving  # noqa: E402
from zoomvit.app.explorer import Explorer  # noqa: E402
from zoomvit.app.sessions import DISPLAY_SIDE  # noqa: E402
from zoomvit.app.views import ViewSettings  # noqa: E402
from zoomvit.models import load_model  # noqa: E402

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", REPO.parent / "shared"))

# The controls start at ViewSettings' defaults; each change below sets some of them; `patch` means a clicked patch.


def changes(bundle):
    """Each change sets controls to the next of its values on every repeat, as a user flipping them would."""
    mid = bundle.num_layers // 2
    return [
        ("view: rollout", dict(view=["rollout"])),
        ("view: gradient-weighted", dict(view=["grad_rollout"])),
        ("view: intent", dict(view=["intent"])),
        ("view: CLS attention", dict(view=["cls"])),
        ("view: attention", dict(view=["attention"])),
        ("block (CLS view; heads grid redrawn)", dict(view=["cls"], block=[mid, mid - 1])),
        ("head (CLS view)", dict(view=["cls"], head=["1", "2"])),
        ("opacity (heads grid redrawn)", dict(opacity=[0.7, 0.6])),
        ("colormap (heads grid redrawn)", dict(colormap=["viridis", "magma"])),
        ("discard ratio (rollout recomputed)", dict(discard_ratio="new")),
        ("click a patch: what it attends to", dict(patch=True)),
        ("click a patch: what attends to it", dict(patch=True, direction=["attended_by"])),
    ]


def encode_ms(image: Image.Image) -> float:
    """What Gradio does with a returned PIL image for a format='jpeg' output."""
    start = time.perf_counter()
    image.save(io.BytesIO(), "jpeg")
    return (time.perf_counter() - start) * 1000


def bench(bundle, image_path, repeats):
    explorer = Explorer(bundle)
    session = explorer.store.session_for(image_path, None)
    print(
        f"\n== {bundle.name}: {session.analysis.loaded.image.size} image, drawn at {session.display.size}, "
        f"{bundle.num_layers} layers x {bundle.num_heads} heads, {session.analysis.grid} grid =="
    )
    gh, gw = session.analysis.grid
    discard_values = iter(np.linspace(0.5, 0.95, 10_000))  # every value new: the rollout is recomputed
    rows = []
    for name, change in changes(bundle):
        render_times, encode_times = [], []
        for i in range(repeats + 1):
            controls = {
                control: values[i % len(values)] for control, values in change.items() if isinstance(values, list)
            }
            if change.get("discard_ratio") == "new":
                controls["discard_ratio"] = float(next(discard_values))
            session.patch = ((i * 5) % gh, (i * 3) % gw) if change.get("patch") else None
            start = time.perf_counter()
            # skip_same_grid as in the app's UI events: an unchanged all-heads grid is not redrawn or sent.
            settings = dataclasses.replace(ViewSettings(), **controls)
            overlay, _, grid = explorer.views.render(session, settings, skip_same_grid=True)
            elapsed = (time.perf_counter() - start) * 1000
            if i:  # the first run fills the per-analysis caches (rollout, gradient maps): not a view change
                render_times.append(elapsed)
                encode_times.append(encode_ms(overlay) + (encode_ms(grid) if isinstance(grid, Image.Image) else 0))
        rows.append((name, float(np.median(render_times)), float(np.median(encode_times))))
    width = max(len(r[0]) for r in rows)
    print(f"{'view change':<{width}}  render ms  +JPEG ms  total ms")
    for name, render, encode in rows:
        print(f"{name:<{width}}  {render:9.1f}  {encode:8.1f}  {render + encode:8.1f}")
    worst = max(r[1] for r in rows)
    totals = [r[1] + r[2] for r in rows]
    print(
        f"median of medians: render {np.median([r[1] for r in rows]):.1f} ms, worst {worst:.1f} ms; "
        f"with encoding {np.median(totals):.1f} ms, worst {max(totals):.1f} ms"
    )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument("--image", default=str(SHARED / "data" / "imagenet-sample" / "n01440764_tench.JPEG"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the maps themselves are numpy)")
    parser.add_argument("--skip-vit-b", action="store_true")
    parser.add_argument(
        "--blas-threads",
        choices=["one", "default"],
        default="one",
        help="numpy's OpenBLAS on one thread, as app.main() sets it (default), or left as is",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.blas_threads == "one":
        serving.one_blas_thread()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), numpy BLAS threads: {args.blas_threads}, "
        f"display side {DISPLAY_SIDE} px"
    )
    if not args.skip_vit_b:
        bench(vit_b_shaped(), args.image, args.repeats)
    bench(load_model(args.model), args.image, args.repeats)


if __name__ == "__main__":
    main()
