"""Pruning: methods (methods.py), mask shapes (patterns.py), layer sparsity (allocate.py) and
layer-by-layer calibration (engine.py)."""

from .engine import Reconstruct, prune_model
from .methods import METHODS
from .patterns import PATTERNS, mask_for, parse_pattern

__all__ = ["prune_model", "Reconstruct", "METHODS", "PATTERNS", "mask_for", "parse_pattern"]
