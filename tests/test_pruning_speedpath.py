"""The fast token selection of efficiency pruning keeps exactly the tokens of the plain reference selection
(the greedy coverage loop written out with masks, as pruning ran it before), on random features with ties, on
tiny models and on the real DeiT-Tiny; and its CPU (numpy) and device (torch) loops agree."""

import csv

import numpy as np
import pytest
import torch

from zoomvit import pruning
from zoomvit.geometry import encode
from zoomvit.images import load_image


def reference_selection(scores, features, n_keep, important_share=0.5):
    """The selection spelled out: the top-scored share by a stable descending sort, then in turn the token whose
    highest cosine to the kept ones is lowest (the first on a tie), recomputing the masked maxima every step."""
    b, p, _ = features.shape
    n_important = max(1, int(round(n_keep * important_share)))
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    similarity = unit @ unit.transpose(1, 2)
    chosen = torch.zeros(b, p, dtype=torch.bool)
    chosen.scatter_(1, scores.argsort(dim=1, descending=True, stable=True)[:, :n_important], True)
    for _ in range(n_keep - n_important):
        coverage = similarity.masked_fill(~chosen.unsqueeze(1), -2.0).amax(dim=-1)
        newcomer = coverage.masked_fill(chosen, 3.0).argmin(dim=1)
        chosen[torch.arange(b), newcomer] = True
    kept = [row.nonzero().flatten() for row in chosen]
    dropped = [(~row).nonzero().flatten() for row in chosen]
    return torch.stack(kept), torch.stack(dropped)


def reference_partners(features, keep_idx, drop_idx):
    """Each dropped token's most similar kept token (the first on a tie), as a position in keep_idx."""
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    similarity = unit @ unit.transpose(1, 2)
    return torch.stack(
        [sim[dropped][:, kept].argmax(dim=1) for sim, dropped, kept in zip(similarity, drop_idx, keep_idx)]
    )


