"""What the benchmarks share: model shapes, GPU timing, ceilings, the environment, JSON output,
and random block masks."""

from __future__ import annotations

import datetime
import math
import os
import platform

import torch

from spruce.errors import SpruceError
from spruce.outdir import write_json as _write_json
from spruce.prune.patterns import expand_tiles

LLAMA2_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in) of the decoder linears
LAYOUTS = ("grouped", "grouped128", "independent")
# "grouped": 64 output features (4 block-rows of 16) share their block-columns; "grouped128": 128.
LAYOUT_GROUP_FEATURES = {"grouped": 64, "grouped128": 128, "independent": 0}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Programmatic dependent launch in the benches: "on" / "off" for every sparse launch, "both" to time
# the sparse cases with it on and again with it off (same tuned tiles). Unset: as SPRUCE_PDL says.
PDL_CHOICES = ("on", "off", "both")


def llama2_7b_config(num_layers: int = 32, **overrides):
    """A Llama-2-7B-shaped config (hidden 4096, MLP 11008, 32 heads, vocab 32000); `overrides`
    change any field, e.g. a tiny model for a quick check."""
    from transformers import LlamaConfig

    fields = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    return LlamaConfig(**{**fields, **overrides})


def random_llama(num_layers: int, dtype: torch.dtype, device: str, **overrides):
    """A Llama-2-7B-shaped model (llama2_7b_config) with random weights, built directly in `dtype`
    on `device` (no download, no float32 copy), in eval mode; the caller seeds torch."""
    from transformers import LlamaForCausalLM

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama2_7b_config(num_layers, **overrides))
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def random_block_mask(n: int, k: int, block: int, sparsity: float, layout: str = "independent",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """A row-balanced random block mask [n // block, k // block] (True = kept block).

    Every block-row keeps the same number of block-columns. "independent": each block-row draws
    its own; "grouped" / "grouped128": the block-rows of each 64- / 128-feature group share one draw.
    """
    if layout not in LAYOUTS:
        raise SpruceError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    nbr, nbc = n // block, k // block
    rows_per_draw = max(1, LAYOUT_GROUP_FEATURES[layout] // block)
    if nbr % rows_per_draw:
        rows_per_draw = 1
    keep = max(1, round((1.0 - sparsity) * nbc))
    scores = torch.rand(nbr // rows_per_draw, nbc, generator=generator)
    mask = torch.zeros(nbr // rows_per_draw, nbc, dtype=torch.bool)
    mask.scatter_(1, scores.topk(keep, dim=1).indices, True)
    return mask.repeat_interleave(rows_per_draw, dim=0)


def expand_block_mask(block_mask: torch.Tensor, block: int) -> torch.Tensor:
    """(n/block, k/block) block mask -> (n, k) weight mask."""
    return expand_tiles(block_mask, block, block)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude of every 4 consecutive inputs (the pattern 2:4 kernels need)."""
    from spruce.prune.patterns import nm_mask

    return weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SpruceError("benchmarks need a CUDA GPU; none is visible to torch")
    from spruce.kernels.bsr import triton_available

    if not triton_available():
        raise SpruceError("benchmarks need triton (pip install triton) for the block-sparse kernels")


def median_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of `fn` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_time_us(calls: list, calls_per_replay: int = 64, replays: int = 15) -> float:
    """Median microseconds per call, from CUDA-graph replays that cycle through `calls`.

    Each call works on its own copy of the data, and the copies together exceed L2, so every call
    reads its weight from device memory as in generation; the graph removes launch gaps.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and kernel tuning) outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    sequence = [calls[i % len(calls)] for i in range(max(calls_per_replay, len(calls)))]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    ms = median_ms(graph.replay, reps=replays, warmup=2)
    del graph
    return ms * 1e3 / len(sequence)


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s on this card."""
    n = 1 << 29  # 1 GiB of bf16 per buffer
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = median_ms(lambda: a @ b)
    return {
        "copy_bytes_per_s": 2 * n * 2 / (copy_ms / 1e3),
        "matmul_flop_per_s": 2 * 8192**3 / (mm_ms / 1e3),
    }


def copies_for(nbytes: int) -> int:
    """How many copies of a weight make the rotation exceed L2 three times over."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(64, math.ceil(3 * l2 / max(nbytes, 1))))


def environment() -> dict:
    import transformers

    from spruce.kernels.bsr import triton_available

    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _pdl_choice(pdl: str | None) -> str | None:
    """The bench's PDL setting: the argument, else SPRUCE_BENCH_PDL, else None (SPRUCE_PDL decides)."""
    pdl = pdl or os.environ.get("SPRUCE_BENCH_PDL") or None
    if pdl is not None and pdl not in PDL_CHOICES:
        raise SpruceError(f"pdl must be one of {PDL_CHOICES}, got {pdl!r}")
    return pdl


def write_json(path: str, report: dict, quiet: bool = False) -> None:
    """Write a benchmark's rows and environment (atomically: an interrupted run keeps the last whole file)."""
    _write_json(path, report, indent=1)
    if not quiet:
        print(f"wrote {path}")


def cli_main(add_arguments, run, doc: str, argv: list[str] | None = None) -> int:
    """`python -m bench.NAME`: parse the module's flags, run, one line on stderr for a user error."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except SpruceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
