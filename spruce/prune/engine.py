"""Layer-by-layer pruning: calibrate one decoder layer at a time, prune it, move on.

The inputs of the first decoder layer are captured once; then each layer in turn is moved to
the work device, run over the calibration set in batches while hooks gather the per-Linear
input statistics the method reads (squared input norms for Wanda, X^T X for SparseGPT and OBS;
linears that read the same input, such as q/k/v, share one accumulator), pruned, and run again
so that the next layer sees the outputs of the pruned layer. Only the current layer needs to be
on the work device. OWL allocation first runs one dense pass over the layers to measure each
layer's outlier ratio.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
from ..progress import progress_bar

from ..errors import SpruceError
from ..masks import overall_sparsity, weight_sparsity
from ..models import decoder_layers, prunable_linears
from . import allocate as alloc
from .methods import METHODS, validate_method, wanda_score
from .patterns import Pattern, check_divides, parse_pattern
from .state import FORMAT as PRUNE_STATE_FORMAT
from .state import PruneState
from .state import fingerprint as state_fingerprint


class _Captured(Exception):
    """Raised by the hook on the first decoder layer to stop the forward pass early."""


def to_device(obj, device):
    """Tensors inside nested tuples, lists and dicts moved to `device`; anything else as is."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model, samples: torch.Tensor, device: torch.device, batch_size: int):
    """Run the model up to its first decoder layer; return [(hidden_states, layer_kwargs)] per batch."""
    layers = decoder_layers(model)
    batches = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        batches.append((hidden.to(device), to_device(kwargs, device)))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    model_device = next(model.parameters()).device
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(samples[start:start + batch_size].to(model_device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return batches


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def gather_statistics(layer, batches, needs: tuple[str, ...], dense=None, only=None):
    """Run `layer` over the batches; return ({linear name: {"sq_norm", "hessian", ...}}, groups).

    Linears fed the same tensor in a forward call (q/k/v, gate/up) share one set of statistics:
    the hooks keep a reference to each input seen in the call, so identity means the same data.
    `groups` lists those sets of linears in the order the forward pass reaches them. With
    `dense` = (dense copy of the layer, the same samples as they flow through the unpruned
    model) each linear also gets "cross" = X^T X_dense - X^T X, the term that lets the weight
    update aim at the dense model's outputs. `only`: gather for these linear names alone."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
               and (only is None or n in only)}
    stats: dict[str, dict[str, torch.Tensor]] = {}
    owner: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []
    dense_inputs: dict[str, torch.Tensor] = {}

    def record_dense(name):
        def hook(_m, inputs, _out):
            dense_inputs[name] = inputs[0]
        return hook

    def make_hook(name):
        def hook(_m, inputs, _out):
            x = inputs[0]
            if name not in owner:
                owner[name] = next((n for t, n in seen if t is x), name)
            seen.append((x, name))
            if owner[name] != name:
                return
            x = x.reshape(-1, x.shape[-1]).float()
            acc = stats.setdefault(name, {})
            if "sq_norm" in needs:
                acc["sq_norm"] = acc.get("sq_norm", 0) + (x * x).sum(0)
            if "hessian" in needs:
                xtx = x.T @ x
                acc["hessian"] = acc.get("hessian", 0) + xtx
                if dense is not None:
                    xd = dense_inputs.pop(name).reshape(-1, x.shape[-1]).float()
                    acc["cross"] = acc.get("cross", 0) + x.T @ xd - xtx
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    if dense is not None:
        handles += [m.register_forward_hook(record_dense(n)) for n, m in dense[0].named_modules()
                    if n in linears]
    try:
        for i, (hidden, kwargs) in enumerate(batches):
            if dense is not None:
                dense[0](dense[1][i][0], **kwargs)
            seen.clear()
            layer(hidden, **kwargs)
            dense_inputs.clear()
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    groups: dict[str, list[str]] = {}
    for n in owner:
        groups.setdefault(owner[n], []).append(n)
    return {n: stats[owner[n]] for n in linears if n in owner}, list(groups.values())


def _run_layer(layer, batches):
    return [(_layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]


@torch.no_grad()
def owl_outlier_ratios(model, batches, device, m: float, progress: bool) -> list[float]:
    """One dense pass over the decoder layers: each layer's share of Wanda-score outliers."""
    ratios = []
    for layer in progress_bar(decoder_layers(model), show=progress, desc="owl outlier ratios", unit="layer"):
        home = next(layer.parameters()).device
        layer.to(device)
        stats, _ = gather_statistics(layer, batches, ("sq_norm",))
        linears = {n: mod for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
        ratios.append(alloc.outlier_ratio([wanda_score(mod.weight.data, stats[n]["sq_norm"])
                                           for n, mod in linears.items()], m))
        batches = _run_layer(layer, batches)
        layer.to(home)
    return ratios


def _resolve_sparsity(pattern: Pattern, sparsity: float) -> float:
    fixed = pattern.fixed_sparsity
    if fixed is None or sparsity == 0 or abs(sparsity - fixed) < 1e-9:
        return sparsity
    warnings.warn(f"{pattern.name} fixes the sparsity at {fixed:g}; the requested {sparsity:g} is not used")
    return fixed


@torch.no_grad()
def prune_model(model, method: str, pattern: str, sparsity: float,
                samples: torch.Tensor | None = None, device: str | torch.device | None = None,
                batch_size: int = 8, progress: bool = True, selection: str = "global",
                tile_score: str = "mean", tiers: tuple[float, float] | None = None,
                allocation: str = "uniform", owl_m: float = alloc.OWL_M, owl_lambda: float = alloc.OWL_LAMBDA,
                module_sparsity: dict[str, float] | None = None, dense_target: bool = False,
                sequential: bool = False, reconstruct: Reconstruct | None = None,
                state_dir: str | os.PathLike | None = None, state_every: float = 60.0) -> dict:
    """Prune every decoder nn.Linear of `model` in place; return a report for sparsity.json.

    method: a name of METHODS; pattern: a pattern name (see patterns.py) with its `selection`,
    `tile_score` and hybrid `tiers`; allocation: uniform or owl (with owl_m, owl_lambda);
    module_sparsity: per-module overrides such as {"self_attn": 0.35}; dense_target: Hessian
    methods refit each layer toward the dense model's outputs on the same samples (the error of
    earlier pruned layers is compensated too), at the cost of a second pass per layer;
    sequential: within a layer, prune the linears in forward order, each group calibrated on the
    outputs of those already pruned; reconstruct: train each pruned layer's kept weights toward
    the dense outputs (see Reconstruct); state_dir: keep the finished layers and the next layer's
    inputs there (at most every `state_every` seconds), so that the same call after a kill
    continues from the last saved layer (see state.py); the caller removes it once the result is
    saved."""
    validate_method(method)
    if not 0 <= sparsity < 1:
        raise SpruceError(f"sparsity must be in [0, 1), got {sparsity}")
    spec = parse_pattern(pattern, selection, tile_score, tiers)
    sparsity = _resolve_sparsity(spec, sparsity)
    if allocation not in alloc.ALLOCATIONS:
        raise SpruceError(f"unknown allocation '{allocation}'; use {' or '.join(alloc.ALLOCATIONS)}")
    if spec.fixed_sparsity is not None and (allocation != "uniform" or module_sparsity):
        raise SpruceError(f"{spec.name} fixes every layer's sparsity; use uniform allocation without overrides")
    linears = prunable_linears(model)
    check_divides(spec, {n: tuple(m.weight.shape) for n, m in linears.items()})
    needs = METHODS[method].needs
    reconstruct = reconstruct if reconstruct and reconstruct.epochs else None
    data_needed = bool(needs) or allocation == "owl" or reconstruct is not None
    if sparsity > 0 and data_needed and samples is None:
        what = "layer reconstruction" if reconstruct else f"method '{method}' with {allocation} allocation"
        raise SpruceError(f"{what} needs calibration samples")
    start = time.time()
    work = torch.device(device) if device else next(model.parameters()).device
    per_linear, ratios = {n: 0.0 for n in linears}, None
    if sparsity > 0:
        batches = capture_layer_inputs(model, samples, work, batch_size) if samples is not None \
            and data_needed else None
        block_of = _block_index(model, linears)
        block_sparsity = None
        if allocation == "owl":
            ratios = owl_outlier_ratios(model, batches, work, owl_m, progress)
            sizes_per_block = [0.0] * len(ratios)
            for n, m in linears.items():
                sizes_per_block[block_of[n]] += m.weight.numel()
            block_sparsity = alloc.owl_sparsities(ratios, sparsity, owl_lambda, sizes_per_block)
        per_linear = alloc.allocate({n: m.weight.numel() for n, m in linears.items()}, block_of, sparsity,
                                    block_sparsity, module_sparsity)
        state = None
        if state_dir is not None:
            settings = {"method": method, "pattern": pattern, "sparsity": sparsity, "selection": selection,
                        "tile_score": tile_score, "tiers": tiers, "allocation": allocation, "owl": (owl_m, owl_lambda),
                        "per_linear": per_linear, "dense_target": dense_target, "sequential": sequential,
                        "reconstruct": None if reconstruct is None else vars(reconstruct),
                        "batch_size": batch_size, "format": PRUNE_STATE_FORMAT}
            state = PruneState(state_dir, state_fingerprint(model, settings, samples if data_needed else None),
                               state_every)
        _prune_layers(model, method, spec, per_linear, batches, work, progress, dense_target, sequential,
                      reconstruct, state)
    return {
        "format": "spruce-sparsity/1",
        "method": method,
        "pattern": spec.name,
        "selection": spec.selection_name,
        **spec.report(),
        "allocation": allocation,
        "owl": {"m": owl_m, "lambda": owl_lambda, "outlier_ratios": ratios} if allocation == "owl" else None,
        "module_sparsity": module_sparsity or None,
        "dense_target": dense_target,
        "sequential": sequential,
        "reconstruct": None if reconstruct is None else
        {"epochs": reconstruct.epochs, "lr": reconstruct.lr, "target": reconstruct.target,
         "norms": reconstruct.norms},
        "target_sparsity": sparsity,
        "measured_sparsity": overall_sparsity(model),
        "target_layers": per_linear,
        "layers": weight_sparsity(model),
        "calibration": None if samples is None or not data_needed or sparsity == 0
        else {"nsamples": int(samples.shape[0]), "seqlen": int(samples.shape[1])},
        "seconds": round(time.time() - start, 2),
    }


def _block_index(model, linears) -> dict[str, int]:
    """Decoder block index of each linear, from its position among the decoder layers."""
    index = {}
    for i, layer in enumerate(decoder_layers(model)):
        ids = {id(m) for m in layer.modules()}
        for n, m in linears.items():
            if id(m) in ids:
                index[n] = i
    return index


def _prune_weight(module, method: str, spec: Pattern, stats: dict, sparsity: float) -> None:
    w = module.weight.data
    new = METHODS[method].prune(w, stats, spec, sparsity)
    w.copy_(new)


@dataclass(frozen=True)
class Reconstruct:
    """Layer reconstruction after pruning: `epochs` passes of Adam over the calibration batches on
    the kept weights of the layer's linears (pruned weights held at zero), minimising the squared
    error to the dense layer's outputs, relative to their energy. target "dense": the dense
    model's outputs on its own inputs (also undoes the drift of earlier pruned layers); "local":
    the dense layer's outputs on the pruned model's inputs. norms: also train the layer's norm
    weights (they hold no zeros to keep)."""
    epochs: int = 4
    lr: float = 1e-4
    target: str = "dense"
    norms: bool = False

    def __post_init__(self):
        if self.epochs < 0 or self.lr <= 0:
            raise SpruceError(f"reconstruction needs epochs >= 0 and lr > 0, got {self.epochs} and {self.lr}")
        if self.target not in ("dense", "local"):
            raise SpruceError(f"reconstruction target must be 'dense' or 'local', not '{self.target}'")


def _float_kwargs(obj):
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float_kwargs(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _float_kwargs(v) for k, v in obj.items()}
    return obj


def reconstruct_layer(layer, batches, targets, epochs: int, lr: float, norms: bool = False) -> tuple[float, float]:
    """Train the kept weights of `layer`'s linears (and with `norms` its norm weights) so that
    layer(batches) approaches `targets` (see Reconstruct); return the relative error (first step,
    after the last). The layer trains in float32 (bf16 autocast on CUDA) and returns to its dtype;
    pruned weights stay exactly zero."""
    dtype = next(layer.parameters()).dtype
    weights = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    masks = [w != 0 for w in weights]
    extra = [p for n, p in layer.named_parameters() if "norm" in n.rsplit(".", 1)[0].lower()] if norms else []
    grad_flags = [p.requires_grad for p in layer.parameters()]
    layer.float()
    for p in layer.parameters():
        p.requires_grad_(False)
    for w in weights + extra:
        w.requires_grad_(True)
    steps = epochs * len(batches)
    opt = torch.optim.Adam(weights + extra, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    device = weights[0].device
    first = last = float("nan")
    try:
        with torch.enable_grad():
            for step in range(steps):
                (hidden, kwargs), target = batches[step % len(batches)], targets[step % len(batches)]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = _layer_output(layer(hidden.float(), **_float_kwargs(kwargs)))
                target = target.float()
                loss = (out.float() - target).square().mean() / target.square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for w, m in zip(weights, masks):
                    w.grad.mul_(m)
                opt.step()
                sched.step()
                with torch.no_grad():
                    for w, m in zip(weights, masks):
                        w.mul_(m)
                first = loss.item() if step == 0 else first
            if steps:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    (hidden, kwargs), target = batches[0], targets[0]
                    out = _layer_output(layer(hidden.float(), **_float_kwargs(kwargs))).float()
                    last = ((out - target.float()).square().mean() / target.float().square().mean()).item()
    finally:
        for w in weights + extra:
            w.grad = None
        layer.to(dtype)
        for p, flag in zip(layer.parameters(), grad_flags):
            p.requires_grad_(flag)
    return first, last


def _prune_layers(model, method, spec, per_linear, batches, device, progress, dense_target=False,
                  sequential=False, reconstruct: Reconstruct | None = None, state: PruneState | None = None):
    """Prune layer by layer. sequential: within a layer, the linears that share an input (q/k/v,
    then o, then gate/up, then down) are pruned in forward order, each group calibrated on the
    outputs of the groups already pruned. reconstruct: see Reconstruct."""
    layers = decoder_layers(model)
    full_names = {id(m): n for n, m in prunable_linears(model).items()}
    needs = METHODS[method].needs
    reconstruct = reconstruct if reconstruct and reconstruct.epochs and batches is not None else None
    aim = dense_target and "hessian" in needs and batches is not None
    dense = list(batches) if aim or (reconstruct and reconstruct.target == "dense") else None
    start = 0
    resumed = state.resume(layers, device) if state is not None else None
    if resumed is not None:
        start, batches, dense = resumed
    bar = progress_bar(range(start, len(layers)), show=progress, desc=f"{method} {spec.name}", unit="layer",
                       initial=start, total=len(layers))
    for index in bar:
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        ref = copy.deepcopy(layer) if dense is not None or reconstruct else None
        dense_next = _run_layer(ref, dense) if dense is not None and (reconstruct or layer is not layers[-1]) \
            else None
        targets = None
        if reconstruct:
            targets = [o for o, _ in (dense_next if reconstruct.target == "dense" else _run_layer(ref, batches))]
        todo = {name for name, module in layer.named_modules()
                if id(module) in full_names and per_linear[full_names[id(module)]] > 0}
        pair = (ref, dense) if aim else None
        stats, groups = gather_statistics(layer, batches, needs, pair) if needs else ({}, [sorted(todo)])
        for i, group in enumerate(groups):
            if sequential and needs and i:
                stats, _ = gather_statistics(layer, batches, needs, pair, only=set(group))
            for name in group:
                if name in todo:
                    module = layer.get_submodule(name)
                    _prune_weight(module, method, spec, stats.get(name, {}), per_linear[full_names[id(module)]])
        if reconstruct:
            first, last = reconstruct_layer(layer, batches, targets, reconstruct.epochs, reconstruct.lr,
                                            reconstruct.norms)
            bar.set_postfix(rel_err=f"{first:.3g}->{last:.3g}")
        if batches is not None and layer is not layers[-1]:
            batches = _run_layer(layer, batches)
        dense = dense_next
        layer.to(home)
        del ref, targets
        if state is not None:
            state.after_layer(index, layers, batches, dense)
    if device.type == "cuda":
        torch.cuda.empty_cache()
