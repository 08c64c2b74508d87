"""python -m bench.prefill --json $OUT/prefill.json

Prefill (many tokens) on the grouped layout the pruner emits, at Llama-2-7B shapes, bf16, 16x16
blocks, 50%: dense cuBLAS against bsr.py's prefill kernel (every configuration) and prefill.py's
kernel (every configuration; `xt` ones transpose x in the call, and are timed again on a ready xt:
the kernel alone; `xr` ones read x as it is), the transpose alone, and the pick of the tuner
(`block_sparse_linear`, all candidates, no dense copy). Masks: `16x16g4` / `16x16g8` from the
pruner's own pattern functions (`bench.emitted.emitted_weight`, global selection by default, so
groups keep unequal counts as a pruned model's layers do). Every kernel output is checked against
float64 math on the masked weight (rel_err). Times: CUDA-graph replays cycling through weight and
input copies larger than L2 (`bench.common.graph_time_us`). Writes JSON after every case; prints
each case's configurations, then the summary table of ratios last.

Under Nsight Compute (one launch of each profiled configuration, plain launches, no graphs):

    ncu --set full -k regex:"prefill|transpose" -c 24 -o $OUT/prefill_ncu python3 -m bench.prefill --profile
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import copies_for, environment, graph_time_us, require_cuda, write_json
from bench.emitted import emitted_weight

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]
PATTERNS = ["16x16g4", "16x16g8"]
# launched once each by --profile, in this order, after the old kernel's run-4 winner
PROFILE_CONFIGS = [("xt", 256, 64, 8, 4), ("xr", 256, 64, 8, 4), ("xt", 512, 32, 8, 5), ("xt", 128, 64, 4, 4),
                   ("xt-tma", 256, 16, 8, 8), ("xr-tma", 256, 16, 8, 8), ("xt-tma", 512, 16, 8, 8),
                   ("xt-gluon", 512, 4, 3, 8, "ws"), ("xt-gluon", 256, 4, 3, 8, "ws")]
OLD_WINNER = (256, 64, 8, 3, True)
# tests run the flow on the CPU (Triton's interpreter, float16) with the timing stubbed
DEVICE, DTYPE = "cuda", torch.bfloat16


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _shape(s: str) -> tuple[int, int]:
    n, k = (int(v) for v in s.lower().split("x"))
    return n, k


def _cycle(fn, count: int) -> list:
    return [lambda i=i: fn(i) for i in range(count)]


def bench_case(w, pattern, selection, m, gen, rows, json_path, header):
    """Time one masked weight w [N, K] at m tokens; appends its rows (and writes the JSON)."""
    from spruce.kernels import bsr, prefill

    n, k = w.shape
    sp = bsr.BlockSparseWeight.from_dense(w, 16)
    head = {"shape": f"{n}x{k}", "pattern": pattern, "selection": selection, "group": sp.group,
            "group_features": sp.group_features, "uniform": sp.uniform_count >= 0,
            "stored_fraction": round(sp.stored_fraction, 4)}
    copies = bsr._rotation(sp)
    esize = w.element_size()
    dense = [w] + [w.clone() for _ in range(copies_for(w.numel() * esize) - 1)]
    xs = [torch.randn(m, k, generator=gen).to(DEVICE, DTYPE) for _ in range(copies_for(m * k * esize))]
    ref = F.linear(xs[0].double(), w.double())
    y = torch.empty(m, n, dtype=DTYPE, device=DEVICE)
    count = max(len(copies), len(xs))
    at = lambda i: (xs[i % len(xs)], copies[i % len(copies)])  # noqa: E731
    case = {**head, "tokens": m}
    dense_us = graph_time_us(_cycle(lambda i: torch.mm(xs[i % len(xs)], dense[i % len(dense)].t(), out=y),
                                    max(len(dense), len(xs))))
    rows.append({**case, "kernel": "dense cuBLAS", "us": dense_us, "x_dense": 1.0})
    xts = [prefill.transpose_padded(x) for x in xs]
    t_us = graph_time_us(_cycle(lambda i: prefill.transpose_padded(xs[i % len(xs)], out=xts[i % len(xs)]),
                                len(xs)))
    rows.append({**case, "kernel": "transpose", "us": t_us, "x_dense": dense_us / t_us})
    for cfg in bsr.prefill_candidates(sp):
        row = {**case, "kernel": "grouped" if isinstance(cfg[0], str) else "bsr", "config": str(cfg)}
        try:
            y.fill_(float("nan"))
            bsr.launch_prefill(xs[0], sp, None, y, cfg)
            row["rel_err"] = _rel_err(y, ref)
            us = graph_time_us(_cycle(lambda i: bsr.launch_prefill(*at(i), None, y, cfg), count))
            row.update(us=us, x_dense=dense_us / us)
            if prefill.transposes(cfg):  # the kernel alone, on a ready xt
                alone = graph_time_us(_cycle(lambda i: prefill.launch(xs[i % len(xs)], copies[i % len(copies)],
                                                                      None, y, cfg, xt=xts[i % len(xs)]), count))
                row.update(us_kernel=alone, x_dense_kernel=dense_us / alone)
        except Exception as exc:  # noqa: BLE001 - a tile this card cannot run; report it and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
    y.fill_(float("nan"))
    bsr.block_sparse_linear(xs[0], sp)  # tunes this launch shape among all candidates
    out = bsr.block_sparse_linear(xs[0], sp)
    tuned_us = graph_time_us(_cycle(lambda i: bsr.block_sparse_linear(*at(i)), count))
    key = bsr.tuning_key("prefill", sp, m, DTYPE)
    rows.append({**case, "kernel": "tuned", "config": str(bsr.chosen_config("prefill", sp, m, DTYPE)),
                 "us": tuned_us, "x_dense": dense_us / tuned_us, "rel_err": _rel_err(out, ref),
                 "tuner_us": bsr._tune_ms.get(key)})
    print(format_case([r for r in rows if r["shape"] == case["shape"] and r["pattern"] == pattern
                       and r["tokens"] == m]), flush=True)
    if json_path:
        write_json(json_path, {**header, "rows": rows}, quiet=True)


def format_case(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"{r0['shape']} {r0['pattern']} {r0['selection']} group {r0['group']} uniform {r0['uniform']} "
             f"tokens {r0['tokens']}",
             f"  {'kernel':<13} {'config':<28} {'us':>8} {'x dense':>7} {'alone us':>9} {'x dense':>7} {'rel err':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['kernel']:<13} {r.get('config', ''):<28} failed: {r['error'][:70]}")
            continue
        alone = (f"{r['us_kernel']:9.1f} {r['x_dense_kernel']:7.2f}" if "us_kernel" in r else f"{'':9} {'':7}")
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        lines.append(f"  {r['kernel']:<13} {r.get('config', ''):<28} {r['us']:8.1f} {r['x_dense']:7.2f} {alone} "
                     f"{err:>8}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per case: dense, the old kernel's best, the new kernel's best (with its transpose and
    alone), the transpose, and the tuner's pick; ratios are dense time / time."""
    lines = [f"{'shape':>11} {'pattern':<8} {'tokens':>6} {'dense us':>8} {'old best':>14} {'new best':>14} "
             f"{'new alone':>14} {'transp':>6} {'tuned':>14}  new best config / tuned config"]
    cases = dict.fromkeys((r["shape"], r["pattern"], r["tokens"]) for r in rows)
    for shape, pattern, m in cases:
        rs = [r for r in rows if (r["shape"], r["pattern"], r["tokens"]) == (shape, pattern, m) and "us" in r]
        by = lambda kind: [r for r in rs if r["kernel"] == kind]  # noqa: E731
        if not by("dense cuBLAS") or not by("tuned"):
            continue
        dense_us = by("dense cuBLAS")[0]["us"]
        old = min(by("bsr"), key=lambda r: r["us"], default=None)
        new = min(by("grouped"), key=lambda r: r["us"], default=None)
        alone = min((r for r in by("grouped") if "us_kernel" in r), key=lambda r: r["us_kernel"], default=None)
        tuned = by("tuned")[0]
        cell = lambda us: f"{us:7.1f} {dense_us / us:5.2f}x"  # noqa: E731
        lines.append(f"{shape:>11} {pattern:<8} {m:>6} {dense_us:8.1f} {cell(old['us']) if old else '':>14} "
                     f"{cell(new['us']) if new else '':>14} {cell(alone['us_kernel']) if alone else '':>14} "
                     f"{by('transpose')[0]['us']:6.1f} {cell(tuned['us']):>14}  "
                     f"{new['config'] if new else '-'} / {tuned['config']}")
    return "\n".join(lines)


