"""Mask shapes, registered by name: which weights to remove given a score per weight.

A pattern name is one of
  - `unstructured`: the same share of every output row is pruned (Wanda's comparison group);
  - `unstructured-layer`: one threshold for the whole matrix;
  - `N:M` (`2:4`, `4:8`, any 0 < N < M): at most N nonzeros in every M consecutive input
    weights of a row (the sparse tensor core convention: `2:4` keeps 2 of every 4), so the
    sparsity is fixed by the pattern at 1 - N/M;
  - `BxB` / `RxC` (`16x16`, `16x64`): whole R x C tiles are zero or untouched. Tiles are chosen
    by a tile score with `global` selection (one threshold per matrix, the reference workflow)
    or `row-balanced` selection (every block-row keeps the same number of tiles, which GPU
    kernels prefer);
  - `hybrid:RxC`: every tile is in one of three tiers, chosen by tile score: dense, N:M (2:4),
    or top-k (the k highest-scoring weights of the tile), with the dense and 2:4 shares given
    and k solved so the matrix hits the target sparsity exactly.

Every mask function takes a score matrix (out_features, in_features; higher = more important)
and returns a bool mask, True where the weight is pruned. Ties are broken deterministically by
position (stable sort), which matters for quantized checkpoints whose magnitudes tie often.
All masks are computed with tensor operations, without Python loops over tiles or groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SpruceError
from ..masks import parse_block, tile_view

PATTERNS: dict[str, Callable[..., torch.Tensor]] = {}
SELECTIONS = ("global", "row-balanced")
TILE_SCORES = ("mean", "energy")
DEFAULT_TIERS = (0.2, 0.4)  # hybrid: shares of tiles kept dense and kept 2:4; the rest are top-k
_NM = re.compile(r"^(\d+):(\d+)$")
_HYBRID = re.compile(r"^hybrid(?::(\d+)x(\d+))?$")
_HELP = ("use unstructured, unstructured-layer, N:M such as 2:4, a block size such as 16x16, "
         "or hybrid:16x16")


def register(name: str):
    def wrap(fn):
        PATTERNS[name] = fn
        return fn
    return wrap


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern name plus its selection options."""
    name: str
    kind: str                       # unstructured | unstructured-layer | nm | block | hybrid
    rows: int = 1                   # tile height (block, hybrid)
    cols: int = 1                   # tile width (block, hybrid); group size M for N:M
    keep: int = 0                   # N of N:M
    selection: str = "global"       # block tiles: global | row-balanced
    tile_score: str = "mean"        # block tiles: mean score (reference) | energy (sum of squares)
    tiers: tuple[float, float] = DEFAULT_TIERS  # hybrid: (dense share, 2:4 share) of the tiles

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies; None where the sparsity is free."""
        return 1 - self.keep / self.cols if self.kind == "nm" else None

    @property
    def group(self) -> int:
        """Columns that one mask decision covers (what the SparseGPT sweep steps by)."""
        return self.cols if self.kind in ("nm", "block", "hybrid") else 1


def parse_pattern(name: str, selection: str = "global", tile_score: str = "mean",
                  tiers: tuple[float, float] | None = None) -> Pattern:
    """Parse a pattern name (see the module docstring); one clear error for a bad one."""
    if selection not in SELECTIONS:
        raise SpruceError(f"unknown block selection '{selection}'; use {' or '.join(SELECTIONS)}")
    if tile_score not in TILE_SCORES:
        raise SpruceError(f"unknown tile score '{tile_score}'; use {' or '.join(TILE_SCORES)}")
    if name in ("unstructured", "unstructured-layer"):
        return Pattern(name, name)
    nm = _NM.match(name)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 0 < n < m:
            raise SpruceError(f"N:M pattern {name} needs 0 < N < M (N nonzeros kept in every M weights), "
                              "e.g. 2:4 or 4:8")
        return Pattern(name, "nm", cols=m, keep=n)
    block = parse_block(name)
    if block is not None:
        if min(block) < 1:
            raise SpruceError(f"block size {name} must be positive")
        return Pattern(name, "block", *block, selection=selection, tile_score=tile_score)
    hybrid = _HYBRID.match(name)
    if hybrid:
        bh, bw = (int(hybrid.group(1)), int(hybrid.group(2))) if hybrid.group(1) else (16, 16)
        if bw % 4:
            raise SpruceError(f"hybrid tiles need a width divisible by 4 for their 2:4 tier, got {bh}x{bw}")
        tiers = tuple(tiers) if tiers is not None else DEFAULT_TIERS
        if len(tiers) != 2 or min(tiers) < 0 or sum(tiers) > 1:
            raise SpruceError(f"hybrid tiers {tiers} must be two shares (dense, 2:4) >= 0 summing to at most 1")
        return Pattern(f"hybrid:{bh}x{bw}", "hybrid", bh, bw, selection=selection,
                       tile_score=tile_score, tiers=tiers)
    raise SpruceError(f"unknown sparsity type '{name}'; {_HELP}")


def _lowest(scores: torch.Tensor, k) -> torch.Tensor:
    """Bool mask of the k lowest entries along the last dim (stable: earlier index loses ties).

    `k` is an int, or a tensor broadcastable to the leading dims for a count per row."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    k = torch.as_tensor(k, device=scores.device)
    return rank < (k.unsqueeze(-1) if k.dim() else k)


