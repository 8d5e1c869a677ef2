"""growjax.curvature against dense oracles: jax.hessian, jax.jacfwd, dense solves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from growjax import curvature, nets, train
from growjax.curvature import gn

LOSSES = ["softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error"]


def _targets(name, n, c, key):
  if name == "softmax_cross_entropy":
    return jax.random.randint(key, (n,), 0, c)
  if name == "sigmoid_cross_entropy":
    return jax.random.bernoulli(key, 0.5, (n, c)).astype(jnp.float32)
  return jax.random.normal(key, (n, c))


@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradients_and_hessians_match_autodiff(name):
  loss = curvature.get_loss(name)
  z = jax.random.normal(jax.random.key(0), (5,))
  y = _targets(name, 1, 5, jax.random.key(1))[0]
  v = jax.random.normal(jax.random.key(2), (5,))
  np.testing.assert_allclose(loss.grad(z, y), jax.grad(loss.value)(z, y), atol=1e-6)
  hess = jax.hessian(loss.value)(z, y)
  np.testing.assert_allclose(loss.hvp(z, y, v), hess @ v, atol=1e-6)
  assert float(jnp.linalg.eigvalsh(hess).min()) >= -1e-6  # PSD


def _tiny_net():
  model = nets.MLP(input_dim=3, widths=(4,), num_outputs=3, activation="tanh")
  params = nets.common.host_init(model, jax.random.key(0))["params"]
  x = jax.random.normal(jax.random.key(1), (6, 3))
  return model, params, x


def _columns(matvec, dim):
  """Dense matrix of a linear map on R^dim (one compiled, vectorised pass over the basis)."""
  return jax.jit(jax.vmap(matvec))(jnp.eye(dim)).T


def _dense_gn(fn, params, loss, y):
  """(1/n) Σ Jᵀ H J from jax.jacfwd and jax.hessian of the loss in output space."""
  flat, unravel = ravel_pytree(params)
  z = fn(params)
  jac = jax.jit(jax.jacfwd(lambda f: fn(unravel(f))))(flat)  # [n, C, P]
  hz = jax.vmap(jax.hessian(loss.value))(z, y)  # [n, C, C]
  return jnp.einsum("ncp,ncd,ndq->pq", jac, hz, jac) / z.shape[0], flat, unravel


@pytest.mark.parametrize("name", LOSSES)
def test_gn_products_equal_dense_jtHj(name):
  model, params, x = _tiny_net()
  loss = curvature.get_loss(name)
  y = _targets(name, 6, 3, jax.random.key(3))
  fn = lambda p: model.apply({"params": p}, x)
  dense, flat, unravel = _dense_gn(fn, params, loss, y)
  lin = curvature.linearize(fn, params)
  cols = _columns(lambda v: ravel_pytree(curvature.gn_matvec(lin, loss, y, unravel(v)))[0],
                  flat.size)
  np.testing.assert_allclose(cols, dense, atol=1e-5)
  np.testing.assert_allclose(cols, cols.T, atol=1e-5)  # symmetric
  assert float(jnp.linalg.eigvalsh(0.5 * (cols + cols.T)).min()) >= -1e-5  # PSD
  grad = ravel_pytree(curvature.gradient(lin, loss, y))[0]
  want = jax.grad(lambda f: jnp.mean(loss.value(fn(unravel(f)), y)))(flat)
  np.testing.assert_allclose(grad, want, atol=1e-6)


def test_gn_equals_hessian_for_squared_error_on_a_linear_net():
  model = nets.MLP(input_dim=3, widths=(4,), num_outputs=2, activation="identity")
  params = nets.common.host_init(model, jax.random.key(0))["params"]
  x = jax.random.normal(jax.random.key(1), (5, 3))
  y = jax.random.normal(jax.random.key(2), (5, 2))
  loss = curvature.squared_error
  flat, unravel = ravel_pytree(params)
  # A linear *network* is bilinear in its weights, so the loss Hessian has a residual term
  # ∝ (z − y); at an interpolating point the residual vanishes and GN = Hessian exactly.
  fn = lambda p: model.apply({"params": p}, x)
  y = fn(params)
  hess = jax.jit(jax.hessian(lambda f: jnp.mean(loss.value(fn(unravel(f)), y))))(flat)
  lin = curvature.linearize(fn, params)
  cols = _columns(lambda v: ravel_pytree(curvature.gn_matvec(lin, loss, y, unravel(v)))[0],
                  flat.size)
  np.testing.assert_allclose(cols, hess, atol=1e-5)
  # And for a model linear in its parameters the two agree at any point.
  w = jax.random.normal(jax.random.key(3), (3, 2))
  y2 = jax.random.normal(jax.random.key(4), (5, 2))
  lin_fn = lambda w: x @ w
  hess2 = jax.hessian(lambda w: jnp.mean(loss.value(lin_fn(w), y2)))(w).reshape(6, 6)
  lin2 = curvature.linearize(lin_fn, w)
  cols2 = _columns(lambda v: curvature.gn_matvec(lin2, loss, y2, v.reshape(3, 2)).ravel(), 6)
  np.testing.assert_allclose(cols2, hess2, atol=1e-5)


def test_cg_equals_dense_solve_on_pytrees():
  rng = np.random.default_rng(0)
  m = rng.standard_normal((7, 7)).astype(np.float32)
  a = jnp.asarray(m @ m.T)
  b = {"u": jnp.asarray(rng.standard_normal(3), jnp.float32),
       "w": jnp.asarray(rng.standard_normal((2, 2)), jnp.float32)}
  flat_b, unravel = ravel_pytree(b)

  def matvec(v):
    return unravel(a @ ravel_pytree(v)[0])

  res = jax.jit(lambda b: curvature.cg_solve(matvec, b, damping=0.1, maxiter=50, tol=1e-5))(b)
  want = jnp.linalg.solve(a + 0.1 * jnp.eye(7), flat_b)
  np.testing.assert_allclose(ravel_pytree(res.x)[0], want, rtol=1e-4, atol=1e-4)
  assert int(res.iterations) <= 7 + 2  # CG terminates in ≤ dim steps (+ float32 round-off)
  warm = curvature.cg_solve(matvec, b, x0=res.x, damping=0.1, maxiter=50, tol=1e-5)
  assert int(warm.iterations) <= 1  # a converged warm start needs (almost) nothing


def test_kfac_closed_form_equals_dense_solve_where_the_factorisation_is_exact():
  """δ = ã Ω with a fixed linear upper map z = δ M and squared error: G = A ⊗ (M Mᵀ) exactly."""
  rng = np.random.default_rng(1)
  n, d, o, c = 40, 3, 4, 5
  a_feat = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  m = jnp.asarray(rng.standard_normal((o, c)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((n, c)), jnp.float32)
  loss = curvature.squared_error
  lam = 0.05
  fn = lambda omega: (a_feat @ omega) @ m
  omega0 = jnp.zeros((d, o))
  lin = curvature.linearize(fn, omega0)
  g = curvature.gradient(lin, loss, y)  # [d, o]
  dense = _columns(lambda v: curvature.gn_matvec(lin, loss, y, v.reshape(d, o)).ravel(), d * o)
  want = -jnp.linalg.solve(dense + lam * jnp.eye(d * o), g.ravel()).reshape(d, o)
  factors = curvature.KFACFactors(a=a_feat.T @ a_feat / n, s=m @ m.T, b=g,
                                  count=jnp.asarray(n, jnp.float32))
  omega, pred = curvature.kfac_solve(factors, lam)
  np.testing.assert_allclose(omega, want, rtol=1e-4, atol=1e-5)
  # Predicted decrease = −(gᵀω + ½ ωᵀ(G + λ)ω) at the optimum.
  q = jnp.vdot(g, omega) + 0.5 * omega.ravel() @ (dense + lam * jnp.eye(d * o)) @ omega.ravel()
  np.testing.assert_allclose(pred, -q, rtol=1e-4)


@pytest.mark.parametrize("name", LOSSES)
def test_diagonal_gn_equals_the_dense_diagonal(name):
  model, params, x = _tiny_net()
  loss = curvature.get_loss(name)
  y = _targets(name, 6, 3, jax.random.key(3))
  dense, _, _ = _dense_gn(lambda p: model.apply({"params": p}, x), params, loss, y)
  diag = curvature.diag_gn(lambda p, xi: model.apply({"params": p}, xi[None])[0], params, x, y,
                           loss)
  np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(dense), rtol=1e-4, atol=1e-6)


def test_gauss_newton_optimizer_solves_least_squares_in_one_step():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
  w_true = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  y = x @ w_true
  tx = optax.chain(curvature.gauss_newton("squared_error", damping=1e-6, cg_iters=30,
                                          tol=1e-8), optax.scale(-1.0))
  params = {"w": jnp.zeros((4, 3))}
  state = tx.init(params)
  fn = lambda p: x @ p["w"]
  grads = jax.grad(lambda p: jnp.mean(curvature.squared_error.value(fn(p), y)))(params)
  updates, state = tx.update(grads, state, params, model_fn=fn, targets=y)
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], w_true, atol=1e-3)
  with pytest.raises(ValueError, match="model_fn"):
    tx.update(grads, state, params)


def test_gauss_newton_trains_through_the_train_step():
  from growjax import data  # pylint: disable=import-outside-toplevel
  d = data.load_digits()
  model = nets.MLP(widths=(16,))
  tx = optax.chain(curvature.gauss_newton("softmax_cross_entropy", damping=1e-2, cg_iters=5),
                   optax.scale(-0.5))
  state = train.create_state(nets.common.host_init(model, jax.random.key(0)), tx)
  step = jax.jit(train.make_train_step(tx), static_argnums=0)
  batch = (d.train.x[:256], d.train.y[:256])
  losses = []
  for _ in range(10):
    state, m = step(model, state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]
