"""Block-sparse weights for y = x W^T + b: the storage format, a plain torch reference, Triton kernels.

The format (`BlockSparseWeight`) is built once, at load time, from a dense weight whose pruned
entries are zeros. W [N out, K in] is cut into B x B blocks (B = 16, 32 or 64). G consecutive
block-rows form a group of G*B output features; for every group we store the block-columns where
any of its rows is nonzero (`cols`, ascending) and W's [G*B, B] slice at each of them (`values`,
[stored, G*B, B], contiguous); `group_ptr[g]:group_ptr[g+1]` indexes group g. Any zero pattern
fits: a group keeps a block-column when one of its blocks there is nonzero, with the others' zeros.
G is chosen as the largest (G*B <= 128) that stores no all-zero block, so a pattern in which
neighbouring block-rows share their column set gets wide tiles at no cost in bytes.

Why groups: a tensor-core tile needs 64-128 output features that read the same input columns.
With 16 features per tile the prefill GEMM rereads the input for every 16 outputs and starves on
bandwidth; with a group of 64 or 128 it does as much arithmetic per byte as dense GEMM.

Kernels (CUDA, bfloat16 and float16, fp32 accumulation):
- decode, 1-16 tokens, memory bound: a program streams BLOCK_F rows of one group over its stored
  block-columns (or one of SPLIT ranges of them, partials summed by the last program to finish),
  gathers the matching input segments by column index, and reduces (fp32 FMA per token, or
  `tl.dot` on a 16-token tile: tokens first, or the weight tile first, which on Hopper is a
  64-feature wgmma for groups of 64+ features). The next tile is loaded while the current one is
  reduced; on Hopper the launch is a programmatic dependent launch that loads its first weight
  tile before waiting for the previous kernel (the weight-first tiles wait before their loop).
- prefill, more tokens: a GEMM tile [BLOCK_M tokens, BLOCK_N features of one group] iterates over
  the group's stored block-columns with `tl.dot`, the input tile gathered by column index. For
  groups of 64 or more features `prefill.py`'s kernel is a candidate too (x transposed once, so a
  kept block-column is B contiguous input rows, or read as it is; pointer or TMA loads; several
  kept blocks per pipelined step).
Column-index gathers carry contiguity hints (runs of B from multiples of B), so the input is read
with 16-byte loads and the prefill loop is software pipelined with cp.async like the weights.
Each launch shape (weight shape, block, group width, density in eighths, tokens, dtype) picks its
tile configuration on first use by timing every candidate as CUDA-graph replays of back-to-back
launches over weight copies larger than L2 (`_fastest`). A weight that carries a dense copy
(`BlockSparseWeight.dense`) also times dense cuBLAS on it (`DENSE`), so that launch shape runs
dense where dense is faster ("never slower than dense"; the copy's memory is the price, see
`linear.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import types

import torch
import torch.nn.functional as F

from spruce.errors import SpruceError
from spruce.kernels import prefill as grouped_prefill

BLOCK_SIZES = (16, 32, 64)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MAX_GROUP_FEATURES = 128  # widest tile of output features the prefill kernel keeps in registers
DECODE_MAX_TOKENS = 16


@dataclasses.dataclass
class BlockSparseWeight:
    """A weight [N, K] stored as groups of block-rows with their nonzero block-columns."""

    values: torch.Tensor  # [stored, group * block, block], the weight's dtype
    cols: torch.Tensor  # int32 [stored], block-column of each stored entry
    group_ptr: torch.Tensor  # int32 [N // (group * block) + 1]
    shape: tuple[int, int]
    block: int
    group: int
    nonzero_blocks: int  # B x B blocks with a nonzero entry (what the pattern keeps)
    uniform_count: int = -1  # stored block-columns of every group when all groups have the same, else -1
    dense: torch.Tensor | None = None  # optional dense [N, K] copy: then dense GEMM is a tuning candidate

    @property
    def group_features(self) -> int:
        return self.group * self.block

    @property
    def total_blocks(self) -> int:
        return (self.shape[0] // self.block) * (self.shape[1] // self.block)

    @property
    def block_sparsity(self) -> float:
        """Fraction of B x B blocks that are entirely zero."""
        return 1.0 - self.nonzero_blocks / self.total_blocks

    @property
    def stored_fraction(self) -> float:
        """Fraction of the dense weight's entries that are stored (zeros of kept groups included)."""
        return self.values.numel() / (self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.cols, self.group_ptr))

    def to(self, device=None, dtype=None) -> BlockSparseWeight:
        dense = None if self.dense is None else self.dense.to(device=device, dtype=dtype)
        return dataclasses.replace(self, values=self.values.to(device=device, dtype=dtype),
                                   cols=self.cols.to(device), group_ptr=self.group_ptr.to(device), dense=dense)

    def clone(self) -> BlockSparseWeight:
        return dataclasses.replace(self, values=self.values.clone(), cols=self.cols.clone(),
                                   group_ptr=self.group_ptr.clone(),
                                   dense=None if self.dense is None else self.dense.clone())

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block: int = 16, group: int | None = None) -> BlockSparseWeight:
        """Build the format from a dense [N, K] weight with zeros in place.

        group: block-rows per group; None picks the largest that stores no all-zero block.
        """
        check_blockable(tuple(weight.shape), block)
        n, k = weight.shape
        nbr, nbc = n // block, k // block
        blocks = weight.detach().reshape(nbr, block, nbc, block).permute(0, 2, 1, 3)  # [nbr, nbc, B, B]
        block_mask = blocks.ne(0).any(dim=3).any(dim=2)  # [nbr, nbc]
        nonzero = int(block_mask.sum())
        if group is None:
            group = _widest_exact_group(block_mask, block, nonzero)
        elif group < 1 or nbr % group or group * block > MAX_GROUP_FEATURES:
            raise SpruceError(
                f"group {group} must divide the {nbr} block-rows and keep group*block <= {MAX_GROUP_FEATURES}"
            )
        ngroups = nbr // group
        group_mask = block_mask.reshape(ngroups, group, nbc).any(dim=1)  # [ngroups, nbc]
        counts = group_mask.sum(dim=1)
        group_ptr = torch.zeros(ngroups + 1, dtype=torch.int32, device=weight.device)
        group_ptr[1:] = counts.cumsum(0)
        cols = group_mask.nonzero()[:, 1].to(torch.int32)  # row-major: by group, then ascending column
        # [ngroups, nbc, G*B, B] slices of W; keep the stored ones, contiguous per entry.
        slices = weight.detach().reshape(ngroups, group * block, nbc, block).permute(0, 2, 1, 3)
        values = slices[group_mask].contiguous()
        uniform = int(counts[0]) if ngroups and bool((counts == counts[0]).all()) else -1
        return cls(values, cols, group_ptr, (n, k), block, group, nonzero, uniform)

    def to_dense(self) -> torch.Tensor:
        """The dense [N, K] weight, zeros in place (exact inverse of `from_dense`)."""
        n, k = self.shape
        gb, b = self.group_features, self.block
        ngroups, nbc = n // gb, k // b
        counts = self.group_ptr.diff().long()
        group_ids = torch.repeat_interleave(torch.arange(ngroups, device=counts.device), counts)
        out = self.values.new_zeros(ngroups, nbc, gb, b)
        out[group_ids, self.cols.long()] = self.values
        return out.permute(0, 2, 1, 3).reshape(n, k)


