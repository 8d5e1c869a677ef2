"""Tests for growjax.numerics: Zernike evaluation, indexing, quadrature, transforms, the layer.

Oracles: exact rational values of the explicit formula (zernike_reference, cross-checked here
against mpmath's hypergeometric Jacobi polynomials), Noll's (1976) and the OSA/ANSI tables and
closed forms, closed-form disk moments, Legendre polynomials, dense Gram matrices.
"""

import functools
import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax
import pytest
from scipy import special

from growjax import tree as gtree
from growjax.numerics import quadrature as quad
from growjax.numerics import zernike as zk
from growjax.numerics.zernike_layer import ZernikeLayer, grow_degree
from growjax.numerics.zernike_reference import zernike_basis_exact


def _points(num, seed):
  """Random points in the disk plus the hard places: centre, circle, near both."""
  rng = np.random.default_rng(seed)
  r = np.concatenate([[0.0, 1e-7, 1e-3, 0.03, 1 - 1e-9, 1.0, 1.0],
                      np.sqrt(rng.uniform(size=num))])
  theta = rng.uniform(0, 2 * np.pi, r.size)
  return r * np.cos(theta), r * np.sin(theta)


# ---------------------------------------------------------------------------------------------
# Indexing.
# ---------------------------------------------------------------------------------------------

# Noll (1976), J. Opt. Soc. Am. 66, 207, Table I: j -> (n, m), m < 0 for sin.
NOLL_TABLE = {1: (0, 0), 2: (1, 1), 3: (1, -1), 4: (2, 0), 5: (2, -2), 6: (2, 2), 7: (3, -1),
              8: (3, 1), 9: (3, -3), 10: (3, 3), 11: (4, 0), 12: (4, 2), 13: (4, -2),
              14: (4, 4), 15: (4, -4), 16: (5, 1), 17: (5, -1), 18: (5, 3), 19: (5, -3),
              20: (5, 5), 21: (5, -5), 22: (6, 0)}
# OSA/ANSI Z80.28 (Thibos et al. 2002): j = 0, 1, ... -> (n, m).
OSA_TABLE = [(0, 0), (1, -1), (1, 1), (2, -2), (2, 0), (2, 2), (3, -3), (3, -1), (3, 1), (3, 3),
             (4, -4), (4, -2), (4, 0), (4, 2), (4, 4)]


def test_index_tables_match_the_standards():
  for j, (n, m) in NOLL_TABLE.items():
    assert zk.noll_to_nm(j) == (n, m)
    assert zk.nm_to_noll(n, m) == j
  for j, (n, m) in enumerate(OSA_TABLE):
    assert zk.osa_to_nm(j) == (n, m)
    assert zk.nm_to_osa(n, m) == j


def test_index_conversions_are_consistent_bijections_up_to_degree_60():
  k = zk.num_modes(60)
  n, m = zk.mode_indices(60, "osa")
  assert np.array_equal(zk.nm_to_osa(n, m), np.arange(k))
  assert np.all(np.diff(n) >= 0) and np.all(np.abs(m) <= n) and np.all((n - m) % 2 == 0)
  assert len(set(zip(n.tolist(), m.tolist()))) == k
  noll = zk.osa_to_noll(np.arange(k))
  assert sorted(noll.tolist()) == list(range(1, k + 1))  # degree <= 60 is a Noll prefix too
  assert np.array_equal(zk.noll_to_osa(noll), np.arange(k))
  nn, mn = zk.mode_indices(60, "noll")
  assert np.all(np.diff(nn) >= 0)
  j = np.arange(1, k + 1)
  assert np.all((mn > 0) == ((j % 2 == 0) & (mn != 0)))  # Noll: even j <-> cosine
  for d in (0, 1, 7, 60):
    assert zk.degree_of_num_modes(zk.num_modes(d)) == d


