"""`zoomvit eval` before and after, in one run on one machine (a benchmark, not a test).

    python benchmarks/eval_speed.py [--limit 48] [--rounds 2] [--base 51068f0] [--procs 2] [--data DIR] [--model PATH]

Runs the same evaluation (all tasks, the first --limit images) three ways, --rounds times in alternating order
(mean times):
  before   the eval command of git revision --base (default: the last commit before evaluation at scale),
           checked out into a temporary worktree, one process;
  after    this checkout, one process;
  after xN this checkout under `torchrun --nproc-per-node N` (one thread per process).
Then, in this process: pass 1 of the first 16 images with every plain forward timed, between two measurements of
the plain forward's throughput at batch 16 (`forward_share`).

Prints each run's wall time, pass-1 seconds per image and the pruning pass's seconds, the ratios against
`before`, the time extrapolated to --scale images (fixed costs + per-image costs; pass 1 and the pruning pass
grow linearly), the largest change of any reported figure against `before` (in points: percentages and AUC x 100),
and how close one process gets to the cost of its forwards.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", ROOT.parent / "shared"))


def run_eval(code: Path, out: Path, args, procs: int = 1) -> dict:
    command = [
        sys.executable,
        "-m",
        "zoomvit",
        "eval",
        "--data",
        str(args.data),
        "--model",
        str(args.model),
        "--out",
        str(out),
        "--limit",
        str(args.limit),
    ]
    if procs > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            "-m",
            *command[2:],
        ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    start = time.perf_counter()
    subprocess.run(command, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    return {"wall": wall, "results": results}


def mean_run(runs: list) -> dict:
    """The rounds of one way of running: mean wall and speed figures, the first round's results otherwise (the
    figures are the same in every round)."""
    speed = {
        k: float(np.mean([r["results"]["speed"].get(k, np.nan) for r in runs])) for k in runs[0]["results"]["speed"]
    }
    return {"wall": float(np.mean([r["wall"] for r in runs])), "results": {**runs[0]["results"], "speed": speed}}


def figures(results: dict) -> dict:
    """Every reported figure, in points (percentages and AUC x 100), keyed by name."""
    out = {"top1": 100 * results["top1"]}
    for entry in results.get("prune", []):
        key = f"prune {entry['mode']} {entry['criterion']} {entry['keep']}"
        out[key + " top1"] = 100 * entry["top1"]
        out[key + " agreement"] = 100 * entry["agreement"]
    zoom = results.get("zoom") or {}
    for k in ("top1_before", "top1_after", "top1_crop", "zoomed_fraction", "pointing_game", "box_iou"):
        if zoom.get(k) is not None:
            out[f"zoom {k}"] = 100 * zoom[k]
    for entry in results.get("faithfulness", []):
        out[f"deletion {entry['method']}"] = 100 * entry["deletion_auc"]
        out[f"insertion {entry['method']}"] = 100 * entry["insertion_auc"]
    for kind, group in (results.get("intent") or {}).items():
        out[f"intent {kind} n"] = group["n"]
        for second_look in ("prune_analysis", "prune_efficiency", "zoom"):
            if second_look in group:
                for k in ("top1", "agreement", "confidence_change"):
                    if group[second_look][k] is not None:
                        out[f"intent {kind} {second_look} {k}"] = 100 * group[second_look][k]
    return out


def forward_throughput(bundle, batch: int = 16, rounds: int = 7) -> float:
    """Images per second of the plain model forward (`predict_pixels`) at `batch`, median of `rounds`."""
    from zoomvit.vit_analyzer import predict_pixels

    x = torch.randn(batch, 3, *bundle.input_size)
    predict_pixels(bundle, x)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        predict_pixels(bundle, x)
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times))


def forward_share(args, images: int = 16) -> dict:
    """In this process: `evaluate` (all tasks) on the first `images` images with every plain forward of pass 1
    (perturbations and zoom crops) timed, bracketed by the plain forward's throughput at batch 16 just before and
    after. Says how much of pass 1 is the forwards themselves, at the same moment on the same machine."""
    from zoomvit import faithfulness, zoom
    from zoomvit.evaluation import runner as evaluation
    from zoomvit.models import load_model
    from zoomvit.vit_analyzer import predict_pixels

    bundle = load_model(str(args.model), device="cpu")
    spent = {"seconds": 0.0, "images": 0}

    def timed_predict(b, pixels):
        start = time.perf_counter()
        out = predict_pixels(b, pixels)
        spent["seconds"] += time.perf_counter() - start
        spent["images"] += len(pixels)
        return out

    before = forward_throughput(bundle)
    faithfulness.predict_pixels, zoom.predict_pixels = timed_predict, timed_predict
    try:
        result = evaluation.evaluate(bundle, args.data, limit=images, progress=False, workers=0)
    finally:
        faithfulness.predict_pixels = zoom.predict_pixels = predict_pixels
    after = forward_throughput(bundle)
    pass_one = result.summary["speed"]["images_seconds"]
    return {
        "pass_one_s_per_image": pass_one / images,
        "forward_s_per_image": spent["seconds"] / images,
        "forwards_per_image": spent["images"] / images,
        "plain_ips": (before + after) / 2,
        "plain_ips_range": (before, after),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "data" / "imagenet-sample"))
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--base", default="51068f0", help="the 'before' git revision (default: %(default)s)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="each way is run this many times, in alternating order (default: %(default)s)",
    )
    parser.add_argument("--share-only", action="store_true", help="only the forward share (no eval runs)")
    parser.add_argument("--scale", type=int, default=500, help="extrapolate the times to this many images")
    args = parser.parse_args()
    args.data, args.model = Path(args.data).resolve(), Path(args.model).resolve()
    if args.share_only:
        return report_share(args)

    with tempfile.TemporaryDirectory(prefix="zoomvit-speed-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        try:
            plans = {"before": (base, 1), "after": (ROOT, 1), f"after x{args.procs}": (ROOT, args.procs)}
            runs = {name: [] for name in plans}
            for round_ in range(args.rounds):  # ABC CBA ...: a machine getting faster or slower favours none
                order = list(plans) if round_ % 2 == 0 else list(reversed(plans))
                for name in order:
                    code, procs = plans[name]
                    out = tmp / f"{name.replace(' ', '_')}_{round_}"
                    runs[name].append(run_eval(code, out, args, procs))
                    print(f"round {round_ + 1}: {name} {runs[name][-1]['wall']:.1f} s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    runs = {name: mean_run(name_runs) for name, name_runs in runs.items()}

    n = args.limit
    reference = figures(runs["before"]["results"])
    print(f"{n} images of {args.data.name}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"{'run':<10} {'wall s':>8} {'pass-1 s/img':>13} {'pruning s':>10} {'ratio':>7} "
        f"{f'{args.scale} images, min':>18} {'max figure change':>18}"
    )
    extrapolated = {}
    for name, run in runs.items():
        speed = run["results"]["speed"]
        per_image = speed["images_seconds"] / n
        # The 'before' revision does not report it: its timing of the pruning is the same code on the same batch.
        latency = speed.get("latency_seconds", runs["after"]["results"]["speed"]["latency_seconds"])
        pruning = speed["total_seconds"] - speed["images_seconds"]
        # Fixed: start-up, model load, timing the pruning on one batch, writing outputs.
        fixed = run["wall"] - speed["total_seconds"] + latency
        extrapolated[name] = (fixed + args.scale * per_image + (pruning - latency) * args.scale / n) / 60
        change = max(abs(v - reference[k]) for k, v in figures(run["results"]).items())
        print(
            f"{name:<10} {run['wall']:8.1f} {per_image:13.2f} {pruning:10.1f} "
            f"{runs['before']['wall'] / run['wall']:7.2f} {extrapolated[name]:18.1f} {change:18.3f}"
        )
    for name in list(runs)[1:]:
        print(
            f"{name} against before, extrapolated to {args.scale} images: "
            f"{extrapolated['before'] / extrapolated[name]:.2f}x"
        )
    report_share(args)


def report_share(args):
    share = forward_share(args)
    ips, pass_one, forwards = share["plain_ips"], share["pass_one_s_per_image"], share["forward_s_per_image"]
    print(
        f"one process, {torch.get_num_threads()} threads, first 16 images: pass 1 takes "
        f"{pass_one:.2f} s per image ({1 / pass_one:.3f} images/s), of which {forwards:.2f} s "
        f"({forwards / pass_one:.0%}) are its {share['forwards_per_image']:.0f} plain forwards per image "
        f"(perturbations, zoom crops); the plain "
        f"forward alone runs {ips:.1f} images/s at batch 16 ({share['plain_ips_range'][0]:.1f} before, "
        f"{share['plain_ips_range'][1]:.1f} after), so those forwards would take "
        f"{share['forwards_per_image'] / ips:.2f} s per image by themselves"
    )


if __name__ == "__main__":
    main()
