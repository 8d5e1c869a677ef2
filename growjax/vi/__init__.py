"""Variational inference: mean-field Gaussian VI over parameter trees; Gaussian deep exponential
families with sequential / parallel / block CAVI and the forest mixture bound.

Lawton, Ver Steeg & Galstyan (UAI 2018), "Parallel inference for deep exponential families via
the forest mixture bound", arXiv:1805.06951; Blundell et al. (2015), arXiv:1505.05424.
"""

from growjax.vi.calibration import ReliabilityBins, expected_calibration_error, reliability_bins
from growjax.vi.deep_exponential import (
    CRITERIA, METHODS, MIXTURES, CGMemory, DEFPrepared, DEFSolver, DEFState, ExactPosterior,
    GaussianDEF, SolveInfo, SparseLayout, block_cavi, color_blocks, degree_buckets, dense_weight,
    elbo, exact_posterior, fm_bound, fm_curvature, forest_like_model, forest_likeness,
    forest_mixture, gaussian_def, make_solver, mean_gradient, mixture_weights, parallel_cavi,
    precision_diag, residuals, sequential_cavi, solve, state_elbo, to_dense, to_sparse,
    transposed_degree_buckets)
from growjax.vi.meanfield import (
    MeanFieldInfo, MeanFieldState, MeanFieldVI, gaussian_kl, meanfield_vi, sample_params, std)

__all__ = [
    # Mean-field VI over parameter trees.
    "MeanFieldInfo", "MeanFieldState", "MeanFieldVI", "gaussian_kl", "meanfield_vi",
    "sample_params", "std",
    # Calibration.
    "ReliabilityBins", "expected_calibration_error", "reliability_bins",
    # Gaussian deep exponential families.
    "CRITERIA", "METHODS", "MIXTURES", "CGMemory", "DEFPrepared", "DEFSolver", "DEFState",
    "ExactPosterior", "GaussianDEF",
    "SolveInfo", "SparseLayout", "block_cavi", "color_blocks", "degree_buckets", "dense_weight",
    "elbo",
    "exact_posterior", "fm_bound", "fm_curvature", "forest_like_model", "forest_likeness",
    "forest_mixture", "gaussian_def", "make_solver", "mean_gradient", "mixture_weights",
    "parallel_cavi", "precision_diag", "residuals", "sequential_cavi", "solve", "state_elbo",
    "to_dense", "to_sparse", "transposed_degree_buckets",
]
