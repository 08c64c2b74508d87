"""Sparsity patterns as seen from the weights: measure, check and describe zero sets.

Pruned models are ordinary dense checkpoints with zeros in place (the hand-off between
pruning, recovery and kernels); `sparsity.json` beside the weights says which pattern the
zeros follow. These helpers read zero sets back from weights, so every later stage can check
that the pattern still holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import SpruceError
from .models import prunable_linears

SPARSITY_FILE = "sparsity.json"
_BLOCK = re.compile(r"^(\d+)x(\d+)$")


def parse_block(pattern: str) -> tuple[int, int] | None:
    """`16x16` -> (16, 16); None for a pattern that is not a block pattern."""
    m = _BLOCK.match(pattern)
    return (int(m.group(1)), int(m.group(2))) if m else None


def tile_view(t: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """View an (R, C) matrix as (R/bh, C/bw, bh, bw) tiles."""
    rows, cols = t.shape
    return t.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2)


def tile_zero_fraction(weight: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Fraction of zeros in each tile, shape (R/bh, C/bw)."""
    return (tile_view(weight == 0, bh, bw)).float().mean(dim=(2, 3))


def block_pattern_holds(weight: torch.Tensor, bh: int, bw: int) -> bool:
    """True when every tile is either all zero or has no zero at all."""
    frac = tile_zero_fraction(weight, bh, bw)
    return bool(((frac == 0) | (frac == 1)).all())


def weight_sparsity(model) -> dict[str, float]:
    """Zero fraction of each prunable linear weight."""
    return {name: (m.weight == 0).float().mean().item() for name, m in prunable_linears(model).items()}


def overall_sparsity(model) -> float:
    """Zero fraction over all prunable linear weights together (weighted by size)."""
    zeros = total = 0
    for m in prunable_linears(model).values():
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(total, 1)


def zero_masks(model) -> dict[str, torch.Tensor]:
    """The zero set of every prunable linear weight, as bool tensors on the CPU."""
    return {name: (m.weight.detach() == 0).cpu() for name, m in prunable_linears(model).items()}


def write_sparsity_json(folder: str | Path, info: dict) -> None:
    """Write sparsity.json (with the spruce command that made it) and the folder's model card."""
    from .card import current_command, write_model_card

    if "command" not in info and current_command():
        info = {**info, "command": current_command()}
    Path(folder, SPARSITY_FILE).write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(folder)


def read_sparsity_json(folder: str | Path) -> dict | None:
    path = Path(folder, SPARSITY_FILE)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SpruceError(f"{path} is not valid JSON; re-run spruce prune or delete the file") from None


def copy_sparsity_json(source: str | Path, folder: str | Path) -> None:
    """Carry the pruned model's sparsity.json into a folder derived from it (merged, fine-tuned,
    compressed), and write that folder's model card."""
    from .card import write_model_card

    src = Path(source, SPARSITY_FILE)
    if src.is_file():
        Path(folder, SPARSITY_FILE).write_text(src.read_text())
    write_model_card(folder)
