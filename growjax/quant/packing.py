"""Dense bit packing of k-bit code indices into bytes (the storage of quantized tensors).

Codes are packed big-endian: the first element occupies the most significant bits. For 4 bits
this is bitsandbytes' layout (two codes per byte, first element in the high nibble; Dettmers et
al. 2023, QLoRA, arXiv:2305.14314); 2 bits put four codes in a byte; 3, 5, 6 and 7 bits are packed
densely as a bit stream (8 three-bit codes in 3 bytes, …), so ``n`` k-bit codes take exactly
``ceil(n·k/8)`` bytes.

For 4 and 2 bits the codes of one byte are read as one little-endian uint16 / uint32
(``lax.bitcast_convert_type``) and the byte is assembled with multiply-adds (``lo_byte·16 +
hi_byte``). Written as ``codes[0::2]·16 + codes[1::2]``, XLA:CPU fuses the stride-2 reads into the
loop that computes the codes and LLVM no longer vectorises it: the whole NF4 quantization ran
about 5× slower (benchmarks/quant.py measures the alternatives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def packed_size(n: int, bits: int) -> int:
  """Bytes needed for ``n`` codes of ``bits`` bits."""
  return -(-n * bits // 8)


def _check_bits(bits: int) -> None:
  if not 1 <= bits <= 8:
    raise ValueError(f"Packing supports 1 to 8 bits per code, got bits={bits}.")


def _trailing(v: np.ndarray, ndim: int) -> np.ndarray:
  """Reshapes a 1-D constant to broadcast along the last axis of a rank-``ndim`` array (strict
  rank promotion forbids implicit rank broadcasting)."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


def _group(bits: int) -> tuple[int, int]:
  """(codes, bytes) of the smallest whole-byte group: lcm(bits, 8)/bits codes in lcm/8 bytes."""
  lcm = int(np.lcm(bits, 8))
  return lcm // bits, lcm // 8


def pack(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
  """Packs code indices along the last axis.

  Args:
    codes: [..., n] unsigned integer codes, each < 2**bits.
    bits: bits per code, 1..8.

  Returns:
    [..., ceil(n·bits/8)] uint8.
  """
  _check_bits(bits)
  codes = jnp.asarray(codes).astype(jnp.uint8)
  if bits == 8:
    return codes
  *lead, n = codes.shape
  per_group, group_bytes = _group(bits)
  pad = (-n) % per_group
  if pad:
    codes = jnp.concatenate([codes, jnp.zeros((*lead, pad), jnp.uint8)], axis=-1)
  if bits in (2, 4):
    # One wide word per output byte; its little-endian bytes are the codes in order.
    word = jnp.uint16 if bits == 4 else jnp.uint32
    w = jax.lax.bitcast_convert_type(codes.reshape(*lead, -1, per_group), word)
    out = w & word(0xFF)
    for j in range(1, per_group):
      out = out * word(2 ** bits) + ((w >> word(8 * j)) & word(0xFF))
    return out.astype(jnp.uint8)[..., :packed_size(n, bits)]
  if bits == 1:
    # Whole codes per byte: Horner's rule with multiply-adds.
    g = codes.reshape(*lead, -1, per_group)
    out = g[..., 0]
    for j in range(1, per_group):
      out = out * np.uint8(2 ** bits) + g[..., j]
    return out[..., :packed_size(n, bits)]
  # 3, 5, 6, 7 bits: expand to a big-endian bit stream and regroup by 8.
  del group_bytes
  shifts = _trailing(np.arange(bits - 1, -1, -1, dtype=np.uint8), codes.ndim + 1)
  bit_stream = (codes[..., None] >> shifts) & np.uint8(1)
  bit_stream = bit_stream.reshape(*lead, -1, 8)
  weights = _trailing((2 ** np.arange(7, -1, -1)).astype(np.uint8), bit_stream.ndim)
  out = jnp.sum(bit_stream * weights, axis=-1, dtype=jnp.uint8)
  return out[..., :packed_size(n, bits)]


def unpack(packed: jnp.ndarray, bits: int, n: int) -> jnp.ndarray:
  """Inverse of ``pack``: [..., ceil(n·bits/8)] uint8 -> [..., n] uint8 codes."""
  _check_bits(bits)
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise TypeError(f"Packed codes must be uint8, got {packed.dtype}.")
  if packed.shape[-1] != packed_size(n, bits):
    raise ValueError(f"{n} codes of {bits} bits take {packed_size(n, bits)} bytes; the packed "
                     f"array has {packed.shape[-1]} in its last axis.")
  if bits == 8:
    return packed
  *lead, _ = packed.shape
  if bits in (1, 2, 4):
    shifts = _trailing(np.arange(8 - bits, -1, -bits, dtype=np.uint8), packed.ndim + 1)
    codes = (packed[..., None] >> shifts) & np.uint8(2 ** bits - 1)
    return codes.reshape(*lead, -1)[..., :n]
  shifts = _trailing(np.arange(7, -1, -1, dtype=np.uint8), packed.ndim + 1)
  bit_stream = (packed[..., None] >> shifts) & np.uint8(1)
  n_full = bit_stream.shape[-2] * 8 // bits
  bit_stream = bit_stream.reshape(*lead, -1)[..., :n_full * bits].reshape(*lead, n_full, bits)
  weights = _trailing((2 ** np.arange(bits - 1, -1, -1)).astype(np.uint8), bit_stream.ndim)
  return jnp.sum(bit_stream * weights, axis=-1, dtype=jnp.uint8)[..., :n]
