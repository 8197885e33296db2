"""Token pruning after block k: the remaining blocks run on the kept tokens only (a real cut in compute).

Two modes:
- analysis: tokens ranked by the intent map of the tokens that enter block k, from the full cached pass
  ("does the decision survive when the model sees only its intent?"). Uses look-ahead; saves no time.
- efficiency: tokens chosen at block k from what the model has computed so far: half the budget by the
  attention the decision (the tokens the head reads) paid to each patch in the last blocks before the cut,
  half to cover the rest of the content; dropped tokens are merged into their most similar kept token
  (size-weighted mean, with proportional attention afterwards).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from zoomvit import config
from zoomvit.checks import check_after_block, check_keep
from zoomvit.errors import ZoomViTError
from zoomvit.models import ViTBundle
from zoomvit.vit_analyzer import Analysis, Prediction, top_predictions

MODES = config.PRUNE_MODES
FUSIONS = config.PRUNE_FUSIONS  # efficiency mode: what happens to the tokens that are not kept


def kept_count(num_patches: int, keep: float) -> int:
    keep = check_keep(keep)
    return max(1, min(num_patches, int(round(keep * num_patches))))


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, idx[b]] for each image b: (B, K, ...). An index_select per image: a gather along an expanded index
    reads the same values at about twice the cost (measured at batch 1 and 32 on the CPU)."""
    if len(t) == 1:  # stacking one tensor would copy it
        return t[0].index_select(0, idx[0]).unsqueeze(0)
    return torch.stack([rows.index_select(0, i) for rows, i in zip(t, idx)])


def select_with_coverage(scores: torch.Tensor, features: torch.Tensor, n_keep: int, important_share: float = 0.5):
    """Kept patch indices: the top `important_share` of the budget by score, the rest greedily chosen as the
    tokens least similar (cosine) to anything kept so far, so every kind of content keeps a representative
    that dropped tokens can merge into. Returns (keep_idx, drop_idx), each (B, count), sorted ascending, and
    each dropped token's merge partner (B, dropped): the position in keep_idx of its most similar kept token
    (the first on a tie)."""
    n_important = max(1, int(round(n_keep * important_share)))
    features = features.float()  # cosines in float32: bfloat16 ties near-duplicates the greedy order tells apart
    unit = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    similarity = unit @ unit.transpose(1, 2)
    # A token "covers itself" above any cosine: once kept, the coverage update lifts it out of the running, so
    # the loop needs no mask of the kept tokens.
    similarity.diagonal(dim1=1, dim2=2).fill_(_COVERED)
    # The greedy loop is sequential and its steps tiny: on the CPU numpy runs them (a step costs a microsecond or
    # two, ten times that in torch); elsewhere torch does, without a synchronisation per step.
    cover = _cover_numpy if similarity.device.type == "cpu" else _cover_torch
    return cover(scores, similarity, n_important, n_keep)


_COVERED = 3.0  # above any cosine


def _cover_numpy(scores, similarity, n_important, n_keep):
    """(keep_idx, drop_idx, partner) of `select_with_coverage` given the similarity (its diagonal _COVERED), in
    numpy, one image at a time: a row of one image's matrix is a view, where a row per image of the batch would
    be a copy at every step."""
    sim = similarity.detach().numpy()
    b, p, _ = sim.shape
    # Descending and stable, as torch's argsort(descending=True, stable=True): negating keeps equal scores equal.
    order = np.argsort(-scores.detach().float().cpu().numpy(), axis=1, kind="stable")
    keep_idx, drop_idx = np.empty((b, n_keep), dtype=np.int64), np.empty((b, p - n_keep), dtype=np.int64)
    partner = np.empty((b, p - n_keep), dtype=np.int64)
    for image, rows in enumerate(sim):
        important = order[image, :n_important]
        chosen = np.zeros(p, dtype=bool)
        chosen[important] = True
        coverage = rows[:, important].max(axis=1)  # each token's highest cosine to the kept ones
        for _ in range(n_keep - n_important):
            newcomer = coverage.argmin()  # the first on a tie
            chosen[newcomer] = True
            np.maximum(coverage, rows[newcomer], out=coverage)
        keep_idx[image], drop_idx[image] = np.flatnonzero(chosen), np.flatnonzero(~chosen)
        partner[image] = rows[np.ix_(drop_idx[image], keep_idx[image])].argmax(axis=1)
    return torch.from_numpy(keep_idx), torch.from_numpy(drop_idx), torch.from_numpy(partner)


