"""The `zoomvit` command: explain, zoom, prune, eval and serve. Thin wrappers: every computation is a library call.

With --json each command prints exactly one JSON object on stdout. A user error (unreadable image, unknown
class, bad option value) prints one line, `zoomvit: error: ...`, on stderr and exits with status 2.

Options are checked before the slow model load: ranges at once, blocks and classes against the model's
config.json. The library (torch, transformers) is imported only when a command runs, so --help is instant.
Blocks are numbered 1..L as users see them; keep is a fraction in (0, 1].
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from zoomvit import __version__, checks
from zoomvit import config
from zoomvit.training import command as train_cli
from zoomvit.errors import ZoomViTError
from zoomvit.app.model_registry import resolve_max_models  # light: the registry loads models lazily
from zoomvit.app.serving import add_serve_options, port_free  # light: the port check and the app's other serving concerns


class UsageError(ZoomViTError):
    """A bad option value, found before anything heavy is imported."""


def _model_facts(model: str):
    """(number of blocks, number of heads, id2label) from the model's config.json, without loading weights; None
    when config.json does not say (a hub id not in the cache, a timm folder): the options are then checked on the
    loaded model."""
    from zoomvit import models

    cfg = models.read_model_config(model)  # also refuses a broken folder or an unsupported model now
    facts = cfg and (cfg.get("num_hidden_layers"), cfg.get("num_attention_heads"), cfg.get("id2label"))
    return (int(facts[0]), int(facts[1]), facts[2]) if facts and all(facts) else None


def _placement(args):
    """(device, dtype) from --device and --dtype (or their environment variables), checked before anything slow."""
    from zoomvit import models

    device = models.resolve_device(args.device)
    return device, models.resolve_dtype(args.dtype, device)


def _load_model(model: str, placement):
    from transformers.utils import logging as hf_logging

    from zoomvit import models

    hf_logging.disable_progress_bar()  # keeps stderr to our own messages
    return models.load_model(model, *placement)


def _analyze(args, check=None):
    """Image first, then the options against config.json, then the model, then the analysis pass: each
    mistake is reported before the slow step after it. `check(num_layers, num_heads, id2label)` validates the
    command's options and returns what they resolve to (on the loaded model when config.json was not at hand)."""
    from zoomvit import images
    from zoomvit.vit_analyzer import analyze

    placement = _placement(args)
    loaded = images.load_image(args.image)
    facts = _model_facts(args.model)
    resolved = check(*facts) if check and facts else None
    bundle = _load_model(args.model, placement)
    if check and not facts:
        resolved = check(bundle.num_layers, bundle.num_heads, bundle.id2label)
    return analyze(bundle, loaded), resolved


def _print_predictions(title, predictions, count=3):
    print(title)
    for p in predictions[:count]:
        print(f"  {p.prob:6.1%}  {p.label}  [{p.index}]")


def _save(image, path):
    try:
        image.save(path)
    except (OSError, ValueError) as exc:  # missing folder, unknown extension, ...
        raise UsageError(f"Could not write {path}: {exc}") from None
    print(f"wrote {path}", file=sys.stderr)


# rollout, cls and attention maps come from the forward attentions alone: the same whatever the class.
CLASS_AGNOSTIC = ("rollout", "cls", "attention")
# The explain options each map reads (vit_analyzer.Analysis.map); one given to a map that does not read it is noted.
MAP_OPTIONS = {
    "rollout": ("--head", "--discard-ratio"),
    "grad_rollout": ("--target",),
    "intent": ("--target",),
    "cls": ("--block", "--head"),
    "attention": ("--block", "--head"),
}
PRUNE_FUSION = config.PRUNE_FUSION  # --fusion's default, for efficiency mode (the app's too)


def _note_ignored(options, where: str) -> None:
    """One line on stderr naming the options given that `where` does not read: the command still runs."""
    if options:
        listed = " and ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)
        print(f"zoomvit: note: {listed} {'does' if len(options) == 1 else 'do'} not apply to {where}; ignored.",
              file=sys.stderr)


