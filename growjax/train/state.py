"""Explicit training state and the rule that carries it across growth.

``TrainState`` is a plain pytree (NamedTuple): step, params, optimizer state, non-parameter model
collections (BatchNorm statistics) and a raw PRNG key. The model (a flax module, i.e. the config)
is kept outside it: it is static for jit and changes only at growth. Carrying the state across a
morphism is ``growjax.tree.transplant`` applied to a freshly initialised optimizer state, the one
rule of DESIGN.md (new entries start at zero; old entries keep their moments).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from growjax import tree


class TrainState(NamedTuple):
  """Everything a train step updates.

  Attributes:
    step: int32 scalar.
    params: the ``params`` collection.
    opt_state: optax state for ``params``.
    model_state: other mutable collections (``{"batch_stats": ...}`` or ``{}``).
    rng: raw uint32[2] base PRNG key; step ``t`` uses ``fold_in(rng, t)`` (dropout), so a
      restored run draws the same numbers as an uninterrupted one.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Mapping[str, Any]
  rng: jax.Array

  def variables(self) -> dict:
    """The flax variables dict ``{"params": ..., **model_state}``."""
    return {"params": self.params, **self.model_state}


def create_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
                 seed: int = 0) -> TrainState:
  """Fresh state for ``variables`` (from ``model.init_variables`` or a morphism)."""
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    model_state=model_state, rng=jax.random.PRNGKey(seed))


def regrow_state(state: TrainState, variables: Mapping[str, Any],
                 tx: optax.GradientTransformation,
                 renames: Mapping[str, str] | None = None) -> TrainState:
  """The state after a morphism produced ``variables``: optimizer state carried by transplant.

  Adam moments (and any params-shaped optimizer state) keep their old values in the leading
  corner; entries of new units start as ``tx.init`` makes them (zero moments). Counters are
  carried unchanged. ``renames`` is the morphism record's layer rename map.
  """
  params = variables["params"]
  opt_state = tree.transplant(tx.init(params), state.opt_state, renames)
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return state._replace(params=params, opt_state=opt_state, model_state=model_state)


def num_params(state_or_params) -> int:
  params = state_or_params.params if isinstance(state_or_params, TrainState) else state_or_params
  return tree.count(params)


def model_flops(model: nn.Module, variables: Mapping[str, Any], example) -> float:
  """Forward FLOPs per example of ``model`` from XLA's cost analysis of the lowered apply
  (no compilation)."""
  cost = jax.jit(model.apply).lower(variables, example).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) / example.shape[0]
