"""An explicit Gluon prefill kernel for the grouped layout, against dense cuBLAS and spruce's tuned tile.

    python -m bench.gluon_prefill --json $OUT/gluon_prefill.json
    python -m bench.gluon_prefill --compile-only        # no GPU: compile for sm_90, print registers

An experiment, not yet one of the tuner's candidates. The Triton prefill tiles (spruce/kernels/
prefill_triton.py) feed one kept block, 16 inputs, to each wgmma and wait for it before the next
(docs/kernels-notes.md, v8 and v9). Their tensor pipe idles at 57-60% of the time. Here the steps
are written out in Gluon:
- STAGES shared-memory stages of KB kept blocks each, filled by TMA: one [GB, B] weight box and
  one [B, BLOCK_T] box of x transposed per block. Triton splits the latter into 128-byte-swizzled
  copies.
- One mbarrier a stage.
- KB asynchronous wgmmas a step, with the previous step's still in flight while the next
  stage's loads are issued.
- A block past the group's last kept one reads its weight box out of bounds, so TMA fills it with
  zeros and it adds nothing.
- The column indices of a step are loaded one step ahead.
- The output tile is written with one TMA store (rows past M are clipped).

It has no interpreter. The GPU run checks every configuration against float64 before timing it.
Each configuration is (BLOCK_T, KB, STAGES, num_warps, variant). Variant "ws" runs the same steps
warp-specialised: a one-warp partition issues the TMA loads into the stages and the kernel's
warpgroups run the wgmmas, with a "ready" and an "empty" mbarrier a stage between them.
"""

from __future__ import annotations

import functools
import json

import torch

from bench.common import cli_main, copies_for, environment, graph_time_us, require_cuda
from bench.emitted import emitted_weight

# (BLOCK_T, KB, STAGES, num_warps, variant) by group width: the accumulator takes 128 fp32
# registers a thread; variant "" is one partition, "ws" adds a one-warp TMA loader
_ONE = {64: [(256, 4, 3, 4), (256, 4, 4, 4), (256, 2, 6, 4), (256, 8, 2, 4), (512, 4, 3, 8), (512, 2, 5, 8)],
        128: [(256, 4, 3, 8), (256, 2, 4, 8), (128, 4, 4, 4), (128, 4, 3, 4)]}
CONFIGS = {gb: [(*c, "") for c in configs] + [(*c, "ws") for c in configs] for gb, configs in _ONE.items()}
SHAPES = ["4096x4096", "11008x4096", "4096x11008"]


