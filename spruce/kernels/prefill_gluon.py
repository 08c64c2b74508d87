"""Hopper (sm_90) prefill kernel for grouped block-sparse weights, written in Gluon.

The tile and the work are those of `prefill.py` (one program: [GB features of one group] x
[BLOCK_T tokens] of yT = W_g @ xt, x transposed once by `prefill.transpose_padded`), but the
pipeline is explicit. The Triton TMA tile (`prefill_triton.prefill_grouped_tma`) feeds one kept
block, 16 inputs, to each wgmma and waits for it before the next; its tensor pipe idles 57-60% of
the time (docs/kernels-notes.md, v8 and v9). Here:
- STAGES shared-memory stages of KB kept blocks each, filled by TMA: one [GB, B] weight box and one
  [B, BLOCK_T] box of xt per block, one mbarrier a stage.
- KB asynchronous wgmmas a step, the previous step's still in flight while the next stage's loads
  are issued.
- A block past the group's last kept one reads its weight box out of bounds, so TMA fills it with
  zeros and it adds nothing (a group's count need not be a multiple of KB).
- The output tile [BLOCK_T, GB] of y is written with one TMA store (rows past M are clipped).
Variant "ws" runs the same steps warp-specialised: a one-warp partition issues the TMA loads, the
kernel's warpgroups run the wgmmas, with a "ready" and an "empty" mbarrier a stage between them.

Configurations (tagged `prefill.TAG_GLUON` in the tuner's lists): (BLOCK_T, KB, STAGES, num_warps,
variant) by group width, from `bench.gluon_prefill` on one H200 (2026-12-04, docs/RESULTS.md): the
fastest on the pruner's 16x16g4 and 16x16g8 masks at the three Llama-2-7B shapes, and their
neighbours. Only on sm_90 (wgmma) with a Triton that has Gluon; it has no interpreter, so the CPU
tests compile it for sm_90 and the GPU tests check it against float64.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spruce.kernels.bsr import BlockSparseWeight

# The accumulator [GB, BLOCK_T] takes 128 fp32 registers a thread at 8 warps.
CONFIGS = {64: [(512, 4, 3, 8, "ws"), (512, 2, 5, 8, "ws"), (512, 3, 4, 8, "ws"), (512, 4, 3, 8, "")],
           128: [(256, 4, 3, 8, "ws"), (256, 2, 4, 8, "ws"), (256, 4, 4, 8, "ws"), (256, 4, 3, 8, "")]}
BLOCK = 16  # the block size measured (one k16 wgmma a kept block)


@functools.cache
def importable() -> bool:
    """Whether this Triton has Gluon's Hopper ops."""
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def available(device: torch.device) -> bool:
    """Whether this kernel can run on `device`: CUDA sm_90 (Hopper's wgmma) and Gluon."""
    return device.type == "cuda" and _hopper(device.index or 0) and importable()


def configs(w: BlockSparseWeight) -> list[tuple]:
    """(BLOCK_T, KB, STAGES, num_warps, variant) for this weight, or none where it cannot run."""
    if w.block != BLOCK or not available(w.values.device):
        return []
    return list(CONFIGS.get(w.group_features, []))


def ready(xt: torch.Tensor, w: BlockSparseWeight, y: torch.Tensor) -> bool:
    """Whether tensor descriptors can address xt, the stored weight and y (16-byte aligned rows,
    contiguous last axes, something stored)."""
    aligned = lambda t: (t.data_ptr() % 16 == 0 and t.stride(-1) == 1  # noqa: E731
                         and (t.stride(0) * t.element_size()) % 16 == 0)
    return w.values.numel() > 0 and aligned(xt) and aligned(y) and w.values.data_ptr() % 16 == 0


@functools.cache
def layouts(block_t: int, gb: int, b: int = BLOCK) -> tuple:
    """The shared layouts of the weight box [GB, B], the xt box [B, BLOCK_T] and the output [BLOCK_T, GB]."""
    from triton.experimental.gluon import language as gl

    return (gl.NVMMASharedLayout.get_default_for([gb, b], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([b, block_t], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([block_t, gb], gl.bfloat16))


def launch(m: int, xt: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None, y: torch.Tensor, cfg: tuple,
           group_t: int) -> None:
    """y[M, N] = xt[:, :M]^T W^T (+ bias), one configuration; `ready(xt, w, y)` must hold."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block_t, kb, stages, warps, variant = cfg
    n = w.shape[0]
    gb, b = w.group_features, w.block
    w_layout, x_layout, y_layout = layouts(block_t, gb, b)
    values = w.values.view(-1, b)  # [stored * GB, B]: entry e of the group is rows e*GB .. e*GB+GB-1
    x_desc = TensorDescriptor(xt, list(xt.shape), [xt.stride(0), 1], [b, block_t], x_layout)
    w_desc = TensorDescriptor(values, list(values.shape), [b, 1], [gb, b], w_layout)
    y_desc = TensorDescriptor(y, [m, n], [y.stride(0), 1], [block_t, gb], y_layout)
    ngroups = n // gb
    grid = (-(-m // block_t) * ngroups,)
    from spruce.kernels.prefill import launch_compiled

    launch_compiled(kernel(), grid, x_desc, w_desc, y_desc, w.cols, w.group_ptr, bias if bias is not None else y, m,
                    w.uniform_count, ngroups, group_t, HAS_BIAS=bias is not None, B=b, GB=gb, BLOCK_T=block_t,
                    KB=kb, STAGES=stages, WS=variant == "ws", num_warps=warps)


@functools.cache
def kernel():
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
