"""Pruning: the options (spec.py), methods (methods.py), mask shapes (patterns/), layer sparsity
(allocate.py), layer-by-layer calibration (engine.py), layer reconstruction (reconstruct.py), the
per-pattern defaults (defaults.py) and one pruning run with saving (run.py)."""

from .engine import prune_model
from .methods import METHODS
from .patterns import PATTERNS, mask_for, parse_pattern
from .reconstruct import Reconstruct
from .spec import PruneSpec

__all__ = ["prune_model", "PruneSpec", "Reconstruct", "METHODS", "PATTERNS", "mask_for", "parse_pattern"]
