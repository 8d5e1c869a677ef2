"""Mean-field Gaussian variational inference over any parameter tree (blackjax/optax style).

``q(theta) = prod_i N(mu_i, sigma_i^2)`` with ``sigma = softplus(rho)`` on every leaf of a
parameter tree; the ELBO ``E_q[log p(D | theta)] - KL(q || p)`` against a Gaussian prior
``p = N(prior_mean, prior_std^2)`` is maximised with the reparameterisation trick
(``theta = mu + sigma * eps``, Kingma & Welling 2014, arXiv:1312.6114; Blundell et al. 2015,
"Weight uncertainty in neural networks", arXiv:1505.05424) and the closed-form Gaussian KL,
by any optax optimizer. Minibatches are scaled by ``num_data / batch_size`` so that each step is
an unbiased estimate of the full-data ELBO gradient.

The variational state's ``mean`` and ``rho`` trees carry the parameters' own key paths, so a
grown network's VI state is carried across growth by ``growjax.tree.transplant`` like any other
params-shaped tree. Part of growjax.vi, whose Gaussian-DEF half follows Lawton, Ver Steeg &
Galstyan (UAI 2018), arXiv:1805.06951 (mean-field Gaussians are exact in their means there).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Array = jax.Array


class MeanFieldState(NamedTuple):
  """State of mean-field VI.

  Attributes:
    mean: tree of variational means (structure of the parameters).
    rho: tree of unconstrained scales; ``std = softplus(rho)``.
    opt_state: optax state over ``(mean, rho)``.
    step: number of steps taken (int scalar).
  """
  mean: PyTree
  rho: PyTree
  opt_state: optax.OptState
  step: Array


class MeanFieldInfo(NamedTuple):
  """Diagnostics of one step (single-sample estimates, full-data scale).

  Attributes:
    elbo: estimate of ``E_q[log p(D | theta)] - KL(q || p)`` before the update.
    expected_log_likelihood: estimate of ``E_q[log p(D | theta)]``.
    kl: ``KL(q || p)`` (exact).
  """
  elbo: Array
  expected_log_likelihood: Array
  kl: Array


class MeanFieldVI(NamedTuple):
  """Mean-field VI as pure functions (build with ``meanfield_vi``).

  Attributes:
    init: ``init(params) -> MeanFieldState``; the means start at ``params``.
    step: ``step(key, state, batch) -> (state, MeanFieldInfo)``.
    sample: ``sample(key, state, num_samples) -> params`` with a leading ``[num_samples]`` axis.
  """
  init: Callable[[PyTree], MeanFieldState]
  step: Callable[[Array, MeanFieldState, Any], tuple[MeanFieldState, MeanFieldInfo]]
  sample: Callable[[Array, MeanFieldState, int], PyTree]


def _softplus_inverse(y: float) -> float:
  return y + math.log(-math.expm1(-y))


def _check_positive(name: str, value) -> None:
  for leaf in jax.tree.leaves(value):
    if not np.all(np.asarray(leaf) > 0):
      raise ValueError(f"{name} must be > 0 everywhere, got {value!r}.")


def _broadcast(value, tree: PyTree, name: str) -> PyTree:
  """A scalar for every leaf, or a tree with the structure of ``tree``."""
  if not isinstance(value, (dict, list, tuple)) and np.ndim(value) == 0:
    if not isinstance(value, jax.Array):
      value = float(value)  # a weakly typed Python scalar follows each leaf's dtype
    return jax.tree.map(lambda _: value, tree)
  if jax.tree.structure(value) != jax.tree.structure(tree):
    raise ValueError(f"{name} must be a scalar or a tree with the parameters' structure "
                     f"{jax.tree.structure(tree)}; got {jax.tree.structure(value)}.")
  return value


def std(state: MeanFieldState) -> PyTree:
  """Tree of variational standard deviations ``softplus(rho)``."""
  return jax.tree.map(jax.nn.softplus, state.rho)


def gaussian_kl(mean: PyTree, std_tree: PyTree, prior_mean: PyTree = 0.0,
                prior_std: PyTree = 1.0) -> Array:
  """``KL(N(mean, std^2) || N(prior_mean, prior_std^2))`` summed over every entry of a tree.

  Args:
    mean, std_tree: trees of the variational means and standard deviations.
    prior_mean, prior_std: scalars or trees with the same structure.

  Returns:
    Scalar ``sum log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2``.
  """
  prior_mean = _broadcast(prior_mean, mean, "prior_mean")
  prior_std = _broadcast(prior_std, mean, "prior_std")

  def leaf_kl(m, s, pm, ps):
    ratio = jnp.square(s / ps)
    return 0.5 * jnp.sum(ratio + jnp.square((m - pm) / ps) - 1.0 - jnp.log(ratio))

  return sum(jax.tree.leaves(jax.tree.map(leaf_kl, mean, std_tree, prior_mean, prior_std)))


def sample_params(key: Array, mean: PyTree, std_tree: PyTree, num_samples: int | None = None
                  ) -> PyTree:
  """Draws ``mean + std * eps`` (one tree, or ``[num_samples, ...]`` leaves)."""
  leaves, treedef = jax.tree.flatten(mean)
  keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
  shape = () if num_samples is None else (num_samples,)

  def draw(k, m, s):
    eps = jax.random.normal(k, shape + jnp.shape(m), jnp.result_type(m))
    return jnp.expand_dims(m, tuple(range(len(shape)))) + jnp.expand_dims(
        s, tuple(range(len(shape)))) * eps

  return jax.tree.map(draw, keys, mean, std_tree)


def meanfield_vi(log_likelihood_fn: Callable[[PyTree, Any], Array],
                 optimizer: optax.GradientTransformation, *, num_data: int,
                 prior_mean: PyTree = 0.0, prior_std: PyTree = 1.0, init_std: float = 1e-2,
                 num_samples: int = 1) -> MeanFieldVI:
  """Builds mean-field Gaussian VI for a parameter tree.

  Args:
    log_likelihood_fn: ``(params, batch) -> [batch]`` per-example log-likelihoods.
    optimizer: optax transformation applied to ``(mean, rho)`` (it minimises the negative ELBO
      per datum, so learning rates do not depend on the dataset size).
    num_data: number of examples in the full dataset (minibatch scaling).
    prior_mean, prior_std: Gaussian prior, scalars or trees with the parameters' structure.
    init_std: initial standard deviation of every entry.
    num_samples: reparameterised samples per step (the likelihood term's Monte Carlo size).

  Returns:
    ``MeanFieldVI(init, step, sample)``.

  Raises:
    ValueError: non-positive ``num_data``/``num_samples``/``init_std``/``prior_std``.
  """
  if int(num_data) <= 0:
    raise ValueError(f"num_data must be a positive example count, got {num_data}.")
  if int(num_samples) < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  if not init_std > 0:
    raise ValueError(f"init_std must be > 0, got {init_std}.")
  _check_positive("prior_std", prior_std)
  rho0 = _softplus_inverse(float(init_std))

  def init(params: PyTree) -> MeanFieldState:
    mean = jax.tree.map(jnp.asarray, params)
    rho = jax.tree.map(lambda p: jnp.full(jnp.shape(p), rho0, jnp.result_type(p)), mean)
    with jax.numpy_dtype_promotion("standard"):  # see ``step``
      opt_state = optimizer.init((mean, rho))
    return MeanFieldState(mean, rho, opt_state, jnp.zeros((), jnp.int32))

  def objective(variational, key, batch):
    mean, rho = variational
    s = jax.tree.map(jax.nn.softplus, rho)
    thetas = sample_params(key, mean, s, num_samples)

    def loglik(theta):
      ll = log_likelihood_fn(theta, batch)
      if jnp.ndim(ll) != 1:
        raise ValueError("log_likelihood_fn must return per-example log-likelihoods [batch], "
                         f"got shape {jnp.shape(ll)}.")
      return jnp.mean(ll)

    mean_ll = jnp.mean(jax.vmap(loglik)(thetas))
    kl = gaussian_kl(mean, s, prior_mean, prior_std)
    expected = num_data * mean_ll
    # Per-datum negative ELBO: the scale the optimizer sees does not grow with the data.
    loss = -(expected - kl) / num_data
    return loss, MeanFieldInfo(elbo=expected - kl, expected_log_likelihood=expected, kl=kl)

  def step(key: Array, state: MeanFieldState, batch) -> tuple[MeanFieldState, MeanFieldInfo]:
    variational = (state.mean, state.rho)
    grads, info = jax.grad(objective, has_aux=True)(variational, key, batch)
    # optax's own arithmetic (e.g. Adam's ``decay ** count``) mixes float and int32, which
    # strict dtype promotion rejects; the promotion mode only affects the optimizer's internals.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(grads, state.opt_state, variational)
    mean, rho = optax.apply_updates(variational, updates)
    return MeanFieldState(mean, rho, opt_state, state.step + 1), info

  def sample(key: Array, state: MeanFieldState, num: int) -> PyTree:
    return sample_params(key, state.mean, std(state), num)

  return MeanFieldVI(init=init, step=step, sample=sample)
