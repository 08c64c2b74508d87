"""LoRA adapters through peft, on a frozen (pruned) base model."""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import SpruceError


def attach_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                target_modules: str | list[str] = ("q_proj", "v_proj"), masked: bool = False):
    """Wrap `model` in a peft LoRA model; the base weights (and so their zeros) stay frozen.
    With `masked`, the updates are masked to the base weights' non-zeros (see mask_lora_updates)."""
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                        task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        message = str(e).splitlines()[0]
        hint = "; check --lora_target_modules" if "target" in message.lower() else ""
        raise SpruceError(f"cannot attach LoRA: {message[:200]}{hint}") from None
    if masked:
        mask_lora_updates(peft_model)
    return peft_model


def load_adapter(model, adapter: str):
    """Load a saved peft adapter onto `model` for evaluation (masked adapters stay masked)."""
    from peft import PeftModel

    check_adapter_files(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter).eval()
    except (RuntimeError, ValueError, KeyError) as e:
        raise SpruceError(f"adapter {adapter} does not fit this model ({str(e).splitlines()[0][:160]}); "
                          "was it trained on another base model?") from None
    marker = Path(adapter, "spruce_adapter.json")
    if marker.is_file() and json.loads(marker.read_text()).get("mode") == "masked-lora":
        mask_lora_updates(peft_model)
    return peft_model


def check_adapter_files(adapter: str) -> None:
    """An adapter folder whose files cannot be read ends in a message about the file, not about
    the base model."""
    from safetensors import safe_open

    if not Path(adapter, "adapter_config.json").is_file():
        raise SpruceError(f"{adapter} is not a peft adapter folder (no adapter_config.json); "
                          "point --lora_weights at the folder written by training")
    config = Path(adapter, "adapter_config.json")
    try:
        values = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpruceError(f"{config} is not valid JSON ({type(e).__name__}: {str(e)[:80]}); the adapter "
                          "folder is damaged: copy or train it again") from None
    if not isinstance(values, dict) or "peft_type" not in values:
        raise SpruceError(f"{config} is not a peft adapter config (no peft_type); the adapter folder is damaged")
    weights = Path(adapter, "adapter_model.safetensors")
    if weights.is_file():
        try:
            with safe_open(str(weights), "pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except Exception as e:  # safetensors' SafetensorError has no public base class
            raise SpruceError(f"{weights} is truncated or corrupt ({str(e).splitlines()[0][:100]}); copy or "
                              "train the adapter again") from None
    elif not Path(adapter, "adapter_model.bin").is_file():
        raise SpruceError(f"{adapter} has an adapter_config.json but no adapter_model.safetensors; the adapter "
                          "folder is incomplete")


def lora_layers(peft_model):
    """(name, module) of every peft LoRA layer that wraps an nn.Linear."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and isinstance(getattr(module, "base_layer", None), torch.nn.Linear):
            yield name, module


def mask_lora_updates(peft_model) -> int:
    """Masked LoRA: each adapter's update B@A is multiplied by the base weight's keep-mask in the
    forward pass, so the pruned positions never change and merging loses nothing. Such adapters
    must be merged with `merge_keep_sparsity` (plain peft would apply them unmasked)."""
    count = 0
    for _, module in lora_layers(peft_model):
        module.register_buffer("spruce_keep", module.base_layer.weight.detach() != 0, persistent=False)
        module._spruce_plain_forward = module.forward
        module.forward = types.MethodType(_masked_lora_forward, module)
        count += 1
    return count


def _masked_lora_forward(self, x, *args, **kwargs):
    if self.disable_adapters or self.merged:
        return self._spruce_plain_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        delta = delta * self.spruce_keep
        result = result + F.linear(self.lora_dropout[name](x).to(delta.dtype), delta).to(result.dtype)
    return result


@torch.no_grad()
def merge_keep_sparsity(peft_model):
    """Merge the adapters into the base weights, adding each update only where the base weight is
    non-zero, and return the plain base model: its zero set equals the pruned model's, bit for bit.
    For an adapter trained with `mask_lora_updates` this merge is exact; for a plain LoRA adapter
    it drops the part of the update that falls on pruned positions."""
    for _, module in lora_layers(peft_model):
        weight = module.base_layer.weight
        keep = weight != 0
        merged = weight.clone()
        for name in module.active_adapters:
            if name in module.lora_A:
                merged += (module.get_delta_weight(name) * keep).to(weight.dtype)
        # a kept weight that the update cancels to exactly 0 keeps its old value: the zero set must not grow
        merged = torch.where(keep & (merged == 0), weight, merged)
        weight.copy_(merged)
    return peft_model.unload()
