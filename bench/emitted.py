"""Kernel time on the masks the pruner emits, against dense cuBLAS, on one CUDA GPU.

For each Llama-2-7B shape, a random weight is pruned with spruce's own pattern functions (Wanda-like
score |W| * input norm with random log-normal input norms, so global selection gives groups of
unequal counts as real layers do) for `16x16` (independent), `16x16g4` and `16x16g8`, global and
row-balanced; the result goes through `BlockSparseWeight.from_dense` (the group it finds, whether the
counts are uniform) and is timed with the tuned kernels, once without and once with the dense copy
(dense dispatch: the tuner may pick cuBLAS). Times: CUDA-graph replays of 64 calls over weight
copies larger than L2, median of 9. `--check` builds the masks and formats on CPU at small shapes
and prints the stored layout only.

    python -m bench.emitted --json $OUT/emitted.json

`--profile` tunes each shape, pattern and token count as above, then launches dense cuBLAS and the
tuned kernel once each between cudaProfilerStart and cudaProfilerStop, for Nsight Compute:

    ncu --profile-from-start off --set full -o $OUT/decode python -m bench.emitted --profile \
        --shapes 4096x4096 --patterns 16x16g4 --selections global --tokens 1 8
"""

from __future__ import annotations

import argparse
import ast
import json

import torch
import torch.nn.functional as F

from bench.common import graph_time_us
from spruce.kernels import bsr
from spruce.prune.patterns import parse_pattern

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]
PATTERNS = ["16x16", "16x16g4", "16x16g8"]
SELECTIONS = ["global", "row-balanced"]


def emitted_weight(n, k, pattern, selection, sparsity, gen, device):
    w = torch.randn(n, k, generator=gen) * 0.02
    norms = torch.exp(torch.randn(k, generator=gen))
    mask = parse_pattern(pattern, selection).mask(w.abs() * norms, sparsity)
    return w.masked_fill(mask, 0).to(device, torch.bfloat16)


def profile_once(x: torch.Tensor, dense_w: torch.Tensor, sp: bsr.BlockSparseWeight, forced=()) -> None:
    """One plain launch of dense cuBLAS and one of the tuned kernel (or of each `forced` decode
    configuration), inside a profiler range."""
    y = torch.empty(x.shape[0], sp.shape[0], dtype=x.dtype, device=x.device)
    for cfg in forced:  # compiled (and split workspaces made) outside the range
        bsr.launch_decode(x, sp, None, y, cfg)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    F.linear(x, dense_w)
    if not forced:
        bsr.block_sparse_linear(x, sp)
    for cfg in forced:
        bsr.launch_decode(x, sp, None, y, cfg)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def decode_config(text: str) -> tuple:
    """A decode configuration as `bsr` writes it, e.g. "(64, 128, 4, 4, 'swap', 4)"."""
    try:
        cfg = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        cfg = None
    if not (isinstance(cfg, tuple) and len(cfg) == len(bsr.DECODE_GEMV_CONFIGS[0])):
        raise argparse.ArgumentTypeError(f"{text!r} is not a decode configuration such as "
                                         f"\"{bsr.DECODE_SWAP_CONFIGS[0]}\"")
    return cfg


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="weight shapes OUTxIN")
    p.add_argument("--patterns", nargs="+", default=PATTERNS)
    p.add_argument("--selections", nargs="+", choices=SELECTIONS, default=SELECTIONS)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 2048])
    p.add_argument("--profile", action="store_true",
                   help="after tuning, one plain launch of dense and of the tuned kernel per case, "
                        "between cudaProfilerStart and Stop (ncu --profile-from-start off)")
    p.add_argument("--force", nargs="+", type=decode_config, default=[], metavar="CONFIG",
                   help="with --profile: launch these decode configurations instead of the tuned one "
                        "(under ncu the tuner's timings are distorted), e.g. \"(64, 128, 4, 4, 'swap', 4)\"")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--check", action="store_true", help="CPU: build masks and formats at small shapes only")
    p.add_argument("--json")
    a = p.parse_args()
    device = "cpu" if a.check else "cuda"
    shapes = [(256, 256), (512, 256)] if a.check else [tuple(int(v) for v in s.split("x")) for s in a.shapes]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in shapes:
        dense_w = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
        for pattern in a.patterns:
            for selection in a.selections:
                w = emitted_weight(n, k, pattern, selection, a.sparsity, gen, device)
                sp = bsr.BlockSparseWeight.from_dense(w, 16)
                head = {"shape": f"{n}x{k}", "pattern": pattern, "selection": selection, "group": sp.group,
                        "uniform": sp.uniform_count >= 0, "zero_blocks": round(sp.block_sparsity, 3),
                        "stored_zero_blocks": sp.values.shape[0] * sp.group - sp.nonzero_blocks}
                if a.check:
                    rows.append(head)
                    print(json.dumps(head), flush=True)
                    continue
                copies = bsr._rotation(sp)
                dcopies = [dense_w.clone() for _ in copies]
                with_dense = [bsr.BlockSparseWeight(**{**vars(c), "dense": d}) for c, d in zip(copies, dcopies)]
                for m in a.tokens:
                    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                    dense_us = graph_time_us([lambda d=d: F.linear(x, d) for d in dcopies], replays=9)
                    sparse_us = graph_time_us([lambda c=c: bsr.block_sparse_linear(x, c) for c in copies], replays=9)
                    either_us = graph_time_us([lambda c=c: bsr.block_sparse_linear(x, c) for c in with_dense], replays=9)
                    kind = "decode" if m <= bsr.DECODE_MAX_TOKENS else "prefill"
                    row = {**head, "tokens": m, "dense_us": round(dense_us, 1), "sparse_us": round(sparse_us, 1),
                           "x_dense": round(dense_us / sparse_us, 2), "dispatch_us": round(either_us, 1),
                           "dispatch_x_dense": round(dense_us / either_us, 2),
                           "dispatch_runs_dense": bsr.runs_dense(kind, with_dense[0], m, x.dtype),
                           "config": str(bsr.chosen_config(kind, sp, m, x.dtype))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if a.profile:
                        forced = a.force if m <= bsr.DECODE_MAX_TOKENS else []
                        profile_once(x, dense_w, sp, forced)
                        print(f"profiled: {n}x{k} {pattern} {selection} tokens {m}: dense, then "
                              f"{', '.join(map(str, forced)) or row['config']}")
                    if a.json:
                        with open(a.json, "w") as f:
                            json.dump(rows, f, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
