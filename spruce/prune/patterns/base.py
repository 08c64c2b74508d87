"""What every pattern kind implements, the registry by kind, and the tensor helpers they share.

A pattern kind is a frozen dataclass deriving from `Pattern`, decorated with `@register`, in its
own module of this package (the package imports every module in it). It implements
  - `parse(name, selection, tile_score, tiers)`: the pattern for a name of its syntax, else None;
  - `mask(score, sparsity)`: the bool prune mask of a score matrix (True = pruned);
  - `sweep_group` / `sweep_mask(err, sparsity)`: how the SparseGPT sweep chooses the mask inside
    it, one group of columns at a time, by OBS error (`in_sweep = False`: the mask needs
    whole-matrix decisions and is chosen before the sweep);
  - `check_divides(shapes)`: a clear error when the pattern does not tile a layer;
  - `syntax` and `description`: one line each for help texts and errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import SpruceError
from ...masks import tile_view

PATTERNS: dict[str, type[Pattern]] = {}
SELECTIONS = ("global", "row-balanced")
TILE_SCORES = ("mean", "energy")


def register(cls):
    """Class decorator: make a pattern kind known to parse_pattern under `cls.kind`."""
    PATTERNS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: its canonical name plus the options of its kind."""
    name: str

    kind: ClassVar[str] = ""            # registry key, also the key of prune/defaults.py DEFAULTS
    syntax: ClassVar[str] = ""          # how a user writes it, e.g. "N:M such as 2:4"
    description: ClassVar[str] = ""     # one line: what the mask keeps
    order: ClassVar[int] = 100          # position in help texts and errors
    in_sweep: ClassVar[bool] = True     # the SparseGPT sweep can choose the mask column group by column group
    obs_tiles: ClassVar[bool] = False   # gradual group OBS (method `obs`) can remove its tiles

    @classmethod
    def parse(cls, name: str, selection: str, tile_score: str, tiers) -> Pattern | None:
        raise NotImplementedError

    def mask(self, score: torch.Tensor, sparsity: float) -> torch.Tensor:
        raise NotImplementedError

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern implies; None where the sparsity is free."""
        return None

    @property
    def sweep_group(self) -> int | None:
        """Columns one in-sweep mask decision covers; None: one decision per lazy batch."""
        return None

    def sweep_mask(self, err: torch.Tensor, sparsity: float) -> torch.Tensor:
        """The prune mask of one sweep group given its OBS errors w^2 / d^2 (out, group)."""
        raise NotImplementedError

    def sweep_mask_at(self, col: int, err: torch.Tensor, sparsity: float) -> torch.Tensor:
        """`sweep_mask` for the sweep group starting at input column `col` (kinds whose counts
        depend on the position override it; the default ignores it)."""
        return self.sweep_mask(err, sparsity)

    def check_divides(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Fail before any work when the pattern does not tile some layer (default: any shape)."""

    @property
    def zero_blocks(self) -> tuple[int, int] | None:
        """(rows, cols) of the whole blocks its zeros come in (what a block-sparse store keeps
        or drops), None when its zeros are not whole blocks."""
        return None

    @property
    def selection_name(self) -> str:
        """How the pruned weights are compared, for the sparsity report."""
        raise NotImplementedError

    def report(self) -> dict:
        """The pattern's options in the sparsity report."""
        return {"tile_score": None, "hybrid_tiers": None}


@dataclass(frozen=True)
class Tiled(Pattern):
    """A pattern decided per rows x cols tile (block, hybrid): the tile shape and how tiles are ranked."""
    rows: int = 16                  # tile height
    cols: int = 16                  # tile width
    selection: str = "global"       # global | row-balanced
    tile_score: str = "mean"        # mean score (reference) | energy (sum of squared scores)

    def check_divides(self, shapes):
        check_tiles_divide(self.rows, self.cols, shapes)

    @property
    def selection_name(self):
        return self.selection

    def report(self):
        return {"tile_score": self.tile_score, "hybrid_tiers": None}


def lowest(scores: torch.Tensor, k) -> torch.Tensor:
    """Bool mask of the k lowest entries along the last dim (stable: earlier index loses ties).

    `k` is an int, or a tensor broadcastable to the leading dims for a count per row."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    k = torch.as_tensor(k, device=scores.device)
    return rank < (k.unsqueeze(-1) if k.dim() else k)


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
        return lowest(tiles, round(tiles.shape[1] * sparsity))
    return lowest(tiles.flatten(), round(tiles.numel() * sparsity)).view_as(tiles)


def check_tiles_divide(rows_per_tile: int, cols_per_tile: int, shapes: dict[str, tuple[int, int]]) -> None:
    """Every layer must split into whole rows_per_tile x cols_per_tile tiles; name one that does
    not and the square blocks that would fit it."""
    for name, (rows, cols) in shapes.items():
        if rows % rows_per_tile or cols % cols_per_tile:
            fits = [b for b in (8, 16, 32, 64) if rows % b == 0 and cols % b == 0]
            hint = f"block sizes that fit it: {', '.join(f'{b}x{b}' for b in fits)}" if fits \
                else "no square block of 8-64 fits it; use unstructured"
            raise SpruceError(f"{rows_per_tile}x{cols_per_tile} blocks do not divide {name} ({rows}x{cols}); {hint}")
