"""Greedy graph colouring (largest-degree-first, Welsh & Powell 1967).

The single colouring implementation of growjax: block-coordinate variational inference colours
the dependency graph so that the variables of one colour class are conditionally independent
and can be updated together, and ``CliqueIndex.coloring`` (dynamic maximal cliques, Lawton 2014,
arXiv:1412.4620) colours the graph it maintains through this function.

Welsh & Powell's order uses at most ``max_degree + 1`` colours; the colouring is deterministic
(ties between equal degrees are broken by the vertices' first-seen order).
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Mapping

Vertex = Hashable


def as_adjacency(graph: Any) -> dict[Vertex, set[Vertex]]:
  """Normalises a graph to ``{vertex: set(neighbours)}`` (undirected, symmetrised).

  Args:
    graph: a mapping ``vertex -> iterable of neighbours`` (a networkx graph is one), or an
      iterable of ``(u, v)`` edge pairs.

  Returns:
    A fresh dict of sets; every edge appears in both directions.

  Raises:
    ValueError: on a self-loop or an edge that is not a pair.
  """
  adj: dict[Vertex, set[Vertex]] = {}
  if isinstance(graph, Mapping) or hasattr(graph, "adj"):
    items = graph.adj.items() if hasattr(graph, "adj") else graph.items()
    for v, nbrs in items:
      adj.setdefault(v, set())
      for w in nbrs:
        if w == v:
          raise ValueError(f"self-loop at vertex {v!r}: graphs here are simple; drop the loop.")
        adj[v].add(w)
        adj.setdefault(w, set()).add(v)
    return adj
  for edge in graph:
    try:
      u, v = edge
    except (TypeError, ValueError):
      raise ValueError(f"edge list entries must be (u, v) pairs, got {edge!r}.") from None
    if u == v:
      raise ValueError(f"self-loop at vertex {u!r}: graphs here are simple; drop the loop.")
    adj.setdefault(u, set()).add(v)
    adj.setdefault(v, set()).add(u)
  return adj


def greedy_coloring(adjacency: Mapping[Vertex, Iterable[Vertex]] | Any,
                    order: Iterable[Vertex] | None = None) -> dict[Vertex, int]:
  """Colours vertices greedily, largest degree first.

  Args:
    adjacency: ``vertex -> iterable of neighbours``, a networkx graph, or an edge list of
      ``(u, v)`` pairs (isolated vertices only appear with the first two forms).
    order: optional explicit vertex order (must list every vertex once); default is decreasing
      degree, ties in first-seen order.

  Returns:
    ``{vertex: colour}`` with colours ``0..c-1``; no edge joins two vertices of one colour.

  Raises:
    ValueError: on self-loops, malformed edges, or an ``order`` that is not a permutation of the
      vertices.
  """
  adj = as_adjacency(adjacency)
  if order is None:
    position = {v: i for i, v in enumerate(adj)}
    order = sorted(adj, key=lambda v: (-len(adj[v]), position[v]))
  else:
    order = list(order)
    if len(order) != len(adj) or set(order) != set(adj):
      raise ValueError(f"order must list every one of the {len(adj)} vertices exactly once; "
                       f"got {len(order)} entries.")
  colour: dict[Vertex, int] = {}
  for v in order:
    used = {colour[w] for w in adj[v] if w in colour}
    c = 0
    while c in used:  # smallest colour not used by an already-coloured neighbour
      c += 1
    colour[v] = c
  return colour
