"""An optax transform that preconditions gradients by the damped Gauss-Newton matrix.

``gauss_newton(loss)`` turns gradients ``g`` into ``d = (G + λI)⁻¹ g`` with ``G = Jᵀ H_z J / n``
evaluated on the current batch (CG on matrix-free products, warm-started from the previous
direction), so ``optax.chain(gauss_newton(loss), optax.scale(-lr))`` is a truncated-Newton /
Hessian-free optimizer (Martens 2010). The batch enters through optax's extra arguments:
``update(grads, state, params, model_fn=..., targets=...)`` with ``model_fn(params) -> z``;
``growjax.train.make_train_step`` passes them for every optimizer (plain transforms ignore them).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from growjax.curvature.gn import cg_solve, gn_matvec, linearize, tree_zeros_like
from growjax.curvature.losses import Loss, get_loss


class GaussNewtonState(NamedTuple):
  direction: Any  # the last solution, used to warm-start CG


def gauss_newton(loss: str | Loss, damping: float = 1e-3, cg_iters: int = 10,
                 tol: float = 1e-4) -> optax.GradientTransformationExtraArgs:
  """Damped-GN preconditioner (see module docstring).

  Args:
    loss: the training loss (its output-space Hessian defines ``G``).
    damping: λ added to ``G``.
    cg_iters: CG iterations per step.
    tol: relative residual at which CG stops early.
  """
  loss = get_loss(loss)
  if damping <= 0:
    raise ValueError(f"gauss_newton: damping must be positive (G is only PSD), got {damping}.")

  def init(params):
    return GaussNewtonState(tree_zeros_like(params))

  def update(updates, state, params=None, *, model_fn: Callable | None = None, targets=None,
             **unused):
    del unused
    if params is None or model_fn is None or targets is None:
      raise ValueError("gauss_newton needs params, model_fn and targets: call update(grads, "
                       "state, params, model_fn=lambda p: apply(p, x), targets=y).")
    lin = linearize(model_fn, params)
    res = cg_solve(lambda v: gn_matvec(lin, loss, targets, v), updates, x0=state.direction,
                   damping=damping, maxiter=cg_iters, tol=tol)
    return res.x, GaussNewtonState(res.x)

  return optax.GradientTransformationExtraArgs(init, update)
