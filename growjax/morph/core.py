"""Function-preserving network morphisms as pure parameter-tree transforms.

Every morphism maps ``(model, variables) -> (model', variables', record)``: the model (a flax
module, which is the config) gets the new width or depth, the variables get the new units
appended at the end of the unit axis, and ``record`` (a JSON-serialisable dict) says what changed
for the growth history (Lawton, Galstyan & Ver Steeg 2024, arXiv:2411.05855, §1 of METHODS.md):

* ``add_units``: k new units at a site with given fan-in / fan-out; zero fan-out preserves the
  function exactly.
* ``split_units``: Net2Net split (Chen, Goodfellow & Shlens 2016): duplicate units' fan-in and
  share their fan-out between the copies (``ratio`` and ``1 - ratio``).
* ``insert_layer``: identity-layer insertion (MLP/ConvNet with ReLU-family activations) or
  zero-gated residual-block insertion (ResNet, pre-LN transformer), by the model's own rule.

Widening never initialises (or compiles) the whole grown model: its shapes come from tracing the
grown model's init (``jax.eval_shape``), every leaf coupled to the site gets its new slices
appended on the unit axis (zero, the mean of the old units, given values, or fresh values drawn
like the model's own initialiser), and the result is checked against those shapes. Depth
morphisms keep every old leaf under its (possibly shifted) name and draw only the new layer. The record's
``renames`` (depth morphisms shift layer names) must be passed to ``transplant`` when carrying
optimizer state across the morphism (``growjax.train`` does this).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from growjax import tree
from growjax.nets import common
from growjax.nets.sites import IN, OUT, Site, with_field

Array = jax.Array


# Growth sites and widened configs are functions of the model config (a hashable flax module):
# memoised, since a growth step asks for them several times and building them costs tens of
# microseconds each.
@functools.lru_cache(maxsize=256)
def _sites(model: nn.Module) -> Mapping[str, Site]:
  return model.growth_sites()


def get_site(model: nn.Module, name: str) -> Site:
  """The growth site ``name`` of ``model``; a KeyError lists the sites that exist."""
  sites = _sites(model)
  if name not in sites:
    raise KeyError(f"Unknown growth site {name!r} of {type(model).__name__}; available sites: "
                   f"{sorted(sites)}.")
  return sites[name]


@functools.lru_cache(maxsize=256)
def widen_field(model: nn.Module, field: tuple[str, int | None], new: int) -> nn.Module:
  """``model`` with the width at ``field`` (``(attribute, index)``) set to ``new`` (memoised)."""
  attr, index = field
  concrete = model.concrete()
  if index is None:
    return concrete.clone(**{attr: new})
  return concrete.clone(**{attr: with_field(concrete.field_values(attr), index, new)})


def check_site_shapes(variables, site: Site) -> None:
  """Every leaf of ``site`` must exist and have ``site.width`` units on its unit axis."""
  _check_site_shapes_flat(tree.flatten(variables), site)


def _check_site_shapes_flat(flat: Mapping[str, Array], site: Site) -> None:
  for leaf in site.leaves:
    if leaf.path not in flat:
      raise tree._unknown_path_error(leaf.path, flat)  # pylint: disable=protected-access
    shape = np.shape(flat[leaf.path])
    if shape[leaf.axis] != site.width:
      raise ValueError(
          f"Site {site.name!r}: leaf {leaf.path!r} has shape {shape} with {shape[leaf.axis]} "
          f"units on axis {leaf.axis}, but the model config says width {site.width}. The "
          f"variables do not belong to this model config.")


def _check_slices(given: Mapping[str, Array] | None, site: Site, side: str, k: int,
                  flat: Mapping[str, Array], what: str) -> dict[str, Array]:
  if given is None:
    return {}
  leaves = {l.name: l for l in site.leaves if l.side == side}
  unknown = sorted(set(given) - set(leaves))
  if unknown:
    raise KeyError(f"{what} for site {site.name!r} names unknown leaves {unknown}; this site's "
                   f"{what} leaves are {sorted(leaves)}.")
  out = {}
  for name, value in given.items():
    leaf = leaves[name]
    want = list(np.shape(flat[leaf.path]))
    want[leaf.axis] = k
    if tuple(np.shape(value)) != tuple(want):
      raise ValueError(f"{what}[{name!r}] for site {site.name!r} must have shape {tuple(want)} "
                       f"(leaf {leaf.path!r} with {k} units on axis {leaf.axis}), got "
                       f"{tuple(np.shape(value))}.")
    out[name] = value
  return out


def _set_leaves(variables, updates: Mapping[str, Array]):
  flat = tree.flatten(variables)
  flat.update(updates)
  return tree.unflatten(flat)


def to_device(x: np.ndarray) -> Array:
  """Host array -> device array. ``jax.device_put`` transfers without compiling anything, unlike
  ``jnp.asarray``, which compiles a staging computation for every new shape."""
  return jax.device_put(x)


def _grown_shapes(model: nn.Module, rng: Array) -> dict[str, tuple[int, ...]]:
  """Leaf shapes of ``model``'s variables, by tracing its init (no compilation, no FLOPs)."""
  return {p: tuple(a.shape) for p, a in common.abstract_variables(model, rng).items()}


