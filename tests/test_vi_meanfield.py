"""Mean-field Gaussian VI over parameter trees, calibration metrics, and the Bayesian-MLP run.

Oracles: conjugate Bayesian linear regression (the mean-field optimum of a Gaussian posterior has
the exact posterior means and variances 1 / Lam_ii), closed-form expected log-likelihoods,
scipy quadrature for the KL, and a plain-Python ECE loop.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate, stats

from growjax import vi

NOISE = 0.5
PRIOR = 1.0


def regression_data(n=40, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3))
  y = x @ np.array([0.7, -1.2, 0.3]) + 0.4 + NOISE * rng.normal(size=n)
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}


def log_likelihood(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  return -0.5 * jnp.square((batch["y"] - pred) / NOISE) - math.log(NOISE * math.sqrt(2 * math.pi))


def exact_posterior(data):
  phi = np.concatenate([np.asarray(data["x"], np.float64), np.ones((len(data["y"]), 1))], 1)
  lam = np.eye(4) / PRIOR**2 + phi.T @ phi / NOISE**2
  mean = np.linalg.solve(lam, phi.T @ np.asarray(data["y"], np.float64) / NOISE**2)
  return phi, lam, mean


PARAMS0 = {"w": jnp.zeros(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def test_recovers_the_mean_field_optimum_of_bayesian_linear_regression():
  data = regression_data()
  _, lam, mean = exact_posterior(data)
  steps = 3000
  # (optax's own schedules mix int and float counts, which strict promotion rejects.)
  opt = optax.adam(lambda count: 0.05 * 1e-3 ** (count.astype(jnp.float32) / steps))
  algo = vi.meanfield_vi(log_likelihood, opt, num_data=40, prior_std=PRIOR, num_samples=16)

  @jax.jit
  def run(key):
    def body(state, k):
      state, info = algo.step(k, state, data)
      return state, info.elbo
    return jax.lax.scan(body, algo.init(PARAMS0), jax.random.split(key, steps))

  state, elbos = run(jax.random.PRNGKey(0))
  got_mean = np.concatenate([np.asarray(state.mean["w"]), np.asarray(state.mean["b"])[None]])
  s = vi.std(state)
  got_std = np.concatenate([np.asarray(s["w"]), np.asarray(s["b"])[None]])
  post_std = np.sqrt(np.diag(lam) ** -1)
  np.testing.assert_allclose(got_mean, mean, atol=0.1 * post_std.min())
  np.testing.assert_allclose(got_std, post_std, rtol=0.05)
  assert float(jnp.mean(elbos[-100:])) > float(jnp.mean(elbos[:100]))


def test_elbo_estimate_is_unbiased_and_minibatches_are_scaled():
  data = regression_data(seed=1)
  phi, _, _ = exact_posterior(data)
  algo = vi.meanfield_vi(log_likelihood, optax.sgd(0.0), num_data=40, prior_std=PRIOR)
  state = algo.init({"w": jnp.array([0.5, -1.0, 0.1]), "b": jnp.array(0.2)})
  state = state._replace(rho=jax.tree.map(lambda r: r + 2.0, state.rho))  # std ~ 2
  infos = jax.jit(jax.vmap(lambda k: algo.step(k, state, data)[1]))(
      jax.random.split(jax.random.PRNGKey(1), 20000))
  m = np.concatenate([np.asarray(state.mean["w"]), [float(state.mean["b"])]]).astype(np.float64)
  s = vi.std(state)
  v = np.concatenate([np.asarray(s["w"]), [float(s["b"])]]).astype(np.float64) ** 2
  y = np.asarray(data["y"], np.float64)
  expected_ll = np.sum(stats.norm(phi @ m, NOISE).logpdf(y) - (phi**2 @ v) / (2 * NOISE**2))
  kl = np.sum(np.log(PRIOR / np.sqrt(v)) + (v + m**2) / (2 * PRIOR**2) - 0.5)
  est = np.asarray(infos.expected_log_likelihood, np.float64)
  assert abs(est.mean() - expected_ll) < 4 * est.std() / math.sqrt(est.size)
  np.testing.assert_allclose(np.asarray(infos.kl[0]), kl, rtol=1e-5)
  # Same key (same sample): the four disjoint minibatches average to the full-batch estimate.
  key, step = jax.random.PRNGKey(2), jax.jit(algo.step)
  full = step(key, state, data)[1].expected_log_likelihood
  parts = [step(key, state, jax.tree.map(lambda a: a[i::4], data))[1].expected_log_likelihood
           for i in range(4)]
  np.testing.assert_allclose(np.mean(parts), full, rtol=1e-5)


def test_gaussian_kl_matches_quadrature_and_accepts_prior_trees():
  rng = np.random.default_rng(3)
  for _ in range(5):
    m, s, pm, ps = rng.normal(), rng.uniform(0.2, 2), rng.normal(), rng.uniform(0.3, 2)
    q, p = stats.norm(m, s), stats.norm(pm, ps)
    want, _ = integrate.quad(lambda t: q.pdf(t) * (q.logpdf(t) - p.logpdf(t)), -40, 40)
    got = vi.gaussian_kl({"a": jnp.array([m])}, {"a": jnp.array([s])}, pm, ps)
    np.testing.assert_allclose(float(got), want, rtol=1e-4)
  tree = {"a": jnp.ones(2), "b": jnp.zeros(())}
  per_leaf = vi.gaussian_kl(tree, jax.tree.map(jnp.ones_like, tree), 0.0, {"a": 2.0, "b": 1.0})
  want = 2 * (math.log(2) + (1 + 1) / 8 - 0.5) + (0.0 + 1 / 2 - 0.5)
  np.testing.assert_allclose(float(per_leaf), want, rtol=1e-6)


def test_sample_has_the_variational_moments_and_keeps_key_paths():
  algo = vi.meanfield_vi(log_likelihood, optax.sgd(0.1), num_data=10, init_std=0.3)
  state = algo.init({"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(3.0)})
  draws = algo.sample(jax.random.PRNGKey(4), state, 20000)
  assert draws["w"].shape == (20000, 3) and draws["b"].shape == (20000,)
  np.testing.assert_allclose(np.mean(draws["w"], 0), [1.0, -2.0, 0.5], atol=0.02)
  np.testing.assert_allclose(np.std(draws["b"]), 0.3, rtol=0.03)
  # The VI state is params-shaped, so growth carries it with transplant like optimizer moments.
  from growjax import tree as gtree
  assert gtree.paths(state.mean) == gtree.paths(state.rho) == ["b", "w"]


def naive_ece(probs, labels, num_bins):
  conf, pred = probs.max(1), probs.argmax(1)
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    sel = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
    if sel.any():
      total += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
  return total


def test_expected_calibration_error_matches_a_naive_loop():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(500, 10)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  labels = rng.integers(0, 10, 500)
  ece = jax.jit(vi.expected_calibration_error, static_argnums=2)
  for bins in (1, 10, 15):
    got = ece(jnp.asarray(probs), jnp.asarray(labels), bins)
    np.testing.assert_allclose(float(got), naive_ece(probs, labels, bins), rtol=1e-5)
  # Perfect calibration: confidence 0.75 and exactly 75% correct.
  probs = np.full((8, 2), 0.25)
  probs[:, 0] = 0.75
  labels = np.array([0, 0, 0, 1, 0, 0, 0, 1])
  assert float(vi.expected_calibration_error(jnp.asarray(probs), jnp.asarray(labels))) < 1e-6


def test_bad_input_raises_clear_errors():
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match="num_data"):
    vi.meanfield_vi(log_likelihood, opt, num_data=0)
  with pytest.raises(ValueError, match="num_samples"):
    vi.meanfield_vi(log_likelihood, opt, num_data=5, num_samples=0)
  with pytest.raises(ValueError, match="init_std"):
    vi.meanfield_vi(log_likelihood, opt, num_data=5, init_std=0.0)
  with pytest.raises(ValueError, match="prior_std"):
    vi.meanfield_vi(log_likelihood, opt, num_data=5, prior_std=-1.0)
  algo = vi.meanfield_vi(lambda p, b: jnp.sum(log_likelihood(p, b)), opt, num_data=40)
  with pytest.raises(ValueError, match="per-example"):
    algo.step(jax.random.PRNGKey(0), algo.init(PARAMS0), regression_data())
  with pytest.raises(ValueError, match="structure"):
    vi.gaussian_kl({"a": jnp.ones(2)}, {"a": jnp.ones(2)}, 0.0, {"b": 1.0})
  with pytest.raises(ValueError, match="probs must be"):
    vi.expected_calibration_error(jnp.ones((3, 2)), jnp.zeros(4, jnp.int32))


@pytest.mark.slow
def test_bayes_mlp_experiment_quick(tmp_path):
  from experiments import bayes_mlp
  from experiments.configs import bayes_mlp as bayes_config
  from growjax.train.metrics import read_jsonl

  summary = bayes_mlp.run(bayes_config.get_config("quick"), str(tmp_path))
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert records[-1]["summary"] and [r["step"] for r in records[:-1]] == [100, 200]
  for name in ("vi", "map"):
    res = summary[name]
    assert res["accuracy"] > 0.7 and 0.0 <= res["ece"] <= 1.0 and res["nll"] > 0
    assert res["entropy_noise"] > res["entropy_correct"]
  assert (tmp_path / "bayes_mlp.png").stat().st_size > 10_000
  # The Mann-Whitney AUROC helper against a direct pair count.
  rng = np.random.default_rng(0)
  neg, pos = rng.integers(0, 5, 30), rng.integers(2, 8, 20)
  want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
  assert bayes_mlp.auroc(neg, pos) == pytest.approx(want)
