"""Pass 2 of `zoomvit eval`: every pruning configuration (mode, criterion, keep) over all readable images in
batches of PRUNE_BATCH, then timed on one batch against the unpruned forward (see `prune_pass`); under
torch.distributed every process runs its share of the batches."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from zoomvit import pruning
from zoomvit.errors import ZoomViTError
from zoomvit.evaluation.data import decode_ahead
from zoomvit.evaluation.tasks import OWN_SCORES, PrunedRun, fusion
from zoomvit.evaluation.work import rank_world
from zoomvit.geometry import encode

PRUNE_BATCH = 32  # the batch the engine's latency goal is stated at
LATENCY_ROUNDS = 5


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


def rank_batches(kept, rank, world):
    """This rank's pruning batches, (start, image indices): every world-th batch of PRUNE_BATCH readable images.
    The batches are a single process's: a batch's logits depend on which images share it."""
    return [(start, kept[start : start + PRUNE_BATCH]) for start in range(0, len(kept), PRUNE_BATCH)[rank::world]]


def _pixels(bundle, images, entry):
    index, loaded, error = entry
    if error is not None:
        raise ZoomViTError(f"{images.items[index].file} could be read in pass 1 but not now: {error}")
    return encode(bundle, loaded)[0]


def prune_pass(
    bundle, images, kept, records, configs, after_block, workers, progress, timings, record_kept=(), timing=True
):
    """{config: PrunedRun} for the N readable images `kept` (indices into `images`, in order) on rank 0; None on
    the other ranks. The configurations in `record_kept` also give the patch tokens each image kept.

    Accuracy runs every configuration over all images in batches (under torch.distributed every rank runs its
    share, see `rank_batches`, and rank 0 gathers them). The images are decoded again rather than kept from pass 1:
    the same pixels, without holding a whole data set's in memory. `records`: pass 1's, at least for this rank's
    batches. Latency is timed afterwards on the first batch, on rank 0 once the others are done (see
    `_latency_ratios`; its seconds go to `timings["latency_seconds"]`), unless `timing` is False: the ratios are
    then None. Timing inside the accuracy loop gave ratios 0.05-0.25 too high on 2 cores: one unpruned run per
    batch is too noisy a reference."""
    rank, world = rank_world()
    n = len(kept)
    batches = rank_batches(kept, rank, world)
    if batches:
        num_patches = len(records[batches[0][1][0]]["scores"]["grad_rollout"])
        random_scores = torch.rand(n, num_patches, generator=torch.Generator().manual_seed(0))
    loader = decode_ahead(images, [indices for _, indices in batches], workers)
    results, first_pixels = {}, None
    with tqdm(
        total=len(batches) * len(configs), desc="pruning", unit="run", file=sys.stderr, disable=not progress
    ) as bar:
        for (start, indices), entries in zip(batches, loader):
            pixels = torch.cat([_pixels(bundle, images, entry) for entry in entries])
            scores = [records[i]["scores"] for i in indices]
            before = torch.tensor([[records[i]["row"]["predicted"]] for i in indices])
            batch_random = random_scores[start : start + len(indices)]
            results[start] = {}
            cuts = {}  # the blocks before the cut run once per batch (twice when some configurations need scores)
            for mode, criterion, keep in configs:
                patch_scores = _patch_scores(criterion, keep, scores, batch_random)
                with_scores = pruning.needs_own_scores(bundle, pixels, keep, patch_scores)
                if with_scores not in cuts:
                    cuts[with_scores] = pruning.run_to_cut(bundle, pixels, after_block, with_scores)
                logits, keep_idx = pruning.finish_pruned(
                    bundle, cuts[with_scores], keep, patch_scores, fusion(mode, criterion)
                )
                probs = logits.softmax(-1)
                results[start][mode, criterion, keep] = (
                    logits.argmax(-1).numpy(),
                    probs.gather(1, before)[:, 0].numpy(),
                    probs.max(-1).values.numpy(),
                    keep_idx.numpy().astype(np.int32) if (mode, criterion, keep) in record_kept else None,
                )
                bar.update()
            if start == 0:
                first_pixels = pixels
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank != 0:
            return None
        results = {start: part for ranks in gathered for start, part in ranks.items()}
    out = {cfg: [np.zeros(n, dtype=int), np.zeros(n), np.zeros(n), None] for cfg in configs}
    for start, part in results.items():
        for cfg, values in part.items():
            if values[3] is not None and out[cfg][3] is None:
                out[cfg][3] = np.zeros((n, values[3].shape[1]), dtype=np.int32)
            for column, value in zip(out[cfg], values):
                if value is not None:
                    column[start : start + len(value)] = value
    latency_started = time.perf_counter()
    if timing:
        latency = _latency_ratios(bundle, first_pixels, random_scores[:PRUNE_BATCH], configs, after_block, progress)
    else:
        latency = dict.fromkeys(configs)
    timings["latency_seconds"] = time.perf_counter() - latency_started
    return {cfg: PrunedRun(*out[cfg][:3], latency[cfg], out[cfg][3]) for cfg in configs}


def _latency_ratios(bundle, pixels, some_scores, configs, after_block, progress):
    """{config: median pruned time / median unpruned time} on one batch, over LATENCY_ROUNDS interleaved rounds
    (unpruned, then every distinct computation; see `pruning.interleaved_ms`). Medians of several rounds: single
    runs on a shared 2-core machine vary by up to 70%."""
    paths = {cfg: (fusion(*cfg[:2]), cfg[1] in OWN_SCORES, cfg[2]) for cfg in configs}
    distinct = sorted(set(paths.values()))

    def run(path):
        how, own_scores, keep = path
        scores = None if own_scores else some_scores
        return lambda: pruning.forward_pruned(bundle, pixels, after_block, keep, scores, how)

    full = lambda: pruning.forward_pruned(bundle, pixels, after_block, 1.0)
    bar = tqdm(total=LATENCY_ROUNDS, desc="timing", unit="round", file=sys.stderr, disable=not progress)
    full_ms, *path_ms = pruning.interleaved_ms(
        [full, *map(run, distinct)], LATENCY_ROUNDS, bundle.device, on_round=bar.update
    )
    bar.close()
    median_full, medians = float(np.median(full_ms)), dict(zip(distinct, map(np.median, path_ms)))
    return {cfg: float(medians[path]) / median_full for cfg, path in paths.items()}
