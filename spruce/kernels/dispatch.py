"""Dense dispatch for a whole model: tune every block-sparse layer for the token counts it will
serve, keep dense only where dense won, and say which layers run sparse.

`prepare_dispatch(model, decode_tokens, prefill_tokens)` runs after `sparsify(model,
dense_fallback=True)`: it launches each distinct block-sparse weight (shape, block, group,
density) once per token count, so the tuner (bsr.py) times the kernel tiles against dense cuBLAS
on this device, then `release_dense` drops the dense copy of every layer that won everywhere (the
model's memory stays near its block-sparse size for those). Afterwards `dispatch_table` counts,
per launch shape and module kind (q_proj, down_proj, ...), the layers that run the kernel, and
`dispatch_text` writes that as one line. Without a dense copy every launch runs the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spruce.kernels import bsr
from spruce.kernels.linear import BlockSparseLinear, FusedBlockSparseLinear, _choices, release_dense


@dataclass
class DispatchReport:
    """What `prepare_dispatch` did: the launch shapes tuned and the dense bytes kept and freed."""

    launches: list[str] = field(default_factory=list)  # "decode 8", "prefill 16384", ...
    freed_bytes: int = 0
    kept_dense_bytes: int = 0


def _tune_launch(layer: BlockSparseLinear, tokens: int) -> None:
    """One launch of the layer's weight on `tokens` random inputs: tunes that launch shape."""
    w = layer.sparse_weight
    x = torch.randn(tokens, layer.in_features, device=w.values.device, dtype=w.values.dtype)
    y = torch.empty(tokens, layer.out_features, device=x.device, dtype=x.dtype)
    if tokens <= bsr.DECODE_MAX_TOKENS:
        bsr.launch_decode(x, w, layer.bias, y)
    else:
        bsr.launch_prefill(x, w, layer.bias, y)


def prepare_dispatch(model: nn.Module, decode_tokens=(1,), prefill_tokens=(), tune: bool | None = None,
                     progress: bool = True) -> DispatchReport:
    """Tune every distinct block-sparse weight of `model` for each token count (decode: tokens per
    step, i.e. the batch; prefill: batch x prompt length), then release the dense copies not needed.

    tune None: on CUDA only; elsewhere the layers run the torch reference, nothing is timed, and the
    dense copies are released (they would never run). True tunes anyway (Triton's interpreter).
    The first tuning of each case compiles and times every kernel tile (minutes for a whole model):
    `progress` shows a bar over the cases.
    """
    from ..progress import progress_bar

    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    counts = sorted(set(decode_tokens)) + sorted(set(prefill_tokens))
    report = DispatchReport()
    cuda = any(m.values.device.type == "cuda" for m in layers) if tune is None else tune
    if cuda:
        cases = {}  # one launch per distinct tuning key (shape, block, group, density bucket, tokens)
        for layer in layers:
            w = layer.sparse_weight
            for tokens in counts:
                kind = "decode" if tokens <= bsr.DECODE_MAX_TOKENS else "prefill"
                cases.setdefault(bsr.tuning_key(kind, w, tokens, w.values.dtype), (layer, tokens))
        with torch.no_grad():
            for layer, tokens in progress_bar(list(cases.values()), desc="tuning kernels", unit="case",
                                              show=progress):
                _tune_launch(layer, tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    for tokens in counts:
        kind = "decode" if tokens <= bsr.DECODE_MAX_TOKENS else "prefill"
        report.launches.append(f"{kind} {tokens if kind == 'decode' else 1 << (tokens - 1).bit_length()}")
    if cuda:
        tuned_with_copy = {id(m): _tuned_keys(m) for m in layers if m.dense_weight is not None}
        report.freed_bytes = release_dense(model)
        for layer in layers:  # released: the same kernel tiles serve the weight without its copy
            if layer.dense_weight is None and id(layer) in tuned_with_copy:
                for key in tuned_with_copy[id(layer)]:
                    bsr._tuned.setdefault(key[:-1], bsr._tuned[key])
                    if key in bsr._tune_ms:  # and its timings, for the reports
                        bsr._tune_ms.setdefault(key[:-1], bsr._tune_ms[key])
    else:
        for layer in layers:
            if layer.dense_weight is not None:
                report.freed_bytes += layer.dense_weight.numel() * layer.dense_weight.element_size()
                layer.dense_weight = None
    report.kept_dense_bytes = sum(m.dense_weight.numel() * m.dense_weight.element_size()
                                  for m in layers if m.dense_weight is not None)
    return report


def _tuned_keys(layer: BlockSparseLinear) -> list[tuple]:
    """The tuning keys of this layer's weight with its dense copy (ending in "+dense") tuned so far."""
    w = layer.sparse_weight
    sig = bsr.tuning_key("decode", w, 1, w.values.dtype)[1:6]
    return [key for key in bsr._tuned if key[1:6] == sig and key[-1] == "+dense"]


def module_kind(name: str) -> str:
    """`model.layers.3.mlp.down_proj` -> `down_proj`."""
    return name.rsplit(".", 1)[-1]


def layer_kinds(name: str, layer: BlockSparseLinear) -> tuple[str, ...]:
    """The module kinds a block-sparse layer serves: its own, or its siblings' when it is fused."""
    return layer.names if isinstance(layer, FusedBlockSparseLinear) else (module_kind(name),)


def dispatch_table(model: nn.Module, launches: list[str] | None = None) -> dict[str, dict[str, list[int]]]:
    """{launch: {module kind: [layers running the kernel, block-sparse layers of that kind]}}; a
    fused layer counts once for each of its siblings (they run as it does).

    launches: "decode 8", "prefill 2048" (prefill: the tuning key's power of two of the tokens);
    None: every launch shape tuned so far. A layer whose launch shape is not tuned counts as
    running the kernel when it has no dense copy (it cannot run dense) and as not sparse otherwise.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)]
    choices = {n: _choices(m) for n, m in layers}
    if launches is None:
        launches = sorted({shape for c in choices.values() for shape in c}, key=_launch_order)
    table: dict[str, dict[str, list[int]]] = {}
    for launch in launches:
        row = table.setdefault(launch, {})
        for name, layer in layers:
            dense = choices[name].get(launch, layer.dense_weight is not None)
            for kind in layer_kinds(name, layer):
                count = row.setdefault(kind, [0, 0])
                count[0] += not dense
                count[1] += 1
    return table


def _launch_order(launch: str) -> tuple:
    kind, tokens = launch.split()
    return (kind != "decode", int(tokens))


def dispatch_text(table: dict[str, dict[str, list[int]]], kept_linears: int = 0) -> str:
    """One line from `dispatch_table`, e.g. `sparse: 224 of 224 linears at decode 1, 96 of 224 at
    prefill 2048 (q_proj 32/32, ..., down_proj 0/32); dense elsewhere (and 1 linear kept dense)`.
    A launch where some kinds run dense lists every kind."""
    parts = []
    for i, (launch, kinds) in enumerate(table.items()):
        sparse = sum(c[0] for c in kinds.values())
        total = sum(c[1] for c in kinds.values())
        part = f"{sparse} of {total} linears at {launch}" if i == 0 else f"{sparse} of {total} at {launch}"
        if 0 < sparse < total:
            part += " (" + ", ".join(f"{k} {c[0]}/{c[1]}" for k, c in kinds.items()) + ")"
        parts.append(part)
    if not parts:
        return "sparse: no block-sparse linear"
    line = "sparse: " + ", ".join(parts) + "; dense elsewhere"
    if kept_linears:
        line += f" (and {kept_linears} linear{'s' if kept_linears != 1 else ''} never block-sparse)"
    return line