@pytest.mark.parametrize("call, message", [
    (lambda: zk.nm_to_osa(2, 3), "|m| <= n"),
    (lambda: zk.nm_to_noll(4, 1), "n - m must be even"),
    (lambda: zk.nm_to_osa(np.array([2, 3]), np.array([0, 2])), "n - m must be even"),
    (lambda: zk.zernike_mode(3, 5, 0.1, 0.2), "|m| <= n"),
    (lambda: zk.zernike_mode(-2, 0, 0.1, 0.2), "must be >= 0"),
    (lambda: zk.noll_to_nm(0), "start at 1"),
    (lambda: zk.osa_to_nm(-1), "start at 0"),
    (lambda: zk.osa_to_nm(1.5), "integer"),
    (lambda: zk.zernike_basis(0.1, 0.2, -1), "must be >= 0"),
    (lambda: zk.zernike_basis(0.1, 0.2, 2.0), "Python int"),
    (lambda: zk.zernike_basis(0.1, 0.2, 3, normalization="noll"), "normalization"),
    (lambda: zk.zernike_basis(jnp.zeros(3), jnp.zeros(4), 3), "same shape"),
    (lambda: zk.degree_of_num_modes(7), "not a complete Zernike basis"),
    (lambda: zk.radial_basis(0.5, 3, dim=0), "dim must be"),
])
def test_bad_input_raises_clear_errors(call, message):
  with pytest.raises(ValueError, match=message.replace("|", r"\|")):
    call()


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def test_reference_agrees_with_mpmath_jacobi():
  """The exact-rational oracle against mpmath's hypergeometric Jacobi polynomials."""
  x, y = np.array([0.3, -0.71, 0.05]), np.array([0.4, 0.2, -0.99])
  ref = zernike_basis_exact(x, y, 40)
  with mpmath.workdps(40):
    for n, m in [(40, 0), (39, -3), (40, 22), (17, 17)]:
      k = (n - abs(m)) // 2
      for p in range(x.size):
        r2 = mpmath.mpf(x[p])**2 + mpmath.mpf(y[p])**2
        z = mpmath.mpc(x[p], y[p])**abs(m)
        ang = z.real if m >= 0 else z.imag
        kappa = mpmath.sqrt((n + 1) * (1 if m == 0 else 2))
        value = kappa * mpmath.jacobi(k, 0, abs(m), 2 * r2 - 1) * ang
        assert abs(float(value) - ref[zk.nm_to_osa(n, m), p]) <= 1e-15 * max(1, abs(value))


def test_low_order_modes_match_noll_closed_forms():
  x, y = _points(20, 0)
  with jax.enable_x64(True):
    basis = np.asarray(zk.zernike_basis(x, y, 3))
  r2 = x * x + y * y
  closed = {  # Noll (1976) Table I, in Cartesian form
      1: np.ones_like(x), 2: 2 * x, 3: 2 * y, 4: np.sqrt(3) * (2 * r2 - 1),
      5: np.sqrt(6) * 2 * x * y, 6: np.sqrt(6) * (x * x - y * y),
      7: np.sqrt(8) * (3 * r2 - 2) * y, 8: np.sqrt(8) * (3 * r2 - 2) * x,
      9: np.sqrt(8) * (3 * x * x * y - y**3), 10: np.sqrt(8) * (x**3 - 3 * x * y * y)}
  for j, value in closed.items():
    np.testing.assert_allclose(basis[zk.noll_to_osa(j)], value, atol=1e-14)


