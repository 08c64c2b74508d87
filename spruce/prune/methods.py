"""Pruning scores, registered by name: plain functions of a weight and its input statistics.

`magnitude` needs no data. `wanda` scores |W_ij| * ||X_j||_2 (Sun et al., 2023), where
||X_j|| is the L2 norm of input feature j over the calibration tokens.
"""

from __future__ import annotations

import torch

from ..errors import SpruceError


def magnitude_score(weight: torch.Tensor, input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    return weight.abs().float()


def wanda_score(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| scaled column-wise by the input feature norms (input_sq_norm = sum over tokens of x^2)."""
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


METHODS = {"magnitude": magnitude_score, "wanda": wanda_score}
NEEDS_CALIBRATION = {"magnitude": False, "wanda": True}


def validate_method(name: str) -> None:
    if name not in METHODS:
        raise SpruceError(f"unknown prune method '{name}'; use one of {', '.join(METHODS)}")
