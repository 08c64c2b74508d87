"""The Triton kernels of `prefill.py` (imported on first use: importing spruce never needs triton).

Module-level so that one kernel can call another (`program_tile`, `store_transposed`), which
Triton resolves through the module's globals.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def transpose(x_ptr, xt_ptr, M, K, stride_xm, stride_xt, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # xt[k, t] = x[t, k] for t < M, 0 for the padding tokens M <= t < M_pad
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    tile = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                   mask=(offs_m < M)[:, None] & in_k[None, :], other=0.0)
    tl.store(xt_ptr + offs_k.to(tl.int64)[:, None] * stride_xt + offs_m[None, :], tl.trans(tile),
             mask=in_k[:, None])


@triton.jit
def program_tile(M, count, ngroups, GROUP_T, gptr_ptr, BLOCK_T: tl.constexpr):
    """(token tile, group, first stored entry, stored entries) of this program."""
    pid = tl.program_id(0)
    # bands of GROUP_T token tiles; inside a band the token tile varies fastest, then the group
    num_t = tl.cdiv(M, BLOCK_T)
    per_band = GROUP_T * ngroups
    band = pid // per_band
    first_t = band * GROUP_T
    band_t = tl.minimum(num_t - first_t, GROUP_T)
    local = pid - band * per_band
    pid_t = first_t + local % band_t
    g = local // band_t
    # count: stored block-columns of every group when all are equal (no pointer load), else -1.
    # A run-time branch, not a specialisation: one binary serves both (one load a program is
    # nothing next to a prefill tile's work).
    if count >= 0:
        start = g * count
        entries = count
    else:
        start = tl.load(gptr_ptr + g)
        entries = tl.load(gptr_ptr + g + 1) - start
    return pid_t, g, start, entries


@triton.jit
def store_transposed(acc, y_ptr, bias_ptr, g, pid_t, M, stride_ym, has_bias, GB: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    offs_n = g * GB + tl.arange(0, GB)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    if has_bias != 0:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_t.to(tl.int64)[None, :] * stride_ym + offs_n[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=(offs_t < M)[None, :])


# M, count, ngroups, the band size and has_bias (0 / 1) vary with the call and the weight: no
# specialisation on their values, one binary per configuration serves all (and the device
# compiles each configuration once).
# x element (input k, token t) is at x_ptr + k * stride_k + t * stride_t: xt has stride_t = 1
# (Triton specialises a stride of 1, so the loads know the token axis is contiguous) and
# stride_k a multiple of TOKEN_PAD (specialised as divisible by 16: aligned rows); x as it is
# has stride_k = 1 and B-column runs (the hints below).
@triton.jit(do_not_specialize=["M", "count", "ngroups", "GROUP_T", "has_bias"])
def prefill_grouped(x_ptr, vals_ptr, cols_ptr, gptr_ptr, bias_ptr, y_ptr, M, count, ngroups, GROUP_T, has_bias,
                    stride_k, stride_t, stride_ym, B: tl.constexpr, GB: tl.constexpr, MASK_T: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t, g, start, entries = program_tile(M, count, ngroups, GROUP_T, gptr_ptr, BLOCK_T)
    width = entries * B
    offs_f = tl.arange(0, GB)
    offs_k = tl.arange(0, BLOCK_K)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    w_rows = vals_ptr + start.to(tl.int64) * (GB * B) + (offs_f * B)[:, None]
    x_cols = x_ptr + offs_t.to(tl.int64)[None, :] * stride_t
    in_t = offs_t < M
    acc = tl.zeros([GB, BLOCK_T], dtype=tl.float32)
    # The input rows of a step are gathered through the group's column indices. They are loaded
    # one step ahead, into registers: a load whose address comes from a load of the same step
    # would split the pipeline's stages between the two (num_stages 4 would buffer only 2 tiles).
    rows = tl.load(cols_ptr + start + offs_k // B, mask=offs_k < width, other=0) * B + offs_k % B
    for k0 in range(0, width, BLOCK_K):
        kk = k0 + offs_k
        inside = kk < width
        # runs of B consecutive offsets start at multiples of B: 16-byte loads, cp.async pipelining
        w_off = tl.max_contiguous(tl.multiple_of((kk // B) * (GB * B) + kk % B, B), B)
        w = tl.load(w_rows + w_off[None, :], mask=inside[None, :], other=0.0)
        rows = tl.max_contiguous(tl.multiple_of(rows, B), B)
        x_ptrs = x_cols + rows.to(tl.int64)[:, None] * stride_k
        if MASK_T:
            xv = tl.load(x_ptrs, mask=inside[:, None] & in_t[None, :], other=0.0)
        else:  # xt's padding tokens exist (zeros)
            xv = tl.load(x_ptrs, mask=inside[:, None], other=0.0)
        kn = kk + BLOCK_K
        rows = tl.load(cols_ptr + start + kn // B, mask=kn < width, other=0) * B + kn % B
        acc = tl.dot(w, xv, acc)
    store_transposed(acc, y_ptr, bias_ptr, g, pid_t, M, stride_ym, has_bias, GB, BLOCK_T)


# The same tile with tensor-memory-accelerator loads (Hopper): one kept block a step, one box of
# the input, [B, BLOCK_T] of xt (X_T) or [BLOCK_T, B] of x, and one [GB, B] box of the weight
# (values seen as [stored * GB, B]), one tl.dot. Hopper has no TMA gather, so a block is a box of
# its own. The block's column index is a scalar loaded one step ahead (a uniform register: no
# vector reduction to pick it out of a tile). One dot a step keeps it in flight across steps;
# with several, Triton 3.6 waits for each further one (and at 64 inputs a step on 64-feature
# groups its code did 1.74x the tensor work: 561.8 us against 117.9 us, ncu, docs/kernels-notes.md).
@triton.jit(do_not_specialize=["M", "count", "ngroups", "GROUP_T", "has_bias"])
def prefill_grouped_tma(x_desc, w_desc, cols_ptr, gptr_ptr, bias_ptr, y_ptr, M, count, ngroups, GROUP_T, has_bias,
                        stride_ym, B: tl.constexpr, GB: tl.constexpr, X_T: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t, g, start, entries = program_tile(M, count, ngroups, GROUP_T, gptr_ptr, BLOCK_T)
    t0 = pid_t * BLOCK_T
    acc = tl.zeros([GB, BLOCK_T], dtype=tl.float32)
    c = tl.load(cols_ptr + start, mask=entries > 0, other=0)
    for e in range(0, entries):
        c_next = tl.load(cols_ptr + start + e + 1, mask=e + 1 < entries, other=0)
        wb = w_desc.load([(start + e) * GB, 0])
        if X_T:
            xb = x_desc.load([c * B, t0])
        else:
            xb = tl.trans(x_desc.load([t0, c * B]))
        acc = tl.dot(wb, xb, acc)
        c = c_next
    store_transposed(acc, y_ptr, bias_ptr, g, pid_t, M, stride_ym, has_bias, GB, BLOCK_T)
