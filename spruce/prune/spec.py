"""`PruneSpec`: every option of a pruning run, each with its one default, validated on creation.

`prune_model(model, spec, samples)` reads it; `spruce prune` maps its flags onto it and the
`prune:` section of a YAML recipe holds its fields; `dataclasses.asdict(spec)` is what the
sparsity report records and what the resumable state's fingerprint digests. The defaults are
those of a plain run (a named method with nothing else switched on); prune/defaults.py layers each
pattern's best measured recipe on top when no method is named.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from ..errors import SpruceError
from . import allocate as alloc
from .methods import METHODS, OBS_REFITS, obs_refit_for
from .patterns import Pattern, parse_pattern
from .reconstruct import RECONSTRUCT_LR, Reconstruct

@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how; see `spruce prune --help` for each option in words."""
    # --- what to remove
    method: str = "wanda"               # a name of METHODS: magnitude | wanda | sparsegpt | wanda+update | obs
    pattern: str = "unstructured"       # a pattern name (prune/patterns): unstructured, 2:4, 16x16, hybrid:16x16, ...
    sparsity: float = 0.5               # share of the decoder linear weights set to zero, in [0, 1)
    selection: str = "global"           # block tiles: one threshold per matrix (global) or per block-row (row-balanced)
    tile_score: str = "mean"            # block tiles ranked by their mean score (the reference) or energy
    tiers: tuple[float, float] | None = None  # hybrid: (dense, 2:4) shares of the tiles; None = the pattern's
    permute: bool = False               # block patterns: first reorder each MLP's intermediate features so rows
                                        # valuing the same block-columns share a tile (permute.py; function unchanged)
    # --- how much per layer
    allocation: str = "uniform"         # uniform | owl (decoder blocks with more outliers pruned less)
    owl_m: float = alloc.OWL_M          # owl: an outlier scores above M x its block's mean score
    owl_lambda: float = alloc.OWL_LAMBDA  # owl: block sparsities span the target +- lambda
    module_sparsity: dict[str, float] | None = None  # fixed sparsity for linears whose name contains the key
    module_patterns: dict[str, str] | None = None  # another pattern for linears whose name contains the key
                                        # (e.g. {"mlp.gate_proj": "16x16g8"}: wider tiles where the kernel gains)
    # --- how the kept weights are updated
    dense_target: bool = False          # Hessian methods refit each layer toward the dense model's outputs
    sequential: bool = False            # within a layer, prune q/k/v, o, gate/up, down in order, each on pruned inputs
    reconstruct_epochs: int = 0         # Adam passes over the calibration set per pruned layer; 0 = off
    reconstruct_lr: float = RECONSTRUCT_LR  # learning rate of that reconstruction
    reconstruct_target: str = "dense"   # dense model's outputs on its own inputs (dense) or on the pruned inputs (local)
    reconstruct_norms: bool = False     # the reconstruction also trains the layer's norm weights
    # --- gradual block OBS (method obs)
    obs_refit: str = "auto"             # exact (a Cholesky refit per block-row) | iterative (batched CG) | auto (exact while affordable)
    obs_max_inputs: int | None = None   # linears with more inputs are pruned with sparsegpt instead; None = obs on all
    # --- calibration
    nsamples: int = 128                 # calibration samples drawn by run_prune (prune_model reads what it is given)
    seqlen: int = 2048                  # tokens per calibration sample (the Wanda and SparseGPT scripts' length)
    batch_size: int = 8                 # calibration samples per forward call

    def __post_init__(self):
        if self.method not in METHODS:
            raise SpruceError(f"unknown prune method '{self.method}'; use one of {', '.join(METHODS)}")
        if not 0 <= self.sparsity < 1:
            raise SpruceError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.allocation not in alloc.ALLOCATIONS:
            raise SpruceError(f"unknown allocation '{self.allocation}'; use {' or '.join(alloc.ALLOCATIONS)}")
        Reconstruct(self.reconstruct_epochs, self.reconstruct_lr, self.reconstruct_target,
                    self.reconstruct_norms)   # checks the reconstruction fields
        if self.obs_refit not in OBS_REFITS:
            raise SpruceError(f"unknown OBS refit '{self.obs_refit}'; use one of {', '.join(OBS_REFITS)}")
        if self.obs_max_inputs is not None and (not isinstance(self.obs_max_inputs, int) or self.obs_max_inputs < 0):
            raise SpruceError(f"obs_max_inputs must be a whole number >= 0, got {self.obs_max_inputs}")
        if min(self.nsamples, self.seqlen, self.batch_size) <= 0:
            raise SpruceError("nsamples, seqlen and batch_size must be positive, got "
                              f"{self.nsamples}, {self.seqlen} and {self.batch_size}")
        set_ = object.__setattr__        # frozen: normalise once, here
        set_(self, "tiers", tuple(self.tiers) if self.tiers is not None else None)
        set_(self, "module_sparsity", dict(self.module_sparsity) if self.module_sparsity else None)
        pattern = self.parsed           # a bad pattern, selection, tile score or tiers fails here
        set_(self, "pattern", pattern.name)
        if not isinstance(self.permute, bool):
            raise SpruceError(f"permute must be true or false, got {self.permute!r}")
        if self.permute and pattern.kind not in ("block", "grouped"):
            raise SpruceError(f"permute reorders MLP features into block-rows; {pattern.name} is not a block pattern")
        fixed = pattern.fixed_sparsity
        if fixed is not None and self.sparsity != 0 and abs(self.sparsity - fixed) >= 1e-9:
            warnings.warn(f"{pattern.name} fixes the sparsity at {fixed:g}; the requested {self.sparsity:g} is not used")
            set_(self, "sparsity", fixed)
        if fixed is not None and (self.allocation != "uniform" or self.module_sparsity):
            raise SpruceError(f"{pattern.name} fixes every layer's sparsity; use uniform allocation without overrides")
        patterns = {}
        for key, name in (self.module_patterns or {}).items():
            other = parse_pattern(name, self.selection, self.tile_score, self.tiers)
            if other.fixed_sparsity is not None or fixed is not None:
                raise SpruceError(f"module patterns need patterns whose sparsity is free; {key}={other.name} "
                                  f"with {pattern.name} elsewhere is not that")
            if self.permute and other.kind not in ("block", "grouped"):
                raise SpruceError(f"permute reorders MLP features into block-rows; {other.name} is not a block pattern")
            patterns[key] = other.name
        set_(self, "module_patterns", patterns or None)

    @property
    def parsed(self) -> Pattern:
        return parse_pattern(self.pattern, self.selection, self.tile_score, self.tiers)

    def pattern_for(self, name: str) -> Pattern:
        """The pattern of the linear called `name`: the first module pattern whose key its name
        contains, else the spec's pattern."""
        for key, other in (self.module_patterns or {}).items():
            if key in name:
                return parse_pattern(other, self.selection, self.tile_score, self.tiers)
        return self.parsed

    def check_divides(self, shapes: dict[str, tuple[int, int]]) -> None:
        """A clear error unless each module pattern's key names a linear of {name: (out, in)} and
        each linear's pattern tiles its shape."""
        for key in self.module_patterns or {}:
            if not any(key in name for name in shapes):
                raise SpruceError(f"module pattern key '{key}' matches no decoder linear "
                                  f"(names look like {next(iter(shapes), '?')})")
        for name, shape in shapes.items():
            self.pattern_for(name).check_divides({name: shape})

    @property
    def reconstruct(self) -> Reconstruct | None:
        """The layer reconstruction, None when it is off."""
        if not self.reconstruct_epochs:
            return None
        return Reconstruct(self.reconstruct_epochs, self.reconstruct_lr, self.reconstruct_target, self.reconstruct_norms)

    def linear_method(self, shape: tuple[int, int], name: str = "") -> str:
        """What prunes the linear `name` of `shape` (out, in): the method, except for `obs`:
        "sparsegpt" past obs_max_inputs, else "obs-exact" or "obs-iterative" (methods.obs_refit_for)."""
        pattern = self.pattern_for(name)
        if self.method != "obs" or not pattern.obs_tiles:   # obs itself refuses a pattern without tiles
            return self.method
        if self.obs_max_inputs is not None and shape[1] > self.obs_max_inputs:
            return "sparsegpt"
        return "obs-" + obs_refit_for(shape, pattern, self.obs_refit)

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration samples: a data-driven method, OWL or the reconstruction."""
        return self.sparsity > 0 and (bool(METHODS[self.method].needs) or self.allocation == "owl"
                                      or self.reconstruct_epochs > 0)


def parse_module_patterns(text: str | None) -> dict[str, str]:
    """`mlp.gate_proj=16x16g8,mlp.up_proj=16x16g8` -> {'mlp.gate_proj': '16x16g8', ...} (the patterns
    themselves are checked by PruneSpec)."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise SpruceError(f"bad module pattern '{item.strip()}'; write NAME=PATTERN pairs such as "
                              "mlp.gate_proj=16x16g8,mlp.up_proj=16x16g8")
        out[key] = value
    return out


