"""Hybrid patterns (`hybrid:RxC`, `hybrid` = `hybrid:16x16`): every tile is in one of three
tiers, chosen by tile score: dense, N:M (2:4), or top-k (the k highest-scoring weights of the
tile), with the dense and 2:4 shares given and k solved so the matrix hits the target sparsity
exactly."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...errors import SpruceError
from ...masks import tile_view
from .base import Tiled, lowest, register, tile_scores
from .nm import nm_mask

DEFAULT_TIERS = (0.2, 0.4)  # shares of tiles kept dense and kept 2:4; the rest are top-k
_HYBRID = re.compile(r"^hybrid(?::(\d+)x(\d+))?$")


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
    topk = lowest(flat.reshape(flat.shape[0], -1), bh * bw - keep_k).reshape_as(flat)
    tier = torch.where(rank < n_dense, 0, torch.where(rank < n_dense + n_nm, 1, 2))
    pruned = torch.where((tier == 1)[:, None, None], nm, topk) & (tier != 0)[:, None, None]
    return pruned.reshape(tiles.shape).transpose(1, 2).reshape(rows, cols)


@register
@dataclass(frozen=True)
class Hybrid(Tiled):
    """Tiles of rows x cols (cols divisible by 4 for the 2:4 tier), ranked into tiers by tile score
    over the whole matrix (`selection` is kept for the report)."""
    tiers: tuple[float, float] = DEFAULT_TIERS  # (dense share, 2:4 share) of the tiles

    kind = "hybrid"
    syntax = "hybrid:16x16"
    description = "tiers of tiles by tile score: dense, 2:4, and top-k solved for the target"
    order = 4
    in_sweep = False                # the tiers rank all tiles of the matrix

    @classmethod
    def parse(cls, name, selection, tile_score, tiers):
        match = _HYBRID.match(name)
        if not match:
            return None
        bh, bw = (int(match.group(1)), int(match.group(2))) if match.group(1) else (16, 16)
        if bw % 4:
            raise SpruceError(f"hybrid tiles need a width divisible by 4 for their 2:4 tier, got {bh}x{bw}")
        tiers = tuple(tiers) if tiers is not None else DEFAULT_TIERS
        if len(tiers) != 2 or min(tiers) < 0 or sum(tiers) > 1:
            raise SpruceError(f"hybrid tiers {tiers} must be two shares (dense, 2:4) >= 0 summing to at most 1")
        return cls(f"hybrid:{bh}x{bw}", bh, bw, selection=selection, tile_score=tile_score, tiers=tiers)

    def mask(self, score, sparsity):
        return hybrid_mask(score, sparsity, self.rows, self.cols, self.tiers, self.tile_score)

    def report(self):
        return {"tile_score": self.tile_score, "hybrid_tiers": {"dense": self.tiers[0], "2:4": self.tiers[1]}}
