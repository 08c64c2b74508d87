"""BlockSparseLinear, and `sparsify` / `densify` to swap a model's nn.Linear layers for it and back.

A pruned checkpoint is an ordinary dense model with zeros in place; `sparsify` converts each
eligible layer once, at load time, into the block-sparse format of `bsr.py`. The swapped model
still works with Hugging Face `generate`; on CPU the layers compute with the torch reference.

Never slower than dense: `sparsify(..., dense_fallback=True)` keeps each layer's dense weight
beside its block-sparse one, so the tuner (bsr.py) times dense cuBLAS next to the kernel tiles for
every launch shape and runs dense where it is faster. The copy costs the layer's dense bytes (at
50% zero blocks that is twice its block-sparse storage, so the layer holds 1.5x its dense size) until
`release_dense` drops it from every layer whose tuned shapes all chose the kernel: warm the model
up on the token counts it will serve (a prefill length and the decode batch), then release. A
layer that keeps its copy runs dense where it won; a shape first met after the release tunes among
the kernel tiles alone. `dispatch_summary` says which layers run sparse. An eager call at a token
count tuned to dense goes straight to `F.linear` on the copy: the layer remembers those counts, so
it costs the host what an nn.Linear costs (an eager prefill of a many-layer model is bound by it).

Siblings run as one launch: layers of one parent that read the same input one after another (q_proj,
k_proj and v_proj of an attention; gate_proj and up_proj of a gated MLP, `SIBLINGS`) are stored as
one `FusedBlockSparseLinear` of their weights stacked by rows, which the parent holds as
`q_proj+k_proj+v_proj`. Each sibling becomes a `FusedPart`: the first called on an input launches
the fused weight once and keeps the others' output slices for them; a sibling called on an input it
was not computed for launches the fused weight again (correct, only slower). One launch instead of
three reads the input once and fills the GPU better (decode) and costs the host one dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from spruce.errors import SpruceError
from spruce.kernels import bsr
from spruce.kernels.bsr import (
    BLOCK_SIZES,
    KERNEL_DTYPES,
    BlockSparseWeight,
    block_sparse_linear,
    block_sparse_linear_op,
)

# Below this fraction of zero blocks a layer saves too few bytes to pay for the indexed loads.
DEFAULT_MIN_SPARSITY = 0.3


class BlockSparseLinear(nn.Module):
    """y = x W^T + b with W stored as a `BlockSparseWeight` (buffers, so `.to()` moves them)."""

    def __init__(self, weight: BlockSparseWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = weight.block
        self.group = weight.group
        self.nonzero_blocks = weight.nonzero_blocks
        self.uniform_count = weight.uniform_count
        self.register_buffer("values", weight.values)
        self.register_buffer("cols", weight.cols)
        self.register_buffer("group_ptr", weight.group_ptr)
        # the dense copy for dense dispatch (module docstring); not saved with the state dict
        self.register_buffer("dense_weight", weight.dense, persistent=False)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        # {tokens: (tuning table, tuning key, id of the dense copy)} for launch shapes tuned to dense
        # cuBLAS: an eager call there runs F.linear at once, with no more host work than an nn.Linear,
        # while the table still holds dense for that key and the copy is the same tensor
        self._dense_routes: dict[int, tuple] = {}
        # its part of the tuning keys, for a graph being compiled to read the tuned route with
        # constants only (bsr.dense_token_ranges): the route it reads is the one tuned at that moment
        self._weight_key = bsr.weight_key(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 16, group: int | None = None,
                    keep_dense: bool = False) -> BlockSparseLinear:
        weight = BlockSparseWeight.from_dense(linear.weight.detach(), block_size, group)
        if keep_dense:
            weight.dense = linear.weight.detach().clone()
        return cls(weight, linear.bias)

    @property
    def sparse_weight(self) -> BlockSparseWeight:
        return BlockSparseWeight(
            self.values, self.cols, self.group_ptr, (self.out_features, self.in_features),
            self.block_size, self.group, self.nonzero_blocks, self.uniform_count, self.dense_weight,
        )

    @property
    def block_sparsity(self) -> float:
        return self.sparse_weight.block_sparsity

    def to_linear(self) -> nn.Linear:
        return _linear(self.sparse_weight.to_dense(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op in the compiled graph, no graph break
            # tokens is a symbolic int in a graph compiled for any shape: then no range is known to
            # hold it, and the op reads the route when it runs
            tokens = x.shape[:-1].numel()
            if self.dense_weight is not None and any(
                    statically_known_true(low < tokens) and statically_known_true(tokens <= high)
                    for low, high in bsr.dense_token_ranges(self._weight_key, str(x.dtype))):
                # a plain matmul the compiler plans with the rest: through the opaque op it would
                # cost the host a dispatch and a table lookup on every call of the graph
                return F.linear(x, self.dense_weight, self.bias)
            return block_sparse_linear_op(x, self.values, self.cols, self.group_ptr, self.bias, self.out_features,
                                          self.in_features, self.block_size, self.group, self.nonzero_blocks,
                                          self.uniform_count, self.dense_weight)
        if x.shape[-1] == self.in_features:
            route = self._dense_routes.get(x.shape[:-1].numel())
            if route is not None and route[0] is bsr._tuned and route[0].get(route[1]) == bsr.DENSE:
                dense = self._buffers["dense_weight"]
                if dense is not None and id(dense) == route[2]:
                    return F.linear(x, dense, self.bias)
        return block_sparse_linear(x, self.sparse_weight, self.bias, share_input=True, dense_routes=self._dense_routes)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block_size}, group={self.group}, block_sparsity={self.block_sparsity:.3f}")


class FusedBlockSparseLinear(BlockSparseLinear):
    """The weights of sibling layers stacked by rows (`SIBLINGS`): `forward` computes all of their
    outputs in one launch; `part(x, i)` is sibling i's output, from one launch shared by the
    siblings called on the same x. `names` are the siblings' names in the parent, `splits` their
    output features."""

    def __init__(self, weight: BlockSparseWeight, bias: torch.Tensor | None, names: tuple[str, ...],
                 splits: tuple[int, ...]):
        super().__init__(weight, bias)
        self.names, self.splits = names, splits
        # [x, x's version, the siblings' outputs not yet taken]: a plain list, so that a compiled
        # graph tracks it as it tracks the Python state of the model
        self._pending: list | None = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        pending = self._pending
        if (pending is not None and pending[0] is x and pending[2][index] is not None
                and (torch.compiler.is_compiling() or pending[1] == x._version)):
            out = pending[2][index]
            pending[2][index] = None
            if all(o is None for o in pending[2]):
                self._pending = None  # the input and the outputs are the caller's again
            return out
        outs = list(self(x).split(self.splits, dim=-1))
        out = outs[index]
        outs[index] = None
        self._pending = [x, None if torch.compiler.is_compiling() else x._version, outs]
        return out

    def extra_repr(self) -> str:
        return f"{'+'.join(self.names)}: " + super().extra_repr()


class FusedPart(nn.Module):
    """One sibling of a `FusedBlockSparseLinear`: its output features are rows of the fused weight,
    which the parent module holds (this one only refers to it, so it is moved and saved once)."""

    def __init__(self, fused: FusedBlockSparseLinear, index: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a child module: the parent owns it
        self.index = index
        self.in_features, self.out_features = fused.in_features, fused.splits[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"part {self.index} of {'+'.join(self.fused.names)}")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` [N, K] and `bias`."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


# Layers of one parent that read the same input, in the order the models' forwards call them.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class SparsifyReport:
    """What `sparsify` did: swapped layers with their block sparsity, kept-dense layers with why."""

    swapped: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)  # "model.layers.0.self_attn.q_proj+k_proj+v_proj", ...

    def __str__(self) -> str:
        lines = [f"{len(self.swapped)} layers block-sparse, {len(self.kept)} kept dense"]
        if self.fused:
            lines[0] += f", {len(self.fused)} launches of fused siblings"
        lines += [f"  sparse  {name}: {detail}" for name, detail in self.swapped]
        lines += [f"  dense   {name}: {reason}" for name, reason in self.kept]
        return "\n".join(lines)


def dense_reason(linear: nn.Module, block_size: int, min_sparsity: float) -> str | None:
    """Why this layer stays dense, or None when it is eligible."""
    if type(linear) is not nn.Linear:
        return f"{type(linear).__name__} is not a plain nn.Linear"
    return weight_dense_reason(linear.weight, block_size, min_sparsity)


def weight_dense_reason(weight: torch.Tensor, block_size: int, min_sparsity: float) -> str | None:
    """Why a linear layer's [N, K] weight stays dense, or None when it is eligible."""
    n, k = weight.shape
    if n % block_size or k % block_size:
        return f"shape {n}x{k} is not divisible by block {block_size}"
    if weight.device.type == "cuda" and weight.dtype not in KERNEL_DTYPES:
        return f"{weight.dtype} on CUDA: the kernel runs bfloat16 or float16 (load the model in bfloat16)"
    zero = zero_block_fraction(weight, block_size)
    if zero < min_sparsity:
        return f"{zero:.0%} of {block_size}x{block_size} blocks are zero, below min_sparsity {min_sparsity:.0%}"
    return None


