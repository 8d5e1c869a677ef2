"""Candidate morphisms learned and scored on cached statistics: Gauss-Newton and baselines.

A candidate adds ``k`` units at a site with fan-in ``Ψ`` (the new slices of the site's IN
leaves) and fan-out ``Ω`` (the new slice of its OUT kernel); it changes the consumer
pre-activation by ``δ = fan_out(Ω, fan_in(Ψ, h))``. Methods (all fed by one ``Stats`` pass):

* ``gn`` — Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855): minimise the damped GN model
  ``Q(φ) = E[g_zᵀ Jδ] + ½ E[(Jδ)ᵀ H_z (Jδ)] + (λ/2)‖φ‖²``: for fixed ``Ψ`` the problem in ``Ω``
  is damped least squares (CG on matrix-free GN products, the K-FAC closed form, or — for a
  dense consumer with a small pre-activation — an exact dense solve on per-example ``u``-space
  GN matrices ``G_n = J_nᵀ H_n J_n`` computed once per call, after which no iteration touches
  the upper network again); ``Ψ`` takes Adam steps on the reduced objective ``Q(Ψ, Ω*(Ψ))``
  (envelope theorem: ``Ω*`` is held fixed in the gradient), from a random start or a closed-form
  GN-metric SVD start (``psi_init="svd"``). Score: the predicted decrease ``−(Q* − L0)``
  without the damping term.
* ``tiny`` — TINY-style first-order least squares (Verbockhaven et al. 2024): the same model with
  ``JᵀH_zJ`` replaced by the identity in ``u``-space and the activation linearised, solved by
  alternating least squares (each half by CG).
* ``gradmax`` — GradMax (Evci et al. 2022): ``Ω`` the top-k right singular vectors of the map
  from one unit's fan-out to the gradient of its fan-in at ``Ψ = 0``; scored by the gradient norm.
  The fan-in is then set to a small random one (``gradmax_fan_in_scale`` × the initialiser's
  draw, zero bias), as in the authors' implementation: an exactly zero fan-in would leave ReLU
  units dead for good (``relu'(0) = 0``), so the grown network would train as the seed did.
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
FAN_OUT_SOLVERS = ("cg", "kfac", "dense")
DENSE_MAX_U = 512  # largest per-example consumer pre-activation of the "dense" fan-out solver


class LearnConfig(NamedTuple):
  """Hyper-parameters of candidate learning (static under jit).

  Attributes:
    damping: λ of the damped GN model (trust region; adapted by the search).
    cg_iters: CG iterations of the final fan-out solve.
    cg_inner: CG iterations per fan-in step (warm-started).
    psi_steps: Adam steps on the fan-in (reduced objective).
    psi_lr: their learning rate.
    fan_out_solver: ``"cg"`` (exact GN, matrix-free), ``"kfac"`` (closed form of the Kronecker
      model) or ``"dense"`` (exact GN by a dense solve on the per-example ``u``-space curvature;
      needs a consumer pre-activation ``u`` of shape [n, U] with U ≤ ``DENSE_MAX_U``, i.e. a
      dense consumer: the fast choice for MLPs, where every fan-in step costs a few small
      matrix products instead of CG iterations through the upper network).
    psi_init: ``"random"`` (the model's initialiser), ``"tiny"`` (start the fan-in from the TINY
      solution) or ``"svd"`` (closed form, needs ``fan_out_solver="dense"``: the top singular
      directions of the linearised candidate in the metric of the Kronecker-factored GN model,
      ``A^{-1/2} E[φ g_uᵀ] S^{-1/2}`` with ``A = E[φφᵀ]`` over the linear fan-in features φ and
      ``S = E[G_n]``; units come in ± pairs, so that a pair of ReLU units with opposite fan-out
      is exactly one linear unit; then the exact fan-out solve, then ``psi_steps`` Adam steps
      refine it on the exact GN model — few are needed from this start).
    tiny_iters: alternating least-squares iterations of the TINY baseline.
    gradmax_scale: Frobenius norm of each GradMax fan-out column.
    gradmax_fan_in_scale: GradMax's fan-in kernel is this times the initialiser's draw (bias 0).
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
  gradmax_fan_in_scale: float = 1e-2
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
               iters: int, delta_base: Array | None = None, anchor: Array | None = None) -> dict:
  """Exact minimiser in ``Ω`` of the damped GN model for fixed activations ``a``.

  ``F Ω = J_u fan_out(Ω, a)`` is linear; CG on ``(Fᵀ H_z F / n + λ) Ω = −Fᵀ(g_z − H_z J δ_base)/n``
  with ``Fᵀ`` by transposition (matrix-free, on the cached linearisation). ``anchor``: the
  damping pulls towards this fan-out array instead of zero (``+ λ anchor`` on the right).
  """
  f = lambda om: lin.jvp(site.fan_out(om, a))
  ft = jax.linear_transpose(f, omega0)
  n = _count(lin.z)
  g = loss.grad(lin.z, y)
  if delta_base is not None:
    g = g - loss.hvp(lin.z, y, lin.jvp(delta_base))
  inv_n = jnp.asarray(1.0 / n, lin.z.dtype)
  b = jax.tree.map(lambda t: -inv_n * t, ft(g)[0])
  if anchor is not None:
    b = {k: v + damping * anchor for k, v in b.items()}
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
                 omega_shape: tuple[int, ...], damping, delta_base=None,
                 anchor: Array | None = None) -> dict:
  """Fan-out from the closed form of the Kronecker-factored GN model (Martens & Grosse 2015).

  ``E[(ã ãᵀ) ⊗ J_uᵀ H J_u] ≈ A ⊗ S`` with ``A`` over (example, position) pairs and ``S`` the
  per-position output curvature, computed exactly from the columns of ``H_z = L Lᵀ`` (exact for
  non-sequence outputs; cross-position terms are dropped, as K-FAC does). ``anchor``: as in
  ``gn_fan_out``.
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
  if anchor is not None:
    b = b - damping * anchor.reshape(b.shape)
  amat = jnp.einsum("npd,npe->de", feats, feats) / (n * p)
  l_cols = _hessian_sqrt(loss, lin.z, y)  # [..., C, C]
  c = lin.z.shape[-1]

  def s_col(j):
    s = lin.vjp(l_cols[..., :, j]).reshape(n, p, -1)
    return jnp.einsum("npo,npq->oq", s, s)

  smat = jnp.sum(jax.lax.map(s_col, jnp.arange(c)), axis=0) / nz
  omega, _ = kfac_solve(KFACFactors(amat, smat, b, jnp.asarray(n * p, jnp.float32)), damping)
  return {site.out_leaves[0].name: omega.reshape(omega_shape)}


class DenseCurvature(NamedTuple):
  """The GN model in ``u``-space, per example (``"dense"`` fan-out solver).

  Attributes:
    g_u: ``J_nᵀ g_n`` [n, U] (sum over the example's loss terms, not averaged).
    gmat: ``G_n = J_nᵀ H_n J_n`` [n, U, U].
    count: number of loss terms (the model averages over them).
  """
  g_u: Array
  gmat: Array
  count: int


def dense_curvature(lin, loss: Loss, y: Array) -> DenseCurvature:
  """Per-example gradient and GN matrix of the loss in the consumer pre-activation ``u``.

  With ``H_n = L_n L_nᵀ`` (closed form per loss), ``C`` vjps of the cached linearisation (one
  per column of ``L``, all examples at once) give ``S_n = L_nᵀ J_n`` [C, U] and
  ``G_n = S_nᵀ S_n``. With these the GN model of any ``δ`` [n, U] is
  ``Σ_n (g_nᵀ δ_n + ½ δ_nᵀ G_n δ_n) / count`` — exactly ``gn_model`` — without the upper network.

  Raises:
    ValueError: if ``u`` is not [n, U] with U ≤ ``DENSE_MAX_U`` (e.g. a conv consumer) or the
      logits are not [n, C].
  """
  g_u = lin.vjp(loss.grad(lin.z, y))
  if g_u.ndim != 2 or g_u.shape[-1] > DENSE_MAX_U or lin.z.ndim != 2:
    raise ValueError(
        f"fan_out_solver='dense' needs a dense consumer whose pre-activation u is [n, U] with "
        f"U <= {DENSE_MAX_U} and logits [n, C]; this site has u of shape {g_u.shape} and logits "
        f"{lin.z.shape}. Use fan_out_solver='cg' (exact, matrix-free) or 'kfac' for this model.")
  with jax.numpy_rank_promotion("allow"):  # _hessian_sqrt broadcasts implicitly
    l_cols = jnp.moveaxis(_hessian_sqrt(loss, lin.z, y), -1, 0)  # [C, n, C]: columns of L_n
  s_fac = jax.vmap(lin.vjp)(l_cols)  # [C, n, U]
  # G_n = Σ_c s_cn s_cnᵀ as C fused outer products: XLA:CPU lowers the batched einsum
  # ("cnu,cnv->nuv") to transposes and n tiny GEMMs: the fused fast-mode call (2 sites, n = 1024)
  # took 10-20% longer with it.
  gmat = s_fac[0][:, :, None] * s_fac[0][:, None, :]
  for c in range(1, s_fac.shape[0]):
    gmat = gmat + s_fac[c][:, :, None] * s_fac[c][:, None, :]
  return DenseCurvature(g_u, gmat, _count(lin.z))


def _gmat_times(gmat: Array, d: Array) -> Array:
  """``G_n δ_n`` per example: ``gmat`` [n, U, U] (symmetric), ``d`` [n, U] -> [n, U].

  Summed over G's middle axis. The reduction over the minor axis, ``sum(gmat * d[:, None, :],
  -1)``, jitted and vmapped over 3 sizes at n = 1024, U = 16 (the vs_gromo fast mode, padded)
  returned a wrong value for the last size on XLA:CPU (jax 0.10.2;
  test_dense_model_batched_over_sizes_equals_a_float64_oracle); this form is also faster.
  """
  return jnp.sum(gmat * d[:, :, None], axis=1)


def dense_model(dc: DenseCurvature, d: Array) -> Array:
  """GN model of the loss change for a perturbation ``d`` [n, U] of ``u`` (no damping)."""
  return (jnp.sum(dc.g_u * d) + 0.5 * jnp.sum(d * _gmat_times(dc.gmat, d))) / dc.count


def dense_fan_out(site: Site, dc: DenseCurvature, a: Array, omega_shape: tuple[int, ...],
                  damping, delta_base: Array | None = None, units: Array | None = None,
                  anchor: Array | None = None) -> dict:
  """Exact minimiser in ``Ω`` of the damped GN model for fixed activations ``a`` (dense solve).

  With features ``f_n`` [D] (``δ_n = Ωᵀ f_n``, ``Ω`` [D, U]) the model is quadratic in vec(Ω)
  with matrix ``M = Σ_n (f_n f_nᵀ) ⊗ G_n / count`` [DU, DU] and linear term
  ``b = Σ_n f_n ⊗ g_n / count``; ``(M + λI) vec(Ω) = −b`` is solved directly (Cholesky:
  ``M + λI`` is positive definite; no pivoting, which XLA:CPU runs as a sequential loop).

  ``units`` (0/1 [k], for ``Ω`` [k, U]) masks units in ``M`` and ``b`` instead of in ``a``:
  the same solution, but ``M`` is then shared by every unit mask when the candidate sizes of a
  vmapped call share their activations.
  """
  return dense_fan_out_value(site, dc, a, omega_shape, damping, delta_base, units, anchor)[0]


def dense_fan_out_value(site: Site, dc: DenseCurvature, a: Array, omega_shape: tuple[int, ...],
                        damping, delta_base: Array | None = None, units: Array | None = None,
                        anchor: Array | None = None) -> tuple[dict, Array]:
  """``dense_fan_out`` and the undamped GN model value of its solution, ``bᵀx + ½ xᵀMx``.

  Without ``delta_base`` that value is ``dense_model(dc, δ)`` of the candidate's
  ``δ_n = Ωᵀ f_n`` (up to float rounding) at the cost of one [DU, DU] matrix-vector product
  instead of a pass over the per-example curvature [n, U, U]. With ``delta_base`` it omits the
  constant ``−Σ g·δ_base + ½ Σ δ_baseᵀ G δ_base`` (divided by the count). ``anchor``: as in
  ``gn_fan_out`` (units masked out of ``M`` must be zero in it).
  """
  feats = fan_out_features(site, a, omega_shape)[:, 0, :]  # [n, D] (P = 1 for dense consumers)
  g_u = dc.g_u
  if delta_base is not None:  # gradient of the model at the offset point
    g_u = g_u - _gmat_times(dc.gmat, delta_base)
  d, width = feats.shape[-1], g_u.shape[-1]
  inv = 1.0 / dc.count
  n = feats.shape[0]
  ff = (feats[:, :, None] * feats[:, None, :]).reshape(n, d * d)
  mmat = (ff.T @ dc.gmat.reshape(n, width * width)).reshape(d, d, width, width)  # one GEMM
  mmat = inv * jnp.transpose(mmat, (0, 2, 1, 3)).reshape(d * width, d * width)
  b = inv * jnp.einsum("nd,nu->du", feats, g_u).reshape(-1)
  lam = jnp.asarray(damping, mmat.dtype)
  if units is not None:
    keep = jnp.repeat(units.astype(mmat.dtype), width)  # [k U]: feature d is unit d
    mmat = mmat * keep[:, None] * keep[None, :]
    b = b * keep
  chol = jnp.linalg.cholesky(mmat + lam * jnp.eye(d * width, dtype=mmat.dtype))
  tri = jax.scipy.linalg.solve_triangular
  rhs = -b if anchor is None else lam * anchor.reshape(-1).astype(b.dtype) - b
  x = tri(chol, tri(chol, rhs, lower=True), lower=True, trans=1)
  value = jnp.dot(b, x) + 0.5 * jnp.dot(x, mmat @ x)
  return {site.out_leaves[0].name: x.reshape(omega_shape)}, value


def svd_psi(site: Site, h: Array, psi0: Mapping[str, Array], dc: DenseCurvature,
            psi_mask: Mapping[str, Array] | None = None, eps: float = 3e-3) -> dict:
  """GN-metric SVD initialisation of the fan-in (``LearnConfig.psi_init == "svd"``).

  The linear fan-in of one unit is ``pre_n = φ_nᵀ ψ`` (features ``φ`` [n, P] obtained from the
  site's own ``fan_in(linear=True)`` on the basis of one unit's kernel/bias slices). For the
  linearised candidate ``δ_n = Wᵀ φ_n`` with rank-k ``W``, the Kronecker-factored GN model
  ``E[gᵀWᵀφ] + ½ tr(WᵀAWS)`` is minimised by the top-k SVD of ``A^{-1/2} B S^{-1/2}``
  (``B = E[φ g_uᵀ]``); the fan-in directions are ``A^{-1/2} u_i``, scaled to unit norm.
  Units are ordered ``+ψ_1, −ψ_1, +ψ_2, −ψ_2, …``: ``relu(x) − relu(−x) = x``, so the exact
  fan-out solve can turn each pair into one linear unit (and use each half alone when better);
  each sign is chosen so that ``+ψ_i`` is the better lone unit (the SVD's sign is arbitrary).
  Non-linear leaves (normalisation) keep ``psi0``; fan-in entries where ``psi_mask`` is 0 stay 0.
  ``A`` and ``S`` get a ridge ``eps · max diag``: with 1e-6 the whitening favoured input
  directions of tiny variance and the candidates' predicted decrease at the input site of a
  digits MLP was ~10× smaller; 1e-3–1e-1 were within 15% of each other.
  """
  mask = _linear_psi_mask(psi0)
  axes = {l.name: l.axis for l in site.in_leaves}
  free0 = {n: jax.lax.slice_in_dim(v, 0, 1, axis=axes[n]) for n, v in psi0.items() if mask[n]}
  fixed1 = {n: jax.lax.slice_in_dim(v, 0, 1, axis=axes[n]) for n, v in psi0.items()
            if not mask[n]}
  flat0, unravel = jax.flatten_util.ravel_pytree(free0)
  dim = flat0.shape[0]
  basis = jnp.eye(dim, dtype=h.dtype)
  phi = jax.vmap(lambda e: site.fan_in({**fixed1, **unravel(e)}, h, linear=True))(basis)
  n = h.shape[0]
  phi = jnp.moveaxis(phi.reshape(dim, n, -1), 0, -1)  # [n, P, dim]
  if phi.shape[1] != 1:
    raise ValueError("psi_init='svd' needs a dense producer (one fan-in position per example).")
  phi = phi[:, 0, :]
  if psi_mask is not None:
    m1 = {n: jax.lax.slice_in_dim(psi_mask[n], 0, 1, axis=axes[n]) for n in free0}
    phi = phi * jax.flatten_util.ravel_pytree(m1)[0].astype(phi.dtype)[None, :]
  ab = phi.T @ jnp.concatenate([phi, dc.g_u], axis=1)  # one GEMM for A and B
  amat = ab[:, :dim] / n
  bmat = ab[:, dim:] / dc.count  # [dim, U]
  smat = jnp.mean(dc.gmat, axis=0) * (n / dc.count)
  # Whitening by Cholesky factors (any W with WᵀAW = I gives the same directions).
  chol_a = jnp.linalg.cholesky(amat + eps * jnp.max(jnp.diag(amat))
                               * jnp.eye(dim, dtype=amat.dtype))
  chol_s = jnp.linalg.cholesky(smat + eps * jnp.max(jnp.diag(smat))
                               * jnp.eye(smat.shape[0], dtype=smat.dtype))
  tri = jax.scipy.linalg.solve_triangular
  whitened = tri(chol_s, tri(chol_a, bmat, lower=True).T, lower=True).T  # L_A⁻¹ B L_S⁻ᵀ
  uvec, _, _ = jnp.linalg.svd(whitened, full_matrices=False)
  k = next(iter(psi0.values())).shape[axes[next(iter(psi0))]]
  dirs = tri(chol_a.T, uvec, lower=False)  # L_A⁻ᵀ u_i: unit pre-activation RMS
  # The SVD's sign is arbitrary but a lone ReLU unit is not symmetric: orient each direction so
  # that relu(+ψᵀφ) alone is the better unit under the Kronecker model, ‖E[a g_u]‖²_{S⁻¹} / E[a²].
  pre = phi @ dirs  # [n, r]

  def unit_gain(a):
    c = tri(chol_s, (a.T @ dc.g_u / dc.count).T, lower=True)  # L_S⁻¹ E[a g_u]: [U, r]
    return jnp.sum(jnp.square(c), axis=0) / (jnp.mean(jnp.square(a), axis=0) + 1e-12)

  flip = unit_gain(jax.nn.relu(-pre)) > unit_gain(jax.nn.relu(pre))
  dirs = dirs * jnp.where(flip, -1.0, 1.0).astype(dirs.dtype)[None, :]
  # Unit norm, like the model's initialiser (E‖ψ‖² = 1 for lecun-normal): directions of low input
  # variance would otherwise get huge weights that the damping term ½λ‖Ψ‖² then penalises.
  dirs = dirs / (jnp.linalg.norm(dirs, axis=0, keepdims=True) + 1e-12)
  r = dirs.shape[1]
  cols = [(1.0 if i % 2 == 0 else -1.0) * dirs[:, min(i // 2, r - 1)] for i in range(k)]
  units = [unravel(c) for c in cols]
  out = dict(psi0)
  for name in free0:
    out[name] = jnp.concatenate([u[name] for u in units], axis=axes[name]).astype(psi0[name].dtype)
  return out


def _unit_norms(tree_: Mapping[str, Array], axes: Mapping[str, int]) -> Array:
  parts = [jnp.sum(jnp.square(v), axis=tuple(i for i in range(v.ndim) if i != axes[n] % v.ndim))
           for n, v in tree_.items()]
  return jnp.sqrt(sum(parts[1:], parts[0]))


def balanced(site: Site, psi: Mapping[str, Array], omega: Mapping[str, Array], h: Array
             ) -> tuple[dict, dict]:
  """``(ψ_i · c_i, ω_i / c_i)`` per unit with ``c = (‖ω_i‖/‖ψ_i‖)^{1/2}`` when the fan-in is
  positively homogeneous (ReLU: ``a(cψ) = c·a(ψ)``, checked numerically on ``h``).

  The candidate's δ is unchanged and ``‖cψ_i‖² + ‖ω_i/c‖²`` is minimal: the damped model value
  can only decrease (a ψ of unit norm with a large ω is penalised far more than the balance).
  """
  mask = _linear_psi_mask(psi)
  free = {n: v for n, v in psi.items() if mask[n]}
  in_axes = {l.name: l.axis for l in site.in_leaves}
  out_axes = {l.name: l.axis for l in site.out_leaves}
  a1 = site.fan_in({**psi, **{n: 2.0 * v for n, v in free.items()}}, h)
  a0 = site.fan_in(psi, h)
  homogeneous = (len(free) == len(psi)) & (
      jnp.max(jnp.abs(a1 - 2.0 * a0)) <= 1e-4 * (jnp.max(jnp.abs(a0)) + 1.0))
  pn, on = _unit_norms(free, in_axes), _unit_norms(omega, out_axes)
  ok = homogeneous & (pn > 0) & (on > 0)
  c = jnp.where(ok, jnp.sqrt(jnp.clip(on / jnp.where(ok, pn, 1.0), 1e-3, 1e3)), 1.0)
  out = dict(psi)
  for n, v in free.items():
    out[n] = v * _unit_broadcast(c.astype(v.dtype), v.ndim, in_axes[n])
  om = {n: v / _unit_broadcast(c.astype(v.dtype), v.ndim, out_axes[n]) for n, v in omega.items()}
  return out, om


def masked_psi(psi: Mapping[str, Array], psi_mask: Mapping[str, Array] | None) -> dict:
  """``psi`` with the entries of ``psi_mask == 0`` zeroed (inputs that do not exist: padding)."""
  if psi_mask is None:
    return dict(psi)
  return {k: v * psi_mask[k].astype(v.dtype) if k in psi_mask else v for k, v in psi.items()}


# ---- learners ----------------------------------------------------------------------------------

class Learned(NamedTuple):
  """Result of a learner (arrays; the search wraps it into a ``Candidate``)."""
  psi: dict
  omega: dict
  predicted: Array  # predicted loss decrease under the undamped GN model (> 0: good)
  score: Array      # the method's own ranking score (GN: = predicted)


def learn_gn(site: Site, ss: SiteStats, y: Array, loss: Loss, psi0: dict, omega0: dict,
             cfg: LearnConfig, damping: Array, delta_base: Array | None = None,
             units: Array | None = None, psi_mask: Mapping[str, Array] | None = None
             ) -> Learned:
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
      Given, ``(psi0, omega0)`` is that point and the damping is proximal — it pulls towards
      ``(psi0, omega0)`` instead of zero (a Levenberg-Marquardt step: a fixed point of repeated
      rounds is a stationary point of the real, undamped loss) — and ``psi_init`` is ignored.
    units: optional 0/1 mask [k] of the active units.
    psi_mask: optional 0/1 arrays shaped like ``psi0``: entries at 0 (fan-in from inputs that
      are padding, see ``GrowConfig.width_bucket``) are held at zero.
  """
  h, lin = ss.h, ss.lin
  name = site.out_leaves[0].name
  base = 0.0 if delta_base is None else delta_base
  dense = cfg.fan_out_solver == "dense"
  dc = dense_curvature(lin, loss, y) if dense else None
  proximal = delta_base is not None
  if cfg.psi_init == "svd" and not proximal:
    if not dense:
      raise ValueError("LearnConfig.psi_init='svd' needs fan_out_solver='dense'.")
    psi0 = svd_psi(site, h, masked_psi(psi0, psi_mask), dc, psi_mask)
  psi0 = masked_psi(psi0, psi_mask)
  psi_ref = psi0 if proximal else None
  omega_ref = omega0[name] if proximal else None

  def model_value(d):
    return dense_model(dc, d) if dense else gn_model(lin, loss, y, d)

  # A dense consumer kernel [k, U]: the unit masks act in the solve, so the masked sizes of a
  # vmapped call share their activations and M.
  kernel_solve = dense and len(omega0[name].shape) == 2 and site.out_leaves[0].axis == 0

  def solve_omega(psi, omega_init, iters):
    shape = omega_init[name].shape
    if kernel_solve:
      a = activations(site, masked_psi(psi, psi_mask), h)  # units masked in the solve
      return dense_fan_out(site, dc, a, shape, damping, delta_base, units, omega_ref)
    a = activations(site, masked_psi(psi, psi_mask), h, units=units)
    if dense:
      return dense_fan_out(site, dc, a, shape, damping, delta_base, anchor=omega_ref)
    if cfg.fan_out_solver == "kfac":
      return kfac_fan_out(site, ss, y, loss, a, omega_init[name].shape, damping, delta_base,
                          omega_ref)
    return gn_fan_out(site, lin, loss, y, a, omega_init, damping, iters, delta_base, omega_ref)

  def objective(psi, omega):
    psi = masked_psi(psi, psi_mask)
    d = candidate_delta(site, psi, omega, h, units=units) - base
    if proximal:
      psi = jax.tree.map(jnp.subtract, psi, psi_ref)
      omega = {name: omega[name] - omega_ref}
    return model_value(d) + 0.5 * damping * (psi_norm(site, psi, units) + _sq(omega))

  # Without fan-in steps the candidate is the first solve's (balancing keeps δ), so its
  # prediction is the solve's own model value: no further pass over the per-example curvature.
  direct_pred = kernel_solve and delta_base is None and cfg.psi_steps == 0
  if direct_pred:
    a0 = activations(site, psi0, h)
    omega, value0 = dense_fan_out_value(site, dc, a0, omega0[name].shape, damping, None, units)
  else:
    omega = solve_omega(psi0, omega0, cfg.cg_iters)
  if cfg.psi_init == "svd" and not proximal:
    psi0, omega = balanced(site, psi0, omega, h)
  opt = optax.adam(cfg.psi_lr)

  def keep_better(best, val, psi, omega):
    better = val < best[0]
    return jax.tree.map(lambda new, old: jnp.where(better, new, old), (val, psi, omega), best)

  def body(_, carry):
    # The gradient's forward pass is the objective at the current iterate (Ω is held fixed in
    # it), so the best iterate is tracked one step behind at no extra model evaluation.
    psi, omega, opt_state, best = carry
    val, g = jax.value_and_grad(objective)(psi, jax.lax.stop_gradient(omega))
    best = keep_better(best, val, psi, omega)
    with jax.numpy_dtype_promotion("standard"):
      upd, opt_state = opt.update(g, opt_state, psi)
    psi = optax.apply_updates(psi, upd)
    omega = solve_omega(psi, omega, cfg.cg_inner)
    return psi, omega, opt_state, best

  if cfg.psi_steps > 0:
    inf = jnp.full((), jnp.inf, jax.eval_shape(objective, psi0, omega).dtype)
    init_best = (inf, psi0, omega)
    psi, omega, _, best = jax.lax.fori_loop(0, cfg.psi_steps, body,
                                            (psi0, omega, opt.init(psi0), init_best))
    best = keep_better(best, objective(psi, omega), psi, omega)
  else:
    best = (None, psi0, omega)
  _, psi, omega = best
  psi = masked_psi(psi, psi_mask)
  if not dense:  # the dense solves are exact: the best Ω is already optimal for its Ψ
    omega = solve_omega(psi, omega, cfg.cg_iters)
  psi = calibrated(site, psi, h)
  if direct_pred:
    pred = -value0
  else:
    pred = -model_value(candidate_delta(site, psi, omega, h, units=units) - base)
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
  """GradMax: fan-out maximising the fan-in gradient norm at zero fan-in (top-k SVD).

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
  small = lambda key, v: (cfg.gradmax_fan_in_scale * v if key.endswith("kernel")
                          else jnp.zeros_like(v))
  psi = calibrated(site, {key: (small(key, v) if mask[key] else v)
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

