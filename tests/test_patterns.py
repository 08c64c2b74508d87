"""Mask shapes: exact counts, exact tiles, deterministic ties, clear errors."""

import pytest
import torch

from spruce.errors import SpruceError
from spruce.masks import block_pattern_holds, tile_zero_fraction
from spruce.prune.patterns import (block_global_mask, check_divides, mask_for, unstructured_layer_mask,
                                   unstructured_row_mask)


def test_row_mask_prunes_exactly_k_per_row():
    score = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    mask = unstructured_row_mask(score, 0.5)
    assert mask.sum(1).tolist() == [32] * 16
    # the pruned entries are the lowest of each row
    assert (score[mask].view(16, 32).max(1).values <= score[~mask].view(16, 32).min(1).values).all()


def test_layer_mask_uses_one_threshold():
    score = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
    mask = unstructured_layer_mask(score, 0.25)
    assert mask.sum().item() == 256
    assert score[mask].max() <= score[~mask].min()


def test_block_mask_exact_sparsity_and_tiles():
    score = torch.rand(64, 128, generator=torch.Generator().manual_seed(2))
    mask = block_global_mask(score, 0.5, 16, 16)
    assert mask.float().mean().item() == 0.5
    frac = tile_zero_fraction(mask.logical_not().float(), 16, 16)  # pruned tiles -> zeros
    assert set(frac.unique().tolist()) <= {0.0, 1.0}
    # the pruned tiles are those with the lowest mean score
    tile_means = score.reshape(4, 16, 8, 16).mean(dim=(1, 3))
    pruned = mask.reshape(4, 16, 8, 16)[:, 0, :, 0]
    assert tile_means[pruned].max() <= tile_means[~pruned].min()


def test_rectangular_blocks_via_registry():
    score = torch.rand(32, 128)
    mask = mask_for("16x64", score, 0.5)
    weight = torch.ones(32, 128).masked_fill(mask, 0)
    assert block_pattern_holds(weight, 16, 64) and mask.float().mean() == 0.5


def test_ties_are_broken_the_same_way_every_time():
    score = torch.ones(8, 32)  # every weight ties
    a, b = unstructured_row_mask(score, 0.5), unstructured_row_mask(score.clone(), 0.5)
    assert torch.equal(a, b) and a[:, :16].all() and not a[:, 16:].any()


def test_block_that_does_not_divide_names_layer_and_fit():
    with pytest.raises(SpruceError, match=r"48x48 blocks do not divide layers.0.mlp \(64x128\).*16x16"):
        check_divides("48x48", {"layers.0.mlp": (64, 128)})


def test_unknown_pattern():
    with pytest.raises(SpruceError, match="unknown sparsity type 'diagonal'"):
        mask_for("diagonal", torch.rand(4, 4), 0.5)
