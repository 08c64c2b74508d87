"""python bench/bench_generate.py --json runs/bench/generate.json

Greedy generation of a random Llama-2-7B-shaped bf16 model: dense, block-sparse and 2:4 tokens/s,
measured in the same run; prints a table of ratios against dense.
The same as `spruce bench generate`; `--help` lists the flags.
"""

import sys

from spruce.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "generate", *sys.argv[1:]]))
