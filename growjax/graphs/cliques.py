"""Dynamic maximal cliques: a clique index updated in time linear in an endpoint's cliques.

Implements Lawton 2014, "Updating maximal cliques after an edge insertion" (arXiv:1412.4620),
as specified in METHODS.md §10, with the pairwise-filtering update of Stix 2004 ("Finding all
maximal cliques in dynamic graphs", Comput. Optim. Appl. 27:173-186) as the baseline, and the
Bron-Kerbosch algorithm with Tomita pivoting (Tomita, Tanaka, Takahashi 2006, Theor. Comput.
Sci. 363:28-42) to build the index from scratch.

Inserting the edge uv into G gives G' = G + uv. A maximal clique of G' either
  * avoids u or v: it is a maximal clique of G, unless G' extends it by the new edge, i.e. it
    contains u and lies in N'[v] (or the other way round); or
  * contains both: it is {u, v} ∪ M for M a maximal clique of G'[N(u) ∩ N(v)].
Every such M is (C ∩ N'[v]) \\ {u} for some maximal clique C of G containing u, so the candidates
K = (C ∩ N'[v]) ∪ {v}, deduplicated with a hash set, contain every new clique. Each candidate's
maximality is decided on its own (K is maximal iff no common neighbour of u and v outside K is
adjacent to all of K \\ {u, v}), so the work is linear in the number of cliques of u, where
Stix's update compares candidates pairwise (quadratic). The old cliques that disappear are
exactly K \\ {v} (when C ⊆ N'[v], C is replaced by C ∪ {v}) and K \\ {u} (a clique of v inside
N'[u]); both are found by one hash lookup per new clique, so the cliques of v (the endpoint with
more cliques) are never scanned.

Representation (host-side Python, chosen so that memory stays linear in the graph plus the
cliques, whatever the vertex count): adjacency ``{vertex: set}``, each clique a ``frozenset`` of
vertices under a stable integer id, a ``frozenset -> id`` table for the hash lookups, and the
vertex -> clique-id index. Ids stay stable when a clique grows by one vertex, so replacing C by
C ∪ {v} touches only v's entry of the index.
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, Hashable, Iterable, Iterator, Mapping

from growjax.graphs.coloring import as_adjacency, greedy_coloring

Vertex = Hashable

# Up to this many common neighbours of the endpoints, insert_edge first selects the cliques of u
# that meet them (measured crossover on G(n, p) and power-law graphs: ~8-12).
_FEW_COMMON = 8


class UnknownVertexError(KeyError):
  """A vertex that is not in the graph was named (a KeyError with a readable message)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else "unknown vertex"


class CliqueInvariantError(AssertionError):
  """``CliqueIndex.check`` found the index inconsistent with its graph."""


def maximal_cliques(graph: Any, within: Iterable[Vertex] | None = None) -> Iterator[frozenset]:
  """Enumerates maximal cliques by Bron-Kerbosch with Tomita pivoting (iterative).

  Args:
    graph: ``{vertex: iterable of neighbours}``, a networkx graph or an edge list (normalised
      and symmetrised by ``as_adjacency``).
    within: if given, enumerate the maximal cliques of the subgraph induced on these vertices.

  Returns:
    An iterator over the maximal cliques, each once, as frozensets (an isolated vertex is a
    clique of size one).

  Raises:
    ValueError: on self-loops, malformed edges, or ``within`` naming unknown vertices.
  """
  adj = as_adjacency(graph)
  if within is not None:
    within = set(within)
    unknown = within - adj.keys()
    if unknown:
      raise ValueError(f"`within` names vertices not in the graph: {sorted(map(repr, unknown))}")
  return _tomita(adj, set(adj) if within is None else within)


