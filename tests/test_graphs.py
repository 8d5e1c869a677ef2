"""Tests for growjax.graphs: greedy colouring and dynamic maximal cliques."""

import random

import networkx as nx
import pytest

from growjax import graphs


def _assert_proper(adj, colour):
  assert set(colour) == set(adj)
  for v, nbrs in adj.items():
    for w in nbrs:
      assert colour[v] != colour[w], (v, w)
  assert set(colour.values()) == set(range(max(colour.values()) + 1))


@pytest.mark.parametrize("seed", range(5))
def test_greedy_coloring_is_proper_on_random_graphs(seed):
  g = nx.gnp_random_graph(40, 0.2, seed=seed)
  colour = graphs.greedy_coloring(g)
  _assert_proper({v: set(g[v]) for v in g}, colour)
  max_deg = max(d for _, d in g.degree())
  assert max(colour.values()) <= max_deg  # Welsh-Powell bound: <= max_degree + 1 colours


def test_greedy_coloring_input_forms_agree():
  g = nx.petersen_graph()
  mapping = {v: list(g[v]) for v in g}
  edges = list(g.edges())
  assert graphs.greedy_coloring(mapping) == graphs.greedy_coloring(g)
  _assert_proper(mapping, graphs.greedy_coloring(edges))


def test_greedy_coloring_complete_and_bipartite():
  k = nx.complete_graph(6)
  assert sorted(graphs.greedy_coloring(k).values()) == list(range(6))
  b = nx.complete_bipartite_graph(3, 4)
  assert len(set(graphs.greedy_coloring(b).values())) == 2
  assert graphs.greedy_coloring({"a": []}) == {"a": 0}


def test_greedy_coloring_bad_input():
  with pytest.raises(ValueError, match="self-loop"):
    graphs.greedy_coloring([(1, 1)])
  with pytest.raises(ValueError, match="pairs"):
    graphs.greedy_coloring([(1, 2, 3)])
  with pytest.raises(ValueError, match="exactly once"):
    graphs.greedy_coloring({1: [2], 2: [1]}, order=[1])
