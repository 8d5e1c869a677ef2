"""Shared pieces of growjax models: activations, pure layer functions, the growable protocol.

The pure functions here (``conv``, ``batch_norm_eval``, ``dense``) are the same computations the
flax layers perform; growth sites use them to evaluate candidate units from cached statistics
(Lawton, Galstyan & Ver Steeg 2024, arXiv:2411.05855), so they must match flax exactly (tests
check every site's ``fan_in``/``fan_out`` against the full model).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "gelu": nn.gelu,  # tanh approximation (GPT-2's "gelu_new")
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),  # erf form (BERT)
    "silu": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "identity": lambda x: x,
}

# Activations f with f(f(x)) = f(x) and f(x) = x on f's range: inserting an identity layer after
# them preserves the function exactly (METHODS §1, identity-layer insertion).
IDEMPOTENT_ACTIVATIONS = ("relu", "relu6", "identity")

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def activation(name: str) -> Callable[[Array], Array]:
  """Looks up an activation by name; unknown names list the available ones."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def expand_to(v: Array, ndim: int) -> Array:
  """Reshapes a per-unit vector [k] to broadcast over the last axis of an ``ndim`` array."""
  return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


def dense(x: Array, kernel: Array, bias: Array | None = None) -> Array:
  """``x @ kernel + bias`` over the last axis: x [..., d_in], kernel [d_in, d_out]."""
  y = jnp.matmul(x, kernel)
  return y if bias is None else y + expand_to(bias, y.ndim)


def conv(x: Array, kernel: Array, strides: int = 1, groups: int = 1) -> Array:
  """2-D convolution with SAME padding, NHWC input, HWIO kernel (flax ``nn.Conv`` semantics)."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(strides, strides), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def batch_norm_eval(x: Array, scale: Array, bias: Array, mean: Array, var: Array,
                    epsilon: float = BN_EPSILON) -> Array:
  """Eval-mode BatchNorm over the last (channel) axis."""
  n = x.ndim
  inv = jax.lax.rsqrt(expand_to(var, n) + epsilon) * expand_to(scale, n)
  return (x - expand_to(mean, n)) * inv + expand_to(bias, n)


def batch_moments(y: Array) -> tuple[Array, Array]:
  """Per-channel mean and (biased) variance over all but the last axis, as BatchNorm uses."""
  axes = tuple(range(y.ndim - 1))
  mean = jnp.mean(y, axis=axes)
  var = jnp.mean(jnp.square(y), axis=axes) - jnp.square(mean)
  return mean, jnp.maximum(var, 0.0)


def max_pool(x: Array, window: int = 2) -> Array:
  return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")


def make_batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      name=name)


# ---------------------------------------------------------------------------------------------
# The growable-model protocol and the config registry.

_REGISTRY: dict[str, type] = {}


def register(cls):
  """Class decorator: makes a model reconstructible from ``config_dict`` (checkpoints)."""
  _REGISTRY[cls.__name__] = cls
  return cls


def config_dict(model: nn.Module) -> dict[str, Any]:
  """JSON-serialisable description of a model (class name and every config field)."""
  fields = {}
  for f in dataclasses.fields(model):
    if f.name in ("parent", "name"):
      continue
    value = getattr(model, f.name)
    fields[f.name] = list(value) if isinstance(value, tuple) else value
  out = {"class": type(model).__name__, "fields": fields}
  json.dumps(out)  # fail early if a field is not serialisable
  return out


def _tuplify(v):
  if isinstance(v, list):
    return tuple(_tuplify(x) for x in v)
  return v


def from_config_dict(d: Mapping[str, Any]) -> nn.Module:
  """Inverse of ``config_dict``."""
  name = d.get("class")
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model class {name!r}; registered: {sorted(_REGISTRY)}.")
  return _REGISTRY[name](**{k: _tuplify(v) for k, v in d["fields"].items()})


def host_init_leaf(path: str, shape: tuple[int, ...], dtype, rng: np.random.Generator,
                   rule: Mapping[str, Any] | None = None,
                   full_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Draws one leaf on the host as the model's own initialiser would.

  Growth initialises new units (and inserted layers) between jitted steps; compiling flax's init
  for every grown shape costs seconds (threefry-heavy HLO), numpy costs microseconds. Rules by
  the leaf's last path component, as flax's defaults: ``kernel`` lecun-normal (normal truncated
  at ±2 std, variance 1/fan_in), ``embedding`` normal(0.02), ``scale``/``var``/``gate`` ones,
  ``bias``/``mean`` zeros. ``rule`` (from ``model.init_rule(path)``) may override
  ``fan_in_axes`` (default: all axes but the last) or give ``std`` (plain normal).
  ``full_shape``: draw a slice of shape ``shape`` of a leaf of this shape (the fan-in comes from
  the full leaf).
  """
  rule = dict(rule or {})
  last = path.rsplit("/", 1)[-1]
  if last in ("scale", "var", "gate"):
    return np.ones(shape, dtype)
  if last in ("bias", "mean"):
    return np.zeros(shape, dtype)
  if "std" in rule or last == "embedding":
    return (rule.get("std", 0.02) * rng.standard_normal(shape)).astype(dtype)
  if last == "kernel":
    axes = rule.get("fan_in_axes", tuple(range(len(shape) - 1)))
    fan_in = int(np.prod([(full_shape or shape)[a] for a in axes]))
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2.0
    while bad.any():
      z[bad] = rng.standard_normal(int(bad.sum()))
      bad = np.abs(z) > 2.0
    return (z * (np.sqrt(1.0 / fan_in) / 0.87962566103423978)).astype(dtype)
  raise ValueError(f"No host initialiser rule for leaf {path!r}; give one in the model's "
                   "init_rule.")


