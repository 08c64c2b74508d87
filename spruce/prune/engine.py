"""Layer-by-layer pruning: calibrate one decoder layer at a time, prune it, move on.

The inputs of the first decoder layer are captured once; then each layer in turn is moved to
the work device, run over the calibration set in batches while hooks gather the per-Linear
input statistics the method reads (squared input norms for Wanda, X^T X for SparseGPT and OBS;
linears that read the same input, such as q/k/v, share one accumulator), pruned, and run again
so that the next layer sees the outputs of the pruned layer. Only the current layer needs to be
on the work device. OWL allocation first runs one dense pass over the layers to measure each
layer's outlier ratio. What to prune is a PruneSpec (spec.py); how much per linear is planned in
allocate.py and the optional layer reconstruction is reconstruct.py.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict

import torch
from ..progress import progress_bar

from ..errors import SpruceError
from ..masks import overall_sparsity, weight_sparsity
from ..models import decoder_layers, prunable_linears
from . import allocate as alloc
from .methods import linear_pruner, wanda_score
from .permute import mlp_parts, permute_layer
from .patterns import Pattern
from .reconstruct import Reconstruct, layer_output, reconstruct_layer  # noqa: F401  (Reconstruct: re-exported)
from .spec import PruneSpec, report_fields, spec_from_options
from .state import FORMAT as PRUNE_STATE_FORMAT
from .state import STATE_EVERY, PruneState
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
    return [(layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]


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


@torch.no_grad()
def prune_model(model, spec: PruneSpec | str, *args, samples: torch.Tensor | None = None,
                device: str | torch.device | None = None, progress: bool = True,
                state_dir: str | os.PathLike | None = None, state_every: float = STATE_EVERY, **options) -> dict:
    """Prune every decoder nn.Linear of `model` in place as `spec` says; return the sparsity report.

    Called as prune_model(model, spec, samples) with a PruneSpec (see spec.py for every option),
    or in the keyword form prune_model(model, method, pattern, sparsity, samples=..., **options)
    whose options are PruneSpec fields (and `reconstruct=Reconstruct(...)`). samples: calibration
    token ids (nsamples, seqlen), needed when spec.needs_calibration; state_dir: keep the finished
    layers and the next layer's inputs there (at most every `state_every` seconds), so that the
    same call after a kill continues from the last saved layer (see state.py); the caller removes
    it once the result is saved."""
    if isinstance(spec, str):
        spec = spec_from_options(spec, *args, **options)
    elif options or len(args) > 1:
        raise TypeError("prune_model(model, spec, samples): set the options in the PruneSpec")
    elif args:
        samples = args[0]
    linears = prunable_linears(model)
    spec.check_divides({n: tuple(m.weight.shape) for n, m in linears.items()})
    if spec.needs_calibration and samples is None:
        what = "layer reconstruction" if spec.reconstruct else \
            f"method '{spec.method}' with {spec.allocation} allocation"
        raise SpruceError(f"{what} needs calibration samples")
    start = time.time()
    work = torch.device(device) if device else next(model.parameters()).device
    per_linear, ratios = {n: 0.0 for n in linears}, None
    if spec.sparsity > 0:
        batches = capture_layer_inputs(model, samples, work, spec.batch_size) if spec.needs_calibration else None
        if spec.allocation == "owl":
            ratios = owl_outlier_ratios(model, batches, work, spec.owl_m, progress)
        per_linear = alloc.plan(linears, alloc.block_index(model, linears), spec.sparsity, spec.allocation, ratios,
                                spec.owl_lambda, spec.module_sparsity)
        state = None
        if state_dir is not None:
            settings = {"spec": asdict(spec), "per_linear": per_linear, "format": PRUNE_STATE_FORMAT,
                        "linear_methods": linear_methods(spec, linears)}
            used = samples if spec.needs_calibration else None
            state = PruneState(state_dir, state_fingerprint(model, settings, used), state_every)
        _prune_layers(model, spec, per_linear, batches, work, progress, state)
    return prune_report(spec, model, per_linear, ratios, samples, time.time() - start)


def linear_methods(spec: PruneSpec, linears: dict) -> dict[str, str]:
    """{linear name: what prunes it} (PruneSpec.linear_method: the method, or for obs the refit
    each linear gets and the sparsegpt fallback past obs_max_inputs)."""
    return {n: spec.linear_method(tuple(m.weight.shape), n) for n, m in linears.items()}


def prune_report(spec: PruneSpec, model, per_linear: dict[str, float], ratios: list[float] | None,
                 samples: torch.Tensor | None, seconds: float) -> dict:
    """sparsity.json: the spec (see spec.report_fields) and what the pruning measured."""
    return {
        "format": "spruce-sparsity/1",
        **report_fields(spec),
        "owl": {"m": spec.owl_m, "lambda": spec.owl_lambda, "outlier_ratios": ratios}
        if spec.allocation == "owl" else None,
        "target_sparsity": spec.sparsity,
        "measured_sparsity": overall_sparsity(model),
        "target_layers": per_linear,
        "linear_methods": linear_methods(spec, prunable_linears(model)),
        "layers": weight_sparsity(model),
        "calibration": {"nsamples": int(samples.shape[0]), "seqlen": int(samples.shape[1])}
        if spec.needs_calibration and samples is not None else None,
        "seconds": round(seconds, 2),
    }


def _prune_weight(module, prune, pattern: Pattern, stats: dict, sparsity: float) -> None:
    w = module.weight.data
    w.copy_(prune(w, stats, pattern, sparsity))


def _sq_norms(layer, batches):
    """names -> {name: squared input norms of that linear of `layer` over the batches}."""
    return lambda only: {n: s["sq_norm"] for n, s in gather_statistics(layer, batches, ("sq_norm",), only=only)[0].items()}


def _mlp_tile(spec: PruneSpec, layer, full_names: dict) -> tuple[int, int]:
    """(rows, cols) of the tiles the MLP's features are reordered for: the widest row tile of the
    linears that write them (gate, up), the column block of the one that reads them (down)."""
    parts = mlp_parts(layer)
    if parts is None:
        return spec.parsed.rows, spec.parsed.cols
    writers, reader = parts
    rows = max(spec.pattern_for(full_names.get(id(m), "")).rows for m, _ in writers)
    return rows, spec.pattern_for(full_names.get(id(reader), "")).cols


def _prune_layers(model, spec: PruneSpec, per_linear, batches, device, progress, state: PruneState | None = None):
    """Prune layer by layer. spec.sequential: within a layer, the linears that share an input
    (q/k/v, then o, then gate/up, then down) are pruned in forward order, each group calibrated on
    the outputs of the groups already pruned. spec.reconstruct: see Reconstruct. spec.permute: each
    layer's MLP features are first reordered for the pattern's tiles (permute.py), scored on its inputs."""
    layers = decoder_layers(model)
    full_names = {id(m): n for n, m in prunable_linears(model).items()}
    methods = {n: linear_pruner(label) for n, label in linear_methods(spec, prunable_linears(model)).items()}
    needs = tuple(sorted({need for m in methods.values() for need in m.needs}))
    sequential = spec.sequential
    reconstruct = spec.reconstruct if batches is not None else None
    aim = spec.dense_target and "hessian" in needs and batches is not None
    dense = list(batches) if aim or (reconstruct and reconstruct.target == "dense") else None
    start = 0
    resumed = state.resume(layers, device) if state is not None else None
    if resumed is not None:
        start, batches, dense = resumed
    named = spec.pattern + "".join(f",{k}={v}" for k, v in (spec.module_patterns or {}).items())
    bar = progress_bar(range(start, len(layers)), show=progress, desc=f"{spec.method} {named}", unit="layer",
                       initial=start, total=len(layers))
    for index in bar:
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        if spec.permute:   # before anything reads the layer: the dense copy and every statistic see the new order
            rows, cols = _mlp_tile(spec, layer, full_names)
            permute_layer(layer, rows, cols, None if batches is None else _sq_norms(layer, batches))
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
                    full = full_names[id(module)]
                    _prune_weight(module, methods[full].prune, spec.pattern_for(full), stats.get(name, {}),
                                  per_linear[full])
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