def profile(shape: tuple[int, int], m: int, selection: str) -> None:
    """One plain launch of dense cuBLAS, then of the old kernel's run-4 winner and of each
    PROFILE_CONFIGS entry per pattern, for Nsight Compute (`-k regex:"prefill|transpose|gemm|nvjet"`);
    prints the launch order."""
    from spruce.kernels import bsr, prefill

    gen = torch.Generator().manual_seed(0)
    n, k = shape
    x = torch.randn(m, k, generator=gen).to(DEVICE, DTYPE)
    y = torch.empty(m, n, dtype=DTYPE, device=DEVICE)
    dense = torch.randn(n, k, generator=gen).to(DEVICE, DTYPE)
    torch.matmul(x, dense.t(), out=y)  # dense cuBLAS first, the baseline (ncu: -k regex:"gemm|nvjet|...")
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    order = [f"{n}x{k} dense tokens {m}: cuBLAS"]
    for pattern in PATTERNS:
        sp = bsr.BlockSparseWeight.from_dense(emitted_weight(n, k, pattern, selection, 0.5, gen, DEVICE).to(DTYPE), 16)
        for cfg in [OLD_WINNER, *PROFILE_CONFIGS]:
            if isinstance(cfg[0], str) and cfg not in prefill.candidates(sp):
                continue
            bsr.launch_prefill(x, sp, None, y, cfg)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            name = ("prefill" if not isinstance(cfg[0], str) else "prefill_gluon" if cfg[0] == prefill.TAG_GLUON
                    else "prefill_grouped_tma" if "tma" in cfg[0] else "prefill_grouped")
            kernels = ["transpose", name] if prefill.transposes(cfg) else [name]
            order += [f"{n}x{k} {pattern} tokens {m} {cfg}: {name}" for name in kernels]
    print("profiled launches, in order:\n" + "\n".join(order))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="weight shapes OUTxIN")
    p.add_argument("--patterns", nargs="+", default=PATTERNS)
    p.add_argument("--selection", default="global", choices=["global", "row-balanced"])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 512])
    p.add_argument("--profile", action="store_true",
                   help="one launch per profiled configuration (first shape and token count), for ncu")
    p.add_argument("--json")
    a = p.parse_args()
    require_cuda()
    if a.profile:
        profile(_shape(a.shapes[0]), a.tokens[0], a.selection)
        return
    try:
        env = environment()
    except ImportError:  # the environment record names transformers; the bench itself needs only torch and triton
        import triton

        env = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    header = {"environment": env, "args": vars(a)}
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    weights = {}  # the pruner's masks are built once (on the CPU), then every token count runs on them
    for m in a.tokens:  # token counts outermost: a run cut short keeps the first count on every case
        for s in a.shapes:
            for pattern in a.patterns:
                if (s, pattern) not in weights:
                    weights[s, pattern] = emitted_weight(*_shape(s), pattern, a.selection, 0.5, gen, DEVICE).to(DTYPE)
                bench_case(weights[s, pattern], pattern, a.selection, m, gen, rows, a.json, header)
                if DEVICE == "cuda":  # the case's inputs and copies are freed on its return
                    torch.cuda.empty_cache()
    from spruce.kernels import bsr

    header["tuned"] = bsr.tuned_configs()
    if a.json:
        write_json(a.json, {**header, "rows": rows})
    print(summary(rows))


if __name__ == "__main__":
    main()
