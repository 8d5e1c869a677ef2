"""Tests for growjax.quant formats, packing, double quantization and QuantizedTensor pytrees.

Oracles: the NF4 table printed in METHODS §3 and bitsandbytes' float32 literals; mpmath for the
NormalFloat formula; numpy's packbits for bit packing; an independent numpy re-implementation of
bitsandbytes' documented CPU algorithm (quantize_4bit and the C++ 8-bit blockwise kernel used for
double quantization) for bit-identical codes, bytes and scales.
"""

import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from growjax import quant
from growjax.quant import blockwise, formats

F32 = np.float32

# METHODS §3 (7 decimals) and bitsandbytes' functional.get_4bit_type("nf4") float32 literals.
NF4_7DEC = [-1, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0,
            0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1]
NF4_BNB = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


# Jitted once per (format, shape): eager op-by-op dispatch is what makes quantization tests slow.
_quantize = jax.jit(quant.quantize, static_argnames=("config", "batch_dims"))
_dequantize = jax.jit(quant.dequantize)


# ----------------------------------------------------------------------------- code books

def test_nf4_equals_bitsandbytes_table():
  code = quant.nf_code(4)
  np.testing.assert_allclose(code, np.array(NF4_7DEC), rtol=0, atol=5e-8)  # 7 decimals
  np.testing.assert_array_equal(code, np.array(NF4_BNB, F32))  # and bit for bit


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_code_matches_formula_in_mpmath(bits):
  mpmath.mp.dps = 30
  delta = mpmath.mpf("0.9677083")
  half = 2 ** (bits - 1)
  lo = [1 - delta + (mpmath.mpf("0.5") - (1 - delta)) * i / (half - 1) for i in range(half)]
  hi = [mpmath.mpf("0.5") + (delta - mpmath.mpf("0.5")) * i / half for i in range(half + 1)]
  ps = lo + hi[1:]
  denom = mpmath.sqrt(2) * mpmath.erfinv(2 * delta - 1)
  expect = np.array([float(mpmath.sqrt(2) * mpmath.erfinv(2 * p - 1) / denom) for p in ps])
  code = quant.nf_code(bits)
  assert code.shape == (2 ** bits,) and code.dtype == np.float32
  assert np.all(np.diff(code) > 0) and code[0] == -1 and code[-1] == 1
  assert np.sum(code == 0) == 1
  # The probability grid is float32-rounded (bitsandbytes' construction): ~1e-7 differences.
  np.testing.assert_allclose(code, expect, atol=3e-7)


def test_dynamic_code_structure():
  code = quant.dynamic_code()
  assert code.shape == (256,) and np.all(np.diff(code) > 0)
  assert code[-1] == 1.0 and 0.0 in code
  # 127 negative values mirror 127 positive ones; +1 has no negative partner.
  neg, pos = code[code < 0], code[(code > 0) & (code < 1)]
  np.testing.assert_array_equal(np.sort(-neg), pos)
  assert math.isclose(float(code[0]), -0.99296875, rel_tol=1e-6)
  assert math.isclose(float(pos.min()), 0.55e-6, rel_tol=1e-5)  # 10^-6 · mean(0.1, 1)


def test_int_codes():
  np.testing.assert_allclose(quant.int_code(4)[:15], np.arange(-7, 8) / 7, atol=1e-7)
  np.testing.assert_allclose(quant.int_code(3, symmetric=False), np.arange(8) / 7, atol=1e-7)


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_numpy_packbits(bits):
  rng = np.random.default_rng(bits)
  for n in (13, 64):
    codes = rng.integers(0, 2 ** bits, size=(3, n), dtype=np.uint8)
    bitstream = ((codes[..., None] >> np.arange(bits - 1, -1, -1)) & 1).reshape(3, -1)
    expect = np.packbits(bitstream.astype(np.uint8), axis=-1)  # big-endian, zero padded
    packed = quant.pack(jnp.asarray(codes), bits)
    np.testing.assert_array_equal(np.asarray(packed), expect)
    assert packed.shape[-1] == quant.packed_size(n, bits) == math.ceil(n * bits / 8)
    np.testing.assert_array_equal(np.asarray(quant.unpack(packed, bits, n)), codes)


def test_pack4_first_element_in_high_nibble():
  assert np.asarray(quant.pack(jnp.array([1, 2, 15, 0], jnp.uint8), 4)).tolist() == [0x12, 0xF0]


# ----------------------------------------------------------------------------- bitsandbytes reference

