"""High-precision reference values of Zernike modes (for tests and benchmarks; needs mpmath).

The explicit factorial formula (Noll 1976; Greengard & Serkh 2018, arXiv:1811.02720, explain
why it fails in floating point) is exact in rational arithmetic, and every float64 point is a
dyadic rational: with ``x = X / 2^e`` and ``y = Y / 2^e``, ``Z_n^m`` is an exact rational built
from Python integers (``(X + iY)^|m|`` and a Horner sum in ``X^2 + Y^2``); only the final
normalisation ``sqrt(n + 1)`` or ``sqrt(2(n + 1))`` is applied with mpmath at ``dps`` digits.
An oracle independent of the recurrence in ``growjax.numerics.zernike``: slow, pure Python, never
used by the library itself.
"""

from __future__ import annotations

import functools
from math import factorial

import numpy as np

from growjax.numerics import zernike as zk


@functools.lru_cache(maxsize=8)
def _radial_coefficients(degree: int) -> dict[tuple[int, int], list[int]]:
  """Integer coefficients ``c_s`` with ``R_n^m(r) = r^m sum_s c_s t^(k - s)``, ``t = r^2``."""
  coeffs = {}
  for m in range(degree + 1):
    for n in range(m, degree + 1, 2):
      k = (n - m) // 2
      coeffs[(n, m)] = [(-1)**s * factorial(n - s) // (factorial(s) * factorial((n + m) // 2 - s)
                                                      * factorial(k - s)) for s in range(k + 1)]
  return coeffs


def _dyadic(v: float) -> tuple[int, int]:
  """``v = num / 2^exp`` exactly."""
  num, den = float(v).as_integer_ratio()
  return num, den.bit_length() - 1


def zernike_basis_exact(x, y, degree: int, *, normalization: str = "orthonormal",
                        dps: int = 40, derivatives: bool = False):
  """All modes up to ``degree`` (OSA order) at float points, correctly rounded to float64.

  Args:
    x: [P] abscissae (converted exactly).
    y: [P] ordinates.
    degree: largest degree N.
    normalization: ``"orthonormal"`` or ``"unit_peak"``.
    dps: mpmath digits for the final normalisation and division.
    derivatives: also return d/dx and d/dy.

  Returns:
    [K, P] float64 values, or ``(values, d_dx, d_dy)`` if ``derivatives``.
  """
  import mpmath  # pylint: disable=import-outside-toplevel  (test/bench extra only)
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  ns, ms = zk.mode_indices(degree)
  kappa2 = np.round(zk.normalization_factors(ns, ms, normalization)**2).astype(int).tolist()
  coeffs = _radial_coefficients(degree)
  shape = (len(ns), x.size)
  values, d_dx, d_dy = np.empty(shape), np.empty(shape), np.empty(shape)
  with mpmath.workdps(dps):
    kap = [mpmath.sqrt(k2) for k2 in kappa2]

    def to_float(j, num, log2_den):
      return float(kap[j] * mpmath.ldexp(mpmath.mpf(num), -log2_den))

    for p in range(x.size):
      (xn, ex), (yn, ey) = _dyadic(x[p]), _dyadic(y[p])
      e = max(ex, ey)
      big_x, big_y = xn << (e - ex), yn << (e - ey)  # x = X / 2^e, y = Y / 2^e
      big_t = big_x * big_x + big_y * big_y          # t = T / 4^e
      zpow = [(1, 0)]                                # (X + iY)^a as (re, im) integers
      for _ in range(degree):
        re, im = zpow[-1]
        zpow.append((re * big_x - im * big_y, re * big_y + im * big_x))
      for j, (n, m) in enumerate(zip(ns.tolist(), ms.tolist())):
        a = abs(m)
        c = coeffs[(n, a)]
        k = len(c) - 1
        # q(t) = sum_s c_s t^(k-s) = Q(T) / 4^(e k), Q(T) = sum_s c_s T^(k-s) 4^(e s) (Horner).
        big_q = 0
        for s, cs in enumerate(c):
          big_q = big_q * big_t + cs * (1 << (2 * e * s))
        w = zpow[a][0] if m >= 0 else zpow[a][1]     # W / 2^(e a)
        values[j, p] = to_float(j, big_q * w, 2 * e * k + e * a)
        if derivatives:
          # dq/dt = Q'(T) / 4^(e (k-1)).
          big_dq = sum(cs * (k - s) * big_t**(k - s - 1) * (1 << (2 * e * s))
                       for s, cs in enumerate(c[:-1]))
          # d/dx (x + iy)^a = a (x + iy)^(a-1) and d/dy = i a (x + iy)^(a-1), over 2^(e (a-1)).
          zr, zi = zpow[a - 1] if a else (0, 0)
          dwx, dwy = (a * zr, -a * zi) if m >= 0 else (a * zi, a * zr)
          # d/dx [q w] = 2 x q' w + q dw/dx, both terms over 2^(2 e k + e a - e).
          num_x = 2 * big_x * big_dq * w + big_q * dwx
          num_y = 2 * big_y * big_dq * w + big_q * dwy
          d_dx[j, p] = to_float(j, num_x, 2 * e * k + e * a - e)
          d_dy[j, p] = to_float(j, num_y, 2 * e * k + e * a - e)
  return (values, d_dx, d_dy) if derivatives else values
