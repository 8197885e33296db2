"""Batch evaluation over a labelled image folder (`zoomvit eval`): pruning, zoom, map faithfulness and intent,
all in one run, written out as results.json, a per-image CSV, PNG plots and a Markdown report.

The folder holds images and labels.csv with at least `file,label_index`; with `x0,y0,x1,y1` (the object box
in the image's own pixels) the box metrics are added; `background` and `scale` columns, when present, split
the zoom results into groups.

Two passes:
1. per group of `batch` images (8 by default): one batched analysis pass, then per image its maps, the zoom and
   the intent diagnosis, and the deletion/insertion curves of every map of every image of the group in one run of
   batched forwards (see `faithfulness`);
2. pruning: every (mode, criterion, keep) runs over all images in batches of PRUNE_BATCH, then is timed on
   one batch against the unpruned forward (see `_prune_pass`).

Pass 1 writes one small file per image into a work folder (see `_open_work`), so an interrupted run resumes
where it stopped, and processes started by torchrun (`torch.distributed`) share the images and the pruning
batches: every process runs exactly the computations a single process would, so the figures are the same.
Images are decoded in DataLoader worker processes while the model runs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import config
from checks import check_after_block, check_keep
import faithfulness
import intent
import pruning
import visualization
import zoom
from errors import ImageLoadError, ZoomViTError
from geometry import encode
from images import load_image
from models import ViTBundle
from vit_analyzer import Analysis, analyze_encoded

TASKS = config.EVAL_TASKS
DEFAULT_KEEPS = config.EVAL_KEEPS
# Ranking criteria per pruning mode; "random" is each mode's baseline (analysis: random tokens dropped;
# efficiency: random tokens kept and the rest merged into them, so only the choice differs from "merge").
CRITERIA = {"analysis": ("intent", "grad_rollout", "random"), "efficiency": ("merge", "cls_topk", "random")}
FAITHFULNESS_METHODS = ("random", "attention", "cls", "rollout", "grad_rollout", "intent")
PRUNE_BATCH = 32  # the batch the engine's latency goal is stated at
LATENCY_ROUNDS = 5
INTENT_KEEP = 0.5  # the intent groups report pruning at this keep
GROUP_COLUMNS = ("background", "scale")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass
class Item:
    file: str
    label: int
    box: tuple[float, float, float, float] | None  # original image pixels
    groups: dict = field(default_factory=dict)  # values of the GROUP_COLUMNS the CSV has


def read_labels(folder, limit: int | None = None) -> list[Item]:
    """The rows of `folder`/labels.csv, checked: a clear ZoomViTError names the file and line of any problem."""
    folder = Path(folder)
    path = folder / "labels.csv"
    if not folder.is_dir():
        raise ZoomViTError(f"Data folder not found: {folder}")
    if not path.is_file():
        raise ZoomViTError(f"{path} not found: the folder needs a labels.csv with columns file,label_index.")
    if limit is not None and limit < 1:
        raise ZoomViTError(f"--limit must be at least 1, got {limit}.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = set(reader.fieldnames or ())
    if not {"file", "label_index"} <= columns:
        raise ZoomViTError(f"{path} needs the columns file,label_index (found: {', '.join(sorted(columns))}).")
    box_columns = columns & set(BOX_COLUMNS)
    if box_columns and box_columns != set(BOX_COLUMNS):
        raise ZoomViTError(f"{path} has only some of the box columns x0,y0,x1,y1: give all four or none.")
    items = []
    for line, row in enumerate(rows, start=2):
        try:
            label = int(row["label_index"])
            box = tuple(float(row[k]) for k in BOX_COLUMNS) if box_columns else None
        except (TypeError, ValueError):
            raise ZoomViTError(f"{path}, line {line}: label_index must be an integer and the box numbers.") from None
        if not row["file"]:
            raise ZoomViTError(f"{path}, line {line}: empty file name.")
        groups = {k: row[k] for k in GROUP_COLUMNS if k in columns}
        items.append(Item(row["file"], label, box, groups))
    if not items:
        raise ZoomViTError(f"{path} lists no images.")
    return items[:limit] if limit else items


def parse_keeps(text: str) -> tuple[float, ...]:
    """'0.9,0.7' -> (0.9, 0.7), each in (0, 1]."""
    try:
        keeps = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ZoomViTError(f"--keep must be comma-separated numbers, got '{text}'.") from None
    if not keeps:
        raise ZoomViTError(f"--keep values must be in (0, 1], got '{text}'.")
    return tuple(check_keep(k, "--keep values") for k in keeps)


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ZoomViTError(f"--tasks must be some of {','.join(TASKS)}, got '{text}'.")
    return tasks


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


# ---- the work folder, image loading and torch.distributed -------------------------------------------------

WORK_DIR = ".work"  # the CLI's work folder, inside --out; removed once the outputs are written
_RECORD = re.compile(r"(\d+)(\.skipped)?\.pt")  # pass 1's file of the image with that index


def _fingerprint(bundle, data: Path, items, limit, keeps, tasks, after_block, batch) -> dict:
    """The settings pass 1's files depend on: resuming under others would mix two runs in one result (the batch
    too: which images share a batch moves results in the last float digits)."""
    listing = json.dumps([[i.file, i.label, i.box, i.groups] for i in items])
    return {
        "model": bundle.name, "device": bundle.device.type, "dtype": bundle.dtype_name, "data": str(data.resolve()),
        "limit": limit, "keep": list(keeps), "tasks": list(tasks), "after_block": after_block, "batch": batch,
        "faithfulness_steps": faithfulness.STEPS, "images": hashlib.sha256(listing.encode()).hexdigest(),
    }


def _write_atomic(path: Path, write) -> None:
    """write(a temporary path), then rename it to `path`: a run killed mid-write leaves no half-written file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _record_path(work: Path, index: int, skipped: bool = False) -> Path:
    return work / f"{index:06d}{'.skipped' if skipped else ''}.pt"


