"""Compressed block-sparse checkpoints: a pruned model stored as block values plus block indices.

    spruce compress out/pruned out/pruned-compressed        # or: spruce prune ... --save_compressed
    python -c "import spruce, transformers as t; t.AutoModelForCausalLM.from_pretrained('out/pruned-compressed')"

A pruned checkpoint written by `spruce prune` is dense with zeros in place. The compressed folder
stores each block-sparse decoder linear in the layout of `spruce.kernels.bsr.BlockSparseWeight`,
the one the kernels run, under the names of `BlockSparseLinear`'s buffers:

    <module>.values     [stored, group * block, block]  the model's dtype (the kept blocks)
    <module>.cols       int32 [stored]                  block-column of each stored entry
    <module>.group_ptr  int32 [groups + 1]              entries of group g: group_ptr[g]:group_ptr[g+1]
    <module>.bias       as in the dense model, when the layer has one

Every other tensor (embeddings, norms, LM head, layers kept dense) is stored as it was. config.json
gains a `quantization_config` entry, {"quant_method": "spruce_block_sparse", "format":
"spruce-block-sparse", "format_version": 1, "block_size": B, "layers": {name: {"shape", "group",
"stored", "nonzero_blocks", "uniform_count"}}}, which says which modules are block-sparse and
the shapes of their tensors. sparsity.json and the tokenizer stay beside the weights.

Loading: `import spruce` registers a transformers quantizer for this entry (the registration runs
when transformers' quantizer registry is first imported, so `import spruce` itself stays cheap).
`from_pretrained` then builds `BlockSparseLinear` modules on the meta device before any weight is
read and fills their buffers straight from the file: the dense weights never exist, so loading
peaks below the dense model's size. The layers run the Triton kernels on CUDA (bfloat16 / float16)
and the torch reference on the CPU. `model.dequantize()` (or `spruce.models.load_model`, which
every spruce command uses) turns them back into nn.Linear with the exact pruned weights: every
stored value comes back bit for bit, and the dropped blocks as +0.0 (a -0.0 that a masked
multiply left in a pruned block is the one bit pattern not kept).

Without `import spruce`, transformers does not know the entry: it warns about an unknown
quantization type and leaves the block-sparse layers' weights uninitialised, so load these
folders after importing spruce (their model card says so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import SpruceError
from .kernels.bsr import BLOCK_SIZES, BlockSparseWeight
from .kernels.linear import DEFAULT_MIN_SPARSITY, BlockSparseLinear, dense_reason, weight_dense_reason

QUANT_METHOD = "spruce_block_sparse"
FORMAT = "spruce-block-sparse"
FORMAT_VERSION = 1
DEFAULT_BLOCK = 16
TENSORS = ("values", "cols", "group_ptr")


# ---------------------------------------------------------------- the format: pure tensor functions

def layer_entry(weight: BlockSparseWeight) -> dict:
    """The config.json entry of one block-sparse layer: what its stored tensors' shapes follow from."""
    return {"shape": list(weight.shape), "group": weight.group, "stored": int(weight.cols.numel()),
            "nonzero_blocks": weight.nonzero_blocks, "uniform_count": weight.uniform_count}


