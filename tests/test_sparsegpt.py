"""SparseGPT and group OBS on seeded toy layers: the math, the masks, and what they buy."""

import pytest
import torch

from spruce.masks import block_pattern_holds
from spruce.prune.methods import (METHODS, damped, gradual_block_obs, group_obs_errors, refit_block_rows,
                                  sparsegpt_sweep)
from spruce.prune.patterns import parse_pattern


def _layer(n_out=64, n_in=128, tokens=1024, seed=0):
    """A toy layer whose inputs are correlated and have a few outlier features, as LLM inputs do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=g) @ mix
    x[:, :3] *= 8
    w = torch.randn(n_out, n_in, generator=g)
    return w, x, {"sq_norm": (x * x).sum(0), "hessian": x.T @ x}


def _error(w, x, pruned):
    return ((x @ (pruned - w).T) ** 2).sum().item()


@pytest.mark.parametrize("pattern", ["unstructured", "unstructured-layer", "2:4", "16x16"])
def test_sparsegpt_beats_magnitude_on_reconstruction(pattern):
    w, x, stats = _layer()
    spec = parse_pattern(pattern)
    mag = METHODS["magnitude"].prune(w, stats, spec, 0.5)
    sgpt = METHODS["sparsegpt"].prune(w, stats, spec, 0.5)
    assert (sgpt == 0).float().mean().item() == 0.5
    assert _error(w, x, sgpt) < 0.7 * _error(w, x, mag)


def test_wanda_update_lowers_the_wanda_error_with_the_same_mask():
    w, x, stats = _layer(seed=1)
    spec = parse_pattern("16x16", selection="row-balanced")
    wanda = METHODS["wanda"].prune(w, stats, spec, 0.5)
    updated = METHODS["wanda+update"].prune(w, stats, spec, 0.5)
    assert torch.equal(wanda == 0, updated == 0)
    assert _error(w, x, updated) < 0.9 * _error(w, x, wanda)


def test_sweep_without_pruning_changes_nothing():
    w, _, stats = _layer(seed=2)
    out = sparsegpt_sweep(w, stats["hessian"], lambda col, ws, d: torch.zeros_like(ws, dtype=torch.bool), 4)
    assert torch.equal(out, w)


def test_in_sweep_block_masks_hold_the_tiles_and_balance_tile_columns():
    w, _, stats = _layer(seed=3)
    out = METHODS["sparsegpt"].prune(w, stats, parse_pattern("16x16"), 0.5)
    assert block_pattern_holds(out, 16, 16)
    assert ((out == 0)[::16, ::16].sum(0) == 2).all()  # each 16-column group prunes half of its 4 tiles


def test_refit_is_the_least_squares_solution():
    w, x, stats = _layer(n_out=32, n_in=64, seed=4)
    h, _ = damped(stats["hessian"], 0.0)
    keep = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    refit, _ = refit_block_rows(w, h, keep, bh=16, bw=16, score=False)
    for g in range(2):
        k = keep[g]
        direct = torch.linalg.lstsq(x[:, k], x @ w[16 * g:16 * (g + 1)].T).solution.T
        assert torch.allclose(refit[16 * g:16 * (g + 1), k], direct, atol=1e-3, rtol=1e-3)
        assert (refit[16 * g:16 * (g + 1), ~k] == 0).all()


def test_group_obs_error_is_the_error_increase_of_removing_the_tile():
    w, x, stats = _layer(n_out=16, n_in=64, seed=5)
    h, _ = damped(stats["hessian"], 0.0)
    keep = torch.ones(1, 64, dtype=torch.bool)
    base, err = refit_block_rows(w, h, keep, bh=16, bw=16)
    keep[0, 16:32] = False
    after, _ = refit_block_rows(w, h, keep, bh=16, bw=16, score=False)
    increase = _error(w, x, after) - _error(w, x, base)
    assert err[0, 1].item() == pytest.approx(increase, rel=1e-3)


@pytest.mark.parametrize("selection", ["global", "row-balanced"])
def test_gradual_obs_beats_the_reference_block_recipes(selection):
    w, x, stats = _layer(seed=6)
    spec = parse_pattern("16x16", selection=selection)
    obs = gradual_block_obs(w, stats["hessian"], spec, 0.5)
    assert block_pattern_holds(obs, 16, 16) and (obs == 0).float().mean().item() == 0.5
    if selection == "row-balanced":
        assert ((obs == 0)[::16, ::16].sum(1) == 4).all()
    for other in ("wanda", "sparsegpt", "wanda+update"):
        assert _error(w, x, obs) < _error(w, x, METHODS[other].prune(w, stats, spec, 0.5)), other


def test_group_obs_errors_mark_removed_tiles():
    w, _, stats = _layer(n_out=16, n_in=32, seed=7)
    hinv = torch.linalg.inv(damped(stats["hessian"])[0][:32, :32]).unsqueeze(0).clone()
    hinv[:, :16, :] = 0
    hinv[:, :, :16] = 0
    err = group_obs_errors(w[:, :32], hinv, 16, 16)
    assert err[0, 0] == float("inf") and torch.isfinite(err[0, 1])


def test_aim_at_dense_matches_dense_outputs_from_shifted_inputs():
    from spruce.prune.methods import aim_at_dense
    w, x_dense, _ = _layer(seed=8)
    distort = torch.eye(128) + 0.1 * torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    x = x_dense @ distort  # earlier pruning distorts the inputs; a linear distortion can be undone
    stats = {"hessian": x.T @ x, "cross": x.T @ x_dense - x.T @ x}
    aimed = aim_at_dense(w, stats, percdamp=1e-6)
    before = ((x @ w.T - x_dense @ w.T) ** 2).sum()
    after = ((x @ aimed.T - x_dense @ w.T) ** 2).sum()
    assert after < 1e-3 * before
    assert torch.equal(aim_at_dense(w, {"hessian": stats["hessian"]}), w)
