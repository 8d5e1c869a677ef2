"""``QuantizedTensor``: a packed, blockwise-quantized array as a pytree, and parameter-tree quantization.

The codes are stored packed (two NF4 codes per byte, …) and the block scales either as floats or
double quantized (``QuantizedScales``); the format, the per-layer shape and the dtype are static
aux data, so a ``QuantizedTensor`` passes through ``jax.jit``, ``jax.vmap``, ``lax.scan``,
sharding and orbax like any other pytree, and ``dequantize`` runs inside the jitted function.

Stacked layers (a kernel [L, d_in, d_out] scanned over its leading axis) are quantized per layer
with ``batch_dims=1``: every leaf then carries the leading layer axis, so ``lax.scan`` slices a
``QuantizedTensor`` into per-layer ones that dequantize on their own.

Formats after Dettmers et al. 2023 (QLoRA, arXiv:2305.14314) and Guo et al. 2023 (LQ-LoRA,
arXiv:2311.12023); see ``growjax.quant.formats``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from growjax import tree as gtree
from growjax.quant import blockwise
from growjax.quant import formats
from growjax.quant import packing

PyTree = Any


def _attr(name: str):
  return jax.tree_util.GetAttrKey(name)


@jax.tree_util.register_pytree_with_keys_class
class QuantizedScales:
  """Double-quantized first-level scales.

  Leaves: ``codes`` [..., ceil(nb·b0/8)] uint8 (packed), ``scale2`` [..., nb2] (second-level
  scales in the layout's dtype), ``offset`` [...] float32. Static: the ``DoubleQuant`` layout and
  ``nb``, the number of first-level scales per tensor.
  """

  def __init__(self, codes, scale2, offset, *, layout: formats.DoubleQuant, nb: int):
    self.codes, self.scale2, self.offset = codes, scale2, offset
    self.layout, self.nb = layout, nb

  def tree_flatten_with_keys(self):
    return (((_attr("codes"), self.codes), (_attr("scale2"), self.scale2),
             (_attr("offset"), self.offset)), (self.layout, self.nb))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, layout=aux[0], nb=aux[1])

  def dequantize(self) -> jnp.ndarray:
    """First-level scales [..., nb] float32."""
    codes = packing.unpack(self.codes, self.layout.bits, self.nb)
    fn = lambda c, s2, off: blockwise.double_dequantize(
        blockwise.SecondLevel(c, s2, off), self.layout, self.nb)
    return _map_batch(fn, (codes, self.scale2, self.offset), self.offset.ndim)

  def __repr__(self):
    return (f"QuantizedScales(layout={self.layout.layout!r}, bits={self.layout.bits}, "
            f"nb={self.nb}, batch={tuple(np.shape(self.offset))})")


@jax.tree_util.register_pytree_with_keys_class
class QuantizedTensor:
  """A blockwise-quantized tensor with packed codes.

  Leaves: ``codes`` [*batch, ceil(n·bits/8)] uint8, ``scales`` [*batch, n/B0] (or a
  ``QuantizedScales``), ``zeros`` [*batch, n/B0] for asymmetric formats else ``None``.
  Static: ``config`` (``QuantConfig``), ``inner_shape`` (the shape of one tensor without the
  batch/layer axes) and ``dtype_name`` (the dtype ``dequantize`` returns).
  """

  def __init__(self, codes, scales, zeros, *, config: formats.QuantConfig,
               inner_shape: tuple[int, ...], dtype_name: str):
    self.codes, self.scales, self.zeros = codes, scales, zeros
    self.config, self.inner_shape, self.dtype_name = config, tuple(inner_shape), dtype_name

  def tree_flatten_with_keys(self):
    return (((_attr("codes"), self.codes), (_attr("scales"), self.scales),
             (_attr("zeros"), self.zeros)), (self.config, self.inner_shape, self.dtype_name))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, config=aux[0], inner_shape=aux[1], dtype_name=aux[2])

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(np.shape(self.codes)[:-1])

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the dequantized array (batch/layer axes included)."""
    return self.batch_shape + self.inner_shape

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def dequantize(self) -> jnp.ndarray:
    return dequantize(self)

  def __repr__(self):
    dq = self.config.double_quant
    return (f"QuantizedTensor({self.config.format}, block={self.config.block_size}, "
            f"dq={dq.layout if dq else None}, shape={self.shape}, dtype={self.dtype_name})")


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedTensor)


