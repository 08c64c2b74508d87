"""python bench/bench_generate.py --json runs/bench/generate.json

Greedy generation of a random Llama-2-7B-shaped bf16 model: dense, block-sparse and 2:4 tokens/s,
measured in the same run; prints a table of ratios against dense.
"""

import argparse
import sys

from spruce.bench import LAYOUTS, bench_generate
from spruce.errors import SpruceError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of zero blocks in every decoder linear")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layout", choices=LAYOUTS, default="grouped")
    parser.add_argument("--modes", nargs="+", choices=["graph", "eager"], default=["graph", "eager"],
                        help="graph: static cache + CUDA graph per step; eager: Hugging Face generate")
    parser.add_argument("--no-semi-structured", action="store_true", help="skip torch's 2:4 path")
    parser.add_argument("--num-layers", type=int, default=32, help="decoder layers (32 is Llama-2-7B)")
    parser.add_argument("--json", help="write rows, ceilings and environment to this file")
    args = parser.parse_args()
    bench_generate(batch_sizes=args.batch_sizes, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                   sparsity=args.sparsity, block_size=args.block_size, layout=args.layout, modes=args.modes,
                   semi_structured=not args.no_semi_structured, num_layers=args.num_layers, json_path=args.json)


if __name__ == "__main__":
    try:
        main()
    except SpruceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
