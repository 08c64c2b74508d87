"""Grouped block layout (16x16g4): the pattern, its in-sweep and OBS choices, the model the default
recipe machinery writes stored by `sparsify` in wide tiles, and dense dispatch in the kernels."""

from __future__ import annotations

import pytest
import torch

from spruce.errors import SpruceError
from spruce.prune.patterns import parse_pattern
from tests.conftest import build_model


def _group_tiles(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(groups, tile columns, rows, cols) view of a weight mask."""
    r, c = mask.shape
    return mask.reshape(r // rows, rows, c // cols, cols).transpose(1, 2)


def _is_grouped(mask: torch.Tensor, rows: int, cols: int) -> bool:
    tiles = _group_tiles(mask, rows, cols)
    return bool((tiles.all(dim=(2, 3)) | (~tiles).all(dim=(2, 3))).all())


def test_parse_grouped_names_block_and_group():
    p = parse_pattern("16x16g4")
    assert (p.kind, p.block_rows, p.group, p.rows, p.cols) == ("grouped", 16, 4, 64, 16)
    assert parse_pattern("16x16").kind == "block"
    with pytest.raises(SpruceError, match="must be positive"):
        parse_pattern("16x16g0")


def test_mask_is_whole_group_tiles_scored_over_the_group():
    torch.manual_seed(0)
    score = torch.rand(256, 128)
    p = parse_pattern("16x16g4")
    mask = p.mask(score, 0.5)
    assert mask.float().mean().item() == 0.5
    assert _is_grouped(mask, 64, 16)
    # the group tile's score is the mean over its 4 tiles of 16x16: the group whose tiles are
    # all mediocre loses to the group with one excellent tile
    score = torch.full((128, 32), 1.0)
    score[0:16, 0:16] = 10.0                  # group 0, column 0: one strong 16x16 tile
    score[64:128, 16:32] = 2.0                # group 1, column 1: four good tiles
    mask = parse_pattern("16x16g4").mask(score, 0.5)
    assert not mask[0:64, 0:16].any() and not mask[64:128, 16:32].any()
    assert mask[0:64, 16:32].all() and mask[64:128, 0:16].all()


def test_row_balanced_keeps_the_same_count_in_every_group():
    torch.manual_seed(1)
    score = torch.rand(256, 128)
    score[:64] *= 10                         # one group far more important than the others
    p = parse_pattern("16x16g4", selection="row-balanced")
    tiles = _group_tiles(p.mask(score, 0.5), 64, 16).all(dim=(2, 3))
    assert tiles.sum(1).tolist() == [4, 4, 4, 4]
    assert not p.in_sweep
    glob = _group_tiles(parse_pattern("16x16g4").mask(score, 0.5), 64, 16).all(dim=(2, 3))
    assert glob.sum(1).tolist() != [4, 4, 4, 4]   # global selection is free to differ per group


def test_sweep_mask_decides_the_group_jointly():
    p = parse_pattern("16x16g4")
    assert p.in_sweep and p.sweep_group == 16
    err = torch.ones(128, 16)
    err[0:16] = 100.0                        # one block-row of group 0 is costly to prune
    mask = p.sweep_mask_at(0, err, 0.5)
    assert mask.shape == err.shape
    assert not mask[0:64].any() and mask[64:128].all()


def test_sweep_quota_reaches_the_sparsity_with_few_groups():
    """A 192-row layer has 3 groups of 64: round(3 * 0.4) = 1 per column would prune 33%; the
    running quota prunes 40% of the group tiles over the columns."""
    p = parse_pattern("16x16g4")
    torch.manual_seed(0)
    cols = [p.sweep_mask_at(16 * j, torch.rand(192, 16), 0.4) for j in range(10)]
    assert torch.cat(cols, 1).float().mean().item() == pytest.approx(0.4)


def test_check_divides_names_the_layer_and_the_groups_that_fit():
    p = parse_pattern("16x16g4")
    p.check_divides({"ok": (128, 64)})
    with pytest.raises(SpruceError, match=r"16x16g4 needs out_features divisible by 64.*k_proj is 32x64.*16x16g2"):
        p.check_divides({"k_proj": (32, 64)})


def _pruned(method: str | None, pattern: str, **recipe_options):
    from spruce.prune.recipes import prune_with_recipe, resolve_recipe

    model = build_model(256, hidden=128, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    samples = torch.randint(0, 256, (4, 32))
    recipe = {**resolve_recipe(pattern, method=method, reconstruct_epochs=1 if method is None else None),
              **recipe_options}
    info, _ = prune_with_recipe(model, pattern, 0.5, recipe, lambda: samples, progress=False)
    return model, info


@pytest.mark.parametrize("method", [None, "sparsegpt", "wanda"])   # None: the default recipe (obs)
def test_pruned_model_is_stored_in_wide_tiles_with_no_zero_block(method):
    from spruce.kernels import BlockSparseLinear, sparsify
    from spruce.models import prunable_linears

    model, info = _pruned(method, "16x16g4")
    assert info["pattern"] == "16x16g4"
    linears = prunable_linears(model)
    for name, linear in linears.items():
        assert _is_grouped(linear.weight.detach() == 0, 64, 16), name
    report = sparsify(model, block_size=16, min_sparsity=0.2)
    sparse = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    assert len(sparse) == len(linears) == len(report.swapped)
    for m in sparse:
        w = m.sparse_weight
        assert w.group >= 4 and w.group % 4 == 0
        assert w.values.shape[0] * w.group == w.nonzero_blocks   # no all-zero 16x16 block stored


def test_independent_blocks_are_stored_narrow():
    """The same machinery with 16x16: every block-row its own columns, stored in groups of one."""
    from spruce.kernels import BlockSparseLinear, sparsify

    model, _ = _pruned("sparsegpt", "16x16")
    sparsify(model, block_size=16, min_sparsity=0.2)
    groups = {m.group for m in model.modules() if isinstance(m, BlockSparseLinear)}
    assert groups == {1}


def test_default_block_group_turns_the_block_recipe_grouped():
    from spruce.prune.recipes import default_grouping, resolve_recipe

    recipe = resolve_recipe("16x16")
    assert default_grouping("16x16", recipe) == "16x16"            # today's default: independent
    assert default_grouping("16x16", {**recipe, "block_group": 4}) == "16x16g4"
    assert default_grouping("2:4", {**recipe, "block_group": 4}) == "2:4"
    assert resolve_recipe("16x16g4")["method"] == resolve_recipe("16x16")["method"] == "obs"
    _, info = _pruned("sparsegpt", "16x16", block_group=4)
    assert info["pattern"] == "16x16g4"
