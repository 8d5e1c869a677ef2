"""Quadrature on the unit disk and the Zernike transform pair (interpolation by quadrature).

Greengard & Serkh (2018), "Zernike polynomials: evaluation, quadrature, and interpolation",
arXiv:1811.02720.

``disk_grid(N)`` is the tensor product of ``L = 2N + 1`` equispaced angles (the trapezoid
rule, exact for ``cos(m t)``, ``sin(m t)`` with ``|m| <= 2N``) and ``Q = N // 2 + 1``
Gauss-Legendre nodes in ``t = r^2`` on [0, 1] (the area element is ``r dr dt = dt dtheta / 2``,
so the radial weight in t is 1). After the angular sum only the ``m = 0`` part of a polynomial
of degree ``<= 2N`` survives, a polynomial of degree ``<= N`` in t, which Q Gauss nodes integrate
exactly (``2Q - 1 >= N``). Hence the grid integrates every polynomial of degree ``<= 2N`` in
``(x, y)`` exactly, so Zernike modes up to degree N are discretely orthonormal on it and the
quadrature coefficients of a degree-``<= N`` function are exact.

Weights are normalised to the measure of ``zernike.zernike_basis``'s orthonormality, ``dA / pi``:
they sum to 1, so ``sum(weights * f)`` is the mean of ``f`` over the disk.

The transform (values on the grid -> coefficients) is an FFT in theta at each radius followed,
for every ``|m|``, by a small [modes of that |m|, Q] radial matrix; the inverse runs the same two
steps backwards.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from growjax.numerics import zernike as zk

Array = jax.Array


class DiskGrid(NamedTuple):
  """A quadrature grid on the unit disk, exact for polynomials of degree ``<= 2 * degree``.

  Attributes (numpy float64 when built by ``disk_grid``):
    r: [Q] radii, ``sqrt`` of the Gauss-Legendre nodes in ``t = r^2`` (ascending).
    theta: [L] angles ``2 pi l / L``, ``L = 2N + 1``.
    radial_weights: [Q] Gauss-Legendre weights in t on [0, 1] (sum 1).
    x: [Q, L] ``r cos theta``.
    y: [Q, L] ``r sin theta``.
    weights: [Q, L] ``radial_weights / L`` (sum 1: the mean over the disk).
  """
  r: Any
  theta: Any
  radial_weights: Any
  x: Any
  y: Any
  weights: Any

  @property
  def degree(self) -> int:
    """The N of ``disk_grid(N)`` (static: read from the shape of ``theta``)."""
    return (self.theta.shape[0] - 1) // 2


def disk_grid(degree: int) -> DiskGrid:
  """The ``(N // 2 + 1) x (2N + 1)`` grid for Zernike degree ``N`` (exact to degree 2N).

  Args:
    degree: the Zernike degree N to resolve (static int >= 0).

  Returns:
    A ``DiskGrid`` of numpy float64 arrays (cast them, or the values sampled on them, to the
    dtype you compute in).
  """
  degree = zk._check_degree(degree)  # pylint: disable=protected-access
  num_r = degree // 2 + 1
  num_theta = 2 * degree + 1
  nodes, weights = np.polynomial.legendre.leggauss(num_r)
  t = (nodes + 1.0) / 2.0
  radial_weights = weights / 2.0
  r = np.sqrt(t)
  theta = 2.0 * np.pi * np.arange(num_theta) / num_theta
  return DiskGrid(r=r, theta=theta, radial_weights=radial_weights,
                  x=np.outer(r, np.cos(theta)), y=np.outer(r, np.sin(theta)),
                  weights=np.outer(radial_weights, np.full(num_theta, 1.0 / num_theta)))


def disk_mean(values: Any, grid: DiskGrid) -> Array:
  """Quadrature of the mean over the disk: ``sum_{q,l} weights[q, l] values[q, l, ...]``.

  Args:
    values: [Q, L, *batch] samples on ``grid``.
    grid: the grid.

  Returns:
    [*batch]; exact for polynomials of degree ``<= 2 * grid.degree``.
  """
  values = _check_values(values, grid)
  return jnp.tensordot(jnp.asarray(grid.weights, values.dtype), values, axes=((0, 1), (0, 1)))


def _check_values(values: Any, grid: DiskGrid) -> Array:
  values = jnp.asarray(values)
  grid_shape = (grid.r.shape[0], grid.theta.shape[0])
  if values.shape[:2] != grid_shape:
    raise ValueError(f"values must be sampled on the grid, shape [Q, L, *batch] = "
                     f"[{grid_shape[0]}, {grid_shape[1]}, ...] for disk_grid({grid.degree}), "
                     f"got {values.shape}; sample them at (grid.x, grid.y).")
  if not jnp.issubdtype(values.dtype, jnp.floating):
    values = values.astype(jnp.result_type(float))
  return values


def _check_fits(degree: int, grid: DiskGrid, what: str) -> None:
  if degree > grid.degree:
    raise ValueError(f"{what} degree {degree} is too large for disk_grid({grid.degree}), which "
                     f"resolves degree <= {grid.degree}; build disk_grid({degree}) or larger.")


def _radial_matrix(grid: DiskGrid, degree: int, normalization: str, dtype,
                   analysis: bool) -> tuple[Array, np.ndarray]:
  """``[Q, K]`` radial factors of each OSA mode, and its column ``[K]`` in the stacked
  (cos m = 0..N, sin m = 0..N) Fourier table.

  Synthesis needs the basis' radial part, ``kappa R`` (orthonormal) or ``R`` (unit peak);
  analysis divides by the basis' squared norm as well, ``kappa R`` or ``kappa^2 R``.
  """
  ns, ms = zk.mode_indices(degree)
  radial_n, radial_l = zk.radial_indices(degree)
  lookup = {(int(n), int(l)): i for i, (n, l) in enumerate(zip(radial_n, radial_l))}
  rows = np.array([lookup[(int(n), abs(int(m)))] for n, m in zip(ns, ms)])
  unit = zk.radial_basis(jnp.asarray(grid.r, dtype), degree, normalization="unit_peak")  # [R, Q]
  kappa = zk.normalization_factors(ns, ms, "orthonormal")
  power = 1 if normalization == "orthonormal" else (2 if analysis else 0)
  scale = jnp.asarray(kappa**power, dtype)
  columns = np.where(ms >= 0, ms, degree + 1 - ms)
  return unit[rows].T * scale[None, :], columns


def zernike_transform(values: Any, grid: DiskGrid, degree: int | None = None, *,
                      normalization: str = "orthonormal") -> Array:
  """Zernike coefficients of a function sampled on ``grid`` (interpolation by quadrature).

  Exact (to rounding) for polynomials of degree ``<= grid.degree`` when ``degree`` is the grid's;
  spectrally accurate for smooth functions.

  Args:
    values: [Q, L, *batch] samples ``f(grid.x, grid.y)``.
    grid: a ``disk_grid``.
    degree: largest degree to return (default ``grid.degree``; must be ``<= grid.degree``).
    normalization: the basis of the coefficients, as in ``zernike_basis``.

  Returns:
    [K, *batch] coefficients in OSA/ANSI order, K = (degree + 1)(degree + 2) / 2.
  """
  values = _check_values(values, grid)
  degree = grid.degree if degree is None else zk._check_degree(degree)  # pylint: disable=protected-access
  _check_fits(degree, grid, "Requested")
  zk._check_choice(normalization, "normalization", zk.NORMALIZATIONS)  # pylint: disable=protected-access
  num_theta = grid.theta.shape[0]
  spectrum = jnp.fft.rfft(values, axis=1)[:, :degree + 1]
  # (1/L) sum_l f_l cos(m t_l) = Re F_m / L and (1/L) sum_l f_l sin(m t_l) = -Im F_m / L.
  fourier = jnp.concatenate([spectrum.real, -spectrum.imag], axis=1) / num_theta
  radial, columns = _radial_matrix(grid, degree, normalization, values.dtype, analysis=True)
  weighted = radial * jnp.asarray(grid.radial_weights, values.dtype)[:, None]     # [Q, K]
  per_mode = jnp.take(fourier, jnp.asarray(columns), axis=1)                     # [Q, K, *b]
  extra = per_mode.ndim - 2
  weighted = weighted.reshape(weighted.shape + (1,) * extra)
  return jnp.sum(weighted * per_mode, axis=0)


def inverse_zernike_transform(coeffs: Any, grid: DiskGrid, *,
                              normalization: str = "orthonormal") -> Array:
  """Values on ``grid`` of the expansion with OSA coefficients ``coeffs`` (the inverse).

  Args:
    coeffs: [K, *batch], K = (N + 1)(N + 2) / 2 with ``N <= grid.degree``.
    grid: a ``disk_grid``.
    normalization: the basis of the coefficients.

  Returns:
    [Q, L, *batch] values at ``(grid.x, grid.y)``.
  """
  coeffs = jnp.asarray(coeffs)
  if coeffs.ndim == 0:
    raise ValueError("coeffs must have a leading mode axis [K, *batch], got a scalar.")
  if not jnp.issubdtype(coeffs.dtype, jnp.floating):
    coeffs = coeffs.astype(jnp.result_type(float))
  degree = zk.degree_of_num_modes(coeffs.shape[0])
  _check_fits(degree, grid, "Coefficient")
  zk._check_choice(normalization, "normalization", zk.NORMALIZATIONS)  # pylint: disable=protected-access
  num_theta = grid.theta.shape[0]
  radial, columns = _radial_matrix(grid, degree, normalization, coeffs.dtype, analysis=False)
  # Sum the modes of each Fourier column: a one-hot [K, 2(N + 1)] matrix (the transpose of the
  # gather in zernike_transform).
  one_hot = jnp.asarray(np.eye(2 * (degree + 1))[columns], coeffs.dtype)
  fourier = jnp.einsum("qk,kc,k...->qc...", radial, one_hot, coeffs)             # [Q, 2(N+1), *b]
  cos_part, sin_part = fourier[:, :degree + 1], fourier[:, degree + 1:]
  # irfft(X)_l = (1/L) [X_0 + 2 Re sum_m X_m e^{i m t_l}], so X_0 = L a_0, X_m = L (a_m - i b_m)/2.
  half = jnp.asarray(np.where(np.arange(degree + 1) == 0, 1.0, 0.5) * num_theta, coeffs.dtype)
  half = half.reshape((1, degree + 1) + (1,) * (coeffs.ndim - 1))
  spectrum = lax.complex(cos_part * half, -sin_part * half)
  pad = [(0, 0)] * spectrum.ndim
  pad[1] = (0, num_theta // 2 + 1 - (degree + 1))
  return jnp.fft.irfft(jnp.pad(spectrum, pad), n=num_theta, axis=1)
