"""Blockwise quantization kernels on one flattened tensor: first level and double quantization.

Pure jnp functions on a 1-D float array ``x`` [n] (the row-major flattening of one weight
matrix); ``growjax.quant.tensor`` vmaps them over stacked layers and wraps the result in a
pytree. The first level follows bitsandbytes' algorithm for 4-bit quantization (Dettmers et al.
2023, QLoRA, arXiv:2305.14314): per block of B0 values the absolute maximum ``m``, the normalised
values ``clip(x · (1/m), −1, 1)`` (a reciprocal and a multiply, as bitsandbytes computes them),
and the index of the nearest code value by bucketizing against the float32 midpoints of the code
book (a value exactly on a midpoint takes the lower code). With that, code indices, packed bytes
and scales are bit-identical to bitsandbytes' CPU path (checked in tests/test_quant.py against a
numpy re-implementation and in benchmarks/quant.py against bitsandbytes itself).

Double quantization of the block scales (see ``growjax.quant.formats``):

* ``"bnb"``: offset = mean of the scales (an accurately summed float32 sum divided by the count,
  which is how torch's ``mean`` finishes; torch's own float32 summation order depends on its thread
  count, so its last bit can differ — benchmarks/quant.py reports the offsets side by side),
  signed 8-bit dynamic code per block of 256 with an fp32 absmax, bitsandbytes' CPU grid snapping
  (``lut_bits=16``) or the exact nearest code (``lut_bits=None``);
* ``"lq"`` (Guo et al. 2023, LQ-LoRA, arXiv:2311.12023): offset = min of the scales, per
  second-level block an unsigned uniform ``bits``-bit code scaled by the block's maximum of
  ``scale − offset``, stored in the selected dtype (quantization uses the rounded second-level
  scale, so what is stored is what was used).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from growjax.quant import formats
from growjax.quant import packing

_COMPARE_SUM_MAX = 31      # up to this many midpoints, count comparisons instead of searching.


def nearest_code(s: jnp.ndarray, code: np.ndarray) -> jnp.ndarray:
  """Index of the nearest value of the sorted ``code`` book for each entry of ``s`` (uint8).

  Equals ``count(midpoints < s)``: bucketize with ties going to the lower code (bitsandbytes'
  ``torch.bucketize(s, midpoints)``). Small code books count comparisons, which XLA fuses into one
  vectorised loop; large ones (8 bits) use a search.
  """
  mids = formats.midpoints(code)
  if len(mids) <= _COMPARE_SUM_MAX:
    idx = jnp.zeros(s.shape, jnp.uint8)
    for m in mids:
      idx = idx + (s > m).astype(jnp.uint8)
    return idx
  return jnp.searchsorted(jnp.asarray(mids), s, side="left", method="compare_all").astype(jnp.uint8)


def block_reduce(xb: jnp.ndarray, op, reducer) -> jnp.ndarray:
  """Reduces the last axis (a power of two) of ``xb`` [..., B] to [..., 1].

  Halves with the elementwise ``op`` (``jnp.maximum``) down to 8 values, then finishes with the
  matching reduction (``jnp.max``). On the 4096×4096 benchmark a plain row reduction over short
  rows (B = 64) ran about 5× slower under XLA:CPU than the elementwise halving, and ending on a
  reduction op keeps XLA from re-fusing the halving tree into every consumer of the scale
  (which recomputed it per element).
  """
  while xb.shape[-1] > 8:
    half = xb.shape[-1] // 2
    xb = op(xb[..., :half], xb[..., half:])
  return reducer(xb, axis=-1, keepdims=True)


def _safe_reciprocal(scale: jnp.ndarray) -> jnp.ndarray:
  """``1/scale``, and 0 for an all-zero block (whose values then map to the code nearest 0).

  bitsandbytes clamps the scale to 1e-38 before the reciprocal; that is a float32 subnormal, which
  XLA:CPU flushes to zero, so the zero block is handled explicitly (same codes as bitsandbytes).
  """
  return jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)


def _uniform_index(t: jnp.ndarray, levels: int) -> jnp.ndarray:
  """Nearest integer level of ``t`` in [0, levels] (ties to the lower level) as uint8."""
  return jnp.clip(jnp.ceil(t - 0.5), 0, levels).astype(jnp.uint8)


def accurate_sum(x: jnp.ndarray) -> jnp.ndarray:
  """float32 sum of a 1-D array with error-free pairwise summation (TwoSum at every level).

  The carried error terms make the result the float32 rounding of the exact sum up to
  O(n·eps²); XLA's default reduction can be off by several ulps on 10⁵–10⁶ terms, which would
  change the double-quantization offset.
  """
  x = x.astype(jnp.float32)
  n = x.shape[0]
  size = 1 << max(int(n - 1).bit_length(), 0)
  if size != n:
    x = jnp.concatenate([x, jnp.zeros((size - n,), jnp.float32)])
  s, e = x, jnp.zeros_like(x)
  while s.shape[0] > 1:
    pairs, errs = s.reshape(-1, 2), e.reshape(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    t = a + b
    bb = t - a
    err = (a - (t - bb)) + (b - bb)  # Knuth's TwoSum: a + b == t + err exactly.
    s, e = t, errs[:, 0] + errs[:, 1] + err
  return s[0] + e[0]


class FirstLevel(NamedTuple):
  """First-level result for one tensor: codes [n] uint8 (unpacked), scales [nb], zeros [nb] | None."""
  codes: jnp.ndarray
  scales: jnp.ndarray
  zeros: jnp.ndarray | None


def quantize_first_level(x: jnp.ndarray, config: formats.QuantConfig) -> FirstLevel:
  """Blockwise quantization of a flat tensor.

  Args:
    x: [n] float, n divisible by ``config.block_size``.
    config: the format.

  Returns:
    ``FirstLevel`` with unpacked codes [n] uint8, scales [n / B0] float32 (rounded through
    ``config.scale_dtype``) and, for asymmetric formats, zero points [n / B0] float32.
  """
  block = config.block_size
  xb = x.astype(jnp.float32).reshape(-1, block)
  sdt = jnp.dtype(config.scale_dtype)
  if config.asymmetric:
    lo = block_reduce(xb, jnp.minimum, jnp.min).astype(sdt).astype(jnp.float32)
    hi = block_reduce(xb, jnp.maximum, jnp.max)
    scale = (hi - lo).astype(sdt).astype(jnp.float32)
    inv = _safe_reciprocal(scale)
    levels = 2 ** config.bits - 1
    codes = _uniform_index((xb - lo) * inv * np.float32(levels), levels)
    return FirstLevel(codes.reshape(-1), scale[:, 0], lo[:, 0])
  absmax = block_reduce(jnp.abs(xb), jnp.maximum, jnp.max).astype(sdt).astype(jnp.float32)
  inv = _safe_reciprocal(absmax)
  s = jnp.clip(xb * inv, -1.0, 1.0)
  if config.kind == "int":
    lim = 2 ** (config.bits - 1) - 1
    codes = _uniform_index(s * np.float32(lim) + np.float32(lim), 2 * lim)
  else:
    codes = nearest_code(s, formats.code_book(config))
  return FirstLevel(codes.reshape(-1), absmax[:, 0], None)


def _byte_table(config: formats.QuantConfig) -> np.ndarray:
  """[256, 8/bits] float32: the code values of the codes packed in each possible byte."""
  bits, code = config.bits, formats.code_book(config)
  per = 8 // bits
  byte = np.arange(256)
  cols = [code[(byte >> (8 - bits * (j + 1))) & (2 ** bits - 1)] for j in range(per)]
  return np.stack(cols, axis=1).astype(np.float32)


def dequantize_first_level(packed: jnp.ndarray, scales: jnp.ndarray, zeros: jnp.ndarray | None,
                           config: formats.QuantConfig, n: int) -> jnp.ndarray:
  """``code[q] · scale (+ zero)`` per block from packed codes.

  Args:
    packed: [ceil(n·bits/8)] uint8 packed codes.
    scales: [nb] first-level scales; zeros: [nb] zero points or None.
    config: the format.
    n: number of values.

  Returns:
    [n] float32.
  """
  idx = packed.astype(jnp.int32)
  if config.bits in (2, 4, 8):
    # One gather per byte from a [256, 8/bits] table of value tuples (2x faster than unpacking
    # the codes and gathering each). Indices are bytes, in bounds by construction; without the
    # promise XLA clamps every index.
    vals = jnp.asarray(_byte_table(config)).at[idx].get(mode="promise_in_bounds")
  else:
    codes = packing.unpack(packed, config.bits, n).astype(jnp.int32)
    vals = jnp.asarray(formats.code_book(config)).at[codes].get(mode="promise_in_bounds")
  vals = vals.reshape(-1)[:n].reshape(scales.shape[0], -1)
  out = vals * scales.astype(jnp.float32)[:, None]
  if zeros is not None:
    out = out + zeros.astype(jnp.float32)[:, None]
  return out.reshape(-1)


class SecondLevel(NamedTuple):
  """Double-quantized scales: codes [nb] uint8 (unpacked), scale2 [nb2], offset [] float32."""
  codes: jnp.ndarray
  scale2: jnp.ndarray
  offset: jnp.ndarray


def _pad_blocks(v: jnp.ndarray, block: int) -> jnp.ndarray:
  n = v.shape[0]
  pad = (-n) % block
  if pad:
    v = jnp.concatenate([v, jnp.zeros((pad,), v.dtype)])
  return v.reshape(-1, block)


def double_quantize(scales: jnp.ndarray, dq: formats.DoubleQuant,
                    offset: jnp.ndarray | None = None) -> SecondLevel:
  """Quantizes first-level scales [nb] in the ``dq`` layout.

  Args:
    scales: [nb] float32 first-level scales.
    dq: the layout.
    offset: optional override of the offset (mean for ``"bnb"``, min for ``"lq"``), e.g. to
      reproduce another implementation's float32 mean exactly; the default computes it.

  Returns:
    ``SecondLevel`` (a partial last second-level block is zero padded for its maximum only).
  """
  scales = scales.astype(jnp.float32)
  nb = scales.shape[0]
  if dq.layout == "bnb":
    if offset is None:
      offset = accurate_sum(scales) / np.float32(nb)
    centred = _pad_blocks(scales - offset, dq.block_size)
    absmax2 = jnp.max(jnp.abs(centred), axis=1, keepdims=True)
    v = jnp.clip(centred * _safe_reciprocal(absmax2), -1.0, 1.0)
    if dq.lut_bits is None:
      codes = nearest_code(v, formats.dynamic_code())
    else:
      size = 2 ** dq.lut_bits
      grid = (((v + 1.0) * 0.5) * np.float32(size - 1) + 0.5).astype(jnp.int32)
      codes = jnp.asarray(formats.dynamic_lut(dq.lut_bits))[jnp.clip(grid, 0, size - 1)]
    codes = jnp.where(absmax2 == 0.0, jnp.uint8(0), codes)
    return SecondLevel(codes.reshape(-1)[:nb], absmax2[:, 0], jnp.asarray(offset, jnp.float32))
  # "lq": non-negative offsets from the minimum, unsigned uniform code per block.
  if offset is None:
    offset = jnp.min(scales)
  centred = _pad_blocks(scales - offset, dq.block_size)
  scale2 = jnp.max(centred, axis=1, keepdims=True).astype(dq.dtype).astype(jnp.float32)
  levels = 2 ** dq.bits - 1
  t = centred * (np.float32(levels) * _safe_reciprocal(scale2))
  codes = _uniform_index(t, levels)
  return SecondLevel(codes.reshape(-1)[:nb], scale2[:, 0].astype(dq.dtype),
                     jnp.asarray(offset, jnp.float32))


def _rounded(product: jnp.ndarray, offset: jnp.ndarray) -> jnp.ndarray:
  """``product``, opaque to floating-point contraction with a following add.

  bitsandbytes rounds ``code · scale2`` to float32 and then adds the offset; XLA:CPU contracts
  ``a·b + c`` into one FMA (a single rounding), which changes the last bit of about 7% of the
  scales (and ``optimization_barrier`` is removed before fusion). Passing the product's bits
  through an XOR with a value the compiler cannot prove zero (``offset != offset``, i.e. 0 unless
  the offset is NaN) keeps the product a rounded float32.
  """
  bits = jax.lax.bitcast_convert_type(product, jnp.uint32)
  opaque_zero = (offset != offset).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(bits ^ opaque_zero, jnp.float32)


def double_dequantize(second: SecondLevel, dq: formats.DoubleQuant, nb: int) -> jnp.ndarray:
  """Reconstructs the first-level scales [nb] float32 from their double quantization."""
  codes = _pad_blocks(second.codes.astype(jnp.int32), dq.block_size)
  scale2 = second.scale2.astype(jnp.float32)[:, None]
  if dq.layout == "bnb":
    vals = jnp.asarray(formats.dynamic_code())[codes] * scale2
  else:
    vals = codes.astype(jnp.float32) * (scale2 / np.float32(2 ** dq.bits - 1))
  vals = _rounded(vals, second.offset)
  return (vals.reshape(-1)[:nb] + second.offset).astype(jnp.float32)


def check_divisible(n: int, block: int, shape) -> None:
  if n % block:
    fits = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if n % b == 0]
    raise ValueError(
        f"block_size={block} does not divide the {n} values of a tensor of shape {tuple(shape)}; "
        f"block sizes that divide it: {fits or 'none (pad the tensor or leave it unquantized)'}.")