def _check_grown(grown, want: Mapping[str, tuple[int, ...]], site: Site, *,
                 flat: Mapping[str, Array] | None = None) -> None:
  """The grown tree (or its ``flat`` form) must have exactly the grown model's leaves and
  shapes."""
  flat = tree.flatten(grown) if flat is None else flat
  got = {p: tuple(np.shape(a)) for p, a in flat.items()}
  if got != want:
    bad = sorted(p for p in set(got) | set(want) if got.get(p) != want.get(p))
    raise ValueError(
        f"Site {site.name!r} does not list every leaf coupled to its width: after growing, "
        + "; ".join(f"{p}: have {got.get(p)}, model expects {want.get(p)}" for p in bad[:8]))


def _record(op: str, site: Site | None, before, after, **extra) -> dict[str, Any]:
  rec = {"op": op, "params_before": tree.count(before.get("params", {})),
         "params_after": tree.count(after.get("params", {}))}
  if site is not None:
    rec["site"] = site.name
  rec.update(extra)
  return rec


def new_unit_slices(model: nn.Module, variables, site: str, k: int, rng: Array
                    ) -> tuple[nn.Module, dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
  """The default entries of ``k`` new units at ``site``, by each leaf's ``add`` rule.

  Returns:
    ``(grown model, {path: grown shape}, {leaf path: new slice [.., k, ..]})`` — zero fan-out,
    fresh fan-in drawn like the model's initialiser (host-side), mean-tracking stream entries.
  """
  s = get_site(model, site)
  new_model = widen_field(model, s.field, s.width + int(k))
  want = _grown_shapes(new_model, rng)
  return new_model, want, _default_slices(s, new_model, want, tree.flatten(variables), k, rng)


def _default_slices(s: Site, new_model: nn.Module, want: Mapping[str, tuple[int, ...]],
                    flat_old: Mapping[str, Array], k: int, rng: Array,
                    given: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
  """``new_unit_slices``'s slices. ``given``: leaf paths whose slices the caller supplies; when
  they include every ``fresh`` leaf nothing is drawn (and they are left out), otherwise every
  slice is built as without ``given`` (the same random draws)."""
  draw = any(leaf.add == "fresh" and leaf.path not in given for leaf in s.leaves)
  gen = common.host_rng(rng) if draw else None
  slices = {}
  for leaf in s.leaves:
    if not draw and leaf.path in given:
      continue
    old = np.asarray(flat_old[leaf.path])
    shape = list(old.shape)
    shape[leaf.axis] = k
    if leaf.add == "zero":
      new = np.zeros(shape, old.dtype)
    elif leaf.add == "mean":
      new = np.repeat(old.mean(axis=leaf.axis, keepdims=True), k, axis=leaf.axis)
    elif leaf.add == "fresh":
      # Drawn for the grown leaf's shape (its fan-in sets the scale); ``shape`` is the slice.
      new = common.host_init_leaf(leaf.path, tuple(shape), old.dtype, gen,
                                  new_model.init_rule(leaf.path), full_shape=want[leaf.path])
    else:
      raise ValueError(f"Leaf {leaf.path!r} has unknown add rule {leaf.add!r}.")
    slices[leaf.path] = new
  return slices


def add_units(model: nn.Module, variables, site: str, k: int, *, rng: Array,
              fan_in: Mapping[str, Array] | None = None,
              fan_out: Mapping[str, Array] | None = None):
  """Appends ``k`` units at ``site``.

  Args:
    model: a growjax model (flax module; its fields are the config).
    variables: its variables (``{"params": ..., "batch_stats": ...}``).
    site: growth site name (``model.growth_sites()``).
    k: number of units to add.
    rng: PRNG key for the fresh entries (the model's own initialisers); unused when ``fan_in``
      and ``fan_out`` give every freshly drawn leaf.
    fan_in: optional ``{leaf name: new slice}`` for IN leaves (e.g. a learned ``Ψ``), each shaped
      like the leaf with ``k`` on its unit axis.
    fan_out: optional ``{leaf name: new slice}`` for OUT leaves (a learned ``Ω``). Without it the
      fan-out is zero and the function is preserved exactly.

  Returns:
    ``(model', variables', record)``.
  """
  if not isinstance(k, (int, np.integer)) or k <= 0:
    raise ValueError(f"add_units: k must be a positive integer, got {k!r}.")
  s = get_site(model, site)
  flat_old = tree.flatten(variables)
  _check_site_shapes_flat(flat_old, s)
  fan_in = _check_slices(fan_in, s, IN, int(k), flat_old, "fan_in")
  fan_out = _check_slices(fan_out, s, OUT, int(k), flat_old, "fan_out")
  new_model = widen_field(model, s.field, s.width + int(k))
  want = _grown_shapes(new_model, rng)
  given = {leaf.path: (fan_in if leaf.side == IN else fan_out).get(leaf.name)
           for leaf in s.leaves}
  given = {p: v for p, v in given.items() if v is not None}
  slices = _default_slices(s, new_model, want, flat_old, int(k), rng, frozenset(given))
  paths, parts = [], []
  for leaf in s.leaves:
    old = np.asarray(flat_old[leaf.path])
    new = given.get(leaf.path)
    new = slices[leaf.path] if new is None else np.asarray(new, old.dtype)
    paths.append(leaf.path)
    parts.append(np.concatenate([old, new.astype(old.dtype)], axis=leaf.axis))
  flat = dict(flat_old)
  flat.update(zip(paths, jax.device_put(parts)))  # one transfer, no compilation
  _check_grown(None, want, s, flat=flat)
  grown = tree.unflatten(flat)
  if s.preserve is not None:
    new_model, grown = s.preserve(new_model, grown, s.width, int(k))
    rec = _record("add_units", s, variables, grown, k=int(k), old_width=s.width,
                  new_width=s.width + int(k), learned_fan_out=bool(fan_out))
  else:  # parameter counts from the shapes already at hand (the same as counting the trees)
    count = lambda shapes: sum(math.prod(shp) for p, shp in shapes if p.startswith("params/"))
    rec = {"op": "add_units",
           "params_before": count((p, np.shape(a)) for p, a in flat_old.items()),
           "params_after": count(want.items()), "site": s.name, "k": int(k),
           "old_width": s.width, "new_width": s.width + int(k), "learned_fan_out": bool(fan_out)}
  return new_model, grown, rec


def split_units(model: nn.Module, variables, site: str, units: Sequence[int], *,
                ratio: float = 0.5):
  """Net2Net split: appends a copy of each unit in ``units``, sharing its fan-out.

  The copy gets the unit's fan-in and per-unit entries; the original keeps ``ratio`` of its
  fan-out and the copy ``1 - ratio`` (``ratio != 0.5`` breaks the copies' gradient symmetry
  while still preserving the function exactly).

  Returns:
    ``(model', variables', record)``.
  """
  s = get_site(model, site)
  if not s.splittable:
    raise ValueError(f"Site {site!r} of {type(model).__name__} cannot be split exactly (its "
                     "units are coupled through a normalisation over all units); use add_units.")
  units = [int(u) for u in units]
  if not units or len(set(units)) != len(units) or min(units) < 0 or max(units) >= s.width:
    raise ValueError(f"split_units: units must be distinct indices in [0, {s.width}), got "
                     f"{units}.")
  check_site_shapes(variables, s)
  k = len(units)
  new_model = widen_field(model, s.field, s.width + k)
  want = _grown_shapes(new_model, jax.random.key(0))
  flat_old = tree.flatten(variables)
  updates = {}
  for leaf in s.leaves:
    old = np.asarray(flat_old[leaf.path])
    copy = np.take(old, units, axis=leaf.axis)
    if leaf.side == OUT:
      shape = [1] * old.ndim
      shape[leaf.axis] = s.width
      keep = np.ones((s.width,), old.dtype)
      keep[units] = ratio
      old = old * keep.reshape(shape)
      copy = copy * np.asarray(1.0 - ratio, old.dtype)
    updates[leaf.path] = to_device(np.concatenate([old, copy], axis=leaf.axis))
  grown = _set_leaves(variables, updates)
  _check_grown(grown, want, s)
  rec = _record("split_units", s, variables, grown, k=k, units=units, ratio=float(ratio),
                old_width=s.width, new_width=s.width + k)
  return new_model, grown, rec


def insert_layer(model: nn.Module, variables, position: int, *, rng: Array):
  """Inserts a function-preserving layer (identity layer or zero-gated residual block).

  Returns:
    ``(model', variables', record)``; ``record["renames"]`` maps old layer names to new ones.
  """
  positions = model.depth_positions()
  if position not in positions:
    raise ValueError(f"insert_layer: {type(model).__name__} can insert a layer at positions "
                     f"{list(positions)}, got {position!r}.")
  new_model, renames = model.deepen(position)
  # Old leaves keep their values under their new names; only the inserted layer is drawn
  # (host-side, like every growth-time initialisation: no compilation of the grown init).
  keep = {tree.rename_path(p, renames): leaf for p, leaf in tree.flatten(variables).items()}
  grown = common.host_init(new_model, rng, keep=keep)
  grown = new_model.identity_layer(grown, position)
  rec = _record("insert_layer", None, variables, grown, position=int(position),
                renames=dict(renames))
  return new_model, grown, rec