@register("unstructured")
def unstructured_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the same share of every output row (Wanda's per-output comparison group)."""
    return _lowest(score, round(score.shape[1] * sparsity))


@register("unstructured-layer")
def unstructured_layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores of the whole matrix (one threshold per layer)."""
    return _lowest(score.flatten(), round(score.numel() * sparsity)).view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive weights of a row (prune the m - n lowest)."""
    rows, cols = score.shape
    return _lowest(score.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def tile_scores(score: torch.Tensor, bh: int, bw: int, how: str = "mean") -> torch.Tensor:
    """One score per bh x bw tile, shape (R/bh, C/bw): the mean score (the reference) or the
    energy, the sum of squared scores (for Wanda scores: the diagonal estimate of the output
    error that removing the tile causes)."""
    tiles = tile_view(score.float(), bh, bw)
    return tiles.mean(dim=(2, 3)) if how == "mean" else tiles.square().sum(dim=(2, 3))


def expand_tiles(tile_mask: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """(R/bh, C/bw) tile mask -> (R, C) weight mask."""
    return tile_mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def select_tiles(tiles: torch.Tensor, sparsity: float, selection: str = "global") -> torch.Tensor:
    """Which tiles to prune given one score per tile: the lowest share of the whole matrix
    (`global`) or the same count in every block-row (`row-balanced`)."""
    if selection == "row-balanced":
        return _lowest(tiles, round(tiles.shape[1] * sparsity))
    return _lowest(tiles.flatten(), round(tiles.numel() * sparsity)).view_as(tiles)


def block_global_mask(score: torch.Tensor, sparsity: float, bh: int, bw: int) -> torch.Tensor:
    """Whole bh x bw tiles: tile score = mean score of the tile, one threshold per matrix."""
    return expand_tiles(select_tiles(tile_scores(score, bh, bw), sparsity), bh, bw)


def block_row_balanced_mask(score: torch.Tensor, sparsity: float, bh: int, bw: int,
                            how: str = "mean") -> torch.Tensor:
    """Whole tiles, every block-row pruning the same number of tiles."""
    return expand_tiles(select_tiles(tile_scores(score, bh, bw, how), sparsity, "row-balanced"), bh, bw)


def hybrid_tier_counts(n_tiles: int, tile_size: int, sparsity: float,
                       tiers: tuple[float, float]) -> tuple[int, int, int, int]:
    """(dense tiles, 2:4 tiles, top-k weights per remaining tile, tiles that keep one more)
    so that exactly round(n_tiles * tile_size * (1 - sparsity)) weights are kept."""
    n_dense = round(n_tiles * tiers[0])
    n_nm = min(round(n_tiles * tiers[1]), n_tiles - n_dense)
    n_topk = n_tiles - n_dense - n_nm
    total = n_tiles * tile_size
    budget = total - round(total * sparsity) - n_dense * tile_size - n_nm * tile_size // 2
    if n_topk == 0 and abs(budget) <= 0.01 * total:
        # no top-k tier to absorb rounding: the tiers fix the sparsity (within 1% of the target)
        return n_dense, n_nm, 0, 0
    if budget < 0 or (n_topk == 0 and budget > 0) or budget > n_topk * tile_size:
        raise SpruceError(f"hybrid tiers {tiers} (dense, 2:4) cannot reach sparsity {sparsity}; "
                          "lower the dense / 2:4 shares for higher sparsity, raise them for lower")
    k, extra = divmod(budget, n_topk) if n_topk else (0, 0)
    return n_dense, n_nm, k, extra


def hybrid_mask(score: torch.Tensor, sparsity: float, bh: int, bw: int,
                tiers: tuple[float, float] = DEFAULT_TIERS, how: str = "mean") -> torch.Tensor:
    """Three tiers per tile, by tile score: the best tiles dense, the next 2:4 along the input
    dim, the rest keep their top-k weights (k solved for the exact target)."""
    rows, cols = score.shape
    tiles = tile_view(score.float(), bh, bw)                    # (tr, tc, bh, bw)
    flat = tiles.reshape(-1, bh, bw)
    n_dense, n_nm, k, extra = hybrid_tier_counts(flat.shape[0], bh * bw, sparsity, tiers)
    rank = torch.argsort(torch.argsort(-tile_scores(score, bh, bw, how).flatten(), stable=True))
    nm = nm_mask(flat.reshape(-1, bw), 2, 4).reshape_as(flat)
    topk_rank = (rank - n_dense - n_nm).clamp(min=0)
    keep_k = k + (topk_rank < extra).long()                     # the best top-k tiles keep one more
    topk = _lowest(flat.reshape(flat.shape[0], -1), bh * bw - keep_k).reshape_as(flat)
    tier = torch.where(rank < n_dense, 0, torch.where(rank < n_dense + n_nm, 1, 2))
    pruned = torch.where((tier == 1)[:, None, None], nm, topk) & (tier != 0)[:, None, None]
    return pruned.reshape(tiles.shape).transpose(1, 2).reshape(rows, cols)


def mask_from_pattern(pattern: Pattern, score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Apply a parsed pattern to a score matrix."""
    if pattern.kind == "nm":
        return nm_mask(score, pattern.keep, pattern.cols)
    if pattern.kind == "block":
        tiles = tile_scores(score, pattern.rows, pattern.cols, pattern.tile_score)
        return expand_tiles(select_tiles(tiles, sparsity, pattern.selection), pattern.rows, pattern.cols)
    if pattern.kind == "hybrid":
        return hybrid_mask(score, sparsity, pattern.rows, pattern.cols, pattern.tiers, pattern.tile_score)
    return PATTERNS[pattern.kind](score, sparsity)


def mask_for(pattern: str | Pattern, score: torch.Tensor, sparsity: float, **options) -> torch.Tensor:
    """Look a pattern up by name (see the module docstring) and apply it to a score matrix."""
    if isinstance(pattern, str):
        pattern = parse_pattern(pattern, **options)
    return mask_from_pattern(pattern, score, sparsity)


def check_divides(pattern: str | Pattern, shapes: dict[str, tuple[int, int]]) -> None:
    """Fail before any work when a pattern does not tile some layer; name the layer and what fits."""
    p = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    if p.kind == "nm":
        for name, (rows, cols) in shapes.items():
            if cols % p.cols:
                raise SpruceError(f"{p.name} groups of {p.cols} do not divide the {cols} inputs of {name} "
                                  f"({rows}x{cols}); use an M that divides {cols}, or unstructured")
        return
    if p.kind not in ("block", "hybrid"):
        return
    for name, (rows, cols) in shapes.items():
        if rows % p.rows or cols % p.cols:
            fits = [b for b in (8, 16, 32, 64) if rows % b == 0 and cols % b == 0]
            hint = f"block sizes that fit it: {', '.join(f'{b}x{b}' for b in fits)}" if fits \
                else "no square block of 8-64 fits it; use unstructured"
            raise SpruceError(f"{p.rows}x{p.cols} blocks do not divide {name} ({rows}x{cols}); {hint}")


def parse_tiers(text: str | None) -> tuple[float, float] | None:
    """`0.2,0.4` -> (0.2, 0.4): the dense and 2:4 shares of hybrid tiles; None stays None."""
    if text is None:
        return None
    try:
        dense, nm = (float(v) for v in text.split(","))
    except ValueError:
        raise SpruceError(f"hybrid tiers take two shares DENSE,NM such as 0.2,0.4, got '{text}'") from None
    return dense, nm


def validate_pattern(pattern: str, **options) -> Pattern:
    return parse_pattern(pattern, **options)
