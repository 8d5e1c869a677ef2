"""Pure train / eval step factories (the caller jits).

``make_train_step(tx, loss)`` returns ``step(model, state, batch) -> (state, metrics)`` with the
model as its first argument, so the caller jits it once with ``static_argnums=0``: a grown model
is a new static value and triggers exactly one retrace, while ordinary steps reuse the compiled
function (checked with chex trace counting in the tests). Batches are ``(x, y)`` pairs
(``growjax.data.Dataset``); under ``jax.sharding`` data parallelism the batch is sharded along
its leading axis and the mean loss is a global mean, so results match a single device.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from growjax.curvature.losses import Loss, get_loss
from growjax.train.state import TrainState

Array = jax.Array


def _forward(model: nn.Module, variables, model_state_keys, x, train: bool, rng):
  """Model output and the updated mutable collections (BatchNorm statistics in train mode)."""
  rngs = {"dropout": rng} if rng is not None else None
  if train and model_state_keys:
    out, new_state = model.apply(variables, x, train=True, mutable=list(model_state_keys),
                                 rngs=rngs)
    return out, dict(new_state)
  return model.apply(variables, x, train=train, rngs=rngs), None


def make_train_step(tx: optax.GradientTransformation, loss: str | Loss = "softmax_cross_entropy",
                    ) -> Callable[[nn.Module, TrainState, Any], tuple[TrainState, dict]]:
  """Returns ``step(model, state, batch) -> (state, metrics)``; jit with ``static_argnums=0``.

  Args:
    tx: optax optimizer over ``state.params``.
    loss: a ``growjax.curvature.Loss`` or its name; per-example values are averaged.

  Metrics: ``loss`` (mean over the batch) and, for classification losses, ``accuracy``.
  """
  loss = get_loss(loss)
  tx_extra = optax.with_extra_args_support(tx)

  def step(model: nn.Module, state: TrainState, batch) -> tuple[TrainState, dict]:
    x, y = batch
    # Derived from the step counter, not split off a carried key: XLA removes it when the
    # model draws no random numbers, while a stored split costs a threefry loop every step.
    drop_rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
      variables = {"params": params, **state.model_state}
      out, new_ms = _forward(model, variables, tuple(state.model_state), x, True, drop_rng)
      return jnp.mean(loss.value(out, y)), (out, new_ms)

    (value, (out, new_ms)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    # optax mixes Python floats with int32 counters (Adam's bias correction), which strict
    # promotion rejects; growjax's own code stays strict, the optimizer call does not.
    # Optimizers that precondition by curvature (growjax.curvature.gauss_newton) get the batch
    # through optax's extra arguments; plain transforms ignore them.
    model_fn = lambda p: _forward(model, {"params": p, **state.model_state}, (), x, False,
                                  None)[0]
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx_extra.update(grads, state.opt_state, state.params,
                                           model_fn=model_fn, targets=y)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value}
    if loss.correct is not None:
      metrics["accuracy"] = jnp.mean(loss.correct(out, y))
    new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state,
                               model_state=new_ms if new_ms is not None else state.model_state)
    return new_state, metrics

  return step


def make_eval_step(loss: str | Loss = "softmax_cross_entropy"
                   ) -> Callable[[nn.Module, TrainState, Any], dict]:
  """Returns ``eval_step(model, state, batch) -> {"loss_sum", "correct_sum", "count"}``.

  Sums (not means) so that batches of any size combine exactly; ``evaluate`` divides.
  Eval mode: BatchNorm running averages, no dropout.
  """
  loss = get_loss(loss)

  def eval_step(model: nn.Module, state: TrainState, batch) -> dict:
    x, y = batch
    out, _ = _forward(model, state.variables(), (), x, False, None)
    values = loss.value(out, y)
    metrics = {"loss_sum": jnp.sum(values), "count": jnp.asarray(values.size, jnp.float32)}
    if loss.correct is not None:
      metrics["correct_sum"] = jnp.sum(loss.correct(out, y))
    return metrics

  return eval_step


def evaluate(eval_step, model: nn.Module, state: TrainState, data, batch_size: int = 512,
             put: Callable[[Any], Any] | None = None) -> dict[str, float]:
  """Mean loss (and accuracy) of ``state`` on a whole ``Dataset`` with a jitted ``eval_step``.

  The last partial batch is evaluated too (one extra compilation for its shape at most).
  ``put`` optionally places each batch (e.g. sharding it).
  """
  totals: dict[str, float] = {}
  n = len(data)
  if n == 0:
    raise ValueError("evaluate: the dataset is empty (e.g. a validation split of a tiny "
                     "dataset rounded to zero examples); give it at least one example.")
  for start in range(0, n, batch_size):
    batch = (data.x[start:start + batch_size], data.y[start:start + batch_size])
    if put is not None:
      batch = put(batch)
    m = eval_step(model, state, batch)
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = {"loss": totals["loss_sum"] / totals["count"]}
  if "correct_sum" in totals:
    out["accuracy"] = totals["correct_sum"] / totals["count"]
  return out
