"""Unstructured patterns: `unstructured` prunes the same share of every output row (Wanda's
comparison group); `unstructured-layer` uses one threshold for the whole matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, lowest, register


def unstructured_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the same share of every output row (Wanda's per-output comparison group)."""
    return lowest(score, round(score.shape[1] * sparsity))


def unstructured_layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores of the whole matrix (one threshold per layer)."""
    return lowest(score.flatten(), round(score.numel() * sparsity)).view_as(score)


@register
@dataclass(frozen=True)
class Unstructured(Pattern):
    kind = "unstructured"
    syntax = "unstructured"
    description = "the same share of every output row is pruned (Wanda's comparison group)"
    order = 0

    @classmethod
    def parse(cls, name, selection, tile_score, tiers):
        return cls(name) if name == cls.kind else None

    def mask(self, score, sparsity):
        return unstructured_row_mask(score, sparsity)

    def sweep_mask(self, err, sparsity):   # per output row, inside every lazy batch
        return lowest(err, round(err.shape[1] * sparsity))

    @property
    def selection_name(self):
        return "per-row"


@register
@dataclass(frozen=True)
class UnstructuredLayer(Unstructured):
    kind = "unstructured-layer"
    syntax = "unstructured-layer"
    description = "one threshold for the whole matrix"
    order = 1

    def mask(self, score, sparsity):
        return unstructured_layer_mask(score, sparsity)

    def sweep_mask(self, err, sparsity):   # the reference SparseGPT threshold, over all rows of a lazy batch
        return lowest(err.flatten(), round(err.numel() * sparsity)).view_as(err)

    @property
    def selection_name(self):
        return "per-layer"
