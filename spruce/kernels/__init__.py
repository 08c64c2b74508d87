"""Block-sparse kernels: the storage format, Triton kernels with a torch reference, and model swapping.

`sparsify(model)` turns a pruned model's eligible nn.Linear layers into `BlockSparseLinear`
(`densify` swaps them back); `bsr.py` holds the format and the kernels. Triton is imported only
when a CUDA tensor reaches a kernel, so this package imports on machines without it.
"""

from spruce.kernels.bsr import (
    BlockSparseWeight,
    block_sparse_linear,
    reference_linear,
    triton_available,
)
from spruce.kernels.linear import BlockSparseLinear, SparsifyReport, densify, dispatch_summary, release_dense, sparsify

__all__ = [
    "BlockSparseLinear",
    "BlockSparseWeight",
    "SparsifyReport",
    "block_sparse_linear",
    "densify",
    "dispatch_summary",
    "release_dense",
    "reference_linear",
    "sparsify",
    "triton_available",
]
