"""Block patterns (`BxB` / `RxC`: `16x16`, `16x64`): whole R x C tiles are zero or untouched.

Tiles are chosen by a tile score (`mean`, the reference, or `energy`) with `global` selection
(one threshold per matrix, the reference workflow) or `row-balanced` selection (every block-row
keeps the same number of tiles, which GPU kernels prefer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import SpruceError
from ...masks import parse_block
from .base import Tiled, expand_tiles, lowest, register, select_tiles, tile_scores


def block_global_mask(score: torch.Tensor, sparsity: float, bh: int, bw: int) -> torch.Tensor:
    """Whole bh x bw tiles: tile score = mean score of the tile, one threshold per matrix."""
    return expand_tiles(select_tiles(tile_scores(score, bh, bw), sparsity), bh, bw)


@register
@dataclass(frozen=True)
class Block(Tiled):
    kind = "block"
    syntax = "a block size such as 16x16"
    description = "whole R x C tiles are zero or untouched"
    order = 3
    obs_tiles = True

    @property
    def zero_blocks(self):
        return (self.rows, self.cols)

    @classmethod
    def parse(cls, name, selection, tile_score, tiers):
        block = parse_block(name)
        if block is None:
            return None
        if min(block) < 1:
            raise SpruceError(f"block size {name} must be positive")
        return cls(name, *block, selection=selection, tile_score=tile_score)

    @property
    def in_sweep(self):
        return self.selection != "row-balanced"   # balancing block-rows needs the whole matrix

    def mask(self, score, sparsity):
        tiles = tile_scores(score, self.rows, self.cols, self.tile_score)
        return expand_tiles(select_tiles(tiles, sparsity, self.selection), self.rows, self.cols)

    @property
    def sweep_group(self):
        return self.cols

    def sweep_mask(self, err, sparsity):
        """Each tile column prunes the same share of its tiles, by summed OBS error."""
        tiles = err.reshape(-1, self.rows, err.shape[1]).sum(dim=(1, 2))
        return lowest(tiles, round(tiles.numel() * sparsity)).repeat_interleave(self.rows).unsqueeze(1).expand_as(err)

    def obs_select(self, err: torch.Tensor, pruned: torch.Tensor, share: float) -> torch.Tensor:
        """Gradual OBS: the tiles to prune next, by OBS error, so `share` of the tiles are gone."""
        if self.selection == "row-balanced":
            return lowest(err, round(pruned.shape[1] * share) - pruned.sum(1))
        return lowest(err.flatten(), round(pruned.numel() * share) - int(pruned.sum())).view_as(pruned)
