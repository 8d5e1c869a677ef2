"""Calibration capture: per-layer input Gram matrices ``XᵀX`` from forward passes of a flax model.

QuAILoRA (Lawton et al. 2024, arXiv:2410.14713) weighs each layer's quantization error by the
inputs the full-precision model feeds that layer on a small calibration set. ``gram_capture``
intercepts every ``nn.Dense`` / ``nn.DenseGeneral`` call (``flax.linen.intercept_methods``),
flattens the contracted input axes (``[..., *in] -> [rows, prod(in)]``) and accumulates ``XᵀX``
keyed by the key path of the layer's kernel relative to the ``params`` collection
(``"block_0/attn/query/kernel"``), i.e. the key path that ``growjax.peft`` and
``growjax.quant.quantize_tree`` see in ``params``. One forward pass per batch captures every layer.

``init``/``update`` are pure (the caller jits ``update`` and loops over batches). Layers inside
lifted transforms that stack parameters (``nn.scan``/``nn.vmap``) are not captured per layer: the
interceptor sees one module path for all of them.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jnp.ndarray


class GramState(NamedTuple):
  """Accumulated calibration statistics.

  Attributes:
    grams: ``{kernel key path: XᵀX [d_in, d_in] float32}``, summed over all rows seen.
    counts: ``{kernel key path: number of input rows}`` (int32 scalars).
  """
  grams: dict[str, Array]
  counts: dict[str, Array]


class GramCapture(NamedTuple):
  """``init(variables, *args, **kw) -> GramState``; ``update(state, variables, *args, **kw) -> GramState``."""
  init: Callable[..., GramState]
  update: Callable[..., GramState]


def _contracted_axes(module: nn.Module, x: Array) -> tuple[int, ...]:
  if isinstance(module, nn.DenseGeneral):
    if getattr(module, "batch_dims", ()):
      raise NotImplementedError(
          f"gram_capture: DenseGeneral {'/'.join(module.path)!r} uses batch_dims="
          f"{module.batch_dims}; its kernel is not one [d_in, d_out] map per key path.")
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    return tuple(a % x.ndim for a in axis)
  return (x.ndim - 1,)


def _rows(x: Array, axes: tuple[int, ...]) -> Array:
  """Moves the contracted axes (in kernel order) last and flattens: [rows, prod(in)]."""
  keep = [i for i in range(x.ndim) if i not in axes]
  x = jnp.transpose(x, keep + list(axes))
  return x.reshape(-1, math.prod(x.shape[len(keep):]))


def gram_capture(model: nn.Module, *, method: str | Callable | None = None,
                 modules: tuple[type, ...] = (nn.Dense, nn.DenseGeneral),
                 prefix: str = "") -> GramCapture:
  """Builds pure functions that accumulate ``XᵀX`` for every dense layer of ``model``.

  Args:
    model: a flax.linen module.
    method: the method ``model.apply`` runs (default ``__call__``).
    modules: module types whose ``__call__`` inputs are captured.
    prefix: prepended to every key (e.g. ``"params/"`` if your tree keeps the collection name).

  Returns:
    ``GramCapture(init, update)``; both take the flax ``variables`` (``{"params": ...}``) and the
    arguments of ``model.apply``. ``update`` runs one forward pass of the batch.

  Example::

    cap = gram_capture(model)
    state = cap.init(variables, batches[0])
    step = jax.jit(cap.update)
    for x in batches:
      state = step(state, variables, x)
  """

  def capture(variables, *args, **kwargs) -> dict[str, tuple[Array, Array]]:
    found: dict[str, tuple[Array, Array]] = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
      mod = context.module
      if context.method_name == "__call__" and isinstance(mod, modules) and call_args:
        x = jnp.asarray(call_args[0])
        rows = _rows(x, _contracted_axes(mod, x)).astype(jnp.float32)
        gram = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
        key = prefix + "/".join(mod.path) + "/kernel"
        count = jnp.asarray(rows.shape[0], jnp.int32)
        if key in found:  # a shared layer called several times: accumulate every call.
          g0, c0 = found[key]
          gram, count = g0 + gram, c0 + count
        found[key] = (gram, count)
      return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      model.apply(variables, *args, method=method, **kwargs)
    return found

  def init(variables, *args, **kwargs) -> GramState:
    shapes = jax.eval_shape(lambda v: capture(v, *args, **kwargs), variables)
    if not shapes:
      raise ValueError(f"gram_capture: no {[m.__name__ for m in modules]} call was seen in a "
                       f"forward pass of {type(model).__name__}.")
    return GramState({k: jnp.zeros(g.shape, g.dtype) for k, (g, _) in shapes.items()},
                     {k: jnp.zeros((), jnp.int32) for k in shapes})

  def update(state: GramState, variables, *args, **kwargs) -> GramState:
    found = capture(variables, *args, **kwargs)
    missing = set(state.grams) ^ set(found)
    if missing:
      raise ValueError(f"gram_capture: the layers seen changed between init and update: "
                       f"{sorted(missing)}.")
    return GramState({k: state.grams[k] + found[k][0] for k in state.grams},
                     {k: state.counts[k] + found[k][1] for k in state.counts})

  return GramCapture(init, update)


def normalized(state: GramState) -> dict[str, Array]:
  """``XᵀX / rows`` per layer (the second-moment matrix, comparable across calibration sizes)."""
  return {k: g / jnp.maximum(state.counts[k], 1).astype(g.dtype) for k, g in state.grams.items()}

