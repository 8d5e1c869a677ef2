"""A flax layer of learnable Zernike expansions whose degree grows function-preservingly.

``ZernikeLayer(degree, features)`` maps points ``(x, y)`` [..., 2] to ``features`` learnable
expansions ``sum_j coefficients[j, f] Z_j(x, y)`` over all Zernike modes of degree
``<= degree`` (Greengard & Serkh 2018, arXiv:1811.02720, for the basis; evaluated by
``growjax.numerics.zernike``). The coefficient axis is ordered OSA/ANSI (sorted by degree), so
the modes of degree N are a prefix of those of degree N + 1: growing the degree appends rows at
the END of the coefficient axis, the growth convention of growjax (Lawton, Galstyan & Ver Steeg
2024, arXiv:2411.05855), and ``grow_degree`` (append zero rows) leaves the function unchanged.

Points outside the unit disk are evaluated as polynomials (``outside="extrapolate"``): the
layer stays jit-able, but values grow like ``r^degree`` there, so rescale inputs into the disk.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from growjax import tree as gtree
from growjax.numerics import zernike as zk

Array = jax.Array


class ZernikeLayer(nn.Module):
  """Learnable coefficients over the Zernike basis of degree ``<= degree``.

  Attributes:
    degree: largest Zernike degree N (K = (N + 1)(N + 2) / 2 modes).
    features: number of output expansions.
    normalization: ``"orthonormal"`` (default: with the LeCun-normal init, outputs have about
      unit mean square over the disk) or ``"unit_peak"``.
    coef_init: initializer of the [K, features] coefficients.
    param_dtype: dtype of the coefficients.
    dtype: computation dtype; None uses the input's float dtype (float64 inputs under
      ``jax.enable_x64`` compute in float64).
  """
  degree: int
  features: int
  normalization: str = "orthonormal"
  coef_init: Callable[..., Array] = nn.initializers.lecun_normal()
  param_dtype: Any = jnp.float32
  dtype: Any = None

  @nn.compact
  def __call__(self, points: Array) -> Array:
    """Evaluates the expansions.

    Args:
      points: [..., 2] Cartesian points (x, y), the unit disk being ``x^2 + y^2 <= 1``.

    Returns:
      [..., features].
    """
    points = jnp.asarray(points)
    if points.ndim < 1 or points.shape[-1] != 2:
      raise ValueError(f"ZernikeLayer expects points of shape [..., 2] (x, y), got "
                       f"{points.shape}.")
    num = zk.num_modes(self.degree)
    coeffs = self.param("coefficients", self.coef_init, (num, self.features), self.param_dtype)
    dtype = self.dtype
    if dtype is None:
      dtype = points.dtype if jnp.issubdtype(points.dtype, jnp.floating) else jnp.float32
    points = points.astype(dtype)
    basis = zk.zernike_basis(points[..., 0], points[..., 1], self.degree,
                             normalization=self.normalization)                   # [K, ...]
    return jnp.tensordot(basis, coeffs.astype(dtype), axes=(0, 0))


def grow_degree(layer: ZernikeLayer, variables: Any, new_degree: int
                ) -> tuple[ZernikeLayer, Any, dict]:
  """Function-preserving degree growth: appends zero coefficients for the new modes.

  The grown variables are a fresh (zero) tree of the grown layer's shapes with the old values
  transplanted into the leading corner (``growjax.tree.transplant``); any other params-shaped
  state (optimizer moments, EMA) is carried the same way: ``transplant(opt.init(new_params),
  old_state)``.

  Args:
    layer: the ``ZernikeLayer``.
    variables: its variables (``{"params": {"coefficients": [K, features]}}``).
    new_degree: the grown degree, ``>= layer.degree``.

  Returns:
    ``(new_layer, new_variables, record)``; ``record`` describes the growth (degrees, mode
    counts, the grown path and axis).

  Raises:
    TypeError: ``layer`` is not a ``ZernikeLayer``.
    ValueError: ``new_degree`` is smaller than the layer's degree or not an int >= 0.
  """
  if not isinstance(layer, ZernikeLayer):
    raise TypeError(f"grow_degree grows a ZernikeLayer, got {type(layer).__name__}.")
  new_degree = zk._check_degree(new_degree, "new_degree")  # pylint: disable=protected-access
  if new_degree < layer.degree:
    raise ValueError(f"grow_degree only grows: new_degree={new_degree} < degree={layer.degree}. "
                     f"Truncating modes is not function-preserving.")
  new_layer = layer.clone(degree=new_degree)
  shapes = jax.eval_shape(new_layer.init, jax.random.key(0), jnp.zeros((1, 2), jnp.float32))
  fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  new_variables = gtree.transplant(fresh, variables)
  record = {
      "morphism": "grow_degree",
      "path": "params/coefficients",
      "axis": 0,
      "old_degree": layer.degree,
      "new_degree": new_degree,
      "old_num_modes": zk.num_modes(layer.degree),
      "new_num_modes": zk.num_modes(new_degree),
  }
  return new_layer, new_variables, record