def _tomita(adj: Mapping[Vertex, set], cand: set) -> Iterator[frozenset]:
  """Bron-Kerbosch-Tomita over ``cand`` (consumed) on a trusted dict-of-sets adjacency."""
  if not cand:
    return
  # P: vertices that extend the current clique R; X: those already explored (a clique found
  # with them was or will be reported elsewhere). Tomita's pivot w maximises |P ∩ N(w)|, so only
  # P \ N(w) is branched on, which bounds the work by 3^(n/3) (the maximum number of cliques).
  clique: list[Vertex] = []
  p, x = cand, set()
  branch = _pivot_branch(adj, p, x)
  stack: list[tuple[set, set, list]] = []
  while True:
    if branch:
      q = branch.pop()
      nq = adj[q]
      pq, xq = p & nq, x & nq
      p.discard(q)  # q explored at this level: later siblings must not report cliques with q
      x.add(q)
      if not pq:
        if not xq:
          yield frozenset(clique + [q])
        continue  # pq empty, xq not: every extension of R + q was reported already
      stack.append((p, x, branch))
      clique.append(q)
      p, x = pq, xq
      branch = _pivot_branch(adj, p, x)
    elif stack:
      p, x, branch = stack.pop()
      clique.pop()
    else:
      return


def _pivot_branch(adj: Mapping[Vertex, set], p: set, x: set) -> list:
  """Tomita pivot: returns P \\ N(w) for the w in P ∪ X with the most neighbours in P."""
  best, pivot = -1, None
  for w in p:
    k = len(p & adj[w])
    if k > best:
      best, pivot = k, w
  for w in x:
    k = len(p & adj[w])
    if k > best:
      best, pivot = k, w
  return [q for q in p if q not in adj[pivot]]


