"""Replays a gate-scheduling conflict stream through the dynamic maximal-clique index.

Lawton 2014, "Updating maximal cliques after an edge insertion" (arXiv:1412.4620); METHODS.md §10.
Flights hold gates over time intervals and conflict when the intervals overlap. A stream of
delays edits the intervals (late departures stretch them, late arrivals shift them); each edit
becomes edge insertions and deletions of the conflict graph, applied to ``CliqueIndex`` one by
one and timed (CPU time of this process, ``time.process_time``, so that other jobs on shared
cores stay out of the figures). At checkpoints the maximal cliques are recomputed with networkx
(timed, and compared for exact equality), and the clique number (gates needed: interval graphs
are perfect) and the colours of ``CliqueIndex.coloring`` (a gate assignment) are recorded.

Outputs in the workdir: ``metrics.jsonl`` (one record per checkpoint, then a summary),
``updates.jsonl`` (every edge update: kind, k = cliques of the scanned endpoint, microseconds)
and ``clique_stream.png``.

Run: ``python -m experiments.clique_stream --workdir=/tmp/clique_stream``
(config and expected results: experiments/configs/clique_stream.py).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from absl import app, flags, logging

from growjax.graphs import CliqueIndex
from growjax.train.metrics import MetricWriter, Progress, format_table, save_figure

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "clique_stream.py")


def make_schedule(config, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Random gate occupancy intervals ``[start, end)`` [num_flights] in minutes."""
  start = rng.uniform(0.0, config.horizon_min, size=config.num_flights)
  extra = max(config.mean_turnaround_min - config.min_turnaround_min, 0.0)
  end = start + config.min_turnaround_min + rng.exponential(extra, size=config.num_flights)
  return start, end


def conflict_edges(start: np.ndarray, end: np.ndarray) -> list[tuple[int, int]]:
  """Pairs of overlapping intervals, by a sweep over the intervals sorted by start."""
  order = np.argsort(start, kind="stable")
  edges, open_ = [], []
  for i in order.tolist():
    open_ = [j for j in open_ if end[j] > start[i]]  # intervals still running at start[i]
    edges.extend((j, i) for j in open_)
    open_.append(i)
  return edges


def _overlaps(start, end, s, e) -> np.ndarray:
  return (start < e) & (s < end)


