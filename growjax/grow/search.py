"""One growth round: candidates at every site, ranking, budget, line search, λ adaptation.

``grow_round`` implements the round of Lawton, Galstyan & Ver Steeg (2024, arXiv:2411.05855):
collect statistics on a batch → learn and score candidates (k new units, k from the config) at
every site with the configured method → rank by score per added parameter (or FLOP) → fill the
round's budget greedily (gains are not additive: after a morphism its site's candidates are
re-solved on the grown network, and a candidate of another site is re-solved before it is applied;
a site may be chosen again) →
apply each with a line search on the scale γ of its fan-out on the real loss → log predicted and
realised loss change and adapt λ Levenberg-Marquardt-style (ρ < ¼: λ×2; ρ > ¾: λ/2). A candidate
with a NaN, or (for model-based methods) a predicted gain ≤ 0, is rejected, logged, not applied.

``Searcher`` owns the jitted functions (compiled once per model config, site, k and method) and
is the object callers keep across rounds and seeds.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from growjax import morph, tree
from growjax.curvature.losses import Loss, get_loss
from growjax.grow import candidates as C
from growjax.grow.stats import SiteStats, Stats, make_stats_fn
from growjax.nets.common import host_rng
from growjax.nets.sites import IN, OUT, Site

Array = jax.Array

MODEL_BASED = ("gn", "tiny")
RANK_BY = ("params", "flops", "units")  # the cost a candidate's score is divided by


@dataclasses.dataclass(frozen=True)
class GrowConfig:
  """What a growth round does.

  Attributes:
    method: one of ``growjax.grow.candidates.METHODS`` or ``"net2net"``.
    ks: numbers of new units tried per site.
    sites: site names to consider (None: every ``units`` site).
    rank_by: ``"params"`` or ``"flops"`` (score per added parameter / FLOP, METHODS.md §1), or
      ``"units"`` (score per added unit; beyond METHODS.md). Per parameter, a unit of a layer
      feeding a wide layer costs its whole fan-out, so on MLPs that ranking keeps widening the
      layer that is already wide (digits, 20k budget: 22-329, 202-32); per unit keeps the
      growth balanced (see BUILD_NOTES.md, growth search).
    round_budget: parameters that one round may add (at least one morphism is applied).
    round_budget_frac: if > 0, a round may also add at most this fraction of the network's
      parameters before the round (geometric growth: small networks grow by little, large ones
      by more); ``round_budget`` still caps it.
    max_morphisms: morphisms per round at most.
    gammas: fan-out scales tried by the line search (0 keeps the function).
    damping: initial λ.
    adapt_damping: Levenberg-Marquardt adaptation of λ from ρ = realised / predicted.
    damping_bounds: λ is kept in this range. The floor is a regulariser: with ρ ≈ 1 the
      Levenberg-Marquardt rule drives λ down every round, and below ~1e-3 new units fit the
      statistics batch ever more tightly (on digits a floor of 1e-3 instead of 1e-6 lowered the
      grown network's mean validation loss over 3 seeds from 0.25 to 0.22).
    relinearize: extra re-linearisation rounds of the GN solve (LM iterations).
    relin_backtracks: a re-linearisation proposal that raises the real loss is first shortened
      (the point halfway towards it from the current candidate, then a quarter, ...) this many
      times before the round is rejected (0: rejected at once).
    learn: candidate-learning hyper-parameters.
    width_bucket: 0 (off) or a bucket size B: statistics, candidate learning and the line search
      run on the network padded at every site with inert units (zero fan-in, bias and fan-out:
      the function, its gradient and its GN model are unchanged) up to the next multiple of B,
      and fan-in from padded inputs is masked to zero. Growth steps that stay inside the same
      buckets then reuse every compiled function instead of compiling for each new width (the
      cold cost of growth on small networks). The results equal the unpadded ones up to float
      rounding. Dense sites only (every site leaf at most 2-D, appended along its unit axis,
      e.g. ``MLP``); the padded units cost compute, so choose B near the expected final width.
    fused: statistics and every site's learner in one compiled call (one dispatch and one device
      synchronisation per round instead of one per site; same results). Methods ``gn`` (not
      with ``psi_init="tiny"``), ``tiny``, ``gradmax``, ``firefly``, ``oracle``.

  Fast growth of small MLPs (``benchmarks/vs_gromo.py``): ``width_bucket=16`` (a little above
  the expected widths), ``fused=True`` and
  ``learn=LearnConfig(fan_out_solver="dense", psi_init="svd", psi_steps=0)`` — one exact dense
  fan-out solve per candidate size from the closed-form fan-in, no iterations; ``psi_steps`` of
  3–5 (``psi_lr=0.1``) trade time for quality.
  """
  method: str = "gn"
  ks: tuple[int, ...] = (1, 2, 4, 8)
  sites: tuple[str, ...] | None = None
  rank_by: str = "params"
  round_budget: int = 10**9
  round_budget_frac: float = 0.0
  max_morphisms: int = 1
  gammas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
  damping: float = 2e-3
  adapt_damping: bool = True
  damping_bounds: tuple[float, float] = (1e-3, 10.0)
  relinearize: int = 0
  relin_backtracks: int = 2
  learn: C.LearnConfig = C.LearnConfig()
  width_bucket: int = 0
  fused: bool = False

  def validate(self) -> None:
    methods = C.METHODS + ("net2net",)
    if self.method not in methods:
      raise ValueError(f"GrowConfig.method must be one of {methods}, got {self.method!r}.")
    if not self.ks or any(int(k) <= 0 for k in self.ks):
      raise ValueError(f"GrowConfig.ks must be positive unit counts, got {self.ks!r}.")
    if self.rank_by not in RANK_BY:
      raise ValueError(f"GrowConfig.rank_by must be one of {RANK_BY}, got {self.rank_by!r}.")
    if self.learn.fan_out_solver not in C.FAN_OUT_SOLVERS:
      raise ValueError(f"GrowConfig.learn.fan_out_solver must be one of {C.FAN_OUT_SOLVERS}, "
                       f"got {self.learn.fan_out_solver!r}.")
    if self.learn.psi_init not in ("random", "tiny", "svd"):
      raise ValueError("GrowConfig.learn.psi_init must be 'random', 'tiny' or 'svd', got "
                       f"{self.learn.psi_init!r}.")
    if self.learn.psi_init == "svd" and self.learn.fan_out_solver != "dense":
      raise ValueError("GrowConfig.learn.psi_init='svd' needs learn.fan_out_solver='dense'.")
    if self.fused and (self.method in ("random", "net2net") or self.learn.psi_init == "tiny"):
      raise ValueError("GrowConfig.fused needs a learned method and psi_init != 'tiny' (the "
                       f"TINY start is a learner call of its own); got method={self.method!r}, "
                       f"psi_init={self.learn.psi_init!r}.")
    if self.width_bucket < 0:
      raise ValueError(f"GrowConfig.width_bucket must be >= 0 (0: off), got {self.width_bucket}.")
    if self.width_bucket and self.relinearize:
      raise ValueError("GrowConfig.width_bucket and relinearize cannot be combined (the "
                       "re-linearisation runs on the unpadded network); set one of them to 0.")
    if not self.damping > 0:
      raise ValueError(f"GrowConfig.damping must be positive, got {self.damping}.")
    lo, hi = self.damping_bounds
    if not 0 < lo <= hi:
      raise ValueError("GrowConfig.damping_bounds must be (floor, ceiling) with 0 < floor <= "
                       f"ceiling, got {self.damping_bounds}.")
    if not lo <= self.damping <= hi:
      raise ValueError(f"GrowConfig.damping={self.damping} is outside damping_bounds="
                       f"{self.damping_bounds}; start λ within its bounds (e.g. damping = the "
                       "floor).")
    if self.round_budget_frac < 0:
      raise ValueError("GrowConfig.round_budget_frac must be >= 0 (0: off), got "
                       f"{self.round_budget_frac}.")

  def budget(self, params: int) -> int:
    """Parameters a round may add to a network of ``params`` parameters."""
    if self.round_budget_frac > 0:
      return min(self.round_budget, int(self.round_budget_frac * params))
    return self.round_budget


class Candidate(NamedTuple):
  """A learned, scored candidate morphism (host-side record with device arrays)."""
  site: str
  k: int
  method: str
  psi: dict
  omega: dict
  predicted: float
  score: float
  params: int
  flops: int
  seconds: float

  def rank_value(self, rank_by: str) -> float:
    """The score per unit of cost that candidates are ranked by (``GrowConfig.rank_by``)."""
    cost = {"params": self.params, "flops": self.flops, "units": self.k}[rank_by]
    return self.score / max(cost, 1)


class Searcher:
  """Jitted statistics, learners and line searches for one loss and config (reused across
  rounds, seeds and models; compiled per model config / site / k / method on first use)."""

  def __init__(self, loss: str | Loss, config: GrowConfig):
    config.validate()
    self.loss = get_loss(loss)
    self.config = config
    self._cache: dict[Any, Any] = {}
    # Per model config (bounded): padded model and pad widths; growth sites; learner inputs;
    # parameters / FLOPs per added unit.
    self._padded_models: dict[Any, tuple[nn.Module, tuple]] = {}
    self._sites: dict[Any, Mapping[str, Site]] = {}
    self._preps: dict[Any, dict] = {}
    self._unit_costs_memo: dict[Any, tuple] = {}

  # -- compiled pieces ------------------------------------------------------------------------

  def _jit(self, key, build):
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def sites(self, model: nn.Module) -> Mapping[str, Site]:
    """``model.growth_sites()``, memoised per model config (sites depend only on the config)."""
    sites = self._sites.get(model)
    if sites is None:
      if len(self._sites) > 256:
        self._sites.clear()
      sites = self._sites[model] = model.growth_sites()
    return sites

  def site_names(self, model: nn.Module) -> tuple[str, ...]:
    sites = self.sites(model)
    names = self.config.sites or tuple(n for n, s in sites.items() if s.kind == "units")
    for n in names:
      if n not in sites:
        raise KeyError(f"GrowConfig.sites names {n!r}, not a site of {type(model).__name__}; "
                       f"available: {sorted(sites)}.")
    return tuple(names)

  def stats(self, model: nn.Module, variables, x, y, names: Sequence[str],
            offsets: Mapping[str, Array] | None = None) -> Stats:
    fn = self._jit(("stats", model, tuple(names), offsets is not None),
                   lambda: jax.jit(make_stats_fn(model, self.loss, names)))
    return fn(variables, x, y, offsets) if offsets is not None else fn(variables, x, y)

  def learner(self, model: nn.Module, name: str, method: str):
    """Jitted ``(variables, site stats, x, y, psi0, omega0, λ, δ_base, units[K, k], psi_mask)
    -> Learned`` with a leading K axis: all candidate sizes in one call (vmapped unit masks).
    ``psi_mask`` (None, or 0/1 like ``psi0``) zeroes fan-in from padded inputs."""
    cfg = self.config.learn
    loss = self.loss

    def build():
      site = self.sites(model)[name]
      if method == "gn":
        f = lambda v, ss, x, y, psi0, om0, lam, base, units, pm: C.learn_gn(
            site, ss, y, loss, psi0, om0, cfg, lam, base, units, pm)
      elif method == "tiny":
        f = lambda v, ss, x, y, psi0, om0, lam, base, units, pm: C.learn_tiny(
            site, ss, y, loss, psi0, om0, cfg, lam, units)
      elif method == "gradmax":
        f = lambda v, ss, x, y, psi0, om0, lam, base, units, pm: C.learn_gradmax(
            site, ss, y, loss, psi0, om0, cfg, units)
      elif method in ("firefly", "oracle"):
        steps = cfg.firefly_steps if method == "firefly" else cfg.oracle_steps
        lrs = (cfg.firefly_lr,) if method == "firefly" else tuple(cfg.oracle_lrs)
        f = lambda v, ss, x, y, psi0, om0, lam, base, units, pm: C.learn_real(
            model, loss, site, v, ss, x, y, psi0, om0, steps, lrs, units)
      elif method == "random":
        f = lambda v, ss, x, y, psi0, om0, lam, base, units, pm: C.Learned(
            C.calibrated(site, psi0, ss.h), om0, jnp.zeros(()), jnp.zeros(()))
      else:
        raise ValueError(f"No learner for method {method!r}.")
      return jax.jit(jax.vmap(f, in_axes=(None,) * 8 + (0, None)))

    return self._jit(("learn", model, name, method), build)

  def losses_at(self, model: nn.Module, name: str):
    """``(variables, psi, omega, x, y, h, gammas) -> [G]`` real mean loss per fan-out scale."""
    loss = self.loss

    def build():
      site = self.sites(model)[name]

      def f(variables, psi, omega, x, y, h, gammas):
        return jax.vmap(lambda g: C.real_loss(
            model, loss, site, variables, psi, jax.tree.map(lambda o: g * o, omega), x, y,
            h=h))(gammas)
      return jax.jit(f)

    return self._jit(("losses", model, name), build)

  def site_input(self, model: nn.Module, name: str):
    def build():
      site = self.sites(model)[name]

      def f(variables, x):
        _, cache = model.apply(variables, x, mutable=["intermediates"])
        return tree.get(cache, site.h_path + "/0")
      return jax.jit(f)

    return self._jit(("h", model, name), build)

  # -- width buckets ---------------------------------------------------------------------------

  def padded(self, model: nn.Module, variables) -> tuple[nn.Module, dict]:
    """The network padded at every site with inert units up to the next multiple of
    ``config.width_bucket`` (zero fan-in, bias and fan-out: same function, gradient and GN
    model). The identity when ``width_bucket`` is 0. Padded leaves are host (numpy) arrays
    (they only feed compiled calls); the others are ``variables``' own."""
    bucket = self.config.width_bucket
    if not bucket:
      return model, variables
    entry = self._padded_models.get(model)
    if entry is None:  # pad widths and the padded config depend on the model config only
      pads: dict[str, list[int]] = {}
      for name, site in self.sites(model).items():
        target = -(-site.width // bucket) * bucket
        for leaf in site.leaves:
          ndim = np.ndim(tree.get(variables, leaf.path))
          if site.kind != "units" or ndim > 2 or leaf.add not in ("fresh", "zero"):
            raise ValueError(
                f"GrowConfig.width_bucket supports dense sites only (leaves at most 2-D, "
                f"appended along the unit axis); {type(model).__name__} site {name!r} has leaf "
                f"{leaf.path!r} ({ndim}-D, add={leaf.add!r}). Set width_bucket=0 for this model.")
          pads.setdefault(leaf.path, [0] * ndim)[leaf.axis] += target - site.width
      pmodel = model
      for site in self.sites(model).values():
        pmodel = morph.widen_field(pmodel, site.field, -(-site.width // bucket) * bucket)
      if len(self._padded_models) > 256:
        self._padded_models.clear()
      entry = self._padded_models[model] = (
          pmodel, tuple((p, tuple(w)) for p, w in pads.items() if any(w)))
    pmodel, plan = entry
    host = jax.device_get([tree.get(variables, p) for p, _ in plan])
    return pmodel, _with_leaves(variables, {p: _pad_end(a, w) for (p, w), a in zip(plan, host)})

  # -- candidates ---------------------------------------------------------------------------

  def templates(self, model, variables, name: str, k: int, rng) -> tuple[dict, dict]:
    """Initial fan-in (the model's initialiser) and zero fan-out for ``k`` units.

    ``rng`` None: zero fan-in (for learners that compute their own start, ``psi_init="svd"``;
    only sites whose fan-in leaves are all kernels/biases), without tracing the grown model.
    """
    site = self.sites(model)[name]
    if rng is None:
      shapes = {IN: _slice_shapes(site, variables, k, IN),
                OUT: _slice_shapes(site, variables, k, OUT)}
      zeros = {l.path: np.zeros(shapes[l.side][l.name], tree.get(variables, l.path).dtype)
               for l in site.leaves}
      if not all(C._linear_psi_mask({l.name: 0 for l in site.in_leaves}).values()):
        raise ValueError(f"Site {name!r} has normalisation fan-in leaves; zero templates "
                         "(psi_init='svd') need kernel/bias fan-in only.")
      if len(site.out_leaves) != 1:
        raise ValueError(f"Site {name!r} has {len(site.out_leaves)} fan-out leaves; candidate "
                         "learning needs exactly one consumer kernel.")
      return ({l.name: zeros[l.path] for l in site.in_leaves},
              {l.name: zeros[l.path] for l in site.out_leaves})
    _, _, slices = morph.new_unit_slices(model, variables, name, k, rng)
    psi0 = {l.name: jax.device_put(slices[l.path]) for l in site.in_leaves}
    om0 = {l.name: jax.device_put(np.zeros_like(slices[l.path])) for l in site.out_leaves}
    if len(om0) != 1:
      raise ValueError(f"Site {name!r} has {len(om0)} fan-out leaves; candidate learning needs "
                       "exactly one consumer kernel.")
    return psi0, om0

  def candidates(self, model, variables, stats: Stats, name: str, ks: Sequence[int],
                 method: str, damping: float, rng, psi0=None, omega0=None,
                 view: tuple[nn.Module, Any] | None = None) -> list[Candidate]:
    """Learns candidates of every size in ``ks`` at site ``name`` with ``method`` on ``stats``.

    One compiled call: templates of ``max(ks)`` units and a unit mask per size (masked units
    are decoupled, so this is exactly learning each size alone). Sizes share the initial fan-in
    of their first units. ``psi0`` / ``omega0`` (shaped for ``max(ks)`` units) override the
    initial fan-in (default: the model's initialiser) and fan-out (default: zero). ``view``:
    ``self.padded(model, variables)`` when ``stats`` were collected on the padded network
    (``GrowConfig.width_bucket``); candidates are returned in the shapes of ``model``.
    """
    t0 = time.perf_counter()
    prep = self._prepare(model, variables, stats, name, ks, method, damping, rng, psi0, omega0,
                         view)
    lmodel, lvars = view or (model, variables)
    learned = self.learner(lmodel, name, method)(
        lvars, stats.sites[name], stats.x, stats.y, prep["psi0"], prep["om0"],
        np.asarray(damping, np.float32), None, prep["units"], prep["psi_mask"])
    return self._finish(model, variables, name, ks, method, prep, jax.device_get(learned), t0)

  def _prepare(self, model, variables, stats, name, ks, method, damping, rng, psi0=None,
               omega0=None, view=None) -> dict:
    """Host-side inputs of a learner call (templates, unit masks, padding to ``view``).

    With the SVD start (``psi_init="svd"``, no ``psi0`` / ``omega0``) the inputs are constants
    of (model config, site, ks, view config): built once, kept on the device.
    """
    kmax = max(int(k) for k in ks)
    own_start = method == "gn" and psi0 is None and self.config.learn.psi_init == "svd"
    if own_start and omega0 is None:
      key = (model, name, tuple(int(k) for k in ks), view[0] if view is not None else None)
      prep = self._preps.get(key)
      if prep is None:
        prep = self._build_prep(model, variables, stats, name, ks, method, damping, rng,
                                None, None, view)
        prep.update({f: jax.device_put(prep[f]) for f in ("psi0", "om0", "psi_mask", "units")})
        if len(self._preps) > 256:
          self._preps.clear()
        self._preps[key] = prep
      return prep
    return self._build_prep(model, variables, stats, name, ks, method, damping, rng, psi0,
                            omega0, view)

  def _build_prep(self, model, variables, stats, name, ks, method, damping, rng, psi0, omega0,
                  view) -> dict:
    kmax = max(int(k) for k in ks)
    own_start = method == "gn" and psi0 is None and self.config.learn.psi_init == "svd"
    tpl_psi, om0 = self.templates(model, variables, name, kmax, None if own_start else rng)
    if method == "gn" and psi0 is None and self.config.learn.psi_init == "tiny":
      tiny = self.candidates(model, variables, stats, name, [kmax], "tiny", damping, rng,
                             view=view)[0]
      psi0 = tiny.psi
    psi0 = tpl_psi if psi0 is None else psi0
    om0 = om0 if omega0 is None else omega0
    prep = {"psi_shapes": {n: np.shape(v) for n, v in psi0.items()},
            "om_shapes": {n: np.shape(v) for n, v in om0.items()}, "psi_mask": None}
    if view is not None:
      vsite = self.sites(view[0])[name]
      shapes = _slice_shapes(vsite, view[1], kmax, IN)
      oshapes = _slice_shapes(vsite, view[1], kmax, OUT)
      prep["psi_mask"] = {n: _fit(np.ones(np.shape(v), np.float32), shapes[n])
                          for n, v in psi0.items()}
      psi0 = {n: _fit(v, shapes[n]) for n, v in psi0.items()}
      om0 = {n: _fit(v, oshapes[n]) for n, v in om0.items()}
    prep.update(psi0=psi0, om0=om0, units=np.asarray(
        [[1.0] * int(k) + [0.0] * (kmax - int(k)) for k in ks], np.float32))
    return prep

  def _finish(self, model, variables, name, ks, method, prep, learned, t0) -> list[Candidate]:
    """Candidates from a learner's host-side output (unpadded shapes, first k units each)."""
    ks = [int(k) for k in ks]
    site = self.sites(model)[name]
    if prep["psi_mask"] is not None:  # back to the shapes of the unpadded network
      learned = learned._replace(
          psi={n: _fit_each(v, prep["psi_shapes"][n]) for n, v in learned.psi.items()},
          omega={n: _fit_each(v, prep["om_shapes"][n]) for n, v in learned.omega.items()})
    seconds = (time.perf_counter() - t0) / len(ks)
    per_unit, flops_unit, in_axes, out_axes = self._unit_costs(model, name, site, variables)
    predicted = np.asarray(learned.predicted).tolist()
    score = np.asarray(learned.score).tolist()
    out = []
    for i, k in enumerate(ks):
      psi = {n: _first_units(v[i], k, in_axes[n]) for n, v in learned.psi.items()}
      omega = {n: _first_units(v[i], k, out_axes[n]) for n, v in learned.omega.items()}
      out.append(Candidate(site=name, k=k, method=method, psi=psi, omega=omega,
                           predicted=float(predicted[i]), score=float(score[i]),
                           params=per_unit * k, flops=flops_unit * k, seconds=seconds))
    return out

  def _unit_costs(self, model, name, site, variables) -> tuple[int, int, dict, dict]:
    """Parameters and FLOPs per added unit and the unit axes of ``site``'s leaves (functions of
    the model config only: memoised)."""
    key = (model, name)
    out = self._unit_costs_memo.get(key)
    if out is None:
      if len(self._unit_costs_memo) > 256:
        self._unit_costs_memo.clear()
      out = self._unit_costs_memo[key] = (
          site.params_per_unit(variables), site.flops_per_unit(variables),
          {l.name: l.axis for l in site.in_leaves}, {l.name: l.axis for l in site.out_leaves})
    return out

  def fused_candidates(self, model, variables, x, y, names: Sequence[str], ks: Sequence[int],
                       method: str, damping: float, rngs: Mapping[str, Any],
                       view: tuple[nn.Module, Any] | None = None
                       ) -> tuple[Stats, list[Candidate]]:
    """Statistics and the candidates of every site in one compiled call (``GrowConfig.fused``).

    The same results as ``stats`` followed by ``candidates`` per site, with one dispatch and
    one device synchronisation per round instead of one per site. Not for methods whose start
    needs another learner first (``psi_init="tiny"``). The statistics' linearisations
    (``Stats.sites[n].lin``, the upper network's cached vjp) are returned only where a later
    step reads them (``GrowConfig.relinearize``); otherwise they are None and the compiled call
    does not write them out. ``Stats.x`` / ``y`` are the given ``x`` / ``y``; ``Stats.loss`` is
    a host (numpy) scalar: it comes back with the candidates in one transfer (the compiled call
    packs the mean loss and every learned array into one flat array when they share a dtype).
    """
    t0 = time.perf_counter()
    lmodel, lvars = view or (model, variables)
    names = tuple(names)
    preps = {n: self._prepare(model, variables, None, n, ks, method, damping, rngs[n],
                              view=view) for n in names}
    loss = self.loss
    keep_lin = self.config.relinearize > 0
    layout: dict[str, Any] = {}  # filled when the call is traced: how the host output is packed

    def build():
      stats_fn = make_stats_fn(lmodel, loss, names)
      learners = {n: self.learner(lmodel, n, method) for n in names}

      def f(v, x, y, psi0s, om0s, lam, units, masks):
        st = stats_fn(v, x, y)
        learned = {n: learners[n](v, st.sites[n], x, y, psi0s[n], om0s[n], lam, None, units,
                                  masks[n]) for n in names}
        sites = {n: SiteStats(ss.h, ss.lin if keep_lin else None) for n, ss in st.sites.items()}
        leaves, treedef = jax.tree.flatten((st.loss, learned))
        packed = len({l.dtype for l in leaves}) == 1
        layout.update(treedef=treedef, shapes=[l.shape for l in leaves], packed=packed)
        host = jnp.concatenate([l.reshape(-1) for l in leaves]) if packed else (st.loss, learned)
        return st._replace(x=None, y=None, sites=sites), host
      return jax.jit(f), layout

    fn, layout = self._jit(("fused", lmodel, names, method, keep_lin), build)
    units = next(iter(preps.values()))["units"]
    stats, host = fn(lvars, x, y, {n: p["psi0"] for n, p in preps.items()},
                     {n: p["om0"] for n, p in preps.items()}, np.asarray(damping, np.float32),
                     units, {n: p["psi_mask"] for n, p in preps.items()})
    host = jax.device_get(host)
    if layout["packed"]:
      sizes = [math.prod(shape) for shape in layout["shapes"]]
      parts = np.split(host, np.cumsum(sizes)[:-1])
      host = jax.tree.unflatten(layout["treedef"], [
          part.reshape(shape) for part, shape in zip(parts, layout["shapes"])])
    base_loss, learned = host
    cands = []
    for n in names:
      cands += self._finish(model, variables, n, ks, method, preps[n], learned[n], t0)
    return stats._replace(x=x, y=y, loss=base_loss), cands

  def candidate(self, model, variables, stats: Stats, name: str, k: int, method: str,
                damping: float, rng, psi0=None, omega0=None, view=None) -> Candidate:
    """Learns one candidate (``k`` units at site ``name`` with ``method``) on ``stats``."""
    return self.candidates(model, variables, stats, name, [k], method, damping, rng, psi0,
                           omega0, view)[0]

  def relinearized(self, model, variables, stats: Stats, cand: Candidate, rounds: int,
                   damping: float) -> list[Candidate]:
    """Levenberg-Marquardt rounds: re-linearise the upper network at the current candidate
    and solve again (``rounds`` times). Returns the candidate after each round (the last is the
    result; ``seconds`` accumulates from ``cand``'s); predictions are measured from the base
    point.

    Every proposal is checked on the real loss of the statistics batch (the statistics pass at
    the proposal computes it, and the next round reuses that pass): a proposal that does not
    lower the loss is first shortened (``GrowConfig.relin_backtracks`` halvings of the step
    from the current candidate; a shortened step that lowers the loss is taken and λ doubled),
    else rejected and λ multiplied by 2, 4, 8, … for each rejection in a row (Nielsen's rule);
    after a full step λ follows ``lm_damping``; within ``GrowConfig.damping_bounds``. The
    damping of a round is proximal (towards the current candidate; ``C.learn_gn``). Without
    the check the rounds diverge where the upper network is far from linear over the step (the
    first hidden layer of the teacher-student MLP: real loss rising by 10-1000x the oracle's
    decrease within 2-4 unchecked rounds); without the backtracking its first rounds there are
    mostly rejected (a statistics pass costs a few percent of a solve). Costs ``rounds + 1``
    statistics passes, plus one per backtracking step.
    """
    name = cand.site
    site = self.sites(model)[name]
    t0 = time.perf_counter()
    ss = stats.sites[name]
    psi, omega = cand.psi, cand.omega
    learner = self._jit(("relin", model, name), lambda: jax.jit(
        lambda ss, y, psi0, om0, lam, base: C.learn_gn(site, ss, y, self.loss, psi0, om0,
                                                       self.config.learn, lam, base)))
    delta_of = self._jit(("relin_delta", model, name), lambda: jax.jit(
        lambda psi, omega, h: C.candidate_delta(site, psi, omega, h)))
    prediction = self._jit(("relin_pred", model, name), lambda: jax.jit(
        lambda lin, y, d: -C.gn_model(lin, self.loss, y, d)))

    def at(psi, omega):
      """(δ, statistics linearised at the point, its real loss)."""
      d = delta_of(psi, omega, ss.h)
      st = self.stats(model, variables, stats.x, stats.y, (name,), offsets={name: d})
      return d, st, self._offset_loss(st.sites[name], stats.y)

    delta, cur, cur_loss = at(psi, omega)
    # The one-shot step's own agreement (its real loss is in this first pass) sets the start.
    realised = float(stats.loss) - cur_loss
    lam = lm_damping(float(damping), realised / cand.predicted if cand.predicted > 0 else
                     float("nan"), self.config.damping_bounds)
    out_cands = []
    grow_by = 2.0
    pred = None  # the base-point GN prediction of the current candidate (changes on acceptance)
    for _ in range(rounds):
      out = learner(cur.sites[name], stats.y, psi, omega, jnp.asarray(lam, jnp.float32), delta)
      new_psi, new_omega = jax.device_get(out.psi), jax.device_get(out.omega)
      new_delta, new, new_loss = at(new_psi, new_omega)
      realised, predicted = cur_loss - new_loss, float(out.predicted)
      step, trial = 1.0, (new_psi, new_omega)
      for _ in range(self.config.relin_backtracks):
        if math.isfinite(new_loss) and realised > 0:
          break
        # Backtrack along the segment to the proposal: statistics passes only, no new solve.
        step *= 0.5
        trial = jax.tree.map(lambda a, b: a + step * (b - a), (psi, omega), (new_psi, new_omega))
        new_delta, new, new_loss = at(*trial)
        realised = cur_loss - new_loss
      if math.isfinite(new_loss) and realised > 0:
        psi, omega = trial
        delta, cur, cur_loss, pred = new_delta, new, new_loss, None
        if step == 1.0:
          lam = lm_damping(lam, realised / predicted if predicted > 0 else float("nan"),
                           self.config.damping_bounds)
          grow_by = 2.0
        else:  # the full step was too long: a shorter one next round
          lam = min(lam * 2.0, self.config.damping_bounds[1])
      else:  # rejected: λ grows faster with each rejection in a row (Nielsen's rule)
        lam = min(lam * grow_by, self.config.damping_bounds[1])
        grow_by *= 2.0
      if pred is None:
        pred = float(prediction(ss.lin, stats.y, delta))
      out_cands.append(cand._replace(psi=psi, omega=omega, predicted=pred, score=pred,
                                     seconds=cand.seconds + time.perf_counter() - t0))
    return out_cands

  def _offset_loss(self, ss: SiteStats, y) -> float:
    """Mean real loss at the point a site's statistics were linearised at (``Stats.loss`` is
    at the base point)."""
    return float(jnp.mean(self.loss.value(ss.lin.z, y)))

  def real_losses(self, model, variables, cand: Candidate, x, y, gammas, h=None,
                  view: tuple[nn.Module, Any] | None = None) -> np.ndarray:
    """Real mean loss on ``(x, y)`` with the candidate applied at each fan-out scale.

    ``view``: evaluate on ``self.padded(model, variables)`` (``h`` then from the padded network).
    """
    psi, omega = cand.psi, cand.omega
    if view is not None:
      model, variables = view
      vsite = self.sites(model)[cand.site]
      shapes = _slice_shapes(vsite, variables, cand.k, IN)
      oshapes = _slice_shapes(vsite, variables, cand.k, OUT)
      psi = {n: _fit(v, shapes[n]) for n, v in psi.items()}
      omega = {n: _fit(v, oshapes[n]) for n, v in omega.items()}
    if h is None:
      h = self.site_input(model, cand.site)(variables, x)
    return np.asarray(self.losses_at(model, cand.site)(variables, psi, omega, x, y, h,
                                                       np.asarray(gammas, np.float32)))


def lm_damping(damping: float, rho: float, bounds: tuple[float, float]) -> float:
  """Levenberg-Marquardt update of λ from ``ρ`` = realised / predicted decrease: doubled when
  ``ρ < 0.25`` or undefined (NaN: a rejected step), halved when ``ρ > 0.75``, within
  ``bounds = (lo, hi)``."""
  lo, hi = bounds
  if not rho >= 0.25:
    return min(damping * 2.0, hi)
  if rho > 0.75:
    return max(damping / 2.0, lo)
  return damping


def _with_leaves(variables, updates: Mapping[str, Any]) -> dict:
  """Copy of nested dicts ``variables`` with the leaves at the given paths replaced."""
  out = dict(variables)
  for path, value in updates.items():
    parts = path.split("/")
    node = out
    for part in parts[:-1]:
      node[part] = dict(node[part])
      node = node[part]
    node[parts[-1]] = value
  return out


def _slice_shapes(site: Site, variables, k: int, side: str) -> dict[str, tuple[int, ...]]:
  """``{leaf name: shape}`` of ``k`` new units' slices of the ``side`` leaves of ``site``."""
  out = {}
  for leaf in (site.in_leaves if side == IN else site.out_leaves):
    shape = list(np.shape(tree.get(variables, leaf.path)))
    shape[leaf.axis] = k
    out[leaf.name] = tuple(shape)
  return out


def _fit(x, shape: tuple[int, ...]) -> np.ndarray:
  """``x`` cut or zero-padded at the end of each axis to ``shape`` (padded ↔ unpadded slices)."""
  x = np.asarray(x)
  x = x[tuple(slice(0, s) for s in shape)]
  if x.shape != tuple(shape):
    out = np.zeros(shape, x.dtype)
    out[tuple(slice(0, d) for d in x.shape)] = x
    x = out
  return x


def _fit_each(x, shape: tuple[int, ...]) -> np.ndarray:
  """``_fit`` of every ``x[i]`` (a leading batch axis kept)."""
  x = np.asarray(x)
  return np.stack([_fit(v, shape) for v in x]) if np.any(np.less(x.shape[1:], shape)) else (
      x[(slice(None),) + tuple(slice(0, s) for s in shape)])


def _pad_end(x, widths: Sequence[int]) -> np.ndarray:
  """``x`` zero-padded by ``widths[i]`` at the end of axis ``i``."""
  x = np.asarray(x)
  out = np.zeros(tuple(d + w for d, w in zip(x.shape, widths)), x.dtype)
  out[tuple(slice(0, d) for d in x.shape)] = x
  return out


def _first_units(x: np.ndarray, k: int, axis: int) -> np.ndarray:
  """The first ``k`` entries of ``x`` along ``axis`` (a copy)."""
  return np.array(x[(slice(None),) * (axis % x.ndim) + (slice(0, k),)])


class RoundResult(NamedTuple):
  model: nn.Module
  variables: dict
  records: list[dict]
  damping: float
  candidates: list[Candidate]


def _finite(c: Candidate) -> bool:
  vals = [c.predicted, c.score] + [float(np.sum(np.asarray(a))) for a in
                                   jax.tree.leaves((c.psi, c.omega))]
  return all(math.isfinite(v) for v in vals)


def grow_round(searcher: Searcher, model: nn.Module, variables, x, y, *, damping: float,
               rng: Array, budget: int | None = None) -> RoundResult:
  """One growth round on the statistics batch ``(x, y)`` (see module docstring).

  Returns:
    ``RoundResult(model, variables, records, damping, candidates)``; ``records`` holds one dict
    per applied or rejected morphism (``op``: ``"add_units"`` / ``"split_units"`` /
    ``"rejected"``) with predicted and realised loss changes, γ, ρ and λ.
  """
  cfg = searcher.config
  budget = cfg.budget(tree.count(variables["params"])) if budget is None else budget
  names = searcher.site_names(model)
  records: list[dict] = []
  if cfg.method in ("random", "net2net"):
    return _structural_round(searcher, model, variables, x, y, names, host_rng(rng), rng, budget,
                             damping)

  view = searcher.padded(model, variables) if cfg.width_bucket else None
  own_start = cfg.method == "gn" and cfg.learn.psi_init == "svd"  # no random fan-in needed
  rngs = {name: rng if own_start else jax.random.fold_in(rng, zlib.crc32(name.encode()))
          for name in names}
  if cfg.fused:
    stats, cands = searcher.fused_candidates(model, variables, x, y, names, cfg.ks, cfg.method,
                                             damping, rngs, view=view)
  else:
    stats = searcher.stats(*(view or (model, variables)), x, y, names)
    cands = []
    for name in names:
      cands += searcher.candidates(model, variables, stats, name, cfg.ks, cfg.method, damping,
                                   rngs[name], view=view)
  base_loss = float(stats.loss)
  all_cands = list(cands)
  pool = list(cands)
  # Statistics on the current network, by site; the pooled candidates of these sites were
  # learned on it.
  fresh = {name: stats for name in names}
  blocked: set[str] = set()  # sites whose candidate was rejected in this round
  spent = 0
  applied = 0

  def refresh(name):
    """Re-solves every size at site ``name`` on the current network (replacing its pooled
    candidates)."""
    nonlocal view, base_loss, pool
    view = searcher.padded(model, variables) if cfg.width_bucket else None
    fresh[name] = searcher.stats(*(view or (model, variables)), x, y, (name,))
    base_loss = float(fresh[name].loss)
    pool = [c for c in pool if c.site != name] + searcher.candidates(
        model, variables, fresh[name], name, cfg.ks, cfg.method, damping, rngs[name], view=view)

  while applied < cfg.max_morphisms:
    fits = [c for c in pool if c.site not in blocked and (not applied or
                                                          spent + c.params <= budget)]
    if not fits:
      break
    cand = max(fits, key=lambda c: c.rank_value(cfg.rank_by))
    if cand.site not in fresh:
      # Gains are not additive: re-solve the site's candidates on the grown network and choose
      # again.
      refresh(cand.site)
      continue
    if cfg.method == "gn" and cfg.relinearize:
      cand = searcher.relinearized(model, variables, fresh[cand.site], cand, cfg.relinearize,
                                   damping)[-1]
    reason = None
    if not _finite(cand):
      reason = "non-finite candidate (NaN/inf)"
    elif cfg.method in MODEL_BASED and cand.predicted <= 0:
      reason = f"predicted gain {cand.predicted:.3g} <= 0"
    if reason is None:
      gammas = np.asarray(cfg.gammas, np.float32)
      losses = searcher.real_losses(model, variables, cand, x, y, gammas,
                                    h=fresh[cand.site].sites[cand.site].h, view=view)
      if not np.all(np.isfinite(losses)):
        reason = "non-finite loss in the line search"
    if reason is not None:
      records.append({"op": "rejected", "site": cand.site, "k": cand.k, "method": cfg.method,
                      "reason": reason, "predicted": cand.predicted, "damping": damping})
      blocked.add(cand.site)
      continue
    best = int(np.argmin(losses))
    gamma = float(gammas[best])
    realised = base_loss - float(losses[best])
    full = int(np.argmin(np.abs(gammas - 1.0)))
    realised_full = base_loss - float(losses[full])
    rho = realised_full / cand.predicted if cand.predicted > 0 else float("nan")
    old_damping = damping
    if cfg.adapt_damping and cfg.method in MODEL_BASED and math.isfinite(rho):
      damping = lm_damping(damping, rho, cfg.damping_bounds)
    omega = jax.tree.map(lambda o: gamma * np.asarray(o), cand.omega)
    model, variables, rec = morph.add_units(model, variables, cand.site, cand.k, rng=rng,
                                            fan_in=cand.psi, fan_out=omega)
    rec.update({"method": cfg.method, "predicted": cand.predicted, "realised": realised,
                "realised_at_1": realised_full, "gamma": gamma, "rho": rho,
                "damping": old_damping, "damping_next": damping, "score": cand.score,
                "flops_added": cand.flops, "loss_before": base_loss,
                "seconds_learn": cand.seconds})
    records.append(rec)
    spent += cand.params
    applied += 1
    # The grown site may be chosen again: re-solve every size there on the grown network (the
    # other sites' candidates are re-solved only if chosen).
    pool = [c for c in pool if c.site != cand.site]
    fresh = {}
    if applied < cfg.max_morphisms and any(spent + c.params <= budget for c in all_cands
                                           if c.site == cand.site):
      refresh(cand.site)
  return RoundResult(model, variables, records, damping, all_cands)


def _structural_round(searcher, model, variables, x, y, names, gen, rng, budget, damping):
  """Random growth (zero fan-out at random sites) and Net2Net splitting of random units."""
  cfg = searcher.config
  records = []
  spent = 0
  for _ in range(cfg.max_morphisms):  # like the learned methods: a site may be drawn again
    name = names[int(gen.integers(len(names)))]
    site = model.growth_sites()[name]
    k = int(cfg.ks[gen.integers(len(cfg.ks))]) if len(cfg.ks) > 1 else int(cfg.ks[0])
    params = site.params_per_unit(variables) * k
    if records and spent + params > budget:
      continue
    if cfg.method == "net2net":
      units = sorted(gen.choice(site.width, size=min(k, site.width), replace=False).tolist())
      model, variables, rec = morph.split_units(model, variables, name, units,
                                                ratio=float(gen.uniform(0.3, 0.7)))
    else:
      model, variables, rec = morph.add_units(model, variables, name, k, rng=rng)
    rec.update({"method": cfg.method, "predicted": 0.0, "realised": 0.0, "gamma": 0.0,
                "damping": damping})
    records.append(rec)
    spent += params
  return RoundResult(model, variables, records, damping, [])
