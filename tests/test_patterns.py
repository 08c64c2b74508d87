"""Mask shapes: exact counts, exact tiles, deterministic ties, clear errors."""

import pytest
import torch

from spruce.errors import SpruceError
from spruce.masks import block_pattern_holds, tile_zero_fraction
from spruce.prune.patterns import (block_global_mask, check_divides, mask_for, parse_pattern, unstructured_layer_mask,
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


def _zero_frac_tiles(mask, bh, bw):
    return tile_zero_fraction(mask.logical_not().float(), bh, bw)


@pytest.mark.parametrize("name, n, m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4), ("3:8", 3, 8)])
def test_nm_keeps_at_most_n_of_every_m(name, n, m):
    score = torch.rand(32, 64, generator=torch.Generator().manual_seed(3))
    mask = mask_for(name, score, 1 - n / m)
    groups = mask.view(32, 64 // m, m)
    assert (groups.sum(-1) == m - n).all()  # exactly m - n zeros, so at most n nonzeros
    kept, pruned = score.view(32, -1, m), groups
    assert (kept.masked_fill(pruned, float("inf")).min(-1).values
            >= kept.masked_fill(~pruned, -float("inf")).max(-1).values).all()


@pytest.mark.parametrize("name", ["2:2", "4:2", "0:4"])
def test_nm_needs_n_below_m(name):
    with pytest.raises(SpruceError, match="needs 0 < N < M"):
        parse_pattern(name)


def test_nm_that_does_not_divide_names_the_layer():
    with pytest.raises(SpruceError, match=r"2:8 groups of 8 do not divide the 60 inputs of mlp.up"):
        check_divides("2:8", {"mlp.up": (32, 60)})


def test_row_balanced_block_rows_hold_equal_counts():
    score = torch.rand(64, 128, generator=torch.Generator().manual_seed(4))
    score[:16] += 10  # the first block-row scores far higher: global selection would spare it
    mask = mask_for("16x16", score, 0.5, selection="row-balanced")
    pruned_tiles = mask[::16, ::16]
    assert pruned_tiles.sum(1).tolist() == [4, 4, 4, 4]
    assert set(_zero_frac_tiles(mask, 16, 16).unique().tolist()) <= {0.0, 1.0}
    assert mask_for("16x16", score, 0.5)[:16].sum() == 0  # while global keeps the first block-row


def test_energy_tile_score_ranks_by_sum_of_squares():
    score = torch.full((16, 32), 0.9)
    score[:, :16] = 0.5
    score[0, 0] = 20.0  # one outlier: tile 0 has the lower mean (0.58) but the higher energy (464 > 207)
    assert mask_for("16x16", score, 0.5)[:, :16].all()
    assert mask_for("16x16", score, 0.5, tile_score="energy")[:, 16:].all()


@pytest.mark.parametrize("tiers", [(0.2, 0.4), (0.0, 0.5), (0.25, 0.25)])
def test_hybrid_tiers(tiers):
    score = torch.rand(64, 128, generator=torch.Generator().manual_seed(5))
    mask = mask_for("hybrid:16x16", score, 0.5, tiers=tiers)
    assert mask.sum().item() == 64 * 128 // 2
    pruned_share = _zero_frac_tiles(mask, 16, 16).flatten()
    n_tiles = pruned_share.numel()
    dense = (pruned_share == 0).sum().item()
    assert dense == round(n_tiles * tiers[0])
    tiles = mask.reshape(4, 16, 8, 16).transpose(1, 2).reshape(-1, 16, 16)
    nm_like = (tiles.reshape(-1, 64, 4).sum(-1) == 2).all(-1)
    assert nm_like.sum().item() >= round(n_tiles * tiers[1])  # the 2:4 tier holds 2 zeros in every 4
    # tiers follow the tile score: every dense tile outscores every 2:4 or top-k tile
    means = score.reshape(4, 16, 8, 16).mean(dim=(1, 3)).flatten()
    if dense:
        assert means[pruned_share == 0].min() >= means[pruned_share > 0].max()


def test_hybrid_tiers_that_cannot_reach_the_target():
    with pytest.raises(SpruceError, match="cannot reach sparsity"):
        mask_for("hybrid:16x16", torch.rand(32, 32), 0.5, tiers=(0.9, 0.1))


def test_unknown_selection():
    with pytest.raises(SpruceError, match="unknown block selection"):
        parse_pattern("16x16", selection="diagonal")


def test_hybrid_tiers_without_top_k_tier_fix_the_sparsity():
    from spruce.prune.patterns import hybrid_tier_counts

    # 90% dense tiles, 10% 2:4 tiles (the first round of the reference schedule) on a 576x576 matrix
    n_dense, n_nm, k, extra = hybrid_tier_counts(36 * 36, 256, 0.05, (0.9, 0.1))
    assert (n_dense, n_nm, k, extra) == (1166, 130, 0, 0)
    with pytest.raises(SpruceError, match="cannot reach sparsity"):
        hybrid_tier_counts(36 * 36, 256, 0.2, (0.9, 0.1))


def test_every_registered_kind_parses_its_own_syntax_and_describes_itself():
    from spruce.prune.patterns import PATTERNS, kinds, pattern_help

    assert set(PATTERNS) == {"unstructured", "unstructured-layer", "nm", "block", "grouped", "hybrid"}
    examples = {"unstructured": "unstructured", "unstructured-layer": "unstructured-layer", "nm": "2:4",
                "block": "16x16", "grouped": "16x16g4", "hybrid": "hybrid:16x16"}
    for cls in kinds():
        assert cls.description and cls.syntax in pattern_help()
        assert type(parse_pattern(examples[cls.kind])) is cls


def test_a_new_pattern_kind_is_one_registered_class():
    """A kind registered from outside the package parses, masks, divides and runs in the sweep."""
    from dataclasses import dataclass

    from spruce.prune.methods import METHODS
    from spruce.prune.patterns import PATTERNS, Pattern, register

    @register
    @dataclass(frozen=True)
    class EveryOtherColumn(Pattern):
        kind = "test-columns"
        syntax = "test-columns"
        description = "odd input columns pruned"

        @classmethod
        def parse(cls, name, selection, tile_score, tiers):
            return cls(name) if name == cls.kind else None

        def mask(self, score, sparsity):
            return (torch.arange(score.shape[1]) % 2 == 1).expand_as(score)

        sweep_group = 2

        def sweep_mask(self, err, sparsity):
            return self.mask(err, sparsity)

        def check_divides(self, shapes):
            if any(cols % 2 for _, cols in shapes.values()):
                raise SpruceError("odd input count")

    try:
        pattern = parse_pattern("test-columns")
        assert "test-columns" in str(pytest.raises(SpruceError, parse_pattern, "nope").value)
        with pytest.raises(SpruceError, match="odd input count"):
            check_divides("test-columns", {"x": (4, 5)})
        w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        stats = {"hessian": x.T @ x, "sq_norm": (x * x).sum(0)}
        for method in ("magnitude", "sparsegpt"):
            out = METHODS[method].prune(w, stats, pattern, 0.5)
            assert (out[:, 1::2] == 0).all() and (out[:, ::2] != 0).all()
    finally:
        PATTERNS.pop("test-columns")