def run(config, workdir: str) -> dict:
  """Replays the delay stream; returns the summary (also written to ``metrics.jsonl``)."""
  try:
    import networkx as nx  # the oracle and the recomputation baseline
  except ImportError as e:  # pragma: no cover - networkx ships with the test and bench extras
    raise ImportError("clique_stream compares against networkx: pip install networkx "
                      "(part of growjax's [test] and [bench] extras).") from e
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(config.seed)
  start, end = make_schedule(config, rng)
  n = config.num_flights
  edges = conflict_edges(start, end)
  t0 = time.perf_counter()
  index = CliqueIndex(edges, vertices=range(n))
  build_s = time.perf_counter() - t0
  logging.info("schedule: %d flights, %d conflicts, %d maximal cliques (built in %.2fs)", n,
               len(edges), index.num_cliques, build_s)

  writer = MetricWriter(workdir)
  updates_log = MetricWriter(workdir, name="updates")
  progress = Progress(config.num_delays, name="clique_stream")
  every = max(config.num_delays // max(config.checkpoints, 1), 1)
  times = {"insert": [], "delete": []}
  event_s: list[float] = []
  rows, recompute_ms = [], []

  def checkpoint(event: int) -> None:
    g = index.to_networkx()
    t = time.process_time()
    reference = set(map(frozenset, nx.find_cliques(g)))
    recompute_ms.append(1e3 * (time.process_time() - t))
    if config.check_exact and set(index.cliques()) != reference:
      raise AssertionError(f"clique index differs from networkx after {event} delays")
    colour = index.coloring()
    assert all(colour[a] != colour[b] for a, b in index.edges()), "improper colouring"
    ins, dels = times["insert"][-10_000:], times["delete"][-10_000:]
    row = {
        "event": event, "edges": index.num_edges, "max_cliques": index.num_cliques,
        "gates_needed": index.clique_number(), "colours": max(colour.values()) + 1,
        "insert_us_median": 1e6 * statistics.median(ins) if ins else float("nan"),
        "delete_us_median": 1e6 * statistics.median(dels) if dels else float("nan"),
        "networkx_ms": recompute_ms[-1],
    }
    rows.append(row)
    writer.write(row)

  checkpoint(0)
  for event in range(1, config.num_delays + 1):
    f = int(rng.integers(n))
    delay = float(rng.exponential(config.mean_delay_min))
    shift = rng.random() < config.shift_fraction
    old = _overlaps(start, end, start[f], end[f])
    if shift:
      start[f] += delay  # late arrival: the whole gate occupancy moves
    end[f] += delay
    new = _overlaps(start, end, start[f], end[f])
    old[f] = new[f] = False
    t_event = 0.0
    for kind, others in (("delete", np.flatnonzero(old & ~new)),
                         ("insert", np.flatnonzero(new & ~old))):
      update = index.delete_edge if kind == "delete" else index.insert_edge
      for j in others.tolist():
        k = min(index.num_cliques_of(f), index.num_cliques_of(j))
        t = time.process_time()
        changed = update(f, j)
        dt = time.process_time() - t
        assert changed, f"{kind} ({f}, {j}) was a no-op: the stream is out of sync"
        times[kind].append(dt)
        t_event += dt
        updates_log.write({"event": event, "kind": kind, "k": k, "us": 1e6 * dt})
    event_s.append(t_event)
    progress.update(event, edges=index.num_edges, cliques=index.num_cliques)
    if event % every == 0 or event == config.num_delays:
      if not rows or rows[-1]["event"] != event:
        checkpoint(event)
  index.check()  # full invariant check, including a fresh Bron-Kerbosch enumeration

  all_updates = times["insert"] + times["delete"]
  median_update = statistics.median(all_updates) if all_updates else float("nan")
  mean_event = statistics.fmean(event_s)
  nx_ms = statistics.median(recompute_ms)
  summary = {
      "summary": True, "flights": n, "delays": config.num_delays,
      "inserts": len(times["insert"]), "deletes": len(times["delete"]),
      "edges_final": index.num_edges, "max_cliques_final": index.num_cliques,
      "gates_needed_final": index.clique_number(), "colours_final": rows[-1]["colours"],
      "build_s": build_s,
      "insert_us_median": 1e6 * statistics.median(times["insert"]) if times["insert"] else None,
      "delete_us_median": 1e6 * statistics.median(times["delete"]) if times["delete"] else None,
      "update_us_p99": 1e6 * float(np.percentile(all_updates, 99)) if all_updates else None,
      "event_us_mean": 1e6 * mean_event, "networkx_recompute_ms_median": nx_ms,
      "speedup_per_update": 1e-3 * nx_ms / median_update,
      "speedup_per_delay_event": 1e-3 * nx_ms / mean_event if mean_event > 0 else None,
      "exact_at_checkpoints": bool(config.check_exact),
  }
  writer.write(summary)
  print(format_table(rows))
  print(format_table([{k: v for k, v in summary.items() if k != "summary"}]))
  summary["plot"] = _plot(workdir, rows, updates_log.path, nx_ms)
  return summary


def _plot(workdir: str, rows: list[dict], updates_path: str, nx_ms: float) -> str:
  import matplotlib.pyplot as plt  # local: only the plot needs matplotlib
  from growjax.train.metrics import read_jsonl
  ups = read_jsonl(updates_path)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  ax = axes[0]
  for kind, colour in (("insert", "tab:blue"), ("delete", "tab:orange")):
    pts = [(u["event"], u["us"]) for u in ups if u["kind"] == kind]
    if pts:
      ax.scatter(*zip(*pts), s=2, alpha=0.3, color=colour, label=f"{kind}_edge")
  ax.axhline(1e3 * nx_ms, color="k", ls="--", label="networkx recompute (median)")
  ax.set(yscale="log", xlabel="delay event", ylabel="time per update (µs)",
         title="Time per edge update over the stream")
  ax.legend(markerscale=4, fontsize=8, loc="center right")
  ax = axes[1]
  for kind, colour in (("insert", "tab:blue"), ("delete", "tab:orange")):
    pts = [(max(u["k"], 1), u["us"]) for u in ups if u["kind"] == kind]
    if pts:
      ax.scatter(*zip(*pts), s=2, alpha=0.3, color=colour, label=kind)
  ax.set(xscale="log", yscale="log", xlabel="k = cliques of the scanned endpoint",
         ylabel="µs", title="Update time vs cliques of the endpoint")
  ax.legend(markerscale=4, fontsize=8)
  ax = axes[2]
  ev = [r["event"] for r in rows]
  ax.plot(ev, [r["gates_needed"] for r in rows], "o-", label="gates needed (clique number)")
  ax.plot(ev, [r["colours"] for r in rows], "s--", label="greedy colouring (gates used)")
  ax.set(xlabel="delay event", ylabel="gates", title="Gates needed as delays accumulate")
  ax.legend(fontsize=8)
  return save_figure(fig, os.path.join(workdir, "clique_stream.png"))


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests and notebooks can import run() next to
  # other experiment modules without duplicate-flag errors.
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", default=_DEFAULT_CONFIG,
                                  help_string="ml_collections config file (optionally :quick).")
  flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl, updates.jsonl and the plot.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
