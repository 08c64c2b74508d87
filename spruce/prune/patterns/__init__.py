"""Mask shapes, registered by name: which weights to remove given a score per weight.

One module per pattern kind, each registering a `Pattern` subclass (see base.py for what a kind
implements):
  - unstructured.py: `unstructured` (the same share of every output row) and
    `unstructured-layer` (one threshold for the whole matrix);
  - nm.py: `N:M` (`2:4`, `4:8`): at most N nonzeros in every M consecutive input weights;
  - block.py: `BxB` / `RxC` (`16x16`, `16x64`): whole tiles, `global` or `row-balanced`;
  - hybrid.py: `hybrid:RxC`: tiles in dense, 2:4 and top-k tiers.
Adding a kind is one new module here (it is imported and registered automatically) plus its test.

Every mask takes a score matrix (out_features, in_features; higher = more important) and returns
a bool mask, True where the weight is pruned. Ties are broken deterministically by position
(stable sort), which matters for quantized checkpoints whose magnitudes tie often. All masks are
computed with tensor operations, without Python loops over tiles or groups.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from ...errors import SpruceError
from .base import (PATTERNS, SELECTIONS, TILE_SCORES, Pattern, expand_tiles, lowest, register, select_tiles,
                   tile_scores)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

from .block import block_global_mask  # noqa: E402  (re-exported names of the kind modules)
from .hybrid import DEFAULT_TIERS, hybrid_mask, hybrid_tier_counts  # noqa: E402
from .nm import nm_mask  # noqa: E402
from .unstructured import unstructured_layer_mask, unstructured_row_mask  # noqa: E402


def kinds() -> list[type[Pattern]]:
    """The registered pattern kinds, in help-text order."""
    return sorted(PATTERNS.values(), key=lambda cls: cls.order)


def pattern_help() -> str:
    """`use unstructured, ..., or hybrid:16x16`: the syntaxes of every registered kind."""
    names = [cls.syntax for cls in kinds()]
    return "use " + ", ".join(names[:-1]) + ", or " + names[-1]


def parse_pattern(name: str, selection: str = "global", tile_score: str = "mean",
                  tiers: tuple[float, float] | None = None) -> Pattern:
    """Parse a pattern name with the registered kinds; one clear error for a bad one."""
    if selection not in SELECTIONS:
        raise SpruceError(f"unknown block selection '{selection}'; use {' or '.join(SELECTIONS)}")
    if tile_score not in TILE_SCORES:
        raise SpruceError(f"unknown tile score '{tile_score}'; use {' or '.join(TILE_SCORES)}")
    for cls in kinds():
        pattern = cls.parse(name, selection, tile_score, tiers)
        if pattern is not None:
            return pattern
    raise SpruceError(f"unknown sparsity type '{name}'; {pattern_help()}")


def mask_from_pattern(pattern: Pattern, score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Apply a parsed pattern to a score matrix."""
    return pattern.mask(score, sparsity)


def mask_for(pattern: str | Pattern, score: torch.Tensor, sparsity: float, **options) -> torch.Tensor:
    """Look a pattern up by name (see the module docstring) and apply it to a score matrix."""
    if isinstance(pattern, str):
        pattern = parse_pattern(pattern, **options)
    return pattern.mask(score, sparsity)


def check_divides(pattern: str | Pattern, shapes: dict[str, tuple[int, int]]) -> None:
    """Fail before any work when a pattern does not tile some layer; name the layer and what fits."""
    (parse_pattern(pattern) if isinstance(pattern, str) else pattern).check_divides(shapes)


def parse_tiers(text: str | None) -> tuple[float, float] | None:
    """`0.2,0.4` -> (0.2, 0.4): the dense and 2:4 shares of hybrid tiles; None stays None."""
    if text is None:
        return None
    try:
        dense, nm = (float(v) for v in text.split(","))
    except ValueError:
        raise SpruceError(f"hybrid tiers take two shares DENSE,NM such as 0.2,0.4, got '{text}'") from None
    return dense, nm


__all__ = ["PATTERNS", "SELECTIONS", "TILE_SCORES", "DEFAULT_TIERS", "Pattern", "register", "kinds", "parse_pattern",
           "pattern_help", "mask_for", "mask_from_pattern", "check_divides", "parse_tiers", "lowest", "tile_scores",
           "expand_tiles", "select_tiles", "nm_mask", "block_global_mask", "hybrid_mask", "hybrid_tier_counts",
           "unstructured_row_mask", "unstructured_layer_mask"]