def _save_record(work: Path, index: int, record: dict, skipped: bool = False) -> None:
    _write_atomic(_record_path(work, index, skipped), lambda path: torch.save(record, path))


def _load_record(work: Path, index: int, skipped: bool = False) -> dict:
    return torch.load(_record_path(work, index, skipped), weights_only=True)  # tensors and plain values only


def _finished(work: Path) -> dict[int, bool]:
    """{index: skipped} of the images pass 1 has written a file for."""
    return {int(m[1]): bool(m[2]) for m in map(_RECORD.fullmatch, os.listdir(work)) if m}


def _open_work(work: Path, fingerprint: dict, resume: bool) -> dict[int, bool]:
    """The images already done in `work` ({index: skipped}; none for a new run, whose settings are written there).
    A run found there is continued only with `resume` and the same settings: an interrupted run's hours are not
    overwritten by a repeated command, nor mixed with another run's."""
    settings = work / "settings.json"
    if settings.is_file():
        if not resume:
            raise ZoomViTError(f"{work} holds an interrupted run: add --resume to continue it, or delete that folder "
                               "to start afresh.")
        stored = json.loads(settings.read_text())
        changed = [key for key, value in fingerprint.items() if stored.get(key) != value]
        if changed:
            raise ZoomViTError(f"Cannot resume the run in {work}: it was started with other settings "
                               f"({', '.join(changed)}); use those, or delete that folder to start afresh.")
        return _finished(work)
    if work.is_dir() and any(work.iterdir()):
        raise ZoomViTError(f"{work} is not empty and holds no evaluation run: use another output folder.")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZoomViTError(f"Could not create {work}: {exc}") from None
    _write_atomic(settings, lambda path: path.write_text(json.dumps(fingerprint, indent=1) + "\n"))
    return {}


class _Images(Dataset):
    """The items' images, decoded (in DataLoader workers): (index, LoadedImage, None), or (index, None, the error)
    for a file that cannot be read, which is skipped; raised in a worker, the error would end the whole run."""

    def __init__(self, folder: Path, items: list[Item]):
        self.folder, self.items = folder, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        try:
            return index, load_image(self.folder / self.items[index].file), None
        except ImageLoadError as exc:
            return index, None, str(exc)


def _groups_to_do(count: int, finished, batch: int) -> list[list[int]]:
    """The groups of pass 1 not yet done, each [index, ...]. Groups are fixed runs of `batch` images of the whole
    list, so every image is computed in the same batch whether a run is resumed or split over processes: the
    figures do not depend on how a run was cut up. A group done in part is run again whole."""
    groups = [list(range(start, min(start + batch, count))) for start in range(0, count, batch)]
    return [group for group in groups if not all(i in finished for i in group)]


def default_workers(world: int = 1) -> int:
    """DataLoader processes per evaluating process: its share of the cores less one for the model, 1 to 4 (a photo
    decodes in milliseconds, the model takes tens to hundreds per image: one worker keeps ahead of it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(4, cores // world - 1))


def _rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes) in a torch.distributed run; (0, 1) otherwise."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _from_rank0(compute):
    """compute() run by rank 0 alone, its result (or its ZoomViTError) on every rank: one decision about the
    shared work folder, taken before any rank writes to it."""
    rank, world = _rank_world()
    result = None
    if rank == 0:
        try:
            result = compute()
        except ZoomViTError as exc:
            result = exc
    if world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, ZoomViTError):
        raise result
    return result


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets and env:// reads


def rank_device(device) -> torch.device:
    """Under torchrun, a GPU without a number is this process's own, cuda:LOCAL_RANK (one GPU per process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def distributed(device="cpu"):
    """The process group of a torchrun launch for the block (gloo for a model on the CPU, nccl on a CUDA GPU), so
    that `evaluate` shares the work out; nothing for a process torchrun did not start."""
    if not all(name in os.environ for name in _TORCHRUN_ENV) or dist.is_initialized():
        yield
        return
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # nccl's collectives run on the current GPU: make it this process's
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---- pass 1: per image ------------------------------------------------------------------------------------