@functools.cache
def _kernel():
    """The Gluon kernel (WS: warp-specialised, else one partition), defined on first use
    (importing this module needs no triton)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # Triton 3.6 names the TMA copies async_copy_global_to_shared / _shared_to_global; later
    # versions async_load / async_store
    tma_load = getattr(tma, "async_load", tma.async_copy_global_to_shared)
    tma_store = getattr(tma, "async_store", tma.async_copy_shared_to_global)

    @gluon.constexpr_function
    def mma_warps(GB, num_warps):
        # warpgroups split the features first (64 a warpgroup), then the tokens
        along_m = min(num_warps // 4, GB // 64)
        return [4 * along_m, num_warps // (4 * along_m)]

    @gluon.jit
    def issue(x_desc, w_desc, a_smem, b_smem, bars, cvec, offs_kb, start, entries, step, n_steps, t0,
              B: gl.constexpr, GB: gl.constexpr, KB: gl.constexpr, STAGES: gl.constexpr):
        # TMA for step `step` (if it exists) into its stage; cvec holds that step's column indices
        s = step % STAGES
        bar = bars.index(s)
        live = step < n_steps
        mbarrier.expect(bar, KB * (w_desc.block_type.nbytes + x_desc.block_type.nbytes), pred=live)
        rows_out = w_desc.shape[0]  # a weight row past the end: TMA fills the box with zeros
        for j in gl.static_range(KB):
            e = step * KB + j
            c = gl.sum(gl.where(offs_kb == j, cvec, 0), axis=0)
            w_row = gl.where(e < entries, (start + e) * GB, rows_out)
            tma_load(w_desc, [w_row, 0], bar, a_smem.index(s * KB + j), pred=live)
            tma_load(x_desc, [c * B, t0], bar, b_smem.index(s * KB + j), pred=live)

    # The program's (token tile, group, first stored entry, stored entries), as
    # prefill_triton.program_tile computes it. Gluon's own ops here: with Triton's interpreter on (the
    # CPU tests), a Triton function called from Gluon does not compile.
    @gluon.jit
    def program_tile(M, count, ngroups, GROUP_T, gptr_ptr, BLOCK_T: gl.constexpr):
        pid = gl.program_id(0)
        num_t = gl.cdiv(M, BLOCK_T)
        per_band = GROUP_T * ngroups
        band = pid // per_band
        first_t = band * GROUP_T
        band_t = gl.minimum(num_t - first_t, GROUP_T)
        local = pid - band * per_band
        if count >= 0:
            start = (local // band_t) * count
            entries = count
        else:
            start = gl.load(gptr_ptr + local // band_t)
            entries = gl.load(gptr_ptr + local // band_t + 1) - start
        return first_t + local % band_t, local // band_t, start, entries

    @gluon.jit
    def mma_step(a_smem, b_smem, ready, acc, i, KB: gl.constexpr, STAGES: gl.constexpr):
        # wait for step i's stage, issue its KB wgmmas; returns with only those still in flight
        cur = i % STAGES
        mbarrier.wait(ready.index(cur), (i // STAGES) & 1)
        for j in gl.static_range(KB):
            acc = warpgroup_mma(a_smem.index(cur * KB + j), b_smem.index(cur * KB + j), acc, is_async=True)
        return warpgroup_mma_wait(num_outstanding=KB, deps=(acc,))

    @gluon.jit
    def store_tile(acc, y_desc, bias_ptr, g, t0, HAS_BIAS: gl.constexpr, GB: gl.constexpr, BLOCK_T: gl.constexpr):
        # the [GB features, BLOCK_T tokens] accumulator as y[t0:, g*GB:] (rows past M clipped)
        if HAS_BIAS:
            offs_f = g * GB + gl.arange(0, GB, layout=gl.SliceLayout(1, acc.type.layout))
            acc = acc + gl.load(bias_ptr + offs_f).to(gl.float32)[:, None]
        c_smem = gl.allocate_shared_memory(y_desc.dtype, [BLOCK_T, GB], y_desc.layout)
        c_smem.store(gl.permute(acc.to(y_desc.dtype), (1, 0)))
        fence_async_shared()
        tma_store(y_desc, [t0, g * GB], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def one_partition(x_desc, w_desc, cols_ptr, a_smem, b_smem, bars, start, entries, n_steps, t0,
                      acc_layout: gl.constexpr, B: gl.constexpr, GB: gl.constexpr, BLOCK_T: gl.constexpr,
                      KB: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        # every warp loads and multiplies: the column indices a step ahead, STAGES - 1 steps of TMA
        # in flight ahead of the wgmmas
        cols_layout: gl.constexpr = gl.BlockedLayout([KB], [32], [num_warps], [0])
        offs_kb = gl.arange(0, KB, layout=cols_layout)
        cvec = gl.load(cols_ptr + start + offs_kb, mask=offs_kb < entries, other=0)
        for p in gl.static_range(STAGES - 1):
            issue(x_desc, w_desc, a_smem, b_smem, bars, cvec, offs_kb, start, entries, p, n_steps, t0,
                  B, GB, KB, STAGES)
            nk = (p + 1) * KB + offs_kb
            cvec = gl.load(cols_ptr + start + nk, mask=nk < entries, other=0)
        acc = gl.zeros((GB, BLOCK_T), dtype=gl.float32, layout=acc_layout)
        for i in range(n_steps):
            # the previous step's wgmmas are done: its stage takes the loads of step i + STAGES - 1
            acc = mma_step(a_smem, b_smem, bars, acc, i, KB, STAGES)
            nxt = i + STAGES - 1
            issue(x_desc, w_desc, a_smem, b_smem, bars, cvec, offs_kb, start, entries, nxt, n_steps, t0,
                  B, GB, KB, STAGES)
            nk = (nxt + 1) * KB + offs_kb
            cvec = gl.load(cols_ptr + start + nk, mask=nk < entries, other=0)
        return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    # The same work split between warps (WS): a one-warp partition issues the TMA loads into the
    # stages (waiting on each stage's "empty" barrier), the default partition (the kernel's
    # warpgroups) waits on "ready", runs the wgmmas and releases a stage once its wgmmas are done.
    @gluon.jit
    def ws_load(x_desc, w_desc, cols_ptr, a_smem, b_smem, ready, empty, start, entries, n_steps, t0,
                B: gl.constexpr, GB: gl.constexpr, KB: gl.constexpr, STAGES: gl.constexpr):
        rows_out = w_desc.shape[0]  # a weight row past the end: TMA fills the box with zeros
        for step in range(n_steps):
            cur = step % STAGES
            mbarrier.wait(empty.index(cur), ((step // STAGES) & 1) ^ 1)  # a fresh stage passes at once
            bar = ready.index(cur)
            mbarrier.expect(bar, KB * (w_desc.block_type.nbytes + x_desc.block_type.nbytes))
            for j in gl.static_range(KB):
                e = step * KB + j
                c = gl.load(cols_ptr + start + e, mask=e < entries, other=0)
                w_row = gl.where(e < entries, (start + e) * GB, rows_out)
                tma_load(w_desc, [w_row, 0], bar, a_smem.index(cur * KB + j))
                tma_load(x_desc, [c * B, t0], bar, b_smem.index(cur * KB + j))

    @gluon.jit
    def ws_mma(a_smem, b_smem, ready, empty, n_steps, acc_layout: gl.constexpr, GB: gl.constexpr,
               BLOCK_T: gl.constexpr, KB: gl.constexpr, STAGES: gl.constexpr):
        acc = gl.zeros((GB, BLOCK_T), dtype=gl.float32, layout=acc_layout)
        for i in range(n_steps):
            acc = mma_step(a_smem, b_smem, ready, acc, i, KB, STAGES)
            # step i - 1's wgmmas are done: the loader may refill its stage
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
        return (warpgroup_mma_wait(num_outstanding=0, deps=(acc,)),)  # the default partition returns a tuple

    @gluon.jit(do_not_specialize=["M", "count", "ngroups", "GROUP_T"])
    def prefill_gluon(x_desc, w_desc, y_desc, cols_ptr, gptr_ptr, bias_ptr, M, count, ngroups, GROUP_T,
                      HAS_BIAS: gl.constexpr, B: gl.constexpr, GB: gl.constexpr, BLOCK_T: gl.constexpr,
                      KB: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr, num_warps: gl.constexpr):
        pid_t, g, start, entries = program_tile(M, count, ngroups, GROUP_T, gptr_ptr, BLOCK_T)
        t0 = pid_t * BLOCK_T
        n_steps = gl.cdiv(entries, KB)
        a_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES * KB, GB, B], w_desc.layout)
        b_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * KB, B, BLOCK_T], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
        warps_per_cta: gl.constexpr = mma_warps(GB, num_warps)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=warps_per_cta, instr_shape=[16, BLOCK_T // warps_per_cta[1], 16])
        if WS:
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for st in gl.static_range(STAGES):
                mbarrier.init(empty.index(st), count=1)
            acc, = gl.warp_specialize([
                (ws_mma, (a_smem, b_smem, ready, empty, n_steps, acc_layout, GB, BLOCK_T, KB, STAGES)),
                (ws_load, (x_desc, w_desc, cols_ptr, a_smem, b_smem, ready, empty, start, entries, n_steps, t0,
                           B, GB, KB, STAGES)),
            ], [1], [40])
            for st in gl.static_range(STAGES):
                mbarrier.invalidate(empty.index(st))
        else:
            acc = one_partition(x_desc, w_desc, cols_ptr, a_smem, b_smem, ready, start, entries, n_steps, t0,
                                acc_layout, B, GB, BLOCK_T, KB, STAGES, num_warps)
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(st))
        store_tile(acc, y_desc, bias_ptr, g, t0, HAS_BIAS, GB, BLOCK_T)

    return prefill_gluon



def layouts(cfg: tuple, gb: int, b: int = 16):
    """The shared layouts of the weight box [GB, B], the xt box [B, BLOCK_T] and the output [BLOCK_T, GB]."""
    from triton.experimental.gluon import language as gl

    block_t = cfg[0]
    return (gl.NVMMASharedLayout.get_default_for([gb, b], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([b, block_t], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([block_t, gb], gl.bfloat16))


def launch(x: torch.Tensor, w, bias, y: torch.Tensor, cfg: tuple, xt: torch.Tensor | None = None) -> None:
    """y[M, N] = x[M, K] W^T (+ bias) for a BlockSparseWeight of 64+-feature groups, one configuration."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from spruce.kernels import prefill as grouped_prefill

    block_t, kb, stages, warps, variant = cfg
    m = x.shape[0]
    n, _ = w.shape
    gb, b = w.group_features, w.block
    xt = grouped_prefill.transpose_padded(x) if xt is None else xt
    w_layout, x_layout, y_layout = layouts(cfg, gb, b)
    values = w.values.view(-1, b)
    x_desc = TensorDescriptor(xt, list(xt.shape), [xt.stride(0), 1], [b, block_t], x_layout)
    w_desc = TensorDescriptor(values, list(values.shape), [b, 1], [gb, b], w_layout)
    y_desc = TensorDescriptor(y, [m, n], [y.stride(0), 1], [block_t, gb], y_layout)
    ngroups = n // gb
    group_t = grouped_prefill.band_tiles(m, xt.shape[0], block_t, x.element_size())
    grid = (-(-m // block_t) * ngroups,)
    _kernel()[grid](x_desc, w_desc, y_desc, w.cols, w.group_ptr, bias if bias is not None else y, m,
                    w.uniform_count, ngroups, group_t, HAS_BIAS=bias is not None, B=b, GB=gb, BLOCK_T=block_t,
                    KB=kb, STAGES=stages, WS=variant == "ws", num_warps=warps)


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
        w_layout, x_layout, y_layout = layouts(cfg, gb)
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
            kernel = triton.compile(GluonASTSource(_kernel(), sig, consts, attrs), target=GPUTarget("cuda", 90, 64),
                                    options={"num_warps": warps})
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
        rows = [{"group_features": gb, **r} for gb, configs in CONFIGS.items() for r in compile_only(configs, gb)]
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
        for cfg in CONFIGS.get(sp.group_features, []):
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
