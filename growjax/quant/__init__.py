"""Quantization: NormalFloat / int-k blockwise formats, double quantization, packed storage,
``QuantizedTensor`` pytrees, and quantization-aware LoRA initialisations with calibration.

Dettmers et al. 2023 (QLoRA, arXiv:2305.14314); Li et al. 2023 (LoftQ, arXiv:2310.08659);
Meng et al. 2024 (PiSSA, arXiv:2404.02948); Lawton et al. 2024 (QuAILoRA, arXiv:2410.14713);
Guo et al. 2023 (LQ-LoRA, arXiv:2311.12023).
"""

from growjax.quant.formats import (
    DoubleQuant, QuantConfig, bnb_double_quant, code_book, dynamic_code, int_code,
    lq_double_quant, nf_code, nominal_bits_per_param)
from growjax.quant.packing import pack, packed_size, unpack
from growjax.quant.tensor import (
    QuantizedScales, QuantizedTensor, Quantizer, bits_per_param, dequantize, dequantize_tree,
    is_quantized, quantize, quantize_tree, quantizer, storage_bytes)

__all__ = [
    "DoubleQuant", "QuantConfig", "QuantizedScales", "QuantizedTensor", "Quantizer",
    "bits_per_param", "bnb_double_quant", "code_book", "dequantize", "dequantize_tree",
    "dynamic_code", "int_code", "is_quantized", "lq_double_quant", "nf_code",
    "nominal_bits_per_param", "pack", "packed_size", "quantize", "quantize_tree", "quantizer",
    "storage_bytes", "unpack",
]
