"""The Gluon prefill kernel's configurations, each against dense cuBLAS and spruce's tuned choice.

    python -m bench.gluon_prefill --json $OUT/gluon_prefill.json
    python -m bench.gluon_prefill --compile-only        # no GPU: compile for sm_90, print registers

`spruce/kernels/prefill_gluon.py` (tuner tag "xt-gluon") is a Hopper kernel written in Gluon: STAGES
TMA stages of KB kept blocks, KB asynchronous wgmmas a step, optionally warp-specialised (variant
"ws": a one-warp TMA loader). The tuner times its configurations next to the Triton tiles and
cuBLAS; this bench times each one on the pruner's emitted masks, the kernel alone (on a ready xt)
and with the transpose it pays when no other layer shares it. Every configuration is checked
against float64 first; a wrong one is reported, never timed. "tuned" is what the tuner chose among
all candidates (Gluon included).
"""

from __future__ import annotations

import json

import torch

from bench.common import cli_main, copies_for, environment, graph_time_us, require_cuda
from bench.emitted import emitted_weight
from spruce.kernels import prefill_gluon

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]


def launch(x: torch.Tensor, w, bias, y: torch.Tensor, cfg: tuple, xt: torch.Tensor | None = None) -> None:
    """y[M, N] = x[M, K] W^T (+ bias) for a BlockSparseWeight of 64+-feature groups, one Gluon configuration."""
    from spruce.kernels import prefill as grouped_prefill

    xt = grouped_prefill.transpose_padded(x) if xt is None else xt
    assert prefill_gluon.ready(xt, w, y)  # else prefill.launch would run the pointer tile in its place
    grouped_prefill.launch(x, w, bias, y, (grouped_prefill.TAG_GLUON, *cfg), xt=xt)


def compile_only(configs, gb: int = 64, has_bias: bool = False) -> list[dict]:
    """Compile every configuration for sm_90 here (no GPU): registers, local (spilled) bytes, shared
    memory, wgmma and TMA instructions in the PTX."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    rows = []
    for cfg in configs:
        block_t, kb, stages, warps, variant = cfg
        w_layout, x_layout, y_layout = prefill_gluon.layouts(block_t, gb)
        sig = {"x_desc": f"tensordesc<bf16[16, {block_t}],{x_layout!r}>",
               "w_desc": f"tensordesc<bf16[{gb}, 16],{w_layout!r}>",
               "y_desc": f"tensordesc<bf16[{block_t}, {gb}],{y_layout!r}>",
               "cols_ptr": "*i32", "gptr_ptr": "*i32", "bias_ptr": "*bf16",
               "M": "i32", "count": "i32", "ngroups": "i32", "GROUP_T": "i32"}
        consts = {"HAS_BIAS": has_bias, "B": 16, "GB": gb, "BLOCK_T": block_t, "KB": kb, "STAGES": stages,
                  "WS": variant == "ws", "num_warps": warps}
        sig.update({c: "constexpr" for c in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name.endswith("_ptr")}
        row = {"config": str(cfg)}
        try:
            source = GluonASTSource(prefill_gluon.kernel(), sig, consts, attrs)
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": warps})
        except Exception as exc:  # noqa: BLE001 - report and go on to the next configuration
            rows.append({**row, "error": str(exc).strip().splitlines()[-1][:300]})
            continue
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        regs, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
        rows.append({**row, "registers": int(regs.group(1)) if regs else None,
                     "local_bytes": int(local.group(1)) if local else None,
                     "shared_KiB": round(kernel.metadata.shared / 1024, 1),
                     "wgmma": kernel.asm["ptx"].count("wgmma.mma_async"),
                     "tma_loads": kernel.asm["ptx"].count("cp.async.bulk.tensor")})
    return rows


def add_arguments(p) -> None:
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="weight shapes OUTxIN")
    p.add_argument("--pattern", default="16x16g4", help="the pruner's block pattern (groups of 64+ features)")
    p.add_argument("--selection", default="global")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--compile-only", action="store_true", help="no GPU: compile each configuration for sm_90")
    p.add_argument("--json")


def run(args) -> None:
    if args.compile_only:
        rows = [{"group_features": gb, **r} for gb, configs in prefill_gluon.CONFIGS.items()
                for r in compile_only(configs, gb)]
        for r in rows:
            print(json.dumps(r))
        return
    require_cuda()
    from bench.prefill import _cycle, _rel_err
    from spruce.kernels import bsr
    from spruce.kernels import prefill as grouped_prefill

    gen = torch.Generator().manual_seed(0)
    rows = []
    m = args.tokens
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        w = emitted_weight(n, k, args.pattern, args.selection, args.sparsity, gen, "cuda")
        sp = bsr.BlockSparseWeight.from_dense(w, 16)
        # as bench.prefill: weight and input copies that exceed L2, cycled through CUDA-graph replays
        copies = bsr._rotation(sp)
        dense = [w] + [w.clone() for _ in range(copies_for(w.numel() * w.element_size()) - 1)]
        xs = [torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16) for _ in range(copies_for(m * k * 2))]
        xts = [grouped_prefill.transpose_padded(x) for x in xs]
        count = max(len(copies), len(xs))
        ref = torch.nn.functional.linear(xs[0].double(), w.double())
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        dense_us = graph_time_us(_cycle(lambda i: torch.mm(xs[i % len(xs)], dense[i % len(dense)].t(), out=y),
                                        max(len(dense), len(xs))))
        bsr.block_sparse_linear(xs[0], sp)   # tunes spruce's own tiles for this launch shape
        tuned = bsr.chosen_config("prefill", sp, m, torch.bfloat16)
        tuned_us = graph_time_us(_cycle(lambda i: bsr.block_sparse_linear(xs[i % len(xs)], copies[i % len(copies)]),
                                        count))
        head = {"shape": shape, "pattern": args.pattern, "selection": args.selection, "tokens": m,
                "dense_us": round(dense_us, 1), "tuned": str(tuned), "tuned_x_dense": round(dense_us / tuned_us, 3)}
        if grouped_prefill.transposes(tuned):
            alone = graph_time_us(_cycle(lambda i: bsr.launch_prefill(xs[i % len(xs)], copies[i % len(copies)], None,
                                                                      y, tuned, xt=xts[i % len(xs)]), count))
            head["tuned_alone_x_dense"] = round(dense_us / alone, 3)
        for cfg in prefill_gluon.CONFIGS.get(sp.group_features, []):
            row = {**head, "config": str(cfg)}
            try:
                y.fill_(float("nan"))
                launch(xs[0], sp, None, y, cfg, xt=xts[0])
                torch.cuda.synchronize()
                row["rel_err"] = _rel_err(y, ref)
                if row["rel_err"] < 1e-2:   # NaN fails too: a wrong result is not timed
                    alone = graph_time_us(_cycle(lambda i, c=cfg: launch(xs[i % len(xs)], copies[i % len(copies)],
                                                                         None, y, c, xt=xts[i % len(xs)]), count))
                    total = graph_time_us(_cycle(lambda i, c=cfg: launch(xs[i % len(xs)], copies[i % len(copies)],
                                                                         None, y, c), count))
                    row.update(alone_us=round(alone, 1), alone_x_dense=round(dense_us / alone, 3),
                               with_transpose_x_dense=round(dense_us / total, 3))
            except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or fit
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(cli_main(add_arguments, run, __doc__))
