"""`zoomvit explain`, `zoomvit zoom` and `zoomvit prune`: one image, one analysis, one result (and its picture)."""

from __future__ import annotations

import argparse

from zoomvit import checks, config
from zoomvit.cli.common import (
    UsageError,
    analyze_image,
    model_json,
    note_ignored,
    print_predictions,
    save_image,
)

# rollout, cls and attention maps come from the forward attentions alone: the same whatever the class.
CLASS_AGNOSTIC = tuple(method for method, reads in config.MAP_READS.items() if "target" not in reads)
# The explain options each map reads (config.MAP_READS); one given to a map that does not read it is noted.
MAP_OPTIONS = {
    method: tuple("--" + name.replace("_", "-") for name in reads) for method, reads in config.MAP_READS.items()
}
PRUNE_FUSION = config.PRUNE_FUSION  # --fusion's default, for efficiency mode (the app's too)


def _where(analysis, heat) -> str:
    """Where the map's mass lies: its top-ZOOM_MASS patches and their largest connected part (the region the
    zoom uses), with that part's box in original image pixels."""
    import numpy as np

    from zoomvit import intent, zoom
    from zoomvit.maps import top_mass_patches

    selected = top_mass_patches(heat)
    rows, cols = np.nonzero(zoom.mass_region(heat))
    geo = analysis.geometry
    x0, y0, _, _ = geo.patch_box(rows.min(), cols.min())
    _, _, x1, y1 = geo.patch_box(rows.max(), cols.max())
    vx0, vy0, vx1, vy1 = geo.view_box()
    box = geo.to_original((max(x0, vx0), max(y0, vy0), min(x1, vx1), min(y1, vy1)))
    return (
        f"{config.ZOOM_MASS:.0%} of its mass lies in {int(selected.sum())} of {selected.size} patches; their largest "
        f"connected part, at ({box[0]:.0f}, {box[1]:.0f}) - ({box[2]:.0f}, {box[3]:.0f}) in image pixels, "
        f"holds {intent.focus_share(heat):.0%} of that"
    )


def cmd_explain(args):
    discard_ratio = config.ROLLOUT_DISCARD_RATIO if args.discard_ratio is None else args.discard_ratio
    if not 0.0 <= discard_ratio <= config.MAX_DISCARD_RATIO:  # the app's slider's range
        raise UsageError(f"--discard-ratio must be from 0 to {config.MAX_DISCARD_RATIO}, got {discard_ratio:g}.")
    given = {"--block": args.block, "--head": args.head, "--discard-ratio": args.discard_ratio, "--target": args.target}
    reads = MAP_OPTIONS[args.method]

    def check(num_layers, num_heads, id2label):
        from zoomvit import models

        target = None if args.target is None else models.match_label(id2label, args.target)
        block = -1 if args.block is None else args.block  # the last by default
        head = checks.head_index("mean" if args.head is None else args.head, num_heads, "--head")
        return checks.layer_index(block, num_layers, "--block"), head, target

    analysis, (layer, head, target) = analyze_image(args, check)
    import numpy as np

    from zoomvit import intent, visualization
    from zoomvit.vit_analyzer import Prediction

    bundle = analysis.bundle
    target = analysis.predicted if target is None else target
    heat = analysis.map(args.method, layer, head, discard_ratio, target)
    diagnosis = intent.diagnose(analysis)  # about the prediction, whatever class the map is for
    target_info = Prediction(target, bundle.label(target), float(analysis.probs[target]))
    title = _map_title(args, target_info.label)
    summary = f"{title} on a {heat.shape[0]}x{heat.shape[1]} grid: {_where(analysis, heat)}."
    caption = f"{summary} Intent: {diagnosis.kind}. {_top_line(analysis.top())}"
    if args.out:
        _picture(visualization.overlay(analysis.loaded.image, analysis.upsample(heat)), caption, args.out)
    _sheets(args, analysis, layer, head, discard_ratio, caption)
    ignored = [name for name, value in given.items() if value is not None and name not in reads]
    agnostic = " (class-agnostic: the same for every class)" if "--target" in ignored else ""
    note_ignored(ignored, f"{args.method} maps{agnostic}")  # only now: an error is the only line when there is one
    if args.json:
        return {  # every setting the map was made with; null where the method does not read it
            "method": args.method,
            "block": layer + 1 if "--block" in reads else None,
            "head": (head if isinstance(head, str) else head + 1) if "--head" in reads else None,
            "discard_ratio": discard_ratio if "--discard-ratio" in reads else None,
            "target": target_info.as_dict(),
            "top": [p.as_dict() for p in analysis.top()],
            "grid": list(analysis.grid),
            "map": np.round(heat.astype(np.float64), 4).tolist(),  # float64: no float32 digits in the JSON
            "intent": diagnosis.as_dict(),
            "model": model_json(bundle),
        }
    print(f"model: {bundle.name} ({bundle.adapter.describe()}) on {bundle.device} in {bundle.dtype_name}")
    print_predictions("prediction:", analysis.top())
    print(summary)
    print(f"intent: {diagnosis.kind} ({diagnosis.reason})")


