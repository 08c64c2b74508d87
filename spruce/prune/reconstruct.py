"""Layer reconstruction after pruning: train the kept weights of a pruned decoder layer toward
the dense layer's outputs with Adam, pruned weights held at exactly zero."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SpruceError

RECONSTRUCT_LR = 1e-4   # learning rate of the layer reconstruction unless a recipe or flag sets one
RECONSTRUCT_TARGETS = ("dense", "local")


def layer_output(out):
    """The hidden states of a decoder layer's output (a tensor or a tuple led by it)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class Reconstruct:
    """Layer reconstruction after pruning: `epochs` passes of Adam over the calibration batches on
    the kept weights of the layer's linears (pruned weights held at zero), minimising the squared
    error to the dense layer's outputs, relative to their energy. target "dense": the dense
    model's outputs on its own inputs (also undoes the drift of earlier pruned layers); "local":
    the dense layer's outputs on the pruned model's inputs. norms: also train the layer's norm
    weights (they hold no zeros to keep)."""
    epochs: int = 4
    lr: float = RECONSTRUCT_LR
    target: str = "dense"
    norms: bool = False

    def __post_init__(self):
        if self.epochs < 0 or self.lr <= 0:
            raise SpruceError(f"reconstruction needs epochs >= 0 and lr > 0, got {self.epochs} and {self.lr}")
        if self.target not in RECONSTRUCT_TARGETS:
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
                    out = layer_output(layer(hidden.float(), **_float_kwargs(kwargs)))
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
                    out = layer_output(layer(hidden.float(), **_float_kwargs(kwargs))).float()
                    last = ((out - target.float()).square().mean() / target.float().square().mean()).item()
    finally:
        for w in weights + extra:
            w.grad = None
        layer.to(dtype)
        for p, flag in zip(layer.parameters(), grad_flags):
            p.requires_grad_(flag)
    return first, last
