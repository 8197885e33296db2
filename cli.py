"""The `zoomvit` command: explain, zoom, prune, eval and serve. Thin wrappers: every computation is a library call.

With --json each command prints exactly one JSON object on stdout. A user error (unreadable image, unknown
class, bad option value) prints one line, `zoomvit: error: ...`, on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import config
import evaluation
import intent
import pruning
import visualization
import vit_analyzer
import zoom
from vit_analyzer import ZoomViTError


def _print_predictions(title, predictions, count=3):
    print(title)
    for p in predictions[:count]:
        print(f"  {p.prob:6.1%}  {p.label}  [{p.index}]")


def _save(image, path):
    try:
        image.save(path)
    except (OSError, ValueError) as exc:  # missing folder, unknown extension, ...
        raise ZoomViTError(f"Could not write {path}: {exc}") from None
    print(f"wrote {path}", file=sys.stderr)


def _analyze(args):
    """Image first (a bad file fails before the slow model load), then the model, then the analysis pass."""
    loaded = vit_analyzer.load_image(args.image)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keeps stderr to our own messages
    bundle = vit_analyzer.load_model(args.model)
    return vit_analyzer.analyze(bundle, loaded)


def cmd_explain(args):
    analysis = _analyze(args)
    bundle = analysis.bundle
    target = analysis.predicted if args.target is None else bundle.find_label(args.target)
    heat = analysis.map(args.method, args.layer, args.head, args.discard_ratio, target)
    diagnosis = intent.diagnose(analysis)  # about the prediction, whatever class the map is for
    if args.out:
        _save(visualization.overlay(analysis.loaded.image, analysis.upsample(heat)), args.out)
    target_info = vit_analyzer.Prediction(target, bundle.label(target), float(analysis.probs[target]))
    if args.json:
        return {
            "method": args.method,
            "target": target_info.as_dict(),
            "top": [p.as_dict() for p in analysis.top()],
            "grid": list(analysis.grid),
            "map": np.round(heat.astype(np.float64), 4).tolist(),  # float64: no float32 digits in the JSON
            "intent": diagnosis.as_dict(),
        }
    _print_predictions("prediction:", analysis.top())
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    print(f"{args.method} map for '{target_info.label}' on a {heat.shape[0]}x{heat.shape[1]} grid; "
          f"strongest patch: row {row}, col {col}")
    print(f"intent: {diagnosis.kind} ({diagnosis.reason})")


def cmd_zoom(args):
    analysis = _analyze(args)
    result = zoom.zoom(analysis, policy=args.policy)
    if args.out:
        working_box = [c * analysis.geometry.scale for c in result.box]
        _save(visualization.draw_box(analysis.loaded.image, working_box), args.out)
    if args.json:
        return result.as_dict()
    x0, y0, x1, y1 = result.box
    print(f"box (original pixels): ({x0:.0f}, {y0:.0f}) - ({x1:.0f}, {y1:.0f})")
    print(f"{'zoomed' if result.zoomed else 'not zoomed'}: {result.reason}")
    _print_predictions("before:", result.before)
    _print_predictions("after:", result.after)


def cmd_prune(args):
    analysis = _analyze(args)
    result = pruning.prune(analysis, args.keep, args.after_block, args.mode, args.fusion)
    if args.out:
        _save(visualization.token_mask_overlay(analysis.loaded.image, analysis.geometry, result.kept_mask), args.out)
    if args.json:
        return result.as_dict()
    print(f"{args.mode} pruning after block {result.after_block}: "
          f"{result.tokens_before} -> {result.tokens_after} tokens, "
          f"{result.macs_after / result.macs_before:.0%} of the MACs, "
          f"{result.latency_before_ms:.1f} -> {result.latency_after_ms:.1f} ms")
    print(f"decision {'kept' if result.decision_kept else 'changed'}")
    _print_predictions("before:", result.before)
    _print_predictions("after:", result.after)


def cmd_eval(args):
    keeps = evaluation.parse_keeps(args.keep)
    tasks = evaluation.parse_tasks(args.tasks)
    evaluation.read_labels(args.data, args.limit)  # a bad folder fails before the slow model load
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bundle = vit_analyzer.load_model(args.model)
    result = evaluation.evaluate(bundle, args.data, args.limit, keeps, args.after_block, tasks, progress=True)
    out = args.out or f"zoomvit-eval/{Path(args.data).resolve().name}"
    for path in evaluation.write_outputs(result, out):
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        return result.summary
    print(evaluation.markdown_report(result.summary))


def cmd_serve(args):
    import app  # only now: the web UI pulls in gradio

    app.main(["--host", args.host, "--port", str(args.port), "--model", args.model])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoomvit", description="Explain, zoom into and prune a Vision Transformer.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model", default=config.resolve_model_name(),
        help=f"hub id or local model folder (default: %(default)s, from ${config.MODEL_ENV_VAR} or built in)",
    )
    image = argparse.ArgumentParser(add_help=False, parents=[common])
    image.add_argument("image", help="image file")
    image.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")

    p = commands.add_parser("explain", parents=[image], help="importance map and intent diagnosis")
    p.add_argument("--method", choices=vit_analyzer.MAP_METHODS, default="rollout")
    p.add_argument("--layer", type=int, default=-1, help="layer for cls/attention maps (default: last)")
    p.add_argument("--head", default="mean", help="head index, or mean|max|min across heads")
    p.add_argument("--target", help="class index or label text (default: the predicted class)")
    p.add_argument("--discard-ratio", type=float, default=config.ROLLOUT_DISCARD_RATIO, help="rollout only")
    p.add_argument("--out", metavar="PNG", help="write the heatmap overlay here")
    p.set_defaults(run=cmd_explain)

    p = commands.add_parser("zoom", parents=[image], help="crop where the model looks and classify again")
    p.add_argument("--policy", choices=zoom.POLICIES, default="adaptive")
    p.add_argument("--out", metavar="PNG", help="write the image with the zoom box drawn here")
    p.set_defaults(run=cmd_zoom)

    p = commands.add_parser("prune", parents=[image], help="drop tokens after a block and compare")
    p.add_argument("--keep", type=float, default=config.PRUNE_KEEP, help="share of patch tokens kept")
    p.add_argument("--after-block", type=int, default=config.PRUNE_AFTER_BLOCK)
    p.add_argument("--mode", choices=pruning.MODES, default=config.PRUNE_MODE)
    p.add_argument("--fusion", choices=pruning.FUSIONS, default="merge", help="efficiency mode only")
    p.add_argument("--out", metavar="PNG", help="write the image with dropped patches greyed out here")
    p.set_defaults(run=cmd_prune)

    p = commands.add_parser("eval", parents=[common], help="evaluate pruning, zoom, faithfulness and intent on a folder")
    p.add_argument("--data", required=True, metavar="DIR", help="folder with images and labels.csv (file,label_index"
                   "[,x0,y0,x1,y1])")
    p.add_argument("--out", metavar="DIR", help="where results.json, per_image.csv, the plots and report.md go "
                   "(default: zoomvit-eval/<data folder name>)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--keep", default=",".join(f"{k:g}" for k in evaluation.DEFAULT_KEEPS), help="token shares to prune to (default: %(default)s)")
    p.add_argument("--after-block", type=int, default=config.PRUNE_AFTER_BLOCK)
    p.add_argument("--tasks", default=",".join(evaluation.TASKS), help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print results.json instead of the report")
    p.set_defaults(run=cmd_eval)

    p = commands.add_parser("serve", parents=[common], help="start the web app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits with status 2
    try:
        payload = args.run(args)  # a dict with --json; None when the command printed a summary itself
    except ZoomViTError as exc:
        print(f"zoomvit: error: {exc}", file=sys.stderr)
        return 2
    if payload is not None:
        print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
