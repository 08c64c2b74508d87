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

On the GPU it also splits the kernel path's Triton launch (docs/kernels-notes.md, v12 step 1): the
launch as spruce makes it (`kernel[grid](...)`, Triton's JITFunction.run: binding, cache key,
globals check) against the same compiled kernel called directly with its bound arguments, as
inductor calls its kernels. The two outputs must be equal bit for bit. This uses Triton internals
(the binder in `device_caches`) and is a measurement only; spruce's own direct launch is
`prefill.launch_compiled` (prefill kernels, with SPRUCE_LAUNCH_CACHE=1).
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


def _spied_launch(call) -> dict:
    """Run `call` once with every spruce Triton kernel's JITFunction.run wrapped; the last launch's
    function, arguments and compiled kernel."""
    from spruce.kernels import bsr, prefill_triton

    kernels = [bsr._kernels().decode, bsr._kernels().prefill, prefill_triton.prefill_grouped,
               prefill_triton.prefill_grouped_tma, prefill_triton.transpose]
    seen: dict = {}

    def spy(fn):
        real = fn.run

        def run(*args, grid, warmup, **kwargs):
            compiled = real(*args, grid=grid, warmup=warmup, **kwargs)
            seen.update(fn=fn, args=args, kwargs=kwargs, grid=grid, compiled=compiled)
            return compiled
        return run

    for fn in kernels:
        fn.run = spy(fn)
    try:
        call()
    finally:
        for fn in kernels:
            del fn.run   # the instance attribute goes; the class's method serves again
    return seen


def launch_split(call, out: torch.Tensor, calls: int) -> dict:
    """Host us of the last Triton launch that `call` makes, through JITFunction.run and directly
    through its compiled kernel; and whether both write the same output."""
    seen = _spied_launch(call)
    fn, args, kwargs, grid, compiled = (seen[k] for k in ("fn", "args", "kwargs", "grid", "compiled"))
    grid = grid(args) if callable(grid) else grid
    grid = tuple(grid) + (1,) * (3 - len(grid))
    binder = fn.device_caches[torch.cuda.current_device()][4]
    bound = list(binder(*args, **kwargs)[0].values())
    stream = torch.cuda.current_stream().cuda_stream
    runner = compiled[grid]
    jit = host_us(lambda: fn[grid](*args, **kwargs), calls)
    out.fill_(float("nan"))
    fn[grid](*args, **kwargs)
    first = out.clone()
    direct = host_us(lambda: runner(*bound, stream=stream), calls)
    out.fill_(float("nan"))
    runner(*bound, stream=stream)
    return {"kernel": fn.__name__, "jit_launch_us": round(jit, 1), "direct_launch_us": round(direct, 1),
            "direct_same_output": bool(torch.equal(first, out))}


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
            split = {}
            if device == "cuda":   # the kernel path's own launch, into a buffer of its own
                y = torch.empty(m, n, device=device, dtype=torch.bfloat16)
                with torch.no_grad():
                    split = launch_split(lambda: bsr.launch_prefill(x, kernel_only.sparse_weight, None, y)
                                         if m > bsr.DECODE_MAX_TOKENS else
                                         bsr.launch_decode(x, kernel_only.sparse_weight, None, y), y, calls)
            rows.append({**split, "shape": f"{n}x{k}", "pattern": pattern, "selection": selection, "tokens": m,
                         "dense_us": round(dense, 1), "dispatch_us": round(dispatch, 1), "kernel_us": round(kernel, 1),
                         "dispatch_x_dense": round(dispatch / dense, 2), "kernel_x_dense": round(kernel / dense, 2),
                         "dispatch_config": str(bsr.chosen_config(kind, with_copy.sparse_weight, m, x.dtype)),
                         "kernel_config": str(bsr.chosen_config(kind, kernel_only.sparse_weight, m, x.dtype))})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'shape':>11} {'tokens':>6} {'nn.Linear us':>12} {'+dense us':>9} {'x':>5} {'kernel us':>9} {'x':>5}"
             f" {'its launch: jit us':>18} {'direct us':>9}  (host time per call; x: against nn.Linear) dispatch config"]
    for r in rows:
        launch = (f" {r['jit_launch_us']:18.1f} {r['direct_launch_us']:9.1f}" + ("" if r["direct_same_output"]
                  else " (direct: other output!)")) if "jit_launch_us" in r else f" {'':18} {'':9}"
        lines.append(f"{r['shape']:>11} {r['tokens']:6d} {r['dense_us']:12.1f} {r['dispatch_us']:9.1f} "
                     f"{r['dispatch_x_dense']:5.2f} {r['kernel_us']:9.1f} {r['kernel_x_dense']:5.2f}{launch}  "
                     f"{r['dispatch_config']}")
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
