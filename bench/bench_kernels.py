"""python bench/bench_kernels.py --json runs/bench/kernels.json

Dense cuBLAS against the block-sparse kernels (and torch's 2:4) at Llama-2-7B shapes, measured in
the same run; prints a table of ratios with bandwidth and FLOP/s against the card's ceilings.
The same as `spruce bench kernels`; `--help` lists the flags.
"""

import sys

from spruce.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