def _bnb_reference_nf4(x, block):
  """bitsandbytes 0.50 CPU quantize_4bit(quant_type="nf4") written out in numpy float32."""
  code = np.array(NF4_BNB, F32)
  bounds = ((code[:-1] + code[1:]) / F32(2)).astype(F32)
  xb = x.reshape(-1, block).astype(F32)
  absmax = np.abs(xb).max(axis=1)
  inv = (F32(1) / np.maximum(absmax, F32(1e-38))).astype(F32)
  scaled = np.clip((xb * inv[:, None]).astype(F32), F32(-1), F32(1)).reshape(-1)
  q = np.searchsorted(bounds, scaled, side="left").astype(np.uint8)  # torch.bucketize
  packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
  deq = (code[q].reshape(-1, block) * absmax[:, None]).astype(F32).reshape(x.shape)
  return packed, absmax, deq


def _bnb_reference_lut():
  """bitsandbytes' C++ build_quantize_lut for the dynamic code: 65536 grid points."""
  code = quant.dynamic_code()
  mids = (F32(0.5) * (code[:-1] + code[1:])).astype(F32)
  lut = np.zeros(65536, np.uint8)
  idx = 0
  for i in range(65536):
    val = F32(F32(-1.0) + F32(F32(2.0) * F32(i)) / F32(65535))
    while idx < 255 and mids[idx] < val:
      idx += 1
    lut[i] = idx
  return lut


def _bnb_reference_double_quant(absmax, lut):
  """compress_statistics=True: offset = mean, then the C++ 8-bit blockwise kernel (blocks of 256)."""
  n = absmax.shape[0]
  offset = F32(F32(np.sum(absmax.astype(np.float64))) / F32(n))  # exact sum, then / n
  centred = (absmax - offset).astype(F32)
  pad = (-n) % 256
  blocks = np.concatenate([centred, np.zeros(pad, F32)]).reshape(-1, 256)
  am2 = np.abs(blocks).max(axis=1)
  q = np.zeros(blocks.shape, np.uint8)
  for j, (blk, m) in enumerate(zip(blocks, am2)):
    if m == 0:
      continue
    inv = F32(F32(1.0) / m)
    v = np.clip((blk * inv).astype(F32), F32(-1), F32(1))
    g = ((((v + F32(1)) * F32(0.5)).astype(F32) * F32(65535)).astype(F32) + F32(0.5)).astype(F32)
    q[j] = lut[g.astype(np.int64)]
  q = q.reshape(-1)[:n]
  code = quant.dynamic_code()
  back = ((code[q].reshape(-1) * np.repeat(am2, 256)[:n]).astype(F32) + offset).astype(F32)
  return q, am2, offset, back


