"""Prefill kernel for grouped block-sparse weights: yT = W_g @ x^T, one group's features a tile.

`bsr.py`'s prefill kernel reads x row-major [M, K]: every kept B-column block is a 2*B-byte strip
per token, so an input tile is hundreds of 32-byte pieces. Here (configurations tagged TAG) x is
transposed once per call, xt = x^T [K, M_pad] (`transpose_padded`; the padding, up to a multiple
of TOKEN_PAD tokens, is zeros), and a kept block-column c is B whole rows of xt, c*B .. c*B+B-1,
each BLOCK_T contiguous tokens: a gather by row index whose every row is one coalesced run.
Configurations tagged TAG_ROWS run the same kernel on x as it is (no transpose to pay).

One program computes the output tile [GB features of one group] x [BLOCK_T tokens]:

    acc[GB, BLOCK_T] = sum over the group's kept blocks of W_g[:, block] @ xt[block rows, tokens]

BLOCK_K inputs (BLOCK_K / B kept blocks) per step: the weight tile [GB, BLOCK_K] is BLOCK_K / B
stored entries of the group, each [GB, B] contiguous (values' layout in bsr.py), and the input
tile is the BLOCK_K gathered rows; `tl.dot` with fp32 accumulation (wgmma on Hopper, both
operands from shared memory), the loop software pipelined over num_stages buffers (cp.async).
The accumulator is stored transposed into y [M, N], with the bias.

Programs are ordered for L2 reuse: a band of GROUP_T token tiles (chosen so that the band's
input rows stay near L2_BAND_BYTES) visits every group before the next band starts, so each
group's weights are read GROUP_T times close together and the band's input once from memory.

Eligible weights: group width GB >= 64 (a tensor-core tile needs 64 rows). `bsr.launch_prefill`
offers `candidates(w)` for tuning next to its own tiles and dense cuBLAS; the time it measures
for a TAG configuration includes the transpose, which a real call pays.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spruce.kernels.bsr import BlockSparseWeight

# First element of this kernel's configurations in the tuner's candidate lists: TAG reads x
# transposed (xt), TAG_ROWS reads x as it is (no transpose; B-column strips per token).
TAG, TAG_ROWS = "xt", "xr"
# (BLOCK_T tokens, BLOCK_K inputs per step, num_warps, num_stages). Shared memory:
# (GB + BLOCK_T) * BLOCK_K * 2 bytes per stage (40 KiB for 64 x 256 x 64); all fit 227 KiB.
# 512-token tiles only for 64-feature groups (MAX_ACC): they halve the weight's rereads.
CONFIGS = [(256, 64, 8, 4), (256, 64, 8, 3), (256, 32, 8, 6), (128, 64, 4, 4), (128, 64, 8, 4),
           (512, 32, 8, 5), (512, 64, 8, 3)]
ROWS_CONFIGS = [(256, 64, 8, 4), (256, 64, 8, 3), (128, 64, 4, 4), (512, 32, 8, 5)]
MIN_GROUP_FEATURES = 64
MAX_ACC = 64 * 512  # accumulator elements of one program (8 warps: 128 fp32 registers a thread)
TOKEN_PAD = 512  # xt's token axis is padded to a multiple of the widest BLOCK_T
L2_BAND_BYTES = 16 << 20  # input bytes of one band of token tiles (H100/H200 L2: 50 MB)
TRANSPOSE_TILE = 64


def eligible(w: BlockSparseWeight) -> bool:
    return w.group_features >= MIN_GROUP_FEATURES


def candidates(w: BlockSparseWeight) -> list[tuple]:
    """This kernel's tuning candidates for a weight: (tag, BLOCK_T, BLOCK_K, warps, stages)."""
    if not eligible(w):
        return []
    fits = lambda c: (c[0] * w.group_features <= MAX_ACC and c[1] % w.block == 0  # noqa: E731
                      and (c[2] == 8 or c[0] * w.group_features <= 128 * 128))
    return [(TAG, *c) for c in CONFIGS if fits(c)] + [(TAG_ROWS, *c) for c in ROWS_CONFIGS if fits(c)]


