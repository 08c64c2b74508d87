"""Top-p (nucleus) filtering of the `generated` corpus's sampler: the nucleus found among the
TOP_P_CANDIDATES most likely tokens of each row (a partial sort, spruce/generated.py) against whole
rows sorted, both measured in the same run, on one sampling step's probabilities: --rows sequences
sampled together (the generated recipe samples 1024) over a --vocab token vocabulary (SmolLM2:
49,152), from logits scaled so that the nucleus lies among the candidates, as in a language model's
next-token distribution. Prints milliseconds per call of each and the ratio; on CUDA, timed with
CUDA events after a warm-up, on CPU with the wall clock.

    python -m bench.sampling --rows 1024 --vocab 49152 --device cuda
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import cli_main, environment, median_ms, write_json
from spruce.cli.common import positive_int
from spruce.errors import SpruceError
from spruce.generated import TOP_P_CANDIDATES, top_p_filter


def _ms(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        return median_ms(fn, reps=reps)
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpruceError("--device cuda needs a CUDA GPU")
    if not 0 < args.top_p <= 1:
        raise SpruceError(f"--top_p must be in (0, 1], got {args.top_p}")
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=gen, device=device) * args.scale
    probs = torch.softmax(logits, dim=-1)
    covered = (probs.topk(min(TOP_P_CANDIDATES, args.vocab), dim=-1).values.sum(-1) >= args.top_p).float().mean()
    full = _ms(lambda: top_p_filter(probs, args.top_p, candidates=None), device, args.reps)
    partial = _ms(lambda: top_p_filter(probs, args.top_p), device, args.reps)
    same = torch.equal(top_p_filter(probs, args.top_p) > 0, top_p_filter(probs, args.top_p, candidates=None) > 0)
    row = {"rows": args.rows, "vocab": args.vocab, "top_p": args.top_p, "candidates": TOP_P_CANDIDATES,
           "rows_covered": round(covered.item(), 4), "full_sort_ms": round(full, 3), "candidates_ms": round(partial, 3),
           "speedup": round(full / partial, 2), "same_nucleus": same}
    print("| rows | vocab | rows whose nucleus lies among the candidates | whole rows sorted ms | "
          "candidates ms | speedup | same nucleus |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print(f"| {args.rows} | {args.vocab} | {covered.item():.0%} | {full:.2f} | {partial:.2f} | "
          f"{full / partial:.2f}x | {same} |")
    if args.json:
        write_json(args.json, {"environment": environment(), "rows": [row]})


def add_arguments(p) -> None:
    p.add_argument("--rows", type=positive_int, default=1024)
    p.add_argument("--vocab", type=positive_int, default=49152)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--scale", type=float, default=6.0, help="logit scale: larger is more peaked (default: 6)")
    p.add_argument("--reps", type=positive_int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the row and the environment as JSON")


def main(argv=None) -> int:
    return cli_main(add_arguments, run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