def _map_batch(fn: Callable, args: tuple, n_batch: int):
  """Applies a per-tensor ``fn`` over ``n_batch`` leading axes shared by all ``args`` leaves."""
  if n_batch == 0:
    return fn(*args)
  leaves = [a for a in jax.tree.leaves(args)]
  batch = tuple(leaves[0].shape[:n_batch])
  flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[n_batch:]), args)
  out = jax.vmap(fn)(*flat)
  return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


def quantize(x: jnp.ndarray, config: formats.QuantConfig | None = None, *, batch_dims: int = 0,
             offset: jnp.ndarray | None = None) -> QuantizedTensor:
  """Quantizes ``x`` blockwise (row-major flattening of each of its trailing tensors).

  Args:
    x: floating array [*batch, *inner]; ``prod(inner)`` must be divisible by the block size.
    config: the format (default NF4, blocks of 64, no double quantization).
    batch_dims: number of leading axes quantized independently (1 for stacked layers
      [L, d_in, d_out] that ``lax.scan`` will slice).
    offset: optional double-quantization offset override (see ``blockwise.double_quantize``);
      shape [*batch].

  Returns:
    A ``QuantizedTensor``.

  Raises:
    TypeError: non-floating input. ValueError: unsupported/non-dividing block size, bad format.
  """
  config = formats.validate(config if config is not None else formats.QuantConfig())
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"quantize expects a floating-point array (float32/bfloat16/float16/float64), got dtype "
        f"{x.dtype} with shape {x.shape}; integer arrays are not weights — cast explicitly if "
        f"they are (x.astype(jnp.float32)).")
  if not 0 <= batch_dims <= x.ndim - 1:
    raise ValueError(f"batch_dims={batch_dims} must be in [0, {x.ndim - 1}] for shape {x.shape}.")
  inner = x.shape[batch_dims:]
  n = math.prod(inner)
  blockwise.check_divisible(n, config.block_size, inner)
  dq = config.double_quant

  def one(flat, off):
    first = blockwise.quantize_first_level(flat, config)
    codes = packing.pack(first.codes, config.bits)
    if dq is None:
      return codes, first.scales.astype(config.scale_dtype), first.zeros, None
    second = blockwise.double_quantize(first.scales, dq, off)
    return codes, packing.pack(second.codes, dq.bits), first.zeros, second

  off = None if offset is None else jnp.asarray(offset, jnp.float32)
  flat = x.reshape(x.shape[:batch_dims] + (n,))
  if batch_dims == 0:
    codes, scales, zeros, second = one(flat, off)
  else:
    fn = (lambda f: one(f, None)) if off is None else one
    args = (flat,) if off is None else (flat, off)
    codes, scales, zeros, second = _map_batch(fn, args, batch_dims)
  if zeros is not None:
    zeros = zeros.astype(config.scale_dtype)
  if second is not None:
    scales = QuantizedScales(scales, second.scale2, second.offset, layout=dq,
                             nb=n // config.block_size)
  return QuantizedTensor(codes, scales, zeros, config=config, inner_shape=inner,
                         dtype_name=jnp.dtype(x.dtype).name)


def dequantize(q: QuantizedTensor) -> jnp.ndarray:
  """The array a ``QuantizedTensor`` represents, [*batch, *inner] in its original dtype."""
  if not is_quantized(q):
    raise TypeError(f"dequantize expects a QuantizedTensor, got {type(q).__name__}.")
  config = q.config
  n = math.prod(q.inner_shape)
  n_batch = len(q.batch_shape)
  scales = q.scales.dequantize() if isinstance(q.scales, QuantizedScales) else q.scales

  def one(codes, sc, zeros):
    return blockwise.dequantize_first_level(codes, sc, zeros, config, n)

  flat = _map_batch(one, (q.codes, scales, q.zeros), n_batch)
  return flat.reshape(q.batch_shape + q.inner_shape).astype(q.dtype)


def reshape(q: QuantizedTensor, inner_shape: tuple[int, ...]) -> QuantizedTensor:
  """Same storage viewed with another per-tensor shape of equal size (row-major order kept)."""
  inner_shape = tuple(int(d) for d in inner_shape)
  if math.prod(inner_shape) != math.prod(q.inner_shape):
    raise ValueError(f"Cannot view a quantized {q.inner_shape} tensor as {inner_shape}: sizes differ.")
  return QuantizedTensor(q.codes, q.scales, q.zeros, config=q.config, inner_shape=inner_shape,
                         dtype_name=q.dtype_name)


def dequantize_tree(tree: PyTree) -> PyTree:
  """Replaces every ``QuantizedTensor`` in ``tree`` by its dequantized array."""
  return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, tree,
                      is_leaf=is_quantized)


