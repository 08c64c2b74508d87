"""python -m bench.kernels --json runs/bench/kernels.json

y = x W^T at Llama-2-7B shapes: dense cuBLAS against the block-sparse kernels (and torch's 2:4
semi-structured path), measured in the same run. Every case's bytes and FLOPs are set against the
card's ceilings measured in the same run (a large device copy, a large bf16 matmul), so the
distance to the limit is visible; prints a table of ratios and can write JSON. The same as
`spruce bench kernels`; `--help` lists the flags.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from spruce.errors import SpruceError

from .common import (DTYPES, LAYOUT_GROUP_FEATURES, LAYOUTS, LLAMA2_7B_SHAPES, _pdl_choice, cli_main, copies_for,
                     environment, expand_block_mask, graph_time_us, measure_ceilings, prune_2_4, random_block_mask,
                     require_cuda, write_json)

BASELINES = ("v4",)


def add_arguments(b) -> None:
    """The flags of `spruce bench kernels` and `python -m bench.kernels`."""
    b.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="weight shapes OUTxIN")
    b.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 16, 2048],
                   help="rows of x: <= 16 runs the decode kernel, more the prefill kernel")
    b.add_argument("--blocks", nargs="+", type=int, default=[16, 32], help="block sizes (16, 32, 64)")
    b.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75], help="fractions of zero blocks")
    b.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["grouped", "independent"],
                   help="grouped / grouped128: 64- / 128-feature groups of block-rows share columns; "
                        "independent: each its own")
    b.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    b.add_argument("--no-semi-structured", action="store_true", help="skip torch's 2:4 path")
    b.add_argument("--json", help="write rows, ceilings and environment to this file")


def run(args) -> None:
    bench_kernels(shapes=args.shapes, tokens=args.tokens, blocks=args.blocks, sparsities=args.sparsities,
                  layouts=args.layouts, dtype=args.dtype, semi_structured=not args.no_semi_structured,
                  json_path=args.json)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _baseline_choice(baseline: str | None) -> str | None:
    baseline = baseline or os.environ.get("SPRUCE_BENCH_BASELINE") or None
    if baseline is not None and baseline not in BASELINES:
        raise SpruceError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    return baseline


def v4_config(weight, m: int) -> tuple:
    """The configuration the v4 tuner chose in run 4 (H200) at the Llama-2-7B shapes with grouped
    layouts: keyed without density, it was tuned on the 50% weights and reused for 75%."""
    if m == 1:
        return (4, 1024, 4, 1, False, 1)
    if m <= 16:
        return (min(32, weight.group_features), 256, 4, 3, True, 2)
    if weight.block == 32 and weight.group_features == 128:
        return (128, 64, 8, 3, False)
    return (256, 64, 8, 3, True)


def _forced(launch, cfg, m: int, n: int, dtype):
    """fn(x, weight) running one fixed configuration into a reused output."""
    y = torch.empty(m, n, dtype=dtype, device="cuda")
    return lambda x, w: launch(x, w, None, y, cfg)


def _rotating_calls(fn, weights: list, inputs: list) -> list:
    """fn(input, weight) over every copy, the shorter list cycled, each call on its own data."""
    count = max(len(weights), len(inputs))
    return [functools.partial(fn, inputs[i % len(inputs)], weights[i % len(weights)]) for i in range(count)]


def _parse_shapes(shapes) -> list[tuple[int, int]]:
    parsed = []
    for shape in shapes:
        if isinstance(shape, str):
            try:
                n, k = (int(v) for v in shape.lower().split("x"))
            except ValueError:
                raise SpruceError(f"shape {shape!r} must be OUTxIN, for example 4096x11008") from None
            shape = (n, k)
        parsed.append(tuple(shape))
    return parsed


def bench_kernels(shapes=LLAMA2_7B_SHAPES, tokens=(1, 8, 16, 2048), blocks=(16, 32), sparsities=(0.5, 0.75),
                  layouts=LAYOUTS, dtype: str = "bfloat16", semi_structured: bool = True,
                  json_path: str | None = None, seed: int = 0, pdl: str | None = None,
                  baseline: str | None = None) -> list[dict]:
    """Time y = x W^T, dense cuBLAS against block-sparse, for every shape, token count and pattern.

    shapes: (out, in) pairs or "OUTxIN" strings. tokens: rows of x (<= 16 runs the decode kernel,
    more the prefill kernel). blocks: block sizes (16, 32, 64). sparsities: fractions of zero
    blocks. layouts: "grouped" (64-feature groups of block-rows share their columns) and/or
    "independent" (each block-row its own). dtype: "bfloat16" or "float16". semi_structured: also
    time torch's 2:4 path. json_path: where to write rows and environment. Every sparse output is
    checked against float64 math on the masked weight (rel_err). Every sparse row names the tuned
    configuration it ran (config). pdl (else the environment's SPRUCE_BENCH_PDL): "on" / "off"
    sets programmatic dependent launch for all sparse launches; "both" times the decode rows again
    with it off, same configuration (us_pdl_off); unset, SPRUCE_PDL decides. baseline (else
    SPRUCE_BENCH_BASELINE): "v4" also times, where it differs from the tuned one, the configuration
    v4 ran in run 4 (`v4_config`; us_v4). Returns the rows.
    """
    from spruce.kernels.bsr import set_pdl

    require_cuda()
    pdl = _pdl_choice(pdl)
    baseline = _baseline_choice(baseline)
    if pdl is not None:
        set_pdl(pdl != "off")
    if dtype not in DTYPES:
        raise SpruceError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    shapes = _parse_shapes(shapes)
    for b in blocks:
        for n, k in shapes:
            if n % b or k % b:
                raise SpruceError(f"shape {n}x{k} is not divisible by block {b}")
    gen = torch.Generator().manual_seed(seed)
    bench = _KernelBench(measure_ceilings(), DTYPES[dtype], gen, pdl, baseline)
    for n, k in shapes:
        bench.shape(n, k, tokens, blocks, sparsities, layouts, semi_structured)
        print(format_kernel_table([r for r in bench.rows if r["shape"] == f"{n}x{k}"], bench.ceilings), flush=True)
        if json_path:  # after every shape, so that an interrupted run keeps what it measured
            write_json(json_path, bench.report(), quiet=True)

    if pdl is not None:
        set_pdl(None)
    print(format_kernel_table(bench.rows, bench.ceilings))
    if json_path:
        write_json(json_path, bench.report())
    return bench.rows


@dataclass
class _KernelBench:
    """The cases of bench_kernels for one dtype, timed shape by shape into `rows`."""
    ceilings: dict
    dtype: torch.dtype
    gen: torch.Generator
    pdl: str | None
    baseline: str | None
    rows: list = field(default_factory=list)

    @property
    def esize(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    def row(self, n, k, m, kernel, us, nbytes, flops, **extra) -> None:
        floor_us = max(nbytes / self.ceilings["copy_bytes_per_s"], flops / self.ceilings["matmul_flop_per_s"]) * 1e6
        self.rows.append({"shape": f"{n}x{k}", "out": n, "in": k, "tokens": m, "kernel": kernel, "us": us,
                          "bytes": nbytes, "flops": flops, "GB_per_s": nbytes / us / 1e3,
                          "TFLOP_per_s": flops / us / 1e6, "floor_us": floor_us, "pct_of_floor": floor_us / us,
                          **extra})

    def report(self) -> dict:
        from spruce.kernels.bsr import pdl_enabled, tuned_configs, tuning_times

        return {"environment": environment(), "ceilings": self.ceilings, "tuned": tuned_configs(),
                "tuning_us": tuning_times(), "pdl": pdl_enabled(torch.device("cuda")), "pdl_setting": self.pdl,
                "baseline": self.baseline, "rows": self.rows}

    def shape(self, n, k, tokens, blocks, sparsities, layouts, semi_structured: bool) -> None:
        """Every token count, block size, sparsity and layout of one weight shape."""
        weight = (torch.randn(n, k, generator=self.gen) * 0.02).to("cuda", self.dtype)
        dense = [weight] + [weight.clone() for _ in range(copies_for(weight.numel() * self.esize) - 1)]
        variants = self._variants(weight, n, k, blocks, sparsities, layouts)
        semi_copies, pruned24 = self._semi_structured(weight, n, k) if semi_structured else (None, None)
        for m in tokens:
            x_bytes = m * k * self.esize
            xs = [torch.randn(m, k, generator=self.gen).to("cuda", self.dtype) for _ in range(copies_for(x_bytes))]
            io_bytes = x_bytes + m * n * self.esize

            dense_us = graph_time_us(_rotating_calls(F.linear, dense, xs))
            self.row(n, k, m, "dense cuBLAS", dense_us, n * k * self.esize + io_bytes, 2 * m * n * k, speedup=1.0)
            for variant in variants:
                self._time_sparse(n, k, m, xs, io_bytes, dense_us, *variant)
            if semi_copies is not None:
                self._time_semi_structured(n, k, m, xs, io_bytes, dense_us, semi_copies, pruned24)
        del dense, variants
        torch.cuda.empty_cache()

    def _variants(self, weight, n, k, blocks, sparsities, layouts) -> list[tuple]:
        """(name, block, sparsity, layout, masked weight, rotating copies) of every block-sparse case."""
        from spruce.kernels.bsr import BlockSparseWeight

        variants = []
        for b in blocks:
            for s in sparsities:
                for layout in layouts:
                    if 0 < LAYOUT_GROUP_FEATURES[layout] <= b:
                        continue  # a block this wide is already such a group
                    mask = expand_block_mask(random_block_mask(n, k, b, s, layout, self.gen), b).to("cuda")
                    masked = weight * mask
                    sparse = BlockSparseWeight.from_dense(masked, b)
                    copies = [sparse] + [sparse.clone() for _ in range(copies_for(sparse.nbytes) - 1)]
                    variants.append((f"bsr b{b} {s:.0%} {layout}", b, s, layout, masked, copies))
        return variants

    def _semi_structured(self, weight, n, k):
        """(rotating copies of the 2:4 weight on torch's path or None where it cannot run, the 2:4 weight)."""
        from torch.sparse import to_sparse_semi_structured

        pruned24 = prune_2_4(weight)
        try:
            return [to_sparse_semi_structured(pruned24.clone())
                    for _ in range(copies_for(n * k * self.esize // 2))], pruned24
        except Exception as exc:  # noqa: BLE001 - the 2:4 path is torch's; report why it could not run
            self.rows.append({"shape": f"{n}x{k}", "tokens": 0, "kernel": "2:4 torch",
                              "error": f"{type(exc).__name__}: {exc}"})
            return None, pruned24

    def _time_sparse(self, n, k, m, xs, io_bytes, dense_us, name, b, s, layout, masked, copies) -> None:
        from spruce.kernels.bsr import block_sparse_linear, chosen_config, launch_decode, launch_prefill, set_pdl

        x = torch.randn(m, k, generator=self.gen).to("cuda", self.dtype)
        y = torch.full((m, n), float("nan"), dtype=self.dtype, device="cuda")
        kind, launch = ("decode", launch_decode) if m <= 16 else ("prefill", launch_prefill)
        launch(x, copies[0], None, y)
        err = _rel_err(y, F.linear(x.double(), masked.double()))
        us = graph_time_us(_rotating_calls(block_sparse_linear, copies, xs))
        sp = copies[0]
        cfg = chosen_config(kind, sp, m, self.dtype)
        extra = {"config": str(cfg)}
        if self.pdl == "both" and kind == "decode":  # the same tiles without PDL
            set_pdl(False)
            extra["us_pdl_off"] = graph_time_us(_rotating_calls(block_sparse_linear, copies, xs))
            set_pdl(True)
        if self.baseline == "v4" and layout != "independent" and cfg is not None:
            v4 = v4_config(sp, m)
            extra["v4_config"] = str(v4)
            extra["us_v4"] = us if v4 == cfg else graph_time_us(
                _rotating_calls(_forced(launch, v4, m, n, self.dtype), copies, xs))
        self.row(n, k, m, name, us, sp.nbytes + io_bytes, 2 * m * n * k * sp.stored_fraction,
                 speedup=dense_us / us, block=b, sparsity=s, layout=layout, group=sp.group, rel_err=err, **extra)

    def _time_semi_structured(self, n, k, m, xs, io_bytes, dense_us, semi_copies, pruned24) -> None:
        try:
            x = torch.randn(m, k, generator=self.gen).to("cuda", self.dtype)
            err = _rel_err(F.linear(x, semi_copies[0]), F.linear(x.double(), pruned24.double()))
            us = graph_time_us(_rotating_calls(F.linear, semi_copies, xs))
        except Exception as exc:  # noqa: BLE001 - torch's 2:4 path has its own limits; report them
            self.rows.append({"shape": f"{n}x{k}", "tokens": m, "kernel": "2:4 torch",
                              "error": f"{type(exc).__name__}: {exc}"})
            return
        # values plus 4 bits of metadata per 4 inputs
        self.row(n, k, m, "2:4 torch", us, n * k * self.esize // 2 + n * k // 8 + io_bytes, m * n * k,
                 speedup=dense_us / us, sparsity=0.5, rel_err=err)


def format_kernel_table(rows: list[dict], ceilings: dict) -> str:
    """The rows as a table; "v4 us" / "no-PDL us" columns appear when some row has them, and the
    last column is the tuned configuration (decode: features, inputs per tile, warps, stages,
    tl.dot, split; prefill: tokens, K step, warps, stages, swapped)."""
    v4 = any("us_v4" in r for r in rows)
    off = any("us_pdl_off" in r for r in rows)
    lines = [(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 matmul {ceilings['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s"),
             (f"{'shape':>11} {'tokens':>6} {'kernel':<28} {'us':>9} {'x dense':>8} {'GB/s':>7} "
              f"{'TFLOP/s':>8} {'%floor':>6} {'rel err':>8}" + (f" {'v4 us':>7}" if v4 else "")
              + (f" {'no-PDL':>7}" if off else "") + "  config")]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:>11} {r['tokens']:>6} {r['kernel']:<28} failed: {r['error'][:80]}")
            continue
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        line = (f"{r['shape']:>11} {r['tokens']:>6} {r['kernel']:<28} {r['us']:9.1f} {r['speedup']:8.2f} "
                f"{r['GB_per_s']:7.0f} {r['TFLOP_per_s']:8.1f} {r['pct_of_floor']:6.0%} {err:>8}")
        if v4:
            same = "us_v4" in r and r.get("v4_config") == r.get("config")
            line += f" {'=' if same else (format(r['us_v4'], '7.1f') if 'us_v4' in r else ''):>7}"
        if off:
            line += f" {format(r['us_pdl_off'], '7.1f') if 'us_pdl_off' in r else '':>7}"
        lines.append((line + (f"  {r['config']}" if r.get("config") not in (None, "None") else "")).rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli_main(add_arguments, run, __doc__))