def _map_title(args, target_label: str) -> str:
    if args.method in CLASS_AGNOSTIC:
        # The strongest spot of such a map is often a background artifact; it does not explain any one class.
        unchanged = ", so --target does not change it" if args.target is not None else ""
        return f"{args.method} map (class-agnostic: the same for every class{unchanged})"
    return f"{args.method} map for class '{target_label}'"


def _top_line(predictions) -> str:
    return "Top: " + ", ".join(f"{p.label} {p.prob:.1%}" for p in predictions[:3]) + "."


def _picture(image, caption: str, path, cmap: str | None = "jet"):
    """A picture as the app exports it: with its colour bar (for maps) and a caption saying what it shows."""
    from zoomvit import visualization

    save_image(visualization.figure_with_legend(image, cmap, caption), path)


def _sheets(args, analysis, layer: int, head, discard_ratio: float, caption: str):
    """--compare, --strip and --heads: the Compare tab's sheets (compare.py), with the same caption."""
    from zoomvit import compare

    if args.compare:
        sheet = compare.map_tiles(analysis, block=layer, head=head, discard_ratio=discard_ratio, selected=args.method)
        _picture(sheet.image, f"Every map. {_top_line(analysis.top())}", args.compare)
    if args.strip:
        sheet = compare.block_strip(analysis, args.method, head=head, discard_ratio=discard_ratio, selected=layer)
        _picture(sheet.image, f"The {args.method} map over the blocks. {caption}", args.strip)
    if args.heads:
        sheet = compare.heads_grid(analysis, block=layer)
        _picture(
            sheet.image,
            f"What the class token reads in each head of block {layer % analysis.attentions.shape[0] + 1}."
            f" {_top_line(analysis.top())}",
            args.heads,
        )


def cmd_zoom(args):
    analysis, _ = analyze_image(args)
    from zoomvit import visualization, zoom

    result = zoom.zoom(analysis, policy=args.policy)
    candidates = ", ".join(f"{c.source} {c.confidence:.2f}" for c in result.candidates)
    if args.out:
        working = lambda box: [c * analysis.geometry.scale for c in box]
        x0, y0, x1, y1 = result.box
        caption = (
            f"{'Zoomed in' if result.zoomed else 'Kept the whole image'}: {result.reason}. Box ({x0:.0f}, "
            f"{y0:.0f}) - ({x1:.0f}, {y1:.0f}) in image pixels, from the {result.source} map (red; candidates, white: "
            f"{candidates}). Before: {_top_line(result.before)} After: {_top_line(result.after)}"
        )
        picture = visualization.draw_zoom_boxes(analysis.loaded.image, result, working)
        _picture(picture, caption, args.out, cmap=None)
    if args.json:
        return {**result.as_dict(), "model": model_json(analysis.bundle)}
    x0, y0, x1, y1 = result.box
    print(f"box (original pixels): ({x0:.0f}, {y0:.0f}) - ({x1:.0f}, {y1:.0f}), from the {result.source} map")
    print(f"{'zoomed' if result.zoomed else 'not zoomed'}: {result.reason}")
    print(f"candidates (each crop's top probability): {candidates}")
    whole, crop = result.before[0], result.crop_top
    print(f"whole image: {whole.label} {whole.prob:.2f}; crop: {crop.label} {crop.prob:.2f}")
    print(f"cost: {result.forward_units:.2f} forward units (analysis pass included), {1000 * result.seconds:.0f} ms")
    print_predictions("before:", result.before)
    print_predictions("after:", result.after)


