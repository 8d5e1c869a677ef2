"""Functional LoRA: a transform of any pure ``apply_fn(params, *args)`` over a parameter tree.

Hu et al. 2021 (LoRA, arXiv:2106.09685); rsLoRA scaling after Kalajdzievski 2023
(arXiv:2312.03732); quantized bases after Dettmers et al. 2023 (QLoRA, arXiv:2305.14314).

For every kernel ``W`` selected by a key-path regex (``growjax.tree.mask``), LoRA adds a
low-rank update in weight space,

    W_eff = W + s · a @ b,    a [d_in, r], b [r, d_out],    s = α/r  (rsLoRA: α/√r),

and calls the original ``apply_fn`` with the effective parameters; nothing about the model has to
know about LoRA (``lambda p, x: model.apply({"params": p}, x)`` works as is). Kernels are viewed
as matrices ``[*batch, d_in, d_out]``: ``batch_dims`` leading axes are stacked layers
(``[L, d_in, d_out]`` scanned with ``lax.scan``; adapters are then ``[L, d_in, r]``,
``[L, r, d_out]``) and ``in_dims`` axes form d_in (flax ``DenseGeneral`` kernels such as an
attention output ``[heads, head_dim, d]`` use ``in_dims=2``). A base leaf may be a
``growjax.quant.QuantizedTensor``: it is dequantized inside the transformed call.

The adapters are a separate tree (``{"<kernel path>": {"a": ..., "b": ...}}`` nested like the
parameters), so ``jax.grad`` with respect to it and ``optimizer.init(adapters)`` give gradients and
optimizer state for the adapters only; the base enters through ``lax.stop_gradient`` and gets
exactly zero gradient even when differentiated. ``adapters_only`` is the optax-mask variant for a
combined ``{..., "lora": adapters}`` tree.

Dropout acts on the adapter path's input features: a mask over the rows of ``a`` (equivalently
the features of ``x`` in ``x·a``) drawn once per call from the explicit ``rng`` and shared by the
batch — the weight-space form of LoRA dropout, which is what a transform of ``apply_fn`` can do.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from growjax import tree as gtree
from growjax.quant import init as qinit
from growjax.quant import tensor as qtensor

PyTree = Any
Array = jnp.ndarray


class LoraTarget(NamedTuple):
  """Which kernels get adapters, and their rank and α.

  Attributes:
    include: regex(es) on ``/``-joined key paths (``re.search``), e.g. ``"(query|value)/kernel$"``.
    rank: r.
    alpha: α (``s = α/r``, or ``α/√r`` with rsLoRA).
    batch_dims: leading stacked-layer axes of the kernel.
    in_dims: kernel axes (after the batch axes) that form d_in; the rest form d_out.
    exclude: regex(es) removed from ``include``.
  """
  include: str | tuple[str, ...]
  rank: int = 8
  alpha: float = 16.0
  batch_dims: int = 0
  in_dims: int = 1
  exclude: str | tuple[str, ...] = ()


class _Site(NamedTuple):
  target: LoraTarget
  shape: tuple[int, ...]
  batch: tuple[int, ...]
  d_in: int
  d_out: int
  scale: float


class Lora(NamedTuple):
  """LoRA as pure functions (built by ``lora``); the caller decides where to jit.

  Attributes:
    init: ``(key, params) -> adapters`` (``a`` uniform ±1/√d_in, ``b = 0``).
    apply: ``(apply_fn) -> fn(params, adapters, *args, rng=None, **kwargs)``.
    effective_params: ``(params, adapters, rng=None) -> params`` with ``W + s·a@b`` (and every
      quantized leaf dequantized), under ``stop_gradient`` for the base.
    merge: ``(params, adapters) -> (params, report)``; a quantized base is re-quantized in its own
      format and ``report[path]["rel_error"]`` gives ``‖dequant(Q') − (W + s·ab)‖/‖W + s·ab‖``.
    unmerge: ``(params, adapters) -> (params, report)``, the inverse (``W − s·a@b``).
    sites: ``(params) -> {path: site}`` with each target's shape, d_in, d_out and scale s.
    init_from: ``(params, init_fn, quantizer, *, key, grams=None) -> (params, adapters)``: runs a
      ``growjax.quant`` initialisation ``(W, quantizer, context) -> (Q, a, b)`` on every target.
    value_and_grad: ``(fn, has_aux=False) -> g(params, adapters, *args, rng=None, **kw)``
      returning ``(fn(effective params, *args), adapter gradients)``; see ``value_and_grad``.
  """
  init: Callable[..., PyTree]
  apply: Callable[[Callable], Callable]
  effective_params: Callable[..., PyTree]
  merge: Callable[..., tuple[PyTree, dict]]
  unmerge: Callable[..., tuple[PyTree, dict]]
  sites: Callable[[PyTree], dict]
  init_from: Callable[..., tuple[PyTree, PyTree]]
  value_and_grad: Callable[..., Callable]


def _flatten(tree: PyTree) -> dict[str, Any]:
  """``{path: leaf}`` treating ``QuantizedTensor`` as a leaf."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=qtensor.is_quantized)
  return {gtree.path_str(kp): leaf for kp, leaf in leaves}


def _map(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(gtree.path_str(kp), x), tree,
                                          is_leaf=qtensor.is_quantized)


def _view(tree: PyTree) -> PyTree:
  """The tree with each ``QuantizedTensor`` replaced by a ShapeDtypeStruct leaf (for masks)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if qtensor.is_quantized(x) else x, tree,
      is_leaf=qtensor.is_quantized)


def _as_tuple(v) -> tuple:
  return (v,) if isinstance(v, str) else tuple(v)


def lora(targets: LoraTarget | Sequence[LoraTarget], *, rslora: bool = False,
         dropout: float = 0.0, dtype: Any = None) -> Lora:
  """Builds LoRA for the given targets (a key path takes the first target that matches it).

  Args:
    targets: one ``LoraTarget`` or several (per-target rank and α).
    rslora: scale by ``α/√r`` instead of ``α/r``.
    dropout: probability of dropping an input feature of the adapter path (needs ``rng``).
    dtype: adapter dtype (default: the base leaf's float dtype).

  Returns:
    A ``Lora`` of pure functions.
  """
  targets = (targets,) if isinstance(targets, LoraTarget) else tuple(targets)
  if not targets or not all(isinstance(t, LoraTarget) for t in targets):
    raise TypeError("lora: targets must be one or more growjax.peft.LoraTarget.")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"lora: dropout must be in [0, 1), got {dropout}.")

  def scale_of(t: LoraTarget) -> float:
    return float(t.alpha) / (math.sqrt(t.rank) if rslora else t.rank)

  def sites(params: PyTree) -> dict[str, _Site]:
    view = _view(params)
    claimed: dict[str, _Site] = {}
    leaves = gtree.flatten(view)
    for t in targets:
      selected = gtree.flatten(gtree.mask(view, _as_tuple(t.include), _as_tuple(t.exclude)))
      for path, sel in selected.items():
        if not sel or path in claimed:
          continue
        claimed[path] = _site(path, leaves[path], t)
    return dict(sorted(claimed.items()))

  def _site(path: str, leaf, t: LoraTarget) -> _Site:
    shape = tuple(np.shape(leaf))
    dt = leaf.dtype
    if not jnp.issubdtype(dt, jnp.floating):
      raise TypeError(f"LoRA target {path!r} has dtype {dt}; only floating kernels (or "
                      f"QuantizedTensors) can take adapters — tighten the include regex.")
    bd, nin = t.batch_dims, t.in_dims
    if bd < 0 or nin < 1 or len(shape) < bd + nin + 1:
      raise ValueError(
          f"LoRA target {path!r} has shape {shape}; batch_dims={bd} and in_dims={nin} need a "
          f"kernel with at least {bd + nin + 1} axes ([*batch, *in, *out]).")
    d_in = math.prod(shape[bd:bd + nin])
    d_out = math.prod(shape[bd + nin:])
    if not isinstance(t.rank, (int, np.integer)) or not 1 <= t.rank <= min(d_in, d_out):
      raise ValueError(
          f"LoRA rank {t.rank!r} for {path!r} must be in [1, min(d_in, d_out)] = "
          f"[1, {min(d_in, d_out)}] (the kernel is viewed as [{d_in}, {d_out}]"
          f"{f' per stacked layer of {shape[:bd]}' if bd else ''}).")
    return _Site(t, shape, shape[:bd], d_in, d_out, scale_of(t))

  def _adapter_dtype(leaf):
    return jnp.dtype(dtype) if dtype is not None else jnp.dtype(leaf.dtype)

  def init(key: jax.Array, params: PyTree) -> PyTree:
    flat = _flatten(params)
    out = {}
    for i, (path, site) in enumerate(sites(params).items()):
      dt = _adapter_dtype(flat[path])
      bound = 1.0 / math.sqrt(site.d_in)
      a = jax.random.uniform(jax.random.fold_in(key, i), site.batch + (site.d_in, site.target.rank),
                             dt, -bound, bound)
      out[f"{path}/a"] = a
      out[f"{path}/b"] = jnp.zeros(site.batch + (site.target.rank, site.d_out), dt)
    return gtree.unflatten(out)

  def _pairs(params: PyTree, adapters: PyTree) -> dict[str, tuple[_Site, Array, Array]]:
    the_sites = sites(params)
    flat = gtree.flatten(adapters)
    expected = {f"{p}/{ab}" for p in the_sites for ab in "ab"}
    unknown, missing = sorted(set(flat) - expected), sorted(expected - set(flat))
    if unknown or missing:
      raise ValueError(f"Adapters do not match the LoRA targets of these params: unknown adapter "
                       f"leaves {unknown}, missing adapter leaves {missing}; build them with "
                       f"lora.init(key, params) or lora.init_from(...).")
    return {p: (s, flat[f"{p}/a"], flat[f"{p}/b"]) for p, s in the_sites.items()}

  def _delta(site: _Site, a: Array, b: Array) -> Array:
    expect_a = site.batch + (site.d_in, site.target.rank)
    expect_b = site.batch + (site.target.rank, site.d_out)
    if a.shape != expect_a or b.shape != expect_b:
      raise ValueError(f"Adapter shapes a{a.shape}, b{b.shape} do not fit the target "
                       f"(expected a{expect_a}, b{expect_b}).")
    prod = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    return (site.scale * prod).reshape(site.shape)

  def _dense(leaf):
    return qtensor.dequantize(leaf) if qtensor.is_quantized(leaf) else leaf

  def effective_params(params: PyTree, adapters: PyTree, rng: jax.Array | None = None) -> PyTree:
    pairs = _pairs(params, adapters)
    deltas = {}
    for i, (path, (site, a, b)) in enumerate(pairs.items()):
      if rng is not None and dropout > 0.0:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - dropout,
                                    a.shape[:-1] + (1,))
        a = jnp.where(keep, a / (1.0 - dropout), jnp.zeros((), a.dtype)).astype(a.dtype)
      deltas[path] = _delta(site, a, b)

    def effective(path, leaf):
      w = jax.lax.stop_gradient(_dense(leaf))
      if path in deltas:
        w = (w.astype(jnp.float32) + deltas[path]).astype(w.dtype)
      return w

    return _map(effective, params)

  def apply(apply_fn: Callable) -> Callable:
    def lora_fn(params, adapters, *args, rng: jax.Array | None = None, **kwargs):
      return apply_fn(effective_params(params, adapters, rng), *args, **kwargs)
    return lora_fn

  def _combine(params, adapters, sign):
    pairs = _pairs(params, adapters)
    report = {}

    def combine(path, leaf):
      if path not in pairs:
        return leaf
      site, a, b = pairs[path]
      target = _dense(leaf).astype(jnp.float32) + sign * _delta(site, a, b)
      if qtensor.is_quantized(leaf):
        new = qtensor.quantize(target.astype(leaf.dtype), leaf.config,
                               batch_dims=len(leaf.batch_shape))
        recon = qtensor.dequantize(new).astype(jnp.float32)
      else:
        new = target.astype(leaf.dtype)
        recon = new.astype(jnp.float32)
      err = jnp.linalg.norm((recon - target).reshape(-1))
      report[path] = {"rel_error": err / jnp.maximum(jnp.linalg.norm(target.reshape(-1)), 1e-30),
                      "abs_error": err, "quantized": qtensor.is_quantized(leaf)}
      return new

    return _map(combine, params), report

  def merge(params, adapters):
    return _combine(params, adapters, 1.0)

  def unmerge(params, adapters):
    return _combine(params, adapters, -1.0)

  def init_from(params: PyTree, init_fn: qinit.InitFn, quantizer, *, key: jax.Array,
                grams: Mapping[str, Array] | None = None) -> tuple[PyTree, PyTree]:
    flat = _flatten(params)
    grams = dict(grams or {})
    new_leaves, adapters = {}, {}
    for i, (path, site) in enumerate(sites(params).items()):
      W = flat[path]
      if qtensor.is_quantized(W):
        raise ValueError(f"init_from needs the full-precision weight at {path!r}; it is already "
                         f"quantized. Initialise from the float checkpoint.")
      mats = jnp.asarray(W).reshape((-1, site.d_in, site.d_out))
      gram = grams.get(path)
      if gram is not None:
        gram = jnp.asarray(gram).reshape((-1,) + jnp.shape(gram)[len(site.batch):])
      outs = []
      for j in range(mats.shape[0]):
        ctx = qinit.InitContext(
            rank=int(site.target.rank), scale=site.scale,
            key=jax.random.fold_in(jax.random.fold_in(key, i), j),
            gram=None if gram is None else gram[j])
        outs.append(init_fn(mats[j], quantizer, ctx))
      Qs, As, Bs = zip(*outs)
      inner = site.shape[len(site.batch):]
      if site.batch:
        Q = jax.tree.map(lambda *xs: jnp.stack(xs).reshape(site.batch + xs[0].shape), *Qs)
        A = jnp.stack(As).reshape(site.batch + As[0].shape)
        B = jnp.stack(Bs).reshape(site.batch + Bs[0].shape)
      else:
        Q, A, B = Qs[0], As[0], Bs[0]
      if qtensor.is_quantized(Q):
        Q = qtensor.reshape(Q, inner)
      else:
        Q = jnp.asarray(Q).reshape(site.shape)
      dt = _adapter_dtype(W)
      new_leaves[path] = Q
      adapters[f"{path}/a"] = A.astype(dt)
      adapters[f"{path}/b"] = B.astype(dt)
    new_params = _map(lambda p, leaf: new_leaves.get(p, leaf), params)
    return new_params, gtree.unflatten(adapters)

  def value_and_grad(fn: Callable, has_aux: bool = False) -> Callable:
    """Value and adapter gradients of ``fn(params, *args)`` under LoRA.

    The same value and gradients as ``jax.value_and_grad(lambda ad: apply(fn)(params, ad,
    *args), has_aux=has_aux)``, computed faster on XLA:CPU: it also differentiates the base's
    vector leaves (biases, norm scales; ndim <= 1) and keeps those gradients alive by adding
    ``0·Σ(their sums)`` to the value. Without a bias gradient consuming each layer's output
    gradient, XLA:CPU's layout assignment materialised that gradient transposed in slow strided
    copies, and the LoRA step of the benchmark transformer cost 1.25× the frozen model's
    forward/backward instead of ~1.05× (benchmarks/quant.py reports both; merely computing and
    dropping the gradients does not help, XLA removes them as dead code). The cost is one small
    reduction per vector; a non-finite vector gradient turns the value into NaN.
    """

    def vg(params, adapters, *args, rng: jax.Array | None = None, **kwargs):
      flat = _flatten(params)
      vecs = {p: v for p, v in flat.items()
              if not qtensor.is_quantized(v) and jnp.ndim(v) <= 1
              and jnp.issubdtype(jnp.result_type(v), jnp.floating)}

      def loss(ad, vec_leaves):
        eff = effective_params(params, ad, rng)
        eff = _map(lambda p, x: vec_leaves.get(p, x), eff)
        return fn(eff, *args, **kwargs)

      out, (g_adapters, g_vecs) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=has_aux)(
          adapters, vecs)
      keep_alive = sum((jnp.sum(g).astype(jnp.float32) for g in jax.tree.leaves(g_vecs)),
                       jnp.zeros((), jnp.float32))
      if has_aux:
        value, aux = out
        out = (value + (0.0 * keep_alive).astype(value.dtype), aux)
      else:
        out = out + (0.0 * keep_alive).astype(out.dtype)
      return out, g_adapters

    return vg

  return Lora(init, apply, effective_params, merge, unmerge, sites, init_from, value_and_grad)


def adapters_only(tx: optax.GradientTransformation,
                  adapter_key: str = "lora") -> optax.GradientTransformation:
  """Optax mask for a combined tree: ``tx`` on the ``adapter_key`` subtree, zero updates and no
  optimizer state elsewhere (``optax.multi_transform`` with ``set_to_zero``)."""
  pattern = rf"(^|/){re.escape(adapter_key)}/"

  def labels(tree):
    m = gtree.mask(tree, pattern)
    return jax.tree.map(lambda sel: "adapter" if sel else "frozen", m)

  return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, labels)


def count_adapter_params(adapters: PyTree) -> int:
  """Number of trainable adapter entries."""
  return gtree.count(adapters)

