"""Recovery fine-tuning of pruned models (LoRA through peft)."""
