"""Batch evaluation over a labelled image folder (`zoomvit eval`): pruning, zoom, map faithfulness and intent,
all in one run, written out as results.json, a per-image CSV, PNG plots and a Markdown report (see `eval_report`),
with, when asked for, a gallery of what each task got wrong and example sheets per intent group (see `eval_gallery`).

The folder holds images in class folders or with a labels.csv (see `labelled_folders`). Two passes:
1. per group of `batch` images (8 by default): one batched analysis pass, then per image its maps, the zoom and
   the intent diagnosis, and the deletion/insertion curves of every map of every image of the group in one run of
   batched forwards (see `faithfulness`);
2. pruning: every (mode, criterion, keep) runs over all images in batches of pruning_pass.PRUNE_BATCH, then is timed on
   one batch against the unpruned forward (see `pruning_pass`).

Pass 1 writes one small file per image into a work folder (see `eval_work.open_work`), so an interrupted run resumes
where it stopped, and processes started by torchrun (`torch.distributed`) share the images and the pruning
batches: every process runs exactly the computations a single process would, so the figures are the same.
Images are decoded in DataLoader worker processes while the model runs. The tasks and their configurations are in
`eval_tasks`, the figures summarised from the rows in `eval_summary`.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from zoomvit import config, faithfulness, intent, pruning, zoom
from zoomvit.checks import check_after_block
from zoomvit.errors import ImageLoadError, ZoomViTError
from zoomvit.evaluation import gallery as eval_gallery
from zoomvit.evaluation import pruning_pass
from zoomvit.evaluation import sanity as eval_sanity
from zoomvit.evaluation import summary as eval_summary
from zoomvit.evaluation.data import BOX_COLUMNS, Images, decode_ahead, default_workers
from zoomvit.evaluation.report import Evaluation
from zoomvit.evaluation.tasks import (
    DEFAULT_KEEPS,
    DEFAULT_TASKS,
    FAITHFULNESS_METHODS,
    INTENT_CONFIGS,
    TASKS,
    prune_configs,
)
from zoomvit.evaluation.work import (
    Stamps,
    barrier,
    fingerprint,
    finished_images,
    from_rank0,
    groups_to_do,
    load_record,
    open_work,
    rank_world,
    save_record,
)
from zoomvit.geometry import encode
from zoomvit.labelled_folders import labels_for_model, read_folder
from zoomvit.models import ViTBundle
from zoomvit.vit_analyzer import Analysis, analyze_encoded

# ---- box metrics ------------------------------------------------------------------------------------------


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def peak_in_box(analysis: Analysis, grid_map: np.ndarray, box) -> bool:
    """Pointing game: the centre of the map's strongest patch lies inside the box (original pixels)."""
    row, col = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
    x0, y0, x1, y1 = analysis.geometry.to_original(analysis.geometry.patch_box(row, col))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return bool(box[0] <= cx <= box[2] and box[1] <= cy <= box[3])


# ---- pass 1: per image ------------------------------------------------------------------------------------


def _group_pass(
    bundle,
    entries,
    items,
    tasks,
    intent_keeps,
    after_block,
    need_scores,
    zoom_policy=config.ZOOM_POLICY,
    randomised=None,
) -> dict:
    """Pass 1 for one group of images, [(index, LoadedImage, None) or (index, None, error)]: {index: record}, where
    a record holds the image's CSV row, its analysis-mode pruning scores (None unless `need_scores`), its
    perturbation curves, its maps' rank correlations under randomisation (with `randomised`, the sanity task's
    model copy, see `eval_sanity`) and its share of the batched analysis pass's time, or the error that skips it.
    The group's analysis pass is one batch, and its perturbation forwards run together (see
    `faithfulness.perturbation_curves_group`)."""
    records, by_shape = {}, {}
    for index, loaded, error in entries:
        if error is None:
            try:  # the model's preprocessing can refuse an image too
                pixels, geometry = encode(bundle, loaded)
                by_shape.setdefault(tuple(pixels.shape), []).append((index, loaded, pixels, geometry))
            except ImageLoadError as exc:
                error = str(exc)
        if error is not None:
            records[index] = {"error": error}
    done = []  # (index, analysis)
    for group in by_shape.values():  # one size for every image with the processors here: one batch
        start = time.perf_counter()
        _, loaded, pixels, geometries = map(list, zip(*group))
        analyses = analyze_encoded(bundle, loaded, pixels, geometries)
        analysis_ms = (time.perf_counter() - start) * 1000 / len(group)
        sanity = eval_sanity.group_correlations(randomised, analyses) if randomised else [None] * len(group)
        for (index, *_), analysis, correlations in zip(group, analyses, sanity):
            row, scores, look = _image_results(
                analysis, items[index], tasks, intent_keeps, after_block, need_scores, zoom_policy
            )
            records[index] = {
                "row": row,
                "scores": scores,
                "analysis_ms": analysis_ms,
                "curves": None,
                "num_tokens": analysis.attentions.shape[-1],
                "sanity": None if correlations is None else torch.from_numpy(correlations),  # (levels, maps)
                "look": look,
                # what the gallery and the example sheets draw (see eval_gallery)
                "intent_map": torch.from_numpy(analysis.intent().astype(np.float32)),
            }
            done.append((index, analysis))
    if "faithfulness" in tasks and done:
        maps = [{m: None if m == "random" else a.map(m) for m in FAITHFULNESS_METHODS} for _, a in done]
        curves = faithfulness.perturbation_curves_group([a for _, a in done], maps, [i for i, _ in done])
        for (index, analysis), image_maps, image_curves in zip(done, maps, curves):
            row, box = records[index]["row"], items[index].box
            for m, (deletion, insertion) in image_curves.items():
                row[f"deletion_{m}"] = faithfulness.auc(deletion)
                row[f"insertion_{m}"] = faithfulness.auc(insertion)
                if box is not None and image_maps[m] is not None:
                    row[f"pointing_{m}"] = int(peak_in_box(analysis, image_maps[m], box))
            records[index]["curves"] = image_curves
    return records


