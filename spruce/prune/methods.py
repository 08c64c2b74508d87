"""Pruning methods, registered by name: plain functions of a weight and its input statistics.

Every method maps (weight W of shape (out, in), calibration statistics, pattern, sparsity) to the
pruned weight, with zeros where the pattern removed weights. The statistics are
  - `sq_norm`: sum over calibration tokens of x_j^2 per input feature j (Wanda), and
  - `hessian`: H = sum over tokens of x x^T (in x in), the Hessian of the layer's squared
    output error ||X W^T - X W'^T||^2 up to a factor 2 (SparseGPT, OBS).

Methods:
  - `magnitude`: prune the smallest |W| (no data).
  - `wanda`: prune the smallest |W_ij| * ||X_j|| (Sun et al., 2023); no weight update.
  - `sparsegpt`: the optimal-brain-surgeon sweep of SparseGPT (Frantar & Alistarh, 2023): columns
    left to right, each pruned weight's error spread over the columns to its right through the
    Cholesky factor of the inverse Hessian, in lazy batches of 128 columns, damping 1% of the
    mean diagonal. The mask is chosen inside the sweep, one column group at a time, by the OBS
    error w^2 / d^2: per 128 columns for unstructured, per M columns for N:M, per tile column
    for blocks (each tile column prunes the same share of its tiles). Row-balanced and hybrid
    tiles, which need whole-matrix decisions, are chosen up front by OBS saliency w^2 / [H^-1]_jj.
  - `wanda+update`: the Wanda mask, then the SparseGPT sweep as a weight update for that mask.
  - `obs`: (block patterns) gradual group OBS: tiles are removed over several rounds, each
    round taking the tiles whose removal raises the output error least (the exact group OBS
    error given the tiles already gone), and after each round the kept weights of every
    block-row are refit to the dense outputs by least squares. Rows of one block-row share
    their mask, so the refit is one small linear solve per block-row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..errors import SpruceError
from ..masks import tile_view
from .patterns import Pattern, expand_tiles

PERCDAMP = 0.01      # damping: this share of the mean Hessian diagonal is added to the diagonal
SWEEP_BLOCK = 128    # columns per lazy batch of the SparseGPT sweep
OBS_ROUNDS = 8       # rounds of the gradual block OBS
# How gradual block OBS refits the kept weights: "exact" (a Cholesky factor per block-row),
# "iterative" (batched preconditioned conjugate gradients), "auto" (exact while affordable).
OBS_REFITS = ("auto", "exact", "iterative")
# "auto" refits exactly while the estimate obs_exact_flops of a weight is at most this: every
# linear of a 135M-1B model (SmolLM2-135M's widest, its down_proj: 1.2e12), none of a 7B one
# (its q_proj: 1.6e14, its down_proj: 3.1e15)
OBS_EXACT_MAX_FLOPS = 1e13
# the iterative refit stops at a bound of 1% on its excess output error: on SmolLM2-135M's layer 0
# o_proj and down_proj a bound of 0.1% ran about 30% more steps for the same errors (within 0.3%)
CG_TOL = 1e-2
CG_MAX_ITERS = 64    # at most this many conjugate-gradient steps per round


def magnitude_score(weight: torch.Tensor, input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    return weight.abs().float()


def wanda_score(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| scaled column-wise by the input feature norms (input_sq_norm = sum over tokens of x^2)."""
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


def damped(hessian: torch.Tensor, percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(H with dead inputs set to 1 on the diagonal and percdamp * mean diagonal added, dead mask).

    A dead input (never nonzero in calibration) has no say in the output, so its weights are
    free to go; the unit diagonal keeps the factorisation defined."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(percdamp * torch.diagonal(h).mean())
    return h, dead


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i of U is the OBS update of column i
    given that columns < i are already fixed."""
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


Chooser = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def sparsegpt_sweep(weight: torch.Tensor, hessian: torch.Tensor, choose: Chooser, group: int,
                    blocksize: int = SWEEP_BLOCK, percdamp: float = PERCDAMP) -> torch.Tensor:
    """The SparseGPT sweep; returns the pruned and updated weight (float32).

    `choose(col, w, d)` returns the bool prune mask of columns [col, col + group) given their
    current (already updated) weights w (out, group) and the diagonal d of the inverse-Hessian
    Cholesky factor there; it is called when the sweep reaches col, so masks chosen late see
    the compensation for earlier pruning."""
    w = weight.float().clone()
    h, dead = damped(hessian, percdamp)
    w[:, dead] = 0
    u = inverse_cholesky(h)
    cols = w.shape[1]
    blocksize = max(group, blocksize // group * group)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % group == 0:
                mask1[:, i:i + group] = choose(i1 + i, w1[:, i:i + group], d1[i:i + group])
            q = w1[:, i].masked_fill(mask1[:, i], 0)
            err = (w1[:, i] - q) / d1[i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w


def _obs_error(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return w.square() / d.square().unsqueeze(0)


def sweep_chooser(pattern: Pattern, sparsity: float) -> tuple[Chooser, int]:
    """(chooser, group) that picks the pattern's mask inside the sweep by OBS error."""
    return (lambda col, w, d: pattern.sweep_mask_at(col, _obs_error(w, d), sparsity)), pattern.sweep_group or SWEEP_BLOCK


def obs_saliency(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """w_ij^2 / [H^-1]_jj: the output error of removing one weight alone, with the rest refit."""
    h, _ = damped(hessian, percdamp)
    hinv_diag = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(h)))
    return weight.float().square() / hinv_diag.unsqueeze(0)


