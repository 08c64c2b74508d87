"""Channel permutation of the MLP: reorder the intermediate features so that rows which value the
same input block-columns sit together, before grouped block pruning (patterns/grouped.py).

In a gated MLP  down(act(gate(x)) * up(x))  the intermediate features can be put in any order: row
i of gate and of up and column i of down move together, and the function is unchanged exactly (the
sum over intermediate features in down is only reordered). The permutation is folded into the
weights, so the saved model stays an ordinary Hugging Face model.

Why: grouped blocks make G*R consecutive rows of gate/up share their kept block-columns. Rows are
grouped by position; if rows with similar importance over the block-columns are made neighbours,
the shared column set costs less. `similar_rows_order` groups rows greedily by the cosine similarity
of their block-column importance (the summed score of gate and up per 16-wide block-column).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpruceError


def block_column_importance(score: torch.Tensor, block_cols: int) -> torch.Tensor:
    """(rows, in / block_cols): each row's summed score over every block-column."""
    rows, cols = score.shape
    return score.float().reshape(rows, cols // block_cols, block_cols).sum(-1)


def similar_rows_order(importance: torch.Tensor, group_rows: int) -> torch.Tensor:
    """A permutation of the rows (LongTensor) putting rows with similar importance vectors in the same
    run of `group_rows`: the most important unplaced row seeds each group, which takes the
    group_rows - 1 unplaced rows most similar (cosine) to it. Deterministic; O(rows^2)."""
    rows = importance.shape[0]
    if rows % group_rows:
        raise SpruceError(f"{rows} rows do not split into groups of {group_rows}")
    unit = torch.nn.functional.normalize(importance.double(), dim=1)
    sim = unit @ unit.T
    weight = importance.double().sum(1)
    free = torch.ones(rows, dtype=torch.bool)
    order = []
    for _ in range(rows // group_rows):
        seed = int(torch.where(free, weight, torch.tensor(-float("inf"), dtype=weight.dtype)).argmax())
        cand = torch.where(free, sim[seed], torch.tensor(-float("inf"), dtype=sim.dtype))
        cand[seed] = float("inf")
        members = torch.sort(cand, descending=True, stable=True).indices[:group_rows]
        free[members] = False
        order.append(members)
    return torch.cat(order)


@torch.no_grad()
def permute_mlp(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the intermediate features of a gated MLP (gate_proj, up_proj, down_proj) in place."""
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        lin.weight.copy_(lin.weight[perm])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[perm])
    mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])


def mlp_order(mlp: nn.Module, group_rows: int, block_cols: int = 16,
              input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The permutation for one MLP from |W| (times the input norms when given, as Wanda scores)."""
    scale = 1.0 if input_sq_norm is None else input_sq_norm.float().sqrt().unsqueeze(0)
    score = (mlp.gate_proj.weight.abs().float() + mlp.up_proj.weight.abs().float()) * scale
    return similar_rows_order(block_column_importance(score, block_cols), group_rows)


def permute_model_mlps(model, group_rows: int, block_cols: int = 16) -> int:
    """Permute every decoder MLP's intermediate features by magnitude (see `mlp_order`); returns how
    many MLPs were permuted. Call it before pruning with a grouped pattern."""
    from ..models import decoder_layers

    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            permute_mlp(mlp, mlp_order(mlp, group_rows, block_cols))
            count += 1
    return count
