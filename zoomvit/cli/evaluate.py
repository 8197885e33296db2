"""`zoomvit eval`: its options, checked before the model loads, and the run (evaluation.runner.evaluate)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from zoomvit import checks, config
from zoomvit.cli.common import UsageError, device_and_dtype, load_bundle, model_facts, say
from zoomvit.labelled_folders import labels_for_model, read_folder


def cmd_eval(args):
    import os

    from zoomvit.evaluation import gallery as eval_gallery
    from zoomvit.evaluation import report as eval_report
    from zoomvit.evaluation import runner as evaluation
    from zoomvit.evaluation import tasks as eval_tasks
    from zoomvit.evaluation import work as eval_work

    keeps = eval_tasks.parse_keeps(args.keep)
    tasks = eval_tasks.parse_tasks(args.tasks)
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}.")
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}.")
    eval_gallery.check_requests(tasks, args.gallery, args.examples)
    if args.overwrite and args.resume:
        raise UsageError("--overwrite starts afresh and --resume continues the run in --out: give one of them.")
    device, dtype = device_and_dtype(args)
    data = read_folder(args.data, args.limit, args.every)  # a bad folder fails before the slow model load
    if os.environ.get("RANK", "0") == "0":  # one process of a torchrun launch tells
        for line in data.notes:
            say(f"warning: {line}")
    out = Path(args.out or f"zoomvit-eval/{Path(args.data).resolve().name}")
    work = out / eval_work.WORK_DIR
    earlier = eval_report.earlier_outputs(out)
    resuming = args.resume and eval_work.holds_run(work)  # its outputs, if any, are this run's
    if earlier and not args.overwrite and not resuming:  # a new run would leave the earlier run's plots beside its own
        raise UsageError(
            f"{out} holds an earlier run's outputs ({', '.join(p.name for p in earlier)}): add "
            "--overwrite to replace them, or choose another --out."
        )
    if not args.overwrite:
        eval_work.refuse_interrupted(work, args.resume)
    facts = model_facts(args.model)
    if facts:
        checks.check_after_block(args.after_block, facts[0], "--after-block")
        labels_for_model(data, facts[2])  # class folders the model does not name, labels it lacks: before the load
    try:
        bundle = load_bundle(args.model, (eval_work.rank_device(device), dtype))  # under torchrun: a GPU per process
        checks.check_after_block(args.after_block, bundle.num_layers, "--after-block")
        with eval_work.distributed(bundle.device):  # started by torchrun: its processes share the run out
            if args.overwrite:  # rank 0 alone, before any rank starts the new run
                eval_work.from_rank0(lambda: (eval_report.remove_outputs(out), eval_work.remove_work(work)))
            result = evaluation.evaluate(
                bundle,
                args.data,
                args.limit,
                keeps,
                args.after_block,
                tasks,
                progress=True,
                work_dir=work,
                resume=args.resume,
                workers=args.workers,
                batch=args.batch,
                gallery=args.gallery,
                examples=args.examples,
                every=args.every,
                zoom_policy=args.zoom_policy,
                timing=not args.no_timing,
            )
        if result is None:  # another process of a torchrun launch: rank 0 writes the outputs
            return None
        for path in eval_report.write_outputs(result, out):
            print(f"wrote {path}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C: one line instead of a traceback, from one process of a torchrun launch
        if os.environ.get("RANK", "0") == "0":
            saved = len(eval_work.finished_images(work)) if eval_work.holds_run(work) else 0
            print(
                f"zoomvit: interrupted; {saved} images are saved in {work}: run again with --resume"
                if saved
                else "zoomvit: interrupted",
                file=sys.stderr,
            )
        raise eval_work.Interrupted(130) from None
    shutil.rmtree(work)  # the run is complete: nothing is left to resume
    if args.json:
        return result.summary
    print(eval_report.markdown_report(result.summary))


def add_parser(commands, common) -> None:
    p = commands.add_parser(
        "eval",
        parents=[common],
        help="evaluate pruning, zoom, faithfulness and intent on a folder",
        description="Evaluate pruning, zoom, faithfulness and intent on a labelled folder, and on request the maps' "
        "sanity checks (--tasks sanity). Started by torchrun "
        "(torchrun --nproc-per-node N -m zoomvit eval ...), its processes share the work and rank 0 writes the "
        "outputs.",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="folder of class folders (CLASS_NAME/image.jpg, matched to the model's labels by name) or with "
        "labels.csv (file,label_index[,x0,y0,x1,y1])",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where results.json, per_image.csv, the plots and report.md go (default: zoomvit-eval/<data folder name>)",
    )
    p.add_argument("--limit", type=int, help="only the first N images (after --every)")
    p.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="K",
        help="every K-th image of the folder: a spread sample of a class-sorted list (default: %(default)s)",
    )
    p.add_argument(
        "--keep",
        default=",".join(f"{k:g}" for k in config.EVAL_KEEPS),
        help="fractions of patch tokens to keep, each in (0, 1] (default: %(default)s)",
    )
    p.add_argument("--after-block", type=int, default=config.PRUNE_AFTER_BLOCK, help="1..L-1 (default: %(default)s)")
    p.add_argument(
        "--tasks",
        default=",".join(config.EVAL_DEFAULT_TASKS),
        help=f"some of {','.join(config.EVAL_TASKS)}; sanity: the maps' model randomisation test (Adebayo et al. "
        "2018), about 15 analysis passes per image (default: %(default)s)",
    )
    p.add_argument(
        "--zoom-policy",
        choices=config.ZOOM_POLICIES,
        default=config.ZOOM_POLICY,
        help=f"{config.ZOOM_POLICY_HELP} (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out (per-image results "
        "wait in OUT/.work until a run completes), with the same settings; without --resume an interrupted "
        "run there is refused, never overwritten",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's outputs in --out (and an "
        "interrupted run's work there); without it eval refuses a folder that holds them",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="processes decoding images while the model runs (default: the cores "
        "per process less one, 1 to 4; 0: none)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=config.EVAL_BATCH,
        help="images analysed together (one batched "
        "analysis pass; their perturbation forwards run together) (default: %(default)s)",
    )
    p.add_argument(
        "--gallery",
        type=int,
        default=0,
        metavar="N",
        help="per task (top-1, pruning in each mode at each "
        "keep, zoom), Markdown pages under OUT/gallery of the first N images it got wrong or changed its "
        "mind on, with thumbnails (image and intent map), linked from report.md (default: %(default)s, none)",
    )
    p.add_argument(
        "--examples",
        type=int,
        default=0,
        metavar="N",
        help="per intent group (good alignment, inverted, "
        "diffuse intent), a PNG sheet for each of its first N images under OUT/examples/: image, intent "
        "map, zoom crop, kept tokens of both pruning modes, every prediction; needs the intent task "
        "(default: %(default)s, none)",
    )
    p.add_argument(
        "--no-timing",
        action="store_true",
        help="skip the pruning's latency measurement (most of a small run's time): the report then says latency "
        "was not measured",
    )
    p.add_argument("--json", action="store_true", help="print results.json instead of the report")
    p.set_defaults(run=cmd_eval)