def aim_at_dense(weight: torch.Tensor, stats: dict, percdamp: float = PERCDAMP) -> torch.Tensor:
    """The weight whose outputs on the pruned model's inputs X best match the dense model's
    outputs on its inputs X_d: w + (H^-1 X^T (X_d - X) w^T)^T, with stats["cross"] = X^T X_d - X^T X.
    Without "cross" (no dense target asked for) the weight is returned as it is."""
    if "cross" not in stats:
        return weight
    h, dead = damped(stats["hessian"], percdamp)
    correction = torch.cholesky_solve(stats["cross"].float() @ weight.float().T, torch.linalg.cholesky(h)).T
    return (weight.float() + correction).masked_fill(dead.unsqueeze(0), 0)


def prune_magnitude(weight, stats, pattern: Pattern, sparsity: float) -> torch.Tensor:
    return weight.masked_fill(pattern.mask(magnitude_score(weight), sparsity), 0)


def prune_wanda(weight, stats, pattern: Pattern, sparsity: float) -> torch.Tensor:
    return weight.masked_fill(pattern.mask(wanda_score(weight, stats["sq_norm"]), sparsity), 0)


def fixed_mask_update(weight, hessian, mask: torch.Tensor) -> torch.Tensor:
    """The SparseGPT sweep with a mask chosen beforehand: prune it and compensate to the right."""
    return sparsegpt_sweep(weight, hessian, lambda col, w, d: mask[:, col:col + w.shape[1]],
                           group=SWEEP_BLOCK)


def prune_sparsegpt(weight, stats, pattern: Pattern, sparsity: float) -> torch.Tensor:
    h, dtype, weight = stats["hessian"], weight.dtype, aim_at_dense(weight, stats)
    if not pattern.in_sweep:   # whole-matrix decisions: chosen up front by OBS saliency
        mask = pattern.mask(obs_saliency(weight, h).sqrt(), sparsity)
        return fixed_mask_update(weight, h, mask).to(dtype)
    choose, group = sweep_chooser(pattern, sparsity)
    return sparsegpt_sweep(weight, h, choose, group).to(dtype)


def prune_wanda_update(weight, stats, pattern: Pattern, sparsity: float) -> torch.Tensor:
    dtype, weight = weight.dtype, aim_at_dense(weight, stats)
    mask = pattern.mask(wanda_score(weight, stats["sq_norm"]), sparsity)
    return fixed_mask_update(weight, stats["hessian"], mask).to(dtype)


