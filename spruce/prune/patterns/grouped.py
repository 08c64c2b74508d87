"""Grouped block patterns (`RxCgG`: `16x16g4`): R x C blocks whose block-rows, in groups of G
consecutive block-rows (G*R output features), share their kept block-columns.

This is the layout the block-sparse kernels run with wide tiles (spruce/kernels/bsr.py: a group of
G block-rows stores the block-columns any of its rows keeps; `from_dense` finds G itself as the
widest group storing no all-zero block). `16x16` lets every block-row choose its own columns, so
the kernels store it with groups of one block-row (16 output features), which runs prefill at a
fraction of dense speed; `16x16g4` decides each 64-row group's columns together, so the kernels
store it in 64-feature tiles with no zero block. The kernels' widest group is 128 features
(G*R <= 128); a wider group still prunes, but is stored in 128-feature groups.

Every decision is made on the group tile (G*R x C), never on its R x C blocks alone:
  - `mask`: the group tile's score is the mean (or, for `energy`, the summed squared score) over
    all G tiles of the group, and group tiles are selected `global`ly or `row-balanced` (every
    group keeps the same count), as the block kind selects its tiles;
  - in the SparseGPT sweep, each tile column prunes its share of the group tiles by the OBS error
    summed over the group's rows; the count per column follows a running quota (column j prunes
    round(n s (j+1)) - round(n s j) of the n group tiles), so a layer with few groups (a 192-row
    k_proj has 3 groups of 64) still reaches its sparsity exactly, not round(n s) / n; gradual block OBS (method `obs`) removes and refits whole
    group tiles (one least-squares solve per group, whose rows share their inputs).
So the mask is the mask of `(G*R)xC` tiles, and spruce prunes it with the block kind's
machinery on the group tile; the name keeps what the kernels store (R x R blocks, G per group).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import SpruceError
from .base import lowest, register
from .block import Block

_GROUPED = re.compile(r"^(\d+)x(\d+)g(\d+)$")


def grouped_name(block: str, group: int) -> str:
    """`16x16`, 4 -> `16x16g4`; group 1 leaves the block pattern as it is."""
    return block if group == 1 else f"{block}g{group}"


@register
@dataclass(frozen=True)
class GroupedBlock(Block):
    # Block's `rows` is the height of the tile every decision covers: here the group tile,
    # block_rows * group; `cols` the block width.
    block_rows: int = 16            # height of one block (the kernels' block)
    group: int = 4                  # consecutive block-rows that share their kept block-columns

    kind = "grouped"
    syntax = "a grouped block size such as 16x16g4 (groups of 4 block-rows share their columns)"
    description = "R x C blocks; each group of G consecutive block-rows keeps the same block-columns"
    order = 4

    @property
    def zero_blocks(self):
        return (self.block_rows, self.cols)   # what the kernels store: R x C blocks, G per group

    @classmethod
    def parse(cls, name, selection, tile_score, tiers):
        m = _GROUPED.match(name)
        if m is None:
            return None
        rows, cols, group = (int(v) for v in m.groups())
        if min(rows, cols, group) < 1:
            raise SpruceError(f"grouped block size {name}: block sides and group must be positive")
        return cls(name, rows * group, cols, selection=selection, tile_score=tile_score,
                   block_rows=rows, group=group)

    def sweep_mask_at(self, col, err, sparsity):
        """The group tiles of tile column col // cols to prune: the lowest summed OBS errors, as many
        as the running quota allows (see the module docstring)."""
        tiles = err.reshape(-1, self.rows, err.shape[1]).sum(dim=(1, 2))
        j, n = col // self.cols, tiles.numel()
        count = round(n * sparsity * (j + 1)) - round(n * sparsity * j)
        return lowest(tiles, count).repeat_interleave(self.rows).unsqueeze(1).expand_as(err)

    def check_divides(self, shapes):
        for name, (rows, cols) in shapes.items():
            if rows % self.rows or cols % self.cols:
                fits = [g for g in (1, 2, 4, 8) if rows % (self.block_rows * g) == 0 and cols % self.cols == 0]
                hint = (f"groups that fit it: {', '.join(grouped_name(f'{self.block_rows}x{self.cols}', g) for g in fits)}"
                        if fits else f"{self.block_rows}x{self.cols} blocks do not fit it either")
                raise SpruceError(f"{self.name} needs out_features divisible by {self.rows} (= {self.block_rows} x "
                                  f"group {self.group}) and in_features by {self.cols}; {name} is {rows}x{cols}; "
                                  f"{hint}")
