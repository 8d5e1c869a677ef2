"""Multi-layer perceptron with one growth site per hidden layer.

The seed network of the growth experiments (Lawton, Galstyan & Ver Steeg 2024,
arXiv:2411.05855): ``input_dim -> widths[0] -> ... -> widths[-1] -> num_outputs``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from growjax.nets import common
from growjax.nets.sites import IN, OUT, Leaf, Site


def _fan_in(psi, h, act, linear=False):
  y = common.dense(h, psi["kernel"], psi["bias"])
  return y if linear else act(y)


def _fan_out(omega, a):
  return common.dense(a, omega["kernel"])


@common.register
class MLP(nn.Module, common.Growable):
  """Dense network; ``hidden_i`` layers, then ``head``.

  Attributes:
    input_dim: number of input features.
    widths: hidden widths, one growth site each.
    num_outputs: output size (logits).
    activation: hidden activation name (see ``growjax.nets.common.ACTIVATIONS``).
  """
  input_dim: int = 64
  widths: tuple[int, ...] = (32,)
  num_outputs: int = 10
  activation: str = "relu"

  def validate(self) -> None:
    common.check_positive(self, "input_dim", "num_outputs")
    if self.widths:
      common.check_positive(self, "widths")
    common.activation(self.activation)

  def example_input(self, batch: int = 1) -> jax.Array:
    return jnp.zeros((batch, self.input_dim), jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [batch, input_dim] -> logits [batch, num_outputs]."""
    del train  # no train-mode-only layers
    if x.shape[-1] != self.input_dim:
      raise ValueError(f"MLP expects inputs [..., {self.input_dim}], got {x.shape}.")
    act = common.activation(self.activation)
    n = len(self.widths)
    for i, w in enumerate(self.widths):
      self.sow("intermediates", f"h_hidden_{i}", x)
      x = nn.Dense(w, name=f"hidden_{i}")(x)
      if i > 0:
        x = self.perturb(f"u_hidden_{i - 1}", x)
      x = act(x)
    y = nn.Dense(self.num_outputs, name="head")(x)
    if n:
      y = self.perturb(f"u_hidden_{n - 1}", y)
    return y

  def growth_sites(self) -> dict[str, Site]:
    act = common.activation(self.activation)
    sites = {}
    n = len(self.widths)
    for i, w in enumerate(self.widths):
      consumer = f"hidden_{i + 1}" if i + 1 < n else "head"
      name = f"hidden_{i}"
      sites[name] = Site(
          name=name, field=("widths", i), width=w,
          leaves=(Leaf("kernel", f"params/{name}/kernel", 1, IN),
                  Leaf("bias", f"params/{name}/bias", 0, IN),
                  Leaf("kernel", f"params/{consumer}/kernel", 0, OUT, add="zero")),
          h_path=f"intermediates/h_{name}", u_path=f"perturbations/u_{name}",
          fan_in=functools.partial(_fan_in, act=act), fan_out=_fan_out)
    return sites

  def depth_positions(self) -> tuple[int, ...]:
    return tuple(range(len(self.widths)))

  def deepen(self, position: int):
    """Inserts a hidden layer after ``hidden_<position>`` with the same width."""
    if position not in self.depth_positions():
      raise ValueError(f"MLP.deepen: position {position} not in {self.depth_positions()}.")
    if self.activation not in common.IDEMPOTENT_ACTIVATIONS:
      raise ValueError(
          f"Identity-layer insertion preserves the function only for activations "
          f"{common.IDEMPOTENT_ACTIVATIONS}; this MLP uses {self.activation!r}.")
    widths = self.widths[:position + 1] + (self.widths[position],) + self.widths[position + 1:]
    renames = {f"hidden_{j}": f"hidden_{j + 1}" for j in range(position + 1, len(self.widths))}
    return self.clone(widths=widths), renames

  def identity_layer(self, variables, position: int):
    name = f"hidden_{position + 1}"
    w = self.widths[position + 1]
    params = dict(variables["params"])
    params[name] = {"kernel": jax.device_put(np.eye(w, dtype=params[name]["kernel"].dtype)),
                    "bias": jax.device_put(np.zeros((w,), params[name]["bias"].dtype))}
    return {**variables, "params": params}