class CliqueIndex:
  """The maximal cliques of a simple undirected graph, maintained under updates.

  Vertices are any hashables. Build from a mapping ``vertex -> neighbours``, a networkx graph or
  an edge list; then ``insert_edge`` (Lawton's linear-time update), ``insert_edge_pairwise``
  (Stix's quadratic baseline, same result), ``delete_edge``, ``add_vertex``, ``remove_vertex``.
  Queries return frozensets of vertices. ``check()`` verifies every invariant, including equality
  with a fresh Bron-Kerbosch enumeration.

  Bad input never corrupts the index: every argument is validated before anything is changed.
  Self-loops raise ``ValueError``; naming a vertex that is not in the graph raises
  ``UnknownVertexError`` (a ``KeyError``); inserting an edge that exists, or deleting one that
  does not, is a documented no-op that returns ``False`` (so streams with repeats replay
  safely); ``add_vertex`` of an existing vertex raises ``ValueError``.

  This is a mutable host-side object (like a networkx graph), not a pytree: a persistent
  structure would copy O(size) per update and lose the linear-time bound. Use ``copy()`` to
  branch.

  Memory: O(|V| + |E| + sum of clique sizes).
  """

  __slots__ = ("_adj", "_cliques", "_id_of", "_of", "_next_id")

  def __init__(self, graph: Any = None, vertices: Iterable[Vertex] = ()):
    """Builds the index.

    Args:
      graph: ``{vertex: iterable of neighbours}``, a networkx graph, or an edge list of pairs;
        ``None`` for the empty graph.
      vertices: extra (possibly isolated) vertices.

    Raises:
      ValueError: on self-loops or malformed edges.
    """
    adj = as_adjacency(graph if graph is not None else ())
    for v in vertices:
      adj.setdefault(v, set())
    self._adj: dict[Vertex, set] = adj
    self._cliques: dict[int, frozenset] = {}  # id -> clique
    self._id_of: dict[frozenset, int] = {}  # clique -> id
    self._of: dict[Vertex, set[int]] = {v: set() for v in adj}  # vertex -> clique ids
    self._next_id = 0
    for k in _tomita(adj, set(adj)):
      self._add(k)

  # ----------------------------------------------------------------------------- queries

  def vertices(self) -> list[Vertex]:
    """All vertices, in insertion order."""
    return list(self._adj)

  @property
  def num_vertices(self) -> int:
    return len(self._adj)

  @property
  def num_edges(self) -> int:
    return sum(len(s) for s in self._adj.values()) // 2

  @property
  def num_cliques(self) -> int:
    """Number of maximal cliques."""
    return len(self._cliques)

  def __contains__(self, v: Vertex) -> bool:
    return v in self._adj

  def has_edge(self, u: Vertex, v: Vertex) -> bool:
    nu = self._adj.get(u)
    return nu is not None and v in nu

  def neighbors(self, v: Vertex) -> frozenset:
    """Neighbours of ``v`` (open neighbourhood)."""
    return frozenset(self._nbrs(v))

  def degree(self, v: Vertex) -> int:
    return len(self._nbrs(v))

  def adjacency(self) -> dict[Vertex, frozenset]:
    """A snapshot ``{vertex: frozenset(neighbours)}``."""
    return {v: frozenset(s) for v, s in self._adj.items()}

  def edges(self) -> list[tuple[Vertex, Vertex]]:
    """Each edge once, as ``(u, v)`` with u inserted before v."""
    order = {v: i for i, v in enumerate(self._adj)}
    return [(u, w) for u, s in self._adj.items() for w in s if order[u] < order[w]]

  def cliques(self) -> list[frozenset]:
    """All maximal cliques."""
    return list(self._cliques.values())

  def cliques_of(self, v: Vertex) -> list[frozenset]:
    """Maximal cliques containing ``v`` (time proportional to their number)."""
    ids = self._of.get(v)
    if ids is None:
      raise self._unknown(v)
    return [self._cliques[i] for i in ids]

  def num_cliques_of(self, v: Vertex) -> int:
    """Number of maximal cliques containing ``v`` (O(1))."""
    ids = self._of.get(v)
    if ids is None:
      raise self._unknown(v)
    return len(ids)

  def cliques_containing(self, u: Vertex, v: Vertex) -> list[frozenset]:
    """Maximal cliques containing both ``u`` and ``v`` (scans the endpoint with fewer)."""
    a, b = self._of.get(u), self._of.get(v)
    if a is None or b is None:
      raise self._unknown(u if a is None else v)
    if len(a) > len(b):
      u, v, a = v, u, b
    return [self._cliques[i] for i in a if v in self._cliques[i]]

  def maximum_clique(self) -> frozenset:
    """A largest maximal clique (empty frozenset for the empty graph)."""
    return max(self._cliques.values(), key=len, default=frozenset())

  def clique_number(self) -> int:
    """ω(G), the size of a largest clique (0 for the empty graph)."""
    return max(map(len, self._cliques.values()), default=0)

  def coloring(self) -> dict[Vertex, int]:
    """A proper greedy colouring ordered by the clique structure.

    A maximum clique needs ω distinct colours whatever the order, so its vertices are coloured
    first, then the rest by decreasing degree (``greedy_coloring`` does the colouring). The
    number of colours c satisfies ω <= c <= max_degree + 1.

    Returns:
      ``{vertex: colour}`` with colours ``0..c-1``.
    """
    first = list(self.maximum_clique())
    seen = set(first)
    position = {v: i for i, v in enumerate(self._adj)}
    rest = sorted((v for v in self._adj if v not in seen),
                  key=lambda v: (-len(self._adj[v]), position[v]))
    return greedy_coloring(self._adj, order=first + rest)

  def copy(self) -> CliqueIndex:
    """An independent copy (O(size)); clique ids are preserved."""
    new = object.__new__(CliqueIndex)
    new._adj = {v: set(s) for v, s in self._adj.items()}
    new._cliques = dict(self._cliques)
    new._id_of = dict(self._id_of)
    new._of = {v: set(s) for v, s in self._of.items()}
    new._next_id = self._next_id
    return new

  def to_networkx(self):
    """The graph as a ``networkx.Graph`` (networkx is imported here only)."""
    import networkx as nx  # optional dependency: only this conversion needs it
    g = nx.Graph()
    g.add_nodes_from(self._adj)
    g.add_edges_from(self.edges())
    return g

  def check(self, recompute: bool = True) -> None:
    """Verifies the invariants; raises ``CliqueInvariantError`` naming the first violation.

    Checks that adjacency is symmetric without self-loops; that the clique tables and the
    vertex -> clique index agree exactly; that every stored set is a clique of the graph; and,
    with ``recompute``, that the stored cliques equal a fresh Bron-Kerbosch enumeration (so all
    are maximal and none is missing). O(size) without ``recompute``.
    """
    adj = self._adj
    for v, s in adj.items():
      if v in s:
        raise CliqueInvariantError(f"self-loop at {v!r}")
      for w in s:
        if w not in adj or v not in adj[w]:
          raise CliqueInvariantError(f"asymmetric adjacency: {v!r} -> {w!r}")
    if set(self._of) != set(adj):
      raise CliqueInvariantError("vertex -> clique index and adjacency list different vertices")
    if len(self._id_of) != len(self._cliques):
      raise CliqueInvariantError("duplicate clique stored under two ids")
    members = 0
    for i, k in self._cliques.items():
      if self._id_of.get(k) != i:
        raise CliqueInvariantError(f"clique {set(k)!r} (id {i}) missing from the reverse table")
      if not k:
        raise CliqueInvariantError(f"empty clique stored under id {i}")
      for v in k:
        if v not in adj:
          raise CliqueInvariantError(f"clique {set(k)!r} contains unknown vertex {v!r}")
        if i not in self._of[v]:
          raise CliqueInvariantError(f"index of {v!r} misses clique {set(k)!r}")
        if len(k) - 1 > len(adj[v]) or not k - {v} <= adj[v]:
          raise CliqueInvariantError(f"{set(k)!r} is not a clique (at {v!r})")
      members += len(k)
    if members != sum(len(s) for s in self._of.values()):
      raise CliqueInvariantError("vertex -> clique index holds stale clique ids")
    if recompute:
      fresh = set(_tomita(adj, set(adj)))
      stored = set(self._cliques.values())
      if fresh != stored:
        missing, extra = fresh - stored, stored - fresh
        raise CliqueInvariantError(
            f"{len(missing)} maximal cliques missing (e.g. {_peek(missing)}), {len(extra)} "
            f"stored sets not maximal cliques (e.g. {_peek(extra)})")

  # ----------------------------------------------------------------------------- updates

  def insert_edge(self, a: Vertex, b: Vertex) -> bool:
    """Inserts edge ab by Lawton's update, in time linear in the cliques of one endpoint.

    u is the endpoint with fewer cliques. Cost: one intersection per clique of u (O(|C|) each),
    then per distinct candidate K one maximality test (a C-level intersection of |K| neighbour
    sets, the first one the smallest) and O(1) hash lookups; the index is touched only for
    cliques that change. When u and v have no common neighbour nothing is scanned at all.

    Args:
      a, b: existing, distinct vertices.

    Returns:
      True if the edge was inserted; False (and nothing changes) if it already existed.

    Raises:
      ValueError: if ``a == b`` (self-loop).
      UnknownVertexError: if an endpoint is not in the graph (``add_vertex`` it first).
    """
    u, v = self._endpoints(a, b)
    adj, of, cliques, id_of = self._adj, self._of, self._cliques, self._id_of
    nu, nv = adj[u], adj[v]
    if v in nu:
      return False
    if len(of[u]) > len(of[v]):  # generate candidates from the endpoint with fewer cliques
      u, v, nu, nv = v, u, nv, nu
    nu.add(v)
    nv.add(u)
    common = nu & nv  # N(u) ∩ N(v); excludes u and v themselves

    # One candidate C ∩ N[v] (it contains u) per clique C of u, deduplicated by the hash set;
    # built by C-level map/set calls: this pass over the cliques of u is the only part of the
    # update that is linear in their number, the rest is linear in the distinct candidates.
    if not common:
      # Every clique of u gives C ∩ N[v] = {u}: the single candidate {u, v}, no scan needed.
      cands = {frozenset((u,))}
    else:
      ids = of[u]
      if len(common) <= _FEW_COMMON:
        # A clique of u disjoint from N(u) ∩ N(v) gives {u, v}, not maximal as common is not
        # empty, so only cliques meeting common matter; selecting them by intersecting id sets
        # (cheap integer hashing) beats touching every clique when common is small. The cost
        # stays linear in the cliques of u: at most _FEW_COMMON id-set intersections.
        ids = set().union(*[ids & of[w] for w in common])
      cands = set(map(frozenset.intersection, map(cliques.__getitem__, ids), repeat(nv)))
    su, sv, of_u, of_v = frozenset((u,)), frozenset((v,)), of[u], of[v]
    for s in cands:
      i = id_of.get(s)
      if i is None:
        # C ⊄ N[v]: C stays. K is maximal iff no common neighbour of u and v is adjacent to all
        # of K \ {u, v} (core vertices drop out by themselves: no vertex is its own neighbour;
        # intersecting with N(u) too is harmless as common ⊆ N(u)).
        if common if len(s) == 1 else not _no_common_neighbour(adj, s, common):
          continue  # not maximal: its maximal superset comes from another clique of u
        k = s | sv
        j = id_of.get(k - su)  # K \ {u}: a clique of v inside N[u] grows into K (same id)
        if j is None:
          self._add(k)
        else:
          del id_of[cliques[j]]
          cliques[j] = k
          id_of[k] = j
          of_u.add(j)
      else:
        # s == C ⊆ N[v]: C grows into K = C ∪ {v} under the same id (K is maximal: anything
        # extending K would extend C in G) and absorbs K \ {u} if that was a clique of v.
        k = s | sv
        del id_of[s]
        cliques[i] = k
        id_of[k] = i
        of_v.add(i)
        j = id_of.get(k - su)
        if j is not None:
          self._remove(j)
    return True

  def insert_edge_pairwise(self, a: Vertex, b: Vertex) -> bool:
    """Inserts edge ab by Stix's pairwise filtering (quadratic baseline; same result).

    Candidates K = (C ∩ N[v]) ∪ {v} for the cliques C of u are kept if no other candidate
    strictly contains them; old cliques of u or v contained in a kept candidate are removed.
    Both filters compare sets pairwise. Arguments, return value and errors as ``insert_edge``.
    """
    u, v = self._endpoints(a, b)
    adj, of, cliques = self._adj, self._of, self._cliques
    nu, nv = adj[u], adj[v]
    if v in nu:
      return False
    if len(of[u]) > len(of[v]):
      u, v, nu, nv = v, u, nv, nu
    nu.add(v)
    nv.add(u)
    cand = list({(cliques[i] & nv) | {v} for i in of[u]})
    new = [k for k in cand if not any(k < other for other in cand)]
    old = set(of[u]) | set(of[v])
    for i in old:
      c = cliques[i]
      if any(c <= k for k in new):
        self._remove(i)
    for k in new:
      self._add(k)
    return True

  def delete_edge(self, a: Vertex, b: Vertex) -> bool:
    """Deletes edge ab, in time linear in the cliques containing both endpoints.

    Each clique C ∋ u, v splits into C \\ {u} and C \\ {v}; C \\ {u} is maximal unless some
    vertex (necessarily outside C: u is no longer adjacent to v) is adjacent to all of it. The
    cliques with both endpoints are found by one C-level intersection of the two id sets.

    Returns:
      True if the edge was deleted; False (nothing changes) if it did not exist.

    Raises:
      ValueError: on a self-loop. UnknownVertexError: if an endpoint is not in the graph.
    """
    u, v = self._endpoints(a, b)
    adj, of, cliques, id_of = self._adj, self._of, self._cliques, self._id_of
    if v not in adj[u]:
      return False
    both = of[u] & of[v]
    adj[u].discard(v)
    adj[v].discard(u)
    for i in both:
      c = cliques[i]
      parts = [(drop, c - {drop}) for drop in (u, v)]
      parts = [(drop, part) for drop, part in parts if _no_common_neighbour(adj, part)]
      if not parts:
        self._remove(i)
        continue
      drop, part = parts[0]  # C shrinks in place to its first maximal part (same id)
      del id_of[c]
      cliques[i] = part
      id_of[part] = i
      of[drop].discard(i)
      for _, part in parts[1:]:
        self._add(part)
    return True

  def add_vertex(self, v: Vertex, neighbors: Iterable[Vertex] = ()) -> None:
    """Adds vertex ``v`` joined to ``neighbors`` (all existing vertices).

    The new cliques are {v} ∪ M for the maximal cliques M of the subgraph induced on the
    neighbours (Bron-Kerbosch restricted to them); an old clique inside the neighbourhood is
    such an M and grows into {v} ∪ M; no other clique changes.

    Raises:
      ValueError: if ``v`` already exists or is among its own neighbours.
      UnknownVertexError: if a neighbour is not in the graph.
      TypeError: if ``v`` is not hashable.
    """
    hash(v)
    if v in self._adj:
      raise ValueError(f"vertex {v!r} already exists; use insert_edge to connect it.")
    nbrs = set(neighbors)
    if v in nbrs:
      raise ValueError(f"vertex {v!r} lists itself as a neighbour (self-loop); drop it.")
    for w in nbrs:
      if w not in self._adj:
        raise self._unknown(w)
    found = list(_tomita(self._adj, set(nbrs)))  # before v joins the graph
    self._adj[v] = nbrs
    self._of[v] = set()
    for w in nbrs:
      self._adj[w].add(v)
    if not nbrs:
      self._add(frozenset((v,)))
    for m in found:
      j = self._id_of.get(m)
      if j is None:
        self._add(m | {v})
      else:
        self._grow(j, v, m | {v})

  def remove_vertex(self, v: Vertex) -> None:
    """Removes vertex ``v`` and its edges, in time linear in the cliques of ``v``.

    Each clique C ∋ v shrinks to C \\ {v}, kept if no vertex outside C is adjacent to all of it.

    Raises:
      UnknownVertexError: if ``v`` is not in the graph.
    """
    if v not in self._adj:
      raise self._unknown(v)
    adj, cliques = self._adj, self._cliques
    ids = list(self._of[v])
    for w in adj[v]:
      adj[w].discard(v)
    del adj[v]
    for i in ids:
      c = cliques[i]
      part = c - {v}
      if part and _no_common_neighbour(adj, part):
        del self._id_of[c]  # C shrinks in place (same id); v's index entry goes below
        cliques[i] = part
        self._id_of[part] = i
      else:
        self._remove(i)
    del self._of[v]

  # ----------------------------------------------------------------------------- internals

  def _add(self, k: frozenset) -> None:
    i = self._next_id
    self._next_id += 1
    self._cliques[i] = k
    self._id_of[k] = i
    of = self._of
    for w in k:
      of[w].add(i)

  def _grow(self, i: int, w: Vertex, k: frozenset) -> None:
    """Replaces clique ``i`` by ``k`` = clique ∪ {w} in O(|k|) hashing, O(1) index updates."""
    cliques, id_of = self._cliques, self._id_of
    del id_of[cliques[i]]
    cliques[i] = k
    id_of[k] = i
    self._of[w].add(i)

  def _remove(self, i: int) -> None:
    k = self._cliques.pop(i)
    del self._id_of[k]
    of = self._of
    for w in k:
      of[w].discard(i)

  def _nbrs(self, v: Vertex) -> set:
    s = self._adj.get(v)
    if s is None:
      raise self._unknown(v)
    return s

  def _endpoints(self, a: Vertex, b: Vertex) -> tuple[Vertex, Vertex]:
    if a == b:
      raise ValueError(f"edge ({a!r}, {b!r}) is a self-loop; the clique index holds simple "
                       "graphs only.")
    for x in (a, b):
      if x not in self._adj:
        raise self._unknown(x)
    return a, b

  def _unknown(self, v: Vertex) -> UnknownVertexError:
    return UnknownVertexError(f"vertex {v!r} is not in the graph ({len(self._adj)} vertices); "
                              "add it with add_vertex first.")

  def __repr__(self) -> str:
    return (f"CliqueIndex({self.num_vertices} vertices, {self.num_edges} edges, "
            f"{self.num_cliques} maximal cliques)")


def _no_common_neighbour(adj: Mapping[Vertex, set], members: Iterable[Vertex],
                         pool: set | None = None) -> bool:
  """True iff no vertex (of ``pool``, if given) is adjacent to every vertex of ``members``.

  For a clique this is maximality (members drop out of the intersection by themselves: no vertex
  is its own neighbour). Starting from the smallest neighbourhood bounds the cost by the smallest
  degree among ``members`` (or ``len(pool)``) times the number of members, never by graph size.
  """
  nbrs = list(map(adj.__getitem__, members))
  first = min(nbrs, key=len)
  # One C-level call: set.intersection folds left, each step iterating the smaller operand, so
  # once the running intersection is empty the remaining steps are O(1).
  if pool is None:
    return not first.intersection(*nbrs)
  return not pool.intersection(first, *nbrs)


def _peek(s: set) -> str:
  return repr(set(next(iter(s)))) if s else "none"
