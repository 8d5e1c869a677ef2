"""One statistics pass that feeds every growth method.

For a batch ``(x, y)`` and a set of growth sites, ``make_stats_fn`` returns a pure function
computing, per site, the cached producer input ``h`` and the network above the site linearised
at the consumer pre-activation ``u`` (``z(u)``: a cached vjp whose transpose gives ``J_u δ``),
plus the base logits and loss. Every candidate of every method (Gauss-Newton, TINY, GradMax,
random, Firefly, oracle) is then built from these arrays without touching the layers below the
site again; the Gauss-Newton iterations never rerun the network (Lawton, Galstyan & Ver Steeg
2024, arXiv:2411.05855, §1 of METHODS.md).

``make_stats_fn(..., offset=True)`` linearises at ``u0 + δ`` instead (Levenberg-Marquardt
re-linearisation around a candidate already applied).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from growjax import tree
from growjax.curvature.gn import Linearized, linearize
from growjax.curvature.losses import Loss, get_loss
from growjax.nets.sites import cached_input

Array = jax.Array

_RUNTIME = ("perturbations", "intermediates")


class SiteStats(NamedTuple):
  """Cached statistics of one site on the statistics batch.

  Attributes:
    h: producer input (``intermediates/<h_path>``), e.g. [n, d_in] or [n, H, W, C].
    lin: the logits as a function of the consumer pre-activation ``u``, linearised.
  """
  h: Array
  lin: Linearized


class Stats(NamedTuple):
  """Statistics of a batch: inputs, targets, base logits/loss and per-site caches."""
  x: Array
  y: Array
  z: Array
  loss: Array
  sites: Mapping[str, SiteStats]


def base_variables(variables: Mapping) -> dict:
  """``variables`` without runtime collections (perturbations / intermediates)."""
  return {k: v for k, v in variables.items() if k not in _RUNTIME}


def perturbed_apply(model: nn.Module, variables: Mapping, x: Array,
                    perturbation: Mapping[str, Array]) -> Array:
  """Model output with ``u ← u + δ`` at the given perturbation paths (others zero).

  Args:
    perturbation: ``{u_path: δ}`` with full ``perturbations/...`` paths.
  """
  variables = base_variables(variables)
  _, cache = jax.eval_shape(lambda v: model.apply(v, x, mutable=list(_RUNTIME)), variables)
  flat = {p: jnp.zeros(a.shape, a.dtype) for p, a in tree.flatten(cache["perturbations"]).items()}
  for path, value in perturbation.items():
    key = path[len("perturbations/"):]
    if key not in flat:
      raise KeyError(f"No perturbation {path!r}; available: {sorted(flat)}.")
    flat[key] = value
  return model.apply({**variables, "perturbations": tree.unflatten(flat)}, x)


def make_stats_fn(model: nn.Module, loss: str | Loss, site_names: Sequence[str]
                  ) -> Callable[..., Stats]:
  """Returns ``stats(variables, x, y, offsets=None) -> Stats`` (pure; jit it once per model).

  Args:
    model: a growjax model.
    loss: the training loss.
    site_names: sites to linearise (``kind == "units"``).

  ``offsets`` (optional ``{site: δ}``) linearises each site's upper network at ``u0 + δ`` —
  used to re-linearise around an applied candidate. The returned ``Stats.z`` / ``loss`` are at
  the base point either way.
  """
  loss = get_loss(loss)
  sites = model.growth_sites()
  for name in site_names:
    if name not in sites:
      raise KeyError(f"Unknown growth site {name!r}; available: {sorted(sites)}.")
    if sites[name].kind != "units":
      raise ValueError(f"Site {name!r} is a {sites[name].kind!r} site; Gauss-Newton candidates "
                       "need a producer/consumer ('units') site.")

  def stats(variables, x, y, offsets: Mapping[str, Array] | None = None) -> Stats:
    variables = base_variables(variables)
    z, cache = model.apply(variables, x, mutable=list(_RUNTIME))
    pert = tree.flatten(cache["perturbations"])
    out = {}
    for name in site_names:
      site = sites[name]
      key = site.u_path[len("perturbations/"):]

      def z_of_u(u, key=key):
        flat = dict(pert)
        flat[key] = u
        return model.apply({**variables, "perturbations": tree.unflatten(flat)}, x)

      base = pert[key]
      if offsets is not None and name in offsets:
        base = base + offsets[name]
      out[name] = SiteStats(h=cached_input(cache, site), lin=linearize(z_of_u, base))
    return Stats(x=x, y=y, z=z, loss=jnp.mean(loss.value(z, y)), sites=out)

  return stats