def _prune_configs(tasks, keeps):
    configs = [(m, c, k) for m, names in CRITERIA.items() for c in names for k in keeps] if "prune" in tasks else []
    if "intent" in tasks:  # the intent groups need keep INTENT_KEEP in both modes, listed or not
        configs += [cfg for cfg in (("analysis", "intent", INTENT_KEEP), ("efficiency", "merge", INTENT_KEEP))
                    if cfg not in configs]
    return configs


def _group_pass(bundle, entries, items, tasks, intent_keeps, after_block, need_scores) -> dict:
    """Pass 1 for one group of images, [(index, LoadedImage, None) or (index, None, error)]: {index: record}, where
    a record holds the image's CSV row, its analysis-mode pruning scores (None unless `need_scores`), its
    perturbation curves and its share of the batched analysis pass's time, or the error that skips it. The group's
    analysis pass is one batch, and its perturbation forwards run together (see
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
        for (index, *_), analysis in zip(group, analyses):
            row, scores = _image_results(analysis, items[index], tasks, intent_keeps, after_block, need_scores)
            records[index] = {"row": row, "scores": scores, "analysis_ms": analysis_ms, "curves": None,
                              "num_tokens": analysis.attentions.shape[-1]}
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


def _image_results(analysis, item, tasks, intent_keeps, after_block, need_scores):
    """One analysed image's CSV row (without the faithfulness columns) and its analysis-mode pruning scores."""
    predicted = analysis.predicted
    row = {
        "file": item.file, **item.groups, "label": item.label, "predicted": predicted,
        "correct": int(predicted == item.label), "confidence": float(analysis.probs[predicted]),
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
    zoom_result = zoom.zoom(analysis) if {"zoom", "intent"} & set(tasks) else None
    if "zoom" in tasks:
        after, crop = int(np.argmax(zoom_result.probs_after)), int(np.argmax(zoom_result.probs_crop))
        row.update(
            zoomed=int(zoom_result.zoomed), zoom_predicted=after, zoom_correct=int(after == item.label),
            crop_correct=int(crop == item.label), zoom_confidence=float(zoom_result.probs_after[predicted]),
            zoom_source=zoom_result.source,
            **{f"zoom_{k}": round(v, 1) for k, v in zip(BOX_COLUMNS, zoom_result.box)},
        )
        if item.box is not None:
            row["pointing_hit"] = int(peak_in_box(analysis, zoom.focus_map(analysis), item.box))
            row["box_iou"] = box_iou(zoom_result.box, item.box)
    if "intent" in tasks:
        diagnosis = intent.diagnose(analysis, box=item.box, zoom_result=zoom_result)
        row["intent"] = diagnosis.kind
        row.update({f"intent_{k}": v for k, v in diagnosis.metrics.items()})
    return row, scores


# ---- pass 2: pruning --------------------------------------------------------------------------------------


def _fusion(mode: str, criterion: str) -> str:
    """What happens to the tokens a configuration does not keep (see `pruning.forward_pruned`)."""
    return "merge" if mode == "efficiency" and criterion in ("merge", "random") else "drop"


OWN_SCORES = ("merge", "cls_topk")  # criteria that rank by the model's own attention at the cut (no scores passed)


def _patch_scores(criterion, keep, scores, random_scores):
    """The ranking one configuration prunes a batch by (`scores`: its images' pass-1 scores, `random_scores`: its
    rows of the random baseline's); None = efficiency mode's own attention scores."""
    if criterion in OWN_SCORES:
        return None
    if criterion == "intent":
        return torch.stack([s["intent"][keep] for s in scores])
    if criterion == "grad_rollout":
        return torch.stack([s["grad_rollout"] for s in scores])
    return random_scores


def _batches(kept, rank, world):
    """This rank's pruning batches, (start, image indices): every world-th batch of PRUNE_BATCH readable images.
    The batches are a single process's: a batch's logits depend on which images share it."""
    return [(start, kept[start:start + PRUNE_BATCH]) for start in range(0, len(kept), PRUNE_BATCH)[rank::world]]


def _pixels(bundle, images, entry):
    index, loaded, error = entry
    if error is not None:
        raise ZoomViTError(f"{images.items[index].file} could be read in pass 1 but not now: {error}")
    return encode(bundle, loaded)[0]


def _prune_pass(bundle, images, kept, records, configs, after_block, workers, progress, timings):
    """{config: (predicted (N,), probability of the unpruned prediction (N,), latency ratio)} for the N readable
    images `kept` (indices into `images`, in order) on rank 0; None on the other ranks.

    Accuracy runs every configuration over all images in batches (under torch.distributed every rank runs its
    share, see `_batches`, and rank 0 gathers them). The images are decoded again rather than kept from pass 1:
    the same pixels, without holding a whole data set's in memory. `records`: pass 1's, at least for this rank's
    batches. Latency is timed afterwards on the first batch, on rank 0 once the others are done (see
    `_latency_ratios`; its seconds go to `timings["latency_seconds"]`). Timing inside the accuracy loop gave ratios
    0.05-0.25 too high on 2 cores: one unpruned run per batch is too noisy a reference."""
    rank, world = _rank_world()
    n = len(kept)
    batches = _batches(kept, rank, world)
    if batches:
        num_patches = len(records[batches[0][1][0]]["scores"]["grad_rollout"])
        random_scores = torch.rand(n, num_patches, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(images, batch_sampler=[indices for _, indices in batches], num_workers=workers,
                        collate_fn=list)
    results, first_pixels = {}, None
    bar = tqdm(total=len(batches) * len(configs), desc="pruning", unit="run", file=sys.stderr, disable=not progress)
    for (start, indices), entries in zip(batches, loader):
        pixels = torch.cat([_pixels(bundle, images, entry) for entry in entries])
        scores = [records[i]["scores"] for i in indices]
        before = torch.tensor([[records[i]["row"]["predicted"]] for i in indices])
        batch_random = random_scores[start:start + len(indices)]
        results[start] = {}
        cuts = {}  # the blocks before the cut run once per batch (twice when some configurations need scores)
        for mode, criterion, keep in configs:
            fusion, patch_scores = _fusion(mode, criterion), _patch_scores(criterion, keep, scores, batch_random)
            with_scores = pruning.needs_own_scores(bundle, pixels, keep, patch_scores)
            if with_scores not in cuts:
                cuts[with_scores] = pruning.run_to_cut(bundle, pixels, after_block, with_scores)
            logits, _ = pruning.finish_pruned(bundle, cuts[with_scores], keep, patch_scores, fusion)
            results[start][mode, criterion, keep] = (logits.argmax(-1).numpy(),
                                                     logits.softmax(-1).gather(1, before)[:, 0].numpy())
            bar.update()
        if start == 0:
            first_pixels = pixels
    bar.close()
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank != 0:
            return None
        results = {start: part for ranks in gathered for start, part in ranks.items()}
    out = {cfg: (np.zeros(n, dtype=int), np.zeros(n)) for cfg in configs}
    for start, part in results.items():
        for cfg, values in part.items():
            for column, value in zip(out[cfg], values):
                column[start:start + len(value)] = value
    latency_started = time.perf_counter()
    latency = _latency_ratios(bundle, first_pixels, random_scores[:PRUNE_BATCH], configs, after_block, progress)
    timings["latency_seconds"] = time.perf_counter() - latency_started
    return {cfg: (*out[cfg], latency[cfg]) for cfg in configs}


def _latency_ratios(bundle, pixels, some_scores, configs, after_block, progress):
    """{config: median pruned time / median unpruned time} on one batch, over LATENCY_ROUNDS interleaved rounds
    (unpruned, then every distinct computation). Medians of several rounds: single runs on a shared 2-core
    machine vary by up to 70%."""
    paths = {cfg: (_fusion(*cfg[:2]), cfg[1] in OWN_SCORES, cfg[2]) for cfg in configs}
    full_times, times = [], {path: [] for path in set(paths.values())}
    for _ in tqdm(range(LATENCY_ROUNDS), desc="timing", unit="round", file=sys.stderr, disable=not progress):
        full_times.append(pruning.timed(lambda: pruning.forward_pruned(bundle, pixels, after_block, 1.0), bundle.device))
        for path in sorted(times):
            fusion, own_scores, keep = path
            scores = None if own_scores else some_scores
            run = lambda: pruning.forward_pruned(bundle, pixels, after_block, keep, scores, fusion)
            times[path].append(pruning.timed(run, bundle.device))
    full = float(np.median(full_times))
    return {cfg: float(np.median(times[path])) / full for cfg, path in paths.items()}


# ---- summaries --------------------------------------------------------------------------------------------


def _mean(values) -> float | None:
    values = np.asarray(values, dtype=float)
    return float(values.mean()) if values.size else None


def _change_summary(labels, before_pred, before_conf, after_pred, after_conf):
    """How a second look (pruned or zoomed) changes accuracy and the confidence in the first decision."""
    correct = before_pred == labels
    wrong = ~correct
    change = after_conf - before_conf
    return {
        "top1": _mean(after_pred == labels),
        "agreement": _mean(after_pred == before_pred),
        "confidence": _mean(after_conf),
        "confidence_change": _mean(change),
        "confidence_change_correct": _mean(change[correct]),
        "confidence_change_wrong": _mean(change[wrong]),
        "errors_kept": _mean(after_pred[wrong] == before_pred[wrong]),  # same wrong class again
        "errors_fixed": _mean(after_pred[wrong] == labels[wrong]),
        "correct_lost": _mean(after_pred[correct] != labels[correct]),
    }


def _zoom_summary(rows, has_boxes):
    def block(rs):
        out = {
            "n": len(rs),
            "top1_before": _mean([r["correct"] for r in rs]),
            "top1_after": _mean([r["zoom_correct"] for r in rs]),
            "top1_crop": _mean([r["crop_correct"] for r in rs]),
            "zoomed_fraction": _mean([r["zoomed"] for r in rs]),
        }
        if has_boxes:
            out["pointing_game"] = _mean([r["pointing_hit"] for r in rs])
            out["box_iou"] = _mean([r["box_iou"] for r in rs])
        return out

    summary = block(rows)
    groups = {}
    for column in GROUP_COLUMNS:
        values = sorted({r[column] for r in rows if column in r})
        if values:
            groups[column] = {v: block([r for r in rows if r.get(column) == v]) for v in values}
    if groups:
        summary["groups"] = groups
    return summary


def _intent_summary(rows, pruned):
    labels = np.array([r["label"] for r in rows])
    kinds = np.array([r["intent"] for r in rows])
    before = np.array([r["predicted"] for r in rows])
    confidence = np.array([r["confidence"] for r in rows])
    summary = {}
    for kind in intent.KINDS:
        sel = kinds == kind
        group = {"n": int(sel.sum()), "fraction": float(sel.mean()), "top1": _mean(before[sel] == labels[sel]),
                 "confidence": _mean(confidence[sel])}
        for mode, criterion in (("analysis", "intent"), ("efficiency", "merge")):
            predicted, kept_prob, _ = pruned[(mode, criterion, INTENT_KEEP)]
            group[f"prune_{mode}"] = {
                "criterion": criterion, "keep": INTENT_KEEP,
                **_change_summary(labels[sel], before[sel], confidence[sel], predicted[sel], kept_prob[sel]),
            }
        if "zoom_predicted" in rows[0]:
            zoomed = np.array([r["zoom_predicted"] for r in rows])
            zoom_conf = np.array([r["zoom_confidence"] for r in rows])
            group["zoom"] = _change_summary(labels[sel], before[sel], confidence[sel], zoomed[sel], zoom_conf[sel])
        summary[kind] = group
    return summary


def _prune_summary(bundle, rows, pruned, keeps, after_block, num_tokens):
    labels = np.array([r["label"] for r in rows])
    before = np.array([r["predicted"] for r in rows])
    entries = []
    for (mode, criterion, keep), (predicted, _, latency_ratio) in pruned.items():
        if keep not in keeps:
            continue  # only run for the intent groups
        _, tokens_after, macs_before, macs_after = pruning.pruned_macs(
            bundle, num_tokens, keep, after_block, mode, _fusion(mode, criterion)
        )
        entries.append({
            "mode": mode, "criterion": criterion, "keep": keep,
            "top1": _mean(predicted == labels), "agreement": _mean(predicted == before),
            "macs_ratio": macs_after / macs_before, "latency_ratio": latency_ratio,
            "tokens_after": tokens_after,
        })
    return entries


def _faithfulness_summary(rows, curves, has_boxes):
    entries = []
    for m in FAITHFULNESS_METHODS:
        entry = {
            "method": m,
            "deletion_auc": _mean([r[f"deletion_{m}"] for r in rows]),
            "insertion_auc": _mean([r[f"insertion_{m}"] for r in rows]),
            "deletion_curve": np.mean([c[m][0] for c in curves], axis=0).tolist(),
            "insertion_curve": np.mean([c[m][1] for c in curves], axis=0).tolist(),
        }
        if has_boxes and m != "random":
            entry["pointing_game"] = _mean([r[f"pointing_{m}"] for r in rows])
        entries.append(entry)
    return entries


@dataclass
class Evaluation:
    summary: dict  # what results.json holds
    rows: list[dict]  # one per evaluated image: the per-image CSV


def evaluate(
    bundle: ViTBundle,
    data,
    limit: int | None = None,
    keeps=DEFAULT_KEEPS,
    after_block: int = config.PRUNE_AFTER_BLOCK,
    tasks=TASKS,
    progress: bool = True,
    work_dir=None,
    resume: bool = False,
    workers: int | None = None,
    batch: int = config.EVAL_BATCH,
) -> Evaluation | None:
    """Run the evaluation tasks over a labelled folder (see the module docstring).

    Pass 1 writes one file per image to `work_dir` (a temporary folder when None; see `_open_work`): with `resume`
    a run interrupted there goes on with the images it had not done. Images are decoded by `workers` DataLoader
    processes (None: `default_workers`; 0: this process). Pass 1 analyses `batch` images at a time (one batched
    analysis pass; their perturbation forwards run together). Under torch.distributed (torchrun, see
    `distributed`) each process takes a share of the image groups and of the pruning batches, all in the one shared
    `work_dir`: rank 0 returns the Evaluation, the others None."""
    if work_dir is None:
        if _rank_world()[1] > 1:
            raise ZoomViTError("A distributed evaluation needs a work folder that every process shares (work_dir).")
        with tempfile.TemporaryDirectory(prefix="zoomvit-eval-") as work_dir:
            return evaluate(bundle, data, limit, keeps, after_block, tasks, progress, work_dir, resume, workers,
                            batch)
    started = time.perf_counter()
    data = Path(data)
    items = read_labels(data, limit)
    keeps = tuple(float(k) for k in keeps)
    tasks = tuple(t for t in TASKS if t in tasks)
    check_after_block(after_block, bundle.num_layers)
    num_labels = len(bundle.id2label)
    for item in items:
        if not 0 <= item.label < num_labels:
            raise ZoomViTError(f"{item.file}: label_index {item.label} is outside this model's 0..{num_labels - 1}.")
    configs = _prune_configs(tasks, keeps)
    intent_keeps = sorted({k for m, c, k in configs if c == "intent"})
    has_boxes = items[0].box is not None

    rank, world = _rank_world()
    progress = progress and rank == 0  # one set of bars, not one per process
    workers = default_workers(world) if workers is None else workers
    work = Path(work_dir)
    if not isinstance(batch, int) or batch < 1:
        raise ZoomViTError(f"--batch must be a whole number of images, at least 1, got {batch!r}.")
    fingerprint = _fingerprint(bundle, data, items, limit, keeps, tasks, after_block, batch)
    finished = _from_rank0(lambda: _open_work(work, fingerprint, resume))
    images = _Images(data, items)
    todo = _groups_to_do(len(items), finished, batch)[rank::world]  # even shares of what is left
    loader = DataLoader(images, batch_sampler=todo, num_workers=workers, collate_fn=list)  # decodes ahead
    bar = tqdm(total=sum(map(len, todo)), desc=f"images ({data.name})", unit="img", file=sys.stderr,
               disable=not progress)
    for entries in loader:
        records = _group_pass(bundle, entries, items, tasks, intent_keeps, after_block, bool(configs))
        for index, record in records.items():
            if "error" in record:  # one bad file should not sink a long run: report it and go on
                _save_record(work, index, record, skipped=True)
                continue
            curves = record["curves"]  # tensors, not arrays: torch.load(weights_only=True) reads no arrays
            record["curves"] = curves and {m: tuple(map(torch.from_numpy, pair)) for m, pair in curves.items()}
            _save_record(work, index, record)
        bar.update(len(entries))
    bar.close()
    _barrier()  # every image has its file now
    images_seconds = time.perf_counter() - started
    finished = _finished(work)
    if len(finished) < len(items):  # each machine of a multi-machine run wrote to a disk of its own
        raise ZoomViTError(f"{work} lacks {len(items) - len(finished)} images' results: every process of a run must "
                           "write to the same folder (a shared file system across machines).")
    kept = sorted(i for i, skipped in finished.items() if not skipped)
    if not kept:
        raise ZoomViTError(f"No image in {data} could be read ({_load_record(work, min(finished), True)['error']}).")
    if rank == 0:  # it summarises every image
        needed = kept
    else:  # the others need only their pruning batches' files
        needed = [i for _, indices in _batches(kept, rank, world) for i in indices] if configs else []
    records = {i: _load_record(work, i) for i in needed}

    pruned, timings = {}, {}
    if configs:
        pruned = _prune_pass(bundle, images, kept, records, configs, after_block, workers, progress, timings)
    if rank != 0:
        return None
    rows = [records[i]["row"] for i in kept]
    for (mode, criterion, keep), (predicted, *_) in pruned.items():
        if keep in keeps and "prune" in tasks:
            for row, p in zip(rows, predicted):
                row[f"prune_{mode}_{criterion}_{keep:g}"] = int(p)
    skipped = [{"file": items[i].file, "error": _load_record(work, i, True)["error"]}
               for i in sorted(finished) if finished[i]]

    summary = {
        "model": bundle.name,
        "data": str(data),
        "n": len(rows),
        "top1": _mean([r["correct"] for r in rows]),
        "settings": {"tasks": list(tasks), "keep": list(keeps), "after_block": after_block, "limit": limit,
                     "batch": batch, "prune_batch": PRUNE_BATCH, "latency_rounds": LATENCY_ROUNDS,
                     "faithfulness_steps": faithfulness.STEPS},
    }
    if "prune" in tasks:
        summary["prune"] = _prune_summary(bundle, rows, pruned, keeps, after_block, records[kept[0]]["num_tokens"])
    if "zoom" in tasks:
        summary["zoom"] = _zoom_summary(rows, has_boxes)
    if "faithfulness" in tasks:
        curves = [{m: tuple(t.numpy() for t in pair) for m, pair in records[i]["curves"].items()} for i in kept]
        summary["faithfulness"] = _faithfulness_summary(rows, curves, has_boxes)
    if "intent" in tasks:
        summary["intent"] = _intent_summary(rows, pruned)
    summary["skipped"] = skipped
    summary["speed"] = {
        "analysis_ms_median": float(np.median([records[i]["analysis_ms"] for i in kept])),
        "images_seconds": round(images_seconds, 1),
        "latency_seconds": round(timings.get("latency_seconds", 0.0), 1),  # timing the pruning (one batch)
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    summary["machine"] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    return Evaluation(summary, rows)


# ---- outputs ----------------------------------------------------------------------------------------------

PLOTS = {"prune": "prune.png", "zoom": "zoom.png", "faithfulness": "faithfulness.png"}


def write_outputs(evaluation: Evaluation, out_dir) -> list[Path]:
    """results.json, per_image.csv, the plots of the tasks that ran, and report.md; returns the paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZoomViTError(f"Could not create {out}: {exc}") from None
    summary = evaluation.summary
    written = [out / "results.json", out / "per_image.csv"]
    written[0].write_text(json.dumps(summary, indent=1) + "\n")
    columns = list(dict.fromkeys(k for row in evaluation.rows for k in row))
    with open(written[1], "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(evaluation.rows)
    figures = {"prune": visualization.plot_pruning, "zoom": visualization.plot_zoom,
               "faithfulness": visualization.plot_faithfulness}
    for task, name in PLOTS.items():
        if task in summary:
            figures[task](summary).savefig(out / name, dpi=110)
            written.append(out / name)
    (out / "report.md").write_text(markdown_report(summary))
    written.append(out / "report.md")
    return written


# The engine and evaluation issues' goals on DeiT-Tiny (points are top-1 percentage points).
GOALS = {
    ("analysis", 0.3): 1.0, ("analysis", 0.1): 5.0,  # max drop, intent criterion
    ("efficiency", 0.5): 1.5, ("efficiency", 0.3): 5.0,  # max drop, merge criterion
}
LATENCY_SLACK = 0.05
ZOOM_GOALS = {"overall": 0.55, "blur": 0.65, "pointing_game": 0.85}
FAITHFULNESS_MARGIN = 3.0  # best map's deletion AUC (points) at least this far below rollout's


def goal_checks(summary: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for every goal the summary has figures for."""
    checks = []
    for entry in summary.get("prune", []):
        ours = "intent" if entry["mode"] == "analysis" else "merge"
        limit = GOALS.get((entry["mode"], entry["keep"]))
        if entry["criterion"] != ours or limit is None:
            continue
        change = 100 * (entry["top1"] - summary["top1"])
        checks.append((f"{entry['mode']} pruning, keep {entry['keep']:g}: top-1 drop <= {limit:g} points",
                       f"{change:+.1f} points", -change <= limit))
        if entry["mode"] == "efficiency":
            checks.append((f"efficiency keep {entry['keep']:g}: latency ratio <= MACs ratio + {LATENCY_SLACK}",
                           f"{entry['latency_ratio']:.2f} vs {entry['macs_ratio']:.2f}",
                           entry["latency_ratio"] <= entry["macs_ratio"] + LATENCY_SLACK))
    z = summary.get("zoom")
    if z and "pointing_game" in z:
        checks.append((f"top-1 after adaptive zoom >= {ZOOM_GOALS['overall']:.0%}", f"{z['top1_after']:.1%}",
                       z["top1_after"] >= ZOOM_GOALS["overall"]))
        blur = z.get("groups", {}).get("background", {}).get("blur")
        if blur:
            checks.append((f"blur items: top-1 after zoom >= {ZOOM_GOALS['blur']:.0%}", f"{blur['top1_after']:.1%}",
                           blur["top1_after"] >= ZOOM_GOALS["blur"]))
        checks.append((f"map peak inside the object box >= {ZOOM_GOALS['pointing_game']:.0%}",
                       f"{z['pointing_game']:.1%}", z["pointing_game"] >= ZOOM_GOALS["pointing_game"]))
    elif z:
        checks.append(("top-1 with adaptive zoom not lower than without",
                       f"{z['top1_before']:.1%} -> {z['top1_after']:.1%}", z["top1_after"] >= z["top1_before"]))
    faith = {e["method"]: e for e in summary.get("faithfulness", [])}
    if "rollout" in faith:
        best = min((e for m, e in faith.items() if m != "random"), key=lambda e: e["deletion_auc"])
        gap = 100 * (faith["rollout"]["deletion_auc"] - best["deletion_auc"])
        checks.append((f"best map's deletion AUC <= rollout's - {FAITHFULNESS_MARGIN:g} points",
                       f"{best['method']} {100 * best['deletion_auc']:.2f} vs rollout "
                       f"{100 * faith['rollout']['deletion_auc']:.2f} ({gap:.2f} points better)",
                       gap >= FAITHFULNESS_MARGIN))
    return checks


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _signed(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def markdown_report(summary: dict) -> str:
    """The tables of one run, in Markdown (what the README's Results section is pasted from)."""
    s = summary
    lines = [f"**{Path(s['data']).name}**, n = {s['n']}, model `{s['model']}`: top-1 {_pct(s['top1'])}.", ""]
    if s["skipped"]:
        lines += [f"Skipped (unreadable): {len(s['skipped'])} files.", ""]
    if "prune" in s:
        lines += [f"Pruning after block {s['settings']['after_block']} (top-1 change in points; latency at batch "
                  f"{s['settings']['prune_batch']}):", "",
                  "| mode | criterion | keep | top-1 | change | agreement | MACs ratio | latency ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in s["prune"]:
            lines.append(f"| {e['mode']} | {e['criterion']} | {e['keep']:g} | {_pct(e['top1'])} | "
                         f"{_signed(e['top1'] - s['top1'])} | {_pct(e['agreement'])} | {e['macs_ratio']:.2f} | "
                         f"{e['latency_ratio']:.2f} |")
        lines.append("")
    if "zoom" in s:
        z = s["zoom"]
        boxes = "pointing_game" in z
        lines += ["Adaptive zoom (crop: the crop's own prediction, for comparison):", "",
                  "| items | n | top-1 before | top-1 after | crop only | zoomed |"
                  + (" pointing game | box IoU |" if boxes else ""),
                  "|---|---|---|---|---|---|" + ("---|---|" if boxes else "")]
        blocks = [("all", z)] + [(f"{col} = {v}", b) for col, g in z.get("groups", {}).items() for v, b in g.items()]
        for name, b in blocks:
            lines.append(f"| {name} | {b['n']} | {_pct(b['top1_before'])} | {_pct(b['top1_after'])} | "
                         f"{_pct(b['top1_crop'])} | {_pct(b['zoomed_fraction'])} |"
                         + (f" {_pct(b['pointing_game'])} | {b['box_iou']:.3f} |" if boxes else ""))
        lines.append("")
    if "faithfulness" in s:
        boxes = any("pointing_game" in e for e in s["faithfulness"])
        lines += ["Faithfulness (AUC × 100 of the predicted class's probability; deletion lower is better, insertion "
                  "higher):", "", "| map | deletion AUC | insertion AUC |" + (" pointing game |" if boxes else ""),
                  "|---|---|---|" + ("---|" if boxes else "")]
        for e in s["faithfulness"]:
            lines.append(f"| {e['method']} | {100 * e['deletion_auc']:.2f} | {100 * e['insertion_auc']:.2f} |"
                         + (f" {_pct(e.get('pointing_game'))} |" if boxes else ""))
        lines.append("")
    if "intent" in s:
        lines += [f"Intent groups: what pruning at keep {INTENT_KEEP:g} and adaptive zoom do (confidence = "
                  "probability of the unpruned prediction; changes in points):", "",
                  "| intent | n | top-1 | confidence | second look | top-1 after | agreement | confidence change "
                  "(right / wrong) | errors kept | errors fixed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for kind, g in s["intent"].items():
            looks = [(f"prune {m}", g[f"prune_{m}"]) for m in ("analysis", "efficiency")]
            looks += [("zoom", g["zoom"])] if "zoom" in g else []
            for i, (name, c) in enumerate(looks):
                head = f"| {kind} | {g['n']} | {_pct(g['top1'])} | {_pct(g['confidence'])} |" if i == 0 else "| | | | |"
                lines.append(f"{head} {name} | {_pct(c['top1'])} | {_pct(c['agreement'])} | "
                             f"{_signed(c['confidence_change'])} ({_signed(c['confidence_change_correct'])} / "
                             f"{_signed(c['confidence_change_wrong'])}) | {_pct(c['errors_kept'])} | "
                             f"{_pct(c['errors_fixed'])} |")
        lines.append("")
    checks = goal_checks(s)
    if checks:
        lines += ["Goals:", "", "| goal | measured | |", "|---|---|---|"]
        lines += [f"| {goal} | {measured} | {'met' if met else 'MISSED'} |" for goal, measured, met in checks]
        lines.append("")
    sp = s["speed"]
    lines.append(f"Analysis pass {sp['analysis_ms_median']:.1f} ms per image (median); whole run "
                 f"{sp['total_seconds'] / 60:.1f} min on {s['machine']['threads']} threads "
                 f"({s['machine']['processor']}, torch {s['machine']['torch']}).")
    return "\n".join(lines) + "\n"
