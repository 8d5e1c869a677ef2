"""Variational inference: Gaussian DEFs with CAVI / block / forest-mixture updates.

Lawton, Ver Steeg & Galstyan (UAI 2018), arXiv:1805.06951.
"""

from growjax.vi.deep_exponential import (
    CRITERIA, METHODS, MIXTURES, DEFSolver, DEFState, ExactPosterior, GaussianDEF, SolveInfo,
    SparseLayout,
    block_cavi, color_blocks, dense_weight, elbo, exact_posterior, fm_bound, fm_curvature,
    forest_like_model,
    forest_likeness, forest_mixture, gaussian_def, make_solver, mean_gradient, mixture_weights,
    parallel_cavi, precision_diag, residuals, sequential_cavi, solve, state_elbo, to_dense,
    to_sparse)

__all__ = [
    "CRITERIA", "METHODS", "MIXTURES", "DEFSolver", "DEFState", "ExactPosterior", "GaussianDEF",
    "SolveInfo", "SparseLayout", "block_cavi", "color_blocks", "dense_weight", "elbo", "exact_posterior",
    "fm_bound", "fm_curvature", "forest_like_model", "forest_likeness", "forest_mixture", "gaussian_def",
    "make_solver", "mean_gradient", "mixture_weights", "parallel_cavi", "precision_diag",
    "residuals", "sequential_cavi", "solve", "state_elbo", "to_dense", "to_sparse",
]