class Quantizer(NamedTuple):
  """A format with its pure functions (optax style); the caller decides where to jit.

  Attributes:
    config: the ``QuantConfig``.
    quantize: ``(x, batch_dims=0) -> QuantizedTensor``.
    dequantize: ``(QuantizedTensor) -> array``.
  """
  config: formats.QuantConfig
  quantize: Callable[..., QuantizedTensor]
  dequantize: Callable[[QuantizedTensor], jnp.ndarray]


def quantizer(format: str = "nf4", block_size: int = 64,  # pylint: disable=redefined-builtin
              double_quant: formats.DoubleQuant | None = None,
              scale_dtype: str = "float32") -> Quantizer:
  """Builds a ``Quantizer`` for a format (validated now, so mistakes surface at construction)."""
  config = formats.validate(formats.QuantConfig(format, block_size, double_quant, scale_dtype))

  def quantize_fn(x, batch_dims: int = 0):
    return quantize(x, config, batch_dims=batch_dims)

  return Quantizer(config, quantize_fn, dequantize)


def _leaf_nbytes(leaf) -> int:
  return int(np.prod(np.shape(leaf), dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize


def storage_bytes(tree: PyTree) -> int:
  """Bytes of all array leaves (packed codes, scales, offsets and plain arrays) of ``tree``."""
  return sum(_leaf_nbytes(leaf) for leaf in jax.tree.leaves(tree))


def bits_per_param(q: QuantizedTensor) -> float:
  """Measured storage of ``q`` (codes + scales + second-level constants + offsets) per value."""
  return 8.0 * storage_bytes(q) / q.size


def _batch_dims_for(path: str, batch_dims: int | Mapping[str, int]) -> int:
  if isinstance(batch_dims, Mapping):
    import re  # pylint: disable=g-import-not-at-top
    for pattern, dims in batch_dims.items():
      if re.search(pattern, path):
        return int(dims)
    return 0
  return int(batch_dims)


def quantize_tree(params: PyTree, include: str | Iterable[str] = r"kernel$",
                  config: formats.QuantConfig | None = None, *,
                  exclude: str | Iterable[str] = (),
                  batch_dims: int | Mapping[str, int] = 0) -> PyTree:
  """Quantizes the leaves of a parameter tree selected by key-path regex (``growjax.tree.mask``).

  Args:
    params: nested dict of arrays.
    include: regex(es) of key paths to quantize (default every ``kernel``).
    config: the format (default NF4, B0 = 64).
    exclude: regex(es) removed from the selection (e.g. ``"embed"``).
    batch_dims: leading axes quantized independently, as an int for all selected leaves or
      ``{regex: n}`` (first match wins, others 0), e.g. ``{"layers/": 1}`` for stacked layers.

  Returns:
    The tree with ``QuantizedTensor`` leaves at the selected paths.

  Raises:
    KeyError: ``include`` selects nothing (the message lists the available paths).
  """
  config = formats.validate(config if config is not None else formats.QuantConfig())
  return gtree.map_selected(
      lambda path, leaf: quantize(leaf, config, batch_dims=_batch_dims_for(path, batch_dims)),
      params, include, exclude)
