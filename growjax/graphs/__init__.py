"""Graph algorithms: greedy colouring and dynamic maximal cliques (Lawton 2014, arXiv:1412.4620)."""

from growjax.graphs.coloring import as_adjacency, greedy_coloring

__all__ = ["as_adjacency", "greedy_coloring"]
