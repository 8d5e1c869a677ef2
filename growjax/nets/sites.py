"""Growth sites: where a network can grow, with every coupled leaf and axis named.

A *growth site* is a producer/consumer pair (Lawton, Galstyan & Ver Steeg 2024,
arXiv:2411.05855, §1 of METHODS.md): the producer's output units grow (fan-in ``Ψ``), the
consumer's input units grow (fan-out ``Ω``), and every leaf whose shape follows that width — bias,
BatchNorm scale/offset/running statistics, depthwise kernels in between, the flattened dense
kernel after a conv — is listed with its unit axis. New units are always appended at the end of
the unit axis, so ``growjax.tree.transplant`` carries any params-shaped state across growth.

Besides the leaves, a site carries the two small local functions the Gauss-Newton growth method
needs, so that candidates can be built on cached statistics without touching the rest of the
network:

* ``fan_in(psi, h) -> a``: the new units' activations (the consumer-input slice) from the cached
  producer input ``h`` (sown as ``intermediates/<h_path>``) and the new slices ``psi`` of the
  ``in`` leaves (keyed by leaf role name).
* ``fan_out(omega, a) -> delta``: the change of the consumer's pre-activation ``u`` (exposed as a
  flax perturbation at ``perturbations/<u_path>``), linear in ``omega``.

``calibrate(psi, h) -> psi`` sets data-dependent entries (BatchNorm running statistics of the new
units) from the statistics batch, so eval-mode BatchNorm of the new units matches train mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IN = "in"    # producer side: the new units' fan-in and per-unit leaves (learned as Ψ)
OUT = "out"  # consumer side: the new units' fan-out (learned as Ω)


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One leaf coupled to a site's width.

  Attributes:
    name: role name used as the key in ``psi`` / ``omega`` dicts (``"kernel"``, ``"bn_var"``).
    path: full variables path (``"params/hidden_0/kernel"``, ``"batch_stats/bn_1/var"``).
    axis: the unit axis of this leaf.
    side: ``IN`` (producer / per-unit) or ``OUT`` (consumer fan-out).
    add: how ``add_units`` fills the new entries so the function is preserved: ``"fresh"``
      (the model's initialiser), ``"zero"``, or ``"mean"`` (mean of the old units, for residual
      streams normalised by LayerNorm).
    positions: spatial positions per example at which this leaf's per-unit slice is applied
      (for FLOP counts; 1 for dense layers, H*W for convolutions).
  """
  name: str
  path: str
  axis: int
  side: str
  add: str = "fresh"
  positions: int = 1


