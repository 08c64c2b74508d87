"""spruce's benchmarks, run from the repository root as `python -m bench.NAME` (each module's
docstring starts with its command). common.py holds what they share: model shapes, timing on
the GPU, the environment record and JSON writing.

Names of the modules are also reachable as attributes of the package (`bench.format_kernel_table`),
imported on first use, so that `python -m bench.kernels` does not import itself twice."""

import importlib

_MODULES = ("common", "kernels", "generate")


def __getattr__(name: str):
    for module in _MODULES:
        found = getattr(importlib.import_module(f"{__name__}.{module}"), name, None)
        if found is not None:
            return found
    raise AttributeError(f"module 'bench' has no attribute '{name}'")