def zero_block_fraction(weight: torch.Tensor, block_size: int) -> float:
    """Fraction of a [N, K] weight's block_size x block_size blocks that are entirely zero."""
    n, k = weight.shape
    blocks = weight.detach().reshape(n // block_size, block_size, k // block_size, block_size)
    return 1.0 - blocks.ne(0).any(dim=3).any(dim=1).float().mean().item()


def sparsify(model: nn.Module, block_size: int = 16, min_sparsity: float = DEFAULT_MIN_SPARSITY,
             group: int | None = None, dense_fallback: bool = False, fuse: bool = True) -> SparsifyReport:
    """Swap every eligible nn.Linear of `model` (in place) for a BlockSparseLinear.

    A layer is eligible when it is a plain nn.Linear whose shape the block divides, whose dtype the
    kernel runs on its device, and whose fraction of all-zero blocks is at least `min_sparsity`.
    `group` fixes the block-rows per stored group (None: the widest that stores no zero block).
    `dense_fallback` keeps each layer's dense weight too, so the tuner can run it dense where dense
    is faster (see the module docstring for the memory and `release_dense`).
    `fuse` stores eligible siblings (`SIBLINGS`: same parent, input size, dtype and bias use) as one
    fused weight that runs them in one launch (module docstring).
    Raises SpruceError when no layer is eligible; returns the report otherwise.
    """
    if block_size not in BLOCK_SIZES:
        raise SpruceError(f"block size {block_size} is not supported; use one of {BLOCK_SIZES}")
    if not 0.0 <= min_sparsity < 1.0:
        raise SpruceError(f"min_sparsity must be in [0, 1), got {min_sparsity}")
    report = SparsifyReport()
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    eligible = {}
    for name, linear in linears:
        reason = dense_reason(linear, block_size, min_sparsity)
        if reason is not None:
            report.kept.append((name, reason))
        else:
            eligible[name] = linear
    done = set()
    for names in _sibling_sets(eligible) if fuse else []:
        fused = _fuse(model, names, [eligible[n] for n in names], block_size, group, dense_fallback)
        if fused is None:
            continue
        done.update(names)
        parent = names[0].rpartition(".")[0]
        report.fused.append(f"{parent}.{'+'.join(fused.names)}" if parent else "+".join(fused.names))
        for name in names:
            zero = zero_block_fraction(eligible[name].weight, block_size)
            report.swapped.append((name, f"{zero:.1%} zero blocks, group {fused.group}, one launch "
                                         f"with {'+'.join(fused.names)}"))
    for name, linear in eligible.items():
        if name in done:
            continue
        sparse = BlockSparseLinear.from_linear(linear, block_size, group, keep_dense=dense_fallback)
        _set_submodule(model, name, sparse)
        report.swapped.append((name, f"{sparse.block_sparsity:.1%} zero blocks, group {sparse.group}"))
    if not report.swapped:
        if not linears:
            raise SpruceError("the model has no nn.Linear layer to make block-sparse")
        name, reason = report.kept[0]
        raise SpruceError(f"no layer was made block-sparse: all {len(linears)} nn.Linear layers were kept "
                          f"dense (first: {name}: {reason})")
    return report


def _sibling_sets(eligible: dict[str, nn.Linear]) -> list[list[str]]:
    """The full names of each set of `SIBLINGS` whose members are all eligible and alike (input
    features, dtype, device, bias or none), so that one stacked weight can serve them."""
    sets = []
    for parent in dict.fromkeys(name.rpartition(".")[0] for name in eligible):
        for children in SIBLINGS:
            names = [f"{parent}.{c}" if parent else c for c in children]
            if all(n in eligible for n in names):
                like = {(lin.in_features, lin.weight.dtype, lin.weight.device, lin.bias is None)
                        for lin in (eligible[n] for n in names)}
                if len(like) == 1:
                    sets.append(names)
    return sets


def _fuse(model: nn.Module, names: list[str], linears: list[nn.Linear], block_size: int, group: int | None,
          keep_dense: bool) -> FusedBlockSparseLinear | None:
    """Swap the siblings `names` for FusedParts of one FusedBlockSparseLinear held by their parent;
    None (nothing changed) when no group width keeps every sibling's rows in whole groups."""
    splits = tuple(lin.out_features for lin in linears)
    stacked = torch.cat([lin.weight.detach() for lin in linears])
    weight = BlockSparseWeight.from_dense(stacked, block_size, group)
    width = weight.group
    while any(n % (width * block_size) for n in splits):
        width //= 2  # a narrower group of an exact one stores no zero block either
    if group is not None and width != group:
        return None
    if width != weight.group:
        weight = BlockSparseWeight.from_dense(stacked, block_size, width)
    if keep_dense:
        weight.dense = stacked.clone()
    bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    children = tuple(n.rpartition(".")[2] for n in names)
    fused = FusedBlockSparseLinear(weight, bias, children, splits)
    parent_name = names[0].rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    parent.add_module("+".join(children), fused)
    for i, child in enumerate(children):
        setattr(parent, child, FusedPart(fused, i))
    return fused


def _choices(layer: BlockSparseLinear) -> dict[str, bool]:
    """{"decode 8": False, "prefill 2048": True, ...}: the launch shapes tuned so far for this
    layer's weight (shape, block, group, density, dense copy or not), True where dense won."""
    w = layer.sparse_weight
    sig = bsr.tuning_key("decode", w, 1, w.values.dtype)[1:6]
    dense_key = w.dense is not None
    out = {}
    for key, cfg in bsr._tuned.items():
        if key[1:6] == sig and (key[-1] == "+dense") == dense_key:
            out[f"{key[0]} {key[6]}"] = cfg == bsr.DENSE
    return out


def release_dense(model: nn.Module) -> int:
    """Drop the dense copy of every BlockSparseLinear whose tuned launch shapes all chose the kernel
    (and of those not tuned at all); returns the bytes freed. Run it after warming the model up."""
    freed = 0
    for module in model.modules():
        if isinstance(module, BlockSparseLinear) and module.dense_weight is not None:
            if not any(_choices(module).values()):
                freed += module.dense_weight.numel() * module.dense_weight.element_size()
                module.dense_weight = None
    return freed


def dispatch_summary(model: nn.Module) -> str:
    """One line: how many block-sparse layers run the kernel at every tuned launch shape, and which
    run dense at some (with those shapes), e.g. for `spruce generate`."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)]
    dense_at = {n: [shape for shape, dense in _choices(m).items() if dense] for n, m in layers}
    untuned = [n for n, m in layers if not _choices(m)]
    some = {n: shapes for n, shapes in dense_at.items() if shapes}
    line = f"block-sparse kernel at every tuned launch: {len(layers) - len(some) - len(untuned)} of {len(layers)} layers"
    if some:
        line += "; dense cuBLAS at some: " + ", ".join(f"{n} ({', '.join(s)})" for n, s in some.items())
    if untuned:
        line += f"; not tuned yet: {len(untuned)}"
    return line


def densify(model: nn.Module) -> int:
    """Swap every BlockSparseLinear of `model` (and every sibling of a fused one) back to an
    nn.Linear (in place), dropping the fused weights; returns how many nn.Linear it made."""
    count = 0
    for name, fused in [(n, m) for n, m in model.named_modules() if isinstance(m, FusedBlockSparseLinear)]:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        weights = fused.sparse_weight.to_dense().split(fused.splits)
        biases = fused.bias.detach().split(fused.splits) if fused.bias is not None else [None] * len(weights)
        for child, weight, bias in zip(fused.names, weights, biases):
            setattr(parent, child, _linear(weight, bias))
        delattr(parent, name.rpartition(".")[2])
        count += len(weights)
    names = [name for name, module in model.named_modules() if isinstance(module, BlockSparseLinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_linear())
    return count + len(names)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