def compress_weight(weight: torch.Tensor, block: int = DEFAULT_BLOCK,
                    group: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A dense [N, K] weight with zeros in place -> ({values, cols, group_ptr}, layer entry)."""
    sparse = BlockSparseWeight.from_dense(weight, block, group)
    return {name: getattr(sparse, name) for name in TENSORS}, layer_entry(sparse)


def sparse_weight(tensors: dict[str, torch.Tensor], entry: dict, block: int) -> BlockSparseWeight:
    """The BlockSparseWeight of stored tensors, checked against their layer entry."""
    n, k = entry["shape"]
    group = entry["group"]
    expected = {"values": (entry["stored"], group * block, block), "cols": (entry["stored"],),
                "group_ptr": (n // (group * block) + 1,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise SpruceError(f"the compressed layer has no '{name}' tensor; the checkpoint is incomplete")
        if tuple(tensors[name].shape) != shape:
            raise SpruceError(f"the compressed layer's '{name}' has shape {tuple(tensors[name].shape)}, "
                              f"its config entry says {shape}; the checkpoint is damaged")
    return BlockSparseWeight(tensors["values"], tensors["cols"], tensors["group_ptr"], (n, k), block, group,
                             entry["nonzero_blocks"], entry["uniform_count"])


def decompress_weight(tensors: dict[str, torch.Tensor], entry: dict, block: int) -> torch.Tensor:
    """Stored tensors -> the dense [N, K] weight, zeros in place, bit for bit as before compression."""
    return sparse_weight(tensors, entry, block).to_dense()


def compress_state_dict(state_dict: dict[str, torch.Tensor], linears: list[str], block: int = DEFAULT_BLOCK,
                        min_sparsity: float = DEFAULT_MIN_SPARSITY) -> tuple[dict[str, torch.Tensor], dict]:
    """Compress the weights `<name>.weight` of the layers in `linears` that are block-sparse enough.

    Returns (tensors to store, {layer name: entry}); layers below `min_sparsity` zero blocks, or
    that the block does not divide, and every other tensor are passed through unchanged."""
    out = dict(state_dict)
    layers = {}
    for name in linears:
        weight = state_dict[f"{name}.weight"]
        if weight_dense_reason(weight, block, min_sparsity) is not None:
            continue
        tensors, layers[name] = compress_weight(weight, block)
        del out[f"{name}.weight"]
        out.update({f"{name}.{key}": t for key, t in tensors.items()})
    return out, layers


def decompress_state_dict(tensors: dict[str, torch.Tensor], qconfig: dict) -> dict[str, torch.Tensor]:
    """The inverse of `compress_state_dict`: every compressed layer back to `<name>.weight`."""
    check_config(qconfig)
    out = dict(tensors)
    for name, entry in qconfig["layers"].items():
        stored = {key: out.pop(f"{name}.{key}", None) for key in TENSORS}
        out[f"{name}.weight"] = decompress_weight({k: v for k, v in stored.items() if v is not None},
                                                  entry, qconfig["block_size"])
    return out


def check_config(qconfig: dict) -> None:
    """Raise SpruceError unless `qconfig` is a quantization_config entry this spruce can read."""
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise SpruceError(f"quantization_config has quant_method '{qconfig.get('quant_method')}', "
                          f"not '{QUANT_METHOD}'; this is not a spruce compressed checkpoint")
    version = qconfig.get("format_version")
    if version != FORMAT_VERSION:
        raise SpruceError(f"the checkpoint is in {FORMAT} format version {version}; this spruce reads "
                          f"version {FORMAT_VERSION}; upgrade spruce or compress the model again")
    if qconfig.get("block_size") not in BLOCK_SIZES or not isinstance(qconfig.get("layers"), dict):
        raise SpruceError(f"the {FORMAT} entry of config.json needs a block_size in {BLOCK_SIZES} and a "
                          "'layers' table; the checkpoint is damaged")


def is_compressed(config) -> bool:
    """Whether a transformers config (or its dict) describes a spruce compressed checkpoint."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def folder_qconfig(folder: str | os.PathLike) -> dict | None:
    """The spruce quantization_config of a model folder's config.json, checked; None if it has none."""
    path = Path(folder, "config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not is_compressed(config):
        return None
    check_config(config["quantization_config"])
    return config["quantization_config"]


def prepare_load(config) -> bool:
    """Before `from_pretrained`: True for a compressed checkpoint (its entry checked, the quantizer
    registered), False for any other model."""
    if not is_compressed(config):
        return False
    qc = config.quantization_config
    check_config(qc if isinstance(qc, dict) else qc.to_dict())
    if not register():
        raise SpruceError("loading a compressed checkpoint needs transformers with custom quantizers (>= 4.46)")
    return True


def decompress_model(model) -> int:
    """Turn a loaded compressed model's BlockSparseLinear layers back into nn.Linear (in place) with
    the exact pruned weights, and drop its quantization_config; returns how many layers."""
    from .kernels.linear import densify

    if getattr(model, "hf_quantizer", None) is not None:
        count = sum(isinstance(m, BlockSparseLinear) for m in model.modules())
        model.dequantize()
    else:
        count = densify(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_is_quantized"):
            del config._is_quantized
    return count


# ---------------------------------------------------------------- models in memory

def _zero_blocks(pattern: str | None) -> tuple[int, int] | None:
    """The (rows, cols) of the whole zero blocks a sparsity pattern leaves, None for other patterns."""
    from .prune.patterns import parse_pattern

    try:
        return parse_pattern(pattern).zero_blocks if pattern else None
    except SpruceError:
        return None


def block_size_of(pattern: str | None) -> int:
    """The storage block for a sparsity pattern: its tile side for BxB / RxC tiles that the
    kernel's block sizes divide, else the default (16)."""
    tile = _zero_blocks(pattern)
    if tile:
        for block in sorted(BLOCK_SIZES, reverse=True):
            if tile[0] % block == 0 and tile[1] % block == 0:
                return block
    return DEFAULT_BLOCK


def compress_model(model, block: int = DEFAULT_BLOCK, min_sparsity: float = DEFAULT_MIN_SPARSITY) -> dict:
    """Swap the model's block-sparse decoder linears (in place) for BlockSparseLinear and record the
    format in `model.config.quantization_config`; returns that entry.

    Raises SpruceError when no decoder linear has `min_sparsity` zero blocks of `block`."""
    from .models import prunable_linears

    linears = prunable_linears(model)
    layers, reasons = {}, []
    for name, linear in linears.items():
        reason = dense_reason(linear, block, min_sparsity)
        if reason is not None:
            reasons.append(f"{name}: {reason}")
            continue
        sparse = BlockSparseLinear.from_linear(linear, block)
        layers[name] = layer_entry(sparse.sparse_weight)
        _set_submodule(model, name, sparse)
    if not layers:
        raise SpruceError(f"the model is not block-sparse in {block}x{block} blocks: none of its {len(linears)} "
                          f"decoder linears can be stored compressed ({reasons[0] if reasons else 'no linears'}); "
                          f"prune it with --sparsity_type {block}x{block} first")
    qconfig = {"quant_method": QUANT_METHOD, "format": FORMAT, "format_version": FORMAT_VERSION,
               "block_size": block, "layers": layers}
    model.config.quantization_config = SpruceBlockSparseConfig(**qconfig) if register() else qconfig
    return qconfig


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def dense_size(model) -> int:
    """Bytes of the model's tensors as a dense checkpoint stores them (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def save_compressed(model, tokenizer, folder: str | os.PathLike, block: int = DEFAULT_BLOCK,
                    min_sparsity: float = DEFAULT_MIN_SPARSITY) -> dict:
    """Compress `model` (in place: its block-sparse linears become BlockSparseLinear) and save it
    with `tokenizer` into `folder`; returns the quantization_config entry."""
    from .models import save_model

    qconfig = compress_model(model, block, min_sparsity)
    save_model(model, tokenizer, folder)
    return qconfig


def check_compressible(pattern: str) -> int:
    """The storage block for `spruce prune --save_compressed` with this pattern; SpruceError for a
    pattern whose zeros are not whole blocks (nothing could be stored compressed)."""
    tile = _zero_blocks(pattern)
    if tile is None or tile[0] % min(BLOCK_SIZES) or tile[1] % min(BLOCK_SIZES):
        raise SpruceError(f"--save_compressed stores block patterns (16x16, 32x32, 64x64); --sparsity_type "
                          f"{pattern} leaves no whole zero blocks, so save it dense (drop --save_compressed)")
    return block_size_of(pattern)


def compress_folder(source: str, output: str | os.PathLike, block: int | None = None,
                    min_sparsity: float = DEFAULT_MIN_SPARSITY, overwrite: bool = False) -> dict:
    """`spruce compress`: load a pruned model (any model source), write its compressed folder with
    the source's sparsity.json; the weights keep their dtype. Returns sizes and layer counts."""
    from .masks import copy_sparsity_json, read_sparsity_json
    from .models import load_config, load_model, prunable_linears
    from .outdir import atomic_dir, check_output_dir

    check_output_dir(output, overwrite)
    config, _, _ = load_config(source)
    if is_compressed(config):
        raise SpruceError(f"{source} is already compressed; load it directly, or give the dense pruned folder")
    if block is None:
        sparsity = read_sparsity_json(source) if Path(source).is_dir() else None
        block = block_size_of((sparsity or {}).get("pattern"))
    dtype = getattr(config, "dtype", None)
    model, tok = load_model(source, "cpu", dtype if isinstance(dtype, torch.dtype) else "float32")
    dense = dense_size(model)
    linears = len(prunable_linears(model))
    with atomic_dir(output) as folder:
        qconfig = save_compressed(model, tok, folder, block, min_sparsity)
        if Path(source).is_dir():
            copy_sparsity_json(source, folder)
        stored = weights_bytes(folder)
    return {"block_size": block, "compressed_layers": len(qconfig["layers"]), "decoder_linears": linears, "dense_bytes": dense, "compressed_bytes": stored}


def weights_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a model folder's safetensors files."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a compressed folder with its block-sparse layers as BlockSparseLinear (the same as
    `AutoModelForCausalLM.from_pretrained(path)` after `import spruce`), in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    if folder_qconfig(path) is None:
        raise SpruceError(f"{path} is not a spruce compressed folder (its config.json has no "
                          f"{QUANT_METHOD} quantization_config); write one with 'spruce compress'")
    register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=str(device))
    return model.eval()


# ---------------------------------------------------------------- the transformers quantizer

SpruceBlockSparseConfig = None
SpruceBlockSparseQuantizer = None


def _define_quantizer():
    """The config and quantizer classes (defined once transformers' quantizer registry is loaded)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class Config(QuantizationConfigMixin):
        """config.json's `quantization_config` for a spruce compressed checkpoint."""

        def __init__(self, layers: dict, block_size: int = DEFAULT_BLOCK, format_version: int = FORMAT_VERSION,
                     format: str = FORMAT, quant_method: str = QUANT_METHOD, **kwargs):
            self.quant_method = QUANT_METHOD
            self.format = format
            self.format_version = format_version
            self.block_size = block_size
            self.layers = layers
            check_config(self.to_dict())

    class Quantizer(HfQuantizer):
        """Builds BlockSparseLinear modules (meta device) where config.json says, before loading."""

        requires_calibration = True  # only pre-compressed checkpoints: compression happens in spruce

        def _process_model_before_weight_loading(self, model, **kwargs):
            qc = self.quantization_config
            for name, entry in qc.layers.items():
                try:
                    linear = model.get_submodule(name)
                except AttributeError:
                    raise SpruceError(f"the compressed checkpoint names layer {name}, which the model does not "
                                      "have; the config.json does not match the architecture") from None
                if not isinstance(linear, nn.Linear) or list(linear.weight.shape) != list(entry["shape"]):
                    raise SpruceError(f"layer {name} of the model is not an nn.Linear of shape {entry['shape']}; "
                                      "the config.json does not match the architecture")
                block, group, stored = qc.block_size, entry["group"], entry["stored"]
                n = entry["shape"][0]
                meta = {"device": "meta"}
                weight = BlockSparseWeight(
                    torch.empty(stored, group * block, block, dtype=linear.weight.dtype, **meta),
                    torch.empty(stored, dtype=torch.int32, **meta),
                    torch.empty(n // (group * block) + 1, dtype=torch.int32, **meta),
                    tuple(entry["shape"]), block, group, entry["nonzero_blocks"], entry["uniform_count"])
                _set_submodule(model, name, BlockSparseLinear(weight, linear.bias))
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def _dequantize(self, model, dtype=None):
            from .kernels.linear import densify

            densify(model)
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return Config, Quantizer


def register() -> bool:
    """Register the quantizer with transformers (idempotent); False when transformers is missing."""
    global SpruceBlockSparseConfig, SpruceBlockSparseQuantizer
    if SpruceBlockSparseQuantizer is not None:
        return True
    try:
        from transformers.quantizers import auto
    except ImportError:
        return False
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:  # registered by another copy of this module
        SpruceBlockSparseConfig = auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
        SpruceBlockSparseQuantizer = auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
        return True
    config_cls, quantizer_cls = _define_quantizer()
    SpruceBlockSparseConfig = auto.register_quantization_config(QUANT_METHOD)(config_cls)
    SpruceBlockSparseQuantizer = auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    return True