def refit_block_rows(target: torch.Tensor, h: torch.Tensor, keep_cols: torch.Tensor, bh: int, bw: int,
                     score: bool = True, chunk_bytes: int = 1 << 30) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares refit of a matrix whose rows share a column mask within each block-row,
    and the exact OBS error of removing each tile next.

    target: dense weight (out, in); h: damped Hessian; keep_cols: (out/bh, in) bool, the inputs
    each block-row keeps. The refit minimises ||X (w - target)^T||^2 over w with w = 0 at the
    pruned inputs: w_K = H_KK^-1 (H target^T)_K, one solve per block-row, batched in chunks so
    that only a chunk of inverses sits in memory. Returns (refit weight, tile errors or None)."""
    g, n = keep_cols.shape
    out = torch.empty_like(target)
    errors = torch.empty(g, n // bw, dtype=h.dtype, device=h.device) if score else None
    rhs_all = (target @ h).view(g, bh, n)
    step = max(1, chunk_bytes // (n * n * h.element_size()))
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    for s in range(0, g, step):
        k = keep_cols[s:s + step].to(h.dtype)
        a = h * k.unsqueeze(2) * k.unsqueeze(1) + eye * (1 - k).unsqueeze(2)
        chol = torch.linalg.cholesky(a)
        rhs = (rhs_all[s:s + step] * k.unsqueeze(1)).transpose(1, 2)
        w = torch.cholesky_solve(rhs, chol).transpose(1, 2)
        out.view(g, bh, n)[s:s + step] = w
        if score:
            hinv = torch.cholesky_inverse(chol) * k.unsqueeze(2) * k.unsqueeze(1)
            errors[s:s + step] = group_obs_errors(w.reshape(-1, n), hinv, bh, bw)
    return out, errors


def group_obs_errors(w: torch.Tensor, hinv: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Exact OBS error of removing each tile alone, (out/bh, in/bw): for the rows r of the tile's
    block-row and its inputs S, sum_r w_rS^T [(H_KK^-1)_SS]^-1 w_rS, where hinv holds each
    block-row's H_KK^-1 with zeros at pruned inputs. Removed tiles get +inf."""
    g, n = hinv.shape[0], hinv.shape[1]
    c = n // bw
    diag_blocks = hinv.view(g, c, bw, c, bw).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (g, c, bw, bw)
    gone = diag_blocks.diagonal(dim1=2, dim2=3).sum(-1) == 0
    safe = diag_blocks + torch.diag_embed(gone.unsqueeze(-1).to(hinv.dtype).expand(g, c, bw))
    wt = tile_view(w, bh, bw).transpose(2, 3)                   # (g, c, bw, bh)
    solved = torch.cholesky_solve(wt, torch.linalg.cholesky(safe))
    err = (wt * solved).sum(dim=(2, 3))
    return err.masked_fill(gone, float("inf"))


def obs_exact_flops(out_features: int, in_features: int, tile_rows: int, rounds: int = OBS_ROUNDS) -> float:
    """Estimated flops of the exact refits of gradual block OBS on one (out, in) weight: in each of
    the rounds + 1 refits, every block-row factors, inverts and solves its own (in x in) kept-input
    Hessian, about in^3 flops."""
    return (rounds + 1) * (out_features // tile_rows) * float(in_features) ** 3


def obs_refit_for(shape: tuple[int, int], pattern: Pattern, refit: str = "auto") -> str:
    """The refit gradual block OBS uses on a weight of `shape`: the one asked for, or with "auto"
    the exact one while obs_exact_flops <= OBS_EXACT_MAX_FLOPS and the iterative one above."""
    if refit not in OBS_REFITS:
        raise SpruceError(f"unknown OBS refit '{refit}'; use one of {', '.join(OBS_REFITS)}")
    if refit != "auto":
        return refit
    return "exact" if obs_exact_flops(shape[0], shape[1], pattern.rows) <= OBS_EXACT_MAX_FLOPS else "iterative"


def refit_block_rows_iterative(target: torch.Tensor, h: torch.Tensor, hinv: torch.Tensor, keep_cols: torch.Tensor,
                               bh: int, start: torch.Tensor | None = None, tol: float = CG_TOL,
                               max_iters: int = CG_MAX_ITERS) -> tuple[torch.Tensor, int]:
    """The least-squares refit of refit_block_rows, solved for all rows at once by conjugate
    gradients preconditioned with the full inverse Hessian restricted to the kept inputs; every
    step is a masked (out, in) x (in, in) product. Returns (refit weight, iterations run).

    Row r solves H_KK w_K = (H target_r)_K for the inputs K its block-row keeps, as
    A x = M * ((M * x) H) on full-width rows with mask M. `start` (the previous round's weights)
    warm-starts it. The preconditioner P = (H^-1)_KK bounds H_KK^-1 from above (it is the inverse
    of a Schur complement of H_KK, which is <= H_KK), so r^T P r over-estimates the excess output
    error E(x) - E(x*) = r^T H_KK^-1 r; the iteration stops once that bound is at most `tol` times
    the current output error E(x) = ||X (x - target)^T||^2 (or after max_iters)."""
    m = keep_cols.repeat_interleave(bh, 0).to(h.dtype)
    th = target @ h
    b = th * m
    total = (target * th).sum()                      # target H target^T: E(0)
    x = (target if start is None else start) * m
    r = b - (x @ h) * m
    z = (r @ hinv) * m
    p, rz = z, (r * z).sum(1)
    it = 0
    for it in range(max_iters + 1):
        error = total - (x * b).sum() - (x * r).sum()    # E(x), as (x H)_K = b_K - r_K
        if it == max_iters or rz.sum() <= tol * error.clamp_min(0):
            break
        ap = (p @ h) * m
        pap = (p * ap).sum(1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(torch.finfo(h.dtype).tiny), 0)
        x = x + alpha.unsqueeze(1) * p
        r = r - alpha.unsqueeze(1) * ap
        z = (r @ hinv) * m
        rz_next = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(h.dtype).tiny), 0)
        p, rz = z + beta.unsqueeze(1) * p, rz_next
    return x, it


