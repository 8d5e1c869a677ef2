"""Generalised Gauss-Newton products, damped conjugate gradient, K-FAC and diagonal GN.

For a function ``z = f(θ)`` (any apply function: network outputs as a function of parameters,
or of an intermediate pre-activation ``u``) and a loss ``ℓ(z, y)`` with PSD output Hessian
``H_z``, the GN matrix is ``G = (1/n) Jᵀ H_z J`` with ``J = ∂z/∂θ``. growjax never forms ``J``:
``linearize`` computes the forward once (``jax.vjp``, whose closure holds the cached residuals
and is a pytree that can be passed into jitted functions), the forward linear map ``J v`` is the
transpose of the vjp (``jax.linear_transpose``), and ``G v = vjp(H_z · jvp(v)) / n``. This is
the machinery of Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855), where ``θ`` is a
candidate morphism's parameters and ``f`` the network above the growth site; K-FAC follows
Martens & Grosse (2015, arXiv:1503.05671).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from growjax.curvature.losses import Loss

Array = jax.Array
PyTree = Any


# ---- pytree vector helpers --------------------------------------------------------------------

def tree_vdot(a: PyTree, b: PyTree) -> Array:
  """Σ a·b over all leaves (float32 accumulation)."""
  parts = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return sum(parts[1:], parts[0]) if parts else jnp.zeros(())


def tree_axpy(alpha: Array, x: PyTree, y: PyTree) -> PyTree:
  """``alpha * x + y`` leaf-wise."""
  return jax.tree.map(lambda a, b: alpha * a + b, x, y)


def tree_scale(alpha: Array, x: PyTree) -> PyTree:
  return jax.tree.map(lambda a: alpha * a, x)


def tree_zeros_like(x: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, x)


# ---- linearisation and GN products ------------------------------------------------------------

class Linearized(NamedTuple):
  """A function linearised at a point: its value and the cached vjp (a pytree).

  ``jvp`` (``J v``) is recovered from ``vjp`` by transposition, so both use the same residuals;
  the object can cross ``jax.jit`` boundaries as an argument.
  """
  z: PyTree
  vjp_fn: Any

  def jvp(self, v: PyTree) -> PyTree:
    (out,) = jax.linear_transpose(self.vjp_fn, self.z)((v,))
    return out

  def vjp(self, w: PyTree) -> PyTree:
    return self.vjp_fn(w)[0]


def linearize(fn: Callable[[PyTree], PyTree], primal: PyTree) -> Linearized:
  """Runs ``fn`` once at ``primal`` and keeps what ``J v`` and ``Jᵀ w`` need."""
  z, vjp_fn = jax.vjp(fn, primal)
  return Linearized(z, vjp_fn)


def gn_matvec(lin: Linearized, loss: Loss, y: Array, v: PyTree,
              scale: float | Array | None = None) -> PyTree:
  """``scale · Jᵀ H_z J v``; ``scale`` defaults to 1/n with n the number of examples.

  Examples are the leading axes of ``z`` up to its class axis (sequences count every position).
  """
  jv = lin.jvp(v)
  hjv = loss.hvp(lin.z, y, jv)
  n = lin.z.size // lin.z.shape[-1]
  s = (1.0 / n) if scale is None else scale
  return tree_scale(jnp.asarray(s, lin.z.dtype), lin.vjp(hjv))


def gradient(lin: Linearized, loss: Loss, y: Array, scale: float | Array | None = None) -> PyTree:
  """``scale · Jᵀ g_z``: the gradient of the mean loss through the linearised function."""
  n = lin.z.size // lin.z.shape[-1]
  s = (1.0 / n) if scale is None else scale
  return tree_scale(jnp.asarray(s, lin.z.dtype), lin.vjp(loss.grad(lin.z, y)))


# ---- damped conjugate gradient ----------------------------------------------------------------

class CGResult(NamedTuple):
  x: PyTree
  iterations: Array
  residual_norm: Array


def cg_solve(matvec: Callable[[PyTree], PyTree], b: PyTree, *, x0: PyTree | None = None,
             damping: float | Array = 0.0, maxiter: int = 50, tol: float = 1e-6) -> CGResult:
  """Solves ``(A + damping·I) x = b`` for PSD ``A`` given as a pytree ``matvec``.

  Stops when ``‖r‖ ≤ tol·‖b‖`` or after ``maxiter`` iterations (``lax.while_loop``: jit-able,
  differentiable only through the result, not the loop).

  Returns:
    ``CGResult(x, iterations, residual_norm)``.
  """
  damping = jnp.asarray(damping)

  def op(v):
    return tree_axpy(damping.astype(jax.tree.leaves(v)[0].dtype), v, matvec(v))

  x = tree_zeros_like(b) if x0 is None else x0
  r = jax.tree.map(jnp.subtract, b, op(x))
  p = r
  rs = tree_vdot(r, r)
  bnorm = jnp.sqrt(tree_vdot(b, b))
  thresh = (tol * bnorm) ** 2

  def cond(carry):
    _, _, _, rs, i = carry
    return jnp.logical_and(i < maxiter, rs > thresh)

  def body(carry):
    x, r, p, rs, i = carry
    ap = op(p)
    pap = tree_vdot(p, ap)
    alpha = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1.0), 0.0)
    x = tree_axpy(alpha, p, x)
    r = tree_axpy(-alpha, ap, r)
    rs_new = tree_vdot(r, r)
    beta = rs_new / jnp.where(rs > 0, rs, 1.0)
    p = tree_axpy(beta, p, r)
    return x, r, p, rs_new, i + 1

  x, r, _, rs, i = jax.lax.while_loop(cond, body, (x, r, p, rs, jnp.zeros((), jnp.int32)))
  return CGResult(x, i, jnp.sqrt(rs))


# ---- Kronecker-factored closed form -----------------------------------------------------------

class KFACFactors(NamedTuple):
  """``E[(ã ãᵀ) ⊗ Jᵀ H J] ≈ A ⊗ S`` and the gradient ``B = E[g_u ãᵀ]``.

  Attributes:
    a: [D, D] input second moment ``E[ã ãᵀ]`` (over examples and positions).
    s: [O, O] output-side curvature ``E[J_uᵀ H_z J_u]`` (per position).
    b: [D, O] gradient ``E[ã g_uᵀ]`` in the flax kernel layout (``δ = ã Ω``).
    count: number of (example, position) pairs averaged.
  """
  a: Array
  s: Array
  b: Array
  count: Array


def kfac_solve(f: KFACFactors, damping: float | Array) -> tuple[Array, Array]:
  """Closed-form minimiser of ``bᵀω + ½ ωᵀ(A⊗S + λI)ω`` over ``Ω`` [D, O].

  With ``A = V diag(α) Vᵀ`` and ``S = U diag(s) Uᵀ``:
  ``Ω* = −V [(Vᵀ B U)_ij / (α_i s_j + λ)] Uᵀ`` and the predicted decrease is
  ``½ Σ (Vᵀ B U)²_ij / (α_i s_j + λ)`` (exact when the Kronecker factorisation is).

  Returns:
    ``(omega [D, O], predicted_decrease)``.
  """
  alpha, v = jnp.linalg.eigh(f.a)
  s, u = jnp.linalg.eigh(f.s)
  alpha = jnp.maximum(alpha, 0.0)
  s = jnp.maximum(s, 0.0)
  proj = v.T @ f.b @ u
  denom = alpha[:, None] * s[None, :] + damping
  omega = -(v @ (proj / denom) @ u.T)
  return omega, 0.5 * jnp.sum(jnp.square(proj) / denom)


# ---- diagonal GN ------------------------------------------------------------------------------

def _hessian_sqrt(loss: Loss, z: Array, y: Array) -> Array:
  """L [..., C, C] with ``H_z = L Lᵀ`` for one output vector (closed forms per loss)."""
  c = z.shape[-1]
  if loss.name == "softmax_cross_entropy":
    p = jax.nn.softmax(z, axis=-1)
    sp = jnp.sqrt(p)
    return jnp.eye(c, dtype=z.dtype) * sp[..., None, :] - p[..., :, None] * sp[..., None, :]
  if loss.name == "sigmoid_cross_entropy":
    s = jax.nn.sigmoid(z)
    return jnp.eye(c, dtype=z.dtype) * jnp.sqrt(s * (1.0 - s))[..., None, :]
  if loss.name == "squared_error":
    return jnp.broadcast_to(jnp.eye(c, dtype=z.dtype), z.shape + (c,))
  raise ValueError(f"No Hessian square root for loss {loss.name!r}.")


def diag_gn(fn: Callable[[PyTree, Array], Array], params: PyTree, x: Array, y: Array,
            loss: Loss) -> PyTree:
  """Exact diagonal of ``(1/n) Σ_n J_nᵀ H_n J_n`` for ``z_n = fn(params, x_n)`` [C].

  Per example and per column ``c`` of ``L_n`` (``H_n = L_n L_nᵀ``), one vjp; squares summed.
  Cost: n·C vjps (vectorised), so meant for small output dimensions.
  """

  def per_example(xi, yi):
    zi, vjp = jax.vjp(lambda p: fn(p, xi), params)
    l = _hessian_sqrt(loss, zi, yi)  # [C, C]
    cols = jax.vmap(lambda col: vjp(col)[0])(l.T)  # [C, ...params]
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), cols)

  diag = jax.vmap(per_example)(x, y)
  return jax.tree.map(lambda d: jnp.mean(d, axis=0), diag)
