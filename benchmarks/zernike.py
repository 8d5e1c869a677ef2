"""Zernike evaluation: growjax.numerics vs the ``zernike`` PyPI package, speed and accuracy.

Speed: all 231 modes of degree <= 20 at 10^5 random points of the unit disk, float64. The
package's ``RZern(20).make_cart_grid(x, y)`` (explicit factorial formula, Noll order, [P, K]
Fortran array) and growjax's jitted ``zernike_basis(x, y, 20)`` (Jacobi recurrence, OSA order,
[K, P] C array: the same memory layout, each mode one contiguous column/row) are timed in the
same run, alternating repetitions, medians reported, ratios against the package. growjax is
timed twice: allocating a fresh output each call, and writing into a donated, reused buffer
(``out=``). ``--alternatives`` also times two ways of writing the same recurrence that this
implementation avoids (Python-unrolled chains gathered by ``jnp.concatenate``, or written by
``dynamic_update_slice``): slower at run time, and their compile time grows steeply with the
degree.

Accuracy: max absolute error of the orthonormal modes against exact rational values
(``growjax.numerics.zernike_reference``) at N = 20, 40, 60, for both, on random points plus the
centre, the circle and points next to both.

Run: ``python benchmarks/zernike.py`` (about a minute on a 2-core machine; ``--quick`` for a
smoke run). Writes ``benchmarks/results/zernike.json``.

Reference for the method: Greengard & Serkh (2018), arXiv:1811.02720.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# This script is itself named zernike.py: drop its folder from the path so that ``import zernike``
# finds the PyPI package, and put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from growjax.numerics import zernike as zk  # noqa: E402
from growjax.numerics.zernike_reference import zernike_basis_exact  # noqa: E402
from growjax.train.metrics import format_table  # noqa: E402


def disk_points(num: int, seed: int, special: bool = False) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  r = np.sqrt(rng.uniform(size=num))
  if special:
    r = np.concatenate([[0.0, 1e-7, 1e-3, 0.03, 0.5, 1 - 1e-9, 1.0, 1.0, 1.0], r])
  theta = rng.uniform(0.0, 2.0 * np.pi, r.size)
  return r * np.cos(theta), r * np.sin(theta)


def package_basis(degree: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The package's modes in OSA order, [K, P] (for the accuracy comparison)."""
  import zernike  # pylint: disable=import-outside-toplevel  (bench extra)
  model = zernike.RZern(degree)
  model.make_cart_grid(x, y, unit_circle=False)
  noll = zk.osa_to_noll(np.arange(zk.num_modes(degree)))
  return np.asarray(model.ZZ)[:, noll - 1].T


