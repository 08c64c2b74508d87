"""The default recipe for each kind of pattern: the best one measured (docs/prune-notes.md).

`spruce prune --sparsity_type 16x16 --sparsity_ratio 0.5` with no method flag uses these; any
flag the user gives wins over the default.
"""

from __future__ import annotations

from .patterns import parse_pattern

DEFAULTS: dict[str, dict] = {
    "unstructured": {"method": "sparsegpt"},
    "unstructured-layer": {"method": "sparsegpt"},
    "nm": {"method": "sparsegpt"},
    "block": {"method": "obs", "selection": "global", "allocation": "uniform"},
    "hybrid": {"method": "sparsegpt"},
}
BASE = {"method": "wanda", "selection": "global", "tile_score": "mean", "allocation": "uniform",
        "module_sparsity": None, "dense_target": False}


def resolve_recipe(pattern: str, **given) -> dict:
    """The recipe for `pattern`: the given options where set (not None), else the pattern's
    default, else BASE."""
    kind = parse_pattern(pattern).kind
    recipe = {**BASE, **DEFAULTS.get(kind, {})}
    recipe.update({k: v for k, v in given.items() if v is not None})
    return recipe