def _model_json(bundle) -> dict:
    return {"name": bundle.name, "family": bundle.adapter.describe(), "device": str(bundle.device),
            "dtype": bundle.dtype_name}


def _where(analysis, heat) -> str:
    """Where the map's mass lies: its top-ZOOM_MASS patches and their largest connected part (the region the
    zoom uses), with that part's box in original image pixels."""
    import numpy as np

    from zoomvit import intent
    from zoomvit import zoom
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
    if not 0.0 <= discard_ratio < 1.0:
        raise UsageError(f"--discard-ratio must be in [0, 1), got {discard_ratio:g}.")
    given = {"--block": args.block, "--head": args.head, "--discard-ratio": args.discard_ratio,
             "--target": args.target}
    reads = MAP_OPTIONS[args.method]
    def check(num_layers, num_heads, id2label):
        from zoomvit import models

        target = None if args.target is None else models.match_label(id2label, args.target)
        block = -1 if args.block is None else args.block  # the last by default
        head = checks.head_index("mean" if args.head is None else args.head, num_heads, "--head")
        return checks.layer_index(block, num_layers, "--block"), head, target

    analysis, (layer, head, target) = _analyze(args, check)
    import numpy as np

    from zoomvit import intent
    from zoomvit import visualization
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
    _note_ignored(ignored, f"{args.method} maps{agnostic}")  # only now: an error is the only line when there is one
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
            "model": _model_json(bundle),
        }
    print(f"model: {bundle.name} ({bundle.adapter.describe()}) on {bundle.device} in {bundle.dtype_name}")
    _print_predictions("prediction:", analysis.top())
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

    _save(visualization.figure_with_legend(image, cmap, caption), path)


def _sheets(args, analysis, layer: int, head, discard_ratio: float, caption: str):
    """--compare, --strip and --heads: the Compare tab's sheets (compare.py), with the same caption."""
    from zoomvit import compare

    if args.compare:
        sheet = compare.map_tiles(analysis, block=layer, head=head, discard_ratio=discard_ratio,
                                  selected=args.method)
        _picture(sheet.image, f"Every map. {_top_line(analysis.top())}", args.compare)
    if args.strip:
        sheet = compare.block_strip(analysis, args.method, head=head, discard_ratio=discard_ratio, selected=layer)
        _picture(sheet.image, f"The {args.method} map over the blocks. {caption}", args.strip)
    if args.heads:
        sheet = compare.heads_grid(analysis, block=layer)
        _picture(sheet.image, f"What the class token reads in each head of block {layer % analysis.attentions.shape[0] + 1}."
                 f" {_top_line(analysis.top())}", args.heads)


def cmd_zoom(args):
    analysis, _ = _analyze(args)
    from zoomvit import visualization
    from zoomvit import zoom

    result = zoom.zoom(analysis, policy=args.policy)
    if args.out:
        working_box = [c * analysis.geometry.scale for c in result.box]
        x0, y0, x1, y1 = result.box
        caption = (f"{'Zoomed in' if result.zoomed else 'Kept the whole image'}: {result.reason}. Box ({x0:.0f}, "
                   f"{y0:.0f}) - ({x1:.0f}, {y1:.0f}) in image pixels. Before: {_top_line(result.before)} "
                   f"After: {_top_line(result.after)}")
        _picture(visualization.draw_box(analysis.loaded.image, working_box), caption, args.out, cmap=None)
    if args.json:
        return {**result.as_dict(), "policy": args.policy, "model": _model_json(analysis.bundle)}
    x0, y0, x1, y1 = result.box
    print(f"box (original pixels): ({x0:.0f}, {y0:.0f}) - ({x1:.0f}, {y1:.0f})")
    print(f"{'zoomed' if result.zoomed else 'not zoomed'}: {result.reason}")
    _print_predictions("before:", result.before)
    _print_predictions("after:", result.after)


