"""`spruce bench WHAT`: thin entry points to the benchmarks of a source checkout's bench/ package."""

from __future__ import annotations

from ..errors import SpruceError
from .common import Parser, add_command

BENCHES = (
    ("kernels", "y = x W^T: dense cuBLAS against the block-sparse kernels at Llama-2-7B shapes",
     "Time dense cuBLAS, the block-sparse kernels and torch's 2:4 path for every shape, token\n"
     "count, block size, sparsity and layout; every sparse output is checked against float64."),
    ("generate", "time to first token and decode tokens/s: dense against block-sparse on the pruner's layouts",
     "Greedy generation of a random Llama-2-7B-shaped bf16 model (random weights measure speed\n"
     "honestly), dense against block-sparse on every decoder linear, and torch's 2:4."),
)


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "bench", "time dense against block-sparse kernels and generation (GPU)",
                    "Benchmarks that measure dense and sparse in the same run and print ratios, with\n"
                    "bandwidth and FLOP/s against the card's measured ceilings. Need a CUDA GPU and Triton.")
    bench = p.add_subparsers(dest="bench", metavar="WHAT", parser_class=Parser)
    p.commands = bench.choices
    bench.required = True
    for name, summary, description in BENCHES:
        b = add_command(bench, name, summary, description)
        found = bench_module(name)
        if found is not None:
            found.add_arguments(b)
        else:   # an installed spruce without the checkout's bench/: run() says where to run it
            b.set_defaults(any_flags=True)


def run(args) -> None:
    module = bench_module(args.bench)
    if module is None:
        raise SpruceError(f"the benchmarks live in the bench/ folder of a source checkout: from its root run "
                          f"python -m bench.{args.bench}")
    module.run(args)


def bench_module(name: str):
    """bench.<name> of a source checkout (the benchmarks are not part of the installed package), or None."""
    import importlib

    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("bench", f"bench.{name}"):
            raise
        return None
    return module if hasattr(module, "add_arguments") else None
