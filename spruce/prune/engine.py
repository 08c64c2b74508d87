"""Layer-by-layer pruning: calibrate one decoder layer at a time, score, mask, move on.

The inputs of the first decoder layer are captured once; then each layer in turn is moved to
the work device, run over the calibration set in batches while hooks gather per-Linear input
statistics, pruned, and run again so that the next layer sees the outputs of the pruned layer.
Only the current layer needs to be on the work device.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import SpruceError
from ..masks import overall_sparsity, weight_sparsity
from ..models import decoder_layers, prunable_linears
from .methods import METHODS, NEEDS_CALIBRATION, validate_method
from .patterns import check_divides, mask_for, validate_pattern


class _Captured(Exception):
    """Raised by the hook on the first decoder layer to stop the forward pass early."""


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model, samples: torch.Tensor, device: torch.device, batch_size: int):
    """Run the model up to its first decoder layer; return [(hidden_states, layer_kwargs)] per batch."""
    layers = decoder_layers(model)
    batches = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        batches.append((hidden.to(device), _to(kwargs, device)))
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
def prune_model(model, method: str, pattern: str, sparsity: float,
                samples: torch.Tensor | None = None, device: str | torch.device | None = None,
                batch_size: int = 8, progress: bool = True) -> dict:
    """Prune every decoder nn.Linear of `model` in place; return a report for sparsity.json."""
    validate_method(method)
    validate_pattern(pattern)
    if not 0 <= sparsity < 1:
        raise SpruceError(f"sparsity must be in [0, 1), got {sparsity}")
    linears = prunable_linears(model)
    check_divides(pattern, {n: tuple(m.weight.shape) for n, m in linears.items()})
    start = time.time()
    if sparsity > 0:
        if NEEDS_CALIBRATION[method]:
            if samples is None:
                raise SpruceError(f"method '{method}' needs calibration samples")
            _prune_calibrated(model, method, pattern, sparsity, samples,
                              torch.device(device) if device else next(model.parameters()).device,
                              batch_size, progress)
        else:
            for name, module in tqdm(linears.items(), desc="pruning", disable=not progress):
                score = METHODS[method](module.weight.data)
                module.weight.data[mask_for(pattern, score, sparsity).to(module.weight.device)] = 0
    return {
        "format": "spruce-sparsity/1",
        "method": method,
        "pattern": pattern,
        "selection": "global-mean" if "x" in pattern else "per-row" if pattern == "unstructured" else "per-layer",
        "target_sparsity": sparsity,
        "measured_sparsity": overall_sparsity(model),
        "layers": weight_sparsity(model),
        "calibration": None if samples is None or not NEEDS_CALIBRATION[method]
        else {"nsamples": int(samples.shape[0]), "seqlen": int(samples.shape[1])},
        "seconds": round(time.time() - start, 2),
    }


def _prune_calibrated(model, method, pattern, sparsity, samples, device, batch_size, progress):
    layers = decoder_layers(model)
    batches = capture_layer_inputs(model, samples, device, batch_size)
    bar = tqdm(layers, desc=f"{method} {pattern}", unit="layer", disable=not progress)
    for layer in bar:
        home = next(layer.parameters()).device
        layer.to(device)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sq_norms = {n: torch.zeros(m.in_features, dtype=torch.float32, device=device)
                    for n, m in linears.items()}

        def make_hook(name):
            def hook(_m, inputs, _out):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                sq_norms[name] += (x * x).sum(0)
            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
        try:
            for hidden, kwargs in batches:
                layer(hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, module in linears.items():
            score = METHODS[method](module.weight.data, sq_norms[name])
            module.weight.data[mask_for(pattern, score, sparsity)] = 0
        batches = [(_layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]
        layer.to(home)
    if device.type == "cuda":
        torch.cuda.empty_cache()