def cmd_prune(args):
    checks.check_keep(args.keep, "--keep")
    fusion = args.fusion or PRUNE_FUSION
    analysis, _ = _analyze(args, lambda num_layers, *_: checks.check_after_block(args.after_block, num_layers,
                                                                                "--after-block"))
    from zoomvit import pruning
    from zoomvit import visualization

    result = pruning.prune(analysis, args.keep, args.after_block, args.mode, fusion)
    if args.out:
        caption = (f"Tokens kept ({result.tokens_after} of {result.tokens_before}) by {args.mode} pruning after block "
                   f"{result.after_block}{f' ({result.fusion})' if result.fusion else ''}. Before: "
                   f"{_top_line(result.before)} After: {_top_line(result.after)}")
        _picture(visualization.token_mask_overlay(analysis.loaded.image, analysis.geometry, result.kept_mask), caption,
                 args.out, cmap=None)
    if args.mode != "efficiency":  # analysis mode keeps its top-ranked tokens and drops the rest
        _note_ignored(["--fusion"] if args.fusion is not None else [], f"--mode {args.mode}")
    if args.json:
        return {**result.as_dict(), "model": _model_json(analysis.bundle)}
    print(f"{args.mode} pruning after block {result.after_block}"
          f"{f' ({result.fusion})' if result.fusion else ''}: {result.tokens_before} -> {result.tokens_after} tokens, "
          f"{result.macs_after / result.macs_before:.0%} of the MACs")
    print(f"time: {result.latency_text('before')} -> {result.latency_text('after')}, median (range) of "
          f"{len(result.latency_before_runs)} interleaved runs each; {result.latency_verdict()}")
    print(f"decision {'kept' if result.decision_kept else 'changed'}")
    _print_predictions("before:", result.before)
    _print_predictions("after:", result.after)