FIELDS = tuple(f.name for f in dataclasses.fields(PruneSpec))
DEFAULTS = {f.name: f.default for f in dataclasses.fields(PruneSpec)}
# the fields a YAML recipe sets outside `prune.options` (the calibration is sized there too)
TOP_LEVEL = ("method", "pattern", "sparsity", "nsamples", "seqlen", "batch_size", "obs_max_inputs")
OPTIONS = tuple(n for n in FIELDS if n not in TOP_LEVEL)   # the `prune.options` keys


def spec_from_options(method: str, pattern: str, sparsity: float, reconstruct: Reconstruct | None = None,
                      **options) -> PruneSpec:
    """The keyword form `prune_model(model, method, pattern, sparsity, reconstruct=Reconstruct(...), **options)`."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown prune option(s) {unknown}")
    if reconstruct is not None:
        options.update(reconstruct_epochs=reconstruct.epochs, reconstruct_lr=reconstruct.lr,
                       reconstruct_target=reconstruct.target, reconstruct_norms=reconstruct.norms)
    return PruneSpec(method=method, pattern=pattern, sparsity=sparsity, **options)


def report_fields(spec: PruneSpec) -> dict:
    """asdict(spec) in the sparsity report's words: the pattern's own selection name and options,
    the reconstruction as one entry."""
    pattern, rec = spec.parsed, spec.reconstruct
    return {**dataclasses.asdict(spec), "selection": pattern.selection_name, **pattern.report(),
            "reconstruct": None if rec is None else dataclasses.asdict(rec)}


__all__ = ["PruneSpec", "FIELDS", "DEFAULTS", "OPTIONS", "spec_from_options", "report_fields", "parse_module_patterns"]
