"""The default recipe for each kind of pattern: the best one measured (docs/prune-notes.md).

`spruce prune --sparsity_type 16x16 --sparsity_ratio 0.5` with no method flag uses these; any
flag the user gives wins over the default.

Measured on the embedded model at 50% (H200, 128 x 1024 calibration tokens, 146 test windows):
unstructured: sparsegpt per row 1.85x dense (Wanda 2.25x); 16x16: gradual block OBS refit
toward the dense outputs with attention at 40% (MLP higher, total kept) 42x dense, against
583x for the reference (Wanda, mean tile score, one threshold per matrix).
"""

from __future__ import annotations

from .patterns import parse_pattern

DEFAULTS: dict[str, dict] = {
    "unstructured": {"method": "sparsegpt"},
    "unstructured-layer": {"method": "sparsegpt"},
    "nm": {"method": "sparsegpt"},
    "block": {"method": "obs", "selection": "global", "dense_target": True,
              "module_sparsity": {"attn": 0.4}},
    "hybrid": {"method": "sparsegpt"},
}
BASE = {"method": "wanda", "selection": "global", "tile_score": "mean", "allocation": "uniform",
        "module_sparsity": None, "dense_target": False}


def resolve_recipe(pattern: str, **given) -> dict:
    """The recipe for `pattern`: the given options where set (not None), else the pattern's
    default, else BASE. Default module overrides are marked optional: they are dropped for
    models whose linears they do not name (see fit_to_model)."""
    kind = parse_pattern(pattern).kind
    recipe = {**BASE, **DEFAULTS.get(kind, {})}
    recipe["module_sparsity_is_default"] = given.get("module_sparsity") is None
    recipe.update({k: v for k, v in given.items() if v is not None})
    if recipe["method"] in ("magnitude", "wanda"):
        recipe["dense_target"] = given.get("dense_target") or False  # needs a Hessian method
    return recipe


def fit_to_model(recipe: dict, linear_names: list[str]) -> dict:
    """Drop default module overrides that name no linear of this model (user ones stay strict)."""
    overrides = recipe.get("module_sparsity")
    if overrides and recipe.get("module_sparsity_is_default"):
        kept = {k: v for k, v in overrides.items() if any(k in n for n in linear_names)}
        recipe = {**recipe, "module_sparsity": kept or None}
    return recipe