def _hard_matrix(shape, seed):
  """Gaussian weights plus exact ties on code midpoints, zero blocks and outliers."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * 0.02).astype(F32)
  flat = x.reshape(-1)
  code = np.array(NF4_BNB, F32)
  mids = ((code[:-1] + code[1:]) / F32(2)).astype(F32)
  flat[:64] = 0.0                                   # an all-zero block
  flat[64] = 1.0
  flat[65:65 + 15] = mids                           # exactly on the decision boundaries
  flat[128:128 + 15] = -mids
  flat[128 + 20] = -1.0
  flat[1000] = 3.0                                  # an outlier
  return x


@pytest.mark.parametrize("shape", [(128, 96), (64, 64), (256, 384)])
def test_nf4_bit_identical_to_bitsandbytes_reference(shape):
  x = _hard_matrix(shape, seed=sum(shape))
  packed, absmax, deq = _bnb_reference_nf4(x, 64)
  q = jax.jit(lambda a: quant.quantize(a, quant.QuantConfig("nf4", 64)))(x)
  np.testing.assert_array_equal(np.asarray(q.codes), packed)
  np.testing.assert_array_equal(np.asarray(q.scales), absmax)
  np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(q)), deq)


@pytest.fixture(scope="module")
def bnb_lut():
  return _bnb_reference_lut()


@pytest.mark.parametrize("shape", [(128, 96), (256, 384), (96, 80)])
def test_double_quant_bit_identical_to_bitsandbytes_reference(shape, bnb_lut):
  x = _hard_matrix(shape, seed=7 + sum(shape))
  packed, absmax, _ = _bnb_reference_nf4(x, 64)
  q8, am2, offset, back = _bnb_reference_double_quant(absmax, bnb_lut)
  cfg = quant.QuantConfig("nf4", 64, quant.bnb_double_quant())
  q = jax.jit(lambda a: quant.quantize(a, cfg))(x)
  assert isinstance(q.scales, quant.QuantizedScales)
  np.testing.assert_array_equal(np.asarray(q.codes), packed)
  assert np.asarray(q.scales.offset) == offset
  np.testing.assert_array_equal(np.asarray(q.scales.codes), q8)
  np.testing.assert_array_equal(np.asarray(q.scales.scale2), am2)
  np.testing.assert_array_equal(np.asarray(q.scales.dequantize()), back)
  # Under jit too (XLA would otherwise contract code·scale2 + offset into one FMA).
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda s: s.dequantize())(q.scales)), back)
  code = np.array(NF4_BNB, F32)
  codes = np.stack([packed >> 4, packed & 15], -1).reshape(-1)
  expect = (code[codes].reshape(-1, 64) * back[:, None]).astype(F32).reshape(shape)
  np.testing.assert_array_equal(np.asarray(_dequantize(q)), expect)


def test_accurate_sum_is_correctly_rounded():
  rng = np.random.default_rng(0)
  f = jax.jit(blockwise.accurate_sum)
  for n in (1, 3, 1000, 65537):
    a = (np.abs(rng.standard_normal(n)) * rng.uniform(0.01, 10)).astype(F32)
    assert np.asarray(f(a)) == F32(np.sum(a.astype(np.float64)))


def test_exact_nearest_dynamic_code_without_lut():
  scales = np.abs(np.random.default_rng(1).standard_normal(512)).astype(F32)
  second = jax.jit(lambda s: blockwise.double_quantize(s, quant.bnb_double_quant(lut_bits=None)))(
      jnp.asarray(scales))
  code = quant.dynamic_code()
  v = (scales - np.asarray(second.offset)).reshape(-1, 256) / np.asarray(second.scale2)[:, None]
  nearest = np.abs(v.reshape(-1)[:, None] - code[None, :]).argmin(axis=1)
  chosen = np.asarray(second.codes)
  # Equal except where two codes are equally near (then the lower one is taken).
  d_chosen = np.abs(v.reshape(-1) - code[chosen])
  d_best = np.abs(v.reshape(-1) - code[nearest])
  np.testing.assert_allclose(d_chosen, d_best, atol=1e-7)


# ----------------------------------------------------------------------------- formats, errors

@pytest.mark.parametrize("fmt", ["nf2", "nf3", "nf4", "nf8", "int2", "int4", "int8",
                                 "uint1", "uint3", "uint4", "uint8"])
@pytest.mark.parametrize("block", [16, 64, 4096])
def test_roundtrip_error_within_half_a_step(fmt, block):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((64, 128)).astype(F32)
  cfg = quant.QuantConfig(fmt, block)
  q = _quantize(x, cfg)
  deq = np.asarray(_dequantize(q))
  xb, db = x.reshape(-1, block), deq.reshape(-1, block)
  code = formats.code_book(cfg)
  if cfg.asymmetric:
    scale = xb.max(1) - xb.min(1)
    bound = scale * (0.5 / (2 ** cfg.bits - 1))
  else:
    scale = np.abs(xb).max(1)
    bound = scale * 0.5 * np.max(np.diff(np.unique(code)))
  assert np.all(np.abs(xb - db) <= bound[:, None] * (1 + 1e-5) + 1e-6)
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (quant.packed_size(x.size, cfg.bits),)


def test_bits_per_param_and_packed_size():
  x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(F32)
  q = _quantize(x, quant.QuantConfig("nf4", 64))
  assert quant.bits_per_param(q) == 4.5
  assert quant.nominal_bits_per_param(q.config) == 4.5
  dq = _quantize(x, quant.QuantConfig("nf4", 64, quant.bnb_double_quant()))
  assert round(quant.bits_per_param(dq), 3) == 4.127  # 4 + 8/64 + 32/(64·256) + offset
  assert quant.nominal_bits_per_param(dq.config) == 4 + 8 / 64 + 32 / (64 * 256)
  lq = _quantize(x, quant.QuantConfig("nf3", 32, quant.lq_double_quant(6, 128, "bfloat16")))
  assert math.isclose(quant.bits_per_param(lq), 3 + 6 / 32 + 16 / (32 * 128) + 32 / x.size)
  assert math.isclose(quant.nominal_bits_per_param(lq.config), 3 + 6 / 32 + 16 / (32 * 128))
  # Packed NF4 bytes vs float32 bytes, measured from the arrays.
  params = {"dense": {"kernel": jnp.asarray(x)}, "out": {"kernel": jnp.asarray(x[:, :256])}}
  qparams = jax.jit(lambda p: quant.quantize_tree(p, "kernel$"))(params)
  ratio = quant.storage_bytes(qparams) / quant.storage_bytes(params)
  assert ratio <= 0.3 and math.isclose(ratio, 4.5 / 32)
  assert sum(l.nbytes for l in jax.tree.leaves(qparams)) == quant.storage_bytes(qparams)


def test_lq_double_quant_layout():
  scales = jnp.asarray(np.random.default_rng(2).uniform(0.5, 2.0, 1000).astype(F32))
  for dtype in ("float32", "bfloat16", "float16"):
    dq = quant.lq_double_quant(bits=4, block_size=100, dtype=dtype)
    second = jax.jit(lambda s, dq=dq: blockwise.double_quantize(s, dq))(scales)
    assert second.scale2.dtype == jnp.dtype(dtype) and second.scale2.shape == (10,)
    assert float(second.offset) == float(jnp.min(scales))
    back = blockwise.double_dequantize(second, dq, 1000)
    step = np.repeat(np.asarray(second.scale2, F32), 100) / 15
    err = np.abs(np.asarray(back) - np.asarray(scales))
    # Half a step plus the rounding of the stored second-level scale.
    slack = 0.0 if dtype == "float32" else 2.0 ** -7 * np.repeat(np.asarray(second.scale2, F32), 100)
    assert np.all(err <= step / 2 + slack + 1e-6)


def test_bad_inputs_raise_clear_errors():
  x = jnp.ones((10, 10))
  with pytest.raises(ValueError, match="does not divide"):
    quant.quantize(x, quant.QuantConfig("nf4", 64))
  with pytest.raises(ValueError, match="power of two"):
    quant.quantize(jnp.ones((96, 96)), quant.QuantConfig("nf4", 48))
  with pytest.raises(ValueError, match="power of two"):
    quant.quantizer("nf4", block_size=8192)
  with pytest.raises(TypeError, match="floating-point"):
    quant.quantize(jnp.ones((64, 64), jnp.int32))
  with pytest.raises(ValueError, match="Unknown quantization format 'fp4'"):
    quant.quantizer("fp4")
  with pytest.raises(ValueError, match="nf2, nf3, nf4 and nf8"):
    quant.quantizer("nf5")
  with pytest.raises(ValueError, match="'bnb' double-quant layout is 8-bit"):
    quant.quantizer(double_quant=quant.DoubleQuant("bnb", 4))


# ----------------------------------------------------------------------------- pytree behaviour

def test_quantized_tensor_is_a_pytree_under_jit_vmap_scan():
  rng = np.random.default_rng(5)
  stack = rng.standard_normal((3, 32, 64)).astype(F32)
  cfg = quant.QuantConfig("nf4", 64, quant.bnb_double_quant())
  q = _quantize(stack, cfg, batch_dims=1)
  assert q.shape == (3, 32, 64) and q.codes.shape == (3, 32 * 64 // 2)
  per_layer = [_dequantize(_quantize(stack[i], cfg)) for i in range(3)]
  np.testing.assert_array_equal(np.asarray(_dequantize(q)), np.stack(per_layer))
  # Key paths name the storage (orbax / tree utilities see them).
  keys = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
  assert keys == [".codes", ".scales.codes", ".scales.scale2", ".scales.offset"]

  x = jnp.asarray(rng.standard_normal((5, 32)).astype(F32))

  @jax.jit
  def run(qt, h):
    def body(h, layer):  # lax.scan slices the QuantizedTensor into per-layer ones
      return jnp.tanh(h @ layer.dequantize()[:, :32]), None
    return jax.lax.scan(body, h, qt)[0]

  expect = x
  for w in per_layer:
    expect = jnp.tanh(expect @ w[:, :32])
  np.testing.assert_allclose(np.asarray(run(q, x)), np.asarray(expect), rtol=1e-5, atol=1e-6)
  vm = jax.jit(jax.vmap(quant.dequantize))(q)
  np.testing.assert_array_equal(np.asarray(vm), np.stack(per_layer))


def test_quantize_tree_by_regex():
  rng = np.random.default_rng(6)
  params = {"emb": {"embedding": jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)},
            "layers": {"kernel": jnp.asarray(rng.standard_normal((2, 16, 64)), jnp.float32),
                       "bias": jnp.zeros((2, 64))},
            "head": {"kernel": jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)}}
  qp = jax.jit(lambda p: quant.quantize_tree(p, "kernel$", quant.QuantConfig("nf4", 64),
                                             exclude="head", batch_dims={"layers/": 1}))(params)
  assert quant.is_quantized(qp["layers"]["kernel"]) and qp["layers"]["kernel"].batch_shape == (2,)
  assert not quant.is_quantized(qp["head"]["kernel"])
  np.testing.assert_array_equal(qp["emb"]["embedding"], params["emb"]["embedding"])
  back = jax.jit(quant.dequantize_tree)(qp)
  assert jax.tree.map(jnp.shape, back) == jax.tree.map(jnp.shape, params)
  with pytest.raises(KeyError, match="Available paths"):
    quant.quantize_tree(params, "no_such_layer")


def test_bfloat16_input_roundtrips_dtype():
  x = jnp.asarray(np.random.default_rng(8).standard_normal((32, 64)), jnp.bfloat16)
  q = _quantize(x)
  assert _dequantize(q).dtype == jnp.bfloat16 and q.dtype == jnp.bfloat16
