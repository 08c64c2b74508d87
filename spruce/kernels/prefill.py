"""Prefill kernel for grouped block-sparse weights: yT = W_g @ x^T, one group's features a tile.

`bsr.py`'s prefill kernel reads x row-major [M, K]: every kept B-column block is a 2*B-byte strip
per token, so an input tile is hundreds of 32-byte pieces. Here (configurations tagged TAG) x is
transposed once per call, xt = x^T [K, M_pad] (`transpose_padded`; the padding, up to a multiple
of TOKEN_PAD tokens, is zeros), and a kept block-column c is B whole rows of xt, c*B .. c*B+B-1,
each BLOCK_T contiguous tokens: a gather by row index whose every row is one coalesced run.
Configurations tagged TAG_ROWS run the same kernel on x as it is (no transpose to pay). TAG_TMA
and TAG_ROWS_TMA are the same two with tensor-descriptor (TMA) loads, one kept block (one box of
each operand) a step (Hopper has no TMA gather). The kernels themselves are in `prefill_triton.py`.

One program computes the output tile [GB features of one group] x [BLOCK_T tokens]:

    acc[GB, BLOCK_T] = sum over the group's kept blocks of W_g[:, block] @ xt[block rows, tokens]

BLOCK_K inputs (BLOCK_K / B kept blocks; the TMA kernel one) per step: the weight tile [GB, BLOCK_K] is BLOCK_K / B
stored entries of the group, each [GB, B] contiguous (values' layout in bsr.py), and the input
tile is the BLOCK_K gathered rows; `tl.dot` with fp32 accumulation (wgmma on Hopper, both
operands from shared memory), the loop software pipelined over num_stages buffers (cp.async).
The accumulator is stored transposed into y [M, N], with the bias.

Programs are ordered for L2 reuse: a band of GROUP_T token tiles (chosen so that the band's
input rows stay near L2_BAND_BYTES) visits every group before the next band starts, so each
group's weights are read GROUP_T times close together and the band's input once from memory.

Eligible weights: group width GB >= 64 (a tensor-core tile needs 64 rows). `bsr.launch_prefill`
offers `candidates(w)` for tuning next to its own tiles and dense cuBLAS; the time it measures
for a TAG configuration includes the transpose, which a real call pays. Linears that read one
input (q, k and v; gate and up) pay it once: a model's eager forward keeps the last transposed
input in SHARED and the next launch on that same, unchanged tensor takes it from there.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spruce.kernels.bsr import BlockSparseWeight

# First element of this kernel's configurations in the tuner's candidate lists: TAG reads x
# transposed (xt), TAG_ROWS reads x as it is (no transpose; B-column strips per token).
TAG, TAG_ROWS = "xt", "xr"
TAG_TMA, TAG_ROWS_TMA = "xt-tma", "xr-tma"  # the same two with tensor-descriptor (TMA) loads
TAG_GLUON = "xt-gluon"  # `prefill_gluon.py`'s Hopper kernel on xt: (tag, BLOCK_T, KB, STAGES, warps, variant)
# (BLOCK_T tokens, BLOCK_K inputs per step, num_warps, num_stages). Shared memory:
# (GB + BLOCK_T) * BLOCK_K * 2 bytes per stage (40 KiB for 64 x 256 x 64); all fit 227 KiB.
# 512-token tiles only for 64-feature groups (MAX_ACC): they halve the weight's rereads.
CONFIGS = [(256, 64, 8, 4), (256, 64, 8, 3), (256, 32, 8, 6), (128, 64, 4, 4), (128, 64, 8, 4),
           (512, 32, 8, 5), (512, 64, 8, 3)]
ROWS_CONFIGS = [(256, 64, 8, 4), (256, 64, 8, 3), (128, 64, 4, 4), (512, 32, 8, 5)]
# TMA: one kept block a step (BLOCK_K = B: one box pair and one tl.dot, which stays in flight
# across steps), many stages at 10-18 KiB each. Four blocks a step (BLOCK_K = 64) lost everywhere it
# was measured (ncu, 2026-12-02: 561.8 / 119.4 us against 117.9 / 99.7 us for one block on
# 16x16g4 / g8) and are no longer offered. 512-token tiles (64-feature groups only, MAX_ACC) take
# 155 registers at 8 warps with no spill (Triton 3.6, sm_90): the larger tile cuts g4's input
# rereads by 10% and, in the pointer kernel, was g4's fastest (110.9 us against 151.3 at 256).
TMA_CONFIGS = [(256, 16, 8, 8), (256, 16, 8, 12), (128, 16, 4, 8), (512, 16, 8, 6), (512, 16, 8, 8)]
ROWS_TMA_CONFIGS = [(256, 16, 8, 8)]
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
    pointer = ((TAG, CONFIGS), (TAG_ROWS, ROWS_CONFIGS))
    tma = ((TAG_TMA, TMA_CONFIGS), (TAG_ROWS_TMA, ROWS_TMA_CONFIGS))  # one block a step: BLOCK_K = B
    return ([(tag, *c) for tag, configs in pointer for c in configs if fits(c)]
            + [(tag, *c) for tag, configs in tma for c in configs if fits(c) and c[1] == w.block]
            + [(TAG_GLUON, *c) for c in _gluon().configs(w)])


# Compiled binaries by launch signature (see `launch_compiled`). Off unless SPRUCE_LAUNCH_CACHE=1:
# the direct launch has passed the CPU tests but not yet the GPU tests on the device.
_COMPILED: dict[tuple, object] = {}
LAUNCH_CACHE = os.environ.get("SPRUCE_LAUNCH_CACHE", "0") == "1"


def launch_compiled(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), with less host work once a call of the same signature ran.

    Triton's launch binds and specialises every argument in Python before it finds the compiled
    binary; for a prefill launch that is most of its host time, and a compiled prefill of a
    many-layer model waits on the host. Here the signature is what decides the binary: the
    constexpr arguments' values, every other argument's dtype and the properties Triton
    specialises on (16-byte alignment of pointers; integers equal to 1, divisible by 16, 64-bit),
    the descriptors' types, and the options (num_warps, num_stages). The first call of a
    signature goes through the JIT and keeps the binary it returns; later calls launch that binary
    directly. Keyword arguments name kernel parameters or options. A binary that refuses its
    arguments turns the cache off for the process (the launch goes through the JIT).
    """
    names, constexprs = getattr(kernel, "arg_names", None), getattr(kernel, "constexprs", None)
    if (not LAUNCH_CACHE or names is None or constexprs is None
            or not set(names[len(args):]) <= kwargs.keys()):
        kernel[grid](*args, **kwargs)  # the interpreter, or a parameter left to its default: the JIT path
        return
    full = [*args, *(kwargs[n] for n in names[len(args):])]
    key = (id(kernel), *(full[i] if i in constexprs else _signature(v) for i, v in enumerate(full)),
           *(kwargs[o] for o in ("num_warps", "num_stages") if o in kwargs and o not in names))
    compiled = _COMPILED.get(key)
    if compiled is not None:
        try:
            compiled[(*grid, 1, 1)[:3]](*full)  # a binary's launch takes all three grid axes
        except Exception:  # noqa: BLE001 - refused before launching: this Triton's binaries launch otherwise
            _disable_launch_cache()
            kernel[grid](*args, **kwargs)
        return
    compiled = kernel[grid](*args, **kwargs)
    if hasattr(compiled, "__getitem__") and hasattr(compiled, "run"):
        _COMPILED[key] = compiled


