"""Curvature: output-space loss Hessians, Gauss-Newton products, damped CG, K-FAC, diagonal GN."""

from growjax.curvature.losses import (LOSSES, Loss, get_loss, sigmoid_cross_entropy,
                                      softmax_cross_entropy, squared_error)

__all__ = ["LOSSES", "Loss", "get_loss", "sigmoid_cross_entropy", "softmax_cross_entropy",
           "squared_error"]