@dataclasses.dataclass(frozen=True)
class Site:
  """A named growth site of a model.

  Attributes:
    name: site name (``"hidden_0"``, ``"block_1/mlp"``).
    field: ``(attribute, index)`` of the model holding the width; ``index`` is None for a scalar
      attribute or the position inside a per-layer tuple.
    width: current number of units.
    leaves: every leaf whose shape follows the width.
    kind: ``"units"`` (hidden units between a producer and a consumer: supports Gauss-Newton
      candidates) or ``"stream"`` (a residual stream written and read by many layers).
    h_path: intermediates path of the producer input (``None`` for stream sites).
    u_path: perturbations path of the consumer pre-activation (``None`` for stream sites).
    fan_in: ``(psi, h, linear=False) -> a`` [..., k] new-unit activations at the consumer input;
      ``linear=True`` replaces activations and normalisations by the identity (their
      linearisation at zero, used by first-order baselines such as TINY and GradMax).
    fan_out: ``(omega, a) -> delta`` with the shape of ``u``.
    calibrate: ``(psi, h) -> psi`` filling data-dependent per-unit statistics (identity if None).
    preserve: optional ``(model, variables, old_width, k) -> (model, variables)`` adjustment of
      old entries or config after appending ``k`` units (e.g. LayerNorm rescaling); the new
      entries themselves are set by each leaf's ``add`` rule.
    splittable: whether Net2Net splitting preserves the function at this site.
    a_axis: the unit axis of ``fan_in``'s output (-1, or -2 for attention heads [.., k, hd]).
  """
  name: str
  field: tuple[str, int | None]
  width: int
  leaves: tuple[Leaf, ...]
  kind: str = "units"
  h_path: str | None = None
  u_path: str | None = None
  fan_in: Callable[[Mapping[str, Array], Array], Array] | None = None
  fan_out: Callable[[Mapping[str, Array], Array], Array] | None = None
  calibrate: Callable[[Mapping[str, Array], Array], Mapping[str, Array]] | None = None
  preserve: Callable[[Any, Any, int, int], tuple[Any, Any]] | None = None
  splittable: bool = True
  a_axis: int = -1

  @property
  def in_leaves(self) -> tuple[Leaf, ...]:
    return tuple(l for l in self.leaves if l.side == IN)

  @property
  def out_leaves(self) -> tuple[Leaf, ...]:
    return tuple(l for l in self.leaves if l.side == OUT)

  def params_per_unit(self, variables) -> int:
    """Trainable parameters added per unit (``params`` collection only)."""
    from growjax import tree  # pylint: disable=import-outside-toplevel
    total = 0
    for leaf in self.leaves:
      if leaf.path.startswith("params/"):
        shape = np.shape(tree.get(variables, leaf.path))
        total += int(np.prod(shape)) // shape[leaf.axis]
    return total

  def flops_per_unit(self, variables) -> int:
    """Forward multiply-adds per example added per unit (per-unit slice size × positions)."""
    from growjax import tree  # pylint: disable=import-outside-toplevel
    total = 0
    for leaf in self.leaves:
      if leaf.path.startswith("params/"):
        shape = np.shape(tree.get(variables, leaf.path))
        total += int(np.prod(shape)) // shape[leaf.axis] * leaf.positions
    return total


def slice_units(x: Array, axis: int, start: int, stop: int) -> Array:
  """``x`` restricted to units ``[start, stop)`` along ``axis``."""
  return jax.lax.slice_in_dim(x, start, stop, axis=axis)


def new_slices(variables, site: Site, start: int, side: str | None = None) -> dict[str, Array]:
  """The units ``[start, end)`` of each leaf of ``site`` as ``{role name: slice}``."""
  from growjax import tree  # pylint: disable=import-outside-toplevel
  flat = tree.flatten(variables)
  out = {}
  for leaf in site.leaves:
    if side is None or leaf.side == side:
      x = flat[leaf.path]
      out[leaf.name] = slice_units(x, leaf.axis, start, x.shape[leaf.axis])
  return out


def cached_input(cache, site: Site) -> Array:
  """The producer input ``h`` of ``site`` from an ``apply(..., mutable=["intermediates"])`` cache.

  ``sow`` stores a tuple (one entry per call); growjax models call each layer once per apply.
  """
  from growjax import tree  # pylint: disable=import-outside-toplevel
  return tree.get(cache, site.h_path + "/0")


def per_layer(value: int | Sequence[int], n: int, field: str) -> tuple[int, ...]:
  """Normalises an int-or-tuple per-layer config field to a tuple of length ``n``."""
  if isinstance(value, (int, np.integer)):
    out = (int(value),) * n
  else:
    out = tuple(int(v) for v in value)
  if len(out) != n:
    raise ValueError(f"Config field {field!r} has {len(out)} entries but the model has {n} "
                     f"layers; give one value per layer or a single int.")
  if any(v <= 0 for v in out):
    raise ValueError(f"Config field {field!r} must be positive, got {out}.")
  return out


def with_field(values: tuple[int, ...], index: int, new: int) -> tuple[int, ...]:
  """``values`` with entry ``index`` replaced by ``new``."""
  return tuple(new if i == index else v for i, v in enumerate(values))