def padded_tokens(m: int) -> int:
    return -(-m // TOKEN_PAD) * TOKEN_PAD


def transpose_padded(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """xt [K, M_pad] = x[M, K]^T, tokens padded with zeros to a multiple of TOKEN_PAD (one kernel)."""
    m, k = x.shape
    mp = padded_tokens(m)
    xt = torch.empty(k, mp, dtype=x.dtype, device=x.device) if out is None else out
    t = TRANSPOSE_TILE
    _kernels().transpose[(mp // t, -(-k // t))](x, xt, m, k, x.stride(0), xt.stride(0), BLOCK_M=t, BLOCK_K=t,
                                                 num_warps=4)
    return xt


def band_tiles(m: int, k: int, block_t: int, esize: int) -> int:
    """Token tiles per band (GROUP_T): as many as keep the band's input within L2_BAND_BYTES."""
    tiles = -(-m // block_t)
    return max(1, min(tiles, L2_BAND_BYTES // (block_t * k * esize)))


def launch(x: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None, y: torch.Tensor, cfg: tuple,
           xt: torch.Tensor | None = None) -> None:
    """y[M, N] = x[M, K] W^T (+ bias) with one configuration (tag, BLOCK_T, BLOCK_K, warps, stages).

    Tag TAG reads x transposed: `xt` if given (made by `transpose_padded`, then x gives only M),
    else transposed here. Tag TAG_ROWS reads x as it is, gathering B-column strips per token.
    """
    tag, block_t, block_k, warps, stages = cfg
    m = x.shape[0]
    n, k = w.shape
    if tag == TAG:
        if xt is None:
            xt = transpose_padded(x)
        src, stride_k, stride_t, mask_t = xt, xt.stride(0), 1, False
    else:
        src, stride_k, stride_t, mask_t = x, 1, x.stride(0), True
    ngroups = n // w.group_features
    group_t = band_tiles(m, k, block_t, x.element_size())
    grid = (-(-m // block_t) * ngroups,)
    _kernels().prefill_grouped[grid](
        src, w.values, w.cols, w.group_ptr, bias if bias is not None else y, y, m, w.uniform_count,
        ngroups, group_t, stride_k, stride_t, y.stride(0),
        HAS_BIAS=bias is not None, B=w.block, GB=w.group_features, MASK_T=mask_t, BLOCK_T=block_t,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )


@functools.cache
def _kernels():
    """Define the Triton kernels on first use, so that importing spruce never needs triton."""
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

    # M, count, ngroups and the band size vary with the call and the weight: no
    # specialisation on their values, one binary per configuration serves all.
    # x element (input k, token t) is at x_ptr + k * stride_k + t * stride_t: xt has stride_t = 1
    # (Triton specialises a stride of 1, so the loads know the token axis is contiguous) and
    # stride_k a multiple of TOKEN_PAD (specialised as divisible by 16: aligned rows); x as it is
    # has stride_k = 1 and B-column runs (the hints below).
    @triton.jit(do_not_specialize=["M", "count", "ngroups", "GROUP_T"])
    def prefill_grouped(x_ptr, vals_ptr, cols_ptr, gptr_ptr, bias_ptr, y_ptr, M, count, ngroups, GROUP_T, stride_k,
                        stride_t, stride_ym, HAS_BIAS: tl.constexpr, B: tl.constexpr, GB: tl.constexpr,
                        MASK_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
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
            width = count * B
        else:
            start = tl.load(gptr_ptr + g)
            width = (tl.load(gptr_ptr + g + 1) - start) * B
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
        offs_n = g * GB + offs_f
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_t.to(tl.int64)[None, :] * stride_ym + offs_n[:, None],
                 acc.to(y_ptr.dtype.element_ty), mask=in_t[None, :])

    return types.SimpleNamespace(transpose=transpose, prefill_grouped=prefill_grouped)