def _cover_torch(scores, similarity, n_important, n_keep):
    """The same as _cover_numpy in torch, on the similarity's device."""
    b, p, _ = similarity.shape
    important = scores.argsort(dim=1, descending=True, stable=True)[:, :n_important]
    coverage = torch.stack([rows.index_select(1, cols).amax(dim=1) for rows, cols in zip(similarity, important)])
    flat, offsets = similarity.reshape(b * p, p), torch.arange(b, device=similarity.device) * p
    picks = important.new_empty((b, n_keep - n_important))
    for step in range(n_keep - n_important):
        newcomer = coverage.argmin(dim=1)
        picks[:, step] = newcomer
        torch.maximum(coverage, flat.index_select(0, newcomer + offsets), out=coverage)
    chosen = torch.zeros(b, p, dtype=torch.bool, device=similarity.device)
    chosen.scatter_(1, torch.cat([important, picks], dim=1), True)
    keep_idx, drop_idx = chosen.nonzero()[:, 1].view(b, n_keep), (~chosen).nonzero()[:, 1].view(b, p - n_keep)
    partner = torch.stack(
        [
            rows.index_select(0, dropped).index_select(1, kept)
            for rows, dropped, kept in zip(similarity, drop_idx, keep_idx)
        ]
    ).argmax(dim=-1)
    return keep_idx, drop_idx, partner


def merge_into_kept(x, sizes, keep_idx, drop_idx, partner):
    """Each dropped token joins its merge partner (`select_with_coverage`); merged tokens are size-weighted means.
    `sizes` (B, N, 1), or None where every token counts once (a first merge: no multiplications by one). Returns
    the merged tokens (B, kept, D) and their sizes (B, kept, 1), in x's precision (bfloat16 counts exactly to
    256). The batch runs as one: its tokens are rows of one (B * N, D) matrix, the indices offset per image."""
    b, n, d = x.shape
    n_keep = keep_idx.shape[1]
    keep_idx, drop_idx, partner = keep_idx.to(x.device), drop_idx.to(x.device), partner.to(x.device)
    if b > 1:
        image = torch.arange(b, device=x.device).unsqueeze(1)
        keep_idx, drop_idx, partner = keep_idx + image * n, drop_idx + image * n, partner + image * n_keep
    keep_idx, drop_idx, partner = keep_idx.flatten(), drop_idx.flatten(), partner.flatten()
    flat = x.reshape(b * n, d)
    kept, dropped = flat.index_select(0, keep_idx), flat.index_select(0, drop_idx)
    if sizes is None:
        new_size = torch.bincount(partner, minlength=b * n_keep).add_(1).to(x.dtype).unsqueeze(1)
    else:
        flat_sizes = sizes.reshape(b * n, 1)
        kept_size, dropped_size = flat_sizes.index_select(0, keep_idx), flat_sizes.index_select(0, drop_idx)
        kept, dropped = kept * kept_size, dropped * dropped_size
        new_size = kept_size.index_add(0, partner, dropped_size)
    total = kept.index_add_(0, partner, dropped)
    return (total / new_size).view(b, n_keep, d), new_size.view(b, n_keep, 1)


# Efficiency mode scores patches by the attention the decision row paid them in the last few blocks before
# the cut (earlier blocks attend too uniformly to tell); measured on DeiT-Tiny, 3 beats 1 and 6.
SCORE_BLOCKS = 3


@dataclass
class Cut:
    """The state at the cut: the tokens after `after_block` unpruned blocks and, when asked for, the efficiency
    scores (the decision row's attention to each patch over the last SCORE_BLOCKS blocks, float32). Several
    pruning configurations of one batch can share it (`finish_pruned`), so the blocks before the cut run once."""

    x: torch.Tensor
    after_block: int
    scores: torch.Tensor | None


