"""Curvature: output-space loss Hessians, Gauss-Newton products, damped CG, K-FAC, diagonal GN."""

from growjax.curvature.gn import (CGResult, KFACFactors, Linearized, cg_solve, diag_gn, gn_matvec,
                                  gradient, kfac_solve, linearize, tree_vdot)
from growjax.curvature.losses import (LOSSES, Loss, get_loss, sigmoid_cross_entropy,
                                      softmax_cross_entropy, squared_error)
from growjax.curvature.optim import GaussNewtonState, gauss_newton

__all__ = ["CGResult", "GaussNewtonState", "KFACFactors", "LOSSES", "Linearized", "Loss",
           "cg_solve", "diag_gn", "gauss_newton", "get_loss", "gn_matvec", "gradient",
           "kfac_solve", "linearize", "sigmoid_cross_entropy", "softmax_cross_entropy",
           "squared_error", "tree_vdot"]