@pytest.mark.parametrize("normalization", ["orthonormal", "unit_peak"])
def test_basis_matches_exact_values_to_1e13_up_to_degree_60(normalization):
  x, y = _points(12, 1)
  ref = zernike_basis_exact(x, y, 60, normalization=normalization)
  with jax.enable_x64(True):
    basis = jax.jit(lambda x, y: zk.zernike_basis(x, y, 60, normalization=normalization))(x, y)
    assert basis.dtype == jnp.float64 and basis.shape == (zk.num_modes(60), x.size)
    err = np.abs(np.asarray(basis) - ref).max()
  assert err <= 1e-13, err
  # The explicit factorial formula (what most packages evaluate) in float64 fails here; make
  # sure the test points are hard enough to tell the two apart.
  n, m = 60, 0
  c = [(-1)**s * math.factorial(n - s) / (math.factorial(s) * math.factorial((n + m) // 2 - s)
                                          * math.factorial((n - m) // 2 - s))
       for s in range((n - m) // 2 + 1)]
  r2 = x * x + y * y
  naive = sum(cs * r2**((n - m) // 2 - s) for s, cs in enumerate(c))
  kappa = zk.normalization_factors(n, m, normalization)
  assert np.abs(kappa * naive - ref[zk.nm_to_osa(n, m)]).max() > 1e-6


def test_single_mode_polar_and_layouts_agree_with_the_basis():
  x, y = _points(9, 2)
  modes = [(0, 0), (11, -3), (12, 12)]

  def everything(x, y):
    r, theta = jnp.hypot(x, y), jnp.arctan2(y, x)
    return (zk.zernike_basis(x, y, 12), [zk.zernike_mode(n, m, x, y) for n, m in modes],
            zk.zernike_basis_polar(r, theta, 12),
            zk.zernike_basis(x.reshape(4, 4), y.reshape(4, 4), 12), zk.zernike_basis(x, y, 11))

  with jax.enable_x64(True):
    basis, single, polar, square, lower = jax.tree.map(np.asarray, jax.jit(everything)(x, y))
  for (n, m), value in zip(modes, single):
    np.testing.assert_allclose(value, basis[zk.nm_to_osa(n, m)], rtol=0, atol=1e-15)
  np.testing.assert_allclose(polar, basis, rtol=0, atol=1e-13)
  np.testing.assert_allclose(square.reshape(-1, 16), basis, rtol=0, atol=1e-15)
  # OSA order: degree N is a prefix of degree N + 1 (same operations up to FMA contraction).
  np.testing.assert_allclose(lower, basis[:zk.num_modes(11)], rtol=0, atol=1e-15)


def test_cartesian_derivatives_match_exact_values():
  x, y = _points(6, 3)
  ref, ref_dx, ref_dy = zernike_basis_exact(x, y, 40, derivatives=True)
  j = zk.nm_to_osa(37, -5)

  def forward_and_reverse(x, y):
    grads = jax.grad(lambda x, y: jnp.sum(zk.zernike_basis(x, y, 40)[j]), argnums=(0, 1))(x, y)
    return zk.zernike_basis_grad(x, y, 40), grads

  with jax.enable_x64(True):
    (values, d_dx, d_dy), (gx, gy) = jax.tree.map(np.asarray,
                                                  jax.jit(forward_and_reverse)(x, y))
  scale = np.abs(ref_dx).max()
  assert np.abs(values - ref).max() <= 1e-13
  assert np.abs(d_dx - ref_dx).max() <= 1e-14 * scale
  assert np.abs(d_dy - ref_dy).max() <= 1e-14 * scale
  # Reverse mode through the scan gives the same gradient.
  np.testing.assert_allclose(gx, ref_dx[j], rtol=0, atol=1e-14 * scale)
  np.testing.assert_allclose(gy, ref_dy[j], rtol=0, atol=1e-14 * scale)


def test_jit_vmap_dtype_and_donated_buffer():
  x, y = _points(8, 4)
  with jax.enable_x64(True):
    fill = jax.jit(lambda out, x, y: zk.zernike_basis(x, y, 9, out=out), donate_argnums=0)
    direct = np.asarray(fill(jnp.zeros((zk.num_modes(9), x.size)), x, y))
    out = fill(jnp.zeros((zk.num_modes(9), x.size)), x, y)
    np.testing.assert_array_equal(np.asarray(fill(out, x, y)), direct)  # buffer reused
    batched = jax.jit(jax.vmap(lambda a, b: zk.zernike_basis(a, b, 9)))(x.reshape(3, 5),
                                                                          y.reshape(3, 5))
    np.testing.assert_allclose(np.moveaxis(np.asarray(batched), 0, 1).reshape(-1, 15), direct,
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(direct, zernike_basis_exact(x, y, 9), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="out must have shape"):
      zk.zernike_basis(x, y, 9, out=jnp.zeros((3, x.size)))
  # float32 in, float32 out, float32 accuracy (x64 off: the test process default).
  x32, y32 = np.float32(x), np.float32(y)
  basis32 = jax.jit(lambda x, y: zk.zernike_basis(x, y, 9))(x32, y32)
  assert basis32.dtype == jnp.float32
  assert np.abs(np.asarray(basis32, np.float64) - zernike_basis_exact(x32, y32, 9)).max() <= 1e-5


def test_points_outside_the_disk():
  x = np.array([0.5, 1.3, -0.2, 0.0])
  y = np.array([0.5, 0.4, 0.1, -2.0])
  outside = x * x + y * y > 1
  with jax.enable_x64(True):
    # Default: polynomial continuation, still accurate relative to the values' size.
    ext, nan = jax.jit(lambda x, y: (zk.zernike_basis(x, y, 12),
                                     zk.zernike_basis(x, y, 12, outside="nan")))(x, y)
    ext, nan = np.asarray(ext), np.asarray(nan)
    ref = zernike_basis_exact(x, y, 12)
    assert np.abs(ext - ref).max() <= 1e-13 * np.abs(ref).max()
    assert np.all(np.isnan(nan[:, outside])) and np.array_equal(nan[:, ~outside], ext[:, ~outside])
    with pytest.raises(ValueError, match=r"2 of 4 points lie outside the unit disk"):
      zk.zernike_basis(x, y, 12, outside="error")
    with pytest.raises(ValueError, match="cannot be used under jit"):
      jax.jit(lambda x, y: zk.zernike_basis(x, y, 12, outside="error"))(x, y)
    with pytest.raises(ValueError, match="outside="):
      zk.zernike_basis(x, y, 12, outside="clip")
    # Points on the circle, some a few ulps outside after rounding, are accepted.
    on_circle = np.linspace(0, 2 * np.pi, 50)
    edge = zk.zernike_basis(np.cos(on_circle), np.sin(on_circle), 2, outside="error")
    np.testing.assert_allclose(np.asarray(edge)[4], np.sqrt(3), atol=1e-14)  # Z_2^0(1) = sqrt 3


def test_radial_functions_in_d_dimensions():
  r = np.concatenate([[0.0, 1.0, 1e-4], np.random.default_rng(5).uniform(size=12)])
  # Gauss-Jacobi in s = 2t - 1 with weight (1 + s)^(1/2): int_0^1 R R' 3 r^2 dr =
  # (3/2) int_0^1 R R' t^(1/2) dt = (3/2) 2^(-3/2) sum_i w_i R R'(s_i).
  s, w = special.roots_jacobi(40, 0.0, 0.5)
  nodes = np.sqrt((s + 1) / 2)
  degree = 24
  ns, ls = zk.radial_indices(degree)

  def radial(r, nodes):
    return (zk.radial_basis(r, degree, dim=1, normalization="unit_peak"),
            zk.radial_basis(jnp.concatenate([r, nodes]), degree, dim=3),
            zk.radial_basis(r, degree), zk.zernike_basis(r, jnp.zeros_like(r), degree))

  with jax.enable_x64(True):
    legendre, three, two, disk = jax.tree.map(np.asarray, jax.jit(radial)(r, nodes))
  # D = 1: the radial functions are the Legendre polynomials P_n(r) (l = n mod 2).
  for i, (n, l) in enumerate(zip(ns, ls)):
    if l == n % 2:
      np.testing.assert_allclose(legendre[i], special.eval_legendre(n, r), rtol=0, atol=1e-14)
  # D = 3: r^l P_k^{(0, l + 1/2)}(2 r^2 - 1), normalised by sqrt((2n + 3) / 3), via mpmath.
  with mpmath.workdps(30):
    for i in range(0, len(ns), 5):
      n, l = int(ns[i]), int(ls[i])
      for p in (0, 1, 2, 5, 9):
        rp = mpmath.mpf(r[p])
        value = (mpmath.sqrt(mpmath.mpf(2 * n + 3) / 3) * rp**l
                 * mpmath.jacobi((n - l) // 2, 0, l + mpmath.mpf(1) / 2, 2 * rp**2 - 1))
        assert abs(three[i, p] - float(value)) <= 1e-13 * max(1.0, abs(float(value)))
  # D = 3 orthonormality.
  vals, weights = three[:, r.size:], 1.5 * w * 2.0**-1.5
  for l in range(degree + 1):
    sel = ls == l
    gram = (vals[sel] * weights) @ vals[sel].T
    np.testing.assert_allclose(gram, np.eye(int(sel.sum())), rtol=0, atol=1e-13)
  # D = 2: the disk's radial parts (m >= 0 modes along the x axis, the sqrt(2) of m != 0 going
  # to the angular factor).
  for i, (n, l) in enumerate(zip(ns, ls)):
    np.testing.assert_allclose(two[i] * (np.sqrt(2) if l else 1.0),
                               disk[zk.nm_to_osa(int(n), int(l))], rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Quadrature and the transform pair.
# ---------------------------------------------------------------------------------------------


def _disk_moment(a, b):
  """Mean of x^a y^b over the unit disk: (1/pi) int x^a y^b dA (exact closed form)."""
  if a % 2 or b % 2:
    return 0.0
  return float(2 * mpmath.gamma((a + 1) / 2) * mpmath.gamma((b + 1) / 2)
               / ((a + b + 2) * mpmath.gamma((a + b) / 2 + 1)) / mpmath.pi)


def test_grid_is_exact_to_degree_2n_and_no_further():
  degree = 10
  grid = quad.disk_grid(degree)
  assert grid.x.shape == (degree // 2 + 1, 2 * degree + 1) and grid.degree == degree
  np.testing.assert_allclose(grid.weights.sum(), 1.0, atol=1e-15)
  with jax.enable_x64(True):
    for a in range(2 * degree + 1):
      for b in range(2 * degree + 1 - a):
        got = float(quad.disk_mean(grid.x**a * grid.y**b, grid))
        assert abs(got - _disk_moment(a, b)) <= 1e-15, (a, b)
    # The grid is minimal: Re (x + iy)^(2N+1) = r^(2N+1) cos((2N+1) theta) has mean 0 but
    # aliases onto the constant on 2N + 1 angles ...
    alias = np.real((grid.x + 1j * grid.y)**(2 * degree + 1))
    assert abs(float(quad.disk_mean(alias, grid))) > 1e-3
    # ... and for odd N, (x^2 + y^2)^(N+1) (degree 2N + 2) exceeds the Gauss rule in t.
    odd = quad.disk_grid(degree + 1)
    radial = (odd.x**2 + odd.y**2)**(degree + 2)
    assert abs(float(quad.disk_mean(radial, odd)) - 1 / (degree + 3)) > 1e-8


@pytest.mark.parametrize("degree", [10, 60])
def test_discrete_orthonormality_on_the_grid(degree):
  grid = quad.disk_grid(degree)
  with jax.enable_x64(True):
    basis = np.asarray(jax.jit(lambda x, y: zk.zernike_basis(x, y, degree))(grid.x, grid.y))
  basis = basis.reshape(basis.shape[0], -1)
  gram = (basis * grid.weights.reshape(1, -1)) @ basis.T
  err = np.abs(gram - np.eye(gram.shape[0])).max()
  assert err <= 1e-13, err


@pytest.mark.parametrize("degree, normalization", [(7, "unit_peak"), (20, "orthonormal"),
                                                   (60, "orthonormal")])
def test_interpolation_recovers_random_expansions(degree, normalization):
  grid = quad.disk_grid(degree)
  coeffs = np.random.default_rng(degree).normal(size=(zk.num_modes(degree), 2))

  def run(coeffs):
    # Sample by direct evaluation (independent of the transform's FFT and radial matrix).
    values = zk.zernike_expansion(coeffs, grid.x, grid.y, normalization=normalization)
    back = quad.inverse_zernike_transform(coeffs, grid, normalization=normalization)
    return (values, quad.zernike_transform(values, grid, normalization=normalization), back,
            quad.zernike_transform(back, grid, normalization=normalization),
            quad.zernike_transform(values, grid, 5, normalization=normalization))

  with jax.enable_x64(True):
    values, got, back, again, low = jax.tree.map(np.asarray, jax.jit(run)(coeffs))
  assert values.shape == grid.x.shape + (2,)
  assert np.abs(got - coeffs).max() <= 1e-12
  # The inverse transform round-trips and reproduces the samples (it evaluates at the exact
  # polar nodes, the direct evaluation at their rounded (x, y): equal up to gradient x ulp).
  assert np.abs(again - coeffs).max() <= 1e-12
  assert np.abs(back - values).max() <= 1e-15 * np.abs(values).max() * zk.num_modes(degree)
  # A lower-degree request returns the leading (exact) coefficients.
  assert np.abs(low - coeffs[:zk.num_modes(5)]).max() <= 1e-12


def test_interpolation_is_spectrally_accurate_on_exp():
  rng = np.random.default_rng(6)
  r, theta = np.sqrt(rng.uniform(size=400)), rng.uniform(0, 2 * np.pi, 400)
  px, py = r * np.cos(theta), r * np.sin(theta)
  degrees = (4, 8, 12, 16)
  grids = [quad.disk_grid(d) for d in degrees]

  def run(px, py):
    basis = zk.zernike_basis(px, py, degrees[-1])
    coeffs = [quad.zernike_transform(jnp.exp(g.x + 2 * g.y), g) for g in grids]
    # The degree-N interpolant uses the degree-N prefix of the degree-16 basis.
    return [c @ basis[:c.shape[0]] for c in coeffs]

  with jax.enable_x64(True):
    approx = jax.jit(run)(px, py)
  errors = [np.abs(np.asarray(a) - np.exp(px + 2 * py)).max() for a in approx]
  # Geometric (faster than any power) decay down to rounding level.
  assert errors[0] > 1e-2 and errors[-1] < 1e-12, errors
  assert all(e1 < 1e-3 * e0 for e0, e1 in zip(errors[:-2], errors[1:-1])), errors


def test_transform_errors():
  grid = quad.disk_grid(6)
  with pytest.raises(ValueError, match="too large for disk_grid"):
    quad.zernike_transform(np.zeros(grid.x.shape), grid, 7)
  with pytest.raises(ValueError, match="too large for disk_grid"):
    quad.inverse_zernike_transform(np.zeros(zk.num_modes(7)), grid)
  with pytest.raises(ValueError, match="sampled on the grid"):
    quad.zernike_transform(np.zeros((3, 13)), grid)
  with pytest.raises(ValueError, match="not a complete Zernike basis"):
    quad.inverse_zernike_transform(np.zeros(11), grid)


# ---------------------------------------------------------------------------------------------
# The layer and its growth morphism.
# ---------------------------------------------------------------------------------------------


def test_zernike_layer_shapes_and_values():
  layer = ZernikeLayer(degree=4, features=3)
  pts = jax.random.uniform(jax.random.key(0), (2, 5, 2), minval=-0.7, maxval=0.7)
  variables = jax.jit(layer.init)(jax.random.key(1), pts)
  assert variables["params"]["coefficients"].shape == (zk.num_modes(4), 3)
  apply = jax.jit(layer.apply)
  out = apply(variables, pts)
  assert out.shape == (2, 5, 3) and out.dtype == jnp.float32
  coeffs = np.asarray(variables["params"]["coefficients"], np.float64)
  pts64 = np.asarray(pts, np.float64)
  exact = zernike_basis_exact(pts64[..., 0], pts64[..., 1], 4)            # [K, 10]
  expected = (exact.T @ coeffs).reshape(2, 5, 3)
  with jax.enable_x64(True):
    out64 = apply(variables, jnp.asarray(pts64))
    assert out64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out64), expected, rtol=0, atol=1e-13)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match=r"shape \[\.\.\., 2\]"):
    layer.apply(variables, jnp.zeros((5, 3)))


def test_grow_degree_preserves_the_function_and_carries_optimizer_state():
  layer = ZernikeLayer(degree=3, features=2)
  pts = jax.random.uniform(jax.random.key(2), (64, 2), minval=-0.7, maxval=0.7)
  target = jnp.sin(3 * pts[:, :1])
  variables = jax.jit(layer.init)(jax.random.key(3), pts)
  opt = optax.sgd(1e-2, momentum=0.9)  # (adam trips strict dtype promotion inside optax)

  def train_step(module, variables, opt_state):
    loss_fn = lambda v: jnp.mean(jnp.square(module.apply(v, pts) - target))
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = opt.update(grads["params"], opt_state)
    return loss, {"params": optax.apply_updates(variables["params"], updates)}, opt_state

  _, variables, opt_state = jax.jit(functools.partial(train_step, layer))(
      variables, opt.init(variables["params"]))

  new_layer, new_variables, record = grow_degree(layer, variables, 7)
  assert new_layer.degree == 7 and record["old_num_modes"] == 10
  assert record["new_num_modes"] == zk.num_modes(7) and record["axis"] == 0
  old = np.asarray(variables["params"]["coefficients"])
  new = np.asarray(new_variables["params"]["coefficients"])
  np.testing.assert_array_equal(new[:10], old)
  assert new.shape == (zk.num_modes(7), 2) and not new[10:].any()  # appended at the end, zero
  with jax.enable_x64(True):  # compare in float64 so that only the morphism could differ
    p64 = jnp.asarray(pts, jnp.float64)
    before = jax.jit(layer.apply)(variables, p64)
    after = jax.jit(new_layer.apply)(new_variables, p64)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=0, atol=1e-14)
  # Optimizer moments follow by the same rule and training continues, from the same loss.
  new_state = gtree.transplant(opt.init(new_variables["params"]), opt_state)
  np.testing.assert_array_equal(np.asarray(new_state[0].trace["coefficients"])[:10],
                                np.asarray(opt_state[0].trace["coefficients"]))
  loss, grown, _ = jax.jit(functools.partial(train_step, new_layer))(new_variables, new_state)
  expected_loss = float(jnp.mean(jnp.square(jnp.asarray(before, jnp.float32) - target)))
  assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
  assert np.isfinite(np.asarray(grown["params"]["coefficients"])).all()
  with pytest.raises(ValueError, match="only grows"):
    grow_degree(layer, variables, 2)
  with pytest.raises(TypeError, match="ZernikeLayer"):
    grow_degree(object(), variables, 5)
