"""Candidate morphisms learned and scored on cached statistics: Gauss-Newton and baselines.

A candidate adds ``k`` units at a site with fan-in ``Ψ`` (the new slices of the site's IN
leaves) and fan-out ``Ω`` (the new slice of its OUT kernel); it changes the consumer
pre-activation by ``δ = fan_out(Ω, fan_in(Ψ, h))``. Methods (all fed by one ``Stats`` pass):

* ``gn`` — Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855): minimise the damped GN model
  ``Q(φ) = E[g_zᵀ Jδ] + ½ E[(Jδ)ᵀ H_z (Jδ)] + (λ/2)‖φ‖²``: for fixed ``Ψ`` the problem in ``Ω``
  is damped least squares (CG on matrix-free GN products, or the K-FAC closed form); ``Ψ`` takes
  Adam steps on the reduced objective ``Q(Ψ, Ω*(Ψ))`` (envelope theorem: ``Ω*`` is held fixed
  in the gradient). Score: the predicted decrease ``−(Q* − L0)`` without the damping term.
* ``tiny`` — TINY-style first-order least squares (Verbockhaven et al. 2024): the same model with
  ``JᵀH_zJ`` replaced by the identity in ``u``-space and the activation linearised, solved by
  alternating least squares (each half by CG).
* ``gradmax`` — GradMax (Evci et al. 2022): ``Ψ = 0`` and ``Ω`` the top-k right singular vectors
  of the map from one unit's fan-out to the gradient of its fan-in; scored by the gradient norm.
* ``random`` — the model's initialiser for ``Ψ``, ``Ω = 0``.
* ``firefly`` — Firefly-style (Wu et al. 2020): a few real Adam steps on the candidate from a
  small random initialisation.
* ``oracle`` — the candidate trained on the real loss (Adam, many steps, best of several
  learning rates), for measuring how close the GN model gets.

Everything here is a pure function of arrays and static configuration; ``growjax.grow.search``
jits it per (model, site, k).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from growjax import tree
from growjax.curvature.gn import (KFACFactors, _hessian_sqrt, cg_solve, kfac_solve, tree_vdot,
                                  tree_zeros_like)
from growjax.curvature.losses import Loss
from growjax.grow.stats import SiteStats, perturbed_apply
from growjax.nets.sites import Site

Array = jax.Array
PyTree = Any

METHODS = ("gn", "tiny", "gradmax", "random", "firefly", "oracle")


class LearnConfig(NamedTuple):
  """Hyper-parameters of candidate learning (static under jit).

  Attributes:
    damping: λ of the damped GN model (trust region; adapted by the search).
    cg_iters: CG iterations of the final fan-out solve.
    cg_inner: CG iterations per fan-in step (warm-started).
    psi_steps: Adam steps on the fan-in (reduced objective).
    psi_lr: their learning rate.
    fan_out_solver: ``"cg"`` (exact GN) or ``"kfac"`` (closed form of the Kronecker model).
    psi_init: ``"random"`` or ``"tiny"`` (start the fan-in from the TINY solution).
    tiny_iters: alternating least-squares iterations of the TINY baseline.
    gradmax_scale: Frobenius norm of each GradMax fan-out column.
    firefly_steps: real Adam steps of the Firefly baseline.
    firefly_lr: their learning rate.
    firefly_init_scale: scale of Firefly's random initial fan-out.
    oracle_steps: Adam steps of the oracle.
    oracle_lrs: learning rates tried by the oracle (best kept).
  """
  damping: float = 2e-3
  cg_iters: int = 30
  cg_inner: int = 5
  psi_steps: int = 20
  psi_lr: float = 3e-2
  fan_out_solver: str = "cg"
  psi_init: str = "random"
  tiny_iters: int = 8
  gradmax_scale: float = 1e-2
  firefly_steps: int = 10
  firefly_lr: float = 1e-2
  firefly_init_scale: float = 1e-2
  oracle_steps: int = 300
  oracle_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)


# ---- the pieces of a candidate ------------------------------------------------------------------
#
# Candidates of several sizes k are learned in one compiled call: templates hold k_max units and
# a 0/1 ``units`` mask [k_max] switches units off. A masked unit's activation is zero, so it
# neither changes δ nor receives gradient, and its fan-in is excluded from the damping term:
# learning with a mask of k ones is exactly learning k units.

def calibrated(site: Site, psi: Mapping[str, Array], h: Array) -> dict:
  """``psi`` with data-dependent per-unit statistics (BatchNorm) set from ``h``."""
  return dict(site.calibrate(psi, h)) if site.calibrate is not None else dict(psi)


def _unit_broadcast(mask: Array, ndim: int, axis: int) -> Array:
  shape = [1] * ndim
  shape[axis] = mask.shape[0]
  return mask.reshape(shape)


def activations(site: Site, psi, h, linear: bool = False, units: Array | None = None) -> Array:
  """New-unit activations ``a`` (BatchNorm calibrated on ``h``), masked by ``units``."""
  a = site.fan_in(psi, h, linear=True) if linear else site.fan_in(calibrated(site, psi, h), h)
  if units is not None:
    a = a * _unit_broadcast(units.astype(a.dtype), a.ndim, a.ndim + site.a_axis)
  return a


def candidate_delta(site: Site, psi, omega, h, linear: bool = False,
                    units: Array | None = None) -> Array:
  """``δ = fan_out(Ω, fan_in(Ψ, h))`` (calibrating BatchNorm statistics on ``h``)."""
  return site.fan_out(omega, activations(site, psi, h, linear, units))


def _count(z: Array) -> int:
  """Number of loss terms (examples × positions) of logits ``z`` [..., C]."""
  return z.size // z.shape[-1]


def gn_model(lin, loss: Loss, y: Array, d: Array) -> Array:
  """GN model of the loss change for a perturbation ``d`` of ``u`` (no damping)."""
  jd = lin.jvp(d)
  g = loss.grad(lin.z, y)
  return (jnp.sum(g * jd) + 0.5 * jnp.sum(jd * loss.hvp(lin.z, y, jd))) / _count(lin.z)


def tiny_model(g_u: Array, n: int, d: Array) -> Array:
  """First-order model with identity curvature in ``u``-space: (Σ g_u·d + ½ Σ‖d‖²) / n."""
  return (jnp.sum(g_u * d) + 0.5 * jnp.sum(jnp.square(d))) / n


def _sq(t: PyTree) -> Array:
  return tree_vdot(t, t)


def psi_norm(site: Site, psi: Mapping[str, Array], units: Array | None = None) -> Array:
  """‖Ψ‖² over the active units."""
  if units is None:
    return _sq(psi)
  axes = {l.name: l.axis for l in site.in_leaves}
  parts = [jnp.sum(jnp.square(v) * _unit_broadcast(units.astype(v.dtype), v.ndim, axes[k]))
           for k, v in psi.items()]
  return sum(parts[1:], parts[0])


def solve_quadratic(q: Callable[[PyTree], Array], x0: PyTree, damping: float | Array,
                    iters: int, tol: float = 1e-6) -> PyTree:
  """Minimiser of ``q(x) + (damping/2)‖x‖²`` for an exactly quadratic ``q`` (CG from ``x0``)."""
  zero = tree_zeros_like(x0)
  grad_q = jax.grad(q)
  b = grad_q(zero)
  hvp = lambda v: jax.jvp(grad_q, (zero,), (v,))[1]
  return cg_solve(hvp, jax.tree.map(jnp.negative, b), x0=x0, damping=damping, maxiter=iters,
                  tol=tol).x


def gn_fan_out(site: Site, lin, loss: Loss, y: Array, a: Array, omega0: dict, damping,
               iters: int, delta_base: Array | None = None) -> dict:
  """Exact minimiser in ``Ω`` of the damped GN model for fixed activations ``a``.

  ``F Ω = J_u fan_out(Ω, a)`` is linear; CG on ``(Fᵀ H_z F / n + λ) Ω = −Fᵀ(g_z − H_z J δ_base)/n``
  with ``Fᵀ`` by transposition (matrix-free, on the cached linearisation).
  """
  f = lambda om: lin.jvp(site.fan_out(om, a))
  ft = jax.linear_transpose(f, omega0)
  n = _count(lin.z)
  g = loss.grad(lin.z, y)
  if delta_base is not None:
    g = g - loss.hvp(lin.z, y, lin.jvp(delta_base))
  inv_n = jnp.asarray(1.0 / n, lin.z.dtype)
  b = jax.tree.map(lambda t: -inv_n * t, ft(g)[0])
  matvec = lambda v: jax.tree.map(lambda t: inv_n * t, ft(loss.hvp(lin.z, y, f(v)))[0])
  return cg_solve(matvec, b, x0=omega0, damping=damping, maxiter=iters, tol=1e-6).x


def fan_out_features(site: Site, a: Array, omega_shape: tuple[int, ...]) -> Array:
  """Features ``ã`` [n, P, D] with ``δ[n, p, :] = ã[n, p, :] · Ω.reshape(D, O)``.

  Obtained from the site's own (linear) ``fan_out`` applied to the D basis kernels with one
  output column, so it holds for every consumer kind (dense, conv patches, flatten, heads).
  """
  d = int(np.prod(omega_shape[:-1]))
  basis = jnp.eye(d, dtype=a.dtype).reshape((d,) + tuple(omega_shape[:-1]) + (1,))
  name = site.out_leaves[0].name
  cols = jax.vmap(lambda e: site.fan_out({name: e}, a))(basis)  # [D, n, ..., 1]
  n = a.shape[0]
  return jnp.moveaxis(cols[..., 0].reshape(d, n, -1), 0, -1)  # [n, P, D]


def kfac_fan_out(site: Site, ss: SiteStats, y: Array, loss: Loss, a: Array,
                 omega_shape: tuple[int, ...], damping, delta_base=None) -> dict:
  """Fan-out from the closed form of the Kronecker-factored GN model (Martens & Grosse 2015).

  ``E[(ã ãᵀ) ⊗ J_uᵀ H J_u] ≈ A ⊗ S`` with ``A`` over (example, position) pairs and ``S`` the
  per-position output curvature, computed exactly from the columns of ``H_z = L Lᵀ`` (exact for
  non-sequence outputs; cross-position terms are dropped, as K-FAC does).
  """
  lin = ss.lin
  feats = fan_out_features(site, a, omega_shape)  # [n, P, D]
  n, p, _ = feats.shape
  nz = _count(lin.z)
  g = loss.grad(lin.z, y)
  if delta_base is not None:  # gradient of the model at the offset point
    g = g - loss.hvp(lin.z, y, lin.jvp(delta_base))
  g_u = lin.vjp(g).reshape(n, p, -1)
  b = jnp.einsum("npd,npo->do", feats, g_u) / nz
  amat = jnp.einsum("npd,npe->de", feats, feats) / (n * p)
  l_cols = _hessian_sqrt(loss, lin.z, y)  # [..., C, C]
  c = lin.z.shape[-1]

  def s_col(j):
    s = lin.vjp(l_cols[..., :, j]).reshape(n, p, -1)
    return jnp.einsum("npo,npq->oq", s, s)

  smat = jnp.sum(jax.lax.map(s_col, jnp.arange(c)), axis=0) / nz
  omega, _ = kfac_solve(KFACFactors(amat, smat, b, jnp.asarray(n * p, jnp.float32)), damping)
  return {site.out_leaves[0].name: omega.reshape(omega_shape)}


# ---- learners ----------------------------------------------------------------------------------

class Learned(NamedTuple):
  """Result of a learner (arrays; the search wraps it into a ``Candidate``)."""
  psi: dict
  omega: dict
  predicted: Array  # predicted loss decrease under the undamped GN model (> 0: good)
  score: Array      # the method's own ranking score (GN: = predicted)


def learn_gn(site: Site, ss: SiteStats, y: Array, loss: Loss, psi0: dict, omega0: dict,
             cfg: LearnConfig, damping: Array, delta_base: Array | None = None,
             units: Array | None = None) -> Learned:
  """Learns ``(Ψ, Ω)`` on the damped GN model (see module docstring).

  Args:
    site: the growth site.
    ss: its cached statistics.
    y: targets of the statistics batch.
    loss: the loss.
    psi0: initial fan-in slices ``{IN leaf name: [.., k, ..]}``.
    omega0: zero fan-out ``{OUT leaf name: [.., k, ..]}`` (fixes the shape).
    cfg: hyper-parameters.
    damping: λ.
    delta_base: ``δ`` of the point the statistics were linearised at (re-linearisation), or None.
    units: optional 0/1 mask [k] of the active units.
  """
  h, lin = ss.h, ss.lin
  name = site.out_leaves[0].name
  base = 0.0 if delta_base is None else delta_base

  def solve_omega(psi, omega_init, iters):
    a = activations(site, psi, h, units=units)
    if cfg.fan_out_solver == "kfac":
      return kfac_fan_out(site, ss, y, loss, a, omega_init[name].shape, damping, delta_base)
    return gn_fan_out(site, lin, loss, y, a, omega_init, damping, iters, delta_base)

  def objective(psi, omega):
    d = candidate_delta(site, psi, omega, h, units=units) - base
    return gn_model(lin, loss, y, d) + 0.5 * damping * (psi_norm(site, psi, units) + _sq(omega))

  omega = solve_omega(psi0, omega0, cfg.cg_iters)
  opt = optax.adam(cfg.psi_lr)

  def body(_, carry):
    psi, omega, opt_state, best = carry
    g = jax.grad(objective)(psi, jax.lax.stop_gradient(omega))
    with jax.numpy_dtype_promotion("standard"):
      upd, opt_state = opt.update(g, opt_state, psi)
    psi = optax.apply_updates(psi, upd)
    omega = solve_omega(psi, omega, cfg.cg_inner)
    val = objective(psi, omega)
    better = val < best[0]
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), (val, psi, omega), best)
    return psi, omega, opt_state, best

  init_best = (objective(psi0, omega), psi0, omega)
  if cfg.psi_steps > 0:
    _, _, _, best = jax.lax.fori_loop(0, cfg.psi_steps, body,
                                      (psi0, omega, opt.init(psi0), init_best))
  else:
    best = init_best
  _, psi, omega = best
  omega = solve_omega(psi, omega, cfg.cg_iters)
  psi = calibrated(site, psi, h)
  pred = -gn_model(lin, loss, y, candidate_delta(site, psi, omega, h, units=units) - base)
  return Learned(psi, omega, pred, pred)


def _linear_psi_mask(psi: Mapping[str, Array]) -> dict:
  """Fan-in leaves the linearised fan-in uses (kernels and biases, not normalisation)."""
  return {k: (k.endswith("kernel") or k.endswith("bias")) and not k.startswith(("bn", "dwbn"))
          for k in psi}


def learn_tiny(site: Site, ss: SiteStats, y: Array, loss: Loss, psi0: dict, omega0: dict,
               cfg: LearnConfig, damping: Array, units: Array | None = None) -> Learned:
  """TINY-style: alternating least squares on the identity-curvature, linearised model."""
  h, lin = ss.h, ss.lin
  n = _count(lin.z)
  g_u = lin.vjp(loss.grad(lin.z, y))
  mask = _linear_psi_mask(psi0)
  fixed = {k: v for k, v in psi0.items() if not mask[k]}

  def q(free, omega):
    psi = {**fixed, **free}
    return tiny_model(g_u, n, candidate_delta(site, psi, omega, h, linear=True, units=units))

  def body(_, carry):
    free, omega = carry
    omega = solve_quadratic(lambda om: q(free, om), omega, damping, cfg.cg_iters)
    free = solve_quadratic(lambda fr: q(fr, omega), free, damping, cfg.cg_iters)
    return free, omega

  free = {k: v for k, v in psi0.items() if mask[k]}
  free, omega = jax.lax.fori_loop(0, cfg.tiny_iters, body, (free, omega0))
  psi = calibrated(site, {**fixed, **free}, h)
  score = -q(free, omega)
  pred = -gn_model(lin, loss, y, candidate_delta(site, psi, omega, h, units=units))
  return Learned(psi, omega, pred, score)


def learn_gradmax(site: Site, ss: SiteStats, y: Array, loss: Loss, psi0: dict, omega0: dict,
                  cfg: LearnConfig, units: Array | None = None) -> Learned:
  """GradMax: zero fan-in, fan-out maximising the fan-in gradient norm (top-k SVD).

  The map from one unit's fan-out ``ω`` to the gradient of the loss in its (linearised) fan-in
  at zero is linear; its top right singular vectors are the fan-outs that maximise the initial
  gradient norm of the new fan-in. ``units`` keeps the first active ones.
  """
  h, lin = ss.h, ss.lin
  n = _count(lin.z)
  g_u = lin.vjp(loss.grad(lin.z, y))
  name = site.out_leaves[0].name
  out_axis = site.out_leaves[0].axis
  mask = _linear_psi_mask(psi0)
  axes = {l.name: l.axis for l in site.in_leaves}
  k = omega0[name].shape[out_axis]
  one = lambda v, key: jax.lax.slice_in_dim(v, 0, 1, axis=axes[key])
  zero_psi = {key: jnp.zeros_like(one(v, key)) for key, v in psi0.items() if mask[key]}
  fixed1 = {key: one(v, key) for key, v in psi0.items() if not mask[key]}
  unit_shape = list(omega0[name].shape)
  unit_shape[out_axis] = 1

  def fan_in_grad(om_flat):
    om = {name: om_flat.reshape(unit_shape)}
    f = lambda ps: jnp.sum(g_u * candidate_delta(site, {**fixed1, **ps}, om, h,
                                                 linear=True)) / n
    return jax.flatten_util.ravel_pytree(jax.grad(f)(zero_psi))[0]

  dim = int(np.prod(unit_shape))
  gmat = jax.vmap(fan_in_grad)(jnp.eye(dim, dtype=jnp.float32))  # [dim_ω, dim_ψ]
  _, s, vt = jnp.linalg.svd(gmat.T, full_matrices=False)  # right singular vectors in ω-space
  kk = min(k, vt.shape[0])
  cols = vt[:kk] * cfg.gradmax_scale  # [k, dim_ω]
  sv = jnp.square(s[:kk])
  if kk < k:
    cols = jnp.concatenate([cols, jnp.zeros((k - kk, dim), cols.dtype)], axis=0)
    sv = jnp.concatenate([sv, jnp.zeros((k - kk,), sv.dtype)])
  if units is not None:
    cols = cols * units[:, None].astype(cols.dtype)
    sv = sv * units.astype(sv.dtype)
  omega = {name: jnp.concatenate([cols[i].reshape(unit_shape) for i in range(k)],
                                 axis=out_axis)}
  psi = calibrated(site, {key: (jnp.zeros_like(v) if mask[key] else v)
                          for key, v in psi0.items()}, h)
  pred = -gn_model(lin, loss, y, candidate_delta(site, psi, omega, h, units=units))
  return Learned(psi, omega, pred, jnp.sum(sv))


def real_loss(model: nn.Module, loss: Loss, site: Site, variables, psi, omega, x, y,
              h: Array | None = None, units: Array | None = None) -> Array:
  """Mean real loss of the network with the candidate applied (perturbation at ``u``).

  ``psi`` is used as given (already calibrated). ``h``: the cached producer input for ``x``
  (recomputed by a forward pass if None).
  """
  if h is None:
    _, cache = model.apply(variables, x, mutable=["intermediates"])
    h = tree.get(cache, site.h_path + "/0")
  a = site.fan_in(psi, h)
  if units is not None:
    a = a * _unit_broadcast(units.astype(a.dtype), a.ndim, a.ndim + site.a_axis)
  d = site.fan_out(omega, a)
  z = perturbed_apply(model, variables, x, {site.u_path: d})
  return jnp.mean(loss.value(z, y))


def learn_real(model: nn.Module, loss: Loss, site: Site, variables, ss: SiteStats, x: Array,
               y: Array, psi0: dict, omega0: dict, steps: int, lrs: tuple[float, ...],
               units: Array | None = None) -> Learned:
  """Adam on the real loss of the statistics batch (Firefly: few steps; oracle: many, best lr).

  Each step runs the full network (the honest cost of training a candidate for real). BatchNorm
  statistics of the new units are re-calibrated on the batch inside the objective.
  """
  h = ss.h

  def objective(phi):
    psi, omega = phi
    return real_loss(model, loss, site, variables, calibrated(site, psi, h), omega, x, y, h=h,
                     units=units)

  def train(lr):
    opt = optax.adam(lr)

    def body(carry, _):
      phi, state = carry
      val, g = jax.value_and_grad(objective)(phi)
      with jax.numpy_dtype_promotion("standard"):
        upd, state = opt.update(g, state, phi)
      return (optax.apply_updates(phi, upd), state), val

    phi0 = (psi0, omega0)
    (phi, _), _ = jax.lax.scan(body, (phi0, opt.init(phi0)), None, length=steps)
    return phi, objective(phi)

  phis, vals = jax.vmap(train)(jnp.asarray(lrs, jnp.float32))
  best = jnp.argmin(jnp.where(jnp.isfinite(vals), vals, jnp.inf))
  psi, omega = jax.tree.map(lambda t: t[best], phis)
  psi = calibrated(site, psi, h)
  pred = -gn_model(ss.lin, loss, y, candidate_delta(site, psi, omega, h, units=units))
  base = jnp.mean(loss.value(ss.lin.z, y))
  return Learned(psi, omega, pred, base - vals[best])