def cmd_eval(args):
    import os

    from zoomvit.evaluation import data as eval_data
    from zoomvit.evaluation import gallery as eval_gallery
    from zoomvit.evaluation import report as eval_report
    from zoomvit.evaluation import tasks as eval_tasks
    from zoomvit.evaluation import work as eval_work
    from zoomvit.evaluation import runner as evaluation

    keeps = eval_tasks.parse_keeps(args.keep)
    tasks = eval_tasks.parse_tasks(args.tasks)
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}.")
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}.")
    eval_gallery.check_requests(tasks, args.gallery, args.examples)
    if args.overwrite and args.resume:
        raise UsageError("--overwrite starts afresh and --resume continues the run in --out: give one of them.")
    device, dtype = _placement(args)
    eval_data.read_labels(args.data, args.limit, args.every)  # a bad folder fails before the slow model load
    out = Path(args.out or f"zoomvit-eval/{Path(args.data).resolve().name}")
    work = out / eval_work.WORK_DIR
    earlier = eval_report.earlier_outputs(out)
    resuming = args.resume and eval_work.holds_run(work)  # its outputs, if any, are this run's
    if earlier and not args.overwrite and not resuming:  # a new run would leave the earlier run's plots beside its own
        raise UsageError(f"{out} holds an earlier run's outputs ({', '.join(p.name for p in earlier)}): add "
                         "--overwrite to replace them, or choose another --out.")
    if not args.overwrite:
        eval_work.refuse_interrupted(work, args.resume)
    facts = _model_facts(args.model)
    if facts:
        checks.check_after_block(args.after_block, facts[0], "--after-block")
    try:
        bundle = _load_model(args.model, (eval_work.rank_device(device), dtype))  # under torchrun: a GPU per process
        checks.check_after_block(args.after_block, bundle.num_layers, "--after-block")
        with eval_work.distributed(bundle.device):  # started by torchrun: its processes share the run out
            if args.overwrite:  # rank 0 alone, before any rank starts the new run
                eval_work.from_rank0(lambda: (eval_report.remove_outputs(out), eval_work.remove_work(work)))
            result = evaluation.evaluate(bundle, args.data, args.limit, keeps, args.after_block, tasks,
                                         progress=True, work_dir=work, resume=args.resume, workers=args.workers,
                                         batch=args.batch, gallery=args.gallery, examples=args.examples,
                                         every=args.every)
        if result is None:  # another process of a torchrun launch: rank 0 writes the outputs
            return None
        for path in eval_report.write_outputs(result, out):
            print(f"wrote {path}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C: one line instead of a traceback, from one process of a torchrun launch
        if os.environ.get("RANK", "0") == "0":
            saved = len(eval_work.finished_images(work)) if eval_work.holds_run(work) else 0
            print(f"zoomvit: interrupted; {saved} images are saved in {work}: run again with --resume" if saved
                  else "zoomvit: interrupted", file=sys.stderr)
        raise eval_work.Interrupted(130) from None
    shutil.rmtree(work)  # the run is complete: nothing is left to resume
    if args.json:
        return result.summary
    print(eval_report.markdown_report(result.summary))


def cmd_serve(args):
    # All before the model load and the gradio import: a bad option would otherwise fail only after both.
    _placement(args)
    checks.check_port(args.port, "--port")  # 99999 would pass the bind test below (wrapped round) and then crash
    resolve_max_models(args.max_models)
    if not port_free(args.host, args.port):
        raise UsageError(
            f"Cannot serve on {args.host}:{args.port}: the port is in use (or the address is not on this machine); "
            "pick another with --port."
        )
    from zoomvit.app import ui as app  # only now: the web UI pulls in gradio

    app.serve(args)  # the same options as `python app.py` (serving.add_serve_options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoomvit", description="Explain, zoom into and prune a Vision Transformer.")
    parser.add_argument("--version", action="version", version=f"zoomvit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model", default=config.resolve_model_name(),
        help=f"hub id or local model folder (default: %(default)s, from ${config.MODEL_ENV_VAR} or built in)",
    )
    common.add_argument(
        "--device", default=config.resolve_device_name(),
        help=f"{config.DEVICE_HELP} (default: %(default)s, from ${config.DEVICE_ENV_VAR} or built in)",
    )
    common.add_argument(
        "--dtype", default=config.resolve_dtype_name(),
        help=f"{config.DTYPE_HELP} (default: %(default)s, from ${config.DTYPE_ENV_VAR} or built in)",
    )
    image = argparse.ArgumentParser(add_help=False, parents=[common])
    image.add_argument("image", help="image file")
    image.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")

    p = commands.add_parser("explain", parents=[image], help="importance map and intent diagnosis")
    p.add_argument("--method", choices=config.MAP_METHODS, default=config.DEFAULT_VIEW,
                   help="the map: rollout, cls and attention come from the attentions alone (the same for every "
                   "class); grad_rollout and intent explain one class; the default is the app's, the map the eval "
                   "measures most faithful (default: %(default)s)")
    p.add_argument("--block", type=int, help="block 1..L for cls/attention maps (default and -1: the last, L)")
    # No default value here (None): an option given to a map that does not read it is noted, and only then.
    p.add_argument("--head", help="head 1..H (numbered as blocks are; -1: the last), or mean|max|min across heads; "
                   "rollout, cls and attention maps (default: mean)")
    p.add_argument("--target", help="class index or label text, for grad_rollout and intent maps (default: the "
                   "predicted class)")
    p.add_argument("--discard-ratio", type=float, help="rollout only: the share of each layer's weakest attention "
                   f"weights dropped, in [0, 1) (default: {config.ROLLOUT_DISCARD_RATIO:g})")
    p.add_argument("--out", metavar="PNG", help="write the heatmap overlay here, with its colour bar and a caption")
    p.add_argument("--compare", metavar="PNG", help="write every map side by side here (the app's Compare tab)")
    p.add_argument("--strip", metavar="PNG", help="write the map over all blocks here (block 1 first)")
    p.add_argument("--heads", metavar="PNG", help="write what the class token reads in each head of --block here")
    p.set_defaults(run=cmd_explain)

    p = commands.add_parser("zoom", parents=[image], help="crop where the model looks and classify again")
    p.add_argument("--policy", choices=config.ZOOM_POLICIES, default="adaptive",
                   help="adaptive: zoom only when the attention sits in a small, concentrated box, then combine "
                   "whole image and crop; always: classify the crop alone (default: %(default)s)")
    p.add_argument("--out", metavar="PNG", help="write the image with the zoom box drawn here")
    p.set_defaults(run=cmd_zoom)

    p = commands.add_parser("prune", parents=[image], help="drop tokens after a block and compare")
    p.add_argument("--keep", type=float, default=config.PRUNE_KEEP,
                   help="fraction of patch tokens kept, in (0, 1] (default: %(default)s)")
    p.add_argument("--after-block", type=int, default=config.PRUNE_AFTER_BLOCK, help="1..L-1 (default: %(default)s)")
    p.add_argument("--mode", choices=config.PRUNE_MODES, default=config.PRUNE_MODE,
                   help="analysis: keep the tokens the decision relies on, seen with look-ahead (saves no time); "
                   "efficiency: choose at the cut from what the model has computed so far (default: %(default)s)")
    p.add_argument("--fusion", choices=config.PRUNE_FUSIONS, help="efficiency mode only: what becomes of the "
                   f"tokens not kept (default: {PRUNE_FUSION})")
    p.add_argument("--out", metavar="PNG", help="write the image with dropped patches greyed out here")
    p.set_defaults(run=cmd_prune)

    p = commands.add_parser(
        "eval", parents=[common], help="evaluate pruning, zoom, faithfulness and intent on a folder",
        description="Evaluate pruning, zoom, faithfulness and intent on a labelled folder. Started by torchrun "
        "(torchrun --nproc-per-node N -m zoomvit eval ...), its processes share the work and rank 0 writes the outputs.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder with images and labels.csv (file,label_index"
                   "[,x0,y0,x1,y1])")
    p.add_argument("--out", metavar="DIR", help="where results.json, per_image.csv, the plots and report.md go "
                   "(default: zoomvit-eval/<data folder name>)")
    p.add_argument("--limit", type=int, help="only the first N images (after --every)")
    p.add_argument("--every", type=int, default=1, metavar="K",
                   help="every K-th image of labels.csv: a spread sample of a class-sorted list (default: %(default)s)")
    p.add_argument("--keep", default=",".join(f"{k:g}" for k in config.EVAL_KEEPS),
                   help="fractions of patch tokens to keep, each in (0, 1] (default: %(default)s)")
    p.add_argument("--after-block", type=int, default=config.PRUNE_AFTER_BLOCK, help="1..L-1 (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(config.EVAL_TASKS), help="default: %(default)s")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (per-image results "
                   "wait in OUT/.work until a run completes), with the same settings; without --resume an interrupted "
                   "run there is refused, never overwritten")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out (and an "
                   "interrupted run's work there); without it eval refuses a folder that holds them")
    p.add_argument("--workers", type=int, help="processes decoding images while the model runs (default: the cores "
                   "per process less one, 1 to 4; 0: none)")
    p.add_argument("--batch", type=int, default=config.EVAL_BATCH, help="images analysed together (one batched "
                   "analysis pass; their perturbation forwards run together) (default: %(default)s)")
    p.add_argument("--gallery", type=int, default=0, metavar="N", help="per task (top-1, pruning in each mode at each "
                   "keep, zoom), Markdown pages under OUT/gallery of the first N images it got wrong or changed its "
                   "mind on, with thumbnails (image and intent map), linked from report.md (default: %(default)s, none)")
    p.add_argument("--examples", type=int, default=0, metavar="N", help="per intent group (good alignment, inverted, "
                   "diffuse intent), a PNG sheet for each of its first N images under OUT/examples/: image, intent "
                   "map, zoom crop, kept tokens of both pruning modes, every prediction; needs the intent task "
                   "(default: %(default)s, none)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the report")
    p.set_defaults(run=cmd_eval)

    p = add_serve_options(commands.add_parser("serve", help="start the web app"))
    p.set_defaults(run=cmd_serve)
    train_cli.add_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits with status 2
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # as typed, for what records the command
    try:
        payload = args.run(args)  # a dict with --json; None when the command printed a summary itself
    except Exception as exc:
        if not isinstance(exc, ZoomViTError):
            raise
        print(f"zoomvit: error: {exc}", file=sys.stderr)
        return 2
    if payload is not None:
        print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
