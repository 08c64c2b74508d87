"""Channel permutation: reorder a layer's MLP intermediate features so that rows which value the
same input block-columns sit together, before block pruning (patterns/grouped.py, patterns/block.py).

In an MLP  down(act(gate(x)) * up(x))  (or  fc2(act(fc1(x))))  the intermediate features can be put
in any order: row i of gate and of up (and their biases) and column i of down move together, and the
function is unchanged exactly (the sum over intermediate features in down is only reordered). The
permutation is folded into the weights, so the saved model stays an ordinary Hugging Face model.

Why: grouped blocks make G*R consecutive rows of gate/up share their kept block-columns. Rows are
grouped by position; if rows with similar importance over the block-columns are made neighbours,
the shared column set costs less. The order is chosen in two levels:
  1. `similar_rows_order` groups the rows of gate/up greedily by the cosine similarity of their
     block-column importance (the summed Wanda score |W| * ||x|| of gate and up per C-wide
     block-column) into runs of the pattern's tile height (G*R: 64 for 16x16g4);
  2. inside each run (whose order gate/up do not see: the run is one tile row for them), the
     features are ordered again into runs of C (16) by the similarity of their importance to down,
     whose C-wide block-columns are runs of C intermediate features.

Attention is left in its order. Its rows cannot be regrouped where it matters: q/k rows carry RoPE
pairs (dimension i rotates with i + head_dim/2 at its own frequency), so only whole heads may move,
and a 64-row group of 16x16g4 is one head of a 64-wide head (SmolLM2, Llama); the residual stream
(q/k/v/gate/up columns, o/down rows) could only be reordered once for the whole model.

`permute_layer(layer, pattern, sq_norms)` is what the pruning engine calls on each decoder layer when
PruneSpec.permute is set, before the layer's statistics are gathered.
"""

from __future__ import annotations

from typing import Callable

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
    group_rows - 1 unplaced rows most similar (cosine) to it. Deterministic; O(rows^2 / group_rows)
    time, O(rows) memory beyond the input."""
    rows = importance.shape[0]
    if rows % group_rows:
        raise SpruceError(f"{rows} rows do not split into groups of {group_rows}")
    unit = torch.nn.functional.normalize(importance.double(), dim=1)
    weight = importance.double().sum(1)
    free = torch.ones(rows, dtype=torch.bool, device=importance.device)
    ninf = torch.tensor(-float("inf"), dtype=torch.float64, device=importance.device)
    order = []
    for _ in range(rows // group_rows):
        seed = int(torch.where(free, weight, ninf).argmax())
        cand = torch.where(free, unit @ unit[seed], ninf)
        cand[seed] = float("inf")
        members = torch.sort(cand, descending=True, stable=True).indices[:group_rows]
        free[members] = False
        order.append(members)
    return torch.cat(order)


def mlp_parts(layer: nn.Module) -> tuple[list[tuple[nn.Linear, int]], nn.Linear] | None:
    """([(linear writing the intermediate features, how many stacked copies of them its rows hold)],
    the linear reading them) for the MLP of a decoder layer: gate_proj/up_proj/down_proj (Llama,
    Qwen2, Mistral, Gemma), gate_up_proj/down_proj (Phi-3: gate and up stacked), fc1/fc2 (OPT);
    None for a layer with none of them."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return [(mlp.gate_proj, 1), (mlp.up_proj, 1)], mlp.down_proj
    if mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_up_proj", "down_proj")):
        return [(mlp.gate_up_proj, 2)], mlp.down_proj
    if all(isinstance(getattr(layer, n, None), nn.Linear) for n in ("fc1", "fc2")):
        return [(layer.fc1, 1)], layer.fc2
    return None


@torch.no_grad()
def permute_features(writers: list[tuple[nn.Linear, int]], reader: nn.Linear, perm: torch.Tensor) -> None:
    """Reorder the intermediate features in place: the rows (and bias) of each writer, every stacked
    copy alike, and the columns of the reader."""
    for lin, copies in writers:
        rows = lin.weight.shape[0] // copies
        index = (perm.to(lin.weight.device).unsqueeze(0) + rows * torch.arange(copies, device=lin.weight.device)
                 .unsqueeze(1)).flatten()
        lin.weight.copy_(lin.weight[index])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[index])
    reader.weight.copy_(reader.weight[:, perm.to(reader.weight.device)])


