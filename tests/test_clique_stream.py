"""Runs experiments/clique_stream.py on its quick config and checks its outputs."""

import os

import networkx as nx
import numpy as np
import pytest

from experiments import clique_stream
from experiments.configs.clique_stream import get_config
from growjax.train.metrics import read_jsonl


def test_conflict_edges_match_brute_force():
  rng = np.random.default_rng(0)
  start = rng.uniform(0, 100, size=40)
  end = start + rng.uniform(1, 20, size=40)
  want = {frozenset((i, j)) for i in range(40) for j in range(i)
          if start[i] < end[j] and start[j] < end[i]}
  assert set(map(frozenset, clique_stream.conflict_edges(start, end))) == want


def test_quick_run_outputs(tmp_path):
  config = get_config("quick")
  summary = clique_stream.run(config, str(tmp_path))
  records = read_jsonl(tmp_path / "metrics.jsonl")
  checkpoints = [r for r in records if not r.get("summary")]
  assert len(checkpoints) == config.checkpoints + 1 and records[-1]["summary"]
  assert summary["inserts"] > 0 and summary["deletes"] > 0  # both kinds of update were replayed
  updates = read_jsonl(tmp_path / "updates.jsonl")
  assert len(updates) == summary["inserts"] + summary["deletes"]
  assert os.path.getsize(summary["plot"]) > 10_000
  # Independent oracle: replay the same schedule and delays with numpy + networkx.
  rng = np.random.default_rng(config.seed)
  start, end = clique_stream.make_schedule(config, rng)
  for _ in range(config.num_delays):
    f = int(rng.integers(config.num_flights))
    delay = float(rng.exponential(config.mean_delay_min))
    if rng.random() < config.shift_fraction:
      start[f] += delay
    end[f] += delay
  g = nx.Graph()
  g.add_nodes_from(range(config.num_flights))
  g.add_edges_from(clique_stream.conflict_edges(start, end))
  assert summary["edges_final"] == g.number_of_edges()
  cliques = list(nx.find_cliques(g))
  assert summary["max_cliques_final"] == len(cliques)
  assert summary["gates_needed_final"] == max(map(len, cliques))
  # Interval graphs are perfect: the gates needed equal the maximum number of flights on the
  # ground at one instant (max overlap at an interval start).
  assert summary["gates_needed_final"] == max(int(np.sum((start <= s) & (s < end))) for s in start)
  assert summary["colours_final"] >= summary["gates_needed_final"]


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown config variant"):
    get_config("huge")
