"""Quantization: NormalFloat / int-k blockwise formats, double quantization, packed storage,
``QuantizedTensor`` pytrees, and quantization-aware LoRA initialisations with calibration.

Dettmers et al. 2023 (QLoRA, arXiv:2305.14314); Li et al. 2023 (LoftQ, arXiv:2310.08659);
Meng et al. 2024 (PiSSA, arXiv:2404.02948); Lawton et al. 2024 (QuAILoRA, arXiv:2410.14713);
Guo et al. 2023 (LQ-LoRA, arXiv:2311.12023).
"""

from growjax.quant.formats import (
    DoubleQuant, QuantConfig, bnb_double_quant, code_book, dynamic_code, int_code,
    lq_double_quant, nf_code, nominal_bits_per_param)
from growjax.quant.calibration import GramCapture, GramState, gram_capture, normalized
from growjax.quant.init import (
    InitContext, InitFn, als_factors, calibrated_error, closed_form_factors, damped_gram,
    loftq, low_rank, pissa, qlora, quailora)
from growjax.quant.packing import pack, packed_size, unpack
from growjax.quant.tensor import (
    QuantizedScales, QuantizedTensor, Quantizer, bits_per_param, dequantize, dequantize_tree,
    is_quantized, quantize, quantize_tree, quantizer, reshape, storage_bytes)

__all__ = [
    "DoubleQuant", "GramCapture", "GramState", "InitContext", "InitFn", "QuantConfig",
    "QuantizedScales", "QuantizedTensor", "Quantizer", "als_factors", "bits_per_param",
    "bnb_double_quant", "calibrated_error", "closed_form_factors", "code_book", "damped_gram",
    "dequantize", "dequantize_tree", "dynamic_code", "gram_capture", "int_code", "is_quantized",
    "loftq", "low_rank", "lq_double_quant", "nf_code", "nominal_bits_per_param", "normalized",
    "pack", "packed_size", "pissa", "qlora", "quailora", "quantize", "quantize_tree",
    "quantizer", "reshape", "storage_bytes", "unpack",
]
