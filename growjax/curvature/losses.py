"""Losses with their output-space gradients and Hessian-vector products.

The generalised Gauss-Newton model of Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855)
needs, for the network output ``z`` and target ``y``, the loss ``ℓ(z, y)``, its gradient
``g_z = ∂ℓ/∂z`` and products with its Hessian ``H_z = ∂²ℓ/∂z²`` (PSD for every loss here):

* softmax cross-entropy with integer labels: ``g = p − onehot(y)``, ``H v = p ⊙ v − p (pᵀ v)``;
* sigmoid cross-entropy with {0, 1} targets: ``g = σ(z) − y``, ``H v = σ(z)(1 − σ(z)) ⊙ v``;
* squared error ``½‖z − y‖²``: ``g = z − y``, ``H v = v``.

Each loss works on outputs with any leading batch dims (``[..., C]``: sequences included) and
returns per-example values (``[...]``); the caller averages. The closed forms are checked against
``jax.grad`` / ``jax.hessian`` in the tests.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Loss(NamedTuple):
  """A loss as pure functions of logits/predictions ``z`` [..., C] and targets ``y``.

  Attributes:
    name: registry name.
    value: ``(z, y) -> [...]`` per-example loss.
    grad: ``(z, y) -> [..., C]`` gradient in ``z``.
    hvp: ``(z, y, v) -> [..., C]`` Hessian-vector product in output space.
    correct: ``(z, y) -> [...]`` 1.0 where the prediction is right (classification), else None.
  """
  name: str
  value: Callable[[Array, Array], Array]
  grad: Callable[[Array, Array], Array]
  hvp: Callable[[Array, Array, Array], Array]
  correct: Callable[[Array, Array], Array] | None = None


def _onehot(y: Array, c: int, dtype) -> Array:
  return jax.nn.one_hot(y, c, dtype=dtype)


def _xent_value(z, y):
  logp = jax.nn.log_softmax(z, axis=-1)
  return -jnp.take_along_axis(logp, y[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _xent_grad(z, y):
  return jax.nn.softmax(z, axis=-1) - _onehot(y, z.shape[-1], z.dtype)


def _xent_hvp(z, y, v):
  del y
  p = jax.nn.softmax(z, axis=-1)
  return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)


def _argmax_correct(z, y):
  return (jnp.argmax(z, axis=-1) == y).astype(jnp.float32)


def _sigmoid_value(z, y):
  y = y.astype(z.dtype)
  # log(1 + e^z) - y z, written stably.
  return jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)


def _sigmoid_grad(z, y):
  return jax.nn.sigmoid(z) - y.astype(z.dtype)


def _sigmoid_hvp(z, y, v):
  del y
  s = jax.nn.sigmoid(z)
  return s * (1.0 - s) * v


def _sigmoid_correct(z, y):
  return jnp.all((z > 0) == (y > 0.5), axis=-1).astype(jnp.float32)


def _sq_value(z, y):
  return 0.5 * jnp.sum(jnp.square(z - y.astype(z.dtype)), axis=-1)


def _sq_grad(z, y):
  return z - y.astype(z.dtype)


def _sq_hvp(z, y, v):
  del z, y
  return v


softmax_cross_entropy = Loss("softmax_cross_entropy", _xent_value, _xent_grad, _xent_hvp,
                             _argmax_correct)
sigmoid_cross_entropy = Loss("sigmoid_cross_entropy", _sigmoid_value, _sigmoid_grad,
                             _sigmoid_hvp, _sigmoid_correct)
squared_error = Loss("squared_error", _sq_value, _sq_grad, _sq_hvp, None)

LOSSES = {l.name: l for l in (softmax_cross_entropy, sigmoid_cross_entropy, squared_error)}


def get_loss(name: str | Loss) -> Loss:
  """Looks a loss up by name (a ``Loss`` passes through)."""
  if isinstance(name, Loss):
    return name
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.")
  return LOSSES[name]
