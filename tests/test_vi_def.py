"""Gaussian DEFs: exact posterior, CAVI variants and the forest mixture bound (arXiv:1805.06951).

Oracles are independent of the library: the posterior comes from conditioning the joint Gaussian
of (z, x) built by ancestral propagation of the noises, the ELBO from ``log p(x) - KL(q || post)``
with scipy, and every method's iterate from a naive dense numpy loop on the precision matrix.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from growjax import vi


# ------------------------------------------------------------------------------------------------
# Oracles.


def random_model(rng, sizes, *, scale=0.8, zero_frac=0.3, sparse=False):
  """A random Gaussian DEF with layer sizes (n_0, ..., n_L) and some zero weights."""
  weights = []
  for l in range(len(sizes) - 1):
    w = rng.normal(size=(sizes[l], sizes[l + 1])) * scale
    w[rng.random(w.shape) < zero_frac] = 0.0
    weights.append(w)
  variances = [rng.uniform(0.3, 2.0, size=n) for n in sizes]
  biases = [rng.normal(size=n) for n in sizes]
  x = rng.normal(size=sizes[0])
  model = vi.gaussian_def(x, weights, biases=biases, variances=variances, dtype=jnp.float64)
  return vi.to_sparse(model) if sparse else model


def dense_layers(model):
  return [np.asarray(vi.dense_weight(model, l)) for l in range(model.num_layers)]


def joint_oracle(model):
  """Posterior mean/covariance and log p(x) by conditioning the joint Gaussian of (z, x)."""
  ws = dense_layers(model)
  sizes = model.sizes
  s = [np.asarray(v) for v in model.variances]
  b = [np.asarray(v) for v in model.biases]
  n_noise = sum(sizes)
  noise_off = np.concatenate([[0], np.cumsum(sizes)])
  big_a, mean = [None] * len(sizes), [None] * len(sizes)
  for l in reversed(range(len(sizes))):  # top layer first: y_l = A_l xi + c_l
    own = np.zeros((sizes[l], n_noise))
    own[:, noise_off[l]:noise_off[l + 1]] = np.diag(np.sqrt(s[l]))
    if l == len(sizes) - 1:
      big_a[l], mean[l] = own, b[l]
    else:
      big_a[l], mean[l] = ws[l] @ big_a[l + 1] + own, ws[l] @ mean[l + 1] + b[l]
  a_z, c_z = np.concatenate(big_a[1:]), np.concatenate(mean[1:])
  a_x, c_x = big_a[0], mean[0]
  szz, sxx, szx = a_z @ a_z.T, a_x @ a_x.T, a_z @ a_x.T
  x = np.asarray(model.x)
  gain = np.linalg.solve(sxx, szx.T).T
  post_mean = c_z + gain @ (x - c_x)
  post_cov = szz - gain @ szx.T
  log_px = stats.multivariate_normal(c_x, sxx).logpdf(x)
  return post_mean, post_cov, log_px


def split(model, v):
  off = np.concatenate([[0], np.cumsum(model.sizes[1:])])
  return [v[off[i]:off[i + 1]] for i in range(model.num_layers)]


def flat(parts):
  return np.concatenate([np.asarray(p) for p in parts])


def gauss_seidel(lam, h, m, order):
  """Naive CAVI: maximise the quadratic ELBO over one coordinate at a time, in ``order``."""
  m = m.copy()
  for i in order:
    m[i] += (h[i] - lam[i] @ m) / lam[i, i]
  return m


def layer_parallel(lam, h, m, layer_slices, curvature, line_search=False):
  """Naive layer-wise parallel update: every unit of a layer moves by (h - lam m) / curvature.

  With ``line_search`` the move ``d`` is scaled by the exact maximiser of the quadratic ELBO
  along it, ``g.d / d.Lam_ll.d``.
  """
  m = m.copy()
  for sl in layer_slices:
    g = h[sl] - lam[sl] @ m
    d = g / curvature[sl]
    m[sl] += (g @ d) / (d @ lam[sl, sl] @ d) * d if line_search else d
  return m


def pcg_oracle(lam, h, m, curvature, steps):
  """Naive preconditioned conjugate gradients on the quadratic ELBO (``fm_cg``'s iterates).

  Preconditioner ``diag(curvature)``, Fletcher-Reeves ``beta``, one exact line search over all
  units. Returns the means after each of ``steps`` iterations ``[steps, N]``.
  """
  m, d_prev, rho_prev, out = m.copy(), np.zeros_like(m), 1.0, []
  for _ in range(steps):
    g = h - lam @ m
    z = g / curvature
    rho = g @ z
    d = z + rho / rho_prev * d_prev
    m = m + (g @ d) / (d @ lam @ d) * d
    d_prev, rho_prev = d, rho
    out.append(m.copy())
  return np.stack(out)


def fm_curvature_oracle(model, v):
  """P_i = 1/s_i + sum_c W_ci^2 / (pi_ci s_c), pi_ci = |W_ci| sqrt(v_i) / sum_k |W_ck| sqrt(v_k)."""
  ws = dense_layers(model)
  out = []
  for l in range(1, model.num_layers + 1):
    w, vv = ws[l - 1], np.asarray(v[l - 1])
    p = 1.0 / np.asarray(model.variances[l])
    s_child = np.asarray(model.variances[l - 1])
    for c in range(w.shape[0]):
      u = np.abs(w[c]) * np.sqrt(vv)
      for i in np.flatnonzero(w[c]):
        p[i] += w[c, i] ** 2 / (u[i] / u.sum()) / s_child[c]
    out.append(p)
  return np.concatenate(out)


def posterior_precision(model):
  _, cov, _ = joint_oracle(model)
  lam = np.linalg.inv(cov)
  return lam, lam @ joint_oracle(model)[0]


def star_model(k, a):
  """One observed child, k parents of weight 1, prior variance 1, a = w^2 / s_child."""
  return vi.gaussian_def(np.array([1.0]), [np.ones((1, k))], variances=[1.0 / a, 1.0],
                         dtype=jnp.float64)


@functools.partial(jax.jit, static_argnums=(0, 3))
def run_steps(solver, model, state, n):
  def body(st, _):
    st = solver.step(model, st)
    return st, (flat_j(st.means), vi.state_elbo(model, st))
  return jax.lax.scan(body, state, None, length=n)


def flat_j(parts):
  return jnp.concatenate(parts)


def random_batch(rng, sizes, count):
  """``count`` random models stacked along a leading axis, and random initial means."""
  models = [random_model(rng, sizes, scale=rng.uniform(0.3, 3.0), zero_frac=rng.uniform(0, .6))
            for _ in range(count)]
  batch = jax.tree.map(lambda *a: jnp.asarray(np.stack([np.asarray(b) for b in a])), *models)
  return batch, jnp.asarray(rng.normal(size=(count, sum(sizes[1:]))) * 3.0)


# ------------------------------------------------------------------------------------------------
# Exact posterior and ELBO.


@pytest.mark.parametrize("sparse", [False, True])
def test_exact_posterior_and_elbo_match_joint_gaussian(sparse):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    model = random_model(rng, (7, 5, 4, 3), sparse=sparse)
    mean, cov, log_px = joint_oracle(model)
    lam = np.linalg.inv(cov)
    m = split(model, rng.normal(size=mean.size))
    v = split(model, rng.uniform(0.1, 1.5, size=mean.size))

    @jax.jit
    def library(model, m, v):
      ex = vi.exact_posterior(model)
      return (ex, vi.precision_diag(model), vi.elbo(model, m, v), vi.mean_gradient(model, m),
              vi.elbo(model, ex.means, ex.variances))

    ex, prec, got, grad, best = library(model, m, v)
    np.testing.assert_allclose(flat(ex.means), mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(ex.covariance), cov, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(flat(ex.variances), 1.0 / np.diag(lam), rtol=1e-9)
    np.testing.assert_allclose(flat(prec), np.diag(lam), rtol=1e-9)
    # ELBO = log p(x) - KL(q || p(z | x)) for an arbitrary mean-field q.
    d = flat(m) - mean
    kl = 0.5 * (np.sum(lam.diagonal() * flat(v)) + d @ lam @ d - mean.size
                - np.sum(np.log(flat(v))) - np.linalg.slogdet(lam)[1])
    np.testing.assert_allclose(float(got), log_px - kl, rtol=1e-10)
    # The gradient in the means is h - Lam m.
    np.testing.assert_allclose(flat(grad), lam @ (mean - flat(m)), rtol=1e-8, atol=1e-10)
    # The mean-field optimum lies below log p(x) and above any other mean-field q.
    assert float(best) <= log_px and float(best) >= float(got)


# ------------------------------------------------------------------------------------------------
# Each method's iterate against a naive dense loop.


@pytest.mark.parametrize("sparse", [False, True])
def test_one_iteration_of_each_method_matches_naive_dense_loop(sparse):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    model = random_model(rng, (8, 6, 4), sparse=sparse)
    lam, h = posterior_precision(model)
    sizes = model.sizes[1:]
    off = np.concatenate([[0], np.cumsum(sizes)])
    slices = [slice(off[i], off[i + 1]) for i in range(len(sizes))]
    m0 = rng.normal(size=off[-1])
    for method in vi.METHODS:
      solver = vi.make_solver(method, model)
      state = solver.init(model, means=split(model, m0))
      new = jax.jit(solver.step)(model, state)
      if method == "sequential":
        want = gauss_seidel(lam, h, m0, range(off[-1]))
      elif method == "block":
        order = [off[l] + i for l, blocks in enumerate(vi.color_blocks(model))
                 for row in blocks for i in row if i >= 0]
        want = gauss_seidel(lam, h, m0, order)
      elif method == "parallel":
        want = layer_parallel(lam, h, m0, slices, np.diag(lam))
      elif method == "fm_cg":  # one joint step over all layers, not a bottom-up sweep
        v_opt = split(model, 1.0 / np.diag(lam))
        want = pcg_oracle(lam, h, m0, fm_curvature_oracle(model, v_opt), 1)[0]
      else:
        v_opt = split(model, 1.0 / np.diag(lam))
        want = layer_parallel(lam, h, m0, slices, fm_curvature_oracle(model, v_opt),
                              line_search=method == "fm_ls")
      np.testing.assert_allclose(flat(new.means), want, rtol=1e-9, atol=1e-11, err_msg=method)
      np.testing.assert_allclose(flat(new.variances), 1.0 / np.diag(lam), rtol=1e-10)
      # The cached residuals stay consistent with the means.
      for r_got, r_want in zip(new.residuals, vi.residuals(model, new.means)):
        np.testing.assert_allclose(r_got, r_want, atol=1e-10)


def test_color_blocks_are_proper_and_cover_every_unit():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    model = random_model(rng, (30, 20, 10), zero_frac=0.8)
  ws = dense_layers(model)
  for l, blocks in enumerate(vi.color_blocks(model)):
    units = sorted(int(i) for i in blocks.reshape(-1) if i >= 0)
    assert units == list(range(model.sizes[l + 1]))
    share_child = (ws[l] != 0).T.astype(int) @ (ws[l] != 0).astype(int)  # co-parent counts
    for row in blocks:
      members = [int(i) for i in row if i >= 0]
      sub = share_child[np.ix_(members, members)]
      assert np.all(sub[~np.eye(len(members), dtype=bool)] == 0)


# ------------------------------------------------------------------------------------------------
# Convergence to the exact posterior means.


def test_all_convergent_methods_reach_exact_posterior_means():
  # Sparse form (the benchmark's); each step equals the dense form's by the test above.
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    model = random_model(rng, (9, 6, 4), scale=0.5, sparse=True)
    mean, cov, _ = joint_oracle(model)
    lam = np.linalg.inv(cov)
    # Jacobi converges iff 2 diag(Lam) - Lam restricted to each layer is PD; it is for this model.
    off = np.concatenate([[0], np.cumsum(model.sizes[1:])])
    for i in range(model.num_layers):
      blk = lam[off[i]:off[i + 1], off[i]:off[i + 1]]
      assert np.linalg.eigvalsh(2 * np.diag(np.diag(blk)) - blk).min() > 0
    for method in vi.METHODS:
      solver = vi.make_solver(method, model)
      run = jax.jit(functools.partial(vi.solve, solver, max_iters=4000, tol=1e-12,
                                      criterion="means"))
      state, info = run(model)
      assert bool(info.converged) and not bool(info.diverged), method
      np.testing.assert_allclose(flat(state.means), mean, atol=1e-9, err_msg=method)
      np.testing.assert_allclose(flat(state.variances), 1.0 / np.diag(lam), rtol=1e-10)
      trace = np.asarray(info.elbo)[:int(info.iterations) + 1]
      assert np.all(np.diff(trace) >= -1e-10 * np.abs(trace[1:])), method


# ------------------------------------------------------------------------------------------------
# The FM bound: a lower bound, maximised per layer, monotone over 1,000 random instances.


def test_fm_bound_is_a_lower_bound_tight_in_the_means_and_maximised_by_the_step():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    model = random_model(rng, (8, 5))
    solver = vi.forest_mixture()
    m0 = split(model, rng.normal(size=5))
    state = solver.init(model, means=m0)
    v = state.variances
    v_opt = tuple(1.0 / p for p in state.precision)
    points = rng.normal(size=(50, 5)), rng.uniform(0.1, 2, size=(50, 5))
    for mixture in vi.MIXTURES:  # the bound lies below the ELBO for any point, anchor, mixture
      gap = jax.jit(jax.vmap(lambda m, vv: vi.elbo(model, (m,), (vv,)) - vi.fm_bound(
          model, (m,), (vv,), m0, v_opt, mixture=mixture)))(*points)
      assert np.all(np.asarray(gap) >= -1e-10)
    # Tight bias split: at the anchor the bound differs from the ELBO only in variance terms,
    # which vanish for a forest; here check the mean part via the gradient at the anchor.
    bound_grad = jax.jit(jax.grad(lambda mm: vi.fm_bound(model, (mm,), v, m0, v_opt)))
    np.testing.assert_allclose(bound_grad(jnp.asarray(m0[0])), vi.mean_gradient(model, m0)[0],
                               atol=1e-10)
    # One FM step lands on the stationary point of the bound anchored at the old means.
    new = jax.jit(solver.step)(model, state)
    np.testing.assert_allclose(bound_grad(new.means[0]), 0.0, atol=1e-10)


def test_fm_objective_never_decreases_over_1000_random_instances():
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    batch, means0 = random_batch(rng, (6, 4, 3), 1000)
    solver = vi.forest_mixture()

    def one(model, m0):
      state = solver.init(model, means=split(model, m0))
      v_opt = tuple(1.0 / p for p in state.precision)

      def body(st, _):
        new = solver.step(model, st)
        # The bound anchored at the current means, before and after the step.
        before = vi.fm_bound(model, st.means, v_opt, st.means, v_opt)
        after = vi.fm_bound(model, new.means, v_opt, st.means, v_opt)
        return new, (vi.state_elbo(model, new), before, after)

      _, (elbos, before, after) = jax.lax.scan(body, state, None, length=15)
      return jnp.concatenate([vi.state_elbo(model, state)[None], elbos]), before, after

    elbos, before, after = jax.jit(jax.vmap(one))(batch, means0)
    elbos, before, after = np.asarray(elbos), np.asarray(before), np.asarray(after)
    assert np.all(np.isfinite(elbos))
    assert np.all(np.diff(elbos, axis=1) >= -1e-9 * np.abs(elbos[:, 1:]))
    assert np.all(after >= before - 1e-9 * np.abs(before))
    assert np.all(after <= elbos[:, 1:] + 1e-9 * np.abs(elbos[:, 1:]))
    # ... and it makes real progress, it does not just stand still.
    assert np.median(elbos[:, -1] - elbos[:, 1]) > 1e-3


def test_fm_line_search_is_monotone_and_beats_the_plain_fm_step():
  with jax.enable_x64(True):
    rng = np.random.default_rng(15)
    plain, searched = vi.forest_mixture(), vi.forest_mixture(line_search=True)

    def elbos(solver, model, m0, steps):
      state = solver.init(model, means=split(model, m0))

      def body(st, _):
        new = solver.step(model, st)
        return new, vi.state_elbo(model, new)

      _, out = jax.lax.scan(body, state, None, length=steps)
      return jnp.concatenate([vi.state_elbo(model, state)[None], out])

    # Deep models: the ELBO never decreases along the line-searched sweeps.
    batch, m0 = random_batch(rng, (6, 4, 3), 300)
    trace = np.asarray(jax.jit(jax.vmap(lambda m, x: elbos(searched, m, x, 10)))(batch, m0))
    assert np.all(np.isfinite(trace))
    assert np.all(np.diff(trace, axis=1) >= -1e-9 * np.abs(trace[:, 1:]))
    # One latent layer: the searched step maximises the ELBO along the FM step, so from the same
    # point it is never worse than the FM step (alpha = 1), and strictly better somewhere.
    batch, m0 = random_batch(rng, (6, 4), 300)
    one = jax.jit(jax.vmap(lambda m, x: jnp.stack([elbos(plain, m, x, 1)[1],
                                                   elbos(searched, m, x, 1)[1]])))(batch, m0)
    one = np.asarray(one)
    assert np.all(one[:, 1] >= one[:, 0] - 1e-9 * np.abs(one[:, 0]))
    assert np.mean(one[:, 1] > one[:, 0] + 1e-6 * np.abs(one[:, 0])) > 0.5
    # Fewer iterations to the same tolerance on a model with comparable parents.
    model = vi.forest_like_model(0.5, num_children=200, num_parents=100, seed=2,
                                 dtype=jnp.float64)
    iters = {}
    for name, solver in (("fm", plain), ("fm_ls", searched)):
      _, info = jax.jit(functools.partial(vi.solve, solver, max_iters=2000, tol=1e-10))(model)
      assert bool(info.converged), name
      iters[name] = int(info.iterations)
    assert iters["fm_ls"] < 0.6 * iters["fm"], iters


def test_fm_cg_is_monotone_follows_pcg_and_beats_fm_ls():
  with jax.enable_x64(True):
    rng = np.random.default_rng(16)
    cg = vi.make_solver("fm_cg")

    def elbos(model, m0):
      state = cg.init(model, means=split(model, m0))

      def body(st, _):
        new = cg.step(model, st)
        return new, vi.state_elbo(model, new)

      _, out = jax.lax.scan(body, state, None, length=12)
      return jnp.concatenate([vi.state_elbo(model, state)[None], out])

    # 200 random deep models (weights of every scale, many zeros), random starts: the ELBO never
    # decreases, and it reaches the exact optimum (3 + 4 = 7 latent units: PCG's finite
    # termination, up to rounding, within 12 iterations).
    batch, m0 = random_batch(rng, (6, 4, 3), 200)

    def one(model, m):
      ex = vi.exact_posterior(model)
      return elbos(model, m), vi.elbo(model, ex.means, ex.variances)

    trace, best = (np.asarray(a) for a in jax.jit(jax.vmap(one))(batch, m0))
    assert np.all(np.isfinite(trace))
    assert np.all(np.diff(trace, axis=1) >= -1e-9 * np.abs(trace[:, 1:]))
    np.testing.assert_allclose(trace[:, -1], best, rtol=1e-9)
    # Several iterations against the naive dense PCG (Fletcher-Reeves, preconditioner P).
    model = random_model(rng, (8, 6, 4), sparse=True)
    lam, h = posterior_precision(model)
    m_init = rng.normal(size=10)
    curv = fm_curvature_oracle(model, split(model, 1.0 / np.diag(lam)))
    _, (traj, _) = run_steps(cg, model, cg.init(model, means=split(model, m_init)), 4)
    np.testing.assert_allclose(np.asarray(traj), pcg_oracle(lam, h, m_init, curv, 4),
                               rtol=1e-8, atol=1e-10)
    # Fewer iterations than fm_ls to the same tolerance where parents are comparable.
    model = vi.forest_like_model(0.5, num_children=200, num_parents=100, seed=2,
                                 dtype=jnp.float64)
    iters = {}
    for name in ("fm_ls", "fm_cg"):
      _, info = jax.jit(functools.partial(vi.solve, vi.make_solver(name), max_iters=2000,
                                          tol=1e-10))(model)
      assert bool(info.converged) and not bool(info.diverged), name
      iters[name] = int(info.iterations)
    assert iters["fm_cg"] < 0.7 * iters["fm_ls"], iters


# ------------------------------------------------------------------------------------------------
# Forests.


@pytest.mark.parametrize("method", ["fm", "fm_ls", "fm_cg"])
@pytest.mark.parametrize("sparse", [False, True])
def test_fm_solves_a_forest_in_one_iteration(sparse, method):
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    n_x, n_z = 12, 5
    w = np.zeros((n_x, n_z))
    w[np.arange(n_x), rng.integers(0, n_z, n_x)] = rng.normal(size=n_x) * 2.0
    model = vi.gaussian_def(rng.normal(size=n_x), [w], variances=[0.3, 1.5],
                            biases=[0.2, rng.normal(size=n_z)], dtype=jnp.float64)
    model = vi.to_sparse(model) if sparse else model
    mean, _, _ = joint_oracle(model)
    assert float(vi.forest_likeness(model)) == pytest.approx(1.0)
    solver = vi.make_solver(method)
    state = solver.step(model, solver.init(model, means=split(model, rng.normal(size=n_z))))
    np.testing.assert_allclose(flat(state.means), mean, atol=1e-12)
    assert vi.color_blocks(model)[0].shape[0] == 1  # no co-parents: a single block


def test_deep_forest_all_methods_coincide():
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    sizes = (10, 6, 3)
    weights = []
    for l in range(2):
      w = np.zeros((sizes[l], sizes[l + 1]))
      w[np.arange(sizes[l]), rng.integers(0, sizes[l + 1], sizes[l])] = rng.normal(size=sizes[l])
      weights.append(w)
    model = vi.gaussian_def(rng.normal(size=10), weights, variances=0.5, dtype=jnp.float64)
    m0 = split(model, rng.normal(size=9))
    results = {}
    for method in vi.METHODS:
      solver = vi.make_solver(method, model)
      _, (traj, _) = run_steps(solver, model, solver.init(model, means=m0), 5)
      results[method] = np.asarray(traj)
    # Layer-by-layer sweeps are exact block coordinate ascent on a forest: the same iterates.
    # fm_cg moves all layers at once (not a sweep), so only its limit is the same.
    for method in set(vi.METHODS) - {"fm_cg"}:
      np.testing.assert_allclose(results[method], results["sequential"], atol=1e-12)
    solver = vi.make_solver("fm_cg")
    _, (traj, _) = run_steps(solver, model, solver.init(model, means=m0), 40)
    np.testing.assert_allclose(np.asarray(traj)[-1], flat(vi.exact_posterior(model).means),
                               atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Star model: contraction factors measured from the iterates equal theory.


@functools.partial(jax.jit, static_argnums=0)
def star_solve(solver, model, state):
  return vi.solve(solver, model, max_iters=500, tol=1e-10, state=state)


SOLVERS = {"parallel": vi.parallel_cavi(), "fm": vi.forest_mixture(),
           "fm_cg": vi.make_solver("fm_cg")}


@pytest.mark.parametrize("k,a", [(4, 1.0), (4, 0.2), (3, 0.5), (6, 0.4)])
def test_star_contraction_factors_equal_theory(k, a):
  with jax.enable_x64(True):
    model = star_model(k, a)
    m0 = split(model, np.random.default_rng(8).normal(size=k))
    theory = {"parallel": a * (k - 1) / (1 + a), "fm": a * k / (1 + a * k)}  # fm_cg: below
    for method, want in theory.items():
      solver = SOLVERS[method]
      _, (traj, _) = run_steps(solver, model, solver.init(model, means=m0), 31)
      # Late enough for the dominant eigenvalue to rule, early enough to stay above roundoff.
      steps = np.linalg.norm(np.diff(np.asarray(traj), axis=0), axis=1)
      measured = steps[-1] / steps[-2]
      assert measured == pytest.approx(want, rel=1e-6), method
    diverges = (k - 2) * a > 1
    _, info = star_solve(SOLVERS["parallel"], model, SOLVERS["parallel"].init(model, means=m0))
    assert bool(info.diverged) == diverges and bool(info.converged) == (not diverges)
    _, info = star_solve(SOLVERS["fm"], model, SOLVERS["fm"].init(model, means=m0))
    assert bool(info.converged) and not bool(info.diverged)
    # fm_cg: P is a multiple of I here and Lam = I + a 11^T has two eigenvalues, so PCG is
    # exact in two iterations (the third sees no change), diverging Jacobi or not.
    state, info = star_solve(SOLVERS["fm_cg"], model, SOLVERS["fm_cg"].init(model, means=m0))
    assert bool(info.converged) and not bool(info.diverged) and int(info.iterations) <= 3
    np.testing.assert_allclose(flat(state.means), joint_oracle(model)[0], atol=1e-12)
    pi = np.asarray(vi.mixture_weights(model, (jnp.ones(k, jnp.float64),))[0])
    np.testing.assert_allclose(pi, 1.0 / k)
    assert float(vi.forest_likeness(model)) == pytest.approx(1.0 / k)


def test_forest_likeness_orders_models_by_weak_parent_scale():
  with jax.enable_x64(True):
    rng = np.random.default_rng(9)
    parents = np.stack([rng.permutation(20)[:4] for _ in range(40)])
    base = rng.normal(size=(40, 4))
    scores = []
    for eps in (0.0, 0.05, 0.2, 1.0):
      w = base * np.array([1.0, eps, eps, eps])
      model = vi.gaussian_def(rng.normal(size=40), [w], parents=[parents], num_units=[20],
                              dtype=jnp.float64)
      scores.append(float(vi.forest_likeness(model)))
    assert scores[0] == pytest.approx(1.0)
    assert all(s0 > s1 for s0, s1 in zip(scores, scores[1:]))


# ------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises_clear_errors():
  x, w = np.zeros(4), [np.ones((4, 3)), np.ones((3, 2))]
  with pytest.raises(ValueError, match="variances.*> 0"):
    vi.gaussian_def(x, w, variances=0.0)
  with pytest.raises(ValueError, match="variances\\[1\\].*> 0"):
    vi.gaussian_def(x, w, variances=[1.0, np.array([1.0, -1.0, 1.0]), 1.0])
  with pytest.raises(ValueError, match="variances.*> 0"):
    vi.gaussian_def(x, w, variances=[1.0, 1.0, np.nan])
  with pytest.raises(ValueError, match="do not chain"):
    vi.gaussian_def(x, [np.ones((4, 3)), np.ones((5, 2))])
  with pytest.raises(ValueError, match="do not chain"):
    vi.gaussian_def(x, [np.ones((5, 3))])
  with pytest.raises(ValueError, match="one entry per layer"):
    vi.gaussian_def(x, w, variances=[1.0, 1.0])
  with pytest.raises(ValueError, match="indices must lie"):
    vi.gaussian_def(x, [np.ones((4, 2))], parents=[np.array([[0, 5]] * 4)], num_units=[3])
  with pytest.raises(ValueError, match="twice"):
    vi.gaussian_def(x, [np.ones((4, 2))], parents=[np.array([[1, 1]] * 4)], num_units=[3])
  with pytest.raises(ValueError, match="num_units"):
    vi.gaussian_def(x, [np.ones((4, 2))], parents=[np.array([[0, 1]] * 4)])
  model = vi.gaussian_def(x, w)
  with pytest.raises(ValueError, match="unknown method 'cavi'.*sequential"):
    vi.make_solver("cavi", model)
  with pytest.raises(ValueError, match="unknown mixture"):
    vi.forest_mixture(mixture="max")
  with pytest.raises(ValueError, match="needs line_search=True"):
    vi.forest_mixture(conjugate=True)
  with pytest.raises(ValueError, match="CGMemory"):  # a state without fm_cg's memory
    cg = vi.make_solver("fm_cg")
    cg.step(model, cg.init(model)._replace(memory=None))
  with pytest.raises(ValueError, match="unknown criterion"):
    vi.solve(vi.forest_mixture(), model, criterion="kl")
  with pytest.raises(ValueError, match="needs the model"):
    vi.make_solver("block")


# ------------------------------------------------------------------------------------------------
# The experiment.


@pytest.mark.slow
def test_fm_bound_experiment_quick(tmp_path):
  from experiments.configs import fm_bound as fm_config
  from experiments import fm_bound
  from growjax.train.metrics import read_jsonl

  summary = fm_bound.run(fm_config.get_config("quick"), str(tmp_path))
  records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "method" in r]
  assert {(r["eps"], r["method"]) for r in records} == {
      (e, m) for e in (0.0, 1.0) for m in vi.METHODS}
  by = {(r["eps"], r["method"]): r for r in records}
  for m in ("sequential", "fm", "block"):  # convergent methods reach the exact optimum
    assert by[(1.0, m)]["converged"] and by[(1.0, m)]["gap_iterations"] is not None
  assert by[(0.0, "fm")]["gap_iterations"] == 1  # a forest: one FM iteration
  assert by[(1.0, "parallel")]["diverged"]  # (k - 2) a > 1 for these children
  assert by[(0.0, "fm")]["forest_likeness"] == 1.0 > by[(1.0, "fm")]["forest_likeness"]
  assert by[(1.0, "fm")]["iterations"] > by[(0.0, "fm")]["iterations"]
  assert (tmp_path / "fm_bound.png").stat().st_size > 10_000
  assert summary["parallel_diverged"] == {0.0: False, 1.0: True}


# ------------------------------------------------------------------------------------------------
# Speed-related internals: compact slot layout, transposed products, default init.


def test_sparse_layout_drops_zero_slots_and_keeps_the_products():
  with jax.enable_x64(True):
    rng = np.random.default_rng(11)
    # A forest stored with 5 slots per child (4 explicit zeros) is one slot wide.
    forest = vi.forest_like_model(0.0, num_children=30, num_parents=12, seed=3,
                                  dtype=jnp.float64)
    assert forest.layout[0].parents_t.shape == (1, 30)
    assert forest.parents[0].shape == (30, 5)  # the user-facing arrays are kept as given
    # Zeros scattered over the slots: width = the most nonzeros of any child; products exact.
    parents = np.stack([rng.permutation(9)[:4] for _ in range(7)])
    weights = rng.normal(size=(7, 4))
    weights[rng.random((7, 4)) < 0.5] = 0.0
    weights[0, :2] = 0.0
    model = vi.gaussian_def(rng.normal(size=7), [weights], parents=[parents], num_units=[9],
                            dtype=jnp.float64)
    width = int((weights != 0).sum(axis=1).max())
    assert model.layout[0].parents_t.shape == (max(width, 1), 7)
    dense = np.zeros((7, 9))
    dense[np.arange(7)[:, None], parents] = weights
    m = rng.normal(size=9)
    # ``mean_gradient`` at z = m is -m (unit prior) + W^T (x - W m): both products at once.
    x = np.asarray(model.x)
    np.testing.assert_allclose(np.asarray(vi.mean_gradient(model, (jnp.asarray(m),))[0]),
                               -m + dense.T @ (x - dense @ m), atol=1e-12)
    np.testing.assert_allclose(flat(vi.exact_posterior(model).means),
                               joint_oracle(model)[0], atol=1e-10)
    # Both forms of the transposed product (gather over parent -> child slots, scatter over
    # child -> parent slots) give W^T r; the solvers pick one by the padding.
    from growjax.vi import deep_exponential as de  # internal: the two sparse kernels
    lay, r = model.layout[0], rng.normal(size=7)
    np.testing.assert_allclose(np.asarray(de._bucket_gather_sum(lay, lay.child_weights_t,
                                                                jnp.asarray(r))), dense.T @ r,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(de._scatter_sum(lay.weights_t * jnp.asarray(r)[None],
                                                          lay.parents_t, 9)), dense.T @ r,
                               atol=1e-12)
    dense_5 = vi.forest_like_model(1.0, num_children=200, num_parents=100, dtype=jnp.float64)
    assert de._gather_transposed(dense_5.layout[0])  # 5 parents per child: gather
    assert not de._gather_transposed(forest.layout[0])  # a forest: scatter
    # The default initial state (all means 0) has the residuals of zero means.
    state = vi.forest_mixture().init(model)
    for got, want in zip(state.residuals, vi.residuals(model, (jnp.zeros(9),))):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0)


def test_solve_stopping_rules_reach_the_exact_optimum_on_the_benchmark_model():
  # The benchmark's model family at small size: every convergent method, FM included, stops by
  # its own rule near the exact optimum: relative ELBO change 1e-12 -> relative ELBO gap
  # <= 1e-10; mean change 1e-10 -> means within 1e-6.
  with jax.enable_x64(True):
    for eps in (0.0, 0.05, 1.0):
      model = vi.forest_like_model(eps, num_children=60, num_parents=30, seed=1,
                                   dtype=jnp.float64)
      exact = vi.exact_posterior(model)
      best = float(vi.elbo(model, exact.means, exact.variances))
      for name in ("sequential", "fm", "block"):
        solver = vi.make_solver(name, model)
        state, info = vi.solve(solver, model, max_iters=5000, tol=1e-12)
        assert bool(info.converged) and not bool(info.diverged), (eps, name)
        e_last = float(info.elbo[int(info.iterations)])
        # The ELBO the rule saw is the ELBO of the final state, computed from scratch.
        assert e_last == pytest.approx(float(vi.elbo(model, state.means, state.variances)),
                                       rel=1e-12)
        assert (best - e_last) / abs(best) <= 1e-10, (eps, name)
        state, info = vi.solve(solver, model, max_iters=5000, tol=1e-10, criterion="means")
        assert bool(info.converged), (eps, name)
        np.testing.assert_allclose(flat(state.means), flat(exact.means), atol=1e-6,
                                   err_msg=f"{eps} {name}")


def test_degree_bucketed_sequential_cavi_is_exact_coordinate_ascent():
  from growjax.vi.deep_exponential import degree_buckets  # not re-exported by growjax.vi
  with jax.enable_x64(True):
    rng = np.random.default_rng(13)
    model = random_model(rng, (9, 7, 4), sparse=True)
    lam, h = posterior_precision(model)
    buckets = degree_buckets(model, 3)
    offsets = np.concatenate([[0], np.cumsum(model.sizes[1:])])
    order = []
    for groups, n, off in zip(buckets, model.sizes[1:], offsets):
      units = np.concatenate([g[0] for g in groups])
      assert sorted(units.tolist()) == list(range(n))  # a partition of the layer
      degrees = [int((np.asarray(g[2]) != 0).sum(axis=1).max()) for g in groups]
      assert degrees == sorted(degrees, reverse=True)  # most children first
      order.extend(off + units)
    # One sweep is Gauss-Seidel on the precision matrix in the bucket order, layer by layer.
    m0 = rng.normal(size=offsets[-1])
    solver = vi.sequential_cavi(unroll=1, buckets=buckets)
    state = jax.jit(solver.step)(model, solver.init(model, means=split(model, m0)))
    np.testing.assert_allclose(flat(state.means), gauss_seidel(lam, h, m0, order), rtol=1e-9,
                               atol=1e-11)
    for r_got, r_want in zip(state.residuals, vi.residuals(model, state.means)):
      np.testing.assert_allclose(r_got, r_want, atol=1e-10)
    with pytest.raises(ValueError, match="num_buckets"):
      degree_buckets(model, 0)
    with pytest.raises(ValueError, match="buckets for 1 layers"):
      vi.sequential_cavi(buckets=buckets[:1]).step(model, solver.init(model))


# ------------------------------------------------------------------------------------------------
# Repeated inference: a model prepared once, many observation vectors.


@pytest.mark.parametrize("sparse", [False, True])
def test_prepared_solves_equal_unprepared_ones_and_reach_the_exact_means(sparse):
  from growjax.vi.deep_exponential import degree_buckets  # not re-exported by growjax.vi
  with jax.enable_x64(True):
    rng = np.random.default_rng(21)
    model = random_model(rng, (9, 6, 4), scale=0.5, sparse=sparse)
    xs = rng.normal(size=(3, 9)) * 2.0
    solvers = {k: vi.make_solver(k, model) for k in vi.METHODS}
    if sparse:
      solvers["sequential_buckets"] = vi.sequential_cavi(unroll=2,
                                                         buckets=degree_buckets(model, 2))
    for name, solver in solvers.items():
      prepared = jax.jit(solver.prepare)(model)  # model-only: x plays no part
      kw = dict(max_iters=4000, tol=1e-12, criterion="means")
      plain = jax.jit(lambda m, s=solver: vi.solve(s, m, **kw)[0].means)
      prep = jax.jit(lambda m, p, s=solver: vi.solve(s, m, prepared=p, **kw)[0].means)
      batched = jax.jit(jax.vmap(lambda x, p, s=solver: vi.solve(
          s, model._replace(x=x), prepared=p, **kw)[0].means, in_axes=(0, None)))
      got_batch = batched(jnp.asarray(xs), prepared)
      for i, x in enumerate(xs):
        model_x = model._replace(x=jnp.asarray(x))
        want = flat(plain(model_x))
        np.testing.assert_allclose(flat(prep(model_x, prepared)), want, rtol=0, atol=1e-10,
                                   err_msg=name)
        np.testing.assert_allclose(flat([b[i] for b in got_batch]), want, rtol=0, atol=1e-10,
                                   err_msg=name)
        # Independent oracle: conditioning the joint Gaussian with this x.
        np.testing.assert_allclose(want, joint_oracle(model_x)[0], atol=1e-9, err_msg=name)
      # The prepared quantities are the model's: Lam, 1/Lam, the method's divisor.
      lam = np.diag(posterior_precision(model)[0])
      np.testing.assert_allclose(flat(prepared.precision), lam, rtol=1e-9)
      np.testing.assert_allclose(flat(prepared.variances), 1.0 / lam, rtol=1e-9)
      if name == "fm":
        np.testing.assert_allclose(flat(prepared.curvature),
                                   fm_curvature_oracle(model, split(model, 1.0 / lam)),
                                   rtol=1e-9)
      # The ELBO a solve tracks equals the ELBO from scratch.
      state, info = vi.solve(solver, model, max_iters=50, tol=-1.0, prepared=prepared)
      assert float(info.elbo[50]) == pytest.approx(
          float(vi.elbo(model, state.means, state.variances)), rel=1e-12)
      assert float(info.elbo[0]) == pytest.approx(
          float(vi.elbo(model, [jnp.zeros(n) for n in model.sizes[1:]], state.variances)),
          rel=1e-12)


def test_prepared_from_another_solver_or_with_a_state_is_rejected():
  with jax.enable_x64(True):
    model = random_model(np.random.default_rng(22), (6, 4), sparse=True)
    fm, seq = vi.forest_mixture(), vi.sequential_cavi()
    with pytest.raises(ValueError, match="built by solver 'sequential'"):
      vi.solve(fm, model, prepared=seq.prepare(model))
    with pytest.raises(ValueError, match="built by solver 'fm"):
      vi.solve(vi.forest_mixture(mixture="abs_w"), model, prepared=fm.prepare(model))
    with pytest.raises(ValueError, match="both state and prepared"):
      vi.solve(fm, model, state=fm.init(model), prepared=fm.prepare(model))
    with pytest.raises(ValueError, match="DEFPrepared"):
      fm.init(model, prepared=fm.prepare(model).precision)


def test_fused_preparation_matches_the_precision_and_curvature_oracles():
  """The parallel methods read Lam and P off their update coefficients (one gather of 1/s_c);
  every layout (dense, sparse gathered / scattered, forest) and mixture rule against the dense
  oracle, and the ELBO offset's grouped log-sum against numpy."""
  from growjax.vi.deep_exponential import _gather_transposed, _sum_log
  with jax.enable_x64(True):
    rng = np.random.default_rng(31)
    models = {"dense": random_model(rng, (7, 5, 3)),
              "sparse": random_model(rng, (7, 5, 3), sparse=True),
              "gathered": vi.forest_like_model(0.3, num_children=60, num_parents=30, seed=1),
              "forest": vi.forest_like_model(0.0, num_children=60, num_parents=30, seed=1)}
    assert _gather_transposed(models["gathered"].layout[0])
    assert models["forest"].layout[0].parents_t.shape[0] == 1
    for name, model in models.items():
      lam = np.diag(posterior_precision(model)[0])
      ws = dense_layers(model)
      for mixture in vi.MIXTURES:
        prepared = jax.jit(vi.forest_mixture(mixture=mixture).prepare)(model)
        np.testing.assert_allclose(flat(prepared.precision), lam, rtol=1e-12, err_msg=name)
        v = split(model, 1.0 / lam)
        want = []
        for l in range(1, model.num_layers + 1):
          w, p = ws[l - 1], 1.0 / np.asarray(model.variances[l])
          s_child = np.asarray(model.variances[l - 1])
          for c in range(w.shape[0]):
            u = {"abs_w_sqrt_v": np.abs(w[c]) * np.sqrt(v[l - 1]), "abs_w": np.abs(w[c]),
                 "uniform": (w[c] != 0).astype(float)}[mixture]
            for i in np.flatnonzero(w[c]):
              p[i] += w[c, i] ** 2 / (u[i] / u.sum()) / s_child[c]
          want.append(p)
        np.testing.assert_allclose(flat(prepared.curvature), flat(want), rtol=1e-12,
                                   err_msg=f"{name} {mixture}")
        if name == "forest":  # pi = 1 on every edge: P = Lam
          np.testing.assert_allclose(flat(prepared.curvature), lam, rtol=1e-12)
      # The prepared ELBO offset: the ELBO from scratch at m = 0 minus its fit term.
      zeros = [jnp.zeros(n) for n in model.sizes[1:]]
      res = vi.residuals(model, zeros)
      fit = sum(float(jnp.sum(jnp.square(r) / s)) for r, s in zip(res, model.variances))
      assert float(prepared.elbo_offset) - 0.5 * fit == pytest.approx(
          float(vi.elbo(model, zeros, prepared.variances)), rel=1e-13)
    # Grouped log-sum: wide ranges, lengths that are not multiples of the group, float32.
    for dtype, rtol in ((np.float64, 1e-13), (np.float32, 1e-5)):
      parts = [np.exp(rng.uniform(-300, 300, 1001)), rng.uniform(1e-3, 1e3, 33),
               np.array([1.0]), np.full(64, 2.0 ** -1000)]
      if dtype == np.float32:
        parts = [np.clip(p, 1e-37, 1e37) for p in parts[:3]]
      want = sum(np.sum(np.log(p.astype(dtype).astype(np.float64))) for p in parts)
      got = float(_sum_log(tuple(jnp.asarray(p, dtype) for p in parts)))
      assert got == pytest.approx(want, rel=rtol, abs=rtol * 10), dtype


def skewed_sparse_model(rng, transposed_buckets, *, num_children=40, num_parents=12):
  """A two-latent-layer sparse model whose parents' numbers of children are skewed: parent 0
  of layer 1 has many children, the last one none."""
  weights, parents = [], []
  sizes = [num_children, num_parents, 5]
  for l in range(2):
    n_child, n_par = sizes[l], sizes[l + 1]
    # Parent p drawn with weight ~ 1/(p+1) (skewed); the last parent is never drawn.
    prob = 1.0 / np.arange(1, n_par)
    prob /= prob.sum()
    k = min(3, n_par - 1)
    pa = np.stack([rng.choice(n_par - 1, size=k, replace=False, p=prob) for _ in range(n_child)])
    w = rng.normal(size=pa.shape) * 0.5
    w[rng.random(w.shape) < 0.2] = 0.0
    weights.append(w)
    parents.append(pa)
  variances = [rng.uniform(0.5, 2.0, size=n) for n in sizes]
  biases = [rng.normal(size=n) for n in sizes]
  return vi.gaussian_def(rng.normal(size=num_children), weights, parents=parents, biases=biases,
                         variances=variances, dtype=jnp.float64,
                         transposed_buckets=transposed_buckets)


def test_degree_bucketed_transposed_products_match_the_dense_products():
  """The transposed product gathered per degree bucket (SparseLayout) gives W^T r, |W|^T r and
  (W^2)^T r to float64 precision for 1-4 buckets on skewed degrees (a parent without
  children included); the prepared Lam / FM curvature and the parallel solves are unchanged."""
  from growjax.vi import deep_exponential as de
  with jax.enable_x64(True):
    degree = np.array([0, 5, 5, 1, 9, 3, 3, 3, 7])
    for b in (1, 2, 3, 5):
      groups = de.transposed_degree_buckets(degree, b)
      assert 1 <= len(groups) <= b
      order = np.concatenate(groups)
      np.testing.assert_array_equal(np.sort(order), np.arange(len(degree)))
      if len(groups) == 1:
        np.testing.assert_array_equal(order, np.arange(len(degree)))  # unit order
      else:
        assert np.all(np.diff(degree[order]) <= 0)  # most children first
      slots = sum(len(g) * max(int(degree[g].max()), 1) for g in groups)
      assert slots <= len(degree) * degree.max()
    # The cuts are optimal: brute force over every split of the sorted degrees in 3 parts.
    srt = np.maximum(np.sort(degree)[::-1], 1)
    best = min(i * srt[0] + (j - i) * srt[i] + (len(srt) - j) * srt[j]
               for i in range(1, len(srt) - 1) for j in range(i + 1, len(srt)))
    groups = de.transposed_degree_buckets(degree, 3)
    assert sum(len(g) * max(int(degree[g].max()), 1) for g in groups) == best == 43

    rng = np.random.default_rng(41)
    r = [rng.normal(size=40), rng.normal(size=12)]
    reference = skewed_sparse_model(np.random.default_rng(5), 1)
    dense = dense_layers(reference)
    assert not np.any(dense[0][:, -1]) and np.count_nonzero(dense[0][:, 0]) > 10
    ref_prep = {m: jax.jit(vi.make_solver(m).prepare)(reference)
                for m in ("fm", "fm_ls", "fm_cg", "parallel")}
    exact = flat(vi.exact_posterior(reference).means)
    for b in (1, 2, 3, 4):
      model = skewed_sparse_model(np.random.default_rng(5), b)
      for l in range(2):
        lay = model.layout[l]
        assert len(lay.children_t) == len(lay.child_weights_t) <= b
        if b > 1:
          assert len(lay.children_t) > 1 and lay.bucket_inverse is not None
        assert de._gather_transposed(lay)
        for got, want in ((de._rmatvec(model, l, jnp.asarray(r[l])), dense[l].T @ r[l]),
                          (de._abs_rmatvec(model, l, jnp.asarray(r[l]), square=False),
                           np.abs(dense[l]).T @ r[l]),
                          (de._abs_rmatvec(model, l, jnp.asarray(r[l]), square=True),
                           np.square(dense[l]).T @ r[l])):
          np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13, atol=1e-13)
      for method, want in ref_prep.items():
        prepared = jax.jit(vi.make_solver(method).prepare)(model)
        for name in ("precision", "curvature"):
          np.testing.assert_allclose(flat(getattr(prepared, name)), flat(getattr(want, name)),
                                     rtol=1e-13, err_msg=f"{b} {method} {name}")
        assert float(prepared.elbo_offset) == pytest.approx(float(want.elbo_offset), rel=1e-14)
      for method in ("fm", "fm_ls", "fm_cg"):
        state, info = vi.solve(vi.make_solver(method), model, tol=1e-14, max_iters=3000)
        assert bool(info.converged) and not bool(info.diverged), (b, method)
        np.testing.assert_allclose(flat(state.means), exact, atol=1e-6, err_msg=f"{b} {method}")


def test_carried_elbo_equals_the_elbo_of_every_iterate():
  """fm_ls, fm_cg and sequential CAVI carry the ELBO by their exact gains (DEFState.elbo); the
  trace must equal the ELBO from scratch at every iterate, and so must the final state's."""
  with jax.enable_x64(True):
    model = random_model(np.random.default_rng(43), (9, 6, 4), sparse=True)
    for method in ("fm_ls", "fm_cg", "sequential", "fm"):
      solver = vi.make_solver(method)
      for k in (1, 2, 5):
        state, info = vi.solve(solver, model, max_iters=8, tol=-1.0, limit=k)
        assert int(info.iterations) == k
        want = float(vi.elbo(model, state.means, state.prepared.variances))
        assert float(info.elbo[k]) == pytest.approx(want, rel=1e-13, abs=1e-12), (method, k)
        assert float(state.elbo) == pytest.approx(want, rel=1e-13, abs=1e-12), (method, k)
        assert np.all(np.diff(np.asarray(info.elbo[:k + 1])) >= -1e-12), method
      # A state built outside solve carries no ELBO; its steps leave it None.
      state = solver.step(model, solver.init(model))
      assert state.elbo is None