def feature_order(writer_score: torch.Tensor, reader_score: torch.Tensor | None, group_rows: int,
                  block_cols: int, reader_group_rows: int | None = None) -> torch.Tensor:
    """The order of the intermediate features (see the module docstring) from their scores:
    writer_score (features, in): the writers' summed score of each feature's row; reader_score
    (out, features): the reader's score of each feature's column, None to skip the second level;
    group_rows: the writers' tile height; block_cols: the block width; reader_group_rows: the reader's
    tile height (default group_rows)."""
    order = similar_rows_order(block_column_importance(writer_score, block_cols), group_rows)
    if reader_score is None or group_rows <= block_cols or group_rows % block_cols:
        return order
    tile = reader_group_rows or group_rows
    out = reader_score.shape[0]
    if out % tile:
        return order
    # each feature's importance to every tile row of the reader: (features, out / tile)
    to_reader = reader_score.float().reshape(out // tile, tile, -1).sum(1).T
    runs = order.view(-1, group_rows)
    return torch.cat([run[similar_rows_order(to_reader[run], block_cols)] for run in runs])


def _rows(writers: list[tuple[nn.Linear, int]]) -> torch.Tensor:
    """(features, in): |W| summed over the writers and their stacked copies."""
    total = 0
    for lin, copies in writers:
        w = lin.weight.detach().abs().float()
        total = total + w.reshape(copies, w.shape[0] // copies, w.shape[1]).sum(0)
    return total


@torch.no_grad()
def permute_layer(layer: nn.Module, group_rows: int, block_cols: int,
                  sq_norms: Callable[[set[str]], dict[str, torch.Tensor]] | None = None) -> bool:
    """Reorder the MLP intermediate features of one decoder layer for tiles of group_rows x block_cols
    (function unchanged); False when the layer has no MLP it knows. sq_norms(names) gives the
    squared input norms of the named linears of `layer` on the calibration data (None: |W| alone)."""
    parts = mlp_parts(layer)
    if parts is None:
        return False
    writers, reader = parts
    features = writers[0][0].weight.shape[0] // writers[0][1]
    if features % group_rows:
        raise SpruceError(f"permute: {features} MLP features do not split into groups of {group_rows}")
    writer_score, reader_score = _rows(writers), reader.weight.detach().abs().float()
    if sq_norms is not None:
        names = {id(m): n for n, m in layer.named_modules()}
        first, last = names[id(writers[0][0])], names[id(reader)]
        norms = sq_norms({first, last})
        writer_score = writer_score * norms[first].float().sqrt().to(writer_score.device).unsqueeze(0)
        reader_score = reader_score * norms[last].float().sqrt().to(reader_score.device).unsqueeze(0)
    permute_features(writers, reader, feature_order(writer_score, reader_score, group_rows, block_cols))
    return True


@torch.no_grad()
def permute_mlp(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the intermediate features of a gated MLP (gate_proj, up_proj, down_proj) in place."""
    permute_features([(mlp.gate_proj, 1), (mlp.up_proj, 1)], mlp.down_proj, perm)


def mlp_order(mlp: nn.Module, group_rows: int, block_cols: int = 16,
              input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The first-level permutation for one gated MLP from |W| (times the input norms when given, as
    Wanda scores)."""
    scale = 1.0 if input_sq_norm is None else input_sq_norm.float().sqrt().unsqueeze(0)
    score = (mlp.gate_proj.weight.abs().float() + mlp.up_proj.weight.abs().float()) * scale
    return similar_rows_order(block_column_importance(score, block_cols), group_rows)


def permute_model_mlps(model, group_rows: int, block_cols: int = 16) -> int:
    """Permute every decoder layer's MLP intermediate features by magnitude (see `permute_layer`);
    returns how many MLPs were permuted."""
    from ..models import decoder_layers

    return sum(permute_layer(layer, group_rows, block_cols) for layer in decoder_layers(model))