def cmd_prune(args):
    checks.check_keep(args.keep, "--keep")
    fusion = args.fusion or PRUNE_FUSION
    analysis, _ = analyze_image(
        args, lambda num_layers, *_: checks.check_after_block(args.after_block, num_layers, "--after-block")
    )
    from zoomvit import pruning, visualization
    from zoomvit.vit_analyzer import decision_change

    result = pruning.prune(analysis, args.keep, args.after_block, args.mode, fusion)
    if args.out:
        caption = (
            f"Tokens kept ({result.tokens_after} of {result.tokens_before}) by {args.mode} pruning after block "
            f"{result.after_block}{f' ({result.fusion})' if result.fusion else ''}. Before: "
            f"{_top_line(result.before)} After: {_top_line(result.after)}"
        )
        _picture(
            visualization.token_mask_overlay(analysis.loaded.image, analysis.geometry, result.kept_mask),
            caption,
            args.out,
            cmap=None,
        )
    if args.mode != "efficiency":  # analysis mode keeps its top-ranked tokens and drops the rest
        note_ignored(["--fusion"] if args.fusion is not None else [], f"--mode {args.mode}")
    if args.json:
        return {**result.as_dict(), "model": model_json(analysis.bundle)}
    print(
        f"{args.mode} pruning after block {result.after_block}"
        f"{f' ({result.fusion})' if result.fusion else ''}: {result.tokens_before} -> {result.tokens_after} tokens, "
        f"{result.macs_after / result.macs_before:.0%} of the MACs"
    )
    print(
        f"time: {result.latency_text('before')} -> {result.latency_text('after')}, median (range) of "
        f"{len(result.latency_before_runs)} interleaved runs each; {result.latency_verdict()}"
    )
    change = decision_change(result.before[0], result.after[0])  # the app's caption says it the same way
    print(f"decision {'kept' if result.decision_kept else 'changed'}: {change}")
    print_predictions("before:", result.before)
    print_predictions("after:", result.after)


def add_parsers(commands, common) -> None:
    """explain, zoom and prune, each with the `common` options (model, device, dtype)."""
    image = argparse.ArgumentParser(add_help=False, parents=[common])
    image.add_argument("image", help="image file")
    image.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")

    p = commands.add_parser("explain", parents=[image], help="importance map and intent diagnosis")
    p.add_argument(
        "--method",
        choices=config.MAP_METHODS,
        default=config.DEFAULT_VIEW,
        help="the map: rollout, cls and attention come from the attentions alone (the same for every "
        "class); grad_rollout and intent explain one class; the default is the app's, the map the eval "
        "measures most faithful (default: %(default)s)",
    )
    p.add_argument("--block", type=int, help="block 1..L for cls/attention maps (default and -1: the last, L)")
    # No default value here (None): an option given to a map that does not read it is noted, and only then.
    p.add_argument(
        "--head",
        help="head 1..H (numbered as blocks are; -1: the last), or mean|max|min across heads; "
        "rollout, cls and attention maps (default: mean)",
    )
    p.add_argument(
        "--target", help="class index or label text, for grad_rollout and intent maps (default: the predicted class)"
    )
    p.add_argument(
        "--discard-ratio",
        type=float,
        help="rollout only: the share of each layer's weakest attention "
        f"weights dropped, in [0, 1) (default: {config.ROLLOUT_DISCARD_RATIO:g})",
    )
    p.add_argument("--out", metavar="PNG", help="write the heatmap overlay here, with its colour bar and a caption")
    p.add_argument("--compare", metavar="PNG", help="write every map side by side here (the app's Compare tab)")
    p.add_argument("--strip", metavar="PNG", help="write the map over all blocks here (block 1 first)")
    p.add_argument("--heads", metavar="PNG", help="write what the class token reads in each head of --block here")
    p.set_defaults(run=cmd_explain)

    p = commands.add_parser("zoom", parents=[image], help="crop where the model looks and classify again")
    p.add_argument(
        "--policy",
        choices=config.ZOOM_POLICIES,
        default=config.ZOOM_POLICY,
        help=f"{config.ZOOM_POLICY_HELP} (default: %(default)s)",
    )
    p.add_argument("--out", metavar="PNG", help="write the image with the zoom boxes drawn here (the winner red)")
    p.set_defaults(run=cmd_zoom)

    p = commands.add_parser("prune", parents=[image], help="drop tokens after a block and compare")
    p.add_argument(
        "--keep",
        type=float,
        default=config.PRUNE_KEEP,
        help="fraction of patch tokens kept, in (0, 1] (default: %(default)s)",
    )
    p.add_argument("--after-block", type=int, default=config.PRUNE_AFTER_BLOCK, help="1..L-1 (default: %(default)s)")
    p.add_argument(
        "--mode",
        choices=config.PRUNE_MODES,
        default=config.PRUNE_MODE,
        help="analysis: keep the tokens the decision relies on, seen with look-ahead (saves no time); "
        "efficiency: choose at the cut from what the model has computed so far (default: %(default)s)",
    )
    p.add_argument(
        "--fusion",
        choices=config.PRUNE_FUSIONS,
        help=f"efficiency mode only: what becomes of the tokens not kept (default: {PRUNE_FUSION})",
    )
    p.add_argument("--out", metavar="PNG", help="write the image with dropped patches greyed out here")
    p.set_defaults(run=cmd_prune)