def _image_results(analysis, item, tasks, intent_keeps, after_block, need_scores, zoom_policy):
    """One analysed image's CSV row (without the faithfulness columns), its analysis-mode pruning scores, and its
    zoom (None where no task zooms) as the example sheets show it."""
    predicted = analysis.predicted
    row = {
        "file": item.file,
        **item.groups,
        "label": item.label,
        "predicted": predicted,
        "correct": int(predicted == item.label),
        "confidence": float(analysis.probs[predicted]),
        "label_prob": float(analysis.probs[item.label]),
    }
    scores = None
    if need_scores:
        num_patches = analysis.grid[0] * analysis.grid[1]
        counts = {k: pruning.kept_count(num_patches, k) for k in intent_keeps}
        order = pruning.intent_pick_order(analysis, after_block, max(counts.values(), default=0))
        scores = {  # one greedy pass serves every keep: a smaller budget keeps a prefix of the same order
            "intent": {k: pruning.scores_from_order(order[:count], num_patches)[0] for k, count in counts.items()},
            "grad_rollout": torch.from_numpy(analysis.grad_rollout().ravel().copy()),
        }
    zoom_result = zoom.zoom(analysis, zoom_policy) if {"zoom", "intent"} & set(tasks) else None
    look = zoom_result and {
        "box": [float(c) for c in zoom_result.box],
        "zoomed": bool(zoom_result.zoomed),
        "predicted": int(np.argmax(zoom_result.probs_after)),
        "confidence": float(np.max(zoom_result.probs_after)),
    }
    if "zoom" in tasks:
        after, crop = int(np.argmax(zoom_result.probs_after)), int(np.argmax(zoom_result.probs_crop))
        row.update(
            zoomed=int(zoom_result.zoomed),
            zoom_predicted=after,
            zoom_correct=int(after == item.label),
            crop_correct=int(crop == item.label),
            zoom_confidence=float(zoom_result.probs_after[predicted]),
            zoom_source=zoom_result.source,
            zoom_units=round(zoom_result.forward_units, 3),
            **{f"zoom_{k}": round(v, 1) for k, v in zip(BOX_COLUMNS, zoom_result.box)},
        )
        if item.box is not None:
            row["pointing_hit"] = int(peak_in_box(analysis, zoom.focus_map(analysis), item.box))
            row["box_iou"] = box_iou(zoom_result.box, item.box)
    if "intent" in tasks:
        diagnosis = intent.diagnose(analysis, box=item.box)  # its own probe, as in the app and the CLI
        row["intent"] = diagnosis.kind
        row.update({f"intent_{k}": v for k, v in diagnosis.metrics.items()})
        if diagnosis.region is not None:  # the region it judged: the example sheets draw it on the intent map
            row.update({f"intent_region_{k}": round(v, 1) for k, v in zip(BOX_COLUMNS, diagnosis.region)})
    return row, scores, look


