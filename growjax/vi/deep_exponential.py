"""Gaussian deep exponential families: exact posterior, CAVI variants and the forest mixture bound.

Lawton, Ver Steeg & Galstyan (UAI 2018), "Parallel inference for deep exponential families via
the forest mixture bound", arXiv:1805.06951 (METHODS.md §8).

Model (layers ``z^L -> ... -> z^1 -> x``; layer 0 is the observed ``x``)::

    z^L_i ~ N(b^L_i, s^L_i),   z^l_c | z^{l+1} ~ N(sum_i W^l_ci z^{l+1}_i + b^l_c, s^l_c),
    x_c | z^1 ~ N(sum_i W^0_ci z^1_i + b^0_c, s^0_c).

``W^l`` is ``weights[l]``, the map from layer ``l+1`` (parents) to layer ``l`` (children),
either dense ``[n_l, n_{l+1}]`` or sparse: ``parents[l]`` int ``[n_l, K_l]`` (child -> parent index
arrays) with ``weights[l]`` ``[n_l, K_l]``. ``variances`` are the conditional variances ``s^l``.
Mean-field ``q(z) = prod_i N(m_i, v_i)``. Writing ``r_c = E[z_c] - sum_i W_ci m_i - b_c`` (with
``E[x_c] = x_c``) and ``Lam_ii = 1/s_i + sum_{c in ch(i)} W_ci^2 / s_c``::

    ELBO = const - 1/2 sum_c r_c^2 / s_c - 1/2 sum_i Lam_ii v_i + 1/2 sum_i log v_i.

So in the Gaussian case the ELBO separates into a quadratic in the means, whose maximiser is the
exact posterior mean (the mean-field means are exact), plus a separable function of the variances
maximised by ``v_i = 1 / Lam_ii``. Every method below sets the variances to that value in closed
form on each iteration; the methods differ in how they move the means:

* ``sequential``: CAVI, one unit at a time (Gauss-Seidel on the precision matrix).
* ``parallel``: naive parallel (Jacobi) CAVI, a whole layer at once, each unit's CAVI update
  computed from the old values of its co-parents. Diverges when ``2 diag(Lam) - Lam`` is not
  positive definite, e.g. one child with ``k`` parents of equal ``a = w^2/s_c`` diverges when
  ``(k - 2) a > 1`` (contraction factor ``a (k-1) / (1 + a)``). Because the Gaussian ELBO
  increases on a Jacobi step exactly when that matrix is positive definite along the step,
  divergence is detected as a decrease of the ELBO.
* ``block``: block-coordinate CAVI; the blocks of a layer are the colour classes of its co-parent
  graph (``growjax.graphs.greedy_coloring``). Units of one colour share no child, hence do not
  interact, so updating a class in parallel is exact coordinate ascent.
* ``fm``: the forest mixture (FM) bound. For each child pick mixture weights ``pi_c`` over its
  parents and split its bias ``b_c = sum_i b_ci``; by convexity of ``A(eta) = eta^2 / 2``,
  ``E[eta_c^2] <= sum_i E[(W_ci z_i + b_ci)^2] / pi_ci``, which makes the ELBO separable over the
  units of a layer (a pi-mixture of forests; tight for a forest). With the tight bias split
  ``b_ci = pi_ci E[eta_c] - W_ci m_i`` the bound touches the ELBO's mean part at the current
  means, so maximising it over a layer is a minorise-maximise step and the ELBO never decreases.
  The maximiser is (this is growjax's exact update; METHODS.md §8 derives it from the abstract,
  the paper's own update may differ in detail)::

      P_i = 1/s_i + sum_{c in ch(i)} W_ci^2 / (pi_ci s_c),   m_i <- m_i + g_i / P_i,

  with ``g_i`` the exact ELBO gradient in ``m_i`` and ``pi_ci = |W_ci| sqrt(v_i) / sum_k |W_ck|
  sqrt(v_k)`` (``mixture="abs_w_sqrt_v"``: the ``pi`` that minimises the bound's slack in the
  variance terms ``sum_i W_ci^2 v_i / pi_ci``). Since the variances are set to ``1/Lam_ii`` in
  closed form, ``pi`` and ``P`` are constants of the model, computed once by ``prepare``.
  Written out, ``P_i = Lam_ii + sum_c sum_{j != i} |W_ci W_cj| sqrt(v_j / v_i) / s_c``: a
  diagonal majoriser of the precision built child by child (any ``pi`` keeps ``P >= Lam``, hence
  monotone ascent; this one is a scaled l1-Jacobi bound). For a forest ``pi = 1`` and
  ``P = Lam``: FM is then exact coordinate ascent over whole layers (in a one-latent-layer forest
  the optimum after one iteration; deeper forests still couple adjacent layers).
* ``fm_ls``: the FM step scaled by the exact maximiser of the ELBO along it, per layer
  (growjax's extension; ``forest_mixture(line_search=True)``). ``P`` over-estimates the precision
  wherever a child has several comparable parents, so the plain step is short there (on the
  benchmark model with ``eps = 1`` the eigenvalues of ``P^-1 Lam`` lie in [0.04, 0.60]); the
  search lengthens it at the cost of a few reductions, stays monotone and exact on forests.
* ``fm_cg``: conjugate FM directions (growjax's extension;
  ``forest_mixture(line_search=True, conjugate=True)``). At the optimal variances the ELBO is a
  concave quadratic in the means with Hessian ``-Lam``, and ``P`` is an SPD preconditioner
  (exact, ``P = Lam``, on a one-latent-layer forest). ``fm_ls`` is preconditioned steepest
  ascent with exact line search; ``fm_cg`` is preconditioned conjugate gradients: with
  ``z_t = g_t / P`` and ``rho_t = g_t . z_t`` over all latent units,
  ``d_t = z_t + (rho_t / rho_{t-1}) d_{t-1}`` (Fletcher-Reeves in the ``P^-1`` metric, which on a
  quadratic with exact search is PCG), restarted at ``d_t = z_t`` when ``g_t . d_t <= 0``, then
  ``m += alpha d_t`` with one ``alpha = g_t . d_t / d_t^T Lam d_t`` for all layers jointly
  (``d^T Lam d = sum_l |d_l - W^l d_{l+1}|^2 / s_l``, ``d_0 = d_{L+1} = 0``; per-layer
  ``alpha``s would break conjugacy). The gradient of every layer is taken at the same point, so
  a sweep is not bottom-up Gauss-Seidel over layers as in ``fm`` / ``fm_ls``; with one latent
  layer the first step equals ``fm_ls``'s, so a forest still converges in one iteration. Same
  sparse products per iteration as ``fm_ls`` (``W^T r`` for the gradient, ``W d`` for the
  curvature along ``d``); ``d_{t-1}`` and ``rho_{t-1}`` are carried in ``DEFState.memory``.
  Monotone: ``alpha`` maximises the ELBO along an ascent direction.

All updates are vectorised over a layer; layers are swept bottom-up (``1..L``). Everything is
jit-able; the caller jits (e.g. ``jax.jit(functools.partial(solve, solver))(model)``).

Repeated inference (one model, many observation vectors ``x``): everything that depends only on
the weights and variances (``Lam``, ``1/Lam``, ``P``, the ELBO's variance terms, the update
coefficients with ``1/s`` and the divisor folded in) is a ``DEFPrepared`` built by
``solver.prepare(model)``; pass it to ``solve(..., prepared=...)`` (a jit argument, or vmap over
``x``) and each solve does only the ``x``-dependent work. Unprepared solves call ``prepare``
themselves, so both paths run the same iterations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from growjax.graphs import greedy_coloring

Array = jax.Array

# Degree buckets of the transposed product (SparseLayout): 1, measured fastest on the benchmark
# model (2-4 buckets were slower on XLA:CPU, see SparseLayout).
TRANSPOSED_BUCKETS = 1
METHODS = ("sequential", "parallel", "block", "fm", "fm_ls", "fm_cg")
MIXTURES = ("abs_w_sqrt_v", "abs_w", "uniform")
CRITERIA = ("elbo", "means")


class GaussianDEF(NamedTuple):
  """A layered linear-Gaussian model (build it with ``gaussian_def``; fields are per layer).

  Attributes:
    x: observed values ``[n_0]``.
    biases: ``L + 1`` arrays ``[n_l]``, layer 0 (observed) to ``L`` (top; its prior mean).
    variances: ``L + 1`` arrays ``[n_l]`` of conditional variances ``s^l`` (all > 0).
    weights: ``L`` arrays; ``weights[l]`` maps layer ``l + 1`` to layer ``l``: dense
      ``[n_l, n_{l+1}]`` or sparse ``[n_l, K_l]``.
    parents: ``L`` entries: ``None`` (dense layer) or int ``[n_l, K_l]`` parent indices.
    layout: ``L`` entries: ``None`` (dense) or the ``SparseLayout`` of a sparse layer, built by
      ``gaussian_def`` (the arrays the iterations actually read).
  """
  x: Array
  biases: tuple
  variances: tuple
  weights: tuple
  parents: tuple
  layout: tuple

  @property
  def num_layers(self) -> int:
    """Number of latent layers ``L``."""
    return len(self.weights)

  @property
  def sizes(self) -> tuple[int, ...]:
    """``(n_0, n_1, ..., n_L)``."""
    return tuple(int(b.shape[0]) for b in self.biases)


class SparseLayout(NamedTuple):
  """Index arrays of a sparse layer ``l`` (child layer ``l``, parent layer ``l + 1``).

  The parallel passes read slot-major child -> parent arrays: on XLA:CPU a sum of ``K``
  one-dimensional gathers ``m[parents_t[k]]`` is 5-10x faster than one two-dimensional gather
  ``m[parents]``, and the transposed product is ``K`` one-dimensional scatter-adds over the same
  arrays (no padding). Zero weights are moved to the back of each child's slots and slots that
  are zero for every child dropped (``K_l`` here is the most nonzero parents of any child), so a
  forest stored with ``K > 1`` slots costs one slot. The unit-at-a-time loops (sequential and
  block CAVI) read unit-major parent -> child rows, so one unit's children are one contiguous
  row. Zero weights are left out of the children arrays (they carry no interaction); their
  padding has index 0 and weight 0.

  The transposed product ``W^T r`` of the parallel passes gathers over slot-major parent ->
  child arrays, split into degree buckets: the parents sorted by their number of children (most
  first) and cut into at most ``B`` contiguous groups (cuts chosen to minimise the padded slots
  ``sum_b D_b n_b``, ``transposed_degree_buckets``), each group padded only to its own largest
  degree. A product is one gather sum per bucket, the buckets' results concatenated and put
  back in unit order by one gather with ``bucket_inverse``. On the benchmark model (1000
  parents, 10 children on average, at most 21) one bucket reads 21000 slots, three 12300; yet
  on XLA:CPU the bucketed product is slower there (measured in the FM solves: ~2 us more per
  iteration and per preparation with 2-4 buckets): the padded slots are cheap next to the
  un-permuting gather, which XLA fuses with the buckets' concatenation into one loop whose
  bucket per element is random. So the default is one bucket (``TRANSPOSED_BUCKETS``); more
  pay where degrees are far more skewed than the padding is wide.

  Attributes:
    parents_t: int ``[K_l, n_l]``: ``parents.T``, nonzero weights first, all-zero slots dropped.
    weights_t: ``[K_l, n_l]``: the matching weights (padding: index 0, weight 0).
    children: int ``[n_{l+1}, D_l]``: each parent's children, padded.
    child_weights: ``[n_{l+1}, D_l]``: the matching weights (0 on padding).
    children_t: ``B`` int arrays ``[D_b, n_b]``: the children of bucket ``b``'s parents,
      slot-major (``sum_b n_b = n_{l+1}``, ``D_b >= 1``).
    child_weights_t: ``B`` arrays ``[D_b, n_b]``: the matching weights (0 on padding).
    bucket_inverse: int ``[n_{l+1}]``: the position of each parent in the concatenated buckets,
      or ``None`` for one bucket in unit order.
  """
  parents_t: Array
  weights_t: Array
  children: Array
  child_weights: Array
  children_t: tuple
  child_weights_t: tuple
  bucket_inverse: Array | None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["precision", "variances", "curvature", "noise_precision",
                                "elbo_offset", "coefficients"],
                   meta_fields=["method"])
@dataclasses.dataclass(frozen=True)
class DEFPrepared:
  """Model-only quantities of a solver: everything a solve needs that does not depend on ``x``.

  Built by ``solver.prepare(model)`` (jit-able). For repeated inference (one model, many
  observation vectors: per-data-point posteriors) prepare once and pass it to every solve
  (``solve(solver, model._replace(x=x), prepared=prepared)``, or ``jax.vmap`` over ``x``); each
  solve then does only the ``x``-dependent work. A pytree: pass it as a jit argument.

  Attributes:
    precision: ``L`` arrays ``[n_l]``: ``Lam_ii``, the diagonal of the posterior precision.
    variances: ``L`` arrays ``[n_l]``: the optimal mean-field variances ``1 / Lam_ii``.
    curvature: ``L`` arrays ``[n_l]``: the per-unit divisor of a parallel update (``Lam_ii`` for
      CAVI-type methods, ``P_i`` for the FM bound).
    noise_precision: ``L + 1`` arrays ``[n_l]``: ``1 / s^l``.
    elbo_offset: scalar: the ELBO at the optimal variances minus its fit term, so that
      ``ELBO = elbo_offset - 1/2 sum_c r_c^2 / s_c`` for every state a step returns.
    coefficients: ``L`` method-specific entries: the update's coefficients with ``1 / s`` and the
      divisor folded into the weights (see ``_parallel_coefficients``, ``_sweep_coefficients``).
    method: static tag of the solver (and its configuration) that built it.
  """
  precision: tuple
  variances: tuple
  curvature: tuple
  noise_precision: tuple
  elbo_offset: Array
  coefficients: tuple
  method: str


class DEFState(NamedTuple):
  """Mean-field state of a Gaussian DEF and the model-only quantities every update reuses.

  Attributes:
    means: ``L`` arrays ``[n_l]``, latent layers ``1..L``.
    variances: ``L`` arrays ``[n_l]``.
    residuals: ``L + 1`` arrays ``[n_l]``: ``r_l = E[z^l] - W^l m_{l+1} - b^l``
      (``r_L = m_L - b^L``).
    prepared: the solver's ``DEFPrepared`` (model-only; does not change along a solve).
    iteration: number of iterations taken (int scalar).
    memory: method-specific carried quantities: ``None``, or for ``fm_cg`` a ``CGMemory`` (the
      previous direction and ``g^T P^-1 g``).
    elbo: ``None``, or the ELBO of this state at the optimal variances (``elbo_offset - 1/2
      sum r^2 / s``) carried along: ``solve`` sets it, and the steps whose ELBO gain is a
      by-product of the step (``fm_ls`` / ``fm_cg``: ``alpha g.d - alpha^2 d^T Lam d / 2`` from
      the line search's own reductions; sequential CAVI: ``sum_i Lam_ii delta_i^2 / 2`` over
      its coordinate moves) add it, so the stopping rule needs no fit reduction over the
      residuals; the other steps return ``None`` and ``solve`` recomputes it.
  """
  means: tuple
  variances: tuple
  residuals: tuple
  prepared: DEFPrepared
  iteration: Array
  memory: Any = None
  elbo: Array | None = None

  @property
  def precision(self) -> tuple:
    """``L`` arrays ``[n_l]``: ``Lam_ii``, the diagonal of the posterior precision."""
    return self.prepared.precision

  @property
  def curvature(self) -> tuple:
    """``L`` arrays ``[n_l]``: the per-unit divisor of a parallel update."""
    return self.prepared.curvature


class CGMemory(NamedTuple):
  """What ``fm_cg`` carries from one iteration to the next.

  Attributes:
    direction: ``L`` arrays ``[n_l]``: the previous search direction ``d_{t-1}`` (zeros at the
      start, so the first direction is ``P^-1 g``).
    rho: scalar ``g_{t-1}^T P^-1 g_{t-1}`` (1 at the start: any positive value, ``d`` is 0).
  """
  direction: tuple
  rho: Array


class DEFSolver(NamedTuple):
  """A mean-field method for Gaussian DEFs: pure ``prepare``, ``init`` and ``step`` (optax style).

  Attributes:
    init: ``init(model, means=None, variances=None, prepared=None) -> DEFState``; means default
      to 0 and variances to their optimum ``1 / Lam_ii`` (what every step sets them to);
      ``prepared`` defaults to ``prepare(model)``.
    step: ``step(model, state) -> DEFState``: one iteration (a sweep over every latent unit).
    name: the method's name (one of ``METHODS``).
    prepare: ``prepare(model) -> DEFPrepared``: the model-only quantities (independent of
      ``x``); compute once per model for repeated inference.
  """
  init: Callable[..., DEFState]
  step: Callable[[GaussianDEF, DEFState], DEFState]
  name: str
  prepare: Callable[[GaussianDEF], DEFPrepared]


class SolveInfo(NamedTuple):
  """What ``solve`` reports.

  Attributes:
    elbo: ``[max_iters + 1]`` ELBO of the initial state and after each iteration; NaN after stop.
    iterations: number of iterations run.
    converged: the stopping rule fired.
    diverged: the ELBO decreased (beyond rounding) or became non-finite.
  """
  elbo: Array
  iterations: Array
  converged: Array
  diverged: Array


class ExactPosterior(NamedTuple):
  """The exact Gaussian posterior ``p(z | x)`` (reference for every method).

  Attributes:
    means: ``L`` arrays ``[n_l]``: posterior means (equal to the mean-field optimum's means).
    variances: ``L`` arrays ``[n_l]``: the mean-field optimum's variances ``1 / Lam_ii``.
    covariance: ``[N, N]`` exact posterior covariance, units stacked layer 1 first.
    precision: ``[N, N]`` posterior precision ``Lam``.
  """
  means: tuple
  variances: tuple
  covariance: Array
  precision: Array


# ------------------------------------------------------------------------------------------------
# Construction and validation (numpy, outside jit: shapes and index arrays are structure).


def _as_layer_list(value, count: int, what: str) -> list:
  if value is None or (not isinstance(value, (list, tuple)) and np.ndim(value) == 0):
    return [value] * count
  value = list(value)
  if len(value) != count:
    raise ValueError(f"{what} must give one entry per layer (observed + {count - 1} latent = "
                     f"{count}), got {len(value)} entries.")
  return value


def _children_of(parents: np.ndarray, weights: np.ndarray, num_parents: int, dtype
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Transposes child -> parent index arrays into padded parent -> child arrays.

  Zero weights carry no interaction, so they are left out (padding has weight 0, index 0).
  """
  rows, ks = np.nonzero(weights != 0)
  pa = parents[rows, ks]
  order = np.argsort(pa, kind="stable")
  pa, rows, ks = pa[order], rows[order], ks[order]
  counts = np.bincount(pa, minlength=num_parents)
  degree = max(int(counts.max(initial=0)), 1)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  slot = np.arange(len(pa)) - starts[pa]
  children = np.zeros((num_parents, degree), np.int32)
  child_weights = np.zeros((num_parents, degree), dtype)
  children[pa, slot] = rows
  child_weights[pa, slot] = weights[rows, ks]
  return children, child_weights


def transposed_degree_buckets(degree: np.ndarray, max_buckets: int) -> list[np.ndarray]:
  """Parents grouped by degree for the bucketed transposed product (see ``SparseLayout``).

  Sorts the parents by degree (most first, ties in unit order) and cuts the order into at most
  ``max_buckets`` contiguous groups minimising the padded slots ``sum_b n_b max(D_b, 1)``
  (dynamic programming over the distinct degrees: a cut inside a run of equal degrees never
  helps). Empty groups are dropped.

  Args:
    degree: int ``[n]``: number of children of each parent.
    max_buckets: the most groups (>= 1).

  Returns:
    Unit index arrays, one per bucket, in order of decreasing degree; their concatenation is a
    permutation of ``range(n)`` (the identity when there is one bucket).
  """
  if max_buckets < 1:
    raise ValueError(f"max_buckets must be >= 1, got {max_buckets}.")
  order = np.argsort(-degree, kind="stable")
  if len(order) == 0:
    return [order]
  d = np.maximum(degree[order], 1)
  starts = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))  # runs of equal degree
  bounds = np.append(starts, len(d))
  g = len(starts)
  # cost[b, j]: least padded slots covering runs [0, j) with b buckets; a bucket starting at
  # run i has the width of run i (degrees decrease).
  cost = np.full((max_buckets + 1, g + 1), np.inf)
  cost[0, 0] = 0.0
  arg = np.zeros((max_buckets + 1, g + 1), np.int64)
  for b in range(1, max_buckets + 1):
    for j in range(1, g + 1):
      i = np.arange(j)
      c = cost[b - 1, :j] + (bounds[j] - bounds[i]) * d[bounds[i]]
      arg[b, j] = int(np.argmin(c))
      cost[b, j] = c[arg[b, j]]
  b = int(np.argmin(cost[1:, g])) + 1  # fewest buckets among the cheapest
  cuts, j = [], g
  while b > 0:
    cuts.append(arg[b, j])
    j = arg[b, j]
    b -= 1
  edges = [int(bounds[c]) for c in reversed(cuts)] + [len(d)]
  groups = [order[a:e] for a, e in zip(edges[:-1], edges[1:]) if e > a]
  # One bucket: unit order (no permutation to undo).
  return groups if len(groups) > 1 else [np.arange(len(order))]


