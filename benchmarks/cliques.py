"""Benchmark: dynamic maximal cliques after an edge insertion (Lawton 2014, arXiv:1412.4620).

Two measurements, each a ratio against a baseline timed in the same run, interleaved
(alternating baseline / ours repetitions, medians) because this machine is noisy:

1. Scaling. Per-insertion time against k, the number of maximal cliques containing the endpoint
   the update scans, for the linear update (``CliqueIndex.insert_edge``) and Stix's pairwise
   filtering (``insert_edge_pairwise``), on two families where uv is inserted:
   ``matching``: u joined to k disjoint edges (k triangles), v to all their a-ends and half their
   b-ends, so clique size stays 3-4 and half the cliques grow, half give new maximal cliques;
   ``multipartite``: u and v joined to a complete multipartite graph with parts of size 3 (and
   2) minus one vertex each, so k = 2 * 3^(m-1) and clique size grows as log k, with candidates
   that fail the maximality test. Fitted log-log slopes for k >= 100: ~1 (linear) vs ~2
   (pairwise), the linear one also over the k range where the pairwise baseline ran.
2. Speed-up over recomputing all maximal cliques with networkx (``nx.find_cliques``, the peer
   library) after each insertion, on G(n, p), power-law-cluster and Barabasi-Albert graphs with
   >= 10^4 maximal cliques (target >= 100x); the pairwise baseline on the same edge stream too.

Usage: python benchmarks/cliques.py [--quick] [--out benchmarks/results/cliques.json]
(full run ~10 min on the 2-core CPU machine, --quick ~30 s). Times are CPU time of this
process (see ``timed``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time

import networkx as nx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from growjax.graphs import CliqueIndex  # noqa: E402
from growjax.train.metrics import format_table  # noqa: E402


def matching_pair(k: int) -> tuple[nx.Graph, str, str]:
  """u joined to a perfect matching a_i-b_i (k triangles); v to every a_i and the even b_i.

  Inserting uv grows the k/2 triangles {u, a_i, b_i} with even i into {u, v, a_i, b_i} (each
  absorbing the clique {v, a_i, b_i}) and turns the k/2 others into maximal candidates
  {u, v, a_i} (each growing the clique {v, a_i}). Clique size stays 3-4 whatever k is.
  """
  g = nx.Graph()
  g.add_nodes_from(["u", "v"])
  for i in range(k):
    a, b = ("a", i), ("b", i)
    g.add_edges_from([(a, b), ("u", a), ("u", b), ("v", a)])
    if i % 2 == 0:
      g.add_edge("v", b)
  return g, "u", "v"


def multipartite_pair(threes: int, twos: int = 0) -> tuple[nx.Graph, str, str]:
  """u, v joined to a complete multipartite H (parts of size 3 and 2) minus one vertex each.

  The cliques of u are the 2 * 3^(threes-1) * 2^twos transversals of H avoiding the missing
  vertex; clique size grows with log k. Inserting uv grows two thirds of them and turns the rest
  into candidates that fail the maximality test.
  """
  sizes = [3] * threes + [2] * twos
  parts = [[(i, j) for j in range(s)] for i, s in enumerate(sizes)]
  g = nx.complete_multipartite_graph(*[len(p) for p in parts])
  g = nx.relabel_nodes(g, {k: x for k, x in enumerate(v for p in parts for v in p)})
  for x in list(g):
    if x != (0, 0):
      g.add_edge("u", x)
    if x != (1, 0):
      g.add_edge("v", x)
  return g, "u", "v"


def timed(fn, *args, collect: bool = True) -> float:
  """CPU seconds of one call (``time.process_time``: the 2 cores are shared with other jobs, whose
  load would otherwise land in wall-clock timings at random), with the cyclic GC paused during
  the call and (``collect``) run before it: timeit's rule, as a full-heap GC pass would otherwise
  land on random calls."""
  if collect:
    gc.collect()
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0
  finally:
    if was_enabled:
      gc.enable()


def scaling(family: str, quick: bool, reps: int) -> tuple[list[dict], dict]:
  """Per-insertion time of both updates vs k on one graph family; log-log slopes for k >= 100."""
  if family == "matching":
    sizes = [10, 30, 100, 300, 1000, 3000] + ([] if quick else [10000, 30000, 100000])
    graphs = [matching_pair(k) for k in sizes]
  else:
    shapes = [(m, 0) for m in range(3, 8 if quick else 11)] + [
        (m, 2) for m in range(2, 6 if quick else 9)]
    shapes.sort(key=lambda c: 3 ** c[0] * 2 ** c[1])
    graphs = [multipartite_pair(*c) for c in shapes]
  pairwise_max_k = 1500 if quick else 5000  # quadratic: beyond this one insertion takes seconds
  rows = []
  for g, u, v in graphs:
    index = CliqueIndex(g)
    k = min(index.num_cliques_of(u), index.num_cliques_of(v))
    run_pairwise = k <= pairwise_max_k
    lin, pair = [], []
    for _ in range(reps):  # interleaved: baseline then ours, every repetition
      if run_pairwise:
        pair.append(timed(index.copy().insert_edge_pairwise, u, v))
      lin.append(timed(index.copy().insert_edge, u, v))
    check = index.copy()
    check.insert_edge(u, v)
    g.add_edge(u, v)
    assert set(check.cliques()) == set(map(frozenset, nx.find_cliques(g))), "wrong cliques"
    row = {"family": family, "k": k, "clique_size": len(next(iter(check.cliques_of(u)))),
           "linear_us": 1e6 * statistics.median(lin)}
    row["linear_us_per_clique"] = row["linear_us"] / k
    if run_pairwise:
      row["pairwise_us"] = 1e6 * statistics.median(pair)
      row["pairwise/linear"] = row["pairwise_us"] / row["linear_us"]
    rows.append(row)
    print(f"  {family} k={k:6d}  linear {row['linear_us']:9.1f} us  pairwise "
          f"{row.get('pairwise_us', float('nan')):12.1f} us", flush=True)
  fits = {}
  shared = [r for r in rows if "pairwise_us" in r and r["k"] >= 100]
  ranges = {"linear": [r for r in rows if r["k"] >= 100], "pairwise": shared,
            "linear_shared": shared}  # the linear update over the pairwise baseline's k range
  for name, pts in ranges.items():
    key = name.split("_")[0] + "_us"
    slope, _ = np.polyfit(np.log([r["k"] for r in pts]), np.log([r[key] for r in pts]), 1)
    fits[f"{family}_{name}_slope"] = float(slope)
    fits[f"{family}_{name}_k_range"] = [pts[0]["k"], pts[-1]["k"]]
  return rows, fits


def random_non_edges(g: nx.Graph, rng: random.Random, count: int) -> list:
  nodes, out, seen = list(g), [], set()
  while len(out) < count:
    u, v = rng.sample(nodes, 2)
    if not g.has_edge(u, v) and frozenset((u, v)) not in seen:
      seen.add(frozenset((u, v)))
      out.append((u, v))
  return out


def speedup(quick: bool, reps: int, per_rep: int) -> list[dict]:
  graphs = {
      "gnp(400,0.15)": lambda: nx.gnp_random_graph(400, 0.15, seed=1),
      "powerlaw_cluster(5000,8,0.5)": lambda: nx.powerlaw_cluster_graph(5000, 8, 0.5, seed=1),
      "barabasi_albert(20000,5)": lambda: nx.barabasi_albert_graph(20000, 5, seed=1),
  }
  if quick:
    graphs = {"gnp(300,0.15)": lambda: nx.gnp_random_graph(300, 0.15, seed=1)}
  rows = []
  for name, make in graphs.items():
    g = make()
    t0 = time.perf_counter()
    index = CliqueIndex(g)
    build_s = time.perf_counter() - t0
    baseline = index.copy()
    rng = random.Random(0)
    edges = random_non_edges(g, rng, reps * per_rep)
    recompute, lin, pair = [], [], []
    for r in range(reps):
      recompute.append(timed(lambda: sum(1 for _ in nx.find_cliques(g))))
      gc.collect()  # once per batch: collecting this heap before every insertion takes longer
      gc.disable()  # than the insertion itself
      for u, v in edges[r * per_rep:(r + 1) * per_rep]:
        pair.append(timed(baseline.insert_edge_pairwise, u, v, collect=False))
        lin.append(timed(index.insert_edge, u, v, collect=False))
        g.add_edge(u, v)
      gc.enable()
    final = set(map(frozenset, nx.find_cliques(g)))
    assert set(index.cliques()) == final, "wrong cliques"
    assert set(baseline.cliques()) == final, "pairwise baseline: wrong cliques"
    n_cliques = len(final)
    med_lin, med_pair, med_nx = map(statistics.median, (lin, pair, recompute))
    rows.append({
        "graph": name, "vertices": g.number_of_nodes(), "max_cliques": n_cliques,
        "insertions": len(lin), "build_s": build_s, "networkx_recompute_ms": 1e3 * med_nx,
        "linear_us": 1e6 * med_lin, "pairwise_us": 1e6 * med_pair,
        "speedup_vs_networkx": med_nx / med_lin, "speedup_vs_pairwise": med_pair / med_lin,
    })
    print(f"  {name}: {n_cliques} cliques, networkx {1e3 * med_nx:.1f} ms, linear "
          f"{1e6 * med_lin:.1f} us, pairwise {1e6 * med_pair:.1f} us", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes (~30 s)")
  parser.add_argument("--reps", type=int, default=5, help="repetitions per scaling point")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "cliques.json"))
  args = parser.parse_args()

  print("1. per-insertion time vs k = cliques of the scanned endpoint")
  scale_rows, fits = [], {}
  for family in ("matching", "multipartite"):
    rows, f = scaling(family, args.quick, args.reps)
    scale_rows += rows
    fits.update(f)
  print(format_table(scale_rows, ["family", "k", "clique_size", "linear_us",
                                  "linear_us_per_clique", "pairwise_us", "pairwise/linear"]))
  for family in ("matching", "multipartite"):
    f = {k[len(family) + 1:]: v for k, v in fits.items() if k.startswith(family)}
    print(f"fitted log-log slopes, {family}: linear {f['linear_slope']:.2f} (k in "
          f"{f['linear_k_range']}), pairwise {f['pairwise_slope']:.2f} vs linear "
          f"{f['linear_shared_slope']:.2f} (same k in {f['pairwise_k_range']})")

  print("\n2. speed-up over recomputing with networkx.find_cliques after each insertion")
  speed_rows = speedup(args.quick, reps=3 if args.quick else 7, per_rep=20 if args.quick else 40)
  print(format_table(speed_rows, ["graph", "max_cliques", "networkx_recompute_ms", "linear_us",
                                  "pairwise_us", "speedup_vs_networkx", "speedup_vs_pairwise"]))

  result = {
      "benchmark": "cliques", "quick": args.quick,
      "command": "python benchmarks/cliques.py" + (" --quick" if args.quick else ""),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "python": platform.python_version(), "networkx": nx.__version__,
      "scaling": scale_rows, "slopes": fits, "speedup": speed_rows,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
