"""Mask shapes, registered by name: which weights to remove given a score per weight.

Each function takes a score matrix (out_features, in_features; higher = more important) and a
sparsity in [0, 1) and returns a bool mask, True where the weight is pruned. Ties are broken
deterministically by position (stable sort), which matters for quantized checkpoints whose
magnitudes tie often.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import SpruceError
from ..masks import parse_block, tile_view

PATTERNS: dict[str, Callable[..., torch.Tensor]] = {}


def register(name: str):
    def wrap(fn):
        PATTERNS[name] = fn
        return fn
    return wrap


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries along the last dim (stable: earlier index loses ties)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


@register("unstructured")
def unstructured_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the same share of every output row (Wanda's per-output comparison group)."""
    return _lowest(score, int(score.shape[1] * sparsity))


@register("unstructured-layer")
def unstructured_layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores of the whole matrix (one threshold per layer)."""
    return _lowest(score.flatten(), int(score.numel() * sparsity)).view_as(score)


def block_global_mask(score: torch.Tensor, sparsity: float, bh: int, bw: int) -> torch.Tensor:
    """Whole bh x bw tiles: tile score = mean score of the tile, one threshold per matrix."""
    tiles = tile_view(score, bh, bw).mean(dim=(2, 3))
    pruned_tiles = _lowest(tiles.flatten(), round(tiles.numel() * sparsity)).view_as(tiles)
    return pruned_tiles.repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def check_divides(pattern: str, shapes: dict[str, tuple[int, int]]) -> None:
    """Fail before any work when a block pattern does not tile some layer."""
    block = parse_block(pattern)
    if block is None:
        return
    bh, bw = block
    for name, (rows, cols) in shapes.items():
        if rows % bh or cols % bw:
            fits = [b for b in (8, 16, 32, 64) if rows % b == 0 and cols % b == 0]
            hint = f"block sizes that fit it: {', '.join(f'{b}x{b}' for b in fits)}" if fits \
                else "no square block of 8-64 fits it; use unstructured"
            raise SpruceError(f"{pattern} blocks do not divide {name} ({rows}x{cols}); {hint}")


def mask_for(pattern: str, score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Look a pattern up by name (`unstructured`, `unstructured-layer`, `BxB`, `RxC`) and apply it."""
    block = parse_block(pattern)
    if block is not None:
        return block_global_mask(score, sparsity, *block)
    if pattern not in PATTERNS:
        raise SpruceError(f"unknown sparsity type '{pattern}'; use unstructured, "
                          "unstructured-layer, or a block size such as 16x16")
    return PATTERNS[pattern](score, sparsity)


def validate_pattern(pattern: str) -> None:
    block = parse_block(pattern)
    if block is not None:
        if min(block) < 1:
            raise SpruceError(f"block size {pattern} must be positive")
        return
    if pattern not in PATTERNS:
        raise SpruceError(f"unknown sparsity type '{pattern}'; use unstructured, "
                          "unstructured-layer, or a block size such as 16x16")
