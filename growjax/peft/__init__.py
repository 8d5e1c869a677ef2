"""Parameter-efficient fine-tuning: functional LoRA over parameter trees (Hu et al. 2021,
arXiv:2106.09685), with quantized bases (QLoRA, arXiv:2305.14314) and quantization-aware
initialisations from ``growjax.quant``."""

from growjax.peft.lora import Lora, LoraTarget, adapters_only, count_adapter_params, lora

__all__ = ["Lora", "LoraTarget", "adapters_only", "count_adapter_params", "lora"]
