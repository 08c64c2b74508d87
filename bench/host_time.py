"""Host time of one eager call: a BlockSparseLinear against the nn.Linear it replaces.

    python -m bench.host_time --json $OUT/host_time.json

An eager forward (Hugging Face's prefill, `generate` without a captured step) is bound by the host
when its kernels are short: at 128-1,024 prompt tokens a Llama-2-7B layer's linears take less GPU
time than Python and the launches take on the CPU. This bench prunes one weight per shape with the
pruner's own pattern (default 16x16g4, global selection), swaps it for a BlockSparseLinear with its
dense copy (dense dispatch) and without, tunes each token count, then times `--calls` back-to-back
calls of each module on the host only (no synchronisation inside the loop, so the GPU's time hides
behind the launches until the queue fills). The ratio is the block-sparse call's host time over the
nn.Linear call's, measured in the same run. On a machine without CUDA (`--check`) it runs a small
shape through the torch reference, to check the bench itself.
"""

from __future__ import annotations

import json
import time

import torch

from bench.common import cli_main, environment, require_cuda
from bench.emitted import emitted_weight
from spruce.kernels import bsr
from spruce.kernels.linear import BlockSparseLinear

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]


def add_arguments(p) -> None:
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="weight shapes OUTxIN")
    p.add_argument("--pattern", default="16x16g4", help="the pruner's block pattern (default: the default recipe's)")
    p.add_argument("--selection", default="global")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 1024, 2048])
    p.add_argument("--calls", type=int, default=300, help="back-to-back calls per timing")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--check", action="store_true", help="CPU, a small shape: check the bench only")
    p.add_argument("--json")


def host_us(call, calls: int) -> float:
    """Host microseconds per call of `call`, after five warm-up calls (tuning, compilation)."""
    for _ in range(5):
        call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    spent = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return spent / calls * 1e6


def host_rows(shapes, pattern: str, selection: str, tokens, calls: int, sparsity: float, device: str) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in shapes:
        linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(emitted_weight(n, k, pattern, selection, sparsity, gen, device))
        with_copy = BlockSparseLinear.from_linear(linear, keep_dense=True)
        kernel_only = BlockSparseLinear.from_linear(linear)
        for m in tokens:
            x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
            with torch.no_grad():
                dense = host_us(lambda: linear(x), calls)
                dispatch = host_us(lambda: with_copy(x), calls)
                kernel = host_us(lambda: kernel_only(x), calls)
            kind = "decode" if m <= bsr.DECODE_MAX_TOKENS else "prefill"
            rows.append({"shape": f"{n}x{k}", "pattern": pattern, "selection": selection, "tokens": m,
                         "dense_us": round(dense, 1), "dispatch_us": round(dispatch, 1), "kernel_us": round(kernel, 1),
                         "dispatch_x_dense": round(dispatch / dense, 2), "kernel_x_dense": round(kernel / dense, 2),
                         "dispatch_config": str(bsr.chosen_config(kind, with_copy.sparse_weight, m, x.dtype)),
                         "kernel_config": str(bsr.chosen_config(kind, kernel_only.sparse_weight, m, x.dtype))})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'shape':>11} {'tokens':>6} {'nn.Linear us':>12} {'+dense us':>9} {'x':>5} {'kernel us':>9} {'x':>5}"
             "  (host time per call; x: against nn.Linear) dispatch config"]
    for r in rows:
        lines.append(f"{r['shape']:>11} {r['tokens']:6d} {r['dense_us']:12.1f} {r['dispatch_us']:9.1f} "
                     f"{r['dispatch_x_dense']:5.2f} {r['kernel_us']:9.1f} {r['kernel_x_dense']:5.2f}  {r['dispatch_config']}")
    return "\n".join(lines)


def run(args) -> None:
    if args.check:
        shapes, device, tokens = [(128, 256)], "cpu", [1, 24]
    else:
        require_cuda()
        shapes, device, tokens = [tuple(int(v) for v in s.split("x")) for s in args.shapes], "cuda", args.tokens
    rows = host_rows(shapes, args.pattern, args.selection, tokens, args.calls, args.sparsity, device)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(cli_main(add_arguments, run, __doc__))
