"""Quantization formats: code books (NormalFloat, uniform int-k, 8-bit dynamic) and configurations.

A *format* maps each block of ``block_size`` consecutive values of a row-major flattened tensor
to ``bits``-bit code indices plus per-block constants:

* symmetric formats (``nf2 nf3 nf4 nf8``, ``int2 … int8``): ``x ≈ absmax · code[q]`` with the
  code book in ``[-1, 1]`` and the block's absolute maximum as the scale;
* asymmetric formats (``uint2 … uint8``): ``x ≈ min + (max − min) · q / (2^k − 1)``, i.e. a scale
  and a zero point per block.

The block scales can be *double quantized* in one of two layouts (``DoubleQuant``):

* ``layout="bnb"`` (Dettmers et al. 2023, QLoRA, arXiv:2305.14314; bitsandbytes): subtract the
  mean of the scales, quantize them with the signed 8-bit dynamic code (Dettmers 2015,
  arXiv:1511.04561) in blocks of 256, keep one fp32 scale per second-level block and the mean;
* ``layout="lq"`` (Guo, Greengard, Xing & Kim 2023, LQ-LoRA, arXiv:2311.12023): subtract the minimum
  of the scales, quantize with an unsigned uniform ``bits``-bit code in blocks of ``block_size``,
  keep one second-level scale per block in a selectable dtype (fp32 / bf16 / fp16) and the minimum.

Storage in bits per parameter is ``b + b0/B0 + b1/(B0·B1)`` (codes, first-level constants,
second-level constants; ``nominal_bits_per_param``): NF4 with B0 = 64 gives 4.5 bits, and with
bitsandbytes double quantization (b0 = 8, B1 = 256, b1 = 32) 4.127 bits.

NormalFloat code books follow QLoRA: ``Φ⁻¹(p)/Φ⁻¹(δ)`` with δ = 0.9677083 and
``p = linspace(1−δ, ½, 2^{k−1}) ∪ linspace(½, δ, 2^{k−1}+1)`` (½ once), 2^k sorted values in
[−1, 1] with an exact zero. The probability grid is rounded to float32 the way bitsandbytes'
``create_normal_map`` does (a float32 ``torch.linspace``), which makes NF4 *bit-identical* to
bitsandbytes' table rather than merely equal to 7 decimals.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import numpy as np
from scipy import special

NF_OFFSET = 0.9677083
"""δ: the outermost NormalFloat quantile (QLoRA / bitsandbytes ``create_normal_map``)."""

MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 4096
SCALE_DTYPES = ("float32", "bfloat16", "float16")
_FORMAT_RE = re.compile(r"^(nf|int|uint)([1-8])$")


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
  """float32 ``linspace`` rounded exactly like ``torch.linspace(start, end, num)`` (float32).

  torch computes ``start + i·step`` on the first half and ``end − (num−1−i)·step`` on the second
  with a fused multiply-add and a float32 ``step``; float32 products are exact in float64, so one
  float64 evaluation rounded to float32 reproduces it.
  """
  a, b = np.float32(start), np.float32(end)
  if num == 1:
    return np.array([a], np.float32)
  step = np.float32((b - a) / np.float32(num - 1))
  i = np.arange(num, dtype=np.float64)
  lo = np.float64(a) + np.float64(step) * i
  hi = np.float64(b) - np.float64(step) * (num - 1 - i)
  return np.where(i < num // 2, lo, hi).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _nf_code_cached(bits: int) -> tuple[float, ...]:
  half = 2 ** (bits - 1)
  # Positive half: Φ⁻¹ at 2^{k-1} float32 probabilities from δ down to (excluding) ½; negative
  # half: the mirror of 2^{k-1}−1 of them; plus an exact zero (bitsandbytes' construction of the
  # QLoRA formula, which equals p = linspace(1−δ, ½, 2^{k−1}) ∪ linspace(½, δ, 2^{k−1}+1)).
  pos = special.ndtri(_linspace_f32(NF_OFFSET, 0.5, half + 1)[:-1].astype(np.float64))
  neg = -special.ndtri(_linspace_f32(NF_OFFSET, 0.5, half)[:-1].astype(np.float64))
  values = np.sort(np.concatenate([pos, [0.0], neg]).astype(np.float32))
  values = values / values.max()  # float32 division, as bitsandbytes normalises.
  return tuple(float(v) for v in values)


def nf_code(bits: int) -> np.ndarray:
  """NormalFloat-k code book [2^bits] float32, sorted, in [−1, 1], with an exact 0 (QLoRA)."""
  if not 2 <= bits <= 8:
    raise ValueError(f"NormalFloat needs 2 <= bits <= 8, got bits={bits}.")
  return np.asarray(_nf_code_cached(bits), np.float32)


def int_code(bits: int, symmetric: bool = True) -> np.ndarray:
  """Uniform code book [2^bits] float32.

  Symmetric: ``q/L`` for ``q = −L … L`` with ``L = 2^{k−1} − 1`` (absmax scaling keeps 0 exact;
  the last of the 2^k indices is unused and repeats 1). Asymmetric: ``linspace(0, 1, 2^k)``
  (min/max scaling).
  """
  if not 1 <= bits <= 8 or (symmetric and bits < 2):
    raise ValueError(f"int-k needs 2 <= bits <= 8 (1 <= bits for asymmetric), got bits={bits}.")
  if symmetric:
    lim = 2 ** (bits - 1) - 1
    q = np.arange(-lim, lim + 1, dtype=np.float64)
    values = np.concatenate([q / lim, [1.0]])
  else:
    values = np.linspace(0.0, 1.0, 2 ** bits)
  return values.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_code_cached() -> tuple[float, ...]:
  # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each
  # decade 10^{i-6} (i = 0..6) the means of a float32 linspace(0.1, 1, 2^i + 1), both signs, plus
  # 0 and 1. Reproduced in float32 arithmetic so that the table is bit-identical.
  data = []
  for i in range(7):
    bounds = _linspace_f32(0.1, 1.0, 2 ** i + 1)
    means = ((bounds[:-1] + bounds[1:]) / np.float32(2.0)).astype(np.float32)
    decade = np.float32(10.0 ** (i - 6))
    data += list((decade * means).astype(np.float32))
    data += list((-(decade * means)).astype(np.float32))
  data += [np.float32(0.0), np.float32(1.0)]
  return tuple(float(v) for v in sorted(data))


def dynamic_code() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic code book [256] float32, sorted, in (−1, 1]."""
  return np.asarray(_dynamic_code_cached(), np.float32)


