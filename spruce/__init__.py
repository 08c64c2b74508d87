"""spruce: prune LLMs into sparsity hardware can use, recover their quality, run them faster.

Importing spruce lets transformers load spruce's compressed checkpoints (`spruce.compress`): the
quantizer is registered as soon as transformers' quantizer registry is imported, so this import
stays cheap (no torch, no transformers).
"""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

_REGISTRY = "transformers.quantizers.auto"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Calls `spruce.compress.register()` right after transformers.quantizers.auto is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            from .compress import register

            register()

        spec.loader.exec_module = exec_then_register
        return spec


def load_compressed(path, device="cpu", dtype=None):
    """A compressed folder as a model with BlockSparseLinear layers (see spruce.compress)."""
    from .compress import load_compressed as load

    return load(path, device, dtype)


if _REGISTRY in sys.modules:
    from .compress import register as _register

    _register()
elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())
