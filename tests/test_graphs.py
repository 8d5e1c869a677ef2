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


# ------------------------------------------------------------------------------ maximal cliques


def _nx_cliques(g):
  return set(map(frozenset, nx.find_cliques(g)))


def _non_edge(g, rng, weights=None):
  nodes = list(g)
  while True:
    if weights is None:
      u, v = rng.sample(nodes, 2)
    else:
      u, v = rng.choices(nodes, weights=[weights(x) for x in nodes], k=2)
    if u != v and not g.has_edge(u, v):
      return u, v


def _replay_insertions(g, index, rng, steps, weights=None, method="insert_edge"):
  """Inserts `steps` random non-edges into both g and index; exact equality after each one."""
  done = 0
  for _ in range(steps):
    if nx.density(g) >= 0.95:
      break
    u, v = _non_edge(g, rng, weights)
    g.add_edge(u, v)
    assert getattr(index, method)(u, v) is True
    assert set(index.cliques()) == _nx_cliques(g), (u, v)
    # METHODS §10 oracle: find_cliques(nodes=[u, v]) lists exactly the cliques with both.
    assert (set(index.cliques_containing(u, v))
            == set(map(frozenset, nx.find_cliques(g, nodes=[u, v]))))
    done += 1
  index.check()
  return done


def test_maximal_cliques_matches_networkx():
  rng = random.Random(0)
  for seed in range(30):
    g = nx.gnp_random_graph(rng.randint(1, 25), rng.random(), seed=seed)
    got = list(graphs.maximal_cliques(g))
    assert len(got) == len(set(got))  # each clique once
    assert set(got) == _nx_cliques(g)
    within = [v for v in g if rng.random() < 0.6]
    assert set(graphs.maximal_cliques(g, within=within)) == _nx_cliques(g.subgraph(within))
  assert list(graphs.maximal_cliques({})) == []
  with pytest.raises(ValueError, match="not in the graph"):
    list(graphs.maximal_cliques({1: [2]}, within=[3]))


def test_build_from_every_input_form():
  g = nx.gnp_random_graph(20, 0.3, seed=3)
  g.add_node(99)  # isolated vertex: clique {99}
  want = _nx_cliques(g)
  mapping = {v: list(g[v]) for v in g}
  for source in (g, mapping):
    assert set(graphs.CliqueIndex(source).cliques()) == want
  from_edges = graphs.CliqueIndex(list(g.edges()), vertices=list(g))
  assert set(from_edges.cliques()) == want
  assert from_edges.num_vertices == 21 and from_edges.num_edges == g.number_of_edges()
  assert graphs.CliqueIndex().num_cliques == 0
  assert graphs.CliqueIndex().clique_number() == 0


def test_counterexample_uv_not_maximal_uvw_is():
  # u-w, v-w, u-a, v-b; inserting uv makes {u, v, w} maximal while {u, v} is not.
  index = graphs.CliqueIndex([("u", "w"), ("v", "w"), ("u", "a"), ("v", "b")])
  for method in ("insert_edge", "insert_edge_pairwise"):
    ci = index.copy()
    assert getattr(ci, method)("u", "v")
    got = set(ci.cliques())
    assert got == {frozenset("uvw"), frozenset("ua"), frozenset("vb")}
    assert frozenset("uv") not in got
    ci.check()
  assert set(index.cliques()) == {frozenset("uw"), frozenset("vw"), frozenset("ua"),
                                  frozenset("vb")}  # copy() left the original alone


def test_insertions_gnp_exact():
  # 4000 insertions (with the power-law and planted tests: >= 10,000 in total).
  rng, done = random.Random(1), 0
  while done < 4000:
    g = nx.gnp_random_graph(rng.randint(8, 22), rng.uniform(0.05, 0.5), seed=rng.randrange(1 << 30))
    done += _replay_insertions(g, graphs.CliqueIndex(g), rng, steps=60)


def test_insertions_power_law_exact():
  # Preferential insertions (endpoints drawn ~ degree + 1) keep the degree tail heavy.
  rng, done = random.Random(2), 0
  while done < 3500:
    n, m = rng.randint(15, 30), rng.randint(1, 3)
    g = nx.barabasi_albert_graph(n, m, seed=rng.randrange(1 << 30))
    done += _replay_insertions(g, graphs.CliqueIndex(g), rng, steps=50,
                               weights=lambda x, g=g: g.degree(x) + 1)


def test_insertions_planted_clique_exact():
  # G(n, p) with a planted clique missing some of its edges; the stream completes it.
  rng, done = random.Random(3), 0
  while done < 3500:
    n, size = rng.randint(14, 26), rng.randint(5, 9)
    g = nx.gnp_random_graph(n, rng.uniform(0.1, 0.35), seed=rng.randrange(1 << 30))
    members = rng.sample(range(n), size)
    pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
    missing = [(a, b) for a, b in pairs if rng.random() < 0.4 and not g.has_edge(a, b)]
    g.add_edges_from(e for e in pairs if e not in missing)
    index = graphs.CliqueIndex(g)
    for a, b in missing:
      g.add_edge(a, b)
      assert index.insert_edge(a, b)
      assert set(index.cliques()) == _nx_cliques(g)
      done += 1
    assert index.clique_number() == max(map(len, _nx_cliques(g))) >= size
    assert any(set(members) <= c for c in index.cliques())  # the completed planted clique
    done += _replay_insertions(g, index, rng, steps=30)


def test_pairwise_baseline_agrees():
  rng, done = random.Random(4), 0
  while done < 1500:
    g = nx.gnp_random_graph(rng.randint(8, 20), rng.uniform(0.1, 0.5), seed=rng.randrange(1 << 30))
    done += _replay_insertions(g, graphs.CliqueIndex(g), rng, steps=40,
                               method="insert_edge_pairwise")