def _compact_slots(parents: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Moves each child's nonzero weights to the front and drops the slots that are zero for all.

  The parallel passes touch every slot of the slot-major arrays, so explicit zeros (e.g. a
  forest stored with ``K > 1`` slots) would cost work without carrying any interaction. Keeps at
  least one slot; padding has index 0 and weight 0.
  """
  nz = weights != 0
  order = np.argsort(~nz, axis=1, kind="stable")
  width = max(int(nz.sum(axis=1).max(initial=0)), 1)
  order = order[:, :width]
  keep = np.take_along_axis(nz, order, axis=1)
  slot_parents = np.where(keep, np.take_along_axis(parents, order, axis=1), 0)
  slot_weights = np.where(keep, np.take_along_axis(weights, order, axis=1), 0).astype(weights.dtype)
  return slot_parents, slot_weights


def gaussian_def(x, weights: Sequence[Any], *, parents: Sequence[Any] | None = None,
                 biases: Sequence[Any] | None = None, variances: Any = 1.0,
                 num_units: Sequence[int] | None = None, dtype=None,
                 transposed_buckets: int | None = None) -> GaussianDEF:
  """Builds and validates a Gaussian DEF (dense, sparse or mixed per layer).

  Args:
    x: observed values ``[n_0]``.
    weights: ``L`` arrays; ``weights[l]`` maps layer ``l + 1`` to layer ``l``: dense
      ``[n_l, n_{l+1}]``, or ``[n_l, K_l]`` when ``parents[l]`` is given.
    parents: optional ``L`` entries, each ``None`` (dense layer) or int ``[n_l, K_l]`` indices of
      the parents in layer ``l + 1``. A child may list a parent once (sum duplicate weights).
    biases: optional ``L + 1`` entries (scalar, ``[n_l]`` or None for 0); default all zero.
    variances: conditional variances: a scalar for every unit, or ``L + 1`` entries (scalar or
      ``[n_l]``); all must be finite and > 0.
    num_units: optional latent sizes ``(n_1, ..., n_L)``; needed only when the top layer is
      sparse and its size is not given by ``biases``/``variances`` arrays.
    dtype: float dtype of the model; default the (canonical) dtype of ``x``.
    transposed_buckets: the most degree buckets of a sparse layer's transposed product
      (``SparseLayout``; 1: one padded gather over all parents); default
      ``TRANSPOSED_BUCKETS``.

  Returns:
    A ``GaussianDEF``.

  Raises:
    ValueError: non-positive or non-finite variances; weight shapes that do not chain; parent
      indices out of range or repeated; wrong number of per-layer entries.
  """
  x_np = np.asarray(x)
  if x_np.ndim != 1:
    raise ValueError(f"x must be a vector [n_0], got shape {x_np.shape}.")
  if dtype is None:
    dtype = jnp.asarray(x_np).dtype if np.issubdtype(x_np.dtype, np.floating) else jnp.float32
  dtype = jnp.dtype(dtype)
  np_dtype = np.dtype(dtype)
  num_layers = len(weights)
  if num_layers < 1:
    raise ValueError("weights must hold at least one layer (observed <- latent).")
  weights_np = [np.asarray(w, np_dtype) for w in weights]
  parents_l = [None] * num_layers if parents is None else list(parents)
  if len(parents_l) != num_layers:
    raise ValueError(f"parents must have one entry per weight layer ({num_layers}), got "
                     f"{len(parents_l)}; use None for dense layers.")
  biases_l = _as_layer_list(biases, num_layers + 1, "biases")
  variances_l = _as_layer_list(variances, num_layers + 1, "variances")

  # Layer sizes: n_0 from x, n_{l+1} from the next layer's weights / dense columns / arrays.
  sizes = [x_np.shape[0]]
  for l in range(num_layers):
    w = weights_np[l]
    if w.ndim != 2:
      raise ValueError(f"weights[{l}] must be a matrix, got shape {w.shape}.")
    if w.shape[0] != sizes[l]:
      raise ValueError(
          f"weights do not chain: weights[{l}] has {w.shape[0]} rows but layer {l} has "
          f"{sizes[l]} units (weights[{l}] must be [n_{l}, n_{l + 1}] dense or [n_{l}, K] sparse).")
    candidates = []
    if num_units is not None:
      candidates.append(("num_units", int(list(num_units)[l])))
    if l + 1 < num_layers:
      candidates.append((f"weights[{l + 1}] rows", int(np.shape(weights[l + 1])[0])))
    if parents_l[l] is None:
      candidates.append((f"weights[{l}] columns", w.shape[1]))
    for name, arr in (("biases", biases_l[l + 1]), ("variances", variances_l[l + 1])):
      if arr is not None and np.ndim(arr) == 1:
        candidates.append((f"{name}[{l + 1}]", int(np.shape(arr)[0])))
    if not candidates:
      raise ValueError(f"cannot tell the size of layer {l + 1} (sparse top layer): pass "
                       "num_units=(n_1, ..., n_L) or a biases/variances array for it.")
    n = candidates[0][1]
    for name, other in candidates[1:]:
      if other != n:
        raise ValueError(f"weights do not chain at layer {l + 1}: {candidates[0][0]} gives "
                         f"{n} units but {name} gives {other}.")
    sizes.append(n)

  def per_unit(value, l, name):
    if np.ndim(value) > 1 or (np.ndim(value) == 1 and np.shape(value)[0] != sizes[l]):
      raise ValueError(f"{name}[{l}] must be a scalar or [{sizes[l]}], got shape "
                       f"{np.shape(value)}.")
    return np.array(np.broadcast_to(np.asarray(0.0 if value is None else value, np_dtype),
                                    (sizes[l],)))

  bias_arrays = [per_unit(b, l, "biases") for l, b in enumerate(biases_l)]
  var_arrays = []
  for l, s in enumerate(variances_l):
    if s is None:
      raise ValueError(f"variances[{l}] is None; give a positive scalar or array.")
    arr = per_unit(s, l, "variances")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
      bad = arr[~(np.isfinite(arr) & (arr > 0))]
      raise ValueError(f"variances[{l}] must be finite and > 0 (they are conditional "
                       f"variances); got non-positive/non-finite values such as {bad[:3]}.")
    var_arrays.append(arr)
  if not np.all(np.isfinite(x_np)):
    raise ValueError("x contains non-finite values.")

  par_out, lay_out = [], []
  for l in range(num_layers):
    w = weights_np[l]
    if not np.all(np.isfinite(w)):
      raise ValueError(f"weights[{l}] contains non-finite values.")
    if parents_l[l] is None:
      par_out.append(None)
      lay_out.append(None)
      continue
    p = np.asarray(parents_l[l])
    if not np.issubdtype(p.dtype, np.integer):
      raise ValueError(f"parents[{l}] must hold integer indices, got dtype {p.dtype}.")
    if p.shape != w.shape:
      raise ValueError(f"parents[{l}] has shape {p.shape} but weights[{l}] has {w.shape}; "
                       "a sparse layer gives one parent index per weight.")
    if p.size and (p.min() < 0 or p.max() >= sizes[l + 1]):
      raise ValueError(f"parents[{l}] indices must lie in [0, {sizes[l + 1]}) (layer {l + 1} "
                       f"has {sizes[l + 1]} units); got range [{p.min()}, {p.max()}].")
    masked = np.where(w != 0, p, -1 - np.arange(p.shape[1])[None, :])
    srt = np.sort(masked, axis=1)
    if np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)):
      raise ValueError(f"parents[{l}] lists a parent twice for one child; sum the weights of "
                       "repeated parents into one entry.")
    children, child_weights = _children_of(p, w, sizes[l + 1], np_dtype)
    slot_parents, slot_weights = _compact_slots(p, w)
    # _children_of packs each parent's nonzero children to the front of its row.
    groups = transposed_degree_buckets(
        (child_weights != 0).sum(axis=1),
        TRANSPOSED_BUCKETS if transposed_buckets is None else transposed_buckets)
    widths = [max(int((child_weights[u] != 0).sum(axis=1).max(initial=0)), 1) for u in groups]
    inverse = None
    if len(groups) > 1:
      inverse = jnp.asarray(np.argsort(np.concatenate(groups)), jnp.int32)
    par_out.append(jnp.asarray(p, jnp.int32))
    lay_out.append(SparseLayout(
        parents_t=jnp.asarray(np.ascontiguousarray(slot_parents.T), jnp.int32),
        weights_t=jnp.asarray(np.ascontiguousarray(slot_weights.T), dtype),
        children=jnp.asarray(children, jnp.int32),
        child_weights=jnp.asarray(child_weights, dtype),
        children_t=tuple(jnp.asarray(np.ascontiguousarray(children[u, :k].T), jnp.int32)
                         for u, k in zip(groups, widths)),
        child_weights_t=tuple(jnp.asarray(np.ascontiguousarray(child_weights[u, :k].T), dtype)
                              for u, k in zip(groups, widths)),
        bucket_inverse=inverse))

  return GaussianDEF(
      x=jnp.asarray(x_np, dtype),
      biases=tuple(jnp.asarray(b, dtype) for b in bias_arrays),
      variances=tuple(jnp.asarray(s, dtype) for s in var_arrays),
      weights=tuple(jnp.asarray(w, dtype) for w in weights_np),
      parents=tuple(par_out), layout=tuple(lay_out))


def forest_like_model(eps: float, *, num_children: int = 2000, num_parents: int = 1000,
                      num_weak: int = 4, noise_variance: float = 1.0,
                      prior_variance: float = 1.0, seed: int = 0,
                      dtype=None) -> GaussianDEF:
  """A sparse one-latent-layer model that is a forest plus weak parents of relative scale ``eps``.

  Every child has one strong parent (uniform at random; weight ``+-1``) and ``num_weak`` other
  distinct parents with weights ``+-eps * U(0.5, 1.5)``; ``x`` is drawn from the model itself.
  ``eps = 0`` is a forest; ``eps = 1`` makes the weak parents as strong as the strong one.

  Args:
    eps: relative scale of the weak parents (>= 0).
    num_children, num_parents: ``n_0`` and ``n_1``.
    num_weak: weak parents per child (< ``num_parents``).
    noise_variance, prior_variance: ``s^0`` and ``s^1``.
    seed: numpy seed of the structure, weights and data.
    dtype: float dtype (default as ``gaussian_def``).

  Returns:
    A sparse ``GaussianDEF`` with ``K = 1 + num_weak`` parents per child.
  """
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}.")
  if not 0 <= num_weak < num_parents:
    raise ValueError(f"num_weak must be in [0, num_parents={num_parents}), got {num_weak}.")
  rng = np.random.default_rng(seed)
  strong = rng.integers(0, num_parents, num_children)
  # Weak parents: distinct from each other and from the strong one (draw from the others).
  others = np.argsort(rng.random((num_children, num_parents - 1)), axis=1)[:, :num_weak]
  weak = np.where(others >= strong[:, None], others + 1, others)
  parents = np.concatenate([strong[:, None], weak], axis=1)
  signs = rng.choice([-1.0, 1.0], size=parents.shape)
  scale = np.concatenate([np.ones((num_children, 1)),
                          eps * rng.uniform(0.5, 1.5, (num_children, num_weak))], axis=1)
  weights = signs * scale
  z = np.sqrt(prior_variance) * rng.normal(size=num_parents)
  x = (weights * z[parents]).sum(axis=1) + np.sqrt(noise_variance) * rng.normal(size=num_children)
  return gaussian_def(x, [weights], parents=[parents], variances=[noise_variance, prior_variance],
                      num_units=[num_parents], dtype=dtype)


def to_sparse(model: GaussianDEF) -> GaussianDEF:
  """The same model with every layer in sparse (child -> parent index) form (concrete input)."""
  weights, parents = [], []
  for l in range(model.num_layers):
    w = np.asarray(model.weights[l])
    if model.parents[l] is not None:
      weights.append(w)
      parents.append(np.asarray(model.parents[l]))
      continue
    nz = w != 0
    k = max(int(nz.sum(axis=1).max(initial=0)), 1)
    order = np.argsort(~nz, axis=1, kind="stable")[:, :k]  # nonzero columns first
    weights.append(np.take_along_axis(w, order, axis=1))
    parents.append(order)
  return gaussian_def(model.x, weights, parents=parents, biases=model.biases,
                      variances=model.variances, num_units=model.sizes[1:], dtype=model.x.dtype)


def dense_weight(model: GaussianDEF, l: int) -> Array:
  """``W^l`` as a dense ``[n_l, n_{l+1}]`` matrix (jit-able)."""
  w = model.weights[l]
  if model.parents[l] is None:
    return w
  n_child, n_parent = model.sizes[l], model.sizes[l + 1]
  rows = jnp.broadcast_to(jnp.arange(n_child)[:, None], w.shape)
  return jnp.zeros((n_child, n_parent), w.dtype).at[rows, model.parents[l]].add(w)


def to_dense(model: GaussianDEF) -> GaussianDEF:
  """The same model with every layer dense."""
  none = (None,) * model.num_layers
  return model._replace(weights=tuple(dense_weight(model, l) for l in range(model.num_layers)),
                        parents=none, layout=none)


# ------------------------------------------------------------------------------------------------
# Layer operators: dense matmuls or sparse gathers (both directions gather, which beats scatter).


_GATHER_1D = jax.lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,),
                                           start_index_map=(0,))
_SCATTER_1D = jax.lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                             scatter_dims_to_operand_dims=(0,))


def _take(v: Array, index: Array) -> Array:
  """``v[index]`` for in-bounds indices ``[...]`` (validated by ``gaussian_def``).

  Straight to ``lax.gather`` with ``PROMISE_IN_BOUNDS``: no clamping and no negative-index
  handling per element, which ``v[index]`` adds.
  """
  return jax.lax.gather(v, index[..., None], _GATHER_1D, slice_sizes=(1,),
                        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _add_at(v: Array, index: Array, values: Array) -> Array:
  """``v.at[index].add(values)`` for in-bounds indices (``lax.scatter_add``, no checks)."""
  return jax.lax.scatter_add(v, index[..., None], values, _SCATTER_1D,
                             mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _gather_sum(weights_t: Array, index_t: Array, v: Array,
                h: Callable[[Array], Array] | None = None) -> Array:
  """``sum_k h(weights_t[k]) * v[index_t[k]]``: ``[K, n]`` slot-major arrays -> ``[n]``.

  ``h`` (e.g. ``jnp.abs``) is applied slot by slot inside the sum, so XLA fuses it into the
  gathers instead of materialising ``h(weights_t)`` first.
  """
  h = (lambda w: w) if h is None else h
  out = h(weights_t[0]) * _take(v, index_t[0])
  for k in range(1, weights_t.shape[0]):  # static, unrolled: see SparseLayout for why
    out = out + h(weights_t[k]) * _take(v, index_t[k])
  return out


def _scatter_sum(values_t: Array, index_t: Array, size: int) -> Array:
  """``out[index_t[k, c]] += values_t[k, c]``: ``[K, n]`` slot-major arrays -> ``[size]``.

  The transpose of ``_gather_sum``. ``K`` one-dimensional scatters over the child -> parent
  arrays beat gathering over the padded parent -> child arrays (no padding, no fusion of the
  gather chain into the next gather, which XLA:CPU otherwise recomputes per element), and inside
  the solvers' loops they beat one flat scatter of all ``K n`` edges too.
  """
  out = jnp.zeros((size,), values_t.dtype)
  for k in range(values_t.shape[0]):
    out = _add_at(out, index_t[k], values_t[k])
  return out


def _matvec(model: GaussianDEF, l: int, m: Array) -> Array:
  """``W^l m`` : ``[n_{l+1}] -> [n_l]``."""
  lay = model.layout[l]
  if lay is None:
    return model.weights[l] @ m
  return _gather_sum(lay.weights_t, lay.parents_t, m)


def _gather_transposed(lay: SparseLayout) -> bool:
  """Whether ``W^T r`` gathers over the padded parent -> child slots instead of scattering.

  A gather of ``sum_b D_b n_b`` padded entries beats ``K`` scatters of ``n_l`` entries each on
  XLA:CPU unless the padding is heavy (measured without buckets: 1.6x faster for the
  benchmark's 5 parents per child, 21 slots per parent; 4x slower for a forest, 1 parent per
  child and ~8 slots).
  """
  k, n_child = lay.parents_t.shape
  slots = sum(int(c.size) for c in lay.children_t)
  return slots <= 3 * k * n_child and k > 1


def _unbucket(lay: SparseLayout, parts: Sequence[Array]) -> Array:
  """The per-bucket results ``[n_b]`` of a transposed product, back in unit order ``[n_{l+1}]``."""
  if lay.bucket_inverse is None:
    return parts[0]
  return _take(jnp.concatenate(parts), lay.bucket_inverse)


def _bucket_gather_sum(lay: SparseLayout, weights_t: Sequence[Array], r: Array,
                       h: Callable[[Array], Array] | None = None) -> Array:
  """``sum_k h(weights_t[b][k]) * r[children_t[b][k]]`` per bucket, in unit order ``[n_{l+1}]``."""
  return _unbucket(lay, [_gather_sum(w, c, r, h) for w, c in zip(weights_t, lay.children_t)])


def _rmatvec(model: GaussianDEF, l: int, r: Array) -> Array:
  """``(W^l)^T r`` : ``[n_l] -> [n_{l+1}]``."""
  lay = model.layout[l]
  if lay is None:
    return r @ model.weights[l]
  if _gather_transposed(lay):
    return _bucket_gather_sum(lay, lay.child_weights_t, r)
  return _scatter_sum(lay.weights_t * r[None, :], lay.parents_t, model.sizes[l + 1])


def precision_diag(model: GaussianDEF) -> tuple:
  """``Lam_ii = 1/s_i + sum_c W_ci^2 / s_c`` per latent layer: ``L`` arrays ``[n_l]``."""
  prec = [1.0 / s for s in model.variances]
  return tuple(prec[l] + _abs_rmatvec(model, l - 1, prec[l - 1], square=True)
               for l in range(1, model.num_layers + 1))


def residuals(model: GaussianDEF, means: Sequence[Array]) -> tuple:
  """``r_l = E[z^l] - W^l m_{l+1} - b^l`` for ``l = 0..L``: ``L + 1`` arrays ``[n_l]``."""
  mu = (model.x,) + tuple(means)
  out = [mu[l] - _matvec(model, l, mu[l + 1]) - model.biases[l] for l in range(model.num_layers)]
  out.append(mu[-1] - model.biases[-1])
  return tuple(out)


def _elbo_terms(model: GaussianDEF, res, precision, variances) -> Array:
  # Multiplying by 1/s (hoisted out of a solver's loop) instead of dividing by s: a float64
  # division per unit per iteration is a visible part of a cheap parallel iteration.
  fit = sum(jnp.sum(jnp.square(r) * (1.0 / s)) for r, s in zip(res, model.variances))
  spread = sum(jnp.sum(p * v) for p, v in zip(precision, variances))
  entropy = sum(jnp.sum(jnp.log(v)) for v in variances)
  n_latent = sum(model.sizes[1:])
  log_norm = sum(jnp.sum(jnp.log(s)) for s in model.variances)
  log2pi = float(np.log(2 * np.pi))
  const = -0.5 * sum(model.sizes) * log2pi + 0.5 * n_latent * (log2pi + 1.0)
  return const - 0.5 * (fit + spread + log_norm) + 0.5 * entropy


def elbo(model: GaussianDEF, means: Sequence[Array], variances: Sequence[Array]) -> Array:
  """ELBO of ``q = prod N(m_i, v_i)`` (computed from scratch).

  Args:
    model: the model.
    means: ``L`` arrays ``[n_l]``.
    variances: ``L`` arrays ``[n_l]`` (> 0).

  Returns:
    Scalar ``E_q[log p(x, z)] + H[q]``.
  """
  return _elbo_terms(model, residuals(model, means), precision_diag(model), variances)


def state_elbo(model: GaussianDEF, state: DEFState) -> Array:
  """ELBO of a solver state, from its cached residuals and precision (O(units), no matvec)."""
  return _elbo_terms(model, state.residuals, state.precision, state.variances)


def mean_gradient(model: GaussianDEF, means: Sequence[Array]) -> tuple:
  """``dELBO/dm``: ``g_l = -r_l / s_l + (W^{l-1})^T (r_{l-1} / s_{l-1})`` per latent layer."""
  res = residuals(model, means)
  e = [r / s for r, s in zip(res, model.variances)]
  return tuple(-e[l] + _rmatvec(model, l - 1, e[l - 1]) for l in range(1, model.num_layers + 1))


# ------------------------------------------------------------------------------------------------
# Exact reference.


def exact_posterior(model: GaussianDEF) -> ExactPosterior:
  """The exact posterior by a dense Cholesky solve of ``Lam mu = S^T D t`` (O(N^3)).

  ``log p(x, z) = -1/2 (S z - t)^T D (S z - t) + const`` with one row of ``S`` per unit
  (observed and latent), ``D = diag(1/s)``; ``Lam = S^T D S``.
  """
  sizes = model.sizes
  num_layers = model.num_layers
  offsets = np.concatenate([[0], np.cumsum(sizes[1:])])
  n_latent = int(offsets[-1])
  dtype = model.x.dtype
  rows = []
  for l in range(num_layers + 1):
    blocks = [jnp.zeros((sizes[l], n), dtype) for n in sizes[1:]]
    if l >= 1:
      blocks[l - 1] = jnp.eye(sizes[l], dtype=dtype)
    if l < num_layers:
      blocks[l] = -dense_weight(model, l)
    rows.append(jnp.concatenate(blocks, axis=1))
  s_mat = jnp.concatenate(rows, axis=0)
  d = jnp.concatenate([1.0 / s for s in model.variances])
  t = jnp.concatenate([model.biases[0] - model.x] + list(model.biases[1:]))
  lam = s_mat.T @ (d[:, None] * s_mat)
  h = s_mat.T @ (d * t)
  chol = jax.scipy.linalg.cho_factor(lam, lower=True)
  mu = jax.scipy.linalg.cho_solve(chol, h)
  cov = jax.scipy.linalg.cho_solve(chol, jnp.eye(n_latent, dtype=dtype))
  split = lambda v: tuple(v[offsets[i]:offsets[i + 1]] for i in range(num_layers))
  return ExactPosterior(means=split(mu), variances=split(1.0 / jnp.diagonal(lam)),
                        covariance=cov, precision=lam)


# ------------------------------------------------------------------------------------------------
# Forest mixture bound: mixture weights, curvature, explicit bound, forest-likeness.


def _mixture_scores(w: Array, v_parent: Array, mixture: str) -> Array:
  """Unnormalised mixture weights ``u_ck`` (``pi_ck = u_ck / sum_k u_ck``), 0 where ``w = 0``."""
  if mixture == "abs_w_sqrt_v":
    return jnp.abs(w) * jnp.sqrt(v_parent)
  if mixture == "abs_w":
    return jnp.abs(w)
  if mixture == "uniform":
    return (w != 0).astype(w.dtype)
  raise ValueError(f"unknown mixture {mixture!r}; choose one of {MIXTURES}.")


def _check_mixture(mixture: str) -> None:
  if mixture not in MIXTURES:
    raise ValueError(f"unknown mixture {mixture!r}; choose one of {MIXTURES}.")


def _layer_edges(model: GaussianDEF, l: int) -> tuple[Array, Array]:
  """Weights ``[n_l, K]`` and parent indices ``[n_l, K]`` of layer ``l`` (dense: K = n_{l+1})."""
  w = model.weights[l]
  if model.parents[l] is None:
    return w, jnp.broadcast_to(jnp.arange(w.shape[1])[None, :], w.shape)
  return w, model.parents[l]


def mixture_weights(model: GaussianDEF, variances: Sequence[Array],
                    mixture: str = "abs_w_sqrt_v") -> tuple:
  """FM mixture weights ``pi`` per weight layer: ``L`` arrays shaped like ``weights[l]``.

  Rows of children with no nonzero weight are all zero; otherwise each row sums to one.
  """
  _check_mixture(mixture)
  out = []
  for l in range(model.num_layers):
    w, pa = _layer_edges(model, l)
    u = _mixture_scores(w, variances[l][pa], mixture)
    total = jnp.sum(u, axis=1, keepdims=True)
    out.append(u / jnp.where(total > 0, total, 1.0))
  return tuple(out)


def fm_curvature(model: GaussianDEF, variances: Sequence[Array],
                 mixture: str = "abs_w_sqrt_v") -> tuple:
  """``P_i = 1/s_i + sum_c W_ci^2 / (pi_ci s_c)`` per latent layer (``L`` arrays ``[n_l]``).

  With ``pi_ci = u_ci / U_c`` (``U_c = sum_k u_ck``) every rule gives
  ``W_ci^2 / pi_ci = h(W_ci) U_c / f(v_i)``: ``|W| U_c sqrt(v_i)^-1`` for ``|W| sqrt(v)``,
  ``|W| U_c`` for ``|W|`` and ``W^2 U_c`` for uniform weights (``u = 1[W != 0]``). So ``P`` costs
  one pass over the edges to get ``U`` (a matvec) and one back (a transposed matvec); edges with
  ``W = 0`` drop out by themselves.
  """
  _check_mixture(mixture)
  out = []
  for l in range(1, model.num_layers + 1):
    v_par, prec_child = variances[l - 1], 1.0 / model.variances[l - 1]
    if mixture == "abs_w_sqrt_v":
      totals = _abs_matvec(model, l - 1, jnp.sqrt(v_par), square=False)
      extra = _abs_rmatvec(model, l - 1, totals * prec_child, square=False) / jnp.sqrt(v_par)
    elif mixture == "abs_w":
      totals = _abs_matvec(model, l - 1, jnp.ones_like(v_par), square=False)
      extra = _abs_rmatvec(model, l - 1, totals * prec_child, square=False)
    else:
      totals = _count_parents(model, l - 1)
      extra = _abs_rmatvec(model, l - 1, totals * prec_child, square=True)
    out.append(1.0 / model.variances[l] + extra)
  return tuple(out)


def _fm_curvature_from(model: GaussianDEF, precision: tuple, coefficients: tuple,
                       mixture: str = "abs_w_sqrt_v") -> tuple:
  """``fm_curvature`` at ``v = 1/Lam`` from a solver's ``_parallel_coefficients``.

  ``|W_ci| / s_c = |coefficients|``, so the transposed product reads the prepared coefficients
  (no second gather of ``1/s_c``). A forest layer (one parent slot after ``_compact_slots``) has
  ``pi = 1`` on every edge under every rule, so there ``P = Lam``. The ``"uniform"`` rule weighs
  edges by ``W^2`` and goes through ``fm_curvature``.
  """
  _check_mixture(mixture)
  uniform = (fm_curvature(model, tuple(1.0 / p for p in precision), mixture)
             if mixture == "uniform" else None)
  out = []
  for l in range(1, model.num_layers + 1):
    lam, lay = precision[l - 1], model.layout[l - 1]
    if lay is not None and lay.parents_t.shape[0] == 1:
      out.append(lam)
    elif uniform is not None:
      out.append(uniform[l - 1])
    elif mixture == "abs_w_sqrt_v":
      root_v = jnp.sqrt(1.0 / lam)
      totals = _abs_matvec(model, l - 1, root_v, square=False)
      extra = _scaled_rmatvec(model, l - 1, coefficients[l - 1], totals, jnp.abs) / root_v
      out.append(1.0 / model.variances[l] + extra)
    else:
      totals = _abs_matvec(model, l - 1, jnp.ones_like(lam), square=False)
      extra = _scaled_rmatvec(model, l - 1, coefficients[l - 1], totals, jnp.abs)
      out.append(1.0 / model.variances[l] + extra)
  return tuple(out)


def _abs_matvec(model: GaussianDEF, l: int, m: Array, *, square: bool) -> Array:
  """``|W^l| m`` (or ``(W^l)^2 m``)."""
  h = jnp.square if square else jnp.abs
  lay = model.layout[l]
  if lay is None:
    return h(model.weights[l]) @ m
  return _gather_sum(lay.weights_t, lay.parents_t, m, h)


def _abs_rmatvec(model: GaussianDEF, l: int, r: Array, *, square: bool) -> Array:
  """``|W^l|^T r`` (or ``((W^l)^2)^T r``)."""
  h = jnp.square if square else jnp.abs
  lay = model.layout[l]
  if lay is None:
    return r @ h(model.weights[l])
  if _gather_transposed(lay):
    return _bucket_gather_sum(lay, lay.child_weights_t, r, h)
  return _scatter_sum(h(lay.weights_t) * r[None, :], lay.parents_t, model.sizes[l + 1])


def _count_parents(model: GaussianDEF, l: int) -> Array:
  """Number of nonzero weights of each child of layer ``l``."""
  w = model.weights[l] if model.layout[l] is None else model.layout[l].weights_t.T
  return jnp.sum((w != 0).astype(w.dtype), axis=1)


def fm_bound(model: GaussianDEF, means: Sequence[Array], variances: Sequence[Array],
             anchor_means: Sequence[Array], anchor_variances: Sequence[Array] | None = None,
             mixture: str = "abs_w_sqrt_v") -> Array:
  """The FM lower bound on the ELBO, written out edge by edge (the objective FM ascends).

  For each child ``c`` with parents, ``E[eta_c^2]`` in the ELBO is replaced by
  ``sum_k E[(W_ck z_k + b_ck)^2] / pi_ck`` with ``pi`` from ``anchor_variances`` and the bias
  split tight at ``anchor_means``: ``b_ck = pi_ck eta_bar_c - W_ck m0_k``,
  ``eta_bar_c = sum_k W_ck m0_k + b_c``. Equal to the ELBO's mean part at ``means = anchor_means``.

  Args:
    model: the model.
    means, variances: the point ``q`` at which to evaluate (``L`` arrays each).
    anchor_means: means at which the bias split is tight.
    anchor_variances: variances that define ``pi``; default ``variances``.
    mixture: rule for ``pi`` (``MIXTURES``).

  Returns:
    Scalar lower bound ``<= elbo(model, means, variances)``.
  """
  anchor_variances = variances if anchor_variances is None else anchor_variances
  pis = mixture_weights(model, anchor_variances, mixture)
  mu = (model.x,) + tuple(jnp.asarray(m) for m in means)
  mu0 = (model.x,) + tuple(jnp.asarray(m) for m in anchor_means)
  var = (jnp.zeros_like(model.x),) + tuple(jnp.asarray(v) for v in variances)
  value = elbo(model, means, variances)
  for l in range(model.num_layers):
    w, pa = _layer_edges(model, l)
    pi = pis[l]
    m_pa, m0_pa, v_pa = mu[l + 1][pa], mu0[l + 1][pa], var[l + 1][pa]
    eta_bar = jnp.sum(w * m0_pa, axis=1, keepdims=True) + model.biases[l][:, None]
    b_split = pi * eta_bar - w * m0_pa
    safe_pi = jnp.where(pi > 0, pi, 1.0)
    bound_sq = jnp.where(pi > 0, (jnp.square(w * m_pa + b_split) + jnp.square(w) * v_pa)
                         / safe_pi, 0.0)
    # Children whose weights are all zero keep their exact E[eta^2] = b_c^2.
    has_parent = jnp.any(pi > 0, axis=1)
    eta = jnp.sum(w * m_pa, axis=1) + model.biases[l]
    exact_sq = jnp.square(eta) + jnp.sum(jnp.square(w) * v_pa, axis=1)
    bound_row = jnp.where(has_parent, jnp.sum(bound_sq, axis=1), exact_sq)
    value = value - 0.5 * jnp.sum((bound_row - exact_sq) / model.variances[l])
  return value


def forest_likeness(model: GaussianDEF, mixture: str = "abs_w_sqrt_v") -> Array:
  """How forest-like a model is: the mean over children of their largest FM mixture weight.

  ``pi`` is evaluated at the optimal mean-field variances ``1 / Lam_ii``. A forest (every child
  has at most one parent) scores 1; a child with ``k`` equal parents contributes ``1/k``.
  Children without parents are left out.

  Returns:
    Scalar in ``(0, 1]``.
  """
  v = tuple(1.0 / p for p in precision_diag(model))
  total, count = 0.0, 0.0
  for pi in mixture_weights(model, v, mixture):
    has_parent = jnp.any(pi > 0, axis=1)
    total = total + jnp.sum(jnp.where(has_parent, jnp.max(pi, axis=1), 0.0))
    count = count + jnp.sum(has_parent.astype(pi.dtype))
  return total / jnp.maximum(count, 1.0)


# ------------------------------------------------------------------------------------------------
# Solvers.


def _sum_log(arrays: Sequence[Array]) -> Array:
  """``sum log(a)`` over the entries of arrays of positive normal numbers, one ``log`` per group.

  ``a = m 2^e`` with ``m`` in ``[1/sqrt 2, sqrt 2)`` (``jnp.frexp``, recentred so that values
  near 1 give ``e = 0``: no cancellation between the two sums below), so
  ``sum log a = sum log(prod m) + log 2 sum e``; the mantissas are multiplied in groups of ``G``
  (32, fewer for float16 so that a product stays a normal number) and only the group products
  go through ``log``. XLA:CPU's float64 ``log`` is a scalar call per entry: the plain
  ``sum(log(a))`` over the 4000 units of the benchmark model took ~35 us (measured alone), this
  ~5 us. The rounding error is that of the ``G``-fold products, ``O(G eps)`` per group.
  """
  dtype = arrays[0].dtype
  group = int(min(32, -2 * (jnp.finfo(dtype).minexp + 1)))
  a = jnp.concatenate(arrays) if len(arrays) > 1 else arrays[0]
  m, e = jnp.frexp(a)  # m in [0.5, 1)
  low = m < float(np.sqrt(0.5))
  m = jnp.where(low, 2.0 * m, m)
  exponent = jnp.sum(jnp.where(low, e - 1, e))  # int: exact
  pad = (-m.shape[0]) % group
  if pad:
    m = jnp.concatenate([m, jnp.ones((pad,), dtype)])
  logs = jnp.sum(jnp.log(jnp.prod(m.reshape(-1, group), axis=1)))
  return logs + float(np.log(2.0)) * exponent.astype(dtype)


def _elbo_offset(model: GaussianDEF, precision, variances, noise_precision) -> Array:
  """The ELBO minus its fit term at the given variances (``_elbo_terms`` without the fit);
  ``noise_precision`` is ``1 / s`` per layer."""
  # sum Lam v (= the number of latent units at v = 1/Lam) stays computed: as a consumer of Lam it
  # keeps XLA:CPU from splitting Lam's gather sum into one fusion per slot and duplicating the
  # sum into each of Lam's consumers (measured on the sequential CAVI solve).
  spread = sum(jnp.sum(p * v) for p, v in zip(precision, variances))
  # entropy - log_norm = sum log v + sum log(1/s): one _sum_log over all of them (one log per
  # group of entries, one exponent sum), not one per term (fewer XLA:CPU kernels, measured
  # ~10-30 us off a solve's fixed cost).
  log_ratio = _sum_log(tuple(variances) + tuple(noise_precision))
  n_latent = sum(model.sizes[1:])
  log2pi = float(np.log(2 * np.pi))
  const = -0.5 * sum(model.sizes) * log2pi + 0.5 * n_latent * (log2pi + 1.0)
  return const - 0.5 * spread + 0.5 * log_ratio


def _fit_elbo(prepared: DEFPrepared, res) -> Array:
  """ELBO of a state at the optimal variances: ``elbo_offset - 1/2 sum r^2 / s`` (O(units))."""
  fit = sum(jnp.sum(jnp.square(r) * q) for r, q in zip(res, prepared.noise_precision))
  return prepared.elbo_offset - 0.5 * fit


def _make_prepare(tag: str, quantities_fn: Callable[[GaussianDEF, tuple], tuple]):
  """``prepare(model) -> DEFPrepared`` for a method.

  ``quantities_fn(model, noise_precision) -> (precision, curvature, coefficients)`` computes the
  method's model-only quantities (``_cavi_quantities``, ``_parallel_quantities``).
  """
  def prepare(model: GaussianDEF) -> DEFPrepared:
    noise_precision = tuple(1.0 / s for s in model.variances)
    precision, curvature, coefficients = quantities_fn(model, noise_precision)
    variances = tuple(1.0 / p for p in precision)
    return DEFPrepared(
        precision=precision, variances=variances, curvature=curvature,
        noise_precision=noise_precision,
        elbo_offset=_elbo_offset(model, precision, variances, noise_precision),
        coefficients=coefficients, method=tag)
  return prepare


def _check_prepared(prepared: DEFPrepared, tag: str) -> None:
  if not isinstance(prepared, DEFPrepared):
    raise ValueError(f"prepared must be a DEFPrepared from solver.prepare(model), got "
                     f"{type(prepared).__name__}.")
  if prepared.method != tag:
    raise ValueError(f"prepared was built by solver {prepared.method!r} but is used with "
                     f"{tag!r}; build it with this solver's prepare(model).")


def _make_init(tag: str, prepare: Callable[[GaussianDEF], DEFPrepared],
               memory_fn: Callable[[GaussianDEF], Any] | None = None):
  """``init`` of a method; ``memory_fn(model)`` builds its initial ``DEFState.memory``."""
  def init(model: GaussianDEF, means: Sequence[Array] | None = None,
           variances: Sequence[Array] | None = None,
           prepared: DEFPrepared | None = None) -> DEFState:
    dtype = model.x.dtype
    if prepared is None:
      prepared = prepare(model)
    _check_prepared(prepared, tag)
    if means is None:
      means = tuple(jnp.zeros((n,), dtype) for n in model.sizes[1:])
      # All means zero: r_0 = x - b_0 and r_l = -b_l, no matvec needed.
      res = (model.x - model.biases[0],) + tuple(-b for b in model.biases[1:])
    else:
      means = tuple(jnp.asarray(m, dtype) for m in means)
      res = residuals(model, means)
    if variances is None:
      variances = prepared.variances  # the optimum 1/Lam: every step sets them to it anyway
    else:
      variances = tuple(jnp.asarray(v, dtype) for v in variances)
    return DEFState(means=means, variances=variances, residuals=res, prepared=prepared,
                    iteration=jnp.zeros((), jnp.int32),
                    memory=None if memory_fn is None else memory_fn(model))
  return init


def _make_solver(name: str, tag: str, quantities_fn, step, memory_fn=None) -> DEFSolver:
  prepare = _make_prepare(tag, quantities_fn)

  def checked_step(model: GaussianDEF, state: DEFState) -> DEFState:
    _check_prepared(state.prepared, tag)
    return step(model, state)

  return DEFSolver(init=_make_init(tag, prepare, memory_fn), step=checked_step, name=name,
                   prepare=prepare)


def _cavi_quantities(coefficient_fn: Callable[..., tuple]):
  """``quantities_fn`` of the unit-at-a-time methods: ``Lam``, ``Lam`` as curvature, and
  ``coefficient_fn(model, noise_precision, precision)``."""
  def quantities(model: GaussianDEF, noise_precision: tuple) -> tuple:
    precision = precision_diag(model)
    return precision, precision, coefficient_fn(model, noise_precision, precision)
  return quantities


def _parallel_quantities(curvature_fn: Callable[[GaussianDEF, tuple, tuple], tuple] | None):
  """``quantities_fn`` of the layer-parallel methods (Jacobi, FM).

  The update coefficients ``W^T diag(1/s)`` come first and ``Lam`` and the FM curvature are read
  off them (``_coefficient_precision``, ``_fm_curvature_from``): where the coefficients gather
  ``1/s_child`` over the padded parent -> child slots, that gather is done once instead of once
  per quantity (measured on the benchmark model at eps = 0.05: a solve without iterations, i.e.
  dispatch, preparation, init and first ELBO, 15-20% faster).
  ``curvature_fn(model, precision, coefficients)``; ``None``: the curvature is ``Lam`` (Jacobi).
  """
  def quantities(model: GaussianDEF, noise_precision: tuple) -> tuple:
    coefficients = _parallel_coefficients(model, noise_precision)
    precision = _coefficient_precision(model, noise_precision, coefficients)
    curvature = (precision if curvature_fn is None
                 else curvature_fn(model, precision, coefficients))
    return precision, curvature, coefficients
  return quantities


def _parallel_coefficients(model: GaussianDEF, noise_precision) -> tuple:
  """Per latent layer ``l``: ``W^T diag(1/s_{l-1})`` in the form its ``W^T r`` product reads.

  Dense ``[n_l, n_{l-1}]``; sparse gathered over the parent -> child slots: one ``[D_b, n_b]``
  array per degree bucket (``child_weights_t[b] / s_child``); sparse scattered over the
  child -> parent slots ``[K, n_{l-1}]`` (``weights_t / s_child``). The divisor stays a
  division in the step: folded into these weights, XLA:CPU fuses the whole gather sum into every
  consumer of the update (measured 2x slower iteration).
  """
  out = []
  for l in range(1, model.num_layers + 1):
    lay, pc = model.layout[l - 1], noise_precision[l - 1]
    if lay is None:
      out.append(model.weights[l - 1].T * pc[None, :])
    elif _gather_transposed(lay):
      # One gather over the flattened slots per bucket (a two-dimensional gather is slower on
      # XLA:CPU).
      out.append(tuple(cw * _take(pc, c.reshape(-1)).reshape(c.shape)
                       for c, cw in zip(lay.children_t, lay.child_weights_t)))
    else:
      out.append(lay.weights_t * pc[None, :])
  return tuple(out)


def _coefficient_precision(model: GaussianDEF, noise_precision, coefficients) -> tuple:
  """``Lam`` (as ``precision_diag``) from ``_parallel_coefficients``.

  Gathered layouts: ``Lam_i = 1/s_i + sum_c W_ci (W_ci / s_c)``, slot by slot over the
  coefficients, with no gather of its own. Other layouts as ``precision_diag``.
  """
  out = []
  for l in range(1, model.num_layers + 1):
    lay = model.layout[l - 1]
    if lay is not None and _gather_transposed(lay):
      parts = []
      for cw, coef in zip(lay.child_weights_t, coefficients[l - 1]):
        part = cw[0] * coef[0]
        for k in range(1, cw.shape[0]):  # static, unrolled (as _gather_sum)
          part = part + cw[k] * coef[k]
        parts.append(part)
      extra = _unbucket(lay, parts)
    else:
      extra = _abs_rmatvec(model, l - 1, noise_precision[l - 1], square=True)
    out.append(noise_precision[l] + extra)
  return tuple(out)


def _scaled_rmatvec(model: GaussianDEF, l: int, transposed: Array, r: Array,
                    h: Callable[[Array], Array] | None = None) -> Array:
  """``(W^l)^T diag(1/s_l) r`` from ``_parallel_coefficients`` (with ``h = jnp.abs``:
  ``|W^l|^T diag(1/s_l) r``)."""
  lay = model.layout[l]
  if lay is None:
    return (transposed if h is None else h(transposed)) @ r
  if _gather_transposed(lay):
    return _bucket_gather_sum(lay, transposed, r, h)
  values = transposed if h is None else h(transposed)
  return _scatter_sum(values * r[None, :], lay.parents_t, model.sizes[l + 1])


def _parallel_step(model: GaussianDEF, state: DEFState, line_search: bool = False) -> DEFState:
  """One layer-parallel sweep: ``m_l += g_l / curvature_l`` for ``l = 1..L`` (Jacobi or FM).

  With ``line_search`` the step of each layer is scaled by the exact maximiser of the ELBO along
  it, ``alpha = g.d / (|W d|^2_{1/s_{l-1}} + |d|^2_{1/s_l})`` with ``d = g / curvature`` (the ELBO
  is quadratic in one layer's means). ``W d`` replaces the residual's recomputation, so the step
  costs the same sparse products; the residual below is then updated by ``-alpha W d``.
  """
  prep = state.prepared
  means = list(state.means)
  res = list(state.residuals)
  gain = 0.0  # the ELBO's increase (line search: exact, from the search's reductions)
  for l in range(1, model.num_layers + 1):
    g = (-res[l] * prep.noise_precision[l]
         + _scaled_rmatvec(model, l - 1, prep.coefficients[l - 1], res[l - 1]))
    # A division, not a product with the (loop-invariant) reciprocal: with a product XLA:CPU
    # duplicates the gather fusion into delta's consumers (measured 1.5-2x slower iteration).
    delta = g / prep.curvature[l - 1]
    if line_search:
      u = _matvec(model, l - 1, delta)
      num = jnp.sum(g * delta)
      den = (jnp.sum(jnp.square(u) * prep.noise_precision[l - 1])
             + jnp.sum(jnp.square(delta) * prep.noise_precision[l]))
      alpha = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)
      gain = gain + alpha * num - 0.5 * jnp.square(alpha) * den
      means[l - 1] = means[l - 1] + alpha * delta
      res[l] = res[l] + alpha * delta
      # res[l - 1] already holds the move of the layer below (updated in its own step).
      res[l - 1] = res[l - 1] - alpha * u
      continue
    means[l - 1] = means[l - 1] + delta
    res[l] = res[l] + delta  # r_l = m_l - (W m_{l+1} + b): only m_l moved.
    # Recomputed rather than updated by -W delta: same cost, no drift over many iterations.
    below = model.x if l == 1 else means[l - 2]
    res[l - 1] = below - _matvec(model, l - 1, means[l - 1]) - model.biases[l - 1]
  elbo = None if not line_search or state.elbo is None else state.elbo + gain
  return DEFState(tuple(means), prep.variances, tuple(res), prep, state.iteration + 1,
                  elbo=elbo)


def _cg_memory(model: GaussianDEF) -> CGMemory:
  """``fm_cg``'s initial memory: no previous direction (the first step is ``P^-1 g``)."""
  dtype = model.x.dtype
  return CGMemory(direction=tuple(jnp.zeros((n,), dtype) for n in model.sizes[1:]),
                  rho=jnp.ones((), dtype))


def _conjugate_step(model: GaussianDEF, state: DEFState) -> DEFState:
  """One ``fm_cg`` iteration: PCG on the means, preconditioner ``P``, exact joint line search.

  ``g_l = -r_l / s_l + (W^{l-1})^T (r_{l-1} / s_{l-1})`` for every latent layer at the current
  point; ``z = g / P``, ``rho = g.z``, ``d = z + (rho / rho_prev) d_prev`` (``d = z`` if that is
  not an ascent direction), ``u_l = d_l - W^l d_{l+1}`` (the move of every residual per unit
  step, ``d_0 = d_{L+1} = 0``), ``alpha = g.d / sum_l |u_l|^2 / s_l``; then
  ``m += alpha d`` and ``r += alpha u`` (updated, not recomputed: the same products as
  ``fm_ls``).
  """
  prep = state.prepared
  memory = state.memory
  if not isinstance(memory, CGMemory):
    raise ValueError("fm_cg's state carries a CGMemory: build the state with this solver's "
                     "init(model, ...).")
  num_layers = model.num_layers
  res = state.residuals
  grads = [(-res[l] * prep.noise_precision[l]
            + _scaled_rmatvec(model, l - 1, prep.coefficients[l - 1], res[l - 1]))
           for l in range(1, num_layers + 1)]
  # A division by P, not a product with its reciprocal (as _parallel_step: XLA:CPU otherwise
  # duplicates the gradient's gather fusion into the consumers).
  zs = [g / p for g, p in zip(grads, prep.curvature)]
  # slope = g.d = rho + beta g.d_prev: two reductions of the gradient, then scalars only (no
  # select over the direction on a restart). Kept as separate sums: one stacked reduction of
  # [g z; g d_prev] saved a few kernel launches per iteration (~10% of an unbatched iteration,
  # within the noise end to end) but under vmap became a 7x slower batched solve (measured).
  rho = sum(jnp.sum(g * z) for g, z in zip(grads, zs))
  along_prev = sum(jnp.sum(g * d) for g, d in zip(grads, memory.direction))
  beta = rho / memory.rho
  slope = rho + beta * along_prev
  # Restart along P^-1 g if rounding made the conjugate direction a non-ascent one;
  # g.z = rho > 0 unless g = 0.
  ascent = slope > 0
  beta = jnp.where(ascent, beta, 0.0)
  slope = jnp.where(ascent, slope, rho)
  dirs = [z + beta * d for z, d in zip(zs, memory.direction)]
  # u_l = d_l - W^l d_{l+1}: how each layer's residual moves per unit step (d_0 = 0: x is fixed).
  moves = [-_matvec(model, 0, dirs[0])]
  for l in range(1, num_layers):
    moves.append(dirs[l - 1] - _matvec(model, l, dirs[l]))
  moves.append(dirs[-1])
  den = sum(jnp.sum(jnp.square(u) * q) for u, q in zip(moves, prep.noise_precision))
  alpha = jnp.where(den > 0, slope / jnp.where(den > 0, den, 1.0), 0.0)
  means = tuple(m + alpha * d for m, d in zip(state.means, dirs))
  new_res = tuple(r + alpha * u for r, u in zip(res, moves))
  # rho = 0 (at the optimum exactly): keep a positive rho_prev so that the next beta is finite.
  memory = CGMemory(direction=tuple(dirs), rho=jnp.where(rho > 0, rho, 1.0))
  # The ELBO is quadratic along d: it rises by alpha g.d - alpha^2 d^T Lam d / 2.
  elbo = (None if state.elbo is None
          else state.elbo + alpha * slope - 0.5 * jnp.square(alpha) * den)
  return DEFState(means, prep.variances, new_res, prep, state.iteration + 1, memory, elbo)


def _children_rows(model: GaussianDEF, l: int):
  """Per parent of weight layer ``l``: child indices (None when dense) and weights.

  Unit-major ``[n_{l+1}, D]`` rows, for the loops that visit one unit (or block) at a time.
  """
  lay = model.layout[l]
  if lay is None:
    return None, model.weights[l].T  # [n_{l+1}, n_l]: each parent's column of weights
  return lay.children, lay.child_weights


class _SweepLayer(NamedTuple):
  """Coefficients of unit-at-a-time CAVI on one latent layer (model-only).

  Unit ``i``'s update is ``delta_i = -r_i own_i + sum_c rows_ic r_c`` (``r_c`` its children's
  residuals) with ``own = 1 / (s Lam)`` and ``rows_ic = W_ci / (s_c Lam_ii)``.

  Attributes:
    own: ``[n_l]`` (sequential) or ``[num_blocks, block_size]`` (block CAVI, 0 on padding).
    rows: ``[n_l, D]`` (dense ``[n_l, n_{l-1}]``); a tuple of ``[n_b, D_b]`` per degree bucket;
      or ``[num_blocks, block_size, D]`` (block CAVI, 0 on padding).
    children, child_weights: block CAVI only: the blocks' children rows (else None).
  """
  own: Array
  rows: Any
  children: Any = None
  child_weights: Any = None


def _unit_rows(model: GaussianDEF, l: int, noise_precision, precision):
  """``own [n_l]`` and ``rows [n_l, D]`` of ``_SweepLayer`` for latent layer ``l``."""
  ch, cw = _children_rows(model, l - 1)
  pc, lam = noise_precision[l - 1], precision[l - 1]
  own = noise_precision[l] / lam
  scale = pc[None, :] if ch is None else _take(pc, ch)
  return own, cw * scale / lam[:, None]


def degree_buckets(model: GaussianDEF, num_buckets: int) -> tuple:
  """Units of each sparse latent layer grouped by their number of children, for sequential CAVI.

  Units are sorted by degree (nonzero-weight children), most first, and cut into
  ``num_buckets`` groups of equal size; each group's children rows are padded only to its own
  largest degree, so a sweep reads fewer padding slots than with the layer-wide padding. Needs
  a concrete model (not under jit).

  Returns:
    ``L`` entries: ``None`` for a dense layer (or ``num_buckets == 1``), else a tuple of
    ``(units [n_b], children [n_b, D_b], child_weights [n_b, D_b])`` numpy arrays.
  """
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets}.")
  out = []
  for l in range(model.num_layers):
    lay = model.layout[l]
    if lay is None or num_buckets == 1:
      out.append(None)
      continue
    ch, cw = np.asarray(lay.children), np.asarray(lay.child_weights)
    degree = (cw != 0).sum(axis=1)  # _children_of packs each row's children to the front
    order = np.argsort(-degree, kind="stable")
    groups = []
    for units in np.array_split(order, min(num_buckets, len(order))):
      width = max(int(degree[units].max(initial=0)), 1)
      groups.append((units.astype(np.int32), ch[units, :width], cw[units, :width]))
    out.append(tuple(groups))
  return tuple(out)


def sequential_cavi(*, unroll: int = 8, buckets: Sequence[Any] | None = None) -> DEFSolver:
  """Sequential CAVI: every unit updated in turn, each seeing all earlier updates.

  One ``lax.scan`` per layer over its units, carrying only the children's residual vector (the
  unit's own residual cannot change before its turn), so each step is a gather of the unit's
  children, a dot product with prepared coefficients (``W / (s_child Lam)``) and a scatter.
  ``unroll`` unrolls the scan body (measurably faster on CPU, where per-iteration loop overhead
  dominates this tiny body).

  Args:
    unroll: scan unroll factor.
    buckets: optional ``degree_buckets(model, b)``: sweep each sparse layer's units in degree
      order, one scan per bucket padded to the bucket's own degree (fewer padding slots read
      when degrees vary; the order of the updates changes, not what a sweep is).
  """
  tag = "sequential" if buckets is None else f"sequential(buckets={len(buckets[0] or ())})"

  def check_buckets(model):
    if buckets is not None and len(buckets) != model.num_layers:
      raise ValueError(f"sequential_cavi got buckets for {len(buckets)} layers but the model "
                       f"has {model.num_layers}; build them with degree_buckets(model, b).")

  def coefficients(model, noise_precision, precision):
    check_buckets(model)
    out = []
    for l in range(1, model.num_layers + 1):
      own, rows = _unit_rows(model, l, noise_precision, precision)
      groups = None if buckets is None else buckets[l - 1]
      if groups is not None:
        pc, lam = noise_precision[l - 1], precision[l - 1]
        rows = []
        for units, ch, cw in groups:
          if units.size and units.max() >= model.sizes[l]:
            raise ValueError(f"buckets[{l - 1}] holds unit {units.max()} but layer {l} has "
                             f"{model.sizes[l]} units; build them with degree_buckets(model).")
          cw = jnp.asarray(cw, pc.dtype)
          rows.append(cw * _take(pc, jnp.asarray(ch)) / lam[jnp.asarray(units)][:, None])
        rows = tuple(rows)
      out.append(_SweepLayer(own=own, rows=rows))
    return tuple(out)

  def sweep(r_below, own, ch, cw, rows):
    if ch is None:
      def body(r_below, xs):
        a, w, ws = xs
        delta = a + jnp.dot(ws, r_below)
        return r_below - w * delta, delta
      xs = (own, cw, rows)
    else:
      def body(r_below, xs):
        a, c, w, ws = xs
        delta = a + jnp.dot(ws, _take(r_below, c))
        return _add_at(r_below, c, -w * delta), delta
      xs = (own, ch, cw, rows)
    return jax.lax.scan(body, r_below, xs, unroll=unroll)

  def step(model: GaussianDEF, state: DEFState) -> DEFState:
    check_buckets(model)
    coefs = state.prepared.coefficients
    means = list(state.means)
    res = list(state.residuals)
    for l in range(1, model.num_layers + 1):
      coef = coefs[l - 1]
      own = -res[l] * coef.own
      groups = None if buckets is None else buckets[l - 1]
      if groups is None:
        ch, cw = _children_rows(model, l - 1)
        r_below, deltas = sweep(res[l - 1], own, ch, cw, coef.rows)
        means[l - 1] = means[l - 1] + deltas
        res[l] = res[l] + deltas
      else:
        r_below = res[l - 1]
        for (units, ch, cw), rows in zip(groups, coef.rows):
          units = jnp.asarray(units)
          r_below, deltas = sweep(r_below, own[units], jnp.asarray(ch),
                                  jnp.asarray(cw, r_below.dtype), rows)
          means[l - 1] = _add_at(means[l - 1], units, deltas)
          res[l] = _add_at(res[l], units, deltas)
      res[l - 1] = r_below
    elbo = state.elbo
    if elbo is not None:
      # An exact coordinate move delta_i raises the ELBO by Lam_ii delta_i^2 / 2, whatever the
      # order of the moves.
      for l in range(1, model.num_layers + 1):
        moved = means[l - 1] - state.means[l - 1]
        elbo = elbo + 0.5 * jnp.sum(state.prepared.precision[l - 1] * jnp.square(moved))
    return DEFState(tuple(means), state.prepared.variances, tuple(res), state.prepared,
                    state.iteration + 1, elbo=elbo)

  return _make_solver("sequential", tag, _cavi_quantities(coefficients), step)


def parallel_cavi() -> DEFSolver:
  """Naive parallel (Jacobi) CAVI: every unit of a layer takes its CAVI update at once.

  Can diverge (see the module docstring); ``solve`` reports it through ``SolveInfo.diverged``.
  """
  return _make_solver("parallel", "parallel", _parallel_quantities(None), _parallel_step)


def forest_mixture(*, mixture: str = "abs_w_sqrt_v", line_search: bool = False,
                   conjugate: bool = False) -> DEFSolver:
  """Parallel updates on the forest mixture bound (monotone; exact in one step for a forest).

  Args:
    mixture: rule for the mixture weights ``pi``: ``"abs_w_sqrt_v"`` (``|W| sqrt(v)``, default),
      ``"abs_w"`` or ``"uniform"``. Any rule keeps the update monotone; it changes the speed.
    line_search: scale each layer's FM step by the exact maximiser of the ELBO along it (growjax's
      extension, not the paper's update). The FM bound makes ``P`` a majoriser of the precision,
      so its plain step (``alpha = 1``) is short wherever the bound is loose (children with
      several comparable parents); the exact search along the same direction costs a few
      reductions per layer, keeps the ascent monotone (``alpha = 1`` is among the candidates)
      and leaves a forest's one-step convergence intact (there ``alpha = 1`` is the maximiser).
    conjugate: conjugate FM directions (method ``"fm_cg"``, growjax's extension; needs
      ``line_search=True``): preconditioned conjugate gradients on the means with ``P`` as the
      preconditioner and one exact line search over all layers jointly (see the module
      docstring). Its state carries the previous direction (``DEFState.memory``).

  Raises:
    ValueError: unknown mixture, or ``conjugate`` without ``line_search`` (conjugate directions
      are only conjugate under the exact search).
  """
  _check_mixture(mixture)
  if conjugate and not line_search:
    raise ValueError("forest_mixture(conjugate=True) needs line_search=True: conjugate "
                     "directions rely on the exact line search along each direction.")

  def curvature(model, precision, coefficients):
    return _fm_curvature_from(model, precision, coefficients, mixture)

  if conjugate:
    return _make_solver("fm_cg", f"fm(mixture={mixture},conjugate)",
                        _parallel_quantities(curvature), _conjugate_step, _cg_memory)
  tag = f"fm(mixture={mixture}" + (",line_search)" if line_search else ")")
  return _make_solver("fm_ls" if line_search else "fm", tag, _parallel_quantities(curvature),
                      functools.partial(_parallel_step, line_search=line_search))


def color_blocks(model: GaussianDEF) -> tuple:
  """Blocks for block CAVI: the colour classes of each latent layer's co-parent graph.

  Two units of layer ``l`` interact (their CAVI updates depend on each other) iff they share a
  child in layer ``l - 1`` through nonzero weights; the graph is coloured with
  ``growjax.graphs.greedy_coloring``. Needs a concrete model (not under jit).

  Returns:
    ``L`` int arrays ``[num_colours_l, max_class_size_l]`` of unit indices padded with -1.
  """
  out = []
  for l in range(model.num_layers):
    w, pa = (np.asarray(a) for a in _layer_edges(model, l))
    adjacency: dict[int, set[int]] = {i: set() for i in range(model.sizes[l + 1])}
    for row_w, row_p in zip(w, pa):
      nz = [int(p) for p in row_p[row_w != 0]]
      for i in nz:
        adjacency[i].update(j for j in nz if j != i)
    colour = greedy_coloring(adjacency)
    num_colours = max(colour.values()) + 1
    classes = [[] for _ in range(num_colours)]
    for unit in sorted(colour):
      classes[colour[unit]].append(unit)
    width = max(len(c) for c in classes)
    blocks = np.full((num_colours, width), -1, np.int32)
    for k, c in enumerate(classes):
      blocks[k, :len(c)] = c
    out.append(blocks)
  return tuple(out)


def block_cavi(blocks: Sequence[Any]) -> DEFSolver:
  """Block-coordinate CAVI: the blocks of each layer in turn, each block in parallel.

  Args:
    blocks: ``L`` int arrays ``[num_blocks_l, block_size_l]`` of unit indices padded with -1,
      e.g. ``color_blocks(model)``. Blocks whose units interact make the update inexact
      (Jacobi within the block); colour classes do not interact, so it is exact CAVI.
  """
  blocks = tuple(np.asarray(b, np.int32) for b in blocks)
  for l, b in enumerate(blocks):
    if b.ndim != 2:
      raise ValueError(f"blocks[{l}] must be [num_blocks, block_size] (padded with -1), got "
                       f"shape {b.shape}.")

  def check_blocks(model):
    if len(blocks) != model.num_layers:
      raise ValueError(f"block_cavi got blocks for {len(blocks)} layers but the model has "
                       f"{model.num_layers}; build them with color_blocks(model).")
    for l in range(1, model.num_layers + 1):
      b = blocks[l - 1]
      if b.size and b.max() >= model.sizes[l]:
        raise ValueError(f"blocks[{l - 1}] holds unit {b.max()} but layer {l} has "
                         f"{model.sizes[l]} units.")

  def coefficients(model, noise_precision, precision):
    check_blocks(model)
    out = []
    for l in range(1, model.num_layers + 1):
      b = blocks[l - 1]
      idx = jnp.asarray(np.maximum(b, 0))
      mask = jnp.asarray(b >= 0, precision[l - 1].dtype)  # padding moves by 0
      own, rows = _unit_rows(model, l, noise_precision, precision)
      ch, cw = _children_rows(model, l - 1)
      out.append(_SweepLayer(own=own[idx] * mask, rows=rows[idx] * mask[..., None],
                             children=None if ch is None else ch[idx], child_weights=cw[idx]))
    return tuple(out)

  def step(model: GaussianDEF, state: DEFState) -> DEFState:
    check_blocks(model)
    coefs = state.prepared.coefficients
    means = list(state.means)
    res = list(state.residuals)
    for l in range(1, model.num_layers + 1):
      coef = coefs[l - 1]
      idx = jnp.asarray(np.maximum(blocks[l - 1], 0))
      own = (-res[l])[idx] * coef.own
      if coef.children is None:
        def body(r_below, xs):
          a, w, ws = xs
          delta = a + ws @ r_below
          return r_below - delta @ w, delta
        xs = (own, coef.child_weights, coef.rows)
      else:
        def body(r_below, xs):
          a, c, w, ws = xs
          delta = a + jnp.sum(ws * _take(r_below, c), axis=1)
          return _add_at(r_below, c, -w * delta[:, None]), delta
        xs = (own, coef.children, coef.child_weights, coef.rows)
      r_below, deltas = jax.lax.scan(body, res[l - 1], xs)
      flat_idx, flat_delta = idx.reshape(-1), deltas.reshape(-1)
      means[l - 1] = means[l - 1].at[flat_idx].add(flat_delta)
      res[l] = res[l].at[flat_idx].add(flat_delta)
      res[l - 1] = r_below
    return DEFState(tuple(means), state.prepared.variances, tuple(res), state.prepared,
                    state.iteration + 1)

  tag = "block(" + ",".join(f"{b.shape[0]}x{b.shape[1]}" for b in blocks) + ")"
  return _make_solver("block", tag, _cavi_quantities(coefficients), step)


def make_solver(method: str, model: GaussianDEF | None = None, **kwargs) -> DEFSolver:
  """Builds a solver by name.

  Args:
    method: one of ``METHODS``: ``"sequential"``, ``"parallel"``, ``"block"``, ``"fm"``,
      ``"fm_ls"`` (``forest_mixture(line_search=True)``), ``"fm_cg"``
      (``forest_mixture(line_search=True, conjugate=True)``).
    model: needed for ``"block"`` unless ``blocks=`` is passed (its colouring).
    **kwargs: passed to the factory (``unroll``, ``buckets``, ``mixture``, ``line_search``,
      ``blocks``).

  Raises:
    ValueError: unknown method, or ``"block"`` without a model or blocks.
  """
  if method == "sequential":
    return sequential_cavi(**kwargs)
  if method == "parallel":
    return parallel_cavi(**kwargs)
  if method == "fm":
    return forest_mixture(**kwargs)
  if method == "fm_ls":
    return forest_mixture(line_search=True, **kwargs)
  if method == "fm_cg":
    return forest_mixture(line_search=True, conjugate=True, **kwargs)
  if method == "block":
    if "blocks" not in kwargs:
      if model is None:
        raise ValueError("method 'block' needs the model (for its colouring) or blocks=...")
      kwargs["blocks"] = color_blocks(model)
    return block_cavi(**kwargs)
  raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")


def solve(solver: DEFSolver, model: GaussianDEF, *, max_iters: int = 1000, tol: float = 1e-6,
          criterion: str = "elbo", state: DEFState | None = None,
          divergence_rtol: float | None = None, limit: int | Array | None = None,
          prepared: DEFPrepared | None = None) -> tuple[DEFState, SolveInfo]:
  """Iterates ``solver.step`` in a ``lax.while_loop`` until a stopping rule or divergence.

  Stopping rules the solver computes itself: ``"elbo"``: ``|ELBO_t - ELBO_{t-1}| <= tol |ELBO_t|``;
  ``"means"``: ``max |m_t - m_{t-1}| <= tol * max(1, max |m_t|)``. Divergence: the ELBO drops by
  more than ``divergence_rtol * |ELBO|`` (default ``1000 * eps`` of the dtype; any convergent
  method here is monotone) or stops being finite.

  Args:
    solver: from ``make_solver`` or a factory.
    model: the model.
    max_iters: iteration budget (static).
    tol: tolerance of the stopping rule.
    criterion: ``"elbo"`` or ``"means"``.
    state: optional initial state (default ``solver.init(model)``).
    divergence_rtol: relative ELBO drop treated as divergence.
    limit: optional iteration budget ``<= max_iters`` that may be a traced value, so one
      compiled solve serves several budgets (``tol`` may be traced too; ``tol < 0`` never stops).
    prepared: optional ``solver.prepare(model)`` (model-only quantities, computed once per
      model): the solve then does only the ``x``-dependent work. Repeated inference with one
      model: ``solve(solver, model._replace(x=x), prepared=prepared)`` per ``x`` (or
      ``jax.vmap`` over ``x``); the result equals the unprepared solve's up to rounding.

  Returns:
    ``(final_state, SolveInfo)``.
  """
  if criterion not in CRITERIA:
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}.")
  if max_iters < 1:
    raise ValueError(f"max_iters must be >= 1, got {max_iters}.")
  if state is None:
    state = solver.init(model, prepared=prepared)
  elif prepared is not None:
    raise ValueError("solve got both state and prepared; pass prepared to solver.init(model, "
                     "means, prepared=prepared) and the state to solve.")
  dtype = model.x.dtype
  if divergence_rtol is None:
    divergence_rtol = 1000.0 * float(jnp.finfo(dtype).eps)
  # A state whose variances are the prepared optimum (the default init): the fit term suffices.
  fit0 = _fit_elbo(state.prepared, state.residuals)
  e0 = fit0 if state.variances is state.prepared.variances else state_elbo(model, state)
  trace = jnp.full((max_iters + 1,), jnp.nan, dtype).at[0].set(e0)

  budget = max_iters if limit is None else jnp.minimum(limit, max_iters)

  def cond(carry):
    _, _, _, it, done, bad = carry
    return (it < budget) & ~done & ~bad

  # The prepared quantities are loop constants, closed over rather than carried: under vmap a
  # batched stopping rule batches every carried array (JAX's while_loop batching rule).
  prepared = state.prepared

  def body(carry):
    st, e_prev, tr, it, _, _ = carry
    new = solver.step(model, st._replace(prepared=prepared))._replace(prepared=None)
    # A step leaves the variances at their optimum 1/Lam: only the fit term depends on the means.
    # Steps that know their ELBO gain carry the ELBO (DEFState.elbo); the others get it here.
    if new.elbo is None:
      new = new._replace(elbo=_fit_elbo(prepared, new.residuals))
    e = new.elbo
    tr = tr.at[it + 1].set(e)
    if criterion == "elbo":
      done = jnp.abs(e - e_prev) <= tol * jnp.abs(e)
    else:
      change = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in zip(new.means, st.means)]))
      scale = jnp.max(jnp.stack([jnp.max(jnp.abs(a)) for a in new.means]))
      done = change <= tol * jnp.maximum(1.0, scale)
    bad = ~jnp.isfinite(e) | (e < e_prev - divergence_rtol * jnp.abs(e_prev))
    return new, e, tr, it + 1, done & ~bad, bad

  # The carried ELBO is at the optimal variances (where every step leaves them), e0 at the
  # state's own.
  carry = (state._replace(prepared=None, elbo=fit0), e0, trace, jnp.zeros((), jnp.int32),
           jnp.zeros((), bool), jnp.zeros((), bool))
  state, _, trace, it, done, bad = jax.lax.while_loop(cond, body, carry)
  state = state._replace(prepared=prepared)
  return state, SolveInfo(elbo=trace, iterations=it, converged=done, diverged=bad)