def unrolled_basis(x, y, degree: int, concatenate: bool):
  """The plain recurrence with Python-unrolled chains (the layouts this library avoids)."""
  t = x * x + y * y
  rows = [None] * zk.num_modes(degree)
  out = None if concatenate else jnp.zeros((zk.num_modes(degree), x.size), x.dtype)
  re, im = jnp.ones_like(x), jnp.zeros_like(x)
  for m in range(degree + 1):
    if m:
      re, im = re * x - im * y, re * y + im * x
    p_prev, p = jnp.zeros_like(x), jnp.ones_like(x)
    for k in range((degree - m) // 2 + 1):
      n = m + 2 * k
      if k:
        a, b, c = zk._jacobi_step(float(m), k)  # pylint: disable=protected-access
        p_prev, p = p, ((b - a) + 2 * a * t) * p - c * p_prev
      kappa = float(zk.normalization_factors(n, m))
      for j, factor in (((n * (n + 2) - m) // 2, im), ((n * (n + 2) + m) // 2, re)):
        if m == 0 and factor is im:
          continue
        if concatenate:
          rows[j] = kappa * p * factor
        else:
          out = jax.lax.dynamic_update_slice(out, (kappa * p * factor)[None], (j, 0))
  return jnp.stack(rows) if concatenate else out


def interleaved(fns: dict, reps: int) -> dict:
  """Median wall and CPU seconds per function, repetitions alternating between functions."""
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(fn())
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return {name: {"wall_s": float(np.median(wall[name])), "cpu_s": float(np.median(cpu[name])),
                 "wall_min_s": float(np.min(wall[name]))} for name in fns}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=100_000)
  parser.add_argument("--degree", type=int, default=20)
  parser.add_argument("--reps", type=int, default=9)
  parser.add_argument("--accuracy_points", type=int, default=64)
  parser.add_argument("--accuracy_degrees", default="20,40,60")
  parser.add_argument("--alternatives", action="store_true",
                      help="also time the unrolled-chain layouts (slow to compile)")
  parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "zernike.json"))
  args = parser.parse_args(argv)
  if args.quick:
    args.points, args.reps, args.accuracy_points, args.accuracy_degrees = 2000, 3, 8, "20,40"
  import zernike  # pylint: disable=import-outside-toplevel

  degree, num_modes = args.degree, zk.num_modes(args.degree)
  with jax.enable_x64(True):
    xn, yn = disk_points(args.points, 0)
    x, y = jnp.asarray(xn), jnp.asarray(yn)
    package = zernike.RZern(degree)

    def run_package():
      package.make_cart_grid(xn, yn, unit_circle=False)
      return package.ZZ

    fresh = jax.jit(lambda x, y: zk.zernike_basis(x, y, degree))
    reuse = jax.jit(lambda out, x, y: zk.zernike_basis(x, y, degree, out=out),
                    donate_argnums=0)
    state = {"buf": jnp.zeros((num_modes, args.points))}

    def run_reused():
      state["buf"] = reuse(state["buf"], x, y)
      return state["buf"]

    fns = {"zernike package": run_package, "growjax (fresh output)": lambda: fresh(x, y),
           "growjax (donated buffer)": run_reused}
    compile_s = {}
    t0 = time.perf_counter()
    fresh(x, y).block_until_ready()
    compile_s["growjax (fresh output)"] = time.perf_counter() - t0
    if args.alternatives:
      for name, concat in (("unrolled + concatenate", True), ("unrolled + update_slice", False)):
        fn = jax.jit(lambda x, y, c=concat: unrolled_basis(x, y, degree, c))
        t0 = time.perf_counter()
        fn(x, y).block_until_ready()
        compile_s[name] = time.perf_counter() - t0
        fns[name] = lambda fn=fn: fn(x, y)
    for fn in fns.values():  # warm up (and compile) everything before timing
      jax.block_until_ready(fn())
    check = np.abs(np.asarray(fresh(x, y))[:, :2000]
                   - package_basis(degree, xn[:2000], yn[:2000])).max()
    timing = interleaved(fns, args.reps)
    base = timing["zernike package"]
    rows = []
    for name, t in timing.items():
      rows.append({"method": name, "wall_ms": 1e3 * t["wall_s"], "cpu_ms": 1e3 * t["cpu_s"],
                   "speedup_wall": base["wall_s"] / t["wall_s"],
                   "speedup_cpu": base["cpu_s"] / t["cpu_s"],
                   "compile_s": compile_s.get(name, "-")})
    print(f"All {num_modes} modes of degree <= {degree} at {args.points} points, float64, "
          f"median of {args.reps} interleaved repetitions (max |growjax - package| on 2000 "
          f"points: {check:.1e}):")
    print(format_table(rows))

    accuracy = []
    for acc_degree in [int(d) for d in args.accuracy_degrees.split(",")]:
      ax, ay = disk_points(args.accuracy_points, acc_degree, special=True)
      ref = zernike_basis_exact(ax, ay, acc_degree)
      ours = np.asarray(jax.jit(lambda x, y, d=acc_degree: zk.zernike_basis(x, y, d))(ax, ay))
      with np.errstate(all="ignore"):
        theirs = package_basis(acc_degree, ax, ay)
      accuracy.append({"degree": acc_degree, "points": int(ax.size),
                       "growjax_max_abs_err": float(np.abs(ours - ref).max()),
                       "package_max_abs_err": float(np.abs(theirs - ref).max()),
                       "max_abs_value": float(np.abs(ref).max())})
    print("\nMax abs error against exact rational values (orthonormal modes):")
    print(format_table(accuracy))

  result = {
      "benchmark": "zernike",
      "command": "python benchmarks/zernike.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
      "config": {"points": args.points, "degree": degree, "num_modes": num_modes,
                 "reps": args.reps, "dtype": "float64"},
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "jax": jax.__version__, "zernike": getattr(zernike, "__version__", "?"),
                  "load_average": list(os.getloadavg())},
      "timing": rows,
      "agreement_with_package_degree_20": float(check),
      "accuracy": accuracy,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"\nwrote {args.out}")
  return result


if __name__ == "__main__":
  main()