@torch.inference_mode()
def run_to_cut(bundle: ViTBundle, pixel_values: torch.Tensor, after_block: int, with_scores: bool) -> Cut:
    after_block = check_after_block(after_block, bundle.num_layers, "after_block", last_allowed=True)
    ns = bundle.num_special
    x = bundle.adapter.embed(bundle.place(pixel_values))
    b, n, _ = x.shape
    scores = rows = row_weights = None
    if with_scores:
        scores = torch.zeros(b, n - ns, device=x.device)  # summed in float32
        decision = bundle.adapter.decision_weights(n)
        rows = int(decision.nonzero().max()) + 1  # the query rows the decision reads
        # One row of weight 1 (a class-token head): the weighted sum of the rows is that row, exactly.
        if rows > 1 or float(decision[0]) != 1.0:
            row_weights = decision[:rows].view(1, 1, rows, 1).to(x.device)
    for i in range(after_block):
        score_here = with_scores and i >= after_block - SCORE_BLOCKS
        # A class-token head reads prefix rows only, computed on their own (cheap); a head pooling the patches
        # reads patch rows too, which takes every row's probabilities.
        x, probs = bundle.adapter.block(
            i, x, attention_rows=rows if score_here and rows <= ns else 0, full_attention=score_here and rows > ns
        )
        if score_here:
            read = probs[:, :, 0, ns:] if row_weights is None else (probs[:, :, :rows, ns:] * row_weights).sum(dim=2)
            scores += read.mean(dim=1)
    return Cut(x, after_block, scores)


@torch.inference_mode()
def finish_pruned(
    bundle: ViTBundle, cut: Cut, keep: float = 1.0, patch_scores: torch.Tensor | None = None, fusion: str = "drop"
):
    """`forward_pruned` from a `Cut` (which must carry scores when patch_scores is None and tokens are pruned)."""
    if fusion not in FUSIONS:
        raise ZoomViTError(f"Unknown fusion '{fusion}': use one of {FUSIONS}.")
    ns = bundle.num_special
    x = cut.x
    b, n, _ = x.shape
    device = x.device
    num_patches = n - ns
    n_keep = kept_count(num_patches, keep)
    pruning = n_keep < num_patches
    bias = sizes = positions = None
    if not pruning:
        keep_idx = torch.arange(num_patches, device=device).expand(b, -1)
    else:
        scores = cut.scores
        if patch_scores is not None:
            scores = torch.as_tensor(patch_scores, dtype=torch.float32, device=device)
        if scores is None:
            raise ValueError("this cut was run without scores: pass patch_scores, or run_to_cut(with_scores=True)")
        special, patches = x[:, :ns], x[:, ns:]
        if fusion == "merge":
            keep_idx, drop_idx, partner = select_with_coverage(scores, patches, n_keep)
            kept, kept_size = merge_into_kept(patches, None, keep_idx, drop_idx, partner)
            x = torch.cat([special, kept], dim=1)
            sizes = torch.cat([torch.ones(b, ns, 1, dtype=x.dtype, device=device), kept_size], dim=1)
            bias = sizes.log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, N'): a merged key counts as its tokens
        else:
            order = scores.argsort(dim=1, descending=True, stable=True)
            keep_idx, drop_idx = order[:, :n_keep], order[:, n_keep:]
            parts = [special, _gather(patches, keep_idx)]
            if fusion == "fuse":  # EViT: one extra token, the score-weighted mean of the dropped ones
                weight = scores.gather(1, drop_idx).clamp_min(0).unsqueeze(-1) + 1e-6
                extra = (_gather(patches, drop_idx) * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True)
                parts.append(extra.to(x.dtype))  # the float32 weights promoted it
            x = torch.cat(parts, dim=1)
        # Each token's index in the unpruned sequence, for blocks with a position term (relative bias): a merged
        # token keeps its kept representative's, EViT's fused token (after the kept ones) has no single place (-1).
        # Made for every family (a few microseconds): it is also the record that the prefix stays first.
        fused = x.shape[1] - ns - n_keep
        positions = torch.cat(
            [
                torch.arange(ns, device=device).expand(b, -1),
                ns + keep_idx,
                torch.full((b, fused), -1, dtype=torch.long, device=device),
            ],
            dim=1,
        )
    for i in range(cut.after_block, bundle.num_layers):
        x, _ = bundle.adapter.block(i, x, attn_bias=bias, positions=positions)
    return bundle.adapter.head(x, sizes=sizes).float().cpu(), keep_idx.cpu()


