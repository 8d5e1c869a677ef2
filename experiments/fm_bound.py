"""Parallel inference with the forest mixture bound vs CAVI as models become less forest-like.

Lawton, Ver Steeg & Galstyan (UAI 2018), "Parallel inference for deep exponential families via
the forest mixture bound", arXiv:1805.06951 (METHODS.md §8). Claim under test: FM-bound updates
are stable without choosing blocks and converge faster the more forest-like the model is.

For each ``eps`` (relative scale of each child's 4 weak parents next to its one strong parent;
``growjax.vi.forest_like_model``) and each method (sequential CAVI; the FM bound's update
``fm``, with an exact line search ``fm_ls`` and as conjugate FM directions ``fm_cg``, growjax's
extensions; block CAVI on a colouring; naive parallel CAVI), all in sparse form and jitted end to
end:
* iterations and wall time until the solver's stopping rule (relative ELBO change <= ``tol``),
  and the relative ELBO gap to the exact optimum where it stopped;
* iterations and wall time to reach a relative ELBO gap <= ``gap_tol`` to the exact optimum
  (equal accuracy for every method);
* the ELBO trace, drawn against wall time (iteration i at ``i x`` the measured time per
  iteration, after the measured fixed cost of a solve).
The ELBO trace is the solver's own (``SolveInfo.elbo``): for ``fm_ls``, ``fm_cg`` and sequential
CAVI carried by each step's exact gain (``DEFState.elbo``), equal to the ELBO recomputed from
the iterate up to rounding (tests/test_vi_def.py).
Wall times are medians over ``reps`` interleaved repetitions (rotating method order).

Outputs in the workdir: ``metrics.jsonl`` (one record per eps and method, then a summary),
``traces.jsonl`` (ELBO gap per iteration) and ``fm_bound.png``.

Run: ``python -m experiments.fm_bound --workdir=/tmp/fm_bound``
(config and expected results: experiments/configs/fm_bound.py).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from growjax import vi
from growjax.train.metrics import MetricWriter, Progress, format_table, save_figure

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "fm_bound.py")
METHOD_ORDER = ("sequential", "fm", "fm_ls", "fm_cg", "block", "parallel")
COLOURS = {"sequential": "tab:blue", "fm": "tab:red", "fm_ls": "tab:orange", "fm_cg": "tab:purple",
           "block": "tab:green", "parallel": "tab:gray"}


def solve_fn(solver: vi.DEFSolver, max_iters: int):
  """Jitted whole solve ``(model, tol, limit) -> (means, iterations, converged, diverged)``.

  Returns only what a caller keeps: every output array costs a few microseconds of dispatch on
  CPU whatever the method, so the ELBO trace and the cached state stay inside (the same for
  every method). ``tol`` and ``limit`` are traced: one compilation serves the stopping-rule run
  and the fixed-budget run (``tol < 0`` runs exactly ``limit`` iterations).
  """
  def run_solve(model, tol, limit):
    state, info = vi.solve(solver, model, max_iters=max_iters, tol=tol, limit=limit)
    return state.means, info.iterations, info.converged, info.diverged
  return jax.jit(run_solve)


def trace_fn(solver: vi.DEFSolver, max_iters: int, tol: float):
  """Jitted solve returning the final state and the full ``SolveInfo`` (ELBO trace)."""
  return jax.jit(functools.partial(vi.solve, solver, max_iters=max_iters, tol=tol))


def interleaved_times(fns: dict, args: tuple, reps: int) -> dict[str, np.ndarray]:
  """Wall time of each (already compiled) function, ``reps`` times, rotating the order."""
  names = list(fns)
  out = {k: np.zeros(reps) for k in names}
  for r in range(reps):
    for j in range(len(names)):
      k = names[(r + j) % len(names)]
      t0 = time.perf_counter()
      jax.block_until_ready(fns[k](*args))
      out[k][r] = time.perf_counter() - t0
  return out


def gaps(trace: np.ndarray, best: float) -> np.ndarray:
  """Relative ELBO gaps ``(ELBO* - ELBO) / |ELBO*|`` of a trace."""
  return (best - np.asarray(trace, np.float64)) / abs(best)


def iterations_to_gap(trace: np.ndarray, best: float, tol: float) -> int | None:
  """First iteration (>= 1) whose relative gap is <= tol; None if the trace never gets there."""
  hits = np.flatnonzero(gaps(trace, best)[1:] <= tol)
  return int(hits[0]) + 1 if hits.size else None


def make_solvers(model: vi.GaussianDEF, unroll: int = 1) -> dict[str, vi.DEFSolver]:
  return {"sequential": vi.sequential_cavi(unroll=unroll), "fm": vi.forest_mixture(),
          "fm_ls": vi.forest_mixture(line_search=True),
          "fm_cg": vi.forest_mixture(line_search=True, conjugate=True),
          "block": vi.block_cavi(vi.color_blocks(model)), "parallel": vi.parallel_cavi()}


def _plot(records, traces, config, path):
  import matplotlib  # local: plotting only
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  eps_list = list(config.eps)
  fig, axes = plt.subplots(2, len(eps_list), figsize=(3.6 * len(eps_list), 6.4),
                           squeeze=False)
  for j, eps in enumerate(eps_list):
    ax = axes[0, j]
    for k in METHOD_ORDER:
      tr = traces.get((eps, k))
      if tr is None:
        continue
      t_ms, g = tr
      ax.plot(t_ms, np.maximum(g, 1e-16), label=k, color=COLOURS[k])
    ax.set_yscale("log")
    # Show until the slowest convergent method is well past the tolerance line.
    reach = [r["gap_ms"] for r in records if r["eps"] == eps and r["gap_ms"] is not None]
    if reach:
      ax.set_xlim(0.0, 1.5 * max(reach))
    ax.axhline(config.gap_tol, color="k", lw=0.6, ls=":")
    ax.set_ylim(1e-14, 10.0)
    ax.set_title(f"eps={eps:g}, forest-likeness "
                 f"{next(r['forest_likeness'] for r in records if r['eps'] == eps):.2f}",
                 fontsize=9)
    ax.set_xlabel("wall time [ms]")
    if j == 0:
      ax.set_ylabel("(ELBO* - ELBO) / |ELBO*|")
      ax.legend(fontsize=8)
  # Bottom row: iterations and time to the gap tolerance against forest-likeness.
  ax_it, ax_t = axes[1, 0], axes[1, 1] if len(eps_list) > 1 else axes[1, 0]
  for k in METHOD_ORDER:
    rows = [r for r in records if r["method"] == k and r.get("gap_iterations") is not None]
    if not rows:
      continue
    fl = [r["forest_likeness"] for r in rows]
    ax_it.plot(fl, [r["gap_iterations"] for r in rows], "o-", color=COLOURS[k], label=k)
    ax_t.plot(fl, [r["gap_ms"] for r in rows], "o-", color=COLOURS[k], label=k)
  for ax, lab in ((ax_it, "iterations"), (ax_t, "wall time [ms]")):
    ax.set_xlabel("forest-likeness")
    ax.set_ylabel(f"{lab} to gap <= {config.gap_tol:g}")
    ax.set_yscale("log")
  ax_it.legend(fontsize=8)
  for ax in axes[1, 2:]:
    ax.axis("off")
  fig.suptitle("Gaussian DEF, sparse: FM bound vs CAVI (Lawton, Ver Steeg & Galstyan 2018)")
  fig.tight_layout()
  return save_figure(fig, path)


def run(config, workdir: str) -> dict:
  """Runs every method on every eps; returns the summary (also the last line of metrics)."""
  os.makedirs(workdir, exist_ok=True)
  writer = MetricWriter(workdir)
  trace_writer = MetricWriter(workdir, name="traces")
  records, traces, table = [], {}, []
  progress = Progress(len(config.eps), name="fm_bound", every_s=0.0)
  with jax.enable_x64(True):  # the targets are relative ELBO gaps of 1e-6 and below
    for i, eps in enumerate(config.eps):
      model = vi.forest_like_model(float(eps), num_children=config.num_children,
                                   num_parents=config.num_parents, num_weak=config.num_weak,
                                   noise_variance=config.noise_variance, seed=config.seed,
                                   dtype=jnp.float64)
      exact = jax.jit(vi.exact_posterior)(model)
      best = float(vi.elbo(model, exact.means, exact.variances))
      forest = float(vi.forest_likeness(model))
      solvers = make_solvers(model, config.sequential_unroll)
      info, timed_rule, timed_gap = {}, {}, {}
      for k, solver in solvers.items():
        _, long = trace_fn(solver, config.trace_iters, -1.0)(model)
        trace = np.asarray(long.elbo)[:int(long.iterations) + 1]
        fn = solve_fn(solver, config.max_iters)
        rule_args = (model, config.tol, config.max_iters)
        state_means, n_rule, converged, diverged = fn(*rule_args)
        n_rule = int(n_rule)
        rule_elbo = float(vi.elbo(model, state_means, tuple(1.0 / p for p in
                                                            vi.precision_diag(model))))
        n_gap = iterations_to_gap(trace, best, config.gap_tol)
        info[k] = {"iterations": n_rule, "converged": bool(converged),
                   "diverged": bool(diverged),
                   "gap_at_rule": float(gaps(np.array([rule_elbo]), best)[0]),
                   "gap_iterations": n_gap, "trace": trace}
        if not diverged:
          timed_rule[k] = functools.partial(fn, *rule_args)
        if n_gap is not None:
          timed_gap[k] = functools.partial(fn, model, -1.0, n_gap)
      t_rule = interleaved_times(timed_rule, (), config.reps)
      t_gap = interleaved_times(timed_gap, (), config.reps)
      for k in METHOD_ORDER:
        d = info[k]
        rec = {"eps": float(eps), "forest_likeness": forest, "method": k,
               "iterations": d["iterations"], "converged": d["converged"],
               "diverged": d["diverged"], "gap_at_rule": d["gap_at_rule"],
               "rule_ms": float(np.median(t_rule[k]) * 1e3) if k in t_rule else None,
               "gap_iterations": d["gap_iterations"],
               "gap_ms": float(np.median(t_gap[k]) * 1e3) if k in t_gap else None}
        if k in t_rule and "sequential" in t_rule:
          rec["rule_speedup_vs_sequential"] = float(np.median(t_rule["sequential"] / t_rule[k]))
        if k in t_gap and "sequential" in t_gap:
          rec["gap_speedup_vs_sequential"] = float(np.median(t_gap["sequential"] / t_gap[k]))
        writer.write(rec)
        records.append(rec)
        # Time axis of the trace: the measured time per iteration of the equal-accuracy solve
        # (fixed cost included, spread evenly), or of the rule solve.
        g = gaps(d["trace"], best)
        if rec["gap_ms"] is not None:
          per_iter = rec["gap_ms"] / d["gap_iterations"]
        elif rec["rule_ms"] is not None:
          per_iter = rec["rule_ms"] / max(d["iterations"], 1)
        else:  # diverged, so untimed: draw it on the FM solve's per-iteration scale
          fm_rec = next(r for r in records if r["eps"] == float(eps) and r["method"] == "fm")
          per_iter = fm_rec["rule_ms"] / max(fm_rec["iterations"], 1)
        t_ms = per_iter * np.arange(len(g))
        if d["diverged"]:  # draw the divergence up to where solve detected it
          g, t_ms = g[:d["iterations"] + 1], t_ms[:d["iterations"] + 1]
        traces[(float(eps), k)] = (t_ms, g)
        trace_writer.write({"eps": float(eps), "method": k, "time_ms": t_ms.tolist(),
                            "gap": g.tolist()})
        table.append({"eps": float(eps), "forest": forest, "method": k,
                      "status": "diverged" if d["diverged"] else (
                          "ok" if d["converged"] else "max_iters"),
                      "iters": d["iterations"], "rule_ms": rec["rule_ms"] or float("nan"),
                      "rule_x": rec.get("rule_speedup_vs_sequential", float("nan")),
                      "gap@rule": d["gap_at_rule"],
                      "gap_iters": d["gap_iterations"] if d["gap_iterations"] else "-",
                      "gap_ms": rec["gap_ms"] or float("nan"),
                      "gap_x": rec.get("gap_speedup_vs_sequential", float("nan"))})
      progress.update(i + 1, eps=float(eps), fm_iters=info["fm"]["iterations"],
                      seq_iters=info["sequential"]["iterations"])
  print(format_table(table, ["eps", "forest", "method", "status", "iters", "rule_ms", "rule_x",
                             "gap@rule", "gap_iters", "gap_ms", "gap_x"]))
  plot = _plot(records, traces, config, os.path.join(workdir, "fm_bound.png"))
  fm = {r["eps"]: r for r in records if r["method"] == "fm"}
  fm_ls = {r["eps"]: r for r in records if r["method"] == "fm_ls"}
  fm_cg = {r["eps"]: r for r in records if r["method"] == "fm_cg"}
  summary = {
      "summary": True, "plot": plot,
      "fm_rule_speedup_vs_sequential": {e: r.get("rule_speedup_vs_sequential")
                                        for e, r in fm.items()},
      "fm_gap_speedup_vs_sequential": {e: r.get("gap_speedup_vs_sequential")
                                       for e, r in fm.items()},
      "fm_ls_rule_speedup_vs_sequential": {e: r.get("rule_speedup_vs_sequential")
                                           for e, r in fm_ls.items()},
      "fm_cg_rule_speedup_vs_sequential": {e: r.get("rule_speedup_vs_sequential")
                                           for e, r in fm_cg.items()},
      "fm_iterations": {e: r["iterations"] for e, r in fm.items()},
      "fm_ls_iterations": {e: r["iterations"] for e, r in fm_ls.items()},
      "fm_cg_iterations": {e: r["iterations"] for e, r in fm_cg.items()},
      "forest_likeness": {e: r["forest_likeness"] for e, r in fm.items()},
      "parallel_diverged": {r["eps"]: r["diverged"] for r in records
                            if r["method"] == "parallel"},
      "records": records}
  writer.write({k: v for k, v in summary.items() if k != "records"})
  logging.info("FM speed-up vs sequential CAVI (stopping rule): %s; with line search: %s; "
               "conjugate directions: %s", summary["fm_rule_speedup_vs_sequential"],
               summary["fm_ls_rule_speedup_vs_sequential"],
               summary["fm_cg_rule_speedup_vs_sequential"])
  return summary


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests and notebooks can import run() next to
  # other experiment modules without duplicate-flag errors.
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", default=_DEFAULT_CONFIG,
                                  help_string="ml_collections config file (optionally :quick).")
  flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl, traces.jsonl and the plot.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