def midpoints(code: np.ndarray) -> np.ndarray:
  """Decision boundaries between consecutive code values, computed in float32 ([len(code) − 1])."""
  code = np.asarray(code, np.float32)
  return ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def dynamic_lut(lut_bits: int = 16) -> np.ndarray:
  """Nearest-code table on a ``2^lut_bits``-point grid of [−1, 1] for the dynamic code.

  bitsandbytes' CPU 8-bit kernel snaps the normalised value ``v`` to grid point
  ``g = trunc((v + 1)·½·(2^16 − 1) + ½)`` and looks up the code nearest to grid value
  ``−1 + 2g/(2^16 − 1)`` (ties to the lower code). Returns that table [2^lut_bits] uint8.
  """
  size = 2 ** lut_bits
  grid = (np.float32(-1.0) + (np.float32(2.0) * np.arange(size, dtype=np.float32))
          / np.float32(size - 1)).astype(np.float32)
  mids = midpoints(dynamic_code())
  return np.searchsorted(mids, grid, side="left").astype(np.uint8)


class DoubleQuant(NamedTuple):
  """How the first-level block scales are quantized again (see module docstring).

  Attributes:
    layout: ``"bnb"`` (offset = mean, signed 8-bit dynamic code, fp32 second-level scale) or
      ``"lq"`` (offset = min, unsigned uniform ``bits``-bit code, ``dtype`` second-level scale).
    bits: b0, bits per quantized scale (``"bnb"``: 8).
    block_size: B1, scales per second-level block (``"bnb"``: 256).
    dtype: dtype of the second-level scales (``"bnb"``: float32).
    lut_bits: ``"bnb"`` only: 16 reproduces bitsandbytes' CPU kernel bit for bit (it snaps the
      normalised scale to a 2^16-point grid before the nearest-code search); ``None`` picks the
      exactly nearest code (bitsandbytes' CUDA behaviour).
  """
  layout: str = "bnb"
  bits: int = 8
  block_size: int = 256
  dtype: str = "float32"
  lut_bits: int | None = 16


def bnb_double_quant(block_size: int = 256, lut_bits: int | None = 16) -> DoubleQuant:
  """bitsandbytes / QLoRA double quantization: mean offset, dynamic 8-bit code, fp32 scales."""
  return DoubleQuant("bnb", 8, block_size, "float32", lut_bits)


def lq_double_quant(bits: int = 8, block_size: int = 256, dtype: str = "float32") -> DoubleQuant:
  """LQ-LoRA double quantization: min offset, unsigned uniform ``bits``-bit code, ``dtype`` scales."""
  return DoubleQuant("lq", bits, block_size, dtype, None)