def needs_own_scores(bundle: ViTBundle, pixel_values: torch.Tensor, keep: float, patch_scores) -> bool:
    """Whether a configuration ranks by the model's own attention at the cut (efficiency mode, really pruning)."""
    h, w = pixel_values.shape[-2:]
    num_patches = (h // bundle.patch_size) * (w // bundle.patch_size)
    return patch_scores is None and kept_count(num_patches, keep) < num_patches


def forward_pruned(
    bundle: ViTBundle,
    pixel_values: torch.Tensor,
    after_block: int = config.PRUNE_AFTER_BLOCK,
    keep: float = 1.0,
    patch_scores: torch.Tensor | None = None,
    fusion: str = "drop",
):
    """Logits with only the top `keep` share of patch tokens after `after_block` blocks.

    patch_scores (B, patches) ranks the patches (analysis mode, plain top-k). None means efficiency mode:
    rank by the decision row's attention (the query rows weighted as the head reads the tokens,
    `decision_weights`) over the last SCORE_BLOCKS blocks before the cut (no look-ahead); with fusion="merge"
    half the budget goes to the top-ranked tokens and half to covering the remaining content (see
    `select_with_coverage`), dropped tokens are merged into their nearest kept token, and pooled heads weigh the
    merged tokens by their sizes. Returns (logits, kept patch indices (B, kept)), float32 and on the CPU whatever
    the bundle's device and precision.
    """
    if fusion not in FUSIONS:
        raise ZoomViTError(f"Unknown fusion '{fusion}': use one of {FUSIONS}.")
    cut = run_to_cut(bundle, pixel_values, after_block, needs_own_scores(bundle, pixel_values, keep, patch_scores))
    return finish_pruned(bundle, cut, keep, patch_scores, fusion)


def block_macs(bundle: ViTBundle, tokens: int) -> int:
    """Multiply-accumulates of one block on `tokens` tokens: qkv + output projection, QK^T and AV, the MLP (its
    sizes read from its modules by the adapter: not every family's config names them, DINOv2's has mlp_ratio)."""
    return bundle.adapter.block_macs(tokens)


def model_macs(bundle: ViTBundle, tokens_before: int, tokens_after: int, after_block: int, extra: int = 0) -> int:
    cfg = bundle.adapter.config
    patches = tokens_before - bundle.num_special
    embed_macs = patches * cfg.num_channels * bundle.patch_size**2 * cfg.hidden_size
    head_macs = bundle.adapter.head_macs()
    blocks = after_block * block_macs(bundle, tokens_before)
    blocks += (bundle.num_layers - after_block) * block_macs(bundle, tokens_after)
    return int(embed_macs + blocks + head_macs + extra)


def pruned_macs(bundle: ViTBundle, num_tokens: int, keep: float, after_block: int, mode: str, fusion: str):
    """(tokens_before, tokens_after, macs_before, macs_after), analytic."""
    ns = bundle.num_special
    n_keep = kept_count(num_tokens - ns, keep)
    tokens_after = ns + n_keep + (1 if (mode == "efficiency" and fusion == "fuse" and n_keep < num_tokens - ns) else 0)
    extra = 0
    if mode == "efficiency" and fusion == "merge" and n_keep < num_tokens - ns:
        patches = num_tokens - ns
        extra = patches * patches * bundle.adapter.config.hidden_size  # the token similarity matrix
    before = model_macs(bundle, num_tokens, num_tokens, after_block)
    after = model_macs(bundle, num_tokens, tokens_after, after_block, extra)
    return num_tokens, tokens_after, before, after


def synchronize(device) -> None:
    """Wait until the work queued on `device` is done (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device="cpu") -> float:
    """Seconds one call of `fn` takes on `device`. GPU kernels run asynchronously: without waiting for the queue
    before starting and before stopping the clock, a GPU time would count launches, or an earlier call's work."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# prune() times the unpruned and the pruned forward this many times each, interleaved (see interleaved_ms): fewer
# runs gave ranges too wide to tell a real gain from a noisy neighbour on a shared CPU.
TIMING_REPEATS = 7


def median_ms(fn, repeats: int = 5, device="cpu") -> float:
    return float(np.median(interleaved_ms([fn], repeats, device)[0]))


def interleaved_ms(fns, repeats: int = 5, device="cpu", on_round=None) -> list[list[float]]:
    """Milliseconds of each of `fns` on `device`, `repeats` runs each after one warm-up (first calls pay for
    allocations and, on a GPU, kernel selection), taking turns so that a noisy neighbour on a shared CPU slows
    all of them alike instead of whichever ran during the noise. `on_round()`, if given, is called after each
    round (a progress bar's update)."""
    for fn in fns:
        timed(fn, device)
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, runs):
            times.append(timed(fn, device) * 1000)
        if on_round is not None:
            on_round()
    return runs