def host_rng(key: Array) -> np.random.Generator:
  """A numpy Generator seeded deterministically from a JAX PRNG key (host-side growth draws)."""
  data = np.asarray(jax.random.key_data(key)).ravel()
  return np.random.default_rng([int(d) for d in data])


_ABSTRACT_CACHE: dict[Any, dict[str, jax.ShapeDtypeStruct]] = {}


def abstract_variables(model, rng: Array | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """``{path: ShapeDtypeStruct}`` of ``model``'s variables, by tracing init (no compilation).

  Shapes depend only on the config (the module), not on the key, so they are memoised per
  model: growth asks for the same grown shapes several times per step and tracing a flax init
  costs tens of milliseconds.
  """
  from growjax import tree  # pylint: disable=import-outside-toplevel
  del rng
  if model not in _ABSTRACT_CACHE:
    if len(_ABSTRACT_CACHE) > 256:
      _ABSTRACT_CACHE.clear()
    _ABSTRACT_CACHE[model] = tree.flatten(jax.eval_shape(model.init_variables,
                                                         jax.random.key(0)))
  return dict(_ABSTRACT_CACHE[model])


def host_init(model, rng: Array, keep: Mapping[str, Array] | None = None) -> dict:
  """Variables of ``model`` drawn on the host (``host_init_leaf``); leaves in ``keep`` (by path,
  with matching shapes) are taken as given. Equivalent in distribution to ``init_variables``."""
  from growjax import tree  # pylint: disable=import-outside-toplevel
  keep = keep or {}
  gen = host_rng(rng)
  flat = {}
  for path, a in abstract_variables(model, rng).items():
    if path in keep and tuple(np.shape(keep[path])) == tuple(a.shape):
      flat[path] = keep[path]
    else:
      flat[path] = jax.device_put(host_init_leaf(path, tuple(a.shape), a.dtype, gen,
                                                 model.init_rule(path)))
  return tree.unflatten(flat)


class Growable:
  """Mixin protocol every growjax model implements (flax modules are the config).

  Subclasses provide ``example_input(batch) -> Array``, ``growth_sites() -> {name: Site}`` and,
  where depth can grow, ``depth_positions``, ``deepen`` and ``identity_layer``; this mixin adds the
  validation hook and ``init_variables``.
  """

  def init_rule(self, path: str) -> dict[str, Any]:
    """Overrides of ``host_init_leaf``'s default rule for the leaf at ``path`` (none here)."""
    del path
    return {}

  def concrete(self):
    """The same model with derived widths written out (so growing one field changes nothing
    else); identity unless a model has fields whose default follows another field."""
    return self

  def field_values(self, attr: str) -> tuple[int, ...]:
    """The per-layer width tuple stored in config field ``attr`` (used by morphisms)."""
    return tuple(getattr(self, attr))

  def depth_positions(self) -> tuple[int, ...]:
    """Positions where ``deepen`` may insert a layer (empty: depth growth not supported)."""
    return ()

  def deepen(self, position: int):
    """Returns ``(model', renames)`` with one more layer at ``position``."""
    raise ValueError(f"{type(self).__name__} does not support depth growth.")

  def identity_layer(self, variables, position: int):
    """Sets the parameters of the layer inserted at ``position`` so it preserves the function."""
    raise ValueError(f"{type(self).__name__} does not support depth growth.")

  def validate(self) -> None:
    """Raises ValueError naming the field for invalid config values."""

  def init_variables(self, rng: Array) -> dict:
    """Initial variables (``params`` and, where used, ``batch_stats``) for a batch of 1."""
    self.validate()
    variables = self.init(rng, self.example_input(1))
    return {k: v for k, v in variables.items() if k not in ("perturbations", "intermediates")}


def check_positive(model, *names: str) -> None:
  """Validation helper: every named int / tuple-of-int field must be positive."""
  for name in names:
    value = getattr(model, name)
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
      if not isinstance(v, (int,)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{type(model).__name__}.{name} must be positive integer(s), got "
                         f"{value!r}.")