def _first_pass(bundle, images: Images, todo, workers: int, settings, work: Path, stamps: Stamps, progress: bool):
    """Pass 1 over this process's groups `todo`: each image's record saved in `work` as it is done. `settings`:
    `_group_pass`'s (tasks, intent_keeps, after_block, need_scores, zoom_policy, randomised)."""
    loader = decode_ahead(images, todo, workers)
    # closed on a Ctrl-C too, so that the CLI's one line about it starts a line of its own
    with tqdm(
        total=sum(map(len, todo)),
        desc=f"images ({images.folder.name})",
        unit="img",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for entries in loader:
            records = _group_pass(bundle, entries, images.items, *settings)
            for index, record in records.items():
                if "error" in record:  # one bad file should not sink a long run: report it and go on
                    save_record(work, index, record, stamps(index), skipped=True)
                    continue
                curves = record["curves"]  # tensors, not arrays: torch.load(weights_only=True) reads no arrays
                record["curves"] = curves and {m: tuple(map(torch.from_numpy, pair)) for m, pair in curves.items()}
                save_record(work, index, record, stamps(index))
            bar.update(len(entries))


def evaluate(
    bundle: ViTBundle,
    data,
    limit: int | None = None,
    keeps=DEFAULT_KEEPS,
    after_block: int = config.PRUNE_AFTER_BLOCK,
    tasks=DEFAULT_TASKS,
    progress: bool = True,
    work_dir=None,
    resume: bool = False,
    workers: int | None = None,
    batch: int = config.EVAL_BATCH,
    gallery: int = 0,
    examples: int = 0,
    every: int = 1,
    zoom_policy: str = config.ZOOM_POLICY,
    timing: bool = True,
) -> Evaluation | None:
    """Run the evaluation tasks over a labelled folder (see the module docstring).

    Pass 1 writes one file per image to `work_dir` (a temporary folder when None; see `eval_work.open_work`): with
    `resume` a run interrupted there goes on with the images it had not done. Images are decoded by `workers`
    DataLoader processes (None: `eval_data.default_workers`; 0: this process). Pass 1 analyses `batch` images at a
    time (one batched analysis pass; their perturbation forwards run together). Under torch.distributed (torchrun,
    see `eval_work.distributed`) each process takes a share of the image groups and of the pruning batches, all in
    the one shared `work_dir`: rank 0 returns the Evaluation, the others None. `gallery` > 0 adds, per task, the
    first `gallery` images it got wrong or changed its mind on; `examples` > 0 that many example sheets per intent
    group (see `eval_gallery`; neither changes pass 1's files, so a resumed run may ask for them or not). `every` K
    evaluates every K-th image of the folder (before `limit`). `timing` False skips the pruning's latency
    measurement (most of a small run's time): its ratios are then None, and the report says so."""
    if work_dir is None:
        if rank_world()[1] > 1:
            raise ZoomViTError("A distributed evaluation needs a work folder that every process shares (work_dir).")
        options = {name: value for name, value in locals().items() if name != "work_dir"}  # the parameters
        with tempfile.TemporaryDirectory(prefix="zoomvit-eval-") as work_dir:
            return evaluate(work_dir=work_dir, **options)
    started = time.perf_counter()
    data = Path(data)
    items = labels_for_model(read_folder(data, limit, every), bundle.id2label)  # labels as the model's indices
    keeps = tuple(float(k) for k in keeps)
    tasks = tuple(t for t in TASKS if t in tasks)
    check_after_block(after_block, bundle.num_layers)
    eval_gallery.check_requests(tasks, gallery, examples)
    configs = prune_configs(tasks, keeps)
    intent_keeps = sorted({k for m, c, k in configs if c == "intent"})

    rank, world = rank_world()
    progress = progress and rank == 0  # one set of bars, not one per process
    workers = default_workers(world) if workers is None else workers
    work = Path(work_dir)
    if not isinstance(batch, int) or batch < 1:
        raise ZoomViTError(f"--batch must be a whole number of images, at least 1, got {batch!r}.")
    settings = fingerprint(bundle, data, items, limit, keeps, tasks, after_block, batch, zoom_policy)
    stamps = Stamps(data, items, settings)  # what each image's work file must say about itself
    finished = from_rank0(lambda: open_work(work, settings, resume, stamps))
    images = Images(data, items)
    todo = groups_to_do(len(items), finished, batch)[rank::world]  # even shares of what is left
    # the sanity task's copy of the model, made once: each group resets and randomises it again
    randomised = eval_sanity.Randomised(bundle) if "sanity" in tasks else None
    _first_pass(
        bundle,
        images,
        todo,
        workers,
        (tasks, intent_keeps, after_block, bool(configs), zoom_policy, randomised),
        work,
        stamps,
        progress,
    )
    barrier()  # every image has its file now
    images_seconds = time.perf_counter() - started
    finished = finished_images(work)
    if len(finished) < len(items):  # each machine of a multi-machine run wrote to a disk of its own
        raise ZoomViTError(
            f"{work} lacks {len(items) - len(finished)} images' results: every process of a run must "
            "write to the same folder (a shared file system across machines)."
        )
    kept = sorted(i for i, skipped in finished.items() if not skipped)
    if not kept:
        raise ZoomViTError(f"No image in {data} could be read ({load_record(work, min(finished), True)['error']}).")
    if rank == 0:  # it summarises every image
        needed = kept
    else:  # the others need only their pruning batches' files
        needed = [i for _, indices in pruning_pass.rank_batches(kept, rank, world) for i in indices] if configs else []
    records = {i: load_record(work, i) for i in needed}

    pruned, timings = {}, {}
    if configs:
        pruned = pruning_pass.prune_pass(
            bundle,
            images,
            kept,
            records,
            configs,
            after_block,
            workers,
            progress,
            timings,
            INTENT_CONFIGS if examples else (),
            timing,
        )
    if rank != 0:
        return None
    rows = [records[i]["row"] for i in kept]
    for (mode, criterion, keep), run in pruned.items():
        if keep in keeps and "prune" in tasks:
            for row, p in zip(rows, run.predicted):
                row[f"prune_{mode}_{criterion}_{keep:g}"] = int(p)
    skipped = [
        {"file": items[i].file, "error": load_record(work, i, True)["error"]} for i in sorted(finished) if finished[i]
    ]
    run = {
        "tasks": list(tasks),
        "keep": list(keeps),
        "after_block": after_block,
        "limit": limit,
        "every": every,
        "timing": timing,
    }
    summary = _summary(bundle, data, run, batch, zoom_policy, records, kept, rows, pruned, skipped, items[0].box)
    files = {}
    if gallery or examples:  # drawn from what the run has computed: no model call
        parts, files = eval_gallery.collect(
            bundle, data, items, kept, records, summary, rows, pruned, gallery, examples
        )
        summary.update(parts)
    summary.update(_speed_and_machine([records[i]["analysis_ms"] for i in kept], images_seconds, timings, started))
    return Evaluation(summary, rows, files)


def _speed_and_machine(analysis_ms: list, images_seconds: float, timings: dict, started: float) -> dict:
    """results.json's `speed` (pass 1, the pruning's timing, the whole run) and `machine`, added last."""
    return {
        "speed": {
            "analysis_ms_median": float(np.median(analysis_ms)),
            "images_seconds": round(images_seconds, 1),
            "latency_seconds": round(timings.get("latency_seconds", 0.0), 1),  # timing the pruning (one batch)
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


def _summary(bundle, data, run, batch, zoom_policy, records, kept, rows, pruned, skipped, first_box) -> dict:
    """results.json's figures (all but the speed and machine, which the run adds last). `run`: the settings
    evaluate was called with (tasks, keep, after_block, limit, every)."""
    tasks, keeps, after_block, has_boxes = run["tasks"], run["keep"], run["after_block"], first_box is not None
    summary = {
        "model": bundle.name,
        "data": str(data),
        "n": len(rows),
        "top1": eval_summary.mean([r["correct"] for r in rows]),
        "settings": {
            **run,
            "batch": batch,
            "prune_batch": pruning_pass.PRUNE_BATCH,
            "latency_rounds": pruning_pass.LATENCY_ROUNDS,
            "faithfulness_steps": faithfulness.STEPS,
            "zoom_policy": zoom_policy,
        },
    }
    if "prune" in tasks:
        num_tokens = records[kept[0]]["num_tokens"]
        summary["prune"] = eval_summary.prune_summary(bundle, rows, pruned, keeps, after_block, num_tokens)
    if "zoom" in tasks:
        summary["zoom"] = eval_summary.zoom_summary(rows, has_boxes)
    if "faithfulness" in tasks:
        curves = [{m: tuple(t.numpy() for t in pair) for m, pair in records[i]["curves"].items()} for i in kept]
        summary["faithfulness"] = eval_summary.faithfulness_summary(rows, curves, has_boxes)
    if "intent" in tasks:
        summary["intent"] = eval_summary.intent_summary(rows, pruned)
    if "sanity" in tasks:
        correlations = np.stack([records[i]["sanity"].numpy() for i in kept])
        summary["sanity"] = eval_sanity.sanity_summary(correlations, bundle.num_layers)
    summary["skipped"] = skipped
    return summary