@dataclass
class PruneResult:
    mode: str
    keep: float
    after_block: int
    before: list[Prediction] = field(repr=False)  # (printing one shows a line, not every array and run)
    after: list[Prediction] = field(repr=False)
    probs_before: np.ndarray = field(repr=False)
    probs_after: np.ndarray = field(repr=False)
    kept_mask: np.ndarray = field(repr=False)  # (grid h, grid w) bool: patches that the later blocks still see
    tokens_before: int
    tokens_after: int
    macs_before: int
    macs_after: int
    latency_before_ms: float  # medians of the runs below
    latency_after_ms: float
    latency_before_runs: list[float] = field(default_factory=list, repr=False)
    latency_after_runs: list[float] = field(default_factory=list, repr=False)
    fusion: str | None = None  # what became of the dropped tokens (efficiency mode); None in analysis mode

    @property
    def decision_kept(self) -> bool:
        return self.before[0].index == self.after[0].index

    def latency_text(self, which: str) -> str:
        """'12.3 ms (11.9–14.0)': the median and the range of the "before" or "after" runs, as the CLI and the
        app show them (a median alone hides how noisy a shared CPU's timings are)."""
        median, runs = {
            "before": (self.latency_before_ms, self.latency_before_runs),
            "after": (self.latency_after_ms, self.latency_after_runs),
        }[which]
        return f"{median:.1f} ms ({min(runs):.1f}–{max(runs):.1f})" if runs else "not measured"

    @property
    def latency_within_noise(self) -> bool:
        """Whether the before and after ranges overlap: some run of one was as fast as some run of the other, so
        the timings cannot tell which is faster."""
        before, after = self.latency_before_runs, self.latency_after_runs
        return bool(before and after) and min(after) <= max(before) and min(before) <= max(after)

    def latency_verdict(self) -> str:
        """What the timings show, in words: the CLI's and the app's caveat."""
        if not (self.latency_before_runs and self.latency_after_runs):
            return "not timed"
        if self.latency_within_noise:
            return "the ranges overlap: the difference is within the timing noise"
        faster = max(self.latency_after_runs) < min(self.latency_before_runs)
        return f"every pruned run was {'faster' if faster else 'slower'} than every unpruned run"

    def as_dict(self):
        return {
            "mode": self.mode,
            "keep": self.keep,
            "after_block": self.after_block,
            "fusion": self.fusion,
            "before": [p.as_dict() for p in self.before],
            "after": [p.as_dict() for p in self.after],
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "latency_before_ms": round(self.latency_before_ms, 3),
            "latency_after_ms": round(self.latency_after_ms, 3),
            "latency_before_runs_ms": [round(t, 3) for t in self.latency_before_runs],
            "latency_after_runs_ms": [round(t, 3) for t in self.latency_after_runs],
            "latency_within_noise": self.latency_within_noise,
            "kept_mask": self.kept_mask.astype(int).tolist(),
        }


# Analysis mode: how much a candidate's similarity to already-kept tokens counts against it. Top-k of the intent
# map alone keeps near-duplicates of the most discriminative part; 0.2 measured best on DeiT-Tiny at keep 0.1.
REDUNDANCY_WEIGHT = 0.2