def approx_group_obs_errors(w: torch.Tensor, hinv_block_inv: torch.Tensor, pruned: torch.Tensor,
                            bh: int, bw: int) -> torch.Tensor:
    """The OBS error of removing each tile, (out/bh, in/bw), with the full inverse Hessian in
    place of each block-row's H_KK^-1: sum_r w_rS^T [(H^-1)_SS]^-1 w_rS for tile S, its inverse
    diagonal block `hinv_block_inv` (in/bw, bw, bw) shared by all block-rows. Exact while a
    block-row keeps every input; with inputs gone it ignores their absence from the refit.
    Removed tiles (`pruned`) get +inf."""
    wt = tile_view(w, bh, bw)                                   # (g, c, bh, bw)
    err = torch.einsum("gcri,cij,gcrj->gc", wt, hinv_block_inv, wt)
    return err.masked_fill(pruned, float("inf"))


def gradual_block_obs(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, sparsity: float,
                      rounds: int = OBS_ROUNDS, percdamp: float = PERCDAMP, refit: str = "exact") -> torch.Tensor:
    """Tiles removed over `rounds` rounds by group OBS error, the kept weights refit by least
    squares per block-row after each round (see the module docstring). refit "exact": one
    Cholesky factor per block-row, exact errors; "iterative": refit_block_rows_iterative,
    warm-started from the previous round, and approx_group_obs_errors."""
    bh, bw = pattern.rows, pattern.cols
    h, dead = damped(hessian, percdamp)
    target = weight.float().masked_fill(dead.unsqueeze(0), 0)
    pruned = torch.zeros(target.shape[0] // bh, target.shape[1] // bw, dtype=torch.bool, device=weight.device)
    if refit == "iterative":
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        c = h.shape[0] // bw
        blocks = hinv.view(c, bw, c, bw).diagonal(dim1=0, dim2=2).permute(2, 0, 1)     # (c, bw, bw)
        block_inv = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
        w = target
        for r in range(1, rounds + 1):
            pruned |= pattern.obs_select(approx_group_obs_errors(w, block_inv, pruned, bh, bw), pruned,
                                         sparsity * r / rounds)
            w, _ = refit_block_rows_iterative(target, h, hinv, ~expand_tiles(pruned, 1, bw), bh, start=w)
        return w.masked_fill(expand_tiles(pruned, bh, bw), 0).to(weight.dtype)
    w, err = refit_block_rows(target, h, ~expand_tiles(pruned, 1, bw), bh, bw)
    for r in range(1, rounds + 1):
        share = sparsity * r / rounds
        pruned |= pattern.obs_select(err, pruned, share)
        w, err = refit_block_rows(target, h, ~expand_tiles(pruned, 1, bw), bh, bw, score=r < rounds)
    return w.masked_fill(expand_tiles(pruned, bh, bw), 0).to(weight.dtype)


def prune_obs(weight, stats, pattern: Pattern, sparsity: float, refit: str = "auto") -> torch.Tensor:
    """Gradual block OBS; `refit` as obs_refit_for chooses it for the weight's shape."""
    if not pattern.obs_tiles:
        raise SpruceError(f"method 'obs' prunes block patterns (e.g. 16x16), not {pattern.name}; "
                          "use sparsegpt for unstructured and N:M")
    return gradual_block_obs(aim_at_dense(weight, stats), stats["hessian"], pattern, sparsity,
                             refit=obs_refit_for(tuple(weight.shape), pattern, refit)).to(weight.dtype)


@dataclass(frozen=True)
class Method:
    """A pruning method: its function and the calibration statistics it reads."""
    prune: Callable[..., torch.Tensor]
    needs: tuple[str, ...]          # "sq_norm" and/or "hessian"
    summary: str


METHODS = {
    "magnitude": Method(prune_magnitude, (), "smallest |W|, no data"),
    "wanda": Method(prune_wanda, ("sq_norm",), "smallest |W| * ||X||, no update"),
    "sparsegpt": Method(prune_sparsegpt, ("hessian",), "OBS sweep, mask chosen inside it"),
    "wanda+update": Method(prune_wanda_update, ("sq_norm", "hessian"), "Wanda mask, SparseGPT update"),
    "obs": Method(prune_obs, ("hessian",), "gradual group OBS with least-squares refit (blocks)"),
}


def linear_pruner(label: str) -> Method:
    """The Method behind a PruneSpec.linear_method label: a METHODS name, or "obs-exact" /
    "obs-iterative" (gradual block OBS with that refit)."""
    if label.startswith("obs-"):
        return Method(partial(prune_obs, refit=label.removeprefix("obs-")), METHODS["obs"].needs, METHODS["obs"].summary)
    return METHODS[label]
