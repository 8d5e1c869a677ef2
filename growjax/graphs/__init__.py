"""Graph algorithms: dynamic maximal cliques (Lawton 2014, arXiv:1412.4620) and greedy colouring.

``CliqueIndex`` maintains the maximal cliques of a graph under edge/vertex insertion and deletion
(``insert_edge`` is the linear-time update; ``insert_edge_pairwise`` the quadratic Stix 2004
baseline); ``maximal_cliques`` is Bron-Kerbosch with Tomita pivoting; ``greedy_coloring`` is the
one colouring routine (also behind ``CliqueIndex.coloring``).
"""

from growjax.graphs.cliques import (CliqueIndex, CliqueInvariantError, UnknownVertexError,
                                    maximal_cliques)
from growjax.graphs.coloring import as_adjacency, greedy_coloring

__all__ = [
    "CliqueIndex",
    "CliqueInvariantError",
    "UnknownVertexError",
    "as_adjacency",
    "greedy_coloring",
    "maximal_cliques",
]