def intent_pick_order(analysis: Analysis, after_block: int, count: int) -> np.ndarray:
    """The first `count` patches analysis mode keeps, in pick order: greedily the highest intent (of the tokens
    entering block `after_block`, look-ahead allowed) minus REDUNDANCY_WEIGHT times the cosine similarity to the
    most similar token already picked. A smaller budget keeps a prefix of the same order."""
    intent = analysis.intent(from_block=after_block).reshape(-1).astype(np.float32)
    tokens = analysis.hidden_states[after_block, analysis.num_special :].astype(np.float32)
    unit = tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-6)
    similarity = np.clip(unit @ unit.T, 0, None)
    redundancy = np.zeros_like(intent)
    available = np.ones(intent.size, dtype=bool)
    order = np.empty(count, dtype=np.int64)
    for step in range(count):
        pick = int(np.where(available, intent - REDUNDANCY_WEIGHT * redundancy, -np.inf).argmax())
        order[step] = pick
        available[pick] = False
        np.maximum(redundancy, similarity[pick], out=redundancy)
    return order


def scores_from_order(order: np.ndarray, num_patches: int) -> torch.Tensor:
    """(1, patches) scores whose top len(order) are `order`, earlier picks first (what forward_pruned ranks by)."""
    scores = torch.zeros(num_patches)
    scores[torch.as_tensor(order)] = torch.arange(len(order), 0, -1, dtype=torch.float32)
    return scores.unsqueeze(0)


def analysis_scores(analysis: Analysis, after_block: int, keep: float) -> torch.Tensor:
    """Analysis-mode ranking (1, patches) whose top `keep` share is the tokens to keep (see intent_pick_order)."""
    num_patches = analysis.grid[0] * analysis.grid[1]
    return scores_from_order(intent_pick_order(analysis, after_block, kept_count(num_patches, keep)), num_patches)


def prune(
    analysis: Analysis,
    keep: float = config.PRUNE_KEEP,
    after_block: int = config.PRUNE_AFTER_BLOCK,
    mode: str = config.PRUNE_MODE,
    fusion: str = "merge",
    timing_repeats: int = TIMING_REPEATS,
) -> PruneResult:
    """Prune one analysed image and compare with the unpruned model (predictions, tokens, MACs, latency)."""
    bundle = analysis.bundle
    after_block = check_after_block(after_block, bundle.num_layers)
    if mode not in MODES:
        raise ZoomViTError(f"Unknown mode '{mode}': use one of {MODES}.")
    pixel_values = analysis.pixel_values
    scores = analysis_scores(analysis, after_block, keep) if mode == "analysis" else None
    fusion = fusion if mode == "efficiency" else "drop"
    run_full = lambda: forward_pruned(bundle, pixel_values, after_block, 1.0)
    run_pruned = lambda: forward_pruned(bundle, pixel_values, after_block, keep, scores, fusion)
    logits, keep_idx = run_pruned()
    probs_after = logits[0].softmax(-1).numpy()
    probs_before = analysis.probs
    gh, gw = analysis.grid
    mask = np.zeros(gh * gw, dtype=bool)
    mask[keep_idx[0].numpy()] = True
    num_tokens = analysis.attentions.shape[-1]
    tokens_before, tokens_after, macs_before, macs_after = pruned_macs(
        bundle, num_tokens, keep, after_block, mode, fusion
    )
    runs = interleaved_ms([run_full, run_pruned], timing_repeats, bundle.device) if timing_repeats else ([], [])
    runs_before, runs_after = runs
    latency_before = float(np.median(runs_before)) if runs_before else float("nan")
    latency_after = float(np.median(runs_after)) if runs_after else float("nan")
    return PruneResult(
        mode,
        float(keep),
        after_block,
        top_predictions(bundle, probs_before),
        top_predictions(bundle, probs_after),
        probs_before,
        probs_after,
        mask.reshape(gh, gw),
        tokens_before,
        tokens_after,
        macs_before,
        macs_after,
        latency_before,
        latency_after,
        runs_before,
        runs_after,
        fusion if mode == "efficiency" else None,
    )
