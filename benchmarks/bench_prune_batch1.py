"""Batch-1 latency of the pruned forward against the full one, next to the analytic MACs ratio (not a test).

    python benchmarks/bench_prune_batch1.py [--model PATH | --random-vit-b] [--image FILE] [--keeps 0.7 0.5 0.3]
                                            [--repeats 41] [--after-block 6] [--threads 2] [--device cpu]
                                            [--dtype float32] [--pieces KEEP]

One interleaved run (pruning.interleaved_ms: every configuration takes its turn in each round, so a noisy
neighbour on a shared CPU slows them alike) of the full forward and, at each keep, both modes as `prune` times
them: efficiency (own scores, merge: the selection runs inside the timed call) and analysis (scores from the
analysis pass, given; plain top-k). Prints each median and range in milliseconds, the latency ratio (pruned
median / full median), the MACs ratio, their difference and whether it is within --margin, and the machine
load before and after the run. --random-vit-b times a randomly initialised ViT-B/16-shaped model instead (the one
bench_engine.py uses: twelve times DeiT-Tiny's MACs, so what does not scale with the model weighs far less).

--pieces KEEP times, instead, where the pruned forward's time goes at that keep (one interleaved run): the blocks
before the cut without and with efficiency mode's scoring rows, the blocks after it on every token and on the kept
ones, the selection and merge, and the blocks after the cut on 2 tokens (what a block costs that does not scale
with tokens: at batch 1 its weights are read whatever the token count, and each of its small operations has a
fixed cost). It ends with what the pieces add up to: the latency ratio of the blocks alone (blocks after the cut
on the kept tokens, no selection) against their MACs ratio, the floor that no cheaper selection can go below, and
what efficiency mode's scoring rows and selection add to it.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoomvit import (
    config,  # noqa: E402
    pruning,  # noqa: E402
)
from zoomvit.models import load_model  # noqa: E402
from zoomvit.vit_analyzer import analyze  # noqa: E402

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))


def configurations(bundle, analysis, keeps, after_block):
    """(label, mode, keep, fusion, call) for the full forward and each pruned one, in the order they are timed."""
    x = analysis.pixel_values
    runs = [("full", None, 1.0, "drop", lambda: pruning.forward_pruned(bundle, x, after_block, 1.0))]
    for keep in keeps:
        scores = pruning.analysis_scores(analysis, after_block, keep)
        runs.append(
            (
                "efficiency/merge",
                "efficiency",
                keep,
                "merge",
                lambda keep=keep: pruning.forward_pruned(bundle, x, after_block, keep, None, "merge"),
            )
        )
        runs.append(
            (
                "analysis/drop",
                "analysis",
                keep,
                "drop",
                lambda keep=keep, scores=scores: pruning.forward_pruned(bundle, x, after_block, keep, scores),
            )
        )
    return runs


def pieces(bundle, analysis, keep, after_block):
    """(name, call) of the parts of a pruned forward, for --pieces, and the token counts before and after the cut."""
    x = analysis.pixel_values
    adapter = bundle.adapter
    cut = pruning.run_to_cut(bundle, x, after_block, with_scores=True)
    ns = bundle.num_special
    n_keep = pruning.kept_count(cut.x.shape[1] - ns, keep)
    kept = cut.x[:, : ns + n_keep].clone()
    two = cut.x[:, :2].clone()

    @torch.inference_mode()
    def blocks_after(tokens):
        for i in range(after_block, bundle.num_layers):
            tokens, _ = adapter.block(i, tokens)

    @torch.inference_mode()
    def select_and_merge():
        patches = cut.x[:, ns:]
        keep_idx, drop_idx, partner = pruning.select_with_coverage(cut.scores, patches, n_keep)
        pruning.merge_into_kept(patches, None, keep_idx, drop_idx, partner)

    return (
        cut.x.shape[1],
        kept.shape[1],
        [
            (f"blocks 1-{after_block}", lambda: pruning.run_to_cut(bundle, x, after_block, with_scores=False)),
            (
                f"blocks 1-{after_block} + scoring rows",
                lambda: pruning.run_to_cut(bundle, x, after_block, with_scores=True),
            ),
            (f"blocks {after_block + 1}-{bundle.num_layers}, {cut.x.shape[1]} tokens", lambda: blocks_after(cut.x)),
            (f"blocks {after_block + 1}-{bundle.num_layers}, {kept.shape[1]} tokens", lambda: blocks_after(kept)),
            ("selection + merge", select_and_merge),
            (f"blocks {after_block + 1}-{bundle.num_layers}, 2 tokens", lambda: blocks_after(two)),
        ],
    )


def floor_text(bundle, tokens, kept_tokens, after_block, medians) -> str:
    """The blocks-only latency ratio against the blocks' MACs ratio, and what efficiency mode's extras add, from the
    medians of `pieces` (in its order)."""
    before, scored, after_all, after_kept, selection, _ = medians
    later = bundle.num_layers - after_block
    per_block, per_kept_block = pruning.block_macs(bundle, tokens), pruning.block_macs(bundle, kept_tokens)
    macs = (after_block * per_block + later * per_kept_block) / (bundle.num_layers * per_block)
    full = before + after_all
    latency = (before + after_kept) / full
    extras = (scored - before + selection) / full
    return (
        f"\nblocks alone, {kept_tokens} of {tokens} tokens after the cut: latency ratio {latency:.3f}, MACs ratio "
        f"{macs:.3f}, {latency - macs:+.3f} before any selection; efficiency mode's scoring rows and selection add "
        f"{extras:+.3f}"
    )


def load_text() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1, 5, 15 min)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    which.add_argument("--random-vit-b", action="store_true", help="a random ViT-B/16-shaped model instead of --model")
    parser.add_argument("--image", default=str(SHARED / "data" / "imagenet-sample" / "n01440764_tench.JPEG"))
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    parser.add_argument("--after-block", type=int, default=config.PRUNE_AFTER_BLOCK)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s, this CPU's cores)")
    parser.add_argument("--margin", type=float, default=0.10, help="allowed latency ratio above the MACs ratio")
    parser.add_argument("--device", default="cpu", help=f"{config.DEVICE_HELP} (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help=f"{config.DTYPE_HELP} (default: %(default)s)")
    parser.add_argument("--pieces", type=float, metavar="KEEP", help="time the parts of the pruned forward instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.random_vit_b:
        from bench_engine import vit_b_shaped

        bundle = vit_b_shaped(args.device, args.dtype)
    else:
        bundle = load_model(args.model, args.device, args.dtype)
    analysis = analyze(bundle, args.image, keep_graph=False)
    if args.pieces is not None:
        tokens, kept_tokens, parts = pieces(bundle, analysis, args.pieces, args.after_block)
        times = pruning.interleaved_ms([call for _, call in parts], args.repeats, bundle.device)
        print(
            f"{bundle.name}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, "
            f"keep {args.pieces}, {args.repeats} interleaved rounds; {load_text()}"
        )
        for (name, _), ms in zip(parts, times):
            print(f"{name:<36} {np.median(ms):7.2f} ms  ({min(ms):.2f}-{max(ms):.2f})")
        print(floor_text(bundle, tokens, kept_tokens, args.after_block, [float(np.median(ms)) for ms in times]))
        return
    runs = configurations(bundle, analysis, args.keeps, args.after_block)
    num_tokens = analysis.attentions.shape[-1]
    print(
        f"{bundle.name} on {bundle.device} in {bundle.dtype_name}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch 1, cut after block {args.after_block}, "
        f"{args.repeats} interleaved rounds"
    )
    print(f"before: {load_text()}")
    times = pruning.interleaved_ms([run[-1] for run in runs], args.repeats, bundle.device)
    print(f"after:  {load_text()}")
    full = float(np.median(times[0]))
    print(
        f"\n{'configuration':<17} {'keep':>4} {'tokens':>7} {'median ms':>9} {'range ms':>13} {'latency':>7} "
        f"{'MACs':>6} {'diff':>6}  within +{args.margin:.2f}"
    )
    for (label, mode, keep, fusion, _), ms in zip(runs, times):
        median = float(np.median(ms))
        spread = f"{min(ms):.2f}-{max(ms):.2f}"
        if mode is None:
            print(f"{label:<17} {keep:>4} {num_tokens:>7} {median:>9.2f} {spread:>13}")
            continue
        _, after, macs_full, macs_pruned = pruning.pruned_macs(bundle, num_tokens, keep, args.after_block, mode, fusion)
        latency, macs = median / full, macs_pruned / macs_full
        verdict = "yes" if latency <= macs + args.margin else "NO"
        print(
            f"{label:<17} {keep:>4} {after:>7} {median:>9.2f} {spread:>13} {latency:>7.3f} {macs:>6.3f} "
            f"{latency - macs:>+6.3f}  {verdict}"
        )


if __name__ == "__main__":
    main()