def check_blockable(shape: tuple[int, ...], block: int) -> None:
    """Raise SpruceError unless a 2-D weight of this shape can be cut into block x block tiles."""
    if block not in BLOCK_SIZES:
        raise SpruceError(f"block size {block} is not supported; use one of {BLOCK_SIZES}")
    if len(shape) != 2:
        raise SpruceError(f"a block-sparse weight must be 2-D, got shape {tuple(shape)}")
    if shape[0] % block or shape[1] % block:
        raise SpruceError(f"shape {shape[0]}x{shape[1]} is not divisible by block {block}")


def _widest_exact_group(block_mask: torch.Tensor, block: int, nonzero: int) -> int:
    nbr, nbc = block_mask.shape
    group = MAX_GROUP_FEATURES // block
    while group > 1:
        if nbr % group == 0:
            stored = int(block_mask.reshape(nbr // group, group, nbc).any(dim=1).sum()) * group
            if stored == nonzero:
                return group
        group //= 2
    return 1


def reference_linear(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b computed in plain torch from the stored blocks, in x's dtype (any device).

    Groups are padded to the longest one with zero blocks so that one einsum does all of them.
    """
    n, k = weight.shape
    gb, b = weight.group_features, weight.block
    ngroups, nbc = n // gb, k // b
    counts = weight.group_ptr.diff().long()
    longest = int(counts.max()) if ngroups else 0
    group_ids = torch.repeat_interleave(torch.arange(ngroups, device=counts.device), counts)
    slot = torch.arange(weight.cols.numel(), device=counts.device) - weight.group_ptr[:-1].long()[group_ids]
    cols = torch.zeros(ngroups, longest, dtype=torch.long, device=counts.device)
    cols[group_ids, slot] = weight.cols.long()
    vals = weight.values.new_zeros(ngroups, longest, gb, b)
    vals[group_ids, slot] = weight.values
    lead = x.shape[:-1]
    xb = x.reshape(-1, nbc, b)[:, cols]  # [M, ngroups, longest, B]
    y = torch.einsum("mgcb,gcfb->mgf", xb, vals.to(x.dtype)).reshape(*lead, n)
    return y + bias if bias is not None else y


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def block_sparse_linear(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None = None,
                        share_input: bool = False, dense_routes: dict | None = None) -> torch.Tensor:
    """y = x W^T + b: Triton kernels on CUDA, the torch reference elsewhere. `share_input`: a
    prefill launch that runs on x transposed takes the transpose from, and leaves it in,
    `prefill.SHARED`, so the next layer on the same unchanged x does not transpose it again (the
    eager forward of BlockSparseLinear sets it; never inside a captured CUDA graph). `dense_routes`
    (BlockSparseLinear's) learns the token counts whose launch runs dense: {tokens: (tuning table,
    tuning key, id of the dense copy)}."""
    if x.shape[-1] != weight.shape[1]:
        raise SpruceError(f"input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    if x.device.type != "cuda":
        return reference_linear(x, weight, bias)
    if x.dtype not in KERNEL_DTYPES or weight.values.dtype != x.dtype:
        raise SpruceError(
            f"the block-sparse kernel runs bfloat16 or float16 with matching weight, got input {x.dtype} "
            f"and weight {weight.values.dtype}; load the model with torch_dtype=torch.bfloat16"
        )
    if not triton_available():
        _warn_no_triton()
        return reference_linear(x, weight, bias)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if not m:
        return x.new_empty(*lead, n)
    # The tuned configuration is looked up once here and handed down, so that a tuned launch builds
    # no candidate list: an eager prefill of a many-layer model is bound by this host work.
    kind = launch_kind(m)
    key = tuning_key(kind, weight, m, x.dtype)
    cfg = _tuned.get(key)
    if cfg == DENSE and weight.dense is not None:  # the tuner timed cuBLAS faster: run it as nn.Linear does
        if dense_routes is not None:
            dense_routes[m] = (_tuned, key, id(weight.dense))
        return F.linear(x, weight.dense, bias)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if kind == "decode":
        launch_decode(x2, weight, bias, y, cfg)
    elif (share_input and cfg is not None and grouped_prefill.transposes(cfg)
          and not torch.cuda.is_current_stream_capturing()):
        launch_prefill(x2, weight, bias, y, cfg, xt=grouped_prefill.SHARED.get(x, x2))
    else:
        launch_prefill(x2, weight, bias, y, cfg)
    return y.reshape(*lead, n)


# The same computation as a torch operator, for code that torch.compile traces: the op is opaque
# to the compiler (it runs the Triton kernels or the reference as above), and its fake version
# gives the output's shape, so a compiled graph keeps every block-sparse layer without a break.
# Defined with torch.library's low-level registration, not `custom_op`: custom_op wraps each call
# in Python autograd and aliasing checks that cost a prefill launch more host time than the
# launch itself (a compiled prefill of a many-layer model is bound by it). Inference only: the op
# has no backward.
_LIBRARY = torch.library.Library("spruce", "DEF")
_LIBRARY.define("block_sparse_linear(Tensor x, Tensor values, Tensor cols, Tensor group_ptr, Tensor? bias, int n, "
                "int k, int block, int group, int nonzero_blocks, int uniform_count, Tensor? dense=None) -> Tensor")


def _block_sparse_linear_impl(x, values, cols, group_ptr, bias, n, k, block, group, nonzero_blocks, uniform_count,
                              dense=None):
    weight = BlockSparseWeight(values, cols, group_ptr, (n, k), block, group, nonzero_blocks, uniform_count, dense)
    return block_sparse_linear(x, weight, bias)


_LIBRARY.impl("block_sparse_linear", _block_sparse_linear_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("spruce::block_sparse_linear")
def _(x, values, cols, group_ptr, bias, n, k, block, group, nonzero_blocks, uniform_count, dense=None):
    return x.new_empty(*x.shape[:-1], n)


block_sparse_linear_op = torch.ops.spruce.block_sparse_linear.default


@functools.cache
def _warn_no_triton() -> None:
    import warnings

    warnings.warn("triton is not installed: block-sparse layers run the slow torch reference on CUDA", stacklevel=3)


# ---------------------------------------------------------------- tile configurations and tuning

# Decode: (BLOCK_F, BLOCK_K, num_warps, num_stages, USE_DOT, SPLIT), USE_DOT False, True or SWAP
# (below); BLOCK_F is capped at the group's width. SPLIT > 1 cuts each group's stored columns into
# SPLIT ranges, one program each, so that a 4096-row weight still spreads over enough programs; the
# last program of a feature tile to finish sums the fp32 partials. The FMA and token-first loops
# load the next tile's weights and column indices before they reduce the current one, so one tile
# per program is always in flight.
# USE_DOT False: fp32 FMA per token (1-8 tokens), the weight tile converted once and reused.
# The last two (one 2048-input step) are 1-token candidates for the wide shapes; on the H200 they
# won 11008x4096 (4 features, 15.3 against 16.7 us) and 4096x11008 (8 features, 8 warps, 15.6
# against 16.1 us). (2, 2048, 4 warps) and (4, 1024, 8 warps) never won and are not listed.
DECODE_GEMV_CONFIGS = [(4, 1024, 4, 1, False, 1), (8, 512, 4, 1, False, 1), (8, 1024, 4, 1, False, 2),
                       (16, 512, 4, 1, False, 4), (16, 256, 4, 1, False, 8), (4, 2048, 4, 1, False, 1),
                       (8, 2048, 8, 1, False, 1)]
# USE_DOT True: a 16-token tl.dot (BLOCK_F >= 16), 2-16 tokens. The first five are the v4 list, whose
# widest tile (32 features, split 2) won every 8-16 token shape; the rest extend it around that
# winner: 32 features with split 1 and 4, K tiles of 128 and 512, 8 warps, and 64-feature tiles.
DECODE_DOT_CONFIGS = [(16, 256, 4, 3, True, 1), (16, 512, 4, 2, True, 2), (32, 256, 4, 3, True, 2),
                      (16, 256, 4, 3, True, 4), (16, 128, 4, 3, True, 8),
                      (32, 256, 4, 3, True, 1), (32, 256, 4, 3, True, 4), (32, 128, 4, 4, True, 2),
                      (32, 512, 8, 2, True, 2), (32, 256, 8, 3, True, 2),
                      (64, 256, 8, 3, True, 1), (64, 256, 8, 3, True, 2), (64, 128, 4, 3, True, 2),
                      (64, 128, 4, 3, True, 4)]
# USE_DOT SWAP: the same tl.dot with the operands swapped, weight tile first: [BLOCK_F features, BLOCK_K]
# @ [BLOCK_K, 16 tokens], so that on Hopper a 64-feature tile is one warpgroup's wgmma (M = 64, N =
# 16) reading both operands from shared memory, where the token-first dot (M = 16) is an mma.sync
# fed through registers. Its loop leaves the loads to the pipeliner: num_stages buffers of (BLOCK_F
# + 16) * BLOCK_K * 2 bytes (20 KiB at 64 x 128), filled by cp.async. Only for groups of 64+
# features; split 2-8 spreads a 4096-row weight (64 groups) over 128-512 programs. Compiled for
# sm_90 with Triton 3.6: 37-80 registers, no spill, 60-81 KiB of shared memory (two or three
# programs an SM).
SWAP = "swap"
DECODE_SWAP_CONFIGS = [(64, 128, 4, 4, SWAP, 1), (64, 128, 4, 4, SWAP, 2), (64, 128, 4, 4, SWAP, 4),
                       (64, 128, 4, 4, SWAP, 8), (64, 128, 4, 3, SWAP, 4), (64, 64, 4, 6, SWAP, 4),
                       (64, 64, 4, 6, SWAP, 8), (64, 256, 4, 2, SWAP, 4)]
SWAP_MIN_FEATURES = 64
GEMV_MAX_TOKENS = 8
GEMV_MULTI_CONFIGS = 2  # for 2-8 tokens only the first FMA configurations are candidates
DECODE_SPLIT_ROWS = 16  # partial rows per split in the fp32 workspace (= DECODE_MAX_TOKENS)
# Prefill: (BLOCK_M, BLOCK_K, num_warps, num_stages, SWAP). The group's width is the tile's N;
# SWAP puts the weight tile first (a 64- or 128-feature x 256-token wgmma instead of 256 x 64).
PREFILL_CONFIGS = [(256, 64, 8, 3, True), (256, 64, 8, 4, True), (128, 64, 4, 4, True), (128, 128, 8, 3, True),
                   (256, 64, 8, 3, False), (128, 64, 8, 3, False)]
PREFILL_MAX_ACC = 256 * 128  # accumulator elements of one program (8 warps: 128 fp32 registers a thread)

# The tuning key holds the stored fraction in eighths (rounded, at least 1/8): 75%-zero weights get
# their own configurations instead of those tuned on 50% ones, while layers of nearly equal density
# share one tuning.
DENSITY_STEPS = 8
TUNE_CALLS = 32  # back-to-back launches per timed graph replay
TUNE_REPLAYS = 3

# Prefill launches run outside CUDA graphs (an eager or compiled forward of the prompt), one after
# another as the host issues them: a launch costs the longer of its GPU time and its host time. On
# the H200 host a block-sparse prefill launch (transpose and kernel) takes 140-330 us to issue
# where cuBLAS takes 25-35, more than its GPU time at 1024 tokens, so a kernel the CUDA-graph timing
# finds faster made a compiled prefill slower than dense (docs/RESULTS.md, 2026-12-04). For these
# kinds the tuner's choice between the fastest tile and dense weighs both times.
HOST_BOUND_KINDS = ("prefill",)
HOST_CALLS = 16

# Dense as a candidate: where the weight carries a dense copy (`BlockSparseWeight.dense`), cuBLAS on
# it is timed next to the kernel tiles, so a launch shape runs dense where dense is faster. The
# tuning key then ends in "+dense" (weights without a copy tune among the kernel tiles alone).
DENSE = ("dense",)

_tuned: dict[tuple, tuple] = {}
_tune_ms: dict[tuple, dict] = {}
_workspaces: dict[tuple, tuple] = {}
_pdl: dict[int, bool] = {}


def _launch_tuned(key: tuple, candidates: list[tuple], launch, weight: BlockSparseWeight) -> None:
    """Launch with the fastest candidate for this key, found on first use by `_fastest`.

    While a CUDA graph is being captured nothing can be timed: an untuned key then takes the first
    candidate (always one without split partials) without remembering it.
    """
    cfg = _tuned.get(key)
    if cfg is None:
        if len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
            launch(candidates[0], weight)
            return
        try:
            cfg, times = _fastest(candidates, launch, weight)
        except Exception:
            if not any(_pdl.values()):
                raise
            disable_pdl()  # a driver or capture that refuses programmatic dependent launch
            cfg, times = _fastest(candidates, launch, weight)
        if key[0] in HOST_BOUND_KINDS and DENSE in candidates:
            cfg, times = _with_host_time(cfg, times, launch, weight)
        _tuned[key] = cfg
        _tune_ms[key] = times
    launch(cfg, weight)


def _with_host_time(best: tuple, times: dict, launch, weight: BlockSparseWeight) -> tuple[tuple, dict]:
    """Between the fastest kernel tile and dense cuBLAS, the one whose launch costs less when each
    costs the longer of its GPU time and the host time to issue it (HOST_BOUND_KINDS). The host
    times join `times` as "host <configuration>"."""
    if best == DENSE:
        return best, times
    host = {c: _host_us(c, launch, weight) for c in (best, DENSE)}
    times = {**times, **{f"host {c}": round(us, 2) for c, us in host.items()}}
    cost = {c: max(times[str(c)], host[c]) for c in (best, DENSE)}
    return (DENSE if cost[DENSE] < cost[best] else best), times


def _host_us(cfg: tuple, launch, weight: BlockSparseWeight) -> float:
    """Microseconds of host time to issue one launch of `cfg`: the best of TUNE_REPLAYS bursts of
    HOST_CALLS launches, none waiting for the GPU inside a burst."""
    best = float("inf")
    for _ in range(TUNE_REPLAYS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(HOST_CALLS):
            launch(cfg, weight)
        best = min(best, (time.perf_counter() - start) * 1e6 / HOST_CALLS)
    torch.cuda.synchronize()
    return best


def _rotation(weight: BlockSparseWeight) -> list[BlockSparseWeight]:
    """Copies of the weight that together exceed L2 three times, as each layer reads from HBM."""
    l2 = torch.cuda.get_device_properties(weight.values.device).L2_cache_size
    count = max(2, min(48, -(-3 * l2 // max(weight.nbytes, 1))))
    return [weight] + [weight.clone() for _ in range(count - 1)]


def _fastest(candidates: list[tuple], launch, weight: BlockSparseWeight) -> tuple[tuple, dict]:
    """Time every candidate as the bench does and return the fastest with all times (us per call).

    Each candidate is captured as a CUDA graph of TUNE_CALLS back-to-back launches cycling through
    copies of the weight larger than L2, and the graph is replayed: launch gaps and one-off noise
    do not count, every launch reads its weight from device memory.
    """
    copies = _rotation(weight)
    best, best_us, failure, times = None, float("inf"), None, {}
    for cfg in candidates:
        try:
            us = _time_candidate(cfg, launch, copies)
        except Exception as exc:  # noqa: BLE001 - a tile that does not fit this card's shared memory
            failure = exc
            if type(exc).__name__ != "OutOfResources":  # anything else is a fault, not a misfit: say so
                _warn_candidate_failed(str(cfg), f"{type(exc).__name__}: {exc}")
            continue
        times[str(cfg)] = round(us, 2)
        if us < best_us:
            best, best_us = cfg, us
    if best is None:
        raise failure
    return best, times


@functools.cache
def _warn_candidate_failed(cfg: str, error: str) -> None:
    import warnings

    warnings.warn(f"block-sparse tuning: configuration {cfg} failed and is skipped ({error[:200]}); the "
                  f"launch shape runs the fastest that worked", stacklevel=4)


def _time_candidate(cfg: tuple, launch, copies: list[BlockSparseWeight]) -> float:
    """Microseconds per call of one candidate: the best of TUNE_REPLAYS replays of a CUDA graph of
    back-to-back launches cycling through `copies` (see `_fastest`)."""
    calls = max(TUNE_CALLS, len(copies))
    for c in copies:  # compile, and warm every copy
        launch(cfg, c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            launch(cfg, copies[i % len(copies)])
    graph.replay()
    torch.cuda.synchronize()
    spans = []
    for _ in range(TUNE_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        spans.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return min(spans)


def dense_linear_into(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y = x dense^T (+ bias) through cuBLAS, as F.linear computes it (addmm with the bias)."""
    if bias is not None:
        torch.addmm(bias, x, dense.t(), out=y)
    else:
        torch.mm(x, dense.t(), out=y)


def _with_dense(candidates: list[tuple], launch, w: BlockSparseWeight, x, bias, y):
    """(candidates, launch) with dense cuBLAS added where the weight carries a dense copy."""
    if w.dense is None:
        return candidates, launch

    def either(c, weight):
        if c == DENSE:
            dense_linear_into(x, weight.dense, bias, y)
        else:
            launch(c, weight)

    return candidates + [DENSE], either


def runs_dense(kind: str, w: BlockSparseWeight, m: int, dtype: torch.dtype) -> bool | None:
    """Whether this launch shape runs dense cuBLAS (True), the kernel (False), or is not tuned yet (None)."""
    cfg = chosen_config(kind, w, m, dtype)
    return None if cfg is None else cfg == DENSE


def tuned_configs() -> dict:
    """The configuration chosen for each launch shape so far (for benchmark reports)."""
    return {"/".join(map(str, key)): cfg for key, cfg in _tuned.items()}


def tuning_times() -> dict:
    """Microseconds per call of every candidate timed so far, by launch shape."""
    return {"/".join(map(str, key)): times for key, times in _tune_ms.items()}


def density_bucket(w: BlockSparseWeight) -> str:
    """The weight's stored fraction rounded to DENSITY_STEPS-ths (at least one), as in tuning keys: "d0.25"."""
    steps = max(1, round(w.stored_fraction * DENSITY_STEPS))
    return f"d{steps / DENSITY_STEPS:g}"


def launch_kind(m: int) -> str:
    """The kernel family of an m-token launch: "decode" up to DECODE_MAX_TOKENS, else "prefill"."""
    return "decode" if m <= DECODE_MAX_TOKENS else "prefill"


def weight_key(w: BlockSparseWeight) -> tuple:
    """The weight's part of its tuning keys: shape, block, group width and density bucket."""
    return (*w.shape, w.block, w.group_features, density_bucket(w))


def tuning_key(kind: str, w: BlockSparseWeight, m: int, dtype: torch.dtype) -> tuple:
    """The launch shape one tuned configuration serves: kernel, weight shape, block, group width,
    density bucket, tokens (prefill: the next power of two) and dtype."""
    return _key(kind, weight_key(w), m, str(dtype), w.dense is not None)


def _key(kind: str, weight: tuple, m: int, dtype: str, dense: bool) -> tuple:
    tokens = m if kind == "decode" else 1 << (m - 1).bit_length()
    key = (kind, *weight, tokens, dtype)
    return (*key, "+dense") if dense else key


def _tokens_served(kind: str, tokens: int) -> tuple[int, int]:
    """The token counts m, as low < m <= high, whose launches share a key's `tokens` (`_key`: decode
    exactly, prefill up to the next power of two)."""
    return (tokens - 1, tokens) if kind == "decode" else (max(tokens // 2, DECODE_MAX_TOKENS), tokens)


@torch.compiler.assume_constant_result
def dense_token_ranges(weight: tuple, dtype: str) -> tuple[tuple[int, int], ...]:
    """The token counts m (as ranges low < m <= high) at which the tuner timed dense cuBLAS fastest
    for a weight with its dense copy (`weight` its weight_key). Constant arguments only, so that a
    graph being compiled reads it once, at that moment, whatever its shapes are."""
    return tuple(sorted(_tokens_served(key[0], key[-3]) for key, cfg in _tuned.items()
                        if cfg == DENSE and key[-1] == "+dense" and key[1:-3] == weight and key[-2] == dtype))


def chosen_config(kind: str, w: BlockSparseWeight, m: int, dtype: torch.dtype) -> tuple | None:
    """The configuration tuned for this launch shape, None before its first launch."""
    return _tuned.get(tuning_key(kind, w, m, dtype))


def decode_candidates(w: BlockSparseWeight, m: int) -> list[tuple]:
    """Decode configurations for m tokens; the first never uses split partials."""
    gemv = DECODE_GEMV_CONFIGS if m == 1 else DECODE_GEMV_CONFIGS[:GEMV_MULTI_CONFIGS]
    swap = DECODE_SWAP_CONFIGS if w.group_features >= SWAP_MIN_FEATURES else []
    configs = (gemv if m <= GEMV_MAX_TOKENS else []) + (DECODE_DOT_CONFIGS + swap if m > 1 else [])
    configs = sorted(configs, key=lambda c: c[5] > 1)  # stable: split-free ones first
    return list(dict.fromkeys((min(c[0], w.group_features), *c[1:]) for c in configs))


def prefill_candidates(w: BlockSparseWeight) -> list[tuple]:
    """This module's prefill tiles, then (groups of 64+ features) those of `prefill.py`, tagged."""
    return [c for c in PREFILL_CONFIGS if c[0] * w.group_features <= PREFILL_MAX_ACC
            and (c[2] == 8 or c[0] * w.group_features <= 256 * 64)] + grouped_prefill.candidates(w)


def _common_args(w: BlockSparseWeight, bias, y):
    uniform = w.uniform_count >= 0
    flags = {"HAS_BIAS": bias is not None, "B": w.block, "GB": w.group_features, "UNIFORM": uniform}
    return flags, (bias if bias is not None else y), max(w.uniform_count, 0)


def _workspace(device: torch.device, n: int, split: int, block_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial sums [split, 16, n] and per-feature-tile arrival counters (zero between launches)."""
    key = (str(device), n, split, block_f)
    ws = _workspaces.get(key)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise SpruceError("a split decode configuration needs its workspace made before graph capture")
        ws = (torch.empty(split * DECODE_SPLIT_ROWS * n, dtype=torch.float32, device=device),
              torch.zeros(n // block_f, dtype=torch.int32, device=device))
        _workspaces[key] = ws
    return ws


def pdl_enabled(device: torch.device) -> bool:
    """Whether decode launches use programmatic dependent launch (Hopper and newer, SPRUCE_PDL != 0).

    With it a decode launch starts while the previous kernel finishes and loads its first weight
    tile (weights never depend on earlier kernels) before it waits for that kernel's output.
    """
    import os

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _pdl:
        _pdl[index] = (os.environ.get("SPRUCE_PDL", "1") != "0"
                       and torch.cuda.get_device_capability(index)[0] >= 9)
    return _pdl[index]


def disable_pdl() -> None:
    for index in range(torch.cuda.device_count()):
        _pdl[index] = False


def set_pdl(enabled: bool | None) -> None:
    """Turn programmatic dependent launch on or off for later decode launches (on takes effect only
    on Hopper and newer); None goes back to the default, SPRUCE_PDL. Tuned configurations are kept,
    so a comparison of the two states runs the same tiles."""
    _pdl.clear()
    if enabled is None:
        return
    for index in range(torch.cuda.device_count()):
        _pdl[index] = enabled and torch.cuda.get_device_capability(index)[0] >= 9


def launch_decode(x: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None, y: torch.Tensor, cfg=None) -> None:
    """y[M, N] = x[M, K] W^T (+ bias) for M <= 16; `cfg` forces one configuration."""
    m = x.shape[0]
    n = w.shape[0]
    kernel = _kernels().decode
    flags, bias_arg, count = _common_args(w, bias, y)

    def launch(c, weight):
        block_f, block_k, warps, stages, use_dot, split = c
        pdl = x.device.type == "cuda" and pdl_enabled(x.device)
        block_m = DECODE_MAX_TOKENS if use_dot else 1 << (m - 1).bit_length()
        part, lock = _workspace(x.device, n, split, block_f) if split > 1 else (y, y)
        kernel[(n // block_f, split)](
            x, weight.values, weight.cols, weight.group_ptr, bias_arg, y, part, lock, m, n, count,
            x.stride(0), y.stride(0), **flags, BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_K=block_k,
            USE_DOT=bool(use_dot), SWAP=use_dot == SWAP, SPLIT=split, PDL=pdl, num_warps=warps, num_stages=stages,
            **({"launch_pdl": True} if pdl else {}),
        )

    _launch_config(cfg, "decode", lambda: decode_candidates(w, m), launch, w, x, bias, y)


def launch_prefill(x: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None, y: torch.Tensor, cfg=None,
                   xt: torch.Tensor | None = None) -> None:
    """y[M, N] = x[M, K] W^T (+ bias) as a tiled GEMM; `cfg` forces one configuration. `xt` (x made
    by `prefill.transpose_padded`, only with `cfg`) serves a configuration that reads x transposed."""
    if xt is not None and cfg is None:
        raise SpruceError("launch_prefill takes a ready transpose (xt) only with a forced configuration")
    m = x.shape[0]
    kernel = _kernels().prefill
    flags, bias_arg, count = _common_args(w, bias, y)

    def launch(c, weight):
        if isinstance(c[0], str):  # a tagged configuration: prefill.py's kernel
            grouped_prefill.launch(x, weight, bias, y, c, xt=xt)
            return
        block_m, block_k, warps, stages, swap = c
        kernel[(triton_cdiv(m, block_m), weight.shape[0] // weight.group_features)](
            x, weight.values, weight.cols, weight.group_ptr, bias_arg, y, m, count, x.stride(0), y.stride(0),
            **flags, BLOCK_M=block_m, BLOCK_K=max(block_k, weight.block), SWAP=swap, num_warps=warps,
            num_stages=stages,
        )

    _launch_config(cfg, "prefill", lambda: prefill_candidates(w), launch, w, x, bias, y)


def _launch_config(cfg: tuple | None, kind: str, candidates, launch, w: BlockSparseWeight, x, bias, y) -> None:
    """Run configuration `cfg` (DENSE: cuBLAS on the weight's dense copy); None: the one tuned for
    this launch shape, found by timing `candidates()` (a function, so a tuned launch builds no list)."""
    key = None
    if cfg is None:
        key = tuning_key(kind, w, x.shape[0], x.dtype)
        cfg = _tuned.get(key)
    if cfg == DENSE:
        dense_linear_into(x, w.dense, bias, y)
    elif cfg is not None:
        launch(cfg, w)
    else:
        listed, either = _with_dense(candidates(), launch, w, x, bias, y)
        _launch_tuned(key, listed, either, w)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- Triton kernels


@functools.cache
def _kernels():
    """Define the Triton kernels on first use, so that importing spruce never needs triton."""
    import triton
    import triton.language as tl

    # M and count vary call to call: no specialisation on their values, one binary serves all.
    @triton.jit(do_not_specialize=["M", "count"])
    def decode(x_ptr, vals_ptr, cols_ptr, gptr_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr, M, N, count,
               stride_xm, stride_ym,
               HAS_BIAS: tl.constexpr, B: tl.constexpr, GB: tl.constexpr, UNIFORM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
               SWAP: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
        # One program: BLOCK_F consecutive output features, all inside one group, over one of the
        # SPLIT ranges of the group's stored columns.
        pid_f = tl.program_id(0)
        pid_s = tl.program_id(1)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        f0 = pid_f * BLOCK_F
        g = f0 // GB
        if UNIFORM:  # no load: the weight stream starts without waiting on one
            start = g * count
            width = count * B  # compact input columns of the group
        else:
            start = tl.load(gptr_ptr + g)
            width = (tl.load(gptr_ptr + g + 1) - start) * B
        per = tl.cdiv(tl.cdiv(width, BLOCK_K), SPLIT) * BLOCK_K
        lo = pid_s * per
        hi = lo + per
        if hi > width:  # noqa: PLR1730 - a plain branch, which the interpreter also runs
            hi = width
        offs_f = tl.arange(0, BLOCK_F)
        offs_t = tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, BLOCK_M)
        w_rows = vals_ptr + start.to(tl.int64) * (GB * B) + ((f0 - g * GB + offs_f) * B)[:, None]
        if SWAP:
            # Loads in the loop, so that the pipeliner gives both operands num_stages buffers in
            # shared memory (cp.async), where the wgmma reads them; the column indices one step
            # ahead, in registers (an address from a load of the same step would split the stages).
            t = lo + offs_t
            xk = tl.load(cols_ptr + start + t // B, mask=t < hi, other=0) * B + t % B
            if PDL:
                tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
            acc = tl.zeros([BLOCK_F, BLOCK_M], dtype=tl.float32)  # features x tokens
            for t0 in range(lo, hi, BLOCK_K):
                t = t0 + offs_t
                inside = t < hi
                w_off = tl.max_contiguous(tl.multiple_of((t // B) * (GB * B) + t % B, B), B)
                w = tl.load(w_rows + w_off[None, :], mask=inside[None, :], other=0.0)
                xk = tl.max_contiguous(tl.multiple_of(xk, B), B)
                xv = tl.load(x_ptr + offs_m[None, :] * stride_xm + xk[:, None],
                             mask=(offs_m[None, :] < M) & inside[:, None], other=0.0)
                t = t + BLOCK_K
                xk = tl.load(cols_ptr + start + t // B, mask=t < hi, other=0) * B + t % B
                acc = tl.dot(w, xv, acc)
            acc = tl.trans(acc)
        else:
            # The first tile's weights and column indices: nothing an earlier kernel writes.
            t = lo + offs_t
            inside = t < hi
            # Runs of B consecutive offsets start at multiples of B: the hints let the compiler issue
            # 16-byte loads (and cp.async pipelining) for the gathered input as for the weights.
            w_off = tl.max_contiguous(tl.multiple_of((t // B) * (GB * B) + t % B, B), B)
            w = tl.load(w_rows + w_off[None, :], mask=inside[None, :], other=0.0)
            xk = tl.load(cols_ptr + start + t // B, mask=inside, other=0) * B + t % B
            xk = tl.max_contiguous(tl.multiple_of(xk, B), B)
            if PDL:
                tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
            acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
            for t0 in range(lo, hi, BLOCK_K):
                if USE_DOT:
                    xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :],
                                 mask=(offs_m[:, None] < M) & inside[None, :], other=0.0)
                # the next tile, in flight while this one is reduced
                t = t0 + BLOCK_K + offs_t
                inside = t < hi
                w_off = tl.max_contiguous(tl.multiple_of((t // B) * (GB * B) + t % B, B), B)
                w_next = tl.load(w_rows + w_off[None, :], mask=inside[None, :], other=0.0)
                xk_next = tl.load(cols_ptr + start + t // B, mask=inside, other=0) * B + t % B
                xk_next = tl.max_contiguous(tl.multiple_of(xk_next, B), B)
                if USE_DOT:
                    acc = tl.dot(xv, tl.trans(w), acc)
                else:  # the weight tile is converted once and reused for every token
                    wf = w.to(tl.float32)
                    for m in tl.static_range(BLOCK_M):
                        # rows past M reread row M-1 (valid memory); their sums are never stored.
                        # Masked weight entries are zero, so x needs no mask (index 0 is valid).
                        xv = tl.load(x_ptr + tl.minimum(M - 1, m) * stride_xm + xk)
                        part = tl.sum(wf * xv.to(tl.float32)[None, :], axis=1)
                        acc = tl.where(offs_m[:, None] == m, acc + part[None, :], acc)
                w = w_next
                xk = xk_next
        offs_n = f0 + offs_f
        in_m = offs_m[:, None] < M
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=in_m)
        else:
            parts = part_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(parts + pid_s * (BLOCK_M * N), acc, mask=in_m)
            tl.debug_barrier()  # every thread's partial is written before the arrival is counted
            arrived = tl.atomic_add(lock_ptr + pid_f, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:  # the last of this feature tile's programs sums the partials
                total = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
                for s in tl.static_range(SPLIT):
                    total += tl.load(parts + s * (BLOCK_M * N), mask=in_m, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(lock_ptr + pid_f, 0)  # ready for the next launch
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=in_m)

    @triton.jit(do_not_specialize=["M", "count"])
    def prefill(x_ptr, vals_ptr, cols_ptr, gptr_ptr, bias_ptr, y_ptr, M, count, stride_xm, stride_ym,
                HAS_BIAS: tl.constexpr, B: tl.constexpr, GB: tl.constexpr, UNIFORM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr):
        # One program: BLOCK_M tokens x one whole group of GB output features.
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
        if UNIFORM:  # no load: the weight stream starts without waiting on one
            start = g * count
            width = count * B
        else:
            start = tl.load(gptr_ptr + g)
            width = (tl.load(gptr_ptr + g + 1) - start) * B
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_f = tl.arange(0, GB)
        offs_t = tl.arange(0, BLOCK_K)
        in_m = offs_m < M
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        w_rows = vals_ptr + start.to(tl.int64) * (GB * B) + (offs_f * B)[:, None]
        if SWAP:
            acc = tl.zeros([GB, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, GB], dtype=tl.float32)
        for t0 in range(0, width, BLOCK_K):
            t = t0 + offs_t
            inside = t < width
            entry = t // B
            # runs of B consecutive offsets start at multiples of B: 16-byte loads, cp.async pipelining
            w_off = tl.max_contiguous(tl.multiple_of(entry * (GB * B) + t % B, B), B)
            w = tl.load(w_rows + w_off[None, :], mask=inside[None, :], other=0.0)
            xk = tl.load(cols_ptr + start + entry, mask=inside, other=0) * B + t % B
            xk = tl.max_contiguous(tl.multiple_of(xk, B), B)
            xv = tl.load(x_rows + xk[None, :], mask=in_m[:, None] & inside[None, :], other=0.0)
            if SWAP:
                acc = tl.dot(w, tl.trans(xv), acc)
            else:
                acc = tl.dot(xv, tl.trans(w), acc)
        offs_n = g * GB + offs_f
        if SWAP:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n).to(tl.float32)[:, None]
            tl.store(y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None],
                     acc.to(y_ptr.dtype.element_ty), mask=in_m[None, :])
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None])

    return types.SimpleNamespace(decode=decode, prefill=prefill)
