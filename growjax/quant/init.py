"""Quantization-aware LoRA initialisations, all pure functions ``(W, quantizer, context) -> (Q, a, b)``.

With a frozen weight ``W`` [d_in, d_out] (Flax layout ``y = xW``), LoRA adds ``s·a@b`` with
``a`` [d_in, r], ``b`` [r, d_out] and ``s = context.scale`` (α/r, or α/√r for rsLoRA). An
initialisation chooses the quantized base ``Q`` and the starting adapters so that
``dequant(Q) + s·a@b`` approximates ``W``:

* ``qlora()`` — Dettmers et al. 2023 (arXiv:2305.14314): ``Q = quant(W)``, ``a`` uniform in
  ±1/√d_in (PEFT's Kaiming-uniform default), ``b = 0``.
* ``loftq(iters=T)`` — Li et al. 2023 (arXiv:2310.08659): alternate ``Q = quant(W − s·ab)`` and
  ``s·ab = SVD_r(W − dequant(Q))``, T times (LoftQ-1 is T = 1).
* ``pissa()`` — Meng et al. 2024 (arXiv:2404.02948): the adapters take the top-r singular part of
  ``W``; the base is the residual, quantized (QPiSSA) or kept in float when ``quantizer`` is None.
* ``quailora(method=...)`` — Lawton et al. 2024 (arXiv:2410.14713): keep QLoRA's ``Q = quant(W)``
  and pick the adapters that cancel the quantization error *as the layer's inputs see it*:
  minimise ``‖X(E − s·ab)‖²_F = tr((E − s·ab)ᵀ H (E − s·ab))`` with ``E = W − dequant(Q)`` and the
  calibration Gram ``H = XᵀX + λI`` (λ = ``damping`` × mean diagonal). ``method="als"`` runs the
  paper's alternating closed-form least squares from the SVD of E; ``method="closed_form"`` the
  global optimum: with ``H = RᵀR`` (Cholesky), the rank-r SVD of ``R E`` mapped back by ``R⁻¹``.

Fisher hooks for LQ-LoRA (Guo et al. 2023, arXiv:2311.12023): ``context.row_weights`` [d_in] and
``context.col_weights`` [d_out] turn every SVD step into the weighted one
(SVD of ``diag(r)·M·diag(c)``, then unscaled), see ``low_rank``.

The factor split between ``a`` and ``b`` is symmetric (``U√S`` and ``√S Vᵀ``, divided by √s).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["key", "gram", "row_weights", "col_weights"],
                   meta_fields=["rank", "scale"])
@dataclasses.dataclass(frozen=True)
class InitContext:
  """Per-matrix data an initialisation may use (a pytree: ``rank`` and ``scale`` are static, so
  an init can be jitted with the context as an argument).

  Attributes:
    rank: r, the adapter rank.
    scale: s, the LoRA multiplier (``W ≈ dequant(Q) + s·a@b``).
    key: PRNG key (QLoRA's random ``a``).
    gram: calibration Gram ``XᵀX`` [d_in, d_in] (QuAILoRA), e.g. from
      ``growjax.quant.calibration``.
    row_weights: optional [d_in] weights of the SVD steps (LQ-LoRA's Fisher rows).
    col_weights: optional [d_out] weights of the SVD steps (LQ-LoRA's Fisher columns).
  """
  rank: int
  scale: float = 1.0
  key: jax.Array | None = None
  gram: Array | None = None
  row_weights: Array | None = None
  col_weights: Array | None = None


InitFn = Callable[[Array, Any, InitContext], tuple[Any, Array, Array]]


def _check(W: Array, context: InitContext, *, name: str) -> None:
  if not isinstance(context, InitContext):
    raise TypeError(f"{name}: context must be a growjax.quant.InitContext, got "
                    f"{type(context).__name__}.")
  if not jnp.issubdtype(jnp.asarray(W).dtype, jnp.floating):
    raise TypeError(f"{name}: W must be a floating-point matrix, got dtype {jnp.asarray(W).dtype}.")
  if jnp.ndim(W) != 2:
    raise ValueError(f"{name}: W must be a 2-D kernel [d_in, d_out], got shape {jnp.shape(W)}; "
                     f"reshape DenseGeneral kernels to 2-D and vmap over stacked layers.")
  d_in, d_out = W.shape
  r = context.rank
  if not isinstance(r, (int, np.integer)) or r < 1 or r > min(d_in, d_out):
    raise ValueError(f"{name}: rank={r!r} must be an integer in [1, min(d_in, d_out)] = "
                     f"[1, {min(d_in, d_out)}] for a [{d_in}, {d_out}] kernel.")


def _check_weights(v, n: int, what: str) -> None:
  if v is not None and jnp.shape(v) != (n,):
    raise ValueError(f"{what} must have shape ({n},), got {jnp.shape(v)}.")


def low_rank(M: Array, rank: int, row_weights: Array | None = None,
             col_weights: Array | None = None) -> tuple[Array, Array]:
  """Best rank-r factors ``(A, B)`` with ``A@B ≈ M`` [m, n] -> A [m, r], B [r, n].

  With weights, minimises ``‖diag(row)·(M − AB)·diag(col)‖_F`` exactly (SVD of the scaled matrix,
  then unscaled), LQ-LoRA's Fisher-weighted SVD step. The singular values are split evenly.
  """
  m, n = M.shape
  _check_weights(row_weights, m, "row_weights")
  _check_weights(col_weights, n, "col_weights")
  scaled = M
  if row_weights is not None:
    scaled = scaled * row_weights[:, None]
  if col_weights is not None:
    scaled = scaled * col_weights[None, :]
  u, s, vt = jnp.linalg.svd(scaled, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  A = u[:, :rank] * root[None, :]
  B = root[:, None] * vt[:rank]
  if row_weights is not None:
    A = A / row_weights[:, None]
  if col_weights is not None:
    B = B / col_weights[None, :]
  return A, B


def _split(A: Array, B: Array, scale: float, dtype) -> tuple[Array, Array]:
  """Adapters with ``s·a@b = A@B``."""
  root = np.sqrt(float(scale))
  return (A / root).astype(dtype), (B / root).astype(dtype)


def _quant(quantizer, M: Array):
  if quantizer is None:
    raise ValueError("This initialisation quantizes the base: pass a growjax.quant.Quantizer "
                     "(e.g. growjax.quant.quantizer('nf4')).")
  Q = quantizer.quantize(M)
  return Q, quantizer.dequantize(Q).astype(M.dtype)


def qlora() -> InitFn:
  """QLoRA: ``Q = quant(W)``, ``a ~ U(±1/√d_in)``, ``b = 0`` (needs ``context.key``)."""

  def init(W, quantizer, context: InitContext):
    _check(W, context, name="qlora")
    if context.key is None:
      raise ValueError("qlora: context.key is required for the random adapter a.")
    Q, _ = _quant(quantizer, W)
    d_in, d_out = W.shape
    bound = 1.0 / np.sqrt(d_in)
    a = jax.random.uniform(context.key, (d_in, context.rank), W.dtype, -bound, bound)
    return Q, a, jnp.zeros((context.rank, d_out), W.dtype)

  return init


def loftq(iters: int = 1) -> InitFn:
  """LoftQ(T): alternate ``Q = quant(W − s·ab)`` and ``s·ab = SVD_r(W − dequant(Q))``, T times."""
  if iters < 1:
    raise ValueError(f"loftq: iters must be >= 1, got {iters}.")

  def init(W, quantizer, context: InitContext):
    _check(W, context, name="loftq")
    low = jnp.zeros_like(W)
    for _ in range(iters):
      Q, Wq = _quant(quantizer, W - low)
      A, B = low_rank(W - Wq, context.rank, context.row_weights, context.col_weights)
      low = A @ B
    a, b = _split(A, B, context.scale, W.dtype)
    return Q, a, b

  return init


def pissa() -> InitFn:
  """PiSSA / QPiSSA: adapters = top-r singular part of W; base = (quantized) residual.

  With ``quantizer=None`` the base is the float residual (PiSSA), else ``quant(W − s·ab)``.
  """

  def init(W, quantizer, context: InitContext):
    _check(W, context, name="pissa")
    A, B = low_rank(W, context.rank, context.row_weights, context.col_weights)
    residual = W - A @ B
    Q = residual if quantizer is None else quantizer.quantize(residual)
    a, b = _split(A, B, context.scale, W.dtype)
    return Q, a, b

  return init


def damped_gram(gram: Array, d_in: int, damping: float) -> Array:
  """``H = XᵀX + λI`` with ``λ = damping · mean(diag(XᵀX))`` (λ = damping if the Gram is 0).

  Raises:
    ValueError: the Gram is not [d_in, d_in].
  """
  gram = jnp.asarray(gram)
  if gram.shape != (d_in, d_in):
    raise ValueError(
        f"The calibration Gram must be [d_in, d_in] = [{d_in}, {d_in}] for this kernel, got "
        f"{list(gram.shape)}; it was probably captured for another layer (check the key path) "
        f"or the kernel is transposed (growjax uses the Flax layout y = x @ W, W [d_in, d_out]).")
  mean_diag = jnp.mean(jnp.diagonal(gram))
  lam = damping * jnp.where(mean_diag > 0, mean_diag, 1.0)
  return gram + lam * jnp.eye(d_in, dtype=gram.dtype)


def calibrated_error(W: Array, W_base: Array, a: Array, b: Array, scale: float,
                     gram: Array) -> Array:
  """``tr(Dᵀ XᵀX D)`` with ``D = W − W_base − s·a@b``: the layer's output error on the calibration inputs."""
  D = W - W_base - scale * (a @ b)
  return jnp.sum(D * (gram.astype(D.dtype) @ D))


def quailora(method: str = "als", iters: int = 50, damping: float = 1e-2) -> InitFn:
  """QuAILoRA: ``Q = quant(W)``; adapters minimise ``tr((E − s·ab)ᵀ H (E − s·ab))``.

  Args:
    method: ``"als"`` (alternating least squares from the SVD of E, ``iters`` rounds: the
      ``b``-step ``b = (aᵀHa)⁻¹aᵀHE``, the ``a``-step ``a = E bᵀ(bbᵀ)⁻¹``) or ``"closed_form"``
      (rank-r SVD of ``R E`` with ``H = RᵀR``, then ``a = R⁻¹U√S``).
    iters: ALS rounds.
    damping: λ relative to the mean diagonal of ``XᵀX``.

  Returns:
    An ``InitFn``; it needs ``context.gram`` [d_in, d_in].
  """
  if method not in ("als", "closed_form"):
    raise ValueError(f"quailora: method must be 'als' or 'closed_form', got {method!r}.")

  def init(W, quantizer, context: InitContext):
    _check(W, context, name="quailora")
    if context.gram is None:
      raise ValueError("quailora: context.gram (the calibration XᵀX of this layer) is required; "
                       "capture it with growjax.quant.calibration.")
    Q, Wq = _quant(quantizer, W)
    E = W - Wq
    H = damped_gram(context.gram, W.shape[0], damping).astype(W.dtype)
    r = context.rank
    if method == "closed_form":
      A, B = closed_form_factors(E, H, r)
    else:
      A, B = als_factors(E, H, r, iters)
    a, b = _split(A, B, context.scale, W.dtype)
    return Q, a, b

  return init


def closed_form_factors(E: Array, H: Array, rank: int) -> tuple[Array, Array]:
  """Global minimiser of ``tr((E − AB)ᵀH(E − AB))`` over rank-r ``AB``: ``H = RᵀR``, SVD_r(RE), ``R⁻¹``."""
  R = jnp.linalg.cholesky(H).T  # H = L Lᵀ = RᵀR with R = Lᵀ upper triangular.
  A_r, B = low_rank(R @ E, rank)
  A = jax.scipy.linalg.solve_triangular(R, A_r, lower=False)
  return A, B


def als_factors(E: Array, H: Array, rank: int, iters: int) -> tuple[Array, Array]:
  """Alternating least squares for ``min tr((E − AB)ᵀH(E − AB))`` from ``SVD_r(E)``."""
  A, B = low_rank(E, rank)
  HE = H @ E

  def body(_, ab):
    A, _ = ab
    B = jnp.linalg.solve(A.T @ H @ A, A.T @ HE)
    A = jnp.linalg.solve(B @ B.T, B @ E.T).T
    # Only span(A) matters to the next b-step; an orthonormal basis keeps AᵀHA well conditioned.
    A, _ = jnp.linalg.qr(A)
    return A, B

  A, B = jax.lax.fori_loop(0, iters, body, (A, B))
  # End on a b-step so that B is optimal for the final A.
  B = jnp.linalg.solve(A.T @ H @ A, A.T @ HE)
  return A, B