def _disable_launch_cache() -> None:
    """Every launch through the JIT from now on."""
    global LAUNCH_CACHE
    LAUNCH_CACHE = False
    _COMPILED.clear()


def _signature(v) -> tuple:
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None:
        return (v,)
    if isinstance(v, int):
        return (v == 1, v % 16 == 0, v >= 2**31)  # Triton's i32 or i64
    base = getattr(v, "base", None)  # a tensor descriptor: its box and layout come with the constexprs
    return (type(v), base.dtype if isinstance(base, torch.Tensor) else None, tuple(getattr(v, "block_shape", ())))


def padded_tokens(m: int) -> int:
    return -(-m // TOKEN_PAD) * TOKEN_PAD


def transpose_padded(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """xt [K, M_pad] = x[M, K]^T, tokens padded with zeros to a multiple of TOKEN_PAD (one kernel)."""
    m, k = x.shape
    mp = padded_tokens(m)
    xt = torch.empty(k, mp, dtype=x.dtype, device=x.device) if out is None else out
    t = TRANSPOSE_TILE
    launch_compiled(_kernels().transpose, (mp // t, -(-k // t)), x, xt, m, k, x.stride(0), xt.stride(0),
                    BLOCK_M=t, BLOCK_K=t, num_warps=4)
    return xt


def transposes(cfg: tuple) -> bool:
    """Whether a tuner configuration runs on x transposed (tags TAG, TAG_TMA and TAG_GLUON)."""
    return isinstance(cfg[0], str) and cfg[0] in (TAG, TAG_TMA, TAG_GLUON)


def _state(t: torch.Tensor) -> tuple:
    """What must match for a tensor's data to be the same as when it was transposed (and for the
    transpose to be ordered before the launch that reads it: the same CUDA stream)."""
    stream = torch.cuda.current_stream(t.device) if t.device.type == "cuda" else None
    return t._version, tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device, stream


class SharedTranspose:
    """The last transposed prefill input, for the next launch that reads the same input.

    `get(owner, x)` returns xt = transpose_padded(x), x being `owner` as [M, K]. It makes xt when
    `owner` is not the tensor of the last call, or has changed since: another version (every
    in-place write counts one), shape, strides, offset or current stream. `owner` is held by a weak
    reference: while it lives its memory is its own, and the entry (xt with it) goes when it goes.
    Only for eager calls: inside a captured CUDA graph or a compiled graph a tensor's memory is
    rewritten without a new version, so those calls transpose for themselves.
    """

    def __init__(self):
        self._entry: tuple | None = None

    def get(self, owner: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        entry = self._entry
        if entry is not None and entry[0]() is owner and entry[1] == _state(owner):
            return entry[2]
        xt = transpose_padded(x)
        self._entry = (weakref.ref(owner, self._drop), _state(owner), xt)
        return xt

    def _drop(self, ref: weakref.ref) -> None:
        if self._entry is not None and self._entry[0] is ref:
            self._entry = None

    def clear(self) -> None:
        self._entry = None


SHARED = SharedTranspose()


def tma_ready(src: torch.Tensor, w: BlockSparseWeight) -> bool:
    """Whether tensor descriptors can address the input (x or xt) and the weight (16-byte aligned,
    something stored); a TMA configuration runs the pointer kernel with the same tile where not."""
    esize = src.element_size()
    return (w.values.numel() > 0 and src.data_ptr() % 16 == 0 and (src.stride(0) * esize) % 16 == 0
            and w.values.data_ptr() % 16 == 0)


def band_tiles(m: int, k: int, block_t: int, esize: int) -> int:
    """Token tiles per band (GROUP_T): as many as keep the band's input within L2_BAND_BYTES."""
    tiles = -(-m // block_t)
    return max(1, min(tiles, L2_BAND_BYTES // (block_t * k * esize)))


def launch(x: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None, y: torch.Tensor, cfg: tuple,
           xt: torch.Tensor | None = None) -> None:
    """y[M, N] = x[M, K] W^T (+ bias) with one configuration (tag, BLOCK_T, BLOCK_K, warps, stages).

    Tags TAG, TAG_TMA and TAG_GLUON read x transposed: `xt` if given (made by `transpose_padded`,
    then x gives only M), else transposed here. TAG_ROWS and TAG_ROWS_TMA read x as it is, B-column
    strips per token. The _TMA tags load through tensor descriptors (`prefill_grouped_tma`);
    TAG_GLUON runs `prefill_gluon.py`'s kernel, (tag, BLOCK_T, KB, STAGES, warps, variant).
    """
    tag, block_t = cfg[:2]
    m = x.shape[0]
    n, k = w.shape
    group_t = band_tiles(m, k, block_t, x.element_size())
    transposed = transposes(cfg)
    if transposed and xt is None:
        xt = transpose_padded(x)
    if tag == TAG_GLUON:
        if _gluon().ready(xt, w, y):
            _gluon().launch(m, xt, w, bias, y, cfg[1:], group_t)
            return
        cfg = (TAG, block_t, 4 * w.block, 8, 3)  # descriptors cannot address these tensors: the pointer tile
    _, _, block_k, warps, stages = cfg
    ngroups = n // w.group_features
    grid = (-(-m // block_t) * ngroups,)
    bias_arg = bias if bias is not None else y
    src = xt if transposed else x
    if tag in (TAG_TMA, TAG_ROWS_TMA) and tma_ready(src, w):
        from triton.tools.tensor_descriptor import TensorDescriptor

        b = w.block
        box = [b, block_t] if transposed else [block_t, b]
        x_desc = TensorDescriptor(src, list(src.shape), [src.stride(0), 1], box)
        values = w.values.view(-1, b)  # [stored * GB, B]: entry e of the group is rows e*GB .. e*GB+GB-1
        w_desc = TensorDescriptor(values, list(values.shape), [b, 1], [w.group_features, b])
        _kernels().prefill_grouped_tma[grid](
            x_desc, w_desc, w.cols, w.group_ptr, bias_arg, y, m, w.uniform_count, ngroups, group_t,
            int(bias is not None), y.stride(0), B=b, GB=w.group_features, X_T=transposed, BLOCK_T=block_t,
            num_warps=warps, num_stages=stages,
        )
        return
    # xt: token axis contiguous, its padding tokens exist; x: input axis contiguous, tokens masked
    stride_k, stride_t = (xt.stride(0), 1) if transposed else (1, x.stride(0))
    _kernels().prefill_grouped[grid](
        src, w.values, w.cols, w.group_ptr, bias_arg, y, m, w.uniform_count, ngroups, group_t,
        int(bias is not None), stride_k, stride_t, y.stride(0), B=w.block, GB=w.group_features,
        MASK_T=not transposed, BLOCK_T=block_t, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )


@functools.cache
def _gluon():
    """`prefill_gluon.py`, imported on first use."""
    from spruce.kernels import prefill_gluon

    return prefill_gluon


@functools.cache
def _kernels():
    """The kernels' module, imported on first use (so that importing spruce never needs triton)."""
    from spruce.kernels import prefill_triton

    return prefill_triton
