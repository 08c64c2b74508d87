"""How much to prune each layer so that the whole model averages to the target sparsity.

  - `uniform`: every decoder linear at the target.
  - `owl` (outlier-weighted layerwise, Yin et al., 2023): a decoder block whose Wanda scores hold
    more outliers (scores above M times the block's mean score) is pruned less. The outlier
    ratios are mapped linearly onto [target - lambda, target + lambda] (the most outliers get the
    lowest sparsity), then shifted so the parameter-weighted mean is the target.
  - module overrides (`self_attn=0.35`, `down_proj=0.4`): linears whose name contains the key
    get that sparsity; every other linear is shifted by one constant so the total stays at the
    target.

The result is a sparsity per linear; parameter-weighted, it averages to the target exactly
(before the rounding of masks to whole tiles or groups).
"""

from __future__ import annotations

import torch

from ..errors import SpruceError

ALLOCATIONS = ("uniform", "owl")
OWL_M = 5.0          # an outlier is a score above M times the mean score of its decoder block
OWL_LAMBDA = 0.08    # layer sparsities span target +- lambda


def outlier_ratio(scores: list[torch.Tensor], m: float = OWL_M) -> float:
    """Share of all scores of one decoder block that exceed m times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def owl_sparsities(ratios: list[float], target: float, lam: float = OWL_LAMBDA,
                   weights: list[float] | None = None) -> list[float]:
    """One sparsity per decoder block from its outlier ratio; weighted mean = target."""
    weights = weights or [1.0] * len(ratios)
    lo, hi = min(ratios), max(ratios)
    spread = [(r - lo) / (hi - lo) if hi > lo else 0.5 for r in ratios]
    raw = [target + lam - 2 * lam * s for s in spread]          # most outliers -> target - lambda
    shift = target - weighted_mean(raw, weights)
    return _check_range([r + shift for r in raw], "owl")


def parse_overrides(text: str | None) -> dict[str, float]:
    """`self_attn=0.35,down_proj=0.4` -> {'self_attn': 0.35, 'down_proj': 0.4}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise SpruceError(f"bad module sparsity '{item}'; write NAME=RATIO pairs such as "
                              "self_attn=0.35,mlp=0.55")
        if not 0 <= out[key.strip()] < 1:
            raise SpruceError(f"module sparsity {item} must be in [0, 1)")
    return out


def allocate(sizes: dict[str, int], block_of: dict[str, int], target: float,
             block_sparsity: list[float] | None = None,
             overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Sparsity per linear. sizes: parameters per linear; block_of: its decoder block index;
    block_sparsity: per-block sparsities (OWL) or None for uniform; overrides: see module doc."""
    base = {n: block_sparsity[block_of[n]] if block_sparsity else target for n in sizes}
    overrides = overrides or {}
    for key in overrides:
        if not any(key in n for n in sizes):
            raise SpruceError(f"module sparsity key '{key}' matches no decoder linear "
                              f"(names look like {next(iter(sizes))})")
    fixed = {n: next(v for k, v in overrides.items() if k in n) for n in sizes if any(k in n for k in overrides)}
    free = [n for n in sizes if n not in fixed]
    if fixed and not free:
        raise SpruceError("module sparsity overrides cover every linear, so the target cannot be kept; "
                          "leave some modules to balance the total")
    total = sum(sizes.values())
    need = target * total - sum(fixed[n] * sizes[n] for n in fixed)
    shift = (need - sum(base[n] * sizes[n] for n in free)) / sum(sizes[n] for n in free) if free else 0.0
    result = {n: fixed.get(n, base[n] + shift) for n in sizes}
    _check_range(list(result.values()), "module overrides" if fixed else "allocation")
    return result


def _check_range(values: list[float], what: str) -> list[float]:
    if min(values) < 0 or max(values) >= 1:
        raise SpruceError(f"{what} would need layer sparsities outside [0, 1) "
                          f"({min(values):.3f} to {max(values):.3f}); use milder settings")
    return values


def block_index(model, linears: dict) -> dict[str, int]:
    """Decoder block index of each linear, from its position among the decoder layers."""
    from ..models import decoder_layers

    index = {}
    for i, layer in enumerate(decoder_layers(model)):
        ids = {id(m) for m in layer.modules()}
        for n, m in linears.items():
            if id(m) in ids:
                index[n] = i
    return index


def plan(linears: dict, block_of: dict[str, int], target: float, allocation: str = "uniform",
         ratios: list[float] | None = None, lam: float = OWL_LAMBDA,
         overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Sparsity per linear for a model: `uniform`, or `owl` from each decoder block's outlier
    ratio (`ratios`, one per block), then the module overrides; the total stays at `target`."""
    sizes = {n: m.weight.numel() for n, m in linears.items()}
    block_sparsity = None
    if allocation == "owl":
        per_block = [0.0] * len(ratios)
        for n, size in sizes.items():
            per_block[block_of[n]] += size
        block_sparsity = owl_sparsities(ratios, target, lam, per_block)
    return allocate(sizes, block_of, target, block_sparsity, overrides)