def features_with_ties(batch, patches, dim=16, seed=0):
    """Random features with exact duplicates and equal scores, where only the tie rule decides."""
    torch.manual_seed(seed)
    features, scores = torch.randn(batch, patches, dim), torch.rand(batch, patches)
    features[:, 1] = features[:, 0]
    features[:, patches // 2] = 2 * features[:, 0]  # the same direction: cosine 1 too
    scores[:, [0, 1, patches // 2]] = 0.0  # ranked last, so the coverage loop meets the duplicates, tied
    return scores, features


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("patches", [2, 24, 196])
def test_fast_selection_equals_the_reference(batch, patches):
    scores, features = features_with_ties(batch, patches)
    for n_keep in sorted({1, 2, patches // 3, patches // 2, patches - 1, patches} - {0}):
        keep_idx, drop_idx, partner = pruning.select_with_coverage(scores, features, n_keep)
        ref_keep, ref_drop = reference_selection(scores, features, n_keep)
        assert torch.equal(keep_idx, ref_keep), n_keep
        assert torch.equal(drop_idx, ref_drop), n_keep
        assert keep_idx.shape == (batch, n_keep) and drop_idx.shape == (batch, patches - n_keep)
        assert torch.equal(partner, reference_partners(features, keep_idx, drop_idx)), n_keep


def test_the_smallest_budget_keeps_the_top_scored_token():
    scores, features = features_with_ties(2, 24, seed=3)
    keep_idx, drop_idx, _ = pruning.select_with_coverage(scores, features, 1)
    assert torch.equal(keep_idx[:, 0], scores.argmax(dim=1))
    assert drop_idx.shape == (2, 23)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("n_keep", [1, 20, 40, 64])
def test_the_numpy_and_torch_loops_pick_the_same_tokens(batch, n_keep):
    """The CPU runs the greedy loop in numpy, other devices in torch: the same picks, ties included."""
    scores, features = features_with_ties(batch, 64, seed=batch)
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.transpose(1, 2)
    similarity.diagonal(dim1=1, dim2=2).fill_(pruning._COVERED)
    n_important = max(1, n_keep // 2)
    from_numpy = pruning._cover_numpy(scores, similarity, n_important, n_keep)
    from_torch = pruning._cover_torch(scores, similarity, n_important, n_keep)
    assert all(torch.equal(a, b) for a, b in zip(from_numpy, from_torch))  # kept, dropped, partners
    assert torch.equal(from_numpy[0], reference_selection(scores, features, n_keep, n_important / n_keep)[0])
    everything = torch.cat(from_numpy[:2], dim=1).sort(dim=1).values
    assert torch.equal(everything, torch.arange(64).expand(batch, -1))  # each token kept or dropped, once


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_deit_distilled"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_pruned_forward_keeps_the_reference_tokens_on_tiny_models(request, name, keep):
    bundle = request.getfixturevalue(name)
    torch.manual_seed(7)
    pixels = torch.randn(3, 3, *bundle.input_size)
    cut = pruning.run_to_cut(bundle, pixels, 1, with_scores=True)
    patches = cut.x[:, bundle.num_special :]
    n_keep = pruning.kept_count(patches.shape[1], keep)
    _, keep_idx = pruning.forward_pruned(bundle, pixels, 1, keep, fusion="merge")
    assert torch.equal(keep_idx, reference_selection(cut.scores, patches, n_keep)[0])
    for i in range(3):  # each image of the batch picks alone what it picks in the batch
        _, alone = pruning.forward_pruned(bundle, pixels[i : i + 1], 1, keep, fusion="merge")
        assert torch.equal(alone[0], keep_idx[i])


def test_keeping_everything_selects_nothing(tiny_vit, monkeypatch):
    """keep=1.0 runs no selection at all (the full model's path) and reports every patch kept."""
    monkeypatch.setattr(pruning, "select_with_coverage", lambda *a, **k: pytest.fail("selection ran at keep 1.0"))
    pixels = torch.randn(2, 3, *tiny_vit.input_size)
    logits, keep_idx = pruning.forward_pruned(tiny_vit, pixels, 1, 1.0, fusion="merge")
    with torch.no_grad():
        torch.testing.assert_close(logits, tiny_vit.model(pixel_values=pixels).logits, atol=1e-5, rtol=0)
    assert torch.equal(keep_idx, torch.arange(24).expand(2, -1))


@pytest.fixture(scope="module")
def sample_pixels(shared_dir, deit_tiny):
    folder = shared_dir / "data" / "imagenet-sample"
    with open(folder / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:8]
    return torch.cat([encode(deit_tiny, load_image(folder / row["file"]))[0] for row in rows])


@pytest.mark.parametrize("keep", [0.7, 0.5, 0.3])
def test_real_model_keeps_the_reference_tokens(deit_tiny, sample_pixels, keep):
    """On DeiT-Tiny's own features and attention at the default cut: the kept tokens are the reference's, for each
    photo alone (batch 1, what the app times) and in a batch."""
    after = pruning.config.PRUNE_AFTER_BLOCK
    cut = pruning.run_to_cut(deit_tiny, sample_pixels, after, with_scores=True)
    patches = cut.x[:, deit_tiny.num_special :]
    expected = reference_selection(cut.scores, patches, pruning.kept_count(patches.shape[1], keep))[0]
    _, batched = pruning.forward_pruned(deit_tiny, sample_pixels, after, keep, fusion="merge")
    assert torch.equal(batched, expected)
    for i in range(len(sample_pixels)):
        _, alone = pruning.forward_pruned(deit_tiny, sample_pixels[i : i + 1], after, keep, fusion="merge")
        assert np.array_equal(alone[0].numpy(), expected[i].numpy())


def test_merging_with_unit_sizes_equals_merging_with_ones():
    """sizes=None (every token counts once, what pruning passes) gives exactly what explicit ones give."""
    scores, features = features_with_ties(2, 24, seed=5)
    keep_idx, drop_idx, partner = pruning.select_with_coverage(scores, features, 8)
    implicit = pruning.merge_into_kept(features, None, keep_idx, drop_idx, partner)
    explicit = pruning.merge_into_kept(features, torch.ones(2, 24, 1), keep_idx, drop_idx, partner)
    assert torch.equal(implicit[0], explicit[0]) and torch.equal(implicit[1], explicit[1])
    assert implicit[1].sum().item() == 48 and implicit[1].min().item() >= 1  # every token counted, once
