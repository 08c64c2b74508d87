"""spruce: prune LLMs into sparsity hardware can use, recover their quality, run them faster."""

__version__ = "0.1.0"
