"""LoRA adapters through peft, on a frozen (pruned) base model."""

from __future__ import annotations

from ..errors import SpruceError


def attach_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                target_modules: str | list[str] = ("q_proj", "v_proj")):
    """Wrap `model` in a peft LoRA model; the base weights (and so their zeros) stay frozen."""
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise SpruceError(f"cannot attach LoRA: {str(e).splitlines()[0]}; check --lora_target_modules") from None


def load_adapter(model, adapter: str):
    """Load a saved peft adapter onto `model` for evaluation."""
    from pathlib import Path

    from peft import PeftModel

    if not Path(adapter, "adapter_config.json").is_file():
        raise SpruceError(f"{adapter} is not a peft adapter folder (no adapter_config.json); "
                          "point --lora_weights at the folder written by training")
    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except (RuntimeError, ValueError, KeyError) as e:
        raise SpruceError(f"adapter {adapter} does not fit this model ({str(e).splitlines()[0][:160]}); "
                          "was it trained on another base model?") from None