def test_mixed_insert_delete_and_vertex_updates_exact():
  rng = random.Random(5)
  ops = {"insert": 0, "delete": 0, "add_vertex": 0, "remove_vertex": 0}
  for trial in range(40):
    g = nx.gnp_random_graph(rng.randint(2, 16), rng.uniform(0.1, 0.6), seed=trial)
    index = graphs.CliqueIndex(g, vertices=list(g))
    next_label = len(g)
    for _ in range(60):
      r = rng.random()
      if r < 0.4 and nx.density(g) < 0.95 and len(g) >= 2:
        u, v = _non_edge(g, rng)
        g.add_edge(u, v)
        assert index.insert_edge(u, v)
        ops["insert"] += 1
      elif r < 0.75 and g.number_of_edges():
        u, v = rng.choice(list(g.edges()))
        g.remove_edge(u, v)
        assert index.delete_edge(u, v)
        ops["delete"] += 1
      elif r < 0.9 or len(g) < 2:
        nbrs = [w for w in g if rng.random() < 0.4]
        g.add_node(next_label)
        g.add_edges_from((next_label, w) for w in nbrs)
        index.add_vertex(next_label, nbrs)
        next_label += 1
        ops["add_vertex"] += 1
      else:
        x = rng.choice(list(g))
        g.remove_node(x)
        index.remove_vertex(x)
        ops["remove_vertex"] += 1
      assert set(index.cliques()) == _nx_cliques(g)
      index.check(recompute=False)
    index.check()
    assert index.num_edges == g.number_of_edges() and set(index.vertices()) == set(g)
  assert min(ops.values()) >= 200, ops


def test_queries_against_networkx():
  g = nx.powerlaw_cluster_graph(60, 3, 0.6, seed=7)
  index = graphs.CliqueIndex(g)
  cliques = _nx_cliques(g)
  for v in g:
    assert set(index.cliques_of(v)) == {c for c in cliques if v in c}
    assert index.num_cliques_of(v) == len(index.cliques_of(v))
    assert index.neighbors(v) == frozenset(g[v]) and index.degree(v) == g.degree(v)
  assert index.clique_number() == max(map(len, cliques)) == len(index.maximum_clique())
  assert index.num_cliques == len(cliques)
  assert nx.utils.graphs_equal(index.to_networkx(), g)
  assert set(map(frozenset, index.edges())) == set(map(frozenset, g.edges()))
  assert "maximal cliques" in repr(index)


def test_clique_index_coloring():
  for seed in range(5):
    g = nx.gnp_random_graph(30, 0.3, seed=seed)
    index = graphs.CliqueIndex(g)
    colour = index.coloring()
    _assert_proper({v: set(g[v]) for v in g}, colour)
    omega = index.clique_number()
    assert omega <= len(set(colour.values())) <= max(d for _, d in g.degree()) + 1
    assert sorted(colour[v] for v in index.maximum_clique()) == list(range(omega))


def _snapshot(index):
  return (index.adjacency(), set(index.cliques()), {v: set(index.cliques_of(v))
                                                    for v in index.vertices()})


def test_bad_input_errors_and_no_ops_leave_structure_intact():
  index = graphs.CliqueIndex([(1, 2), (2, 3), (1, 3), (3, 4)])
  before = _snapshot(index)
  with pytest.raises(ValueError, match="self-loop"):
    index.insert_edge(1, 1)
  with pytest.raises(ValueError, match="self-loop"):
    index.delete_edge(2, 2)
  with pytest.raises(graphs.UnknownVertexError, match="not in the graph.*add_vertex"):
    index.insert_edge(1, 99)
  with pytest.raises(KeyError):  # UnknownVertexError is a KeyError
    index.delete_edge(99, 1)
  with pytest.raises(graphs.UnknownVertexError):
    index.remove_vertex(99)
  with pytest.raises(graphs.UnknownVertexError):
    index.cliques_of(99)
  with pytest.raises(graphs.UnknownVertexError):
    index.add_vertex(5, [1, 99])  # unknown neighbour: nothing added, not even vertex 5
  with pytest.raises(ValueError, match="already exists"):
    index.add_vertex(1)
  with pytest.raises(ValueError, match="self-loop"):
    index.add_vertex(6, [6])
  with pytest.raises(TypeError):
    index.add_vertex([7])  # unhashable
  with pytest.raises(ValueError, match="self-loop"):
    graphs.CliqueIndex([(1, 1)])
  assert index.insert_edge(1, 2) is False  # existing edge: documented no-op
  assert index.insert_edge_pairwise(2, 1) is False
  assert index.delete_edge(1, 4) is False  # absent edge: documented no-op
  assert _snapshot(index) == before
  assert 5 not in index and 6 not in index
  index.check()


def test_check_detects_corruption():
  index = graphs.CliqueIndex([(1, 2), (2, 3), (1, 3), (3, 4)])
  index.check()
  broken = index.copy()
  broken._adj[1].discard(2)  # asymmetric adjacency
  with pytest.raises(graphs.CliqueInvariantError, match="asymmetric"):
    broken.check()
  broken = index.copy()
  broken._adj[1].discard(2)
  broken._adj[2].discard(1)  # cliques no longer match the graph
  with pytest.raises(graphs.CliqueInvariantError, match="not a clique"):
    broken.check()
  broken = index.copy()
  broken._add(frozenset((3,)))  # a non-maximal clique
  with pytest.raises(graphs.CliqueInvariantError, match="not maximal"):
    broken.check()
  broken = index.copy()
  broken._of[4].clear()  # index lost an entry
  with pytest.raises(graphs.CliqueInvariantError, match="index of 4"):
    broken.check(recompute=False)
