"""N:M patterns (`2:4`, `4:8`, any 0 < N < M): at most N nonzeros in every M consecutive input
weights of a row (the sparse tensor core convention: `2:4` keeps 2 of every 4), so the sparsity
is fixed by the pattern at 1 - N/M."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...errors import SpruceError
from .base import Pattern, lowest, register

_NM = re.compile(r"^(\d+):(\d+)$")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive weights of a row (prune the m - n lowest)."""
    rows, cols = score.shape
    return lowest(score.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


@register
@dataclass(frozen=True)
class NM(Pattern):
    keep: int = 2        # N: weights kept in every group
    cols: int = 4        # M: the group of consecutive input weights

    kind = "nm"
    syntax = "N:M such as 2:4"
    description = "at most N nonzeros in every M consecutive input weights of a row"
    order = 2

    @classmethod
    def parse(cls, name, selection, tile_score, tiers):
        match = _NM.match(name)
        if not match:
            return None
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise SpruceError(f"N:M pattern {name} needs 0 < N < M (N nonzeros kept in every M weights), "
                              "e.g. 2:4 or 4:8")
        return cls(name, n, m)

    @property
    def fixed_sparsity(self):
        return 1 - self.keep / self.cols

    def mask(self, score, sparsity):
        return nm_mask(score, self.keep, self.cols)

    @property
    def sweep_group(self):
        return self.cols

    def sweep_mask(self, err, sparsity):
        return nm_mask(err, self.keep, self.cols)

    def check_divides(self, shapes):
        for name, (rows, cols) in shapes.items():
            if cols % self.cols:
                raise SpruceError(f"{self.name} groups of {self.cols} do not divide the {cols} inputs of {name} "
                                  f"({rows}x{cols}); use an M that divides {cols}, or unstructured")

    @property
    def selection_name(self):
        return "per-group"
