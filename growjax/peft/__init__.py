"""Parameter-efficient fine-tuning: functional LoRA over parameter trees (Hu et al. 2021,
arXiv:2106.09685), with quantized bases (QLoRA, arXiv:2305.14314) and quantization-aware
initialisations from ``growjax.quant``."""

from growjax.peft.checkpoint import load_adapters, lora_from_meta, save_adapters
from growjax.peft.lora import Lora, LoraTarget, adapters_only, count_adapter_params, lora

__all__ = ["Lora", "LoraTarget", "adapters_only", "count_adapter_params", "load_adapters", "lora",
           "lora_from_meta", "save_adapters"]