class QuantConfig(NamedTuple):
  """A blockwise quantization format (hashable: it is static pytree metadata).

  Attributes:
    format: ``"nf2" "nf3" "nf4" "nf8"`` (NormalFloat), ``"int2" … "int8"`` (symmetric uniform,
      absmax) or ``"uint1" … "uint8"`` (asymmetric uniform, min/max per block).
    block_size: B0, values per block; a power of two in [16, 4096] that divides the size of the
      (per-layer) tensor.
    double_quant: optional ``DoubleQuant`` of the block scales.
    scale_dtype: dtype of the first-level scales (and zero points) when not double quantized.
  """
  format: str = "nf4"
  block_size: int = 64
  double_quant: DoubleQuant | None = None
  scale_dtype: str = "float32"

  @property
  def kind(self) -> str:
    return _parse_format(self.format)[0]

  @property
  def bits(self) -> int:
    return _parse_format(self.format)[1]

  @property
  def asymmetric(self) -> bool:
    return self.kind == "uint"


def _parse_format(fmt: str) -> tuple[str, int]:
  m = _FORMAT_RE.match(str(fmt))
  if m is None:
    raise ValueError(
        f"Unknown quantization format {fmt!r}: use 'nf2', 'nf3', 'nf4', 'nf8' (NormalFloat), "
        f"'int2'…'int8' (symmetric uniform) or 'uint1'…'uint8' (asymmetric uniform).")
  kind, bits = m.group(1), int(m.group(2))
  if kind == "nf" and bits not in (2, 3, 4, 8):
    raise ValueError(f"NormalFloat formats are nf2, nf3, nf4 and nf8; got {fmt!r}.")
  if kind == "int" and bits < 2:
    raise ValueError(f"Symmetric int needs at least 2 bits; got {fmt!r} (use 'uint1').")
  return kind, bits


def code_book(config: QuantConfig) -> np.ndarray:
  """The first-level code book of ``config`` [2^bits] float32, sorted."""
  kind, bits = _parse_format(config.format)
  if kind == "nf":
    return nf_code(bits)
  return int_code(bits, symmetric=(kind == "int"))


def check_block_size(block_size: int, what: str = "block_size") -> None:
  if (not isinstance(block_size, (int, np.integer)) or block_size < MIN_BLOCK_SIZE
      or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1)):
    raise ValueError(
        f"Unsupported {what}={block_size!r}: use a power of two from {MIN_BLOCK_SIZE} to "
        f"{MAX_BLOCK_SIZE} (16, 32, 64, …, 4096).")


def validate(config: QuantConfig) -> QuantConfig:
  """Checks a configuration and returns it; raises ValueError naming the problem and the fix."""
  if not isinstance(config, QuantConfig):
    raise TypeError(f"Expected a growjax.quant.QuantConfig, got {type(config).__name__}.")
  _parse_format(config.format)
  check_block_size(config.block_size)
  if config.scale_dtype not in SCALE_DTYPES:
    raise ValueError(f"scale_dtype={config.scale_dtype!r}; allowed: {SCALE_DTYPES}.")
  dq = config.double_quant
  if dq is not None:
    if not isinstance(dq, DoubleQuant):
      raise TypeError(f"double_quant must be a DoubleQuant or None, got {type(dq).__name__}.")
    if dq.layout not in ("bnb", "lq"):
      raise ValueError(f"DoubleQuant layout {dq.layout!r}: use 'bnb' or 'lq'.")
    if not isinstance(dq.block_size, (int, np.integer)) or dq.block_size < 1:
      raise ValueError(f"DoubleQuant block_size must be a positive int, got {dq.block_size!r}.")
    if dq.dtype not in SCALE_DTYPES:
      raise ValueError(f"DoubleQuant dtype={dq.dtype!r}; allowed: {SCALE_DTYPES}.")
    if dq.layout == "bnb":
      if dq.bits != 8 or dq.dtype != "float32":
        raise ValueError("The 'bnb' double-quant layout is 8-bit with float32 second-level scales "
                         f"(got bits={dq.bits}, dtype={dq.dtype!r}); use lq_double_quant for others.")
      if dq.lut_bits not in (None, 16):
        raise ValueError(f"DoubleQuant lut_bits must be 16 or None, got {dq.lut_bits!r}.")
    elif not 1 <= dq.bits <= 8:
      raise ValueError(f"'lq' double quantization needs 1 <= bits <= 8, got {dq.bits}.")
  return config


_DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


def nominal_bits_per_param(config: QuantConfig) -> float:
  """``b + b0/B0 + b1/(B0·B1)``: storage per parameter of codes, scales and second-level constants.

  Per-tensor constants (the double-quantization offset) are not included; ``bits_per_param`` of
  a quantized tensor counts them too. Asymmetric formats store a zero point next to each scale.
  """
  validate(config)
  b, b0_blocks = config.bits, config.block_size
  n_first = 2 if config.asymmetric else 1
  if config.double_quant is None:
    return b + n_first * _DTYPE_BITS[config.scale_dtype] / b0_blocks
  dq = config.double_quant
  zero_bits = _DTYPE_BITS[config.scale_dtype] if config.asymmetric else 0
  return (b + (dq.bits + zero_bits) / b0_blocks
          + _DTYPE_BITS[dq.dtype] / (b0_blocks * dq.block_size))
