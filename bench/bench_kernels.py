"""python bench/bench_kernels.py --json runs/bench/kernels.json

Dense cuBLAS against the block-sparse kernels (and torch's 2:4) at Llama-2-7B shapes, measured in
the same run; prints a table of ratios with bandwidth and FLOP/s against the card's ceilings.
"""

import argparse
import sys

from spruce.bench import LAYOUTS, LLAMA2_7B_SHAPES, bench_kernels
from spruce.errors import SpruceError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in LLAMA2_7B_SHAPES],
                        help="weight shapes as OUTxIN")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 16, 2048],
                        help="rows of x: <= 16 runs the decode kernel, more the prefill kernel")
    parser.add_argument("--blocks", nargs="+", type=int, default=[16, 32], help="block sizes (16, 32, 64)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75], help="fractions of zero blocks")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                        help="grouped: 64-feature groups of block-rows share columns; independent: each its own")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--no-semi-structured", action="store_true", help="skip torch's 2:4 path")
    parser.add_argument("--json", help="write rows, ceilings and environment to this file")
    args = parser.parse_args()
    bench_kernels(shapes=args.shapes, tokens=args.tokens, blocks=args.blocks, sparsities=args.sparsities,
                  layouts=args.layouts, dtype=args.dtype, semi_structured=not args.no_semi_structured,
                  json_path=args.json)


if __name__ == "__main__":
    try:
        main()
    except SpruceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
